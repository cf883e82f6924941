"""S5's floor: the two-stage word count as a hand-written aiokafka program (project venv; imports
nothing from headrace).

The same work as headrace's ``flat_map(split) -> key_by(word) -> count() -> sink``, with nothing
a runtime adds: one process, two consumer-group members (like one headrace worker with two stage
runners). Stage 1 reads lines, splits them into lower-case words and produces each word, keyed by
itself, to a repartition topic (``<output>.rep``, murmur2-partitioned like Kafka's default
partitioner); stage 2 reads the repartition topic, counts in a dict and produces ``(word, count)``
per word (int64 big-endian). Both build one ``BatchBuilder`` per output partition per poll (the
fastest aiokafka API). Offsets are committed every second, once the sends before them are
acknowledged, so a crash loses nothing (at-least-once); there is no changelog (a crash would lose
the counts): it is the floor, not a peer. Runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.partitioner import murmur2
from plain import I64

COMMIT_EVERY_S = 1.0


async def send_grouped(
    producer: Any, topic: str, groups: dict[int, list[tuple[bytes, bytes | None]]]
) -> list[Any]:
    """One ``BatchBuilder`` per partition; returns the delivery futures."""
    futures = []
    for p, recs in groups.items():
        batch = producer.create_batch()
        for k, v in recs:
            if batch.append(key=k, value=v, timestamp=None) is None:
                futures.append(await producer.send_batch(batch, topic, partition=p))
                batch = producer.create_batch()
                batch.append(key=k, value=v, timestamp=None)
        futures.append(await producer.send_batch(batch, topic, partition=p))
    return futures


def partitioner(nparts: int) -> Callable[[bytes], int]:
    cache: dict[bytes, int] = {}

    def partition(key: bytes) -> int:
        p = cache.get(key)
        if p is None:
            p = cache[key] = (murmur2(key) & 0x7FFFFFFF) % nparts
        return p

    return partition


async def run_stage(
    consumer: AIOKafkaConsumer,
    producer: AIOKafkaProducer,
    out_topic: str,
    step: Callable[[list[Any], Callable[[bytes], int]], dict[int, list[tuple[bytes, Any]]]],
    stop: asyncio.Event,
) -> None:
    """Poll, transform, send; every second wait for the acks, then commit the offsets."""
    partition = partitioner(len(await producer.partitions_for(out_topic)))
    pending: list[Any] = []
    last_commit = time.monotonic()
    while not stop.is_set():
        batches = await consumer.getmany(timeout_ms=100, max_records=2000)
        for records in batches.values():
            pending += await send_grouped(producer, out_topic, step(records, partition))
        if time.monotonic() - last_commit >= COMMIT_EVERY_S:
            await asyncio.gather(*pending)
            pending = []
            await consumer.commit()
            last_commit = time.monotonic()


def split_words(
    records: list[Any], partition: Callable[[bytes], int]
) -> dict[int, list[tuple[bytes, Any]]]:
    groups: dict[int, list[tuple[bytes, Any]]] = {}
    for r in records:
        for w in r.value.decode().lower().split():
            k = w.encode()
            p = partition(k)
            g = groups.get(p)
            if g is None:
                g = groups[p] = []
            g.append((k, None))
    return groups


def counter() -> Callable[[list[Any], Callable[[bytes], int]], dict[int, list[tuple[bytes, Any]]]]:
    counts: dict[bytes, int] = {}

    def count(
        records: list[Any], partition: Callable[[bytes], int]
    ) -> dict[int, list[tuple[bytes, Any]]]:
        groups: dict[int, list[tuple[bytes, Any]]] = {}
        for r in records:
            k = r.key
            n = counts.get(k, 0) + 1
            counts[k] = n
            p = partition(k)
            g = groups.get(p)
            if g is None:
                g = groups[p] = []
            g.append((k, I64(n)))
        return groups

    return count


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--partitions", type=int, default=4, help="of the repartition topic")
    a = ap.parse_args()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    rep = f"{a.output}.rep"
    admin = AIOKafkaAdminClient(bootstrap_servers=a.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(rep, a.partitions, 1)])
    except TopicAlreadyExistsError:
        pass
    finally:
        await admin.close()

    def consumer(topic: str, group: str) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            topic,
            bootstrap_servers=a.bootstrap,
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )

    producer = AIOKafkaProducer(
        bootstrap_servers=a.bootstrap, acks="all", linger_ms=5, max_batch_size=512 * 1024
    )
    first, second = consumer(a.input, f"{a.group}.split"), consumer(rep, f"{a.group}.count")
    await producer.start()
    await first.start()
    await second.start()
    try:
        await asyncio.gather(
            run_stage(first, producer, rep, split_words, stop),
            run_stage(second, producer, a.output, counter(), stop),
        )
    finally:
        await first.stop()
        await second.stop()
        await producer.stop()


if __name__ == "__main__":
    asyncio.run(main())
