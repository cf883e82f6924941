"""Per-record CPU of the task hot path on S1-like data, next to the plain loop's (a script, not
a test): ``python bench/task_micro.py [--records 400000] [--runs 5] [--operator user]
[--profile]``.

The S1 benchmark (``bench/run.py --scenarios s1``) is CPU-bound in Python on a shared 2-core
machine, so its wall-clock figures are noisy. This script measures only the part headrace adds
per record, in CPU time (``time.process_time_ns``), without Kafka:

* input: S1's keys (a 5,000-word vocabulary with real English frequencies, as
  ``bench/harness.py:keys_low_cardinality``), ~100-byte values, 4 partitions by Kafka's murmur2
  partitioner, handed out in polls of up to 500 records per partition
  (``getmany(max_records=2000)`` over 4 partitions). Before each poll, outside the timed
  section, the poll's aiokafka ``ConsumerRecord`` objects are built as aiokafka's fetcher builds
  them (fresh key and value bytes, ``headers`` a tuple): like after a real fetch they are in the
  CPU cache and their keys have no cached hash. (Records built once up front and reused are
  cold: attribute reads then cost ~10x more and swamp the difference being measured.)
* **headrace**: the S1 job (``source(key_serde=STR, value_serde=BYTES) -> count() ->
  sink(value_serde=INT)``, as in ``bench/systems/headrace_count.py``) run by a real
  :class:`headrace.runtime.task.StageTask` per partition with the memory backend, at-least-once
  (``sequence_outputs=True``), fed as ``StageRunner.loop`` does. After each poll the outputs go
  through the real :class:`headrace.runtime.kafka.producer.BatchSender` into real aiokafka
  ``BatchBuilder`` batches (``max_batch_size`` 512 KiB as in the worker); only ``send_batch`` is
  stubbed (it returns a resolved future). The clock advances with the records (200,000
  records/s), so every task checkpoints once per simulated second like the worker does: the
  pending outputs and the changelog pairs are built into batches too, then
  ``checkpoint_committed`` applies the changes to the backend. Committing offsets and the
  checkpoint log are left out (per checkpoint, not per record). ``--operator user`` runs the
  same count written as a user operator (``Record``, context and handle calls per record).
* **plain**: ``bench/systems/plain.py``'s ``--mode keyed --send batch`` loop body on the same
  polls: one dict count, a cached murmur2 partition, one ``BatchBuilder`` per output partition,
  ``append`` and the same stubbed ``send_batch``.

Both use the same stub producer; coroutines are stepped by hand (nothing in them suspends), so
no event loop cost is counted for either. Runs alternate between the two. Reported:
best-of-``runs`` CPU ns per record for each side, the ratio, and ``plain / headrace`` as the
throughput fraction this predicts if only this part differed (the S1 target is >= 0.75 for
at-least-once). aiokafka's fetch path, the event loop and the sockets are paid by both sides
and not included, so the end-to-end CPU ratio is closer to 1 than this one. Outputs of both
sides are checked (one per input, each key's highest count = its input count) before anything
is reported.

Figures on the project's 2-core machine (best of 5, 400,000 records; issue 6):
before: plain 903, headrace 2,951 CPU ns/record (3.27x); after: plain 863, headrace 1,001
(1.16x). With ``--operator user``: 3,014 -> 2,153 ns/record.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import random
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.structs import ConsumerRecord
from systems.plain import count_and_send_batches  # bench/ is sys.path[0]

sys.path.insert(0, str(Path(__file__).parent / "systems"))  # the floors import each other flat
from plain_twohop import partitioner, send_grouped
from plain_user import count_users

from headrace.operators.job import Job
from headrace.operators.operator import Context, Operator
from headrace.operators.record import Record
from headrace.operators.serde import BYTES, INT, STR
from headrace.operators.state import ValueStateDescriptor
from headrace.runtime.kafka.producer import BatchSender, murmur2
from headrace.runtime.state.keys import StatePartitionKey
from headrace.runtime.state.memory import MemoryBackend
from headrace.runtime.state.store import OperatorStateStore
from headrace.runtime.task import StageTask

PARTITIONS = 4
POLL = 500  # records per partition per poll
RATE = 200_000.0  # simulated records/s: drives the checkpoint clock
BATCH_SIZE = 512 * 1024
INPUT, OUTPUT = "words", "counts-out"


def keys_low_cardinality(n: int, seed: int = 7, vocab: int = 5000) -> list[str]:
    """Same as ``bench/harness.py`` (kept local: the harness imports the broker tooling)."""
    from examples.corpus import vocabulary

    words, weights = vocabulary(vocab)
    return random.Random(seed).choices(words, weights=weights, k=n)


def pad_value(word: str, i: int) -> bytes:
    head = f"{word} #{i} ".encode()
    return head + b"x" * max(0, 100 - len(head))


Poll = list[tuple[Any, ...]]  # ConsumerRecord arguments


def make_polls(n: int) -> list[Poll]:
    """Per-partition ConsumerRecord arguments, split into polls, partitions interleaved."""
    parts: list[Poll] = [[] for _ in range(PARTITIONS)]
    for i, word in enumerate(keys_low_cardinality(n)):
        k = word.encode()
        v = pad_value(word, i)
        p = (murmur2(k) & 0x7FFFFFFF) % PARTITIONS
        off = len(parts[p])
        parts[p].append((INPUT, p, off, 1_700_000_000_000 + i, 0, k, v, None, len(k), len(v), ()))
    return _interleave(parts)


def _interleave(parts: list[Poll]) -> list[Poll]:
    polls = []
    longest = max(len(x) for x in parts)
    for start in range(0, longest, POLL):
        for p in range(PARTITIONS):
            chunk = parts[p][start : start + POLL]
            if chunk:
                polls.append(chunk)
    return polls


def fetched(poll: Poll) -> list[ConsumerRecord[bytes, bytes]]:
    """The poll as aiokafka's fetcher hands it out: fresh ConsumerRecords with fresh key and
    value bytes (so they are in the CPU cache and have no cached hash, as after a real fetch).
    Built outside the timed sections; both sides get the same."""
    return [
        ConsumerRecord(t, p, o, ts, tt, bytes(memoryview(k)), bytes(memoryview(v)), c, ks, vs, h)
        for t, p, o, ts, tt, k, v, c, ks, vs, h in poll
    ]


class _Meta:
    __slots__ = ("offset",)

    def __init__(self, offset: int) -> None:
        self.offset = offset


class StubProducer:
    """Real ``BatchBuilder`` batches; ``send_batch`` keeps the batch and returns a done future."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.sent: list[tuple[str, int, BatchBuilder]] = []

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(BATCH_SIZE, 0)

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> Any:
        batch.close()
        self.sent.append((topic, partition, batch))
        fut = self.loop.create_future()
        fut.set_result(_Meta(0))
        return fut


def step(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends, without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the coroutine suspended")


class UserCount(Operator):
    """``count()`` written as a user operator (``--operator user``): Record, context, handle."""

    count = ValueStateDescriptor[int](type=int, default=0)

    def process(self, record: Record[Any, Any], ctx: Context) -> None:
        n = self.count.value() + 1
        self.count.update(n)
        ctx.emit(n)


OPERATOR = "builtin"  # --operator
SCENARIO = "s1"  # --scenario


def user_polls(n: int, *, categories: int = 20, seed: int = 7) -> list[Poll]:
    """S6's input as ``bench/run.py:user_workload`` makes it (same users, categories, seed),
    partitioned and polled like :func:`make_polls`."""
    rng = random.Random(seed)
    users = [f"u{i:06d}" for i in range(max(1000, n // 10))]
    cats = [f"cat{i:02d}" for i in range(categories)]
    parts: list[Poll] = [[] for _ in range(PARTITIONS)]
    for i in range(n):
        user, cat = rng.choice(users), rng.choice(cats)
        head = f"{cat}|{i} ".encode()
        k, v = user.encode(), head + b"x" * max(0, 100 - len(head))
        p = (murmur2(k) & 0x7FFFFFFF) % PARTITIONS
        off = len(parts[p])
        parts[p].append((INPUT, p, off, 1_700_000_000_000 + i, 0, k, v, None, len(k), len(v), ()))
    return _interleave(parts)


def s6_job() -> Job:
    from systems.headrace_count import user_job

    return user_job("s6", INPUT, OUTPUT)


def s1_job() -> Job:
    if SCENARIO == "s6":
        return s6_job()
    job = Job("s1")
    source = job.source(INPUT, key_serde=STR, value_serde=BYTES)
    if OPERATOR == "user":
        stream = source.process(UserCount(), name="counts")
    else:
        stream = source.count(name="counts")
    stream.sink(OUTPUT, key_serde=STR, value_serde=INT)
    return job


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class HeadraceS1:
    """The S1 job in real StageTasks (memory backend, at-least-once), one per partition."""

    def __init__(self, producer: StubProducer) -> None:
        job = s1_job()
        stage = job.stages[0]
        self.op_id = op_id = stage.process_steps()[0].operator_id
        self.clock = clock = Clock()
        self.sender = BatchSender(producer, {OUTPUT: PARTITIONS})  # type: ignore[arg-type]
        self.changelog = job.changelog_topic(op_id)
        self.tasks: dict[int, StageTask] = {}
        self.done = 0
        for p in range(PARTITIONS):
            store = OperatorStateStore(MemoryBackend(), StatePartitionKey(op_id, p, p), clock=clock)
            task = StageTask(
                job,
                stage,
                p,
                {op_id: store},
                checkpoint_interval_ms=1000,
                clock=clock,
                sequence_outputs=True,
            )
            task.open()
            task.last_checkpoint = int(clock.now)
            self.tasks[p] = task

    def commit(self, task: StageTask) -> None:
        """What Committer.commit does per record: the outputs and changelog pairs."""
        pending = task.pending
        assert pending is not None
        step(self.sender.send(pending.outputs))
        for changes in pending.changes.values():
            if changes:
                step(self.sender.send_pairs(self.changelog, task.partition, changes))
        task.checkpoint_committed({self.op_id: 0})

    def poll(self, records: list[Any]) -> None:
        """StageRunner.loop for one poll: feed, tick (checkpoints), send the outputs."""
        task = self.tasks[records[0].partition]
        i = 0
        while i < len(records):
            i = task.feed(records, i)
            while task.pending is not None:
                self.commit(task)
        self.done += len(records)
        self.clock.now = 1_000.0 + self.done / RATE
        for t in self.tasks.values():
            t.tick(self.clock.now)
            while t.pending is not None:
                self.commit(t)
        for t in self.tasks.values():
            out = t.out
            if out:
                batch = out[:]
                out.clear()
                step(self.sender.send(batch))


class PlainS6:
    """bench/systems/plain_user.py's loop body (``count_users``), one poll at a time."""

    def __init__(self, producer: StubProducer) -> None:
        self.producer = producer
        self.totals: dict[bytes, int] = {}
        self.per_category: dict[bytes, dict[bytes, int]] = {}
        self.partition = partitioner(PARTITIONS)

    def poll(self, records: list[Any]) -> None:
        groups = count_users(records, self.totals, self.per_category, self.partition)
        step(send_grouped(self.producer, OUTPUT, groups))


class PlainS1:
    """bench/systems/plain.py --mode keyed --send batch, one poll at a time."""

    def __init__(self, producer: StubProducer) -> None:
        self.producer = producer
        self.counts: dict[bytes, int] = {}
        self.part_cache: dict[bytes, int] = {}

    def poll(self, records: list[Any]) -> None:
        step(self._poll(records))

    async def _poll(self, records: list[Any]) -> None:
        await count_and_send_batches(
            [r.key for r in records],
            self.counts,
            self.part_cache,
            self.producer,
            OUTPUT,
            PARTITIONS,
        )


System = Callable[[StubProducer], Any]


def timed(system: Any, polls: list[Poll]) -> int:
    """CPU ns spent in ``system.poll`` over all polls (records built outside)."""
    total = 0
    clock = time.process_time_ns
    for poll in polls:
        records = fetched(poll)
        start = clock()
        system.poll(records)
        total += clock() - start
    return total


def verify(producer: StubProducer, expected: dict[bytes, int], n: int) -> None:
    """One output per input to the sink topic; each key's highest count is its input count."""
    from aiokafka.record.default_records import DefaultRecordBatch

    highest: dict[bytes, int] = {}
    outputs = 0
    for topic, _, batch in producer.sent:
        if topic != OUTPUT:
            continue
        for rec in DefaultRecordBatch(bytearray(batch._builder.build())):
            outputs += 1
            c = int.from_bytes(rec.value, "big", signed=True)
            if c > highest.get(rec.key, 0):
                highest[rec.key] = c
    if outputs != n or highest != expected:
        raise SystemExit(f"WRONG output: {outputs} outputs for {n} inputs")


def measure(systems: dict[str, System], polls: list[Poll], runs: int, n: int) -> dict[str, float]:
    """Best-of-``runs`` CPU ns per record per system; runs alternate between the systems."""
    expected: dict[bytes, int] = {}
    for poll in polls:
        for args in poll:
            key = args[5] if SCENARIO == "s1" else args[5] + b":" + args[6].split(b"|", 1)[0]
            expected[key] = expected.get(key, 0) + 1
    best = {name: float("inf") for name in systems}
    for r in range(runs):
        for name, make in systems.items():
            producer = StubProducer()
            system = make(producer)
            gc.collect()
            took = timed(system, polls)
            if r == 0:
                verify(producer, expected, n)
            producer.loop.close()
            best[name] = min(best[name], took / n)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=400_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="cProfile one headrace run")
    ap.add_argument(
        "--operator",
        choices=["builtin", "user"],
        default="builtin",
        help="count() (S1) or the same count written as a user operator",
    )
    ap.add_argument(
        "--scenario",
        choices=["s1", "s6"],
        default="s1",
        help="s1: S1's keys and count (default); s6: S6's users and its user operator "
        "(a ValueState and a MapState) against plain_user.py's loop",
    )
    a = ap.parse_args()
    global OPERATOR, SCENARIO
    OPERATOR, SCENARIO = a.operator, a.scenario
    polls = make_polls(a.records) if SCENARIO == "s1" else user_polls(a.records)
    if a.profile:
        prof = cProfile.Profile()
        system = HeadraceS1(StubProducer())
        for poll in polls:
            records = fetched(poll)
            prof.enable()
            system.poll(records)
            prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return
    keys = len({args[5] for poll in polls for args in poll})
    print(f"{SCENARIO.upper()}-like: {a.records:,} records, {keys:,} keys, {len(polls)} polls")
    plain = PlainS1 if SCENARIO == "s1" else PlainS6
    best = measure({"plain": plain, "headrace": HeadraceS1}, polls, a.runs, a.records)
    for name, ns in best.items():
        print(f"  {name:<10} {ns:8.0f} CPU ns/record (best of {a.runs})")
    ratio = best["headrace"] / best["plain"]
    print(f"  headrace / plain CPU per record: {ratio:.2f}x")
    print(f"  plain / headrace (predicted throughput fraction): {1 / ratio:.2f}")


if __name__ == "__main__":
    main()
