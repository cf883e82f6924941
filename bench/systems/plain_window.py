"""The floor of S7, a tumbling-window count: a hand-written aiokafka loop (project venv;
imports nothing from headrace).

consume -> per partition, count per (key, 10 s window of the record timestamp) in a dict ->
when the partition's watermark (highest timestamp seen minus 2 s) reaches a window's end, emit
one final ``("<key>@<window start>", count)`` record (int64) and forget the window. No
durability: no changelog, offsets auto-committed. Runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import signal
import struct
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.partitioner import murmur2

I64 = struct.Struct(">q").pack
SIZE_MS = 10_000
OOO_MS = 2_000


class PartitionWindows:
    """The open windows of one input partition and their closing order."""

    __slots__ = ("closing", "counts", "highest")

    def __init__(self) -> None:
        self.counts: dict[tuple[bytes, int], int] = {}
        self.closing: list[tuple[int, bytes, int]] = []  # (end, key, start)
        self.highest = -(2**63)

    def add(self, records: Any, out: list[tuple[bytes, bytes]]) -> None:
        counts, closing = self.counts, self.closing
        for r in records:
            ts = r.timestamp
            start = ts - ts % SIZE_MS
            wk = (r.key, start)
            n = counts.get(wk)
            if n is None:
                heapq.heappush(closing, (start + SIZE_MS, r.key, start))
                n = 0
            counts[wk] = n + 1
            if ts > self.highest:
                self.highest = ts
                watermark = ts - OOO_MS
                while closing and closing[0][0] <= watermark:
                    _, key, s = heapq.heappop(closing)
                    out.append((b"%s@%d" % (key, s), I64(counts.pop((key, s)))))


async def send(producer: Any, out: list[tuple[bytes, bytes]], topic: str, nparts: int) -> None:
    groups: dict[int, list[tuple[bytes, bytes]]] = {}
    for k, v in out:
        groups.setdefault((murmur2(k) & 0x7FFFFFFF) % nparts, []).append((k, v))
    for p, recs in groups.items():
        batch = producer.create_batch()
        for k, v in recs:
            if batch.append(key=k, value=v, timestamp=None) is None:
                await producer.send_batch(batch, topic, partition=p)
                batch = producer.create_batch()
                batch.append(key=k, value=v, timestamp=None)
        await producer.send_batch(batch, topic, partition=p)


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
    nparts = len(await producer.partitions_for(a.output))
    windows: dict[int, PartitionWindows] = {}
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100, max_records=2000)
            out: list[tuple[bytes, bytes]] = []
            for tp, records in batches.items():
                pw = windows.get(tp.partition)
                if pw is None:
                    pw = windows[tp.partition] = PartitionWindows()
                pw.add(records, out)
            if out:
                await send(producer, out, a.output, nparts)
    finally:
        await producer.stop()
        await consumer.stop()


if __name__ == "__main__":
    asyncio.run(main())
