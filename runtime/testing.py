"""Run a job in-process on lists of records: fast tests of user jobs, without Kafka.

The driver runs exactly the production code path — :class:`headrace.runtime.task.StageTask`
(operators,
state handles, barrier alignment), :class:`headrace.runtime.checkpoint.commit.Committer` (both
guarantees) and :class:`headrace.runtime.checkpoint.restore.RestoreTarget` (changelog restore,
stale-key
compensation) — over an in-memory log that behaves like Kafka where it matters: offsets per
partition, transactions whose records stay invisible to ``read_committed`` readers until they
commit (and for ever after an abort), and committed offsets with metadata.

    with JobTester(build_job(), partitions=2) as tester:
        tester.send("lines", "to be or not to be")
        tester.run()                   # process everything, checkpointing as it goes
        tester.crash()                 # lose every task: uncommitted work is gone
        tester.send("lines", "be quick")
        tester.checkpoint()            # tasks restore from the changelog first
        assert tester.latest("word-counts")["be"] == 3
"""

from __future__ import annotations

import asyncio
import tempfile
import zlib
from pathlib import Path
from typing import Any

from headrace.operators.job import Job, RepartitionSpec, SinkSpec, Stage
from headrace.operators.operator import Operator
from headrace.runtime.checkpoint.commit import Committer
from headrace.runtime.config import Guarantee
from headrace.runtime.host import StageHost, TaskIO
from headrace.runtime.kafka.topics import plan_layout
from headrace.runtime.memory_kafka import (
    MemoryChangelogReader,
    MemoryLog,
    MemoryRecord,
    _MemoryConsumer,
    _MemoryProducer,
    _MemorySender,
    _SimulatedCrash,
)
from headrace.runtime.state.backend import open_backend
from headrace.runtime.state.keys import StatePartitionKey
from headrace.runtime.state.store import OperatorStateStore
from headrace.runtime.task.timers import EVENT, parse_timer_key

__all__ = ["JobTester", "MemoryRecord"]


class JobTester:
    """Runs a :class:`Job` on in-memory topics with real checkpoints, crashes and restores."""

    def __init__(
        self,
        job: Job,
        *,
        partitions: int = 2,
        guarantee: Guarantee | str = Guarantee.EXACTLY_ONCE,
        backend: str = "memory",
        state_dir: Path | None = None,
        checkpoint_interval_ms: int = 1000,
        batch_size: int = 100,
        first_round_delay_s: float = 0.0,
    ) -> None:
        """``first_round_delay_s``: how long an idle new ownership's first full barrier round
        waits (StageTask.prepare); a worker's is two heartbeat intervals under exactly-once,
        the tester's 0 unless a test is about it."""
        job.validate()
        self.first_round_delay_s = first_round_delay_s
        self.job = job
        self.guarantee = Guarantee(guarantee)
        self.backend = backend
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="headrace-test-"))
        self.interval_ms = checkpoint_interval_ms
        self.batch_size = batch_size
        self.now = 1_000_000.0  # a fake clock, in seconds; only checkpoint() moves it
        self.log = MemoryLog()
        sinks = dict.fromkeys(job.output_topics(), partitions)
        self.layout = plan_layout(job, partitions, sinks)
        for topic in job.stages[0].source.topics:
            self.log.create(topic, partitions)
        for topic, n in sinks.items():
            self.log.create(topic, n)
        for t in self.layout.internal:
            self.log.create(t.name, t.partitions)
        self.tasks: dict[tuple[str, int], TaskIO] = {}
        self._loop = asyncio.new_event_loop()
        self._dead = True
        self._sent = 0
        self._crash_phase: str | None = None
        self._hosts: dict[str, StageHost] = {}

    @property
    def exactly_once(self) -> bool:
        return self.guarantee is Guarantee.EXACTLY_ONCE

    # -- input and output ----------------------------------------------------------------------
    def send(
        self,
        topic: str,
        value: Any,
        key: Any = None,
        partition: int | None = None,
        timestamp: int | None = None,
    ) -> None:
        """Append an input record, serialized with the job's source serdes. ``timestamp``:
        its Kafka timestamp in ms (default: the tester's clock, like a producer's "now")."""
        source = self.job.stages[0].source
        kb = None if key is None else source.key_serde.serialize(key)
        vb = source.value_serde.serialize(value)
        parts = len(self.log.topics[topic])
        if partition is None:
            partition = (zlib.crc32(kb) if kb is not None else self._sent) % parts
        self._sent += 1
        ts = int(self.now * 1000) if timestamp is None else timestamp
        self.log.append((topic, partition, kb, vb, [], ts), partition, None)

    def send_raw(self, topic: str, value: bytes | None, key: bytes | None, partition: int) -> None:
        """Append bytes as they are (for bad-input tests)."""
        self.log.append((topic, partition, key, value, [], None), partition, None)

    def output(self, topic: str) -> list[tuple[Any, Any]]:
        """Committed output records (exactly-once: read_committed), decoded, per partition order."""
        stage = next(
            s for s in self.job.stages if isinstance(s.output, SinkSpec) and s.output.topic == topic
        )
        assert isinstance(stage.output, SinkSpec)
        ks, vs = stage.output.key_serde, stage.output.value_serde
        return [
            (None if r.key is None else ks.deserialize(r.key), vs.deserialize(r.value))  # type: ignore[arg-type]
            for p in range(len(self.log.topics[topic]))
            for r in self.log.read(topic, p, 0, committed_only=self.exactly_once)
        ]

    def records(self, topic: str) -> list[MemoryRecord]:
        """Committed records of any topic as written (bytes, headers, timestamps)."""
        return [
            r
            for p in range(len(self.log.topics[topic]))
            for r in self.log.read(topic, p, 0, committed_only=self.exactly_once)
        ]

    def output_with_timestamps(self, topic: str) -> list[tuple[Any, Any, int]]:
        """Like :meth:`output`, with each record's timestamp (its event time)."""
        records = self.records(topic)
        return [(k, v, r.timestamp) for (k, v), r in zip(self.output(topic), records, strict=True)]

    def latest(self, topic: str) -> dict[Any, Any]:
        """The last committed output value per key."""
        return dict(self.output(topic))

    def state(self, operator_id: str) -> dict[tuple[str, Any], Any]:
        """Current state of an operator across tasks: (state name, key) -> value. Timers are
        listed as ``("hr.timers", ("event" | "processing", time, key))``."""
        out: dict[tuple[str, Any], Any] = {}
        stage, _ = self.job.find_operator(operator_id)
        des = stage.source.key_serde.deserialize
        for (stage_name, _), io in self.tasks.items():
            if stage_name != stage.name or operator_id not in io.task.stores:
                continue
            for name, user_key, map_key, value in io.task.stores[operator_id].dump():
                if name == Operator.TIMER_STATE:
                    domain, ts, sk = parse_timer_key(user_key)
                    kind = "event" if domain == EVENT else "processing"
                    out[(name, (kind, ts, des(sk) if sk else None))] = value
                    continue
                key = des(user_key) if user_key else None
                out[(name, key if map_key is None else (key, map_key))] = value
        return out

    # -- driving -----------------------------------------------------------------------------------
    def run(self, *, max_rounds: int = 100_000) -> None:
        """Process all available input (restoring tasks first if they are down)."""
        try:
            self._loop.run_until_complete(self._run(max_rounds))
        except _SimulatedCrash:
            self.crash()

    def checkpoint(self) -> None:
        """Move the clock past the next barrier boundary and run until the checkpoint settled."""
        self.now += self.interval_ms / 1000
        self.run()

    def advance_clock(self, seconds: float) -> None:
        """Move processing time forward and run: processing-time timers that are due fire,
        idle inputs turn idle (and, with ``advance_when_idle``, move the watermark)."""
        self.now += seconds
        self.run()

    def advance_watermark(self, watermark: int) -> None:
        """Process the input sent so far, then move every task's watermark to ``watermark``
        (ms; never back) and run: the event-time timers it passes fire, stage by stage."""
        self.run()
        for stage in self.job.stages:
            for (name, _), io in self.tasks.items():
                if name == stage.name and io.task.time is not None:
                    io.task.time.advance(watermark)
        self.run()

    def watermark(self, stage: str = "stage0", partition: int = 0) -> int:
        """A task's current watermark (ms)."""
        if self._dead:
            self._loop.run_until_complete(self._start())
        time = self.tasks[(stage, partition)].task.time
        if time is None:
            raise ValueError(f"job {self.job.name!r} does not use event time")
        return int(time.watermark)

    def crash_during_next_checkpoint(self, phase: str) -> None:
        """Make the next commit die at ``phase`` (see :mod:`headrace.runtime.faults`), then crash
        all.

        ``after-changelog``: changelog and outputs written, offsets not committed;
        ``after-commit``: committed, local stores not yet updated.
        """
        self._crash_phase = phase

    def _fault(self, phase: str) -> None:
        if phase == self._crash_phase:
            self._crash_phase = None
            raise _SimulatedCrash(phase)

    def crash(self, stage: str | None = None) -> None:
        """Every task dies without a final checkpoint; open transactions are aborted.
        ``stage``: only that stage's tasks (its consumer group lost them; the others go on)."""
        for (name, p), io in list(self.tasks.items()):
            if stage is not None and name != stage:
                continue
            if isinstance(io.producer, _MemoryProducer):
                io.producer.abort()
            for store in io.task.stores.values():
                store.backend.close()
            del self.tasks[(name, p)]
        self._dead = True

    def close(self) -> None:
        self.crash()
        self._loop.close()

    def __enter__(self) -> JobTester:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------
    async def _run(self, max_rounds: int) -> None:
        if self._dead:
            await self._start()
        for _ in range(max_rounds):
            progressed = False
            for (stage_name, p), io in list(self.tasks.items()):
                stage = next(s for s in self.job.stages if s.name == stage_name)
                for topic in stage.source.topics:
                    position = io.task.position(topic)
                    records = self.log.read(topic, p, position, committed_only=self.exactly_once)[
                        : self.batch_size
                    ]
                    if records:
                        progressed = True
                        await self._feed(io, records)
                io.task.tick(self.now)
                if io.task.pending is not None:
                    progressed = True
                    await StageHost.settle(io, self._committer(io), self.now)
                if io.task.out:
                    io.unacked += await io.sender.send(io.task.take_outputs())
            if not progressed:
                return
        raise RuntimeError("the job did not settle; is an operator emitting without end?")

    async def _feed(self, io: TaskIO, records: list[MemoryRecord]) -> None:
        await StageHost.feed(io, records, self._committer(io))

    def _committer(self, io: TaskIO) -> Committer:
        c = Committer(
            self.job,
            exactly_once=self.exactly_once,
            consumer=_MemoryConsumer(self.log, io.group_id),
            worker_id="tester",
        )
        c.fault = self._fault
        return c

    async def _start(self) -> None:
        """Create every task that is not running and restore it from its changelog and
        committed offsets."""
        self._dead = False
        for stage in self.job.stages:
            for p in range(self.layout.partitions_of(stage)):
                if (stage.name, p) not in self.tasks:
                    self.tasks[(stage.name, p)] = await self._restore_task(stage, p)

    def _host(self, stage: Stage) -> StageHost:
        host = self._hosts.get(stage.name)
        if host is None:
            host = self._hosts[stage.name] = StageHost(
                self.job,
                stage,
                self.layout,
                exactly_once=self.exactly_once,
                checkpoint_interval_ms=self.interval_ms,
                open_store=self._open_store,
                clock=lambda: self.now,
                first_round_delay_s=self.first_round_delay_s,
            )
        return host

    def _open_store(self, operator_id: str, partition: int) -> OperatorStateStore:
        path = None
        if self.backend == "rocksdb":
            path = self.state_dir / operator_id / str(partition)
            path.parent.mkdir(parents=True, exist_ok=True)
        return OperatorStateStore(
            open_backend(self.backend, path),
            StatePartitionKey(operator_id, partition, partition),
            clock=lambda: self.now,
        )

    async def _restore_task(self, stage: Stage, p: int) -> TaskIO:
        """The worker's path for an assigned partition: assemble, restore, claim, open."""
        host = self._host(stage)
        producer = _MemoryProducer(self.log) if self.exactly_once else None
        io = host.create(p, _MemorySender(self.log, producer), producer)
        start = host.start_point(p, self.log.committed.get(host.group_id, {}))
        reader = MemoryChangelogReader(self.log, committed_only=self.exactly_once)
        read_until = await host.restore(reader, [(io, start)])
        for op, first, end in await host.claim(io, read_until=read_until[p]):
            topic = host.changelog_topics[op]
            keys = {r.key for r in self.log.topics[topic][p][first:end] if r.key is not None}
            io.task.stores[op].force_dirty(keys)
        host.open(io, start)
        if producer is not None:
            await producer.begin_transaction()
        return io

    def repartition_topics(self) -> list[str]:
        return [s.output.topic for s in self.job.stages if isinstance(s.output, RepartitionSpec)]
