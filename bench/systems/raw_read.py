"""S3's floor: read a topic from start to end with plain aiokafka, as fast as it goes.

Prints ``RAW <records> <value+key bytes> <seconds>``; the consumer is configured like headrace's
restore consumer (group-less, 8 MiB per partition fetch, batches of 10,000).
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--isolation", default="read_uncommitted")
    a = ap.parse_args()
    c = AIOKafkaConsumer(
        bootstrap_servers=a.bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level=a.isolation,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await c.start()
    try:
        started = time.monotonic()
        parts = c.partitions_for_topic(a.topic)
        for _ in range(50):
            if parts:
                break
            await c._client.force_metadata_update()  # no public API
            parts = c.partitions_for_topic(a.topic)
            await asyncio.sleep(0.1)
        if not parts:
            raise SystemExit(f"topic {a.topic!r} not found")
        tps = [TopicPartition(a.topic, p) for p in sorted(parts)]
        c.assign(tps)
        ends = await c.end_offsets(tps)
        await c.seek_to_beginning(*tps)
        pending = {tp for tp in tps if ends[tp] > 0}
        n = size = 0
        while pending:
            batches = await c.getmany(*pending, timeout_ms=500, max_records=10_000)
            for recs in batches.values():
                n += len(recs)
                for r in recs:
                    size += len(r.value or b"") + len(r.key or b"")
            for tp in list(pending):
                if await c.position(tp) >= ends[tp]:
                    pending.discard(tp)
        print(f"RAW {n} {size} {time.monotonic() - started}", flush=True)
    finally:
        await c.stop()


if __name__ == "__main__":
    asyncio.run(main())
