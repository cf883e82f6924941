"""Per-word CPU of a repartition hop's own work, hop format 1 against format 2, without Kafka
(a script, not a test; issue 18, thirteenth round).

The path of S5's words across the hop, each step the runtime's own code over real aiokafka
record batches: the source task splitting lines and writing words to the repartition topic
(``StageTask.run``: at-least-once with sequence numbers, or exactly-once), ``BatchSender``
building the record batches, headrace's batch reader decoding them (``kafka/fetch.py``), and
the downstream task's aligned cut resolving each record's channel and sequence number and
dropping replays (``AlignedCut.feed``; the counting after it is the same in both formats and is
left out). Formats and guarantees alternate run by run; the best of ``--runs`` is printed.

    python bench/hop_micro.py [--lines 20000] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import struct
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from aiokafka.producer.message_accumulator import BatchBuilder
from fetch_micro import fetch_result

from headrace.operators.job import Job
from headrace.operators.serde import INT, STR
from headrace.runtime.gctuning import young_threshold
from headrace.runtime.kafka.fetch import FetchedRecord, _BatchReader
from headrace.runtime.kafka.producer import BatchSender
from headrace.runtime.task import StageTask
from headrace.runtime.task.cut import AlignedCut
from headrace.runtime.task.records import TaskCounters

DOWNSTREAM = 4
CHANNEL = 3


def _job() -> Job:
    job = Job("hop-micro")
    (
        job.source("lines", key_serde=STR, value_serde=STR)
        .flat_map(lambda line: line.split())
        .key_by(lambda word: word, key_serde=STR)
        .count(name="counts")
        .sink("counts", key_serde=STR, value_serde=INT)
    )
    return job


def _lines(n: int) -> list[FetchedRecord]:
    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(5000)]
    return [
        FetchedRecord(
            "lines", 0, i, 1_700_000_000_000, None, " ".join(rng.choices(vocab, k=10)).encode(), []
        )
        for i in range(n)
    ]


class _Producer:
    def __init__(self) -> None:
        self.sent: dict[int, list[BatchBuilder]] = {}

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(512 * 1024, 0)

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> Any:
        self.sent.setdefault(partition, []).append(batch)
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(SimpleNamespace(offset=0))
        return fut


@dataclass
class _Owner:
    """What an aligned cut reads of its task; runs nothing (the count is not the hop's)."""

    stage: Any
    partition: int = 0
    checkpoint_interval_ms: int = 1000
    last_checkpoint: int = -1
    counters: TaskCounters = field(default_factory=TaskCounters)
    seen: dict[int, int] = field(default_factory=dict)
    time: Any = None
    cut: Any = None
    processed: int = 0

    def clock(self) -> float:
        return 0.0

    def run(self, records: Any, start: int, end: int) -> None:
        self.processed += end - start


def one_run(lines: list[FetchedRecord], alo: bool, fmt: int) -> tuple[dict[str, float], int]:
    """CPU seconds per step, and the number of words."""
    job = _job()
    task = StageTask(
        job,
        job.stages[0],
        CHANNEL,
        {},
        clock=lambda: 1_000.0,
        downstream_partitions=DOWNSTREAM,
        sequence_outputs=alo,
        hop_format=fmt,
    )
    task.open()
    spent: dict[str, float] = {}
    t = time.process_time()
    task.run(lines, 0, len(lines))
    outputs = task.take_outputs()
    spent["write (task)"] = time.process_time() - t

    producer = _Producer()
    sender = BatchSender(producer, {job.stages[0].output.topic: DOWNSTREAM})  # type: ignore[union-attr]
    t = time.process_time()
    asyncio.run(sender.send(outputs))
    spent["batch (sender)"] = time.process_time() - t

    logs = []
    for batches in producer.sent.values():
        data, base = bytearray(), 0
        for b in batches:
            built = bytearray(b._build())
            struct.pack_into(">q", built, 0, base)
            base += b.record_count()
            data += built
        logs.append(bytes(data))
    t = time.process_time()
    fetched = []
    for data in logs:
        result = fetch_result(data)
        fetched.append(_BatchReader(result, result._partition_records).getall())
    spent["decode (fetch)"] = time.process_time() - t

    t = time.process_time()
    fed = 0
    for records in fetched:
        owner = _Owner(stage=SimpleNamespace(source=SimpleNamespace(topics=["hop"]), name="counts"))
        cut = AlignedCut(owner, upstream_partitions=DOWNSTREAM, timeout=60.0)  # type: ignore[arg-type]
        owner.cut = cut
        i = 0
        while i < len(records):
            i = cut.feed(records, i)
        fed += owner.processed
    spent["read (aligned cut)"] = time.process_time() - t
    assert fed == len(outputs), (fed, len(outputs))
    return spent, len(outputs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    lines = _lines(a.lines)
    cases = {
        "at-least-once, format 1": (True, 1),
        "at-least-once, format 2": (True, 2),
        "exactly-once, format 1": (False, 1),
        "exactly-once, format 2": (False, 2),
    }
    best: dict[str, dict[str, float]] = {}
    with young_threshold(20_000):  # the worker's collector setting (runtime/gctuning.py)
        _runs(a.runs, lines, cases, best)
    _report(best)


def _runs(
    runs: int,
    lines: list[FetchedRecord],
    cases: dict[str, tuple[bool, int]],
    best: dict[str, dict[str, float]],
) -> None:
    for _ in range(runs):
        for name, (alo, fmt) in cases.items():  # alternating, so drift hits all alike
            spent, words = one_run(lines, alo, fmt)
            per = {k: v / words * 1e9 for k, v in spent.items()}
            per["total"] = sum(per.values())
            got = best.setdefault(name, per)
            for k, v in per.items():
                got[k] = min(got[k], v)


def _report(best: dict[str, dict[str, float]]) -> None:
    steps = list(next(iter(best.values())))
    print(f"{'ns per word':<26}" + "".join(f"{s:>20}" for s in steps))
    for name, per in best.items():
        print(f"{name:<26}" + "".join(f"{per[s]:>20.0f}" for s in steps))
    for g in ("at-least-once", "exactly-once"):
        one, two = best[f"{g}, format 1"]["total"], best[f"{g}, format 2"]["total"]
        print(f"{g}: format 2 costs {two / one:.2f}x format 1 ({one - two:.0f} ns less per word)")
    alo2, eos1 = best["at-least-once, format 2"]["total"], best["exactly-once, format 1"]["total"]
    eos2 = best["exactly-once, format 2"]["total"]
    print(f"at-least-once format 2 against exactly-once format 1: {alo2 / eos1:.2f}x")
    print(f"at-least-once format 2 against exactly-once format 2: {alo2 / eos2:.2f}x")


if __name__ == "__main__":
    main()
