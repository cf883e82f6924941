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
import itertools
import tempfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headrace.operators.job import Job, RepartitionSpec, SinkSpec, Stage
from headrace.runtime.checkpoint.commit import Committer
from headrace.runtime.config import Guarantee
from headrace.runtime.host import StageHost, TaskIO
from headrace.runtime.kafka.producer import Delivery, OutRecord
from headrace.runtime.kafka.topics import plan_layout
from headrace.runtime.state.backend import open_backend
from headrace.runtime.state.keys import StatePartitionKey
from headrace.runtime.state.store import OperatorStateStore

__all__ = ["JobTester", "MemoryRecord"]


@dataclass(slots=True)
class MemoryRecord:
    """A record in the in-memory log; has the shape of aiokafka's ConsumerRecord."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    timestamp: int = 0
    txn: int | None = None  #: transaction id; None for non-transactional writes


@dataclass(slots=True)
class _Metadata:
    offset: int


class _SimulatedCrash(Exception):
    """Raised at a commit phase to simulate the process dying there."""


class MemoryLog:
    """Topics, transactions and committed offsets, in memory."""

    def __init__(self) -> None:
        self.topics: dict[str, list[list[MemoryRecord]]] = {}
        self.committed: dict[str, dict[tuple[str, int], tuple[int, str]]] = {}
        self.txn_state: dict[int, str] = {}  # txn id -> "open" | "committed" | "aborted"
        self._txn_ids = itertools.count(1)

    def create(self, topic: str, partitions: int) -> None:
        self.topics.setdefault(topic, [[] for _ in range(partitions)])

    def append(self, rec: OutRecord, partition: int, txn: int | None) -> int:
        topic, _, key, value, headers = rec
        log = self.topics[topic][partition]
        offset = len(log)
        log.append(MemoryRecord(topic, partition, offset, key, value, list(headers), txn=txn))
        return offset

    def visible(self, rec: MemoryRecord, committed_only: bool) -> bool:
        return rec.txn is None or not committed_only or self.txn_state[rec.txn] == "committed"

    def read(
        self, topic: str, partition: int, start: int, *, committed_only: bool
    ) -> list[MemoryRecord]:
        """Records from ``start`` up to the last stable offset (like read_committed)."""
        out = []
        for rec in self.topics[topic][partition][start:]:
            if rec.txn is not None and committed_only and self.txn_state[rec.txn] == "open":
                break  # the last stable offset: nothing past an open transaction is readable
            if self.visible(rec, committed_only):
                out.append(rec)
        return out


class MemoryChangelogReader:
    """The consumer calls :func:`headrace.runtime.checkpoint.restore.restore` makes, over the
    memory log: so the tester restores through the production restore code.

    Like a ``read_committed`` consumer under exactly-once: records of aborted transactions are
    skipped (the position still moves past them), and nothing past an open transaction is
    returned (the end offset is the last stable offset).
    """

    def __init__(self, log: MemoryLog, *, committed_only: bool) -> None:
        self.log = log
        self.committed_only = committed_only
        self._positions: dict[Any, int] = {}
        self._paused: set[Any] = set()

    def _records(self, tp: Any) -> list[MemoryRecord]:
        return self.log.topics[tp.topic][tp.partition]

    def _stable_end(self, tp: Any) -> int:
        records = self._records(tp)
        if self.committed_only:
            for r in records:
                if r.txn is not None and self.log.txn_state[r.txn] == "open":
                    return r.offset
        return len(records)

    def assign(self, tps: Iterable[Any]) -> None:
        self._positions = {tp: 0 for tp in tps}
        self._paused.clear()

    async def end_offsets(self, tps: Iterable[Any]) -> dict[Any, int]:
        return {tp: self._stable_end(tp) for tp in tps}

    async def beginning_offsets(self, tps: Iterable[Any]) -> dict[Any, int]:
        return dict.fromkeys(tps, 0)  # the memory log keeps everything

    async def seek_to_beginning(self, tp: Any) -> None:
        self._positions[tp] = 0

    def seek(self, tp: Any, offset: int) -> None:
        self._positions[tp] = offset

    def pause(self, *tps: Any) -> None:
        self._paused.update(tps)

    async def position(self, tp: Any) -> int:
        return self._positions[tp]

    async def getmany(
        self, *tps: Any, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[Any, list[MemoryRecord]]:
        out: dict[Any, list[MemoryRecord]] = {}
        for tp in tps or list(self._positions):
            if tp in self._paused:
                continue
            end = self._stable_end(tp)
            position = self._positions[tp]
            batch: list[MemoryRecord] = []
            for r in self._records(tp)[position:end]:
                if max_records is not None and len(batch) >= max_records:
                    break
                position = r.offset + 1
                if self.log.visible(r, self.committed_only):
                    batch.append(r)
            self._positions[tp] = position
            if batch:
                out[tp] = batch
        return out


class _MemorySender:
    """Stands in for BatchSender: same ``send`` contract, writes to the memory log."""

    def __init__(self, log: MemoryLog, producer: _MemoryProducer | None) -> None:
        self.log = log
        self.producer = producer
        self._round_robin = itertools.count()

    async def send(self, records: Iterable[OutRecord]) -> list[Delivery]:
        deliveries: list[Delivery] = []
        txn = self.producer.txn if self.producer is not None else None
        loop = asyncio.get_running_loop()
        for rec in records:
            partitions = len(self.log.topics[rec[0]])
            p = rec[1]
            if p is None:
                key = rec[2]
                p = (zlib.crc32(key) if key is not None else next(self._round_robin)) % partitions
            fut: asyncio.Future[Any] = loop.create_future()
            fut.set_result(_Metadata(self.log.append(rec, p, txn)))
            deliveries.append((fut, 1))
        return deliveries

    async def send_pairs(
        self,
        topic: str,
        partition: int,
        pairs: Iterable[tuple[bytes | None, bytes | None]],
        headers: list[tuple[str, bytes]] | None = None,
    ) -> list[Delivery]:
        """BatchSender.send_pairs: (key, value) pairs to one partition, shared headers."""
        h = headers or []
        return await self.send([(topic, partition, k, v, h) for k, v in pairs])


class _MemoryProducer:
    """A transactional producer: commit/abort flip the visibility of everything it wrote."""

    def __init__(self, log: MemoryLog) -> None:
        self.log = log
        self.txn: int | None = None
        self._offsets: dict[tuple[str, int], tuple[int, str]] = {}
        self._group = ""

    async def begin_transaction(self) -> None:
        self.txn = next(self.log._txn_ids)
        self.log.txn_state[self.txn] = "open"
        self._offsets = {}

    async def send_offsets_to_transaction(self, offsets: dict[Any, Any], group_id: str) -> None:
        self._group = group_id
        self._offsets = {
            (tp.topic, tp.partition): (om.offset, om.metadata) for tp, om in offsets.items()
        }

    async def commit_transaction(self) -> None:
        assert self.txn is not None
        self.log.txn_state[self.txn] = "committed"
        self.log.committed.setdefault(self._group, {}).update(self._offsets)
        self.txn = None

    def abort(self) -> None:
        if self.txn is not None:
            self.log.txn_state[self.txn] = "aborted"
            self.txn = None


class _MemoryConsumer:
    """The at-least-once offset commit."""

    def __init__(self, log: MemoryLog, group: str) -> None:
        self.log, self.group = log, group

    async def commit(self, offsets: dict[Any, Any]) -> None:
        self.log.committed.setdefault(self.group, {}).update(
            {(tp.topic, tp.partition): (om.offset, om.metadata) for tp, om in offsets.items()}
        )


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
    ) -> None:
        job.validate()
        self.job = job
        self.guarantee = Guarantee(guarantee)
        self.backend = backend
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="headrace-test-"))
        self.interval_ms = checkpoint_interval_ms
        self.batch_size = batch_size
        self.now = 1_000_000.0  # a fake clock, in seconds; only checkpoint() moves it
        self.log = MemoryLog()
        sinks = {s.output.topic: partitions for s in job.stages if isinstance(s.output, SinkSpec)}
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
    def send(self, topic: str, value: Any, key: Any = None, partition: int | None = None) -> None:
        """Append an input record, serialized with the job's source serdes."""
        source = self.job.stages[0].source
        kb = None if key is None else source.key_serde.serialize(key)
        vb = source.value_serde.serialize(value)
        parts = len(self.log.topics[topic])
        if partition is None:
            partition = (zlib.crc32(kb) if kb is not None else self._sent) % parts
        self._sent += 1
        self.log.append((topic, partition, kb, vb, []), partition, None)

    def send_raw(self, topic: str, value: bytes | None, key: bytes | None, partition: int) -> None:
        """Append bytes as they are (for bad-input tests)."""
        self.log.append((topic, partition, key, value, []), partition, None)

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

    def latest(self, topic: str) -> dict[Any, Any]:
        """The last committed output value per key."""
        return dict(self.output(topic))

    def state(self, operator_id: str) -> dict[tuple[str, Any], Any]:
        """Current state of an operator across tasks: (state name, key) -> value."""
        out: dict[tuple[str, Any], Any] = {}
        stage, _ = self.job.find_operator(operator_id)
        for (stage_name, _), io in self.tasks.items():
            if stage_name != stage.name or operator_id not in io.task.stores:
                continue
            for name, user_key, map_key, value in io.task.stores[operator_id].dump():
                key = stage.source.key_serde.deserialize(user_key) if user_key else None
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

    def crash(self) -> None:
        """Every task dies without a final checkpoint; open transactions are aborted."""
        for io in self.tasks.values():
            if isinstance(io.producer, _MemoryProducer):
                io.producer.abort()
            for store in io.task.stores.values():
                store.backend.close()
        self.tasks.clear()
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
                    out = io.task.out[:]
                    io.task.out.clear()
                    io.unacked += await io.sender.send(out)
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
        """Create every task and restore it from its changelog and committed offsets."""
        self._dead = False
        for stage in self.job.stages:
            for p in range(self.layout.partitions_of(stage)):
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
