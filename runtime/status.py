"""``headrace status MODULE:JOB``: the job as an operator sees it, and where that comes from.

What lives in Kafka is read directly: consumer-group members and their partitions (describe
group), lag per partition (the data records past the committed offset: barriers and
transaction markers do not count, see :mod:`headrace.runtime.checkpoint.lag`) and the last
complete checkpoint (``<job>.checkpoints``). What only a worker knows — which tasks it runs,
which it is restoring and how far each restore has got — each worker publishes itself:

**Mechanism: a compacted status topic.** Every worker writes a small JSON record to
``<job>.status`` (1 partition, ``cleanup.policy=compact``, created with the job's other internal
topics by :func:`headrace.runtime.kafka.topics.plan_layout`) keyed by its worker id, every
``HEADRACE_STATUS_INTERVAL_S`` seconds (default 5) and on every rebalance, and a tombstone when
it stops cleanly. Compaction keeps the latest record per worker, so the topic stays tiny.

Why not scrape the workers' ``/metrics`` endpoints instead? ``status`` would have to find and
reach every worker: Kafka does not know the metrics port, member hosts are often pod IPs that are
unreachable from where an operator runs the CLI, and the endpoint is off unless
``--metrics-port`` is set. Everyone who can run the job can read its topics, so the status topic
works wherever the CLI can reach Kafka (laptop, CI, a bastion), needs no extra port or service
discovery, and costs one small record per worker per interval. A worker killed without a clean
stop leaves its last record behind, so the records are checked against the groups' membership,
which the broker keeps current (:func:`live_workers`): a worker that is no member of any stage
group is not shown with tasks, only named as gone, and a member whose record is older than
three intervals (hung, or killed and not yet expelled) is shown as stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.structs import TopicPartition

from headrace.operators.job import Job
from headrace.runtime.checkpoint.lag import Tail, data_lag, log_bounds
from headrace.runtime.checkpoint.metadata import CheckpointMetadata, CheckpointMetadataError
from headrace.runtime.config import Settings
from headrace.runtime.kafka import clients
from headrace.runtime.kafka.topics import status_topic, topic_partitions
from headrace.runtime.metrics import OpsServer, WorkerMetrics
from headrace.runtime.view import InputLag, WorkerView

if TYPE_CHECKING:
    from headrace.runtime.checkpoint.log import CheckpointSummary

log = logging.getLogger(__name__)


# -- the worker side ---------------------------------------------------------------------------


def worker_snapshot(worker: WorkerView, lag: InputLag) -> dict[str, Any]:
    """What one worker tells ``headrace status`` about itself."""
    stages: dict[str, Any] = {}
    for snap in worker.stage_snapshots():
        stages[snap.name] = {
            "running": sorted(snap.running),
            "restoring": sorted(snap.restoring),
            "suspended": sorted(snap.suspended),
            "restores": {
                f"{t.partition}:{t.changelog}": {"restored": t.restored, "total": t.total}
                for t in snap.restores
            },
            "records_in": {str(p): c.records_in for p, c in snap.running.items()},
            "watermarks": {
                str(p): c.watermark for p, c in snap.running.items() if c.watermark is not None
            },
            "member_id": snap.member_id,
        }
    return {
        "worker": worker.worker_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job": worker.job.name,
        "metrics_port": worker.ops_port,
        "ready": worker.ready(),
        "timestamp_ms": int(time.time() * 1000),
        "interval_s": worker.settings.status_interval_s,
        "stages": stages,
        "lag": {f"{stage}:{topic}/{p}": n for (stage, topic, p), n in lag.items()},
    }


class StatusPublisher:
    """Publishes :func:`worker_snapshot` to ``<job>.status`` until stopped (see module doc)."""

    def __init__(self, worker: WorkerView, metrics: WorkerMetrics) -> None:
        self.worker = worker
        self.metrics = metrics
        self.topic = status_topic(worker.job)
        self.interval = worker.settings.status_interval_s
        self.producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        s = self.worker.settings
        self.producer = clients.status_producer(s, client_id=f"{s.client_id}-status")
        await self.producer.start()
        self._task = asyncio.create_task(self._loop(), name="status-publisher")

    def poke(self) -> None:
        """Publish soon."""
        self._wake.set()

    def _shape(self) -> tuple[Any, ...]:
        """What ``headrace status`` matches against the groups: member ids, tasks, readiness.
        A change (a rebalance, a rejoin, a restore done) is published within a second, so a
        member id is known before the next interval."""
        return (
            self.worker.ready(),
            *(
                (s.name, s.member_id, tuple(s.running), tuple(s.restoring))
                for s in self.worker.stage_snapshots()
            ),
        )

    async def _loop(self) -> None:
        published_at, shape = float("-inf"), None
        while True:
            now = time.monotonic()
            due = now - published_at >= self.interval or self._shape() != shape
            # while the broker is unreachable a send would only queue behind the outage (and
            # fail after the request timeout): the worker's outage summary says so already
            if due and self.worker.broker_connected():
                published_at, shape = now, self._shape()
                try:
                    await self.publish()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # status is best effort: never stop the worker for it
                    if self.worker.broker_connected():
                        log.warning("could not publish worker status: %s", exc)
                    else:
                        log.debug("could not publish worker status (broker unreachable): %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(1.0, self.interval))
            if self._wake.is_set():
                published_at = float("-inf")
            self._wake.clear()

    async def publish(self) -> None:
        assert self.producer is not None
        metrics = self.metrics
        await metrics.refresh_lag()
        value = orjson.dumps(worker_snapshot(self.worker, metrics.lag))
        await self.producer.send_and_wait(
            self.topic, value, key=self.worker.worker_id.encode(), partition=0
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self.producer is not None:
            with contextlib.suppress(Exception):  # tombstone: this worker has left
                await asyncio.wait_for(
                    self.producer.send_and_wait(
                        self.topic, None, key=self.worker.worker_id.encode(), partition=0
                    ),
                    10,
                )
            with contextlib.suppress(Exception):
                await self.producer.stop()
            self.producer = None


# -- the CLI side ------------------------------------------------------------------------------


@dataclass(slots=True)
class Member:
    member_id: str
    client_id: str
    host: str
    partitions: list[tuple[str, int]]


@dataclass(slots=True)
class GroupStatus:
    group_id: str
    stage: str
    state: str
    members: list[Member]
    #: (topic, partition) -> (committed offset or None, end offset)
    offsets: dict[tuple[str, int], tuple[int | None, int]] = field(default_factory=dict)
    #: (topic, partition) -> (data records not yet processed, exact?) (checkpoint/lag.py)
    lag: dict[tuple[str, int], tuple[int, bool]] = field(default_factory=dict)


@dataclass(slots=True)
class JobStatus:
    job: str
    groups: list[GroupStatus]
    #: workers that are members of the job's groups now (their last published snapshots)
    workers: list[dict[str, Any]]
    checkpoints: list[CheckpointSummary]
    now_ms: int
    #: workers whose last snapshot is left but that are no member any more (left or died)
    gone: list[dict[str, Any]] = field(default_factory=list)


#: a snapshot older than this many status intervals is stale: its worker may be hung or dead
STALE_INTERVALS = 3


def _stale(w: dict[str, Any], now_ms: int) -> bool:
    age_s = (now_ms - int(w.get("timestamp_ms", 0))) / 1000
    return age_s > STALE_INTERVALS * float(w.get("interval_s", 5))


def live_workers(
    workers: list[dict[str, Any]], groups: list[GroupStatus], now_ms: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(live, gone), judged by the groups' membership as the broker reports it now.

    A worker killed with -9 publishes no tombstone, so its last snapshot stays in
    ``<job>.status``. It is live only while one of the member ids it reported is a member of
    its stage's group now, or (a snapshot without member ids: before its first join) while its
    snapshot is fresh (within :data:`STALE_INTERVALS` intervals). Of a live worker, a stage
    whose member id is not in that stage's group (expelled and not yet rejoined, or rejoined
    under an id it has not published yet) is shown owning no tasks: it has none now.
    """
    by_stage = {g.stage: {m.member_id for m in g.members} for g in groups}
    live: list[dict[str, Any]] = []
    gone: list[dict[str, Any]] = []
    for w in workers:
        stages: dict[str, Any] = w.get("stages", {})
        member_of = {
            name: st.get("member_id") in by_stage.get(name, set())
            for name, st in stages.items()
            if st.get("member_id") is not None
        }
        if not (any(member_of.values()) if member_of else not _stale(w, now_ms)):
            gone.append(w)
            continue
        shown = dict(w)
        shown["stages"] = {
            name: st
            if member_of.get(name, True)
            else {"member_id": st.get("member_id"), "not_member": True}
            for name, st in stages.items()
        }
        live.append(shown)
    return live, gone


async def read_status(job: Job, settings: Settings) -> JobStatus:
    from headrace.runtime.inspect import read_all, read_checkpoints

    admin = clients.admin_client(settings, client_id="headrace-status")
    await admin.start()
    groups: list[GroupStatus] = []
    try:
        existing = await topic_partitions(
            admin, [t for s in job.stages for t in s.source.topics] + [status_topic(job)]
        )
        for stage in job.stages:
            gid = job.group_id(stage)
            groups.append(await _describe_group(admin, gid, stage.name))
            tps = [
                TopicPartition(t, p) for t in stage.source.topics for p in range(existing.get(t, 0))
            ]
            if tps:
                committed = await admin.list_consumer_group_offsets(gid, partitions=tps)
                found: dict[TopicPartition, Tail] = {}
                beginnings, ends = await log_bounds(settings, tps)
                for tp in tps:
                    om = committed.get(tp)
                    off = om.offset if om is not None and om.offset >= 0 else None
                    meta = _checkpoint_of(om.metadata, gid, tp) if off is not None else None
                    found[tp] = Tail(off, ends.get(tp, 0), beginnings.get(tp, 0), meta)
                lags = await data_lag(settings, found)
                for tp, tail in found.items():
                    groups[-1].offsets[(tp.topic, tp.partition)] = (tail.committed, tail.end)
                    groups[-1].lag[(tp.topic, tp.partition)] = lags[tp]
    finally:
        await admin.close()
    workers: dict[str, dict[str, Any]] = {}
    if status_topic(job) in existing:
        records = await read_all(settings, [TopicPartition(status_topic(job), 0)], committed=False)
        for r in records:
            key = r.key.decode() if r.key else ""
            if r.value is None:
                workers.pop(key, None)
            else:
                workers[key] = orjson.loads(r.value)
    checkpoints = await read_checkpoints(job, settings)
    now_ms = int(time.time() * 1000)
    live, gone = live_workers(
        sorted(workers.values(), key=lambda w: str(w["worker"])), groups, now_ms
    )
    return JobStatus(job.name, groups, live, checkpoints, now_ms, gone)


async def _describe_group(admin: AIOKafkaAdminClient, group_id: str, stage: str) -> GroupStatus:
    responses = await admin.describe_consumer_groups([group_id])
    for resp in responses:
        for g in resp.groups:
            error_code, gid, state, _ptype, _protocol, members = g[:6]
            if gid != group_id or error_code:
                continue
            out = []
            for m in members:
                member_id, client_id, host, _meta, assignment = m[:5]
                parts: list[tuple[str, int]] = []
                if assignment:
                    decoded = ConsumerProtocolMemberAssignment.decode(assignment)
                    parts = sorted((tp.topic, tp.partition) for tp in decoded.partitions())
                out.append(Member(member_id, client_id, host.lstrip("/"), parts))
            return GroupStatus(group_id, stage, state or "Dead", out)
    return GroupStatus(group_id, stage, "Dead", [])


def progress_bar(done: int, total: int, width: int = 24) -> str:
    frac = 1.0 if total <= 0 else min(1.0, done / total)
    filled = round(frac * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}%  {done:,}/{total:,}"


def _ranges(parts: list[int]) -> str:
    return ",".join(str(p) for p in parts) if parts else "-"


def render(status: JobStatus) -> str:
    """The human-readable status table."""
    lines: list[str] = [f"job {status.job}"]
    complete = next((c for c in status.checkpoints if c.complete), None)
    if complete is None:
        lines.append("last complete checkpoint: none yet")
    else:
        acked, expected = len(complete.acked & complete.expected), len(complete.expected)
        others = "" if acked == expected else ", the others a later one"
        lines.append(
            f"last complete checkpoint: {complete.checkpoint_id} (acknowledged by "
            f"{acked}/{expected} tasks{others}, "
            f"{'aligned' if complete.aligned else 'unaligned'}, "
            f"slowest task {complete.max_duration_ms:.1f} ms)"
        )
    for g in status.groups:
        lines.append("")
        lines.append(f"group {g.group_id} ({g.state}, {len(g.members)} member(s))")
        if g.members:
            lines.append(f"  {'member':<52} {'host':<16} partitions")
            for m in sorted(g.members, key=lambda m: m.member_id):
                parts = _ranges(sorted({p for _, p in m.partitions}))
                lines.append(f"  {m.member_id:<52} {m.host:<16} {parts}")
        if g.offsets:
            lines.append(f"  {'partition':<40} {'committed':>12} {'end':>12} {'lag':>10}")
            for (topic, p), (committed, end) in sorted(g.offsets.items()):
                lag, exact = g.lag.get((topic, p), (end - (committed or 0), False))
                shown = "-" if committed is None else f"{committed:,}"
                lag_text = f"{lag:,}" if exact else f"~{lag:,}"
                lines.append(f"  {f'{topic}/{p}':<40} {shown:>12} {end:>12,} {lag_text:>10}")
    lines.append("")
    if not status.workers:
        lines.append("workers: none reported (no worker running, or none published yet)")
    else:
        lines.append(f"workers ({len(status.workers)}), from {status.job}.status")
        stage_names = [g.stage for g in status.groups]
        header = f"  {'worker':<28} {'ready':<6} {'seen':>8}  " + "  ".join(
            f"{s + ' tasks':<16}" for s in stage_names
        )
        lines.append(header.rstrip())
        restores: list[str] = []
        watermarks: list[str] = []
        for w in status.workers:
            age = (status.now_ms - int(w.get("timestamp_ms", 0))) / 1000
            seen = f"{age:.0f}s ago"
            cells = []
            for s in stage_names:
                st = w.get("stages", {}).get(s, {})
                text = _ranges(st.get("running", []))
                if st.get("restoring"):
                    text += f" +restoring {_ranges(st['restoring'])}"
                if st.get("not_member"):
                    text = "not a member"
                cells.append(f"{text:<16}")
            # a stale snapshot's "ready" is no longer known: the worker stopped publishing
            ready = "stale" if _stale(w, status.now_ms) else "yes" if w.get("ready") else "no"
            lines.append(f"  {w['worker']:<28} {ready:<6} {seen:>8}  " + "  ".join(cells))
            for s, st in w.get("stages", {}).items():
                for partition, wm in sorted(st.get("watermarks", {}).items()):
                    behind = (status.now_ms - int(wm)) / 1000
                    watermarks.append(
                        f"  {s}/{partition:<6} {int(wm):>16}  {behind:>10.1f}s behind the clock"
                    )
                for key, prog in sorted(st.get("restores", {}).items()):
                    partition, _, changelog = key.partition(":")
                    restores.append(
                        f"  {w['worker']:<28} {s}/{partition:<4} {changelog:<36} "
                        + progress_bar(int(prog["restored"]), int(prog["total"]))
                    )
        if watermarks:
            lines.append("")
            lines.append("event-time watermarks (ms)")
            lines += watermarks
        if restores:
            lines.append("")
            lines.append("restores under way")
            lines.extend(restores)
        else:
            lines.append("no restores under way")
    if status.gone:
        names = ", ".join(str(w["worker"]) for w in status.gone)
        lines.append("")
        lines.append(f"not shown: {len(status.gone)} worker(s) that left or died ({names})")
    return "\n".join(line.rstrip() for line in lines)


class Operations:
    """The worker's operational side: the ops HTTP server (if a port is set) and the publisher."""

    def __init__(self, worker: WorkerView, metrics: WorkerMetrics) -> None:
        self.worker = worker
        self.metrics = metrics
        self.server: OpsServer | None = None
        self.publisher = StatusPublisher(worker, metrics)

    async def start(self) -> None:
        port = self.worker.settings.metrics_port
        if port is not None:
            self.server = OpsServer(
                self.worker, self.metrics, port, host=self.worker.settings.metrics_host
            )
            await self.server.start()
            self.worker.ops_port = self.server.port
        await self.publisher.start()

    async def stop(self) -> None:
        await self.publisher.stop()
        if self.server is not None:
            await self.server.stop()
            self.server = None


def _checkpoint_of(text: str | None, group: str, tp: TopicPartition) -> CheckpointMetadata | None:
    """The checkpoint committed with an offset; one this version cannot read is reported and
    shown as none (status only displays it; a worker refuses to start from it)."""
    try:
        return CheckpointMetadata.decode(text)
    except CheckpointMetadataError as exc:
        log.warning("group %s %s[%d]: %s", group, tp.topic, tp.partition, exc)
        return None
