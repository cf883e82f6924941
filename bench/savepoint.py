"""Savepoints at 1M keys (issue 16), beside the changelog restore floor (a script, not a test).

    python bench/savepoint.py [--keys 1000000] [--partitions 4] [--bootstrap HOST:PORT]

A one-stage job (``source -> count(name="counts") -> sink``, memory backend, at-least-once)
counts ``--keys`` distinct keys, one record each, and is stopped: its changelog then holds one
state entry per key. Then, in one run, side by side:

* **raw read**: every changelog record read with a plain group-less consumer (the floor of any
  restore, S3's reference);
* **create**: ``headrace savepoint create`` (restore of every partition at the committed
  checkpoint, entries framed into the file);
* **load**: ``headrace savepoint load`` into a new job name with twice the partitions
  (entries redistributed, written to the changelogs, offsets committed).

Each figure is state entries per second; the ratios to the raw read are what to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h

from headrace import JSON, STR, Job
from headrace.runtime.config import Settings
from headrace.runtime.recovery.inprocess import run_worker_until
from headrace.runtime.savepoint import create_savepoint, load_savepoint


def counting(name: str, source: str, sink: str) -> Job:
    job = Job(name)
    job.source(source, key_serde=STR, value_serde=STR).count(name="counts").sink(
        sink, key_serde=STR, value_serde=JSON
    )
    return job


async def consumed(bootstrap: str, job: Job, source: str, partitions: int) -> bool:
    """Every source record is in a committed checkpoint of the job."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=job.group_id(job.stages[0]))
    await consumer.start()
    try:
        tps = [TopicPartition(source, p) for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            if (await consumer.committed(tp) or 0) < ends[tp]:
                return False
        return True
    finally:
        await consumer.stop()


async def raw_read(bootstrap: str, topic: str, partitions: int) -> tuple[int, float]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        started = time.perf_counter()
        n = 0
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(timeout_ms=500, max_records=10_000)).values():
                n += len(records)
        return n, time.perf_counter() - started
    finally:
        await consumer.stop()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with h.Broker(args.bootstrap) as broker:
        bootstrap = broker.bootstrap
        tag = secrets.token_hex(3)
        source, sink = f"spb-in-{tag}", f"spb-out-{tag}"
        await h.create_topics(bootstrap, [source, sink], args.partitions)
        keys = [f"key-{i:07d}".encode() for i in range(args.keys)]
        t0 = time.perf_counter()
        await h.produce(bootstrap, source, [(k, b"v") for k in keys], args.partitions)
        print(f"produced {args.keys:,} records in {time.perf_counter() - t0:.1f}s", flush=True)
        s = Settings(bootstrap_servers=bootstrap, processing_guarantee="at_least_once")
        job = counting(f"spb-{tag}", source, sink)

        async def done() -> bool:
            return await consumed(bootstrap, job, source, args.partitions)

        t0 = time.perf_counter()
        await run_worker_until(job, s, done, timeout_s=1800)
        print(f"counted in {time.perf_counter() - t0:.1f}s", flush=True)

        changelog = job.changelog_topic("counts")
        records, raw_s = await raw_read(bootstrap, changelog, args.partitions)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench.hrsp"
            t0 = time.perf_counter()
            header = await create_savepoint(s, job, path)
            create_s = time.perf_counter() - t0
            entries = sum(sum(d["entries"]) for d in header["operators"].values())
            size = path.stat().st_size
            # same topology under a new name: the load redistributes to its layout
            loaded = counting(f"spb-{tag}-b", source, sink)
            t0 = time.perf_counter()
            await load_savepoint(s, loaded, path)
            load_s = time.perf_counter() - t0
        result = {
            "keys": args.keys,
            "partitions": args.partitions,
            "changelog_records": records,
            "savepoint_entries": entries,
            "savepoint_mb": round(size / 1e6, 1),
            "raw_read_records_per_s": round(records / raw_s),
            "create_entries_per_s": round(entries / create_s),
            "load_entries_per_s": round(entries / load_s),
            "create_vs_raw": round((entries / create_s) / (records / raw_s), 2),
            "load_vs_raw": round((entries / load_s) / (records / raw_s), 2),
            "seconds": {
                "raw": round(raw_s, 2),
                "create": round(create_s, 2),
                "load": round(load_s, 2),
            },
        }
        print(result, flush=True)
        await h.delete_topics(bootstrap, [source, sink])
        return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--bootstrap", default=None)
    out = asyncio.run(main(parser.parse_args()))
    h.save_json(h.BENCH / "results" / f"savepoint-{time.strftime('%Y%m%d-%H%M%S')}.json", out)
