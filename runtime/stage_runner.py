"""One stage of a worker: a consumer-group member whose assigned partitions become tasks.

A :class:`StageRunner` is the member of ``<job>.<stage>``. It polls, feeds each task its
records through the task host (:mod:`headrace.runtime.host`), and runs the task life cycle a
rebalance asks for: suspend on revocation (after a final checkpoint), resume when the same
partition comes straight back and nobody wrote meanwhile, otherwise restore from the changelog
in the background while the task's inputs stay paused (ARCHITECTURE.md section 6).

Partial failures. A member that was paused past its session timeout (see
:mod:`headrace.runtime.kafka.lease`) or whose commit says it is no longer a member (a failed
offset commit, a fenced producer) drops every task of that stage *without* a checkpoint and
rejoins the group; it does not exit. Under at-least-once every new ownership of a task claims a
writer epoch in the task's changelog partitions before it processes anything
(:mod:`headrace.runtime.checkpoint.fencing`).

Why this module must be one unit (it is over 500 lines): it is the per-stage state machine
(running, suspended, restoring, abandoned) and the poll loop that drives it; every transition
holds the runner's lock and moves a task between the runner's dicts, and a rebalance callback
can run between any two awaits of the loop. Kept together, one can check each transition
against the others; what is not the state machine already lives elsewhere (clients in
``kafka/clients.py``, task assembly, restore, claim and commit in ``host.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    InvalidProducerEpoch,
    KafkaError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    RebalanceInProgressError,
    UnknownMemberIdError,
    UnknownProducerId,
)
from aiokafka.structs import TopicPartition

from headrace.operators.job import ErrorPolicy, Job, Stage
from headrace.runtime.checkpoint.commit import Committer
from headrace.runtime.checkpoint.restore import RestoreTarget, read_keys
from headrace.runtime.config import Settings
from headrace.runtime.host import Gap, StageHost, StartPoint, TaskIO, commit_checkpoint
from headrace.runtime.kafka import clients
from headrace.runtime.kafka.health import BROKER_AWAY
from headrace.runtime.kafka.lease import (
    LeaseExpired,
    MembershipLease,
    ProducerBroken,
    ProducerGuard,
)
from headrace.runtime.kafka.producer import BatchSender, abandon
from headrace.runtime.kafka.topics import SOURCE_GREW, TopicConfigError, TopicLayout
from headrace.runtime.metrics import WorkerMetrics
from headrace.runtime.state.store import OperatorStateStore
from headrace.runtime.task.records import StateTooLargeError
from headrace.runtime.task.stage_task import first_round_delay
from headrace.runtime.view import RestoreProgress, StageSnapshot

log = logging.getLogger("headrace.runtime.worker")

#: what a member that lost its place in the group meets when it writes: it drops its tasks
#: (no checkpoint: it may not be their owner any more) and rejoins. The same recovery applies
#: to what a checkpoint or a restore meets when the broker was away (kafka/health.py
#: BROKER_AWAY): the writes of the checkpoint under way are lost, the committed one is intact.
#: And to a producer that lost its idempotence state (a failed batch left a gap in its sequence
#: numbers, or the broker forgot its producer id): the shared producer is replaced
#: (kafka/lease.py ProducerBroken), a task's transactional one closed with its task.
MEMBERSHIP_LOST: tuple[type[BaseException], ...] = (
    LeaseExpired,
    ProducerBroken,
    OutOfOrderSequenceNumber,
    UnknownProducerId,
    CommitFailedError,
    IllegalGenerationError,
    UnknownMemberIdError,
    RebalanceInProgressError,
    ProducerFenced,
    InvalidProducerEpoch,
    *BROKER_AWAY,
)


def membership_lost(exc: BaseException) -> bool:
    """``exc`` is one of :data:`MEMBERSHIP_LOST`, or a bare ``KafkaError`` that one of them
    caused: aiokafka's transactional sender dies of a connection lost while it looks up a
    coordinator (``_find_coordinator`` wraps it) and every waiter then gets "Unexpected error
    during batch delivery". The task's producer is unusable; dropping the task closes it, and
    the next owner starts a fresh one (seen in CI: a broker stopped during an offset commit
    ended an exactly-once worker)."""
    if isinstance(exc, MEMBERSHIP_LOST):
        return True
    seen: set[int] = set()
    cause: BaseException | None = exc
    while isinstance(cause, KafkaError) and id(cause) not in seen:
        seen.add(id(cause))
        cause = cause.__cause__
        if isinstance(cause, MEMBERSHIP_LOST):
            return True
    return False


class RunnerOwner(Protocol):
    """What a stage runner uses of its worker (the worker's shared clients and factories); a
    protocol, so that this module does not import the worker that imports it."""

    job: Job
    settings: Settings
    worker_id: str
    clock: Callable[[], float]
    error_policy: ErrorPolicy
    layout: TopicLayout | None
    admin: AIOKafkaAdminClient | None
    metrics: WorkerMetrics
    shared_producer: AIOKafkaProducer | None
    producer_guard: ProducerGuard | None

    @property
    def stopping(self) -> bool: ...

    async def until_stopping(self) -> None: ...

    def partition_counts(self) -> dict[str, int]: ...

    def open_store(self, operator_id: str, partition: int) -> OperatorStateStore: ...

    async def replace_tripped_producer(self) -> None: ...


class StageRunner(ConsumerRebalanceListener):  # type: ignore[misc]
    """One stage of the job in this worker: its group membership, tasks and loop."""

    def __init__(self, worker: RunnerOwner, stage: Stage) -> None:
        self.worker = worker
        self.stage = stage
        self.job = worker.job
        s = worker.settings
        self.group_id = self.job.group_id(stage)
        self.consumer = clients.group_consumer(
            s, self.group_id, client_id=f"{s.client_id}-{stage.name}"
        )
        self.lease = MembershipLease(
            self.group_id,
            session_timeout_ms=s.session_timeout_ms,
            rebalance_timeout_ms=s.rebalance_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
        )
        self.restore_consumer = clients.reader(s, client_id=f"{s.client_id}-{stage.name}-restore")
        self.committer = Committer(
            self.job,
            exactly_once=s.exactly_once,
            consumer=self.consumer,
            worker_id=worker.worker_id,
            lease=self.lease,
        )
        self.observe_commit = worker.metrics.checkpoint_committed
        self.tasks: dict[int, TaskIO] = {}
        self.suspended: dict[int, TaskIO] = {}
        self.restoring: dict[int, TaskIO] = {}
        #: shutting down: a rebalance until the consumer stops takes nothing over
        self.stopping = False
        self.restore_targets: list[RestoreTarget] = []  #: of the restore under way (metrics)
        self._restore_job: asyncio.Task[None] | None = None
        self.restore_error: BaseException | None = None
        #: a stop-with-savepoint is draining the job: a source stage reads no more input
        #: (runtime/kafka/control.py); its tasks still checkpoint, on the clock
        self.draining = False
        #: a savepoint is under way: every task commits every checkpoint and sends its barriers
        #: to every partition (StageTask.full_rounds), whatever the stage
        self.full_rounds = False
        self.lock = asyncio.Lock()
        layout = worker.layout
        assert layout is not None
        #: assembly, restore, claim, open, feed: the code every driver shares
        self.host = StageHost(
            self.job,
            stage,
            layout,
            exactly_once=s.exactly_once,
            checkpoint_interval_ms=s.checkpoint_interval_ms,
            alignment_timeout_s=s.alignment_timeout_s,
            error_policy=worker.error_policy,
            first_round_delay_s=first_round_delay(
                exactly_once=s.exactly_once,
                downstream_partitions=layout.downstream_partitions(stage),
                heartbeat_interval_ms=s.heartbeat_interval_ms,
            ),
            clock=worker.clock,
            open_store=worker.open_store,
            hop_format=s.hop_format,
        )
        self.stateful = self.host.stateful

    def ready(self) -> bool:
        """No task of this stage is being taken over (producers, restore)."""
        return not self.restoring and not self.taking_over()

    def taking_over(self) -> bool:
        """A take-over job is under way (it may not have restoring tasks yet)."""
        job = self._restore_job
        return job is not None and not job.done()

    def snapshot(self) -> StageSnapshot:
        """This stage's tasks by state, with restore progress (for metrics and status)."""
        restoring = self.restoring
        return StageSnapshot(
            self.stage.name,
            {p: io.task.counters for p, io in list(self.tasks.items())},
            sorted(restoring),
            sorted(self.suspended),
            [
                RestoreProgress(t.partition, t.topic, t.applied, max(0, t.end - (t.start or 0)))
                for t in list(self.restore_targets)
                if t.partition in restoring
            ],
            self.lease.member_id,
        )

    def input_tps(self, partition: int) -> list[TopicPartition]:
        return [TopicPartition(t, partition) for t in self.stage.source.topics]

    async def start(self) -> None:
        await self.restore_consumer.start()
        await self.consumer.start()
        self.lease.attach(self.consumer)
        self.consumer.subscribe(list(self.stage.source.topics), listener=self)

    # -- the loop ------------------------------------------------------------------------------
    async def _poll(self, max_records: int) -> dict[TopicPartition, list[Any]]:
        """``getmany``, given up when the worker stops.

        aiokafka's ``getmany`` waits, whatever its timeout, until a rebalance in progress ends
        (its fetcher awaits the new assignment), and a join lasts until every member of the
        group rejoined: up to the session timeout when a kill -9'd member is still in it. A
        SIGTERM then waited for the join, and the tasks the join brought were taken over
        (producers started, state restored) only to be closed again. While a reassignment is
        under way the poll races the worker's stop; otherwise it is the plain call (no task
        per poll on the hot path)."""
        consumer = self.consumer
        if not clients.rebalancing(consumer):
            batches: dict[TopicPartition, list[Any]] = await consumer.getmany(
                timeout_ms=100, max_records=max_records
            )
            return batches
        fetch: asyncio.Future[dict[TopicPartition, list[Any]]] = asyncio.ensure_future(
            consumer.getmany(timeout_ms=100, max_records=max_records)
        )
        stop = asyncio.ensure_future(self.worker.until_stopping())
        try:
            await asyncio.wait((fetch, stop), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            fetch.cancel()
            raise
        finally:
            stop.cancel()
        if fetch.done():
            return fetch.result()
        fetch.cancel()  # (a poll given up mutates nothing: it awaited the assignment)
        return {}

    async def loop(self) -> None:
        s = self.worker.settings
        while not self.worker.stopping:
            if self.restore_error is not None:
                failed, self.restore_error = self.restore_error, None
                if not membership_lost(failed):
                    raise failed
                await self.abandon(failed)
                continue
            try:
                batches = await self._poll(s.max_poll_records)
                started = time.perf_counter()
                async with self.lock:
                    for tp, records in batches.items():
                        io = self.tasks.get(tp.partition)
                        if io is None:
                            continue  # revoked meanwhile: the new owner reads them again
                        await self.host.feed(io, records, self.committer, self.observe_commit)
                    now = self.worker.clock()
                    for io in list(self.tasks.values()):
                        await self.host.settle(io, self.committer, now, self.observe_commit)
                    await self._send_outputs()
                    for io in list(self.tasks.values()):
                        if io.foreign:
                            await self._rewrite_foreign(io)
            except (*MEMBERSHIP_LOST, KafkaError) as exc:
                if not membership_lost(exc):
                    raise  # any other Kafka error ends the worker
                await self.abandon(exc)
                continue
            except StateTooLargeError as exc:
                if not exc.retry:
                    raise
                # A state value too large for its changelog, found at a checkpoint; its key
                # is watched now. Run the records since the last checkpoint again, checked,
                # so that the error policy meets the one that made it too large. Dropping
                # and rejoining is the one tested path that restores tasks at their last
                # checkpoint (under exactly-once their open transactions are aborted).
                await self.abandon(exc)
                continue
            if batches:
                self.worker.metrics.batch_processed(self.stage.name, started, batches)

    async def abandon(self, cause: BaseException) -> None:
        """This member may have lost its tasks: drop them without a checkpoint, and rejoin.

        Nothing of theirs past the last committed checkpoint is kept: whoever owns them next
        (this worker again, after the rejoin, or another) restores them from the changelog.
        """
        log.warning(
            "stage %s: %s: %s. Dropping task(s) %s without a checkpoint and rejoining the group",
            self.stage.name,
            type(cause).__name__,
            cause,
            sorted(self.tasks) or "none",
        )
        self.lease.expire()
        await self._drop_all()
        assigned = list(self.consumer.assignment())
        if assigned:
            self.consumer.pause(*assigned)
        self.lease.request_rejoin()
        guard = self.worker.producer_guard
        if guard is not None and guard.tripped is not None:
            await self.worker.replace_tripped_producer()

    async def _rewrite_foreign(self, io: TaskIO) -> None:
        """Another writer (a zombie) wrote into this task's changelog between two of its
        checkpoints: rewrite those keys with this task's values at the next checkpoint, so that
        compaction never keeps the zombie's record as the last of its key (see
        :mod:`headrace.runtime.checkpoint.fencing`). Rare: it opens its own reader."""
        ranges, io.foreign = io.foreign, []
        s = self.worker.settings
        reader = clients.reader(
            s, client_id=f"{s.client_id}-{self.stage.name}-fence", committed_only=False
        )
        await reader.start()
        try:
            for op, start, end in ranges:
                topic = io.changelog_topics[op]
                keys = await read_keys(reader, TopicPartition(topic, io.task.partition), start, end)
                log.warning(
                    "%s[%d]: offsets %d..%d were written by another worker (a zombie whose "
                    "session had expired); rewriting its %d key(s) with this task's values",
                    topic,
                    io.task.partition,
                    start,
                    end - 1,
                    len(keys),
                )
                io.task.stores[op].force_dirty(keys)
        finally:
            await clients.stop_consumer(reader)

    async def _send_outputs(self) -> None:
        for io in list(self.tasks.values()):
            if io.task.out:
                self.lease.check(f"outputs of task {io.name}")
                records = io.task.take_outputs()
                io.task.counters.records_out += len(records)
                io.unacked += await io.sender.send(records)

    # -- rebalance -------------------------------------------------------------------------------
    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        started = time.monotonic()
        await self._cancel_restore()
        async with self.lock:
            leaving = [
                (p, io)
                for p in sorted({tp.partition for tp in revoked})
                if (io := self.tasks.pop(p, None)) is not None
            ]
            # Under exactly-once each task commits through its own transactional producer: all
            # at once. One after the other, 128 tasks took longer than the rebalance timeout,
            # the coordinator expelled the worker, the new owner fenced the rest of its final
            # checkpoints and the join took 28 s at 256 partitions (bench/scale.py).
            try:
                if self.worker.settings.exactly_once:
                    lost = await asyncio.gather(*(self._leave(p, io) for p, io in leaving))
                else:  # one shared producer and consumer: in order
                    lost = [await self._leave(p, io) for p, io in leaving]
            except BaseException:
                # Cancelled half-way (the worker stops while a rebalance takes its final
                # checkpoints): the leaving tasks are in neither ``tasks`` nor ``suspended``,
                # so nothing else would close them. Their producers, transactions open, were
                # left to the garbage collector ("Unclosed AIOKafkaProducer" for all 86 tasks
                # of a worker stopped during a revocation, bench/scale.py). Not resumable:
                # their final checkpoints may not have been written.
                for p, io in leaving:
                    if self.suspended.get(p) is io:
                        del self.suspended[p]
                    await self._close(io, abort=True)
                raise
        _log_lost_checkpoints(
            [(io.name, exc) for (_, io), exc in zip(leaving, lost, strict=True) if exc]
        )
        if leaving:  # the group waits for this (up to the rebalance timeout)
            log.info(
                "stage %s: %d task(s) revoked, final checkpoints taken in %.2fs",
                self.stage.name,
                len(leaving),
                time.monotonic() - started,
            )

    async def _leave(self, p: int, io: TaskIO) -> BaseException | None:
        """A revoked task's final checkpoint; the task is then suspended (its state may be
        resumed if the partition comes back) or, if the checkpoint failed, dropped. Returns
        the membership error that kept its checkpoint from being written (logged by the
        caller, once for all tasks)."""
        try:
            final = io.task.final_checkpoint()
            await commit_checkpoint(io, self.committer, final, self.observe_commit)
        except MEMBERSHIP_LOST as exc:
            log.debug("no final checkpoint for task %s: %r", io.name, exc)
            await self._close(io, abort=True)
            return exc
        except Exception:
            log.exception("final checkpoint of task %s failed; dropping it", io.name)
            await self._close(io, abort=True)
            return None
        # The final checkpoint released nothing: the suspended state is exactly the committed
        # one, and a resume rewinds the input cut to it (skip list included).
        self.suspended[p] = io
        return None

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        # aiokafka logs and swallows what a rebalance listener raises, and keeps the
        # assignment: the partitions would stay assigned, paused and without a task, and the
        # stage would stall without a word (a claim that meets an expired lease did exactly
        # that). So nothing escapes this callback: the loop gets the failure, drops what was
        # half taken over and rejoins (membership lost, broker away), or fails the worker.
        #
        # The takeover itself (transactional producers, committed offsets, resumes, restores)
        # runs as a job of its own, after this callback returned: aiokafka stops the member's
        # heartbeats before it rejoins and starts them again only once this callback is done.
        # A takeover inside it that took longer than the session timeout (320 tasks' producers
        # initialised on a broker busy creating ~1,000 partitions: 17 s, bench/scale.py at 256
        # partitions) got the member expelled, the group rebalanced again, and the next member
        # to take over did the same: four workers took 14-52 s to run every task. The
        # partitions stay paused until their task runs, exactly as during a restore; a
        # revocation cancels the job (``_cancel_restore``) as it cancels a restore.
        self.lease.joined()
        if assigned:
            self.consumer.pause(*assigned)
        if self.stopping:  # the partitions stay paused; the member leaves in a moment
            return
        try:
            await self._cancel_restore()  # (the revocation did, unless nothing was revoked)
        except Exception as exc:  # handed to the loop, see above
            self.restore_error = exc
            return
        self._restore_job = asyncio.create_task(
            self._take_over(sorted({tp.partition for tp in assigned}))
        )
        self._restore_job.add_done_callback(self._restore_done)

    def _check_source_growth(self, partitions: list[int]) -> None:
        """Partitions added to the source while the job runs: new tasks for a stateless first
        stage (downstream alignment takes the new channels in); a stateful first stage stops
        the worker with the procedure (topics.SOURCE_GREW): its keys would move away from
        their state."""
        layout = self.worker.layout
        if self.stage.source.internal or not self.host.stateful or layout is None:
            return
        known = layout.partitions_of(self.stage)
        if any(p >= known for p in partitions):
            topics = ", ".join(self.host.changelog_topics.values())
            raise TopicConfigError(SOURCE_GREW.format(job=self.worker.job.name, topics=topics))

    async def _take_over(self, partitions: list[int]) -> None:
        """Resume or restore the tasks of newly assigned partitions.

        A suspended task stays in ``self.suspended`` until it is resumed or closed, so that a
        failure half-way leaves nothing open that :meth:`abandon` does not close.
        """
        self._check_source_growth(partitions)
        started = time.monotonic()
        # Exactly-once: initialise each task's transactional producer *before* reading the
        # committed offsets. InitProducerId returns only once the previous owner's transaction
        # is complete, and offsets committed in a transaction become visible only then (the
        # offset fetch does not wait for pending transactional offsets).
        producers: dict[int, AIOKafkaProducer] = {}
        fresh: list[int] = []
        if self.worker.settings.exactly_once:
            replaced: list[AIOKafkaProducer] = []
            for p in partitions:
                old = self.suspended.get(p)
                if old is not None and old.producer is not None and not self._keeps_producer(old):
                    replaced.append(old.producer)
                    old.producer = None
                if old is None or old.producer is None:
                    fresh.append(p)
            # All at once: one after the other, 80 stops took seconds of the takeover.
            await asyncio.gather(*map(clients.stop_producer, replaced))
            producers = await clients.start_producers(self._transactional_producer, fresh)
        producers_s = time.monotonic() - started
        try:
            await self._resume_or_restore(partitions, producers)
        except BaseException:
            owned = [*self.tasks.values(), *self.restoring.values()]
            for producer in producers.values():  # closing a task stops its producer
                if not any(io.producer is producer for io in owned):
                    await clients.stop_producer(producer)
            raise
        log.info(
            "stage %s: took over %d task(s) in %.2fs (%d transactional producer(s) started "
            "in %.2fs, %d kept from the last generation)",
            self.stage.name,
            len(partitions),
            time.monotonic() - started,
            len(fresh),
            producers_s,
            len(partitions) - len(fresh) if self.worker.settings.exactly_once else 0,
        )

    def _keeps_producer(self, io: TaskIO) -> bool:
        """A suspended task coming back keeps its transactional producer (no stop, no
        ``InitProducerId``) when it ran in the generation right before this one.

        Every eager rebalance revokes every task, and a start or a join at 256 partitions goes
        through several generations; most tasks come back to the member that had them, and each
        used to stop its producer and initialise a new one (a round trip to the transaction
        coordinator and a write to ``__transaction_state`` each, on a broker busy creating the
        job's partitions; bench/README.md, eighth round). Fencing does not depend on it:
        Kafka fences whichever producer of a transactional id was initialised first, so a
        kept producer that somebody else's initialisation overtook fails its next commit with
        ``ProducerFenced`` and the worker drops its tasks and rejoins, as with a fresh one.
        Keeping it only into the *next* generation makes that as rare as it is for a fresh
        producer: nobody else was assigned the partition between the two, so nobody else had
        a reason to initialise its transactional id. Its transaction is the open, empty one
        begun after its last commit (an idle final checkpoint commits nothing and leaves it
        so), the state the takeover would otherwise put a fresh producer in.
        """
        producer = io.producer
        generation = self.lease.generation
        return (
            producer is not None
            and generation is not None
            and io.generation == generation - 1
            and clients.in_empty_transaction(producer)
        )

    async def _resume_or_restore(
        self, partitions: list[int], producers: dict[int, AIOKafkaProducer]
    ) -> None:
        committed = await self._committed(partitions)
        new: list[int] = []
        for p in partitions:
            io = self.suspended.get(p)
            if (
                io is not None
                and not io.closed  # closed by a shutdown while this takeover waited
                and await self._reusable(io, committed)
                and await self._claim_unchanged(io)
                and not io.closed
            ):
                await self._resume_suspended(io, producers.get(p))
                continue
            if io is not None:
                self.suspended.pop(p, None)
                await self._close(io)
            new.append(p)
        for io in list(self.suspended.values()):
            await self._close(io)
        self.suspended.clear()
        if self.worker.settings.exactly_once and (late := [p for p in new if p not in producers]):
            # Tasks whose kept producer went with their suspended state (somebody committed
            # meanwhile): a fresh producer each, and the committed offsets read again after
            # its initialisation, for the reason given in _take_over.
            producers.update(await clients.start_producers(self._transactional_producer, late))
            committed.update(await self._committed(late))
        if new:
            for p in new:
                self.restoring[p] = self._make_task(p, producers.get(p))
            await self._restore(new, committed)

    def _restore_done(self, job: asyncio.Task[None]) -> None:
        """The takeover job ended: its failure goes to the loop (which raises it, or drops
        the tasks and rejoins when the membership was lost)."""
        if not job.cancelled() and (failed := job.exception()) is not None:
            if not membership_lost(failed):
                log.error("taking over tasks of stage %s failed: %s", self.stage.name, failed)
            self.restore_error = failed

    def _use_producer(self, io: TaskIO, producer: AIOKafkaProducer) -> None:
        io.producer = producer
        io.sender = BatchSender(producer, self.worker.partition_counts())

    async def _committed(self, partitions: list[int]) -> dict[TopicPartition, Any]:
        admin = self.worker.admin
        assert admin is not None
        tps = [tp for p in partitions for tp in self.input_tps(p)]
        if not tps:
            return {}
        found = await admin.list_consumer_group_offsets(self.group_id, partitions=tps)
        return {tp: om for tp, om in found.items() if om is not None and om.offset >= 0}

    async def _reusable(self, io: TaskIO, committed: dict[TopicPartition, Any]) -> bool:
        """Nobody changed the committed checkpoint since this task's final one."""
        now = {
            (tp.topic, tp.partition): om.offset
            for tp, om in committed.items()
            if tp.partition == io.task.partition
        }
        if now != io.committed:
            return False
        if self.worker.settings.exactly_once:
            return True
        # at-least-once: another owner may have written changelog records it never committed
        tps = [TopicPartition(io.changelog_topics[op], io.task.partition) for op in self.stateful]
        if not tps:
            return True
        ends = await self.restore_consumer.end_offsets(tps)
        for op, tp in zip(self.stateful, tps, strict=True):
            last = io.changelog_last.get(op)
            if ends[tp] != (0 if last is None else last + 1):
                return False
        return True

    async def _claim(self, io: TaskIO, read_until: dict[str, int] | None = None) -> list[Gap]:
        return await self.host.claim(io, lease=self.lease, read_until=read_until)

    async def _claim_unchanged(self, io: TaskIO) -> bool:
        """Claim for a suspended task coming back; False if somebody wrote meanwhile."""
        if await self._claim(io):
            log.info("task %s: its changelog changed while it was suspended; restoring", io.name)
            return False
        return True

    async def _resume_suspended(self, io: TaskIO, producer: AIOKafkaProducer | None) -> None:
        """The task leaves ``suspended`` only after the await, right before it joins ``tasks``:
        a revocation that cancels the take-over here leaves it suspended (closed or resumed
        later), never in neither."""
        p = io.task.partition
        if producer is not None:
            # A fresh producer: another member may have initialised our transactional id
            # meanwhile (fencing the old one) without committing anything. (Without one, the
            # task kept its producer: _keeps_producer.)
            self._use_producer(io, producer)
            await producer.begin_transaction()
        if io.closed:  # a shutdown closed it during the await
            return
        io.generation = self.lease.generation
        self.suspended.pop(p, None)  # (pop: a shutdown may have cleared them all)
        io.task.rewind(io.committed, io.committed_skip, io.committed_quiet, io.committed_loud)
        for tp in self.input_tps(p):
            off = io.committed.get((tp.topic, tp.partition))
            if off is not None:
                self.consumer.seek(tp, off)
        self.tasks[p] = io
        self._resume_input(p)
        log.info("task %s resumed with its in-memory state", io.name)

    def _resume_input(self, p: int) -> None:
        if not (self.draining and not self.stage.source.internal):
            self.consumer.resume(*self.input_tps(p))

    def drain(self) -> None:
        """Stop reading the job's input (a source stage; other stages go on until their input
        is consumed): the first step of a stop-with-savepoint. Every stage's tasks commit
        every checkpoint from now on, with full barrier rounds, so that the savepoint command
        sees a complete, aligned cut after the pause (an idle task would commit nothing)."""
        self._set_full_rounds(True)
        if self.draining or self.stage.source.internal:
            return
        self.draining = True
        assigned = list(self.consumer.assignment())
        if assigned:
            self.consumer.pause(*assigned)
        log.info("stage %s: draining: input paused for a stop-with-savepoint", self.stage.name)

    def undrain(self) -> None:
        """The savepoint was taken and the job goes on: read input again."""
        self._set_full_rounds(False)
        if not self.draining:
            return
        self.draining = False
        for p in list(self.tasks):
            self._resume_input(p)
        log.info("stage %s: input resumed after the savepoint", self.stage.name)

    def _set_full_rounds(self, on: bool) -> None:
        self.full_rounds = on
        for io in [*self.tasks.values(), *self.restoring.values(), *self.suspended.values()]:
            io.task.full_rounds = on

    def _make_task(self, partition: int, producer: AIOKafkaProducer | None) -> TaskIO:
        """A task and its I/O; ``producer`` is its own transactional one, else the shared one."""
        sending = producer or self.worker.shared_producer
        assert sending is not None
        io = self.host.create(
            partition, BatchSender(sending, self.worker.partition_counts()), producer
        )
        io.task.full_rounds = self.full_rounds
        return io

    def _transactional_producer(self, partition: int) -> AIOKafkaProducer:
        """The task's own producer; its start (init_transactions) fences a zombie owner and
        aborts that owner's open transaction."""
        s = self.worker.settings
        return clients.producer(
            s,
            client_id=f"{s.client_id}-{self.stage.name}-{partition}",
            transactional_id=self.job.transactional_id(self.stage, partition),
        )

    async def _restore(self, partitions: list[int], committed: dict[TopicPartition, Any]) -> None:
        started = time.monotonic()
        s = self.worker.settings
        found = {(tp.topic, tp.partition): (om.offset, om.metadata) for tp, om in committed.items()}
        starts = {p: self.host.start_point(p, found) for p in partitions}

        def progress(t: RestoreTarget) -> None:
            log.info(
                "restoring %s[%d]: %d/%d records",
                t.topic,
                t.partition,
                t.applied,
                max(0, t.end - (t.start or 0)),
            )

        def exported(targets: list[RestoreTarget]) -> None:
            self.restore_targets = targets

        read_until = await self.host.restore(
            self.restore_consumer,
            [(self.restoring[p], starts[p]) for p in partitions],
            batch_size=s.restore_batch_size,
            progress=progress,
            on_targets=exported,
        )
        for p in partitions:
            io = self.restoring[p]
            for op, start, end in await self._claim(io, read_until[p]):
                # Written after our restore read the partition and before our claim: by an
                # owner that has since lost the task (it cannot have committed offsets after
                # this rebalance), so not state. Its keys get their restored values again.
                tp = TopicPartition(io.changelog_topics[op], p)
                keys = await read_keys(self.restore_consumer, tp, start, end)
                log.warning(
                    "%s[%d]: %d record(s) at offsets %d..%d landed during the restore from a "
                    "worker that lost the task; rewriting their keys",
                    tp.topic,
                    p,
                    end - start,
                    start,
                    end - 1,
                )
                io.task.stores[op].force_dirty(keys)
        async with self.lock:
            await self._install(partitions, starts)
        log.info(
            "stage %s: restored task(s) %s in %.2fs",
            self.stage.name,
            partitions,
            time.monotonic() - started,
        )

    async def _install(self, partitions: list[int], starts: dict[int, StartPoint]) -> None:
        """Restored tasks start: open their operators, seek their inputs, resume them.

        Inputs without a committed offset are sought to the beginning in ONE call for all
        tasks: aiokafka's ``seek_to_beginning`` waits for its fetcher to perform the reset,
        up to a fetch wait (~0.5 s) each, and one call per task made 64 tasks take 33 s to
        start (bench/scale.py, issue 18).
        """
        beginning: list[TopicPartition] = []
        for p in partitions:
            # A task leaves ``restoring`` only once it is in ``tasks``: a revocation that
            # cancels the take-over at the await below closes it with the other restoring
            # ones (popped before, it was in neither, and nothing closed its stores).
            io = self.restoring[p]
            self.host.open(io, starts[p])
            if io.producer is not None:
                await io.producer.begin_transaction()
            del self.restoring[p]
            io.generation = self.lease.generation
            for tp in self.input_tps(p):
                offset = starts[p].positions.get((tp.topic, tp.partition))
                if offset is not None:
                    self.consumer.seek(tp, offset)
                else:
                    beginning.append(tp)
            self.tasks[p] = io
        if beginning:
            await self.consumer.seek_to_beginning(*beginning)
        for p in partitions:
            self._resume_input(p)

    async def _cancel_restore(self) -> None:
        """Stop a restore under way and close its tasks. A restore that already failed for a
        reason other than lost membership re-raises here (the loop raises it too)."""
        job, self._restore_job = self._restore_job, None
        failed: BaseException | None = None
        if job is not None and not job.done():
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job
        elif job is not None and not job.cancelled():
            failed = job.exception()
        for io in list(self.restoring.values()):
            await self._close(io, abort=True)
        self.restoring.clear()
        if failed is not None and not membership_lost(failed):
            raise failed

    async def _close(self, io: TaskIO, *, abort: bool = False) -> None:
        if io.closed:
            return
        io.closed = True
        abandon(io.unacked)  # outputs never acknowledged: nobody waits for them now
        io.unacked = []
        if abort and io.producer is not None:
            with contextlib.suppress(Exception):
                await io.producer.abort_transaction()
        with contextlib.suppress(Exception):
            io.task.close()
        for store in io.task.stores.values():
            store.backend.close()
        if io.producer is not None:
            await clients.stop_producer(io.producer)

    async def shutdown(self, *, final_checkpoint: bool) -> None:
        self.stopping = True
        try:
            await self._cancel_restore()
        except Exception as exc:  # the loop raised it already; the clients must still close
            log.debug("stage %s: the failed restore: %r", self.stage.name, exc)
        try:
            await self._close_all(final_checkpoint=final_checkpoint)
        finally:
            # Whatever failed above, the group must see this member leave (a worker that
            # exits without it would block `headrace reset` and delay the rebalance).
            await clients.stop_consumer(self.consumer)
            await clients.stop_consumer(self.restore_consumer)
            # The group kept rebalancing until the consumer stopped: a takeover that started
            # after the first look (final checkpoints of many tasks take seconds) left tasks
            # restoring, with their transactional producers, that nothing would close
            # ("Unclosed AIOKafkaProducer" x 64-117 per worker stopped at 256 partitions).
            await self._drop_all()

    async def _drop_all(self) -> None:
        """Close every task, restoring, running or suspended, without a checkpoint (open
        transactions aborted)."""
        with contextlib.suppress(Exception):
            await self._cancel_restore()
        async with self.lock:
            for io in [*self.tasks.values(), *self.suspended.values()]:
                await self._close(io, abort=True)
            self.tasks.clear()
            self.suspended.clear()

    async def _close_all(self, *, final_checkpoint: bool) -> None:
        async with self.lock:
            if final_checkpoint:
                # Once, before any task closes: a final checkpoint can release held records
                # whose outputs must not go through another task's closed producer.
                try:
                    await self._send_outputs()
                except Exception:
                    log.exception("sending outputs before the final checkpoints failed")
            lost: list[tuple[str, BaseException]] = []
            for io in list(self.tasks.values()):
                abort = not final_checkpoint  # a task closed without a checkpoint aborts
                if final_checkpoint:
                    try:
                        await commit_checkpoint(
                            io, self.committer, io.task.final_checkpoint(), self.observe_commit
                        )
                    except MEMBERSHIP_LOST as exc:
                        lost.append((io.name, exc))
                        abort = True
                    except Exception:
                        log.exception("final checkpoint of %s failed", io.name)
                        abort = True
                await self._close(io, abort=abort)
            _log_lost_checkpoints(lost)
            self.tasks.clear()
            # A snapshot: a takeover under way (the group keeps rebalancing until the consumer
            # stops) resumes or drops suspended tasks meanwhile; iterating the dict itself
            # failed the worker at SIGTERM with "dictionary changed size during iteration"
            # (bench/scale.py at 256 partitions, several runs).
            for io in list(self.suspended.values()):
                await self._close(io)
            self.suspended.clear()


def _log_lost_checkpoints(lost: list[tuple[str, BaseException]]) -> None:
    """One WARNING per kind of lost membership for the tasks whose final checkpoints it kept
    from being written (a member that lost its place loses all of them: 73-86 ERROR lines
    with a traceback each per worker before, bench/scale.py), the first message as example.
    Those tasks restore from their last committed checkpoint wherever they run next."""
    by_kind: dict[str, list[tuple[str, BaseException]]] = {}
    for name, exc in lost:
        by_kind.setdefault(type(exc).__name__, []).append((name, exc))
    for kind, tasks in by_kind.items():
        log.warning(
            "no final checkpoint for %d task(s) %s (%s: %s); dropping them",
            len(tasks),
            ", ".join(name for name, _ in tasks),
            kind,
            tasks[0][1],
        )
