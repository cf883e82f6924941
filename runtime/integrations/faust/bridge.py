"""The faust side of the bridge: how faust hands records and partitions to the task host.

Everything a task goes through is the task host's (:mod:`headrace.runtime.host`): assembly,
the committed start, restore, claim, open, feed, checkpoints committed by the
:class:`~headrace.runtime.checkpoint.commit.Committer`. What is left here is faust glue:

* partitions arrive through faust's signals: ``on_rebalance_complete`` (awaited by faust before
  it seeks the stream partitions and resumes them) restores the new ones and moves faust's
  committed offsets to the checkpoint's, so faust resumes exactly where the state ends;
  ``on_partitions_revoked`` takes final checkpoints;
* records arrive one faust event at a time from ``stream.noack()``; an event is acked once a
  committed checkpoint covers it, so faust's own commits stay at or behind the bridge's;
* faust waits for every event to be acked before a rebalance or a shutdown goes on (and stops
  fetching meanwhile): a task fed by a hop then gets no barrier, so the checkpoint loop cuts it
  unaligned (as an alignment timeout would) and acks what it holds; the next owner resumes at
  the committed cut whatever faust committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from headrace.operators.job import ErrorPolicy
from headrace.runtime.checkpoint.commit import Committer
from headrace.runtime.checkpoint.pending import CommitResult
from headrace.runtime.checkpoint.restore import RestoreTarget, read_keys
from headrace.runtime.host import StageHost, StartPoint, TaskIO, commit_checkpoint
from headrace.runtime.integrations.faust.clients import (
    CheckpointGroup,
    FaustRecord,
    client_kwargs,
    stop_reader,
)
from headrace.runtime.integrations.faust.legacy import adopt_legacy_checkpoints
from headrace.runtime.integrations.faust.plan import BridgePlan, BridgeSpec, build_plan
from headrace.runtime.kafka.clients import PRODUCER_SETTINGS
from headrace.runtime.kafka.producer import BatchSender, abandon
from headrace.runtime.state.backend import open_backend
from headrace.runtime.state.keys import StatePartitionKey
from headrace.runtime.state.store import OperatorStateStore

try:
    from faust.types import TP
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "headrace.runtime.integrations.faust needs faust-streaming: pip install 'headrace[faust]'"
    ) from exc

log = logging.getLogger("headrace.runtime.integrations.faust")


@dataclass(slots=True)
class BridgeStats:
    """Counters of one bridge in this worker (logged at restores, now and then, at shutdown)."""

    processed: int = 0
    replayed_skipped: int = 0  #: records below the restored checkpoint, skipped
    hop_duplicates: int = 0  #: upstream replays dropped by headrace's ``hr.seq`` dedupe
    checkpoints: int = 0
    restores: int = 0
    restored_records: int = 0


class FaustBridge:
    """What :func:`~headrace.runtime.integrations.faust.headrace_agent` registers: one agent,
    its tasks (one per source partition) on a :class:`StageHost`, and their checkpoints.

    ``agent`` is the faust agent; ``stats`` counts what this worker did; ``checkpoint()`` can
    be awaited to checkpoint now (tests, shutdown hooks).
    """

    def __init__(
        self,
        app: Any,
        spec: BridgeSpec,
        *,
        checkpoint_interval: float,
        state_backend: str,
        state_dir: Path | None,
        replication_factor: int,
    ) -> None:
        self.app = app
        self.spec = spec
        self.name = spec.name
        self.topic_name = spec.source
        self.checkpoint_interval = checkpoint_interval
        self.state_backend = state_backend
        self.state_dir = state_dir
        self.replication_factor = replication_factor
        self.stats = BridgeStats()
        self.tasks: dict[int, TaskIO] = {}
        #: faust events fed to a task and not acked yet, per partition, in offset order
        self.events: dict[int, list[Any]] = {}
        #: after a restore outside faust's signal: the offset faust was sought to, per partition
        self._expect: dict[int, int] = {}
        self._lock = asyncio.Lock()  # feeding, checkpoints and rebalances, one at a time
        self._failed: BaseException | None = None
        self._stopped = False  # after the shutdown's final checkpoints: nothing is fed
        self._crash_task: asyncio.Future[Any] | None = None
        self._stream: Any = None
        self._closed = BridgeStats()  # counters of tasks already closed
        self.plan: BridgePlan | None = None
        self.host: StageHost | None = None
        self.committer: Committer | None = None
        self.sender: BatchSender | None = None
        self._clients: list[Any] = []
        self._reader: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self.agent: Any = None

    # -- start and stop ----------------------------------------------------------------------
    async def _start(self) -> StageHost:
        """Plan the stage, check and create its topics, start the clients (once)."""
        if self.host is not None:
            return self.host
        kw = client_kwargs(self.app)
        cid = f"{self.app.conf.id}-{self.name}-headrace"
        admin = AIOKafkaAdminClient(**kw, client_id=cid)
        await admin.start()
        self._admin = admin
        plan = await build_plan(
            self.app, self.spec, admin, replication_factor=self.replication_factor
        )
        producer = AIOKafkaProducer(**kw, client_id=cid, **PRODUCER_SETTINGS)
        group = CheckpointGroup(
            **kw,
            client_id=cid,
            group_id=plan.job.group_id(plan.stage),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        reader = AIOKafkaConsumer(
            **kw,
            client_id=f"{cid}-restore",
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_uncommitted",
        )
        for client in (producer, group, reader):
            await client.start()
            self._clients.append(client)
        self._reader = reader
        self.sender = BatchSender(producer, plan.partition_counts)
        self.committer = Committer(
            plan.job,
            exactly_once=False,
            consumer=group,
            worker_id=f"faust:{socket.gethostname()}:{os.getpid()}",
        )
        self.plan = plan
        self.host = StageHost(
            plan.job,
            plan.stage,
            plan.layout,
            exactly_once=False,
            checkpoint_interval_ms=max(1, int(self.checkpoint_interval * 1000)),
            open_store=self._open_store,
            clock=time.time,
            error_policy=ErrorPolicy.FAIL,
            # the reading bridge gets the hop's records from faust's consumer, not from
            # headrace's batch reader: a header on every record (kafka/hopformat.py)
            hop_format=1,
        )
        return self.host

    def _open_store(self, operator_id: str, partition: int) -> OperatorStateStore:
        path: Path | None = None
        if self.state_backend == "rocksdb":
            assert self.state_dir is not None
            path = self.state_dir / operator_id / str(partition)
            path.parent.mkdir(parents=True, exist_ok=True)
        backend = open_backend(self.state_backend, path)
        return OperatorStateStore(backend, StatePartitionKey(operator_id, partition, partition))

    async def _stop_clients(self) -> None:
        for client in reversed(self._clients):
            with contextlib.suppress(Exception):
                if client is self._reader:
                    await stop_reader(client, TopicPartition(self.topic_name, 0))
                else:
                    await client.stop()
        self._clients.clear()
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await self._admin.close()
            self._admin = None

    # -- faust's signals -----------------------------------------------------------------------
    async def _on_rebalance_complete(self, sender: Any = None, **_: Any) -> None:
        """faust awaits this before it seeks the stream partitions and resumes them."""
        if self._failed is not None:
            return
        assigned = {
            tp.partition for tp in self.app.consumer.assignment() if tp.topic == self.topic_name
        }
        async with self._lock:
            for p in [p for p in self.tasks if p not in assigned]:
                await self._close(p, final=True)
            new = sorted(p for p in assigned if p not in self.tasks)
            if new:
                await self._restore(new)

    async def _on_partitions_revoked(self, sender: Any = None, revoked: Any = (), **_: Any) -> None:
        """faust sends this after ``stream_wait_empty``; checkpoint what is left, then stop."""
        mine = [tp.partition for tp in revoked if tp.topic == self.topic_name]
        async with self._lock:
            closing = [p for p in mine if p in self.tasks]
            for p in closing:
                await self._close(p, final=self._failed is None)
        if closing:
            self._refresh_stats()
            log.info("headrace[%s]: partitions %s revoked (%s)", self.name, closing, self.stats)

    async def _on_shutdown(self, sender: Any = None, **_: Any) -> None:
        """After faust waited for the streams: final checkpoints, then the clients stop."""
        async with self._lock:
            for p in list(self.tasks):
                await self._close(p, final=self._failed is None)
            self._stopped = True
            self._refresh_stats()
            log.info("headrace[%s]: shutting down (%s)", self.name, self.stats)
            await self._stop_clients()

    # -- restore -------------------------------------------------------------------------------
    async def _restore(self, partitions: list[int]) -> dict[int, StartPoint]:
        """New tasks for ``partitions`` through the host: start point, restore, claim, open;
        then faust's committed offsets are moved to the checkpoint's."""
        started = time.monotonic()
        host = await self._start()
        assert self._admin is not None and self._reader is not None and self.sender is not None
        tps = [TopicPartition(self.topic_name, p) for p in partitions]
        found = await self._admin.list_consumer_group_offsets(host.group_id, partitions=tps)
        committed = {
            (tp.topic, tp.partition): (om.offset, om.metadata)
            for tp, om in found.items()
            if om is not None and om.offset >= 0
        }
        if host.stateful:
            await adopt_legacy_checkpoints(
                self._reader,
                bridge=self.name,
                source=self.topic_name,
                changelog=self.spec.changelog_topic,
                operator_id=self.name,
                hop_fed=host.stage.source.internal,
                committed=committed,
                partitions=partitions,
            )
        ios = {p: host.create(p, self.sender) for p in partitions}
        starts = {p: host.start_point(p, committed) for p in partitions}
        targets: dict[int, RestoreTarget] = {}

        def keep(found: list[RestoreTarget]) -> None:
            targets.update({t.partition: t for t in found})

        read_until = await host.restore(
            self._reader, [(ios[p], starts[p]) for p in partitions], on_targets=keep
        )
        for p in partitions:
            io = ios[p]
            for op, start, end in await host.claim(io, read_until=read_until[p]):
                # written after the restore read the partition, by an owner that lost the task
                tp = TopicPartition(io.changelog_topics[op], p)
                io.task.stores[op].force_dirty(await read_keys(self._reader, tp, start, end))
            host.open(io, starts[p])
            self.tasks[p] = io
            self.events[p] = []
        rewind = {
            TP(self.topic_name, p): starts[p].positions[(self.topic_name, p)]
            for p in partitions
            if (self.topic_name, p) in starts[p].positions
        }
        if rewind:
            # faust seeks to the committed offsets right after this signal: make them the
            # checkpoint's, so the stream resumes exactly where the state ends.
            await self.app.consumer._commit(rewind)
        for p in partitions:
            self._log_restored(p, starts[p], targets.get(p))
        self.stats.restores += 1
        self._refresh_stats()
        log.info(
            "headrace[%s]: restored partitions %s in %.2fs (%s)",
            self.name,
            partitions,
            time.monotonic() - started,
            self.stats,
        )
        return starts

    def _log_restored(self, p: int, start: StartPoint, target: RestoreTarget | None) -> None:
        meta = start.meta
        applied = 0 if target is None else target.applied
        self.stats.restored_records += applied
        position = start.positions.get((self.topic_name, p))
        log.info(
            "headrace[%s]: partition %d restored from %s (%d changelog records read, "
            "%d stale keys, checkpoint %s, changelog offset %s): resuming at source offset %s",
            self.name,
            p,
            target.topic if target is not None else "no changelog",
            applied,
            0 if target is None else len(target.stale),
            meta.checkpoint_id if meta is not None else "none",
            meta.changelog_offsets.get(self.name, -1) if meta is not None else "none",
            position if position is not None else "faust's committed offset",
        )

    async def _close(self, p: int, *, final: bool) -> None:
        """Close the task of ``p``, with a final checkpoint unless it failed. Its remaining
        events are acked: whoever takes ``p`` next resumes at the committed cut."""
        io = self.tasks.pop(p)
        events = self.events.pop(p, [])
        self._expect.pop(p, None)
        try:
            if final and self.committer is not None:
                await commit_checkpoint(
                    io, self.committer, io.task.final_checkpoint(), self._observe
                )
                await self._ack(events)
        finally:
            abandon(io.unacked)
            io.unacked = []
            counters = io.task.counters
            self._closed.processed += counters.records_in - counters.deduplicated
            self._closed.hop_duplicates += counters.deduplicated
            with contextlib.suppress(Exception):
                io.task.close()
            for store in io.task.stores.values():
                store.backend.close()

    # -- records -------------------------------------------------------------------------------
    async def _run(self, stream: Any) -> None:
        self._stream = stream.noack()
        async for event in self._stream.events():
            await self._handle(event)

    async def _handle(self, event: Any) -> None:
        if self._failed is not None:
            raise RuntimeError(f"headrace[{self.name}] has failed") from self._failed
        msg = event.message
        p: int = msg.partition
        async with self._lock:
            if self._stopped:
                return
            if self.host is None or p not in self.tasks:
                await self._restore_outside_signal(p)
            expected = self._expect.get(p)
            if expected is not None:
                if msg.offset != expected:  # fetched before the seek: it comes again
                    await self._stream.ack(event)
                    return
                del self._expect[p]
            io, committer = self.tasks[p], self.committer
            assert committer is not None  # a task exists: the clients are started
            if msg.offset < io.task.position(msg.topic):
                self.stats.replayed_skipped += 1
            self.events[p].append(event)
            try:
                # outputs wait in the task and go out with its next checkpoint, in batches:
                # sent one event at a time they would cost a produce request each
                await StageHost.feed(io, [FaustRecord(msg)], committer, self._observe)
            except Exception as exc:
                self._fail(exc)
                raise
            await self._ack_covered(p)

    async def _restore_outside_signal(self, p: int) -> None:
        """faust handed over a record of a partition the signal did not restore: restore it
        now and seek faust back to the checkpoint (records fetched before are skipped)."""
        log.warning(
            "headrace[%s]: event for partition %d before its restore; restoring now", self.name, p
        )
        starts = await self._restore([p])
        position = starts[p].positions.get((self.topic_name, p))
        if position is not None:
            await self.app.consumer.seek(TP(self.topic_name, p), position)
            self._expect[p] = position

    async def _rewrite_foreign(self, io: TaskIO) -> None:
        """Another writer (a zombie) wrote into the task's changelog between two of its
        checkpoints: its keys get this task's values again at the next checkpoint (see
        :mod:`headrace.runtime.checkpoint.fencing`)."""
        assert self._reader is not None
        ranges, io.foreign = io.foreign, []
        for op, start, end in ranges:
            tp = TopicPartition(io.changelog_topics[op], io.partition)
            keys = await read_keys(self._reader, tp, start, end)
            log.warning(
                "headrace[%s]: %s[%d] offsets %d..%d were written by another worker; "
                "rewriting its %d key(s)",
                self.name,
                tp.topic,
                tp.partition,
                start,
                end - 1,
                len(keys),
            )
            io.task.stores[op].force_dirty(keys)

    def _observe(self, result: CommitResult) -> None:
        self.stats.checkpoints += 1

    async def _ack(self, events: list[Any]) -> None:
        for event in events:
            await self._stream.ack(event)

    async def _ack_covered(self, p: int) -> None:
        """Ack the events of ``p`` that the last committed checkpoint covers."""
        io, events = self.tasks.get(p), self.events.get(p)
        if io is None or not events:
            return
        limit = io.committed.get((self.topic_name, p))
        if limit is None:
            return
        n = 0
        while n < len(events) and events[n].message.offset < limit:
            n += 1
        if n:
            self.events[p] = events[n:]
            await self._ack(events[:n])

    def _fail(self, exc: BaseException) -> None:
        """Stop checkpointing: the state may hold part of a failed record. Unacked events are
        released, so faust's shutdown does not wait for them; a restart restores the last
        checkpoint."""
        if self._failed is None:
            self._failed = exc
            log.error("headrace[%s]: %s", self.name, exc)
            for events in self.events.values():
                events.clear()
            self._crash_task = asyncio.ensure_future(self.app.crash(exc))

    def _refresh_stats(self) -> None:
        counters = [io.task.counters for io in self.tasks.values()]
        self.stats.processed = self._closed.processed + sum(
            c.records_in - c.deduplicated for c in counters
        )
        self.stats.hop_duplicates = self._closed.hop_duplicates + sum(
            c.deduplicated for c in counters
        )

    # -- checkpoints ---------------------------------------------------------------------------
    async def checkpoint_loop(self) -> None:
        """Checkpoint every ``checkpoint_interval`` seconds until the app's futures are stopped
        (after faust's shutdown waited for the streams, so the last acks are still given)."""
        reported, last_report = BridgeStats(), time.monotonic()
        while True:
            await asyncio.sleep(self.checkpoint_interval)
            if self._failed is not None:
                return
            try:
                await self.checkpoint()
            except Exception as exc:
                self._fail(exc)
                return
            if time.monotonic() - last_report >= 10:
                self._refresh_stats()
                if self.stats != reported:
                    log.info("headrace[%s]: %s", self.name, self.stats)
                    reported, last_report = copy.copy(self.stats), time.monotonic()

    async def checkpoint(self) -> None:
        """Let every task checkpoint if its clock says so. While faust waits for the streams
        (a rebalance or a shutdown: it fetches nothing meanwhile), a task fed by a hop gets no
        barrier: it is cut unaligned, like an alignment timeout, and everything it was handed
        is acked (the committed cut is where the next owner resumes)."""
        draining = bool(getattr(self.app, "rebalancing", False) or self.app.should_stop)
        async with self._lock:
            if self._failed is not None:
                return
            committer = self.committer
            for p, io in list(self.tasks.items()):
                assert committer is not None
                await StageHost.settle(io, committer, time.time(), self._observe)
                if io.foreign:
                    await self._rewrite_foreign(io)
                task = io.task
                if draining and task.stage.source.internal and self.events.get(p):
                    if task.pending is None:
                        task.prepare(force=True, final=False)
                    while task.pending is not None:
                        await commit_checkpoint(io, committer, task.pending, self._observe)
                    events, self.events[p] = self.events[p], []
                    await self._ack(events)
                else:
                    await self._ack_covered(p)
