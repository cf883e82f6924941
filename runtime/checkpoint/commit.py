"""Committing a task's checkpoint: the one place where durability is decided.

A :class:`~headrace.runtime.checkpoint.pending.PendingCheckpoint` was captured synchronously at
the cut (state changes, outputs before the cut, input offsets and skip list, barrier records).
Committing it means making all of that durable *together*, so that a crash at any instant leaves
either the previous checkpoint or this one — never a mix (ARCHITECTURE.md section 5.5):

exactly_once
    Every task has its own transactional producer (``transactional.id`` =
    ``<job>.<stage>.<partition>``): when the task moves, the new owner's ``init_transactions``
    fences the old one and aborts its open transaction. Outputs, changelog writes, barrier
    records, the checkpoint-log ack and the input offsets (``send_offsets_to_transaction``, with
    the checkpoint metadata) go into one transaction per checkpoint. Readers use
    ``read_committed``, so aborted changelog writes are invisible on restore.

at_least_once
    One shared idempotent producer. Outputs, changelog writes and barriers are sent and their
    delivery acknowledged, *then* the offsets are committed with the checkpoint metadata. A crash
    between the two leaves changelog writes of a checkpoint that never committed: the metadata's
    ``cl`` (the changelog offset of the last committed write) lets restore tell them apart; the
    restoring task rewrites those keys with their committed values at its next checkpoint
    (:meth:`OperatorStateStore.force_dirty`), so stale writes never become "valid" later.

Before it writes anything, a commit checks the member's write lease
(:mod:`headrace.runtime.kafka.lease`): a worker that may have been expelled from its group
writes nothing and rejoins. Under at-least-once every changelog record carries the owner's
writer epoch, and a gap in the offsets its own writes are given means somebody else (a zombie)
wrote into the partition; the task reads and rewrites those keys
(:mod:`headrace.runtime.checkpoint.fencing`).

Only after the commit does the task write the changes into its local backend, recording the
changelog offset in the same write batch: a local RocksDB store therefore never holds
uncommitted state, and a restart replays only the changelog tail past that offset.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from operator import itemgetter
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from headrace.operators.job import Job
from headrace.runtime.checkpoint.log import CheckpointAck
from headrace.runtime.checkpoint.metadata import METADATA_LIMIT, CheckpointMetadata
from headrace.runtime.checkpoint.pending import CommitResult, PendingCheckpoint
from headrace.runtime.faults import maybe_crash
from headrace.runtime.kafka.lease import MembershipLease
from headrace.runtime.kafka.producer import (
    BatchSender,
    Delivery,
    OutRecord,
    abandon,
    first_gap,
    last_offset,
    wait_delivered,
)

log = logging.getLogger(__name__)
_key_of, _value_of = itemgetter(0), itemgetter(1)


class CommitTarget(Protocol):
    """The per-task bookkeeping a commit reads and updates (the host's ``TaskIO`` is one).

    The committer never sees the task itself: it gets what the task prepared (a
    :class:`PendingCheckpoint`) and returns a :class:`CommitResult`; the caller applies it."""

    @property
    def name(self) -> str: ...
    @property
    def stage_name(self) -> str: ...
    @property
    def partition(self) -> int: ...

    sender: BatchSender
    group_id: str
    changelog_topics: dict[str, str]
    changelog_last: dict[str, int | None]
    unacked: list[Delivery]
    committed: dict[tuple[str, int], int]
    committed_skip: dict[int, int]
    committed_quiet: dict[int, int | None]
    committed_loud: frozenset[int] | None
    producer: AIOKafkaProducer | None
    epoch_headers: list[tuple[str, bytes]] | None
    foreign: list[tuple[str, int, int]]
    #: the stage's cuts topic (None: a source stage, whose metadata stays small)
    cuts_topic: str | None
    #: keys of spilled checkpoint documents an earlier checkpoint wrote, to delete
    spilled: list[bytes]


class Committer:
    """Carries out checkpoints under one processing guarantee."""

    def __init__(
        self,
        job: Job,
        *,
        exactly_once: bool,
        consumer: AIOKafkaConsumer,
        worker_id: str,
        lease: MembershipLease | None = None,
    ) -> None:
        self.job = job
        self.lease = lease  #: checked before every write (None: in-process driver)
        self.exactly_once = exactly_once
        self.consumer = consumer
        self.worker_id = worker_id
        #: called at each phase of a commit; kills the process when fault injection is on
        self.fault: Callable[[str], None] = maybe_crash

    async def commit(self, io: CommitTarget, pending: PendingCheckpoint) -> CommitResult:
        """Make ``pending`` durable for ``io``'s task, or raise (nothing of it is then taken as
        state). The caller applies the result to the task (its local stores)."""
        if self.lease is not None:
            self.lease.check(f"checkpoint {pending.checkpoint_id} of task {io.name}")
        deliveries = io.unacked
        io.unacked = []
        changelog: dict[str, list[Delivery]] = {}
        try:
            return await self._commit(io, pending, deliveries, changelog)
        except BaseException:
            # Every batch this commit sent, awaited or not, is abandoned with the commit: when
            # one fails (a fenced producer, an expired lease) the others fail with it, and
            # asyncio logged "Future exception was never retrieved" with a traceback for each
            # one nobody awaited any more (the ack's under exactly-once, the outputs' and
            # barriers' when a changelog delivery failed first: seen in bench/scale.py's logs
            # during revocations at 256 partitions).
            abandon([*deliveries, *(d for batches in changelog.values() for d in batches)])
            raise

    async def _commit(
        self,
        io: CommitTarget,
        pending: PendingCheckpoint,
        deliveries: list[Delivery],
        changelog: dict[str, list[Delivery]],
    ) -> CommitResult:
        """:meth:`commit`'s steps; ``deliveries`` and ``changelog`` collect what it sends."""
        started = time.perf_counter()
        sender = io.sender
        deliveries += await sender.send(pending.outputs)
        changed = size = 0
        for op_id, changes in pending.changes.items():
            if changes:
                changed += len(changes)
                size += sum(map(len, map(_key_of, changes)))  # C loops: every change, every
                size += sum(map(len, filter(None, map(_value_of, changes))))  # checkpoint
                topic = io.changelog_topics[op_id]
                changelog[op_id] = await sender.send_pairs(
                    topic, io.partition, changes, io.epoch_headers
                )
        deliveries += await sender.send(pending.barriers)
        for op_id, d in changelog.items():
            previous = io.changelog_last.get(op_id)
            if io.epoch_headers is not None and previous is not None:
                gap = await first_gap(d, previous + 1)
                if gap is not None:
                    io.foreign.append((op_id, *gap))
            io.changelog_last[op_id] = await last_offset(d)
        await wait_delivered(deliveries)
        self.fault("after-changelog")

        metadata = await self._metadata(io, pending)
        offsets: dict[TopicPartition, Any] = {
            TopicPartition(t, p): OffsetAndMetadata(o, metadata)
            for (t, p), o in pending.offsets.items()
        }
        ack = self._ack(io, pending, started, changed)
        if self.exactly_once:
            producer = io.producer
            assert producer is not None
            deliveries += await sender.send([ack])  # delivered by the commit (or abandoned)
            if offsets:
                await producer.send_offsets_to_transaction(offsets, io.group_id)
            self.fault("before-commit")
            await producer.commit_transaction()
            self.fault("after-commit")
            await producer.begin_transaction()
        else:
            self.fault("before-commit")
            if offsets:
                await self.consumer.commit(offsets)
            self.fault("after-commit")
            io.unacked += await sender.send([ack])
        io.committed = dict(pending.offsets)
        io.committed_skip = dict(pending.skip)
        io.committed_quiet = dict(pending.quiet)
        io.committed_loud = pending.loud if self.exactly_once else None
        seconds = time.perf_counter() - started
        log.debug(
            "task %s committed checkpoint %d (%d changed keys, %.1f ms%s)",
            io.name,
            pending.checkpoint_id,
            changed,
            seconds * 1000,
            "" if pending.aligned else ", unaligned",
        )
        return CommitResult(
            stage=io.stage_name,
            partition=io.partition,
            checkpoint_id=pending.checkpoint_id,
            changelog_offsets=dict(io.changelog_last),
            changed_keys=changed,
            changed_bytes=size,
            outputs=len(pending.outputs),
            aligned=pending.aligned,
            final=pending.final,
            alignment_seconds=pending.alignment_seconds,
            seconds=seconds,
        )

    async def _metadata(self, io: CommitTarget, pending: PendingCheckpoint) -> str:
        """The offset metadata of ``pending``: its document, or a reference to where it was
        spilled (see :mod:`headrace.runtime.checkpoint.metadata`).

        Spilled documents are keyed per checkpoint, never overwritten: under compaction a
        newer record of the same key, written by a checkpoint that then failed to commit,
        would delete the committed one. So each document keeps its own key, and the keys of
        the ones this task wrote before are deleted (tombstones) in the checkpoint after the
        next commit, when a newer committed document exists. Both writes go through the
        task's sender: inside the transaction under exactly-once, acknowledged before the
        offsets are committed under at-least-once.
        """
        sender = io.sender
        if io.spilled and io.cuts_topic is not None:
            garbage, io.spilled = io.spilled, io.spilled[-1:]  # keep the last committed one
            garbage = garbage[:-1]
            if garbage:  # acknowledged with the next checkpoint's outputs
                io.unacked += await sender.send_pairs(
                    io.cuts_topic, io.partition, [(k, None) for k in garbage]
                )
        document = CheckpointMetadata(
            pending.checkpoint_id,
            pending.skip,
            {op: off for op, off in io.changelog_last.items() if off is not None},
            pending.seen,
            watermark=pending.watermark,
            quiet=pending.quiet,
            loud=pending.loud if self.exactly_once else None,
        ).encode()
        if len(document) <= METADATA_LIMIT or io.cuts_topic is None:
            return document
        key = b"%d:%d:%d" % (io.partition, pending.checkpoint_id, time.time_ns())
        deliveries = await sender.send_pairs(
            io.cuts_topic, io.partition, [(key, document.encode())]
        )
        offset = await last_offset(deliveries)
        assert offset is not None
        io.spilled.append(key)
        return CheckpointMetadata.reference(pending.checkpoint_id, offset)

    def _ack(
        self, io: CommitTarget, pending: PendingCheckpoint, started: float, changed: int
    ) -> OutRecord:
        ack = CheckpointAck(
            job=self.job.name,
            stage=io.stage_name,
            partition=io.partition,
            checkpoint_id=pending.checkpoint_id,
            offsets={f"{t}/{p}": o for (t, p), o in pending.offsets.items()},
            changelog_offsets=dict(io.changelog_last),
            aligned=pending.aligned,
            final=pending.final,
            worker=self.worker_id,
            timestamp_ms=int(time.time() * 1000),
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
            alignment_ms=round(pending.alignment_seconds * 1000, 3),
            changed_keys=changed,
        )
        key, value = ack.encode()
        return (self.job.checkpoint_topic, 0, key, value, [], None)
