"""The task host: where a task is assembled, restored, claimed, opened, fed and checkpointed.

Two drivers run tasks: the worker's stage runner (real Kafka clients, consumer-group
rebalances; :mod:`headrace.runtime.worker`) and :class:`~headrace.runtime.testing.JobTester` (an
in-memory log with transactions). They differ in where records come from and how partitions are
handed out; what happens to a task does not, so it is written once, here:

1. **assemble** (:meth:`StageHost.create`): one store per stateful operator, the
   :class:`~headrace.runtime.task.StageTask` with its upstream and downstream partition
   counts, and its :class:`~headrace.runtime.checkpoint.commit.TaskIO`;
2. **find the start** (:meth:`StageHost.start_point`): the committed input offsets and the
   checkpoint metadata written with them;
3. **restore** (:meth:`StageHost.restore`): changelog targets with the at-least-once cut
   (``valid_until``), read through :func:`~headrace.runtime.checkpoint.restore.restore`;
4. **claim** (:meth:`StageHost.claim`, at-least-once only): the writer epoch of this ownership
   (:mod:`headrace.runtime.checkpoint.fencing`);
5. **open** (:meth:`StageHost.open`): operators opened at the restored cut;
6. **feed and checkpoint** (:meth:`StageHost.feed`, :meth:`StageHost.settle`): records in,
   every checkpoint the task prepares carried out by the committer.

The driver supplies the ports: a *sender* (outputs, changelog writes, claims), a *committer*
(the offset commit of its guarantee), a *changelog reader* with the few consumer calls
:func:`restore` makes (``assign``, ``seek``, ``getmany``, ...: an ``AIOKafkaConsumer``, or the
tester's in-memory reader), and the committed offsets of its consumer group.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.structs import TopicPartition

from headrace.operators.job import ErrorPolicy, Job, Stage
from headrace.runtime.checkpoint.commit import Committer
from headrace.runtime.checkpoint.fencing import claim_record, epoch_headers, next_epoch
from headrace.runtime.checkpoint.metadata import CheckpointMetadata, CheckpointMetadataError
from headrace.runtime.checkpoint.pending import CommitResult, PendingCheckpoint
from headrace.runtime.checkpoint.restore import RestoreTarget, StateWithoutCheckpointError, restore
from headrace.runtime.faults import maybe_crash
from headrace.runtime.kafka.fetch import aiokafka_fits
from headrace.runtime.kafka.lease import MembershipLease
from headrace.runtime.kafka.producer import BatchSender, Delivery, first_gap, last_offset
from headrace.runtime.kafka.topics import TopicLayout
from headrace.runtime.state.store import OperatorStateStore
from headrace.runtime.task import StageTask

__all__ = ["CheckpointMissingError", "Gap", "StageHost", "StartPoint"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class TaskIO:
    """A task plus the Kafka clients and bookkeeping its checkpoints need."""

    task: StageTask
    sender: BatchSender
    group_id: str
    changelog_topics: dict[str, str]
    #: operator id -> offset of the last changelog record this task's state includes
    changelog_last: dict[str, int | None] = field(default_factory=dict)
    #: deliveries of outputs sent since the last checkpoint (acknowledged at the next one)
    unacked: list[Delivery] = field(default_factory=list)
    #: offsets of the last committed checkpoint, per input (topic, partition), its skip list,
    #: its quiet upstream channels (checkpoint/alignment.py, "Quiet channels") and (exactly-once)
    #: the partitions its round left loud (StageTask.open; None: unknown)
    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    committed_skip: dict[int, int] = field(default_factory=dict)
    committed_quiet: dict[int, int | None] = field(default_factory=dict)
    committed_loud: frozenset[int] | None = None
    producer: AIOKafkaProducer | None = None  #: its own transactional one (exactly-once)
    restored: bool = False
    #: at-least-once: this ownership's writer epoch and its header for changelog records
    #: (None: exactly-once, or not claimed yet); see headrace.runtime.checkpoint.fencing
    epoch_headers: list[tuple[str, bytes]] | None = None
    epoch: int | None = None
    #: this ownership knows a checkpoint of the task committed (restored from one, or
    #: committed one); until it does, its changelog records lack ``hr.committed``
    knows_commit: bool = False
    #: the claim is to be written again, with ``hr.committed``, at the next checkpoint
    reclaim: bool = False
    #: changelog ranges (operator id, first, end) that another writer filled between two of
    #: this task's writes: read and rewritten by the worker
    foreign: list[tuple[str, int, int]] = field(default_factory=list)
    #: where checkpoint documents too long for offset metadata go (None: a source stage)
    cuts_topic: str | None = None
    spilled: list[bytes] = field(default_factory=list)  #: spilled cut documents not deleted yet
    closed: bool = False  #: its clients and stores are closed (closing again is a no-op)
    generation: int | None = None  #: the group generation it last ran in (_keeps_producer)

    @property
    def name(self) -> str:
        return f"{self.task.stage.name}/{self.task.partition}"

    @property
    def stage_name(self) -> str:
        return self.task.stage.name

    @property
    def partition(self) -> int:
        return self.task.partition


async def read_spilled(reader: Any, io: TaskIO, offset: int) -> CheckpointMetadata:
    """The checkpoint document a committed reference names (see
    :mod:`headrace.runtime.checkpoint.metadata`), read with the changelog reader (its
    isolation level is the guarantee's: a spill is committed exactly when its offsets are)."""
    if io.cuts_topic is None:
        raise CheckpointMissingError(
            io.name,
            io.group_id,
            f"its metadata refers to a spilled document at {offset}, but "
            "the stage has no cuts topic",
        )
    tp = TopicPartition(io.cuts_topic, io.partition)
    reader.assign([tp])
    reader.seek(tp, offset)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        batch = (await reader.getmany(tp, timeout_ms=500)).get(tp, [])
        found = next((r for r in batch if r.offset >= offset), None)
        if found is None:
            continue
        if found.offset == offset and found.value is not None:
            meta = CheckpointMetadata.decode(bytes(found.value).decode())
            if meta is not None and meta.spilled_at is None:
                return meta
        break
    raise CheckpointMissingError(
        io.name,
        io.group_id,
        f"its committed metadata refers to the checkpoint document at {io.cuts_topic}"
        f"[{io.partition}] offset {offset}, which cannot be read",
    )


#: called with every committed checkpoint (the worker's metrics); None: nobody observes
CommitObserver = Callable[[CommitResult], None]


async def commit_checkpoint(
    io: TaskIO,
    committer: Committer,
    pending: PendingCheckpoint,
    observe: CommitObserver | None = None,
) -> CommitResult | None:
    """Commit ``pending`` and apply the result: the task writes the changes into its local
    stores and releases held records; the outputs the commit sent are counted. An idle
    checkpoint (ARCHITECTURE.md 5.8) is not committed (None), except an ownership's first
    (checkpoint/fencing.py), or with a claim to write again or keys to rewrite."""
    if pending.idle and not (io.reclaim or io.foreign) and (io.knows_commit or not pending.offsets):
        io.task.counters.idle_checkpoints += 1
        io.task.checkpoint_committed({})
        return None
    pending.idle = False  # committed after all (and a claim may join its changes)
    if io.reclaim and io.epoch is not None:
        # An ownership that started without a checkpoint has committed one: its claim goes
        # out again with hr.committed, so the changelog proves a commit even if this task
        # writes nothing else (see checkpoint/fencing.py, "Proof that a checkpoint committed").
        for op, changes in pending.changes.items():
            changes.append(claim_record(io.task.stores[op].partition_key, io.epoch))
        io.reclaim = False
    result = await committer.commit(io, pending)
    if not io.knows_commit and pending.offsets:  # (a task with no input commits no offset)
        io.knows_commit = True
        if io.epoch is not None:
            io.epoch_headers = epoch_headers(io.epoch, committed=True)
            io.reclaim = True
    io.task.counters.records_out += result.outputs  # the rest count where they are sent
    io.task.checkpoint_committed(result.changelog_offsets)
    if observe is not None:
        observe(result)
    return result


#: an input (topic, partition)
InputTP = tuple[str, int]
#: changelog records somebody else wrote where only this task should: (operator, start, end)
Gap = tuple[str, int, int]


@dataclass(slots=True)
class StartPoint:
    """Where a task starts: its group's committed offsets and the checkpoint they belong to."""

    positions: dict[InputTP, int] = field(default_factory=dict)
    meta: CheckpointMetadata | None = None
    #: inputs whose committed offset carries no headrace checkpoint (reset with Kafka's tools,
    #: or committed by another program): the state in the changelog cannot be placed
    unverified: list[InputTP] = field(default_factory=list)


class CheckpointMissingError(RuntimeError):
    """A task's committed offsets do not say which checkpoint they belong to (or say it in a
    format this version cannot read) while its changelog holds state. Starting would either
    drop that state or count its input twice; headrace stops and says how to go on.

    Why refuse rather than guess: an offset without headrace's metadata is what
    ``kafka-consumer-groups --reset-offsets`` leaves behind. Under at-least-once the restore
    used to take it for "no checkpoint", treat every changelog record as never committed and
    rewrite those keys as deleted at the next checkpoint: the state was erased silently.
    """

    def __init__(self, task: str, group: str, what: str) -> None:
        self.task, self.group = task, group
        super().__init__(
            f"task {task} (group {group!r}): {what}. Nothing was consumed. To start the job "
            "from scratch, stop every worker and run `headrace reset MODULE:JOB --yes` (it "
            "deletes the job's state and internal topics and resets its input offsets); to "
            "keep the state, restore the offsets headrace committed"
        )


class StageHost:
    """Everything a driver does to the tasks of one stage, minus moving records around."""

    def __init__(
        self,
        job: Job,
        stage: Stage,
        layout: TopicLayout,
        *,
        exactly_once: bool,
        checkpoint_interval_ms: int,
        open_store: Callable[[str, int], OperatorStateStore],
        clock: Callable[[], float],
        alignment_timeout_s: float = 60.0,
        error_policy: ErrorPolicy | None = None,
        first_round_delay_s: float = 0.0,
        hop_format: int = 2,
    ) -> None:
        self.job = job
        self.hop_format = hop_format if aiokafka_fits() else 1  # 2 needs kafka/fetch.py's reader
        self.first_round_delay_s = first_round_delay_s
        self.stage, self.layout = stage, layout
        self.exactly_once = exactly_once
        self.checkpoint_interval_ms = checkpoint_interval_ms
        self.alignment_timeout_s = alignment_timeout_s
        self.error_policy = error_policy or ErrorPolicy(job.error_policy)
        self.clock, self.open_store = clock, open_store
        self.group_id = job.group_id(stage)
        #: the ids of the stage's operators that declare state (one store and changelog each)
        self.stateful = [step.operator_id for st, step in job.stateful_operators() if st is stage]
        self.changelog_topics = {op: job.changelog_topic(op) for op in self.stateful}
        #: per partition, the record keys whose state is near its record limit: kept here,
        #: not in the task, so that a task dropped and restored to run its records again
        #: checks them (see StageTask._check_fits)
        self.watched: dict[int, set[bytes]] = {}

    def inputs(self, partition: int) -> list[InputTP]:
        """The input partitions a task reads: partition ``p`` of every co-partitioned source."""
        return [(topic, partition) for topic in self.stage.source.topics]

    # -- 1. assemble -----------------------------------------------------------------------------
    def create(self, partition: int, sender: Any, producer: Any | None = None) -> TaskIO:
        """A new task for ``partition`` over fresh stores; ``producer``: its own transactional
        producer under exactly-once (None: ``sender`` writes through a shared one)."""
        stores = {op: self.open_store(op, partition) for op in self.stateful}
        upstream = None
        if self.stage.source.internal:
            upstream = self.layout.partitions_of(self.job.stages[self.stage.index - 1])
        task = StageTask(
            self.job,
            self.stage,
            partition,
            stores,
            upstream_partitions=upstream,
            downstream_partitions=self.layout.downstream_partitions(self.stage),
            checkpoint_interval_ms=self.checkpoint_interval_ms,
            alignment_timeout=self.alignment_timeout_s,
            clock=self.clock,
            error_policy=self.error_policy,
            sequence_outputs=not self.exactly_once,
            hop_format=self.hop_format,
            record_limits=self.layout.record_limits,
            watched=self.watched.setdefault(partition, set()),
            first_round_delay_s=self.first_round_delay_s,
        )
        return TaskIO(
            task=task,
            sender=sender,
            group_id=self.group_id,
            changelog_topics=dict(self.changelog_topics),
            producer=producer,
            cuts_topic=self.job.cuts_topic(self.stage) if self.stage.source.internal else None,
        )

    # -- 2. find the start ---------------------------------------------------------------------
    def start_point(
        self, partition: int, committed: Mapping[InputTP, tuple[int, str | None]]
    ) -> StartPoint:
        """The committed offsets of the task's inputs and the metadata committed with them
        (``committed``: (topic, partition) -> (offset, metadata) of the stage's group)."""
        start = StartPoint()
        for tp in self.inputs(partition):
            found = committed.get(tp)
            if found is None:
                continue
            offset, text = found
            start.positions[tp] = offset
            try:
                meta = CheckpointMetadata.decode(text)
            except CheckpointMetadataError as exc:
                raise CheckpointMissingError(
                    f"{self.stage.name}/{partition}",
                    self.group_id,
                    f"the committed offset {offset} of {tp[0]}[{tp[1]}] carries {exc}",
                ) from exc
            if meta is None:
                start.unverified.append(tp)
            else:
                start.meta = meta
        return start

    # -- 3. restore ------------------------------------------------------------------------------
    def restore_targets(self, io: TaskIO, start: StartPoint) -> list[RestoreTarget]:
        """One restore target per store. At-least-once: changelog records past the committed
        checkpoint's offset (``cl`` in the metadata) belong to a checkpoint that never
        committed its offsets and are not state."""
        targets = []
        for op in self.stateful:
            valid_until = None
            if not self.exactly_once:
                meta = start.meta
                valid_until = meta.changelog_offsets.get(op, -1) if meta else -1
            target = RestoreTarget(
                io.task.stores[op], self.changelog_topics[op], io.task.partition, valid_until
            )
            if start.unverified:
                target.unverified = ", ".join(
                    f"{t}[{p}] at offset {start.positions[(t, p)]}" for t, p in start.unverified
                )
            target.no_offsets = not start.positions
            targets.append(target)
        return targets

    async def restore(
        self,
        reader: Any,
        tasks: list[tuple[TaskIO, StartPoint]],
        *,
        batch_size: int = 10_000,
        progress: Callable[[RestoreTarget], None] | None = None,
        on_targets: Callable[[list[RestoreTarget]], None] | None = None,
    ) -> dict[int, dict[str, int]]:
        """Restore every task's stores from its changelog partitions, all through one reader.

        Returns, per partition and operator, the changelog end offset the restore read up to
        (what a claim must find contiguous, see :meth:`claim`).
        """
        for io, start in tasks:
            if start.meta is not None and start.meta.spilled_at is not None:
                start.meta = await read_spilled(reader, io, start.meta.spilled_at)
        by_target: list[tuple[TaskIO, str, RestoreTarget]] = []
        for io, start in tasks:
            for op, target in zip(self.stateful, self.restore_targets(io, start), strict=True):
                by_target.append((io, op, target))
        targets = [t for _, _, t in by_target]
        if on_targets is not None:
            on_targets(targets)
        try:
            await restore(reader, targets, batch_size=batch_size, progress=progress)
        except StateWithoutCheckpointError as exc:
            target = exc.target
            raise CheckpointMissingError(
                f"{self.stage.name}/{target.partition}",
                self.group_id,
                f"the committed offset(s) of {target.unverified} carry no headrace checkpoint "
                "(reset with Kafka's tools, or committed by another program), but changelog "
                f"{target.topic}[{target.partition}] holds {exc.records:,} record(s) of state",
            ) from exc
        for io, start in tasks:
            io.knows_commit = start.meta is not None
        for _, _, target in by_target:
            self._refuse_lost_offsets(target)
        read_until: dict[int, dict[str, int]] = {io.task.partition: {} for io, _ in tasks}
        for io, op, target in by_target:
            io.changelog_last[op] = target.last_applied
            read_until[io.task.partition][op] = target.end
        return read_until

    def _refuse_lost_offsets(self, target: RestoreTarget) -> None:
        """A task without any committed offset whose changelog proves that a checkpoint
        committed: its offsets were deleted. Starting would count its input again from the
        reset position on top of the state (exactly-once) or rewrite the state as deleted
        (at-least-once); nothing has been written yet, so stop here."""
        if not target.no_offsets:
            return
        if target.commit_proof is not None:
            where = f"a record at offset {target.commit_proof} was written after a commit"
        elif self.exactly_once and target.start is not None:
            where = f"the local store holds it up to offset {target.start - 1}"
        else:
            return
        raise CheckpointMissingError(
            f"{self.stage.name}/{target.partition}",
            self.group_id,
            f"no input offset of the task is committed in the group, but changelog "
            f"{target.topic}[{target.partition}] holds the state of a checkpoint that committed "
            f"({where}): the group's offsets were deleted (kafka-consumer-groups --delete, or "
            "the broker expired them after the group stayed empty for offsets.retention.minutes, "
            "7 days by default; raise it above the longest time the job may be stopped)",
        )

    # -- 4. claim --------------------------------------------------------------------------------
    async def claim(
        self,
        io: TaskIO,
        *,
        lease: MembershipLease | None = None,
        read_until: dict[str, int] | None = None,
    ) -> list[Gap]:
        """At-least-once: claim this ownership's writer epoch in every changelog partition of
        the task (see :mod:`headrace.runtime.checkpoint.fencing`).

        Returns the ranges of records somebody else wrote between what this task has read
        (``read_until``: the end offset per operator; by default just past its own last write)
        and its claim. Usually none; the caller rewrites their keys.
        """
        if self.exactly_once or not self.stateful:
            return []
        maybe_crash("before-claim")
        if lease is not None:
            lease.check(f"the writer-epoch claim of task {io.name}")
        stores = io.task.stores
        seen = [e for e in (st.writer_epoch for st in stores.values()) if e is not None]
        generation = lease.generation if lease is not None else None
        epoch = next_epoch(max(seen) if seen else None, generation)
        headers = epoch_headers(epoch, committed=io.knows_commit)
        gaps: list[Gap] = []
        for op in self.stateful:
            deliveries = await io.sender.send_pairs(
                self.changelog_topics[op],
                io.task.partition,
                [claim_record(stores[op].partition_key, epoch)],
                headers,
            )
            previous = io.changelog_last.get(op)
            expected = read_until[op] if read_until else (0 if previous is None else previous + 1)
            gap = await first_gap(deliveries, expected)
            if gap is not None:
                gaps.append((op, *gap))
            claimed_at = await last_offset(deliveries)
            io.changelog_last[op] = claimed_at
            # Records in a gap are not state (the caller rewrites their keys): the store is the
            # state at the claim.
            stores[op].apply_changes([], changelog_offset=claimed_at, writer_epoch=epoch)
        io.epoch_headers, io.epoch = headers, epoch
        log.info("task %s claimed writer epoch %d", io.name, epoch)
        return gaps

    # -- 5. open ---------------------------------------------------------------------------------
    def open(self, io: TaskIO, start: StartPoint) -> None:
        """Open the task's operators at the committed cut (its skip list and dedupe marks)."""
        meta = start.meta
        io.committed = dict(start.positions)
        io.committed_skip, io.committed_quiet = (meta.skip, meta.quiet) if meta else ({}, {})
        io.committed_loud = meta.loud if meta and self.exactly_once else None
        io.task.open(
            last_checkpoint=meta.checkpoint_id if meta else 0,
            positions=dict(start.positions),
            skip=meta.skip if meta else None,
            seen=meta.seen if meta else None,
            watermark=meta.watermark if meta else None,
            quiet=meta.quiet if meta else None,
            loud=io.committed_loud,
        )
        io.restored = True

    # -- 6. feed and checkpoint -------------------------------------------------------------
    @staticmethod
    async def feed(
        io: TaskIO,
        records: list[Any],
        committer: Committer,
        observe: CommitObserver | None = None,
    ) -> None:
        """Run a fetched batch through the task; commit each checkpoint it reaches on the way
        (a barrier inside the batch cuts it there)."""
        task = io.task
        i = 0
        while i < len(records):
            i = task.feed(records, i)
            while task.pending is not None:
                await commit_checkpoint(io, committer, task.pending, observe)

    @staticmethod
    async def settle(
        io: TaskIO, committer: Committer, now: float, observe: CommitObserver | None = None
    ) -> None:
        """Let the clock inject a barrier if one is due, and commit what is pending."""
        task = io.task
        task.tick(now)
        while task.pending is not None:
            await commit_checkpoint(io, committer, task.pending, observe)
