"""StageTask: one stage instance for one input partition. No I/O.

The task owns the operator instances of its stage, their bound state stores, its input cut and
its output list. The drivers (the worker over Kafka, ``JobTester`` over an in-memory log, both
through :mod:`headrace.runtime.host`) feed it records and carry out the checkpoints it
prepares, so both run exactly this code. The parts live next to it: the compiled chain
(:mod:`.chain`, :mod:`.fusion`), the input cut (:mod:`.cut`) and the error policy
(:mod:`.errors`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Any

from headrace.operators.job import ErrorPolicy, Job, RepartitionSpec, Stage
from headrace.operators.operator import Operator
from headrace.operators.record import describe_key
from headrace.runtime.checkpoint.barrier import barrier_headers
from headrace.runtime.checkpoint.pending import PendingCheckpoint
from headrace.runtime.kafka.clients import MAX_REQUEST_SIZE as DEFAULT_RECORD_LIMIT
from headrace.runtime.kafka.producer import OutRecord
from headrace.runtime.state.keys import KeyFormatError, decode_storage_key
from headrace.runtime.state.store import OperatorStateStore
from headrace.runtime.task.chain import compile_chain, compile_feed
from headrace.runtime.task.cut import AlignedCut, ClockCut
from headrace.runtime.task.errors import RecordErrors
from headrace.runtime.task.records import (
    RECORD_OVERHEAD,
    RawRecord,
    StateTooLargeError,
    TaskContext,
    TaskCounters,
)
from headrace.runtime.task.timers import TaskTime

_key_of, _value_of, _partition_of = itemgetter(0), itemgetter(1), itemgetter(1)
log = logging.getLogger("headrace.runtime.task")


#: exactly-once: a new ownership's full first barrier round to at least this many downstream
#: partitions waits while the task has nothing to commit (StageTask.prepare)
DEFERRED_ROUND_PARTITIONS = 64


def first_round_delay(
    *, exactly_once: bool, downstream_partitions: int | None, heartbeat_interval_ms: int
) -> float:
    """Seconds an idle new ownership's first full barrier round waits (StageTask.prepare):
    two heartbeat intervals under exactly-once for a round to DEFERRED_ROUND_PARTITIONS
    partitions or more, else none."""
    if not exactly_once or (downstream_partitions or 0) < DEFERRED_ROUND_PARTITIONS:
        return 0.0
    return 2 * heartbeat_interval_ms / 1000


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
        hop_format: int = 2,
        record_limits: Mapping[str, int] | None = None,
        watched: set[bytes] | None = None,
        first_round_delay_s: float = 0.0,
    ) -> None:
        self.job = job
        #: how long a new ownership's first full barrier round waits while the task has
        #: nothing to commit (:meth:`prepare`, "deferred first round"); 0: it never waits
        self.first_round_delay_s = first_round_delay_s
        self._first_round_due = 0.0
        #: record keys whose state a checkpoint found large: each of their records is checked
        #: (see compile_feed); shared with the host, so it outlives a dropped task
        self.watched: set[bytes] = set() if watched is None else watched
        #: the largest record each output or changelog topic takes (default: the producer's)
        self.record_limits: Mapping[str, int] = record_limits or {}
        self.stage = stage
        self.partition = partition
        self.stores = stores
        self.clock = clock
        self.checkpoint_interval_ms = checkpoint_interval_ms
        self.counters = TaskCounters()
        self.out: list[OutRecord] = []
        self.pending: PendingCheckpoint | None = None
        self.last_checkpoint = 0
        self.downstream_partitions = downstream_partitions
        #: repartition partitions written since the last barrier round (see :meth:`_barriers`)
        self._written: set[int | None] = set()
        #: partitions whose last barrier was not quiet; None: none sent by this ownership yet
        self._loud: set[int] | None = None
        #: the watermark the last barrier round carried (event-time jobs)
        self._barrier_watermark: bytes | None = None
        #: a savepoint drains the job: every checkpoint commits, with barriers to every
        #: partition, so that the savepoint command sees a complete cut (kafka/control.py)
        self.full_rounds = False
        #: outputs left the task since the last checkpoint (they belong to the next commit)
        self._sent = False
        #: the last committed cut (offsets, skip, seen, watermark, quiet): a checkpoint that
        #: equals it and carries nothing is idle (:meth:`prepare`)
        self._committed: tuple[object, ...] | None = None
        self.errors = RecordErrors(
            error_policy or job.error_policy, job.dead_letter_topic, self.counters, self.out
        )
        # A tombstone (None value) reaches the serde and fails there: the error policy decides.
        self.key_deserialize: Callable[[Any], Any] = stage.source.key_serde.deserialize
        self.value_deserialize: Callable[[Any], Any] = stage.source.value_serde.deserialize
        # at-least-once dedupe across the repartition hop (see headrace.runtime.checkpoint.barrier)
        self.sequence_outputs = sequence_outputs and not stage.source.internal
        #: how this task writes repartition records (kafka/hopformat.py): 2, or 1 for a
        #: rolling upgrade from a version that reads only 1
        self.hop_format = hop_format
        self.out_index = 0
        self.topic_index = {t: i for i, t in enumerate(stage.source.topics)}
        #: at-least-once: highest sequence processed per upstream slot (part of the cut)
        self.seen: dict[int, int] = {}
        #: event time: the watermark and the operators' timers (None: the job has none)
        self.time: TaskTime | None = None
        if job.event_time:
            self.time = TaskTime(
                watermarks=job.watermarks,
                topic=stage.source.topics[0],
                partition=partition,
                clock=clock,
                key_deserialize=self.key_deserialize,
                stores=stores,
                errors=self.errors,
                out=self.out,
            )
        self.cut: ClockCut | AlignedCut
        if stage.source.internal:
            if not upstream_partitions:
                raise ValueError(
                    f"{stage.name} reads a repartition topic: upstream_partitions needed"
                )
            self.cut = AlignedCut(self, upstream_partitions, alignment_timeout)
        else:
            self.cut = ClockCut(self)
        head, self.compiled = compile_chain(self)
        self.operators: list[Operator] = [op for op, _ in self.compiled]
        self._contexts: list[TaskContext] = [ctx for _, ctx in self.compiled]
        #: the compiled per-record loop over ``records[start:end]``
        self.run = compile_feed(self, head)

    def side_output(
        self, topic: str | None, headers: list[tuple[str, bytes]], raw: Any, late: bool
    ) -> None:
        """Write the input record as it arrived to ``topic`` (late data, an operator's rejects),
        in this checkpoint like every output. A late record without a topic is counted as
        skipped and logged: never dropped without a trace."""
        if late:
            self.counters.late += 1
        if topic is None:
            self.counters.skipped += 1
            log.warning(
                "late record at topic %r partition %d offset %d skipped (%s); name a late_topic "
                "in window() to keep late records",
                raw.topic,
                raw.partition,
                raw.offset,
                ", ".join(f"{n}={v.decode(errors='replace')}" for n, v in headers),
            )
            return
        self.out.append((topic, None, raw.key, raw.value, headers, raw.timestamp))

    def record_limit(self, topic: str) -> int:
        """The largest record (bytes) ``topic`` takes from this task's producer."""
        return self.record_limits.get(topic, DEFAULT_RECORD_LIMIT)

    # -- lifecycle ---------------------------------------------------------------------------
    def open(
        self,
        *,
        last_checkpoint: int = 0,
        positions: dict[tuple[str, int], int] | None = None,
        skip: dict[int, int] | None = None,
        seen: dict[int, int] | None = None,
        watermark: int | None = None,
        quiet: dict[int, int | None] | None = None,
        loud: frozenset[int] | None = None,
    ) -> None:
        """Start after restore: ``positions`` are the committed offsets per input partition,
        ``watermark`` the committed cut's (event-time jobs), ``quiet`` its quiet channels,
        ``loud`` (exactly-once) the partitions whose last committed barrier was not quiet: the
        barrier rounds go on from there (None: the first round goes to every partition; so
        with event time, whose barriers also carry the watermark).

        A task without a committed checkpoint waits for every upstream channel's first
        barrier, and each new ownership without a record of its round sends one to every
        partition (at once if it has anything to commit, else after ``first_round_delay_s``:
        :meth:`prepare`). (Starting with every channel quiet instead would spare a new job that
        round, but a quiet channel's first records may miss the checkpoint of their interval,
        and at a job's start that would be every channel's: its first checkpoints would not
        be job-wide cuts.)"""
        self.last_checkpoint = last_checkpoint
        self.seen = dict(seen or {})
        if self.time is not None:
            inputs = [] if self.stage.source.internal else list(self.stage.source.topics)
            self.time.open(inputs, watermark)
        self.cut.open(dict(positions or {}), skip, quiet)
        self._loud = set(loud) if loud is not None and self.time is None else None
        self._first_round_due = self.clock() + self.first_round_delay_s
        self._committed = (
            dict(positions or {}),
            dict(skip or {}),
            dict(seen or {}),
            None if self.time is None else self.time.watermark,
            dict(quiet or {}),
        )
        for op, ctx in zip(self.operators, self._contexts, strict=True):
            op.open(ctx)

    def position(self, topic: str) -> int:
        """Next offset to read from this task's partition of ``topic``."""
        return self.cut.position(topic)

    def close(self) -> None:
        for op in self.operators:
            op.close()

    def rewind(
        self,
        positions: dict[tuple[str, int], int],
        skip: dict[int, int],
        quiet: dict[int, int | None] | None = None,
        loud: frozenset[int] | None = None,
    ) -> None:
        """Reset the input cut to the last committed checkpoint (a suspended task resumes).

        The state is the committed state (a final checkpoint releases nothing), so reading again
        from the committed offsets, skipping per channel what the cut already includes, is exact.
        The barrier rounds go on from the committed one (``loud``, exactly-once; as :meth:`open`
        says), else the next round goes to every partition, as a new ownership's does.
        """
        self.cut.rewind(dict(positions), skip, quiet)
        self._loud = set(loud) if loud is not None and self.time is None else None
        self._written = set()
        self._first_round_due = self.clock() + self.first_round_delay_s

    def take_outputs(self) -> list[OutRecord]:
        """The outputs produced since the last call, for the driver to send now.

        Noting where they go is what lets a barrier round skip the repartition partitions
        this task wrote nothing to (:meth:`_barriers`); a C-level pass per batch sent."""
        out = self.out
        records = out[:]
        out.clear()
        if records:
            self._sent = True
            if self.downstream_partitions:
                self._written.update(map(_partition_of, records))
        return records

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
        return self.cut.feed(records, start)

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

    # -- checkpoints ---------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Clock-driven work between batches: source barriers and alignment timeouts."""
        if self.pending is None:
            self.cut.tick(now)

    def final_checkpoint(self) -> PendingCheckpoint:
        """Checkpoint now (revocation or shutdown), aligned or not."""
        if self.pending is None:
            self.prepare(force=True, final=True, checkpoint_id=self.cut.final_id())
        assert self.pending is not None
        return self.pending

    def prepare(self, *, force: bool, final: bool, checkpoint_id: int | None = None) -> None:
        """Take the cut: snapshot the changes, outputs and barriers of this checkpoint."""
        cut = self.cut.take(force, checkpoint_id)
        for op in self.operators:
            op.on_checkpoint(cut.checkpoint_id)
        changes = {op_id: store.take_changes() for op_id, store in self.stores.items()}
        for op_id, store_changes in changes.items():
            self._check_fits(op_id, store_changes)
        outputs = self.take_outputs()  # the rest of this checkpoint's (they go in its commit)
        barriers: list[OutRecord] = []
        output = self.stage.output
        watermark = None if self.time is None else self.time.watermark
        unchanged = (
            not self.full_rounds
            and not self._sent  # outputs since the last checkpoint, sent or in this one
            and not any(changes.values())
            and self._committed == (cut.offsets, cut.skip, self.seen, watermark, cut.quiet)
        )
        # A final checkpoint (revocation, shutdown) of a task that did nothing since its last
        # committed or restored cut is idle too, barrier round and all: committing it would
        # only repeat that cut, and its barriers are ones the next owner sends anyway (it goes
        # on from the committed round, or starts a full one; downstream, a missing final
        # barrier is what a kill -9 leaves, and alignment waits for the next owner's). Every
        # eager rebalance ends every task's ownership: four workers starting together at 256
        # partitions committed 64-256 empty transactions (with a barrier to every downstream
        # partition each) per worker per generation before any input (bench/README.md).
        #
        # Deferred first round. A new ownership without a record of its last round sends a
        # full one (to every downstream partition: :meth:`open`), and under exactly-once that
        # is a transaction with a barrier per downstream partition and as many markers: at
        # 256 partitions, 65,536 barriers per stage for a worker that took every task. Right
        # after an assignment the group has often not settled (workers started together join
        # over several generations), and a revocation waits for the checkpoint in flight: the
        # first worker's round delayed every other worker's start by 10 s and more
        # (bench/README.md, eighth round). So while the task has nothing to commit, that
        # round waits ``first_round_delay_s`` after the ownership began (two heartbeat
        # intervals: a join after ours reaches us within one); a task with anything to commit
        # sends it at once. What waits meanwhile is downstream: a downstream task with no
        # record of this channel's round waits for it before it checkpoints (its other
        # channels' records are held), so the delay costs a fresh job's first downstream
        # checkpoint that long when some upstream partition has no input. That is worth it
        # only where the round is large: the worker defers rounds to DEFERRED_ROUND_PARTITIONS
        # downstream partitions or more (a round to 4 partitions commits in milliseconds, and
        # deferring it only delayed small jobs' first checkpoints by seconds).
        deferred = (
            unchanged
            and self._loud is None
            and self.first_round_delay_s > 0
            and self.clock() < self._first_round_due
        )
        barrier_round = not ((final or deferred) and unchanged)
        if barrier_round and isinstance(output, RepartitionSpec) and self.downstream_partitions:
            barriers = self._barriers(output.topic, cut.checkpoint_id)
        idle = unchanged and not barriers
        self._sent = False
        loud = None if self._loud is None else frozenset(self._loud)
        self.pending = PendingCheckpoint(
            cut.checkpoint_id,
            cut.offsets,
            cut.skip,
            cut.aligned,
            final,
            changes,
            dict(self.seen),
            outputs,
            barriers,
            cut.alignment_seconds,
            watermark,
            cut.quiet,
            loud,
            idle,
        )

    def _barriers(self, topic: str, checkpoint_id: int) -> list[OutRecord]:
        """The barrier records of checkpoint ``checkpoint_id``: a barrier to each repartition
        partition written since the last round, and a *quiet* one to each that got a barrier
        last round but no data since (checkpoint/alignment.py, "Quiet channels"); to every
        partition on a new ownership's first round, when the watermark changed (downstream
        watermarks move only with barriers) and while a savepoint drains the job.

        A job with no input therefore writes no barrier after one quiet round, and one with
        input writes as many as there are partitions its data went to.
        """
        count = self.downstream_partitions
        assert count
        written, self._written = self._written, set()
        wm = None
        if self.time is not None:
            wm = b"idle" if self.time.idle else b"%d" % self.time.watermark
        loud = self._loud
        targets: Iterable[int]
        if loud is None or self.full_rounds or wm != self._barrier_watermark:
            targets = range(count)
        else:
            targets = sorted(p for p in written | loud if p is not None and 0 <= p < count)
        headers = barrier_headers(self.partition, checkpoint_id, wm)
        quiet = barrier_headers(self.partition, checkpoint_id, wm, quiet=True)
        barriers: list[OutRecord] = [
            (topic, p, None, b"", headers if p in written else quiet, None) for p in targets
        ]
        self._loud = {p for p in written if p is not None and 0 <= p < count}
        self._barrier_watermark = wm
        return barriers

    def _check_fits(self, op_id: str, changes: list[tuple[bytes, bytes | None]]) -> None:
        """Every changelog record of a checkpoint fits its topic (the broker would refuse the
        batch with a bare MessageSizeTooLargeError).

        State is serialized here, once per dirty key, never per record; so this is where a
        value that grew too large is found, and the record that grew it is not known any
        more. Two things make the error policy meet that record anyway, for the states
        scoped to the record key (value, list, aggregating, reducing):

        * a key whose record is over half the limit is *watched*: from now on each of its
          records is checked right after it ran, and one that makes a value too large is
          taken back and handed to the error policy (``compile_feed``);
        * a value over the limit of a key not watched yet (it grew from small to too large
          between two checkpoints) makes it watched and raises a *retry*: the driver drops
          the task's work since the last checkpoint, restores it and runs those records
          again, now checked.

        Map and keyed entries are not scoped to the record key, and a second failure of a
        watched key means the check did not see it: those stop the task, named.
        """
        if not changes:
            return
        topic = self.job.changelog_topic(op_id)
        limit = self.record_limit(topic)
        room = limit - RECORD_OVERHEAD
        # An upper bound first, with C loops (this runs over every change of every checkpoint)
        longest_key = max(map(len, map(_key_of, changes)))
        longest_value = max(map(len, filter(None, map(_value_of, changes))), default=0)
        if longest_key + longest_value <= room // 2:
            return
        if max(len(k) + len(v or b"") for k, v in changes) <= room // 2:
            return
        scoped = {name for name, h in self.stores[op_id].handles().items() if h.record_scoped}
        for key, value in changes:
            size = len(key) + len(value or b"")
            if size <= room // 2:
                continue
            try:
                _, state, user_key, map_key = decode_storage_key(key)
            except KeyFormatError:
                state, user_key, map_key = "?", key, None
            guardable = map_key is None and state in scoped
            new = guardable and user_key not in self.watched
            if guardable:
                self.watched.add(user_key)
            if size > room:
                shown = describe_key(user_key)
                if map_key is not None:
                    shown += f" (map key {describe_key(map_key)})"
                raise StateTooLargeError(op_id, state, shown, size, limit, topic, retry=new)

    def checkpoint_committed(self, changelog_offsets: dict[str, int | None]) -> None:
        """The pending checkpoint is durable: update local stores, release held records."""
        pending = self.pending
        assert pending is not None
        if not pending.idle:
            for op_id, store in self.stores.items():
                store.apply_changes(
                    pending.changes.get(op_id, []), changelog_offset=changelog_offsets.get(op_id)
                )
            self._committed = (
                pending.offsets,
                pending.skip,
                pending.seen,
                pending.watermark,
                pending.quiet,
            )
        self.pending = None
        self.last_checkpoint = max(self.last_checkpoint, pending.checkpoint_id)
        if not pending.idle:
            self.counters.checkpoints += 1
        if not pending.aligned:
            self.counters.unaligned_checkpoints += 1
        self.cut.committed(pending)
