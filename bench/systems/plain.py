"""The floor: a hand-written aiokafka loop (project venv; imports nothing from headrace).

consume -> count in a dict -> produce one (word, count) record per word. No durability: no
changelog, offsets auto-committed. ``--mode keyed``: the record key is the word (S1/S2);
``--mode lines``: the value is a line of text, split into lower-case words (issue 4 word count).
``--send batch`` builds one BatchBuilder per partition per poll (the fastest aiokafka API);
``--send send`` is the idiomatic ``await producer.send(...)`` per record.
Output values are int64 big-endian (like headrace's INT serde). Runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.partitioner import murmur2

I64 = struct.Struct(">q").pack


async def count_and_send_batches(
    keys: list[bytes],
    counts: dict[bytes, int],
    part_cache: dict[bytes, int],
    producer: Any,
    out_topic: str,
    nparts: int,
) -> None:
    """The floor's per-poll work (``--send batch``): count each key, then one ``BatchBuilder``
    per output partition. ``bench/task_micro.py`` times this same function."""
    groups: dict[int, list[tuple[bytes, bytes]]] = {}
    for k in keys:
        n = counts.get(k, 0) + 1
        counts[k] = n
        p = part_cache.get(k)
        if p is None:
            p = part_cache[k] = (murmur2(k) & 0x7FFFFFFF) % nparts
        g = groups.get(p)
        if g is None:
            g = groups[p] = []
        g.append((k, I64(n)))
    for p, recs in groups.items():
        batch = producer.create_batch()
        for k, v in recs:
            if batch.append(key=k, value=v, timestamp=None) is None:
                await producer.send_batch(batch, out_topic, partition=p)
                batch = producer.create_batch()
                batch.append(key=k, value=v, timestamp=None)
        await producer.send_batch(batch, out_topic, partition=p)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--mode", choices=["keyed", "lines"], default="keyed")
    ap.add_argument("--send", choices=["batch", "send"], default="batch")
    a = ap.parse_args()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    consumer = AIOKafkaConsumer(
        a.input,
        bootstrap_servers=a.bootstrap,
        group_id=a.group,
        auto_offset_reset="earliest",
        enable_auto_commit=True,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=a.bootstrap, acks="all", linger_ms=5, max_batch_size=512 * 1024
    )
    await producer.start()
    await consumer.start()
    nparts = len(await producer.partitions_for(a.output))
    counts: dict[bytes, int] = {}
    part_cache: dict[bytes, int] = {}
    lines = a.mode == "lines"
    out_topic = a.output
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100, max_records=2000)
            for records in batches.values():
                if lines:
                    keys = [w.encode() for r in records for w in r.value.decode().lower().split()]
                else:
                    keys = [r.key for r in records]
                if a.send == "send":
                    for k in keys:
                        n = counts.get(k, 0) + 1
                        counts[k] = n
                        await producer.send(out_topic, I64(n), key=k)
                    continue
                await count_and_send_batches(keys, counts, part_cache, producer, out_topic, nparts)
    finally:
        await producer.stop()
        await consumer.stop()


if __name__ == "__main__":
    asyncio.run(main())
