"""A task: one stage instance for one input partition. No I/O.

The task owns the operator instances of its stage, their bound state stores, and the input
cut bookkeeping (clock barriers for a source stage, :class:`BarrierAligner` for a stage fed by a
repartition topic). The worker (Kafka) and the test driver (lists in memory) feed it records and
carry out the checkpoints it prepares, so both run exactly this code.

Per-record path: deserialize key and value with the stage's serde, point the state stores at
the raw key bytes, and call a chain of closures compiled once per task (map, flat_map, filter,
operators, then the output). Outputs are appended to a list as ready-to-send byte tuples; state
is never serialized here — the stores do that once per dirty key at a checkpoint.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from operators.job import (
    ErrorPolicy,
    FilterStep,
    FlatMapStep,
    Job,
    MapStep,
    ProcessStep,
    RepartitionSpec,
    SinkSpec,
    Stage,
)
from operators.operator import SAME_KEY, Operator
from operators.record import Record, describe_key
from runtime.checkpoint.alignment import BarrierAligner
from runtime.checkpoint.barrier import (
    BARRIER_HEADER,
    SEQUENCE_HEADER,
    barrier_headers,
    barrier_id,
    channel_headers,
    dedupe_slot,
    sequence,
)
from runtime.state.store import OperatorStateStore

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]
#: (topic, partition or None for the sink's partitioner, key bytes, value bytes, headers)
OutRecord = tuple[str, int | None, bytes | None, bytes | None, Headers]
_NO_HEADERS: Headers = []  # shared, never mutated


class RawRecord(Protocol):
    """What the task reads: aiokafka's ConsumerRecord has this shape, so does the test driver's."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


class RecordError(Exception):
    """A record failed under the ``fail`` policy; names where it is and what went wrong."""

    def __init__(self, record: RawRecord, kind: str, cause: BaseException) -> None:
        self.topic, self.partition, self.offset = record.topic, record.partition, record.offset
        self.kind = kind
        super().__init__(
            f"{kind} failed for the record at topic {record.topic!r} partition "
            f"{record.partition} offset {record.offset} key {describe_key(record.key)}: "
            f"{type(cause).__name__}: {cause}"
        )


@dataclass(slots=True)
class PendingCheckpoint:
    """Everything checkpoint ``checkpoint_id`` of one task commits, captured synchronously.

    The snapshot is taken at the cut, between two records; the I/O (changelog writes, commit)
    happens afterwards while the task's later records wait in its output buffer.
    """

    checkpoint_id: int
    #: (topic, partition) -> offset to commit
    offsets: dict[tuple[str, int], int]
    skip: dict[int, int]
    aligned: bool
    final: bool
    #: operator id -> [(storage key, value bytes or None for a delete)]
    changes: dict[str, list[tuple[bytes, bytes | None]]]
    #: at-least-once: highest repartition sequence processed per slot (part of the cut)
    seen: dict[int, int]
    #: outputs produced before the cut (they belong to this checkpoint's transaction)
    outputs: list[OutRecord]
    #: barrier records for every partition of the repartition output, if any
    barriers: list[OutRecord] = field(default_factory=list)
    alignment_seconds: float = 0.0


@dataclass(slots=True)
class TaskCounters:
    """Per-task counters; exported by the worker's metrics and the test driver's results."""

    records_in: int = 0
    records_out: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    checkpoints: int = 0
    unaligned_checkpoints: int = 0


class TaskContext:
    """The :class:`operators.operator.Context` given to one operator of one task."""

    __slots__ = ("_next", "key", "operator_id", "partition")

    def __init__(self, operator_id: str, partition: int, nxt: Callable[[Any, Any], None]):
        self.operator_id = operator_id
        self.partition = partition
        self.key: Any = None
        self._next = nxt

    def emit(self, value: Any, key: Any = SAME_KEY) -> None:
        self._next(self.key if key is SAME_KEY else key, value)


class StageTask:
    """One stage for one partition: operators, state stores and the input cut."""

    def __init__(
        self,
        job: Job,
        stage: Stage,
        partition: int,
        stores: dict[str, OperatorStateStore],
        *,
        upstream_partitions: int | None = None,
        downstream_partitions: int | None = None,
        checkpoint_interval_ms: int = 1000,
        alignment_timeout: float = 60.0,
        clock: Callable[[], float],
        error_policy: ErrorPolicy | None = None,
        sequence_outputs: bool = False,
    ) -> None:
        self.job = job
        self.stage = stage
        self.partition = partition
        self.stores = stores
        self.clock = clock
        self.checkpoint_interval_ms = checkpoint_interval_ms
        self.error_policy = error_policy or job.error_policy
        self.counters = TaskCounters()
        self.out: list[OutRecord] = []
        self.pending: PendingCheckpoint | None = None
        self.last_checkpoint = 0
        self.downstream_partitions = downstream_partitions
        self._store_list = list(stores.values())
        # A tombstone (None value) reaches the serde and fails there: the error policy decides.
        self._key_deserialize: Callable[[Any], Any] = stage.source.key_serde.deserialize
        self._value_deserialize: Callable[[Any], Any] = stage.source.value_serde.deserialize
        self._positions: dict[tuple[str, int], int] = {}
        self._cur: RawRecord | None = None
        self._cur_key: Any = None
        self._cur_key_bytes: bytes | None = None
        self.aligner: BarrierAligner | None = None
        self._upstream_partitions = upstream_partitions
        self._alignment_timeout = alignment_timeout
        # at-least-once dedupe across the repartition hop (see runtime.checkpoint.barrier)
        self._sequence_outputs = sequence_outputs and not stage.source.internal
        self._out_index = 0
        self._topic_index = {t: i for i, t in enumerate(stage.source.topics)}
        self.seen: dict[int, int] = {}
        self.duplicates_dropped = 0
        if stage.source.internal and not upstream_partitions:
            raise ValueError(f"{stage.name} reads a repartition topic: upstream_partitions needed")
        self.operators: list[Operator] = []
        self._contexts: list[TaskContext] = []
        self._head = self._compile()

    # -- chain compilation -------------------------------------------------------------------
    def _compile(self) -> Callable[[Any, Any], None]:
        nxt = self._compile_output()
        compiled: list[tuple[Operator, TaskContext]] = []
        for step in reversed(self.stage.steps):
            nxt = self._compile_step(step, nxt, compiled)
        compiled.reverse()
        self.operators = [op for op, _ in compiled]
        self._contexts = [ctx for _, ctx in compiled]
        return nxt

    def _compile_step(
        self,
        step: Any,
        nxt: Callable[[Any, Any], None],
        compiled: list[tuple[Operator, TaskContext]],
    ) -> Callable[[Any, Any], None]:
        if isinstance(step, MapStep):
            fn = step.fn

            def map_step(k: Any, v: Any) -> None:
                nxt(k, fn(v))

            return map_step
        if isinstance(step, FlatMapStep):
            ffn = step.fn

            def flat_map_step(k: Any, v: Any) -> None:
                for x in ffn(v):
                    nxt(k, x)

            return flat_map_step
        if isinstance(step, FilterStep):
            pred = step.fn

            def filter_step(k: Any, v: Any) -> None:
                if pred(v):
                    nxt(k, v)

            return filter_step
        if isinstance(step, ProcessStep):
            op = step.instantiate()
            store = self.stores.get(step.operator_id)
            if store is not None:
                store.bind_operator(op)
            ctx = TaskContext(step.operator_id, self.partition, nxt)
            compiled.append((op, ctx))
            process = op.process
            task = self

            def process_step(k: Any, v: Any) -> None:
                r = task._cur
                assert r is not None
                ctx.key = k
                process(
                    Record(k, v, r.topic, r.partition, r.offset, r.timestamp, tuple(r.headers)),
                    ctx,
                )

            return process_step
        raise TypeError(f"unknown step {step!r}")

    def _compile_output(self) -> Callable[[Any, Any], None]:
        out_append = self.out.append
        output = self.stage.output
        task = self
        if isinstance(output, SinkSpec):
            topic, kser, vser = (
                output.topic,
                output.key_serde.serialize,
                output.value_serde.serialize,
            )
            reuse_key = output.key_serde == self.stage.source.key_serde

            def sink(k: Any, v: Any) -> None:
                if k is None:
                    kb = None
                elif reuse_key and k is task._cur_key:
                    kb = task._cur_key_bytes
                else:
                    kb = kser(k)
                out_append((topic, None, kb, vser(v), _NO_HEADERS))

            return sink
        if isinstance(output, RepartitionSpec):
            n = self.downstream_partitions
            if not n:
                raise ValueError(f"{self.stage.name} repartitions: downstream_partitions needed")
            rtopic, key_fn = output.topic, output.key_fn
            rkser, rvser = output.key_serde.serialize, output.value_serde.serialize
            headers = channel_headers(self.partition)
            crc32 = zlib.crc32

            # Internal topics are partitioned with crc32 (C speed); only headrace reads them.
            def repartition(k: Any, v: Any) -> None:
                kb = rkser(key_fn(v))
                out_append((rtopic, crc32(kb) % n, kb, rvser(v), headers))

            if not self._sequence_outputs:
                return repartition
            channel = headers[0]
            topic_index = self._topic_index

            def repartition_sequenced(k: Any, v: Any) -> None:
                r = task._cur
                assert r is not None
                seq = sequence(r.offset, task._out_index, topic_index[r.topic])
                task._out_index += 1
                kb = rkser(key_fn(v))
                seq_header = (SEQUENCE_HEADER, b"%d" % seq)
                out_append((rtopic, crc32(kb) % n, kb, rvser(v), [channel, seq_header]))

            return repartition_sequenced

        def discard(k: Any, v: Any) -> None:
            return None

        return discard

    # -- lifecycle ---------------------------------------------------------------------------
    def open(
        self,
        *,
        last_checkpoint: int = 0,
        positions: dict[tuple[str, int], int] | None = None,
        skip: dict[int, int] | None = None,
        seen: dict[int, int] | None = None,
    ) -> None:
        """Start after restore: ``positions`` are the committed offsets per input partition."""
        self.last_checkpoint = last_checkpoint
        self.seen = dict(seen or {})
        self._positions = dict(positions or {})
        if self.stage.source.internal:
            assert self._upstream_partitions
            topic = self.stage.source.topics[0]
            self.aligner = BarrierAligner(
                self._upstream_partitions,
                last_checkpoint=last_checkpoint,
                position=self._positions.get((topic, self.partition), 0),
                skip=skip,
                timeout=self._alignment_timeout,
                clock=self.clock,
            )
        for op, ctx in zip(self.operators, self._contexts, strict=True):
            op.open(ctx)

    def position(self, topic: str) -> int:
        """Next offset to read from this task's partition of ``topic``."""
        if self.aligner is not None:
            return self.aligner.position
        return self._positions.get((topic, self.partition), 0)

    def close(self) -> None:
        for op in self.operators:
            op.close()

    # -- records -----------------------------------------------------------------------------
    def feed(self, records: Sequence[RawRecord], start: int = 0) -> int:
        """Process ``records[start:]``; stop early when a checkpoint becomes due.

        Returns the index of the first record not consumed. The caller commits
        :attr:`pending`, calls :meth:`checkpoint_committed`, and feeds the rest.
        """
        if self.pending is not None:
            return start
        if start < len(records):
            start = self._skip_consumed(records, start)
        if self.aligner is None:
            process = self._process
            for i in range(start, len(records)):
                process(records[i])
            if len(records) > start:
                last = records[-1]
                self._positions[(last.topic, last.partition)] = last.offset + 1
                self.counters.records_in += len(records) - start
            return len(records)
        return self._feed_aligned(records, start)

    def _skip_consumed(self, records: Sequence[RawRecord], start: int) -> int:
        """Skip records below the task's position: a batch fetched before a seek.

        aiokafka may hand out a batch fetched before a rebalance after the task was resumed or
        restored and its input seeked back to the committed offset; those records come again
        from the seek, so processing the early copy too would count them twice.
        """
        position = self.position(records[start].topic)
        while start < len(records) and records[start].offset < position:
            start += 1
        return start

    def rewind(self, positions: dict[tuple[str, int], int], skip: dict[int, int]) -> None:
        """Reset the input cut to the last committed checkpoint (a suspended task resumes).

        The state is the committed state (a final checkpoint releases nothing), so reading again
        from the committed offsets, skipping per channel what the cut already includes, is exact.
        """
        self._positions = dict(positions)
        if self.aligner is not None:
            assert self._upstream_partitions
            topic = self.stage.source.topics[0]
            self.aligner = BarrierAligner(
                self._upstream_partitions,
                last_checkpoint=self.last_checkpoint,
                position=self._positions.get((topic, self.partition), 0),
                skip=skip,
                timeout=self._alignment_timeout,
                clock=self.clock,
            )

    def _feed_aligned(self, records: Sequence[RawRecord], start: int) -> int:
        aligner = self.aligner
        assert aligner is not None
        process = self._process_sequenced
        n = len(records)
        i = start
        while i < n:
            r = records[i]
            i += 1
            headers = r.headers
            channel = int(headers[0][1])
            if not aligner.admit(channel, r.offset):
                continue
            if len(headers) > 1 and headers[1][0] == BARRIER_HEADER:
                aligner.on_barrier(channel, r.offset, int(headers[1][1]))
                if aligner.ready:
                    self._prepare(force=False, final=False)
                    break
            elif aligner.on_record(channel, r.offset, r):
                process(r, channel)
        if n:
            self._positions[(records[0].topic, self.partition)] = aligner.position
        return i

    def _process_sequenced(self, r: RawRecord, channel: int) -> None:
        """A repartition record: drop it if an upstream replay already delivered it."""
        self.counters.records_in += 1
        headers = r.headers
        if len(headers) > 1:
            seq = int(headers[1][1])
            slot = dedupe_slot(channel, seq)
            if seq <= self.seen.get(slot, -1):
                self.duplicates_dropped += 1
                return
            self.seen[slot] = seq
        self._process(r)

    def _process(self, r: RawRecord) -> None:
        self._out_index = 0
        out = self.out
        mark = len(out)
        kind = "deserialization"
        try:
            kb = r.key
            key = None if kb is None else self._key_deserialize(kb)
            value = self._value_deserialize(r.value)
            kind = "processing"
            self._cur = r
            self._cur_key = key
            self._cur_key_bytes = kb
            raw_key = b"" if kb is None else kb
            for store in self._store_list:
                store.current_key = raw_key
            self._head(key, value)
        except Exception as exc:
            # Outputs of a half-processed record are discarded; its state writes cannot be
            # taken back and stay (as in Flink/Kafka Streams with skip-style handlers).
            del out[mark:]
            self._on_error(r, kind, exc)

    def _on_error(self, r: RawRecord, kind: str, exc: Exception) -> None:
        policy = self.error_policy
        if policy is ErrorPolicy.FAIL:
            raise RecordError(r, kind, exc) from exc
        where = f"topic {r.topic!r} partition {r.partition} offset {r.offset}"
        if policy is ErrorPolicy.SKIP:
            self.counters.skipped += 1
            log.warning("skipped record at %s after %s error: %r", where, kind, exc)
            return
        self.counters.dead_lettered += 1
        headers = [
            ("hr.error.kind", kind.encode()),
            ("hr.error.topic", r.topic.encode()),
            ("hr.error.partition", b"%d" % r.partition),
            ("hr.error.offset", b"%d" % r.offset),
            ("hr.error.message", f"{type(exc).__name__}: {exc}"[:1000].encode()),
        ]
        self.out.append((self.job.dead_letter_topic, None, r.key, r.value, headers))
        log.warning("dead-lettered record at %s after %s error: %r", where, kind, exc)

    # -- checkpoints ---------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Clock-driven work between batches: source barriers and alignment timeouts."""
        if self.pending is not None:
            return
        if self.aligner is None:
            n = barrier_id(now, self.checkpoint_interval_ms)
            if n > self.last_checkpoint:
                self._prepare(force=False, final=False, checkpoint_id=n)
        elif self.aligner.timed_out():
            log.warning(
                "task %s/%d: alignment timed out after %.1fs; checkpointing unaligned",
                self.stage.name,
                self.partition,
                self.aligner.alignment_seconds(),
            )
            self._prepare(force=True, final=False)

    def final_checkpoint(self) -> PendingCheckpoint:
        """Checkpoint now (revocation or shutdown), aligned or not."""
        if self.pending is None:
            n = None
            if self.aligner is None:
                n = max(self.last_checkpoint, barrier_id(self.clock(), self.checkpoint_interval_ms))
            self._prepare(force=True, final=True, checkpoint_id=n)
        assert self.pending is not None
        return self.pending

    def _prepare(self, *, force: bool, final: bool, checkpoint_id: int | None = None) -> None:
        aligner = self.aligner
        skip: dict[int, int] = {}
        aligned = True
        seconds = 0.0
        offsets = dict(self._positions)
        if aligner is not None:
            seconds = aligner.alignment_seconds()
            cut = aligner.cut(force=force)
            checkpoint_id, skip, aligned = cut.checkpoint_id, cut.skip, cut.aligned
            offsets[(self.stage.source.topics[0], self.partition)] = cut.offset
        assert checkpoint_id is not None
        for op in self.operators:
            op.on_checkpoint(checkpoint_id)
        changes = {op_id: store.take_changes() for op_id, store in self.stores.items()}
        outputs = self.out[:]
        self.out.clear()
        barriers: list[OutRecord] = []
        output = self.stage.output
        if isinstance(output, RepartitionSpec) and self.downstream_partitions:
            headers = barrier_headers(self.partition, checkpoint_id)
            barriers = [
                (output.topic, p, None, b"", headers) for p in range(self.downstream_partitions)
            ]
        self.pending = PendingCheckpoint(
            checkpoint_id,
            offsets,
            skip,
            aligned,
            final,
            changes,
            dict(self.seen),
            outputs,
            barriers,
            seconds,
        )

    def checkpoint_committed(self, changelog_offsets: dict[str, int | None]) -> None:
        """The pending checkpoint is durable: update local stores, release held records."""
        pending = self.pending
        assert pending is not None
        for op_id, store in self.stores.items():
            store.apply_changes(
                pending.changes.get(op_id, []), changelog_offset=changelog_offsets.get(op_id)
            )
        self.pending = None
        self.last_checkpoint = max(self.last_checkpoint, pending.checkpoint_id)
        self.counters.checkpoints += 1
        if not pending.aligned:
            self.counters.unaligned_checkpoints += 1
        if self.aligner is not None and not pending.final:
            # After a final checkpoint the task stops (or is suspended and later rewound to
            # this cut): held records stay unprocessed so the state is exactly the committed one.
            for r in self.aligner.complete(pending.checkpoint_id):
                self._process_sequenced(r, int(r.headers[0][1]))
            if self.aligner.ready:
                self._prepare(force=False, final=False)

    def checkpoint_failed(self) -> None:
        """The commit failed: the task's state is no longer trustworthy; it must be restored."""
        self.pending = None
