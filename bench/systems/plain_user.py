"""S6's floor: a per-user operator with two pieces of state, hand-written with dicts (project venv;
imports nothing from headrace).

The work of S6's headrace operator (``headrace_count.py --mode user``: a ``ValueState`` with the
user's record count and a ``MapState`` category -> count) with nothing a runtime adds: input key =
user id, value = ``b"<category>|<padding>"``; per record the user's total and the (user, category)
count go up by one and ``("<user>:<category>", count)`` is produced (int64 big-endian), one
``BatchBuilder`` per output partition per poll. Like S1's floor (``plain.py``): no durability
(offsets auto-committed, no changelog). Runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from plain import I64
from plain_twohop import partitioner, send_grouped


def count_users(
    records: list[Any],
    totals: dict[bytes, int],
    per_category: dict[bytes, dict[bytes, int]],
    partition: Callable[[bytes], int],
) -> dict[int, list[tuple[bytes, bytes | None]]]:
    """The floor's per-poll work: both counts per record, the outputs grouped per partition.
    ``bench/task_micro.py --scenario s6`` times this same function."""
    groups: dict[int, list[tuple[bytes, bytes | None]]] = {}
    for r in records:
        user = r.key
        category = r.value.split(b"|", 1)[0]
        totals[user] = totals.get(user, 0) + 1
        cats = per_category.get(user)
        if cats is None:
            cats = per_category[user] = {}
        n = cats.get(category, 0) + 1
        cats[category] = n
        k = user + b":" + category
        p = partition(k)
        g = groups.get(p)
        if g is None:
            g = groups[p] = []
        g.append((k, I64(n)))
    return groups


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--group", required=True)
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
    partition = partitioner(len(await producer.partitions_for(a.output)))
    totals: dict[bytes, int] = {}
    per_category: dict[bytes, dict[bytes, int]] = {}
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100, max_records=2000)
            for records in batches.values():
                groups = count_users(records, totals, per_category, partition)
                await send_grouped(producer, a.output, groups)
    finally:
        await producer.stop()
        await consumer.stop()


if __name__ == "__main__":
    asyncio.run(main())
