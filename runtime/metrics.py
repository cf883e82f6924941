"""Operating a worker: Prometheus metrics, health endpoints and structured logs (ARCHITECTURE.md 8).

Every worker owns one :class:`WorkerMetrics` with its *own*
``CollectorRegistry`` (nothing is registered globally, so workers and tests never see each
other's series). Two kinds of series:

* **Read at scrape time** from the worker's live objects by :class:`_TaskCollector`: records
  in/out, skipped and dead-lettered records, checkpoints (the
  :class:`~headrace.runtime.task.TaskCounters`
  the task already keeps), tasks per state, restore progress and consumer lag. The per-record
  path is untouched: a scrape reads plain integers. Counters belong to a task; when a partition
  moves the task's counters start again from zero, which Prometheus treats as a counter reset.
* **Observed at events**: checkpoint duration, size (changed keys and bytes) and alignment
  time once per committed checkpoint (:meth:`WorkerMetrics.checkpoint_committed`, called by the
  committer), and processing time once per polled batch (:meth:`WorkerMetrics.batch_processed`).

:class:`OpsServer` serves ``/metrics``, ``/health`` and ``/ready`` on ``Settings.metrics_port``:

* ``/health`` is liveness: 200 while the event loop answers and the worker has not failed, 503
  once it has. A broker outage keeps it 200 and its body says ``broker unreachable since ...``:
  a liveness failure makes Kubernetes restart the pod, and restarting every worker of a job
  does not bring a broker back: the restarted workers would lose their in-memory state and
  could not even start until the broker is back (start-up checks the connection and exits),
  so the pods would crash-loop, while a worker left running recovers by itself when the
  broker returns (ARCHITECTURE.md section 7.2).
* ``/ready`` is 200 only while the tasks can make progress: not while the broker is
  unreachable, a stage is (re)joining its group or restoring tasks, or the worker is stopping.
  The 503 body names the reason.

It is a tiny HTTP/1.0 server on the worker's own asyncio loop, so the collectors read the
worker's dicts from the thread that changes them: no locks, no races.

Logging set-up and secret masking live in :mod:`headrace.runtime.logs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from headrace.runtime.view import InputLag, WorkerView

if TYPE_CHECKING:
    from headrace.runtime.checkpoint.pending import CommitResult

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SIZE_BUCKETS = (0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000)
_BYTES_BUCKETS = (0, 1_024, 16_384, 131_072, 1_048_576, 8_388_608, 67_108_864, 536_870_912)


class WorkerMetrics:
    """All metrics of one worker, in a registry of its own."""

    def __init__(self, worker: WorkerView) -> None:
        self.worker = worker
        self.registry = CollectorRegistry(auto_describe=True)
        job = worker.job.name
        self.job = job
        r = self.registry
        self.checkpoint_duration = Histogram(
            "headrace_checkpoint_duration_seconds",
            "Time to commit one task checkpoint (changelog, outputs, offsets).",
            ["job", "stage"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.checkpoint_keys = Histogram(
            "headrace_checkpoint_changed_keys",
            "State keys written to the changelog by one task checkpoint.",
            ["job", "stage"],
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.checkpoint_bytes = Histogram(
            "headrace_checkpoint_bytes",
            "Bytes of state (keys + values) written to the changelog by one task checkpoint.",
            ["job", "stage"],
            buckets=_BYTES_BUCKETS,
            registry=r,
        )
        self.alignment = Histogram(
            "headrace_checkpoint_alignment_seconds",
            "Time a task waited for barriers from all upstream partitions.",
            ["job", "stage"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "headrace_batch_processing_seconds",
            "Time to process one polled batch of records (including checkpoints it triggered).",
            ["job", "stage"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.record_delay = Gauge(
            "headrace_record_delay_seconds",
            "Now minus the timestamp of the newest record processed (end-to-end delay).",
            ["job", "stage"],
            registry=r,
        )
        Gauge("headrace_worker_info", "This worker.", ["job", "worker"], registry=r).labels(
            job, worker.worker_id
        ).set(1)
        self.lag: InputLag = {}
        r.register(_TaskCollector(self))

    # -- events ---------------------------------------------------------------------------------
    def checkpoint_committed(self, result: CommitResult) -> None:
        """Once per committed task checkpoint (off the per-record path)."""
        stage = result.stage
        self.checkpoint_duration.labels(self.job, stage).observe(result.seconds)
        self.checkpoint_keys.labels(self.job, stage).observe(result.changed_keys)
        self.checkpoint_bytes.labels(self.job, stage).observe(result.changed_bytes)
        self.alignment.labels(self.job, stage).observe(result.alignment_seconds)

    def batch_processed(self, stage: str, started: float, batches: dict[Any, list[Any]]) -> None:
        """Once per non-empty poll: ``started`` is ``time.perf_counter()`` before processing."""
        self.batch_seconds.labels(self.job, stage).observe(time.perf_counter() - started)
        newest = max((records[-1].timestamp for records in batches.values() if records), default=0)
        if newest > 0:
            self.record_delay.labels(self.job, stage).set(max(0.0, time.time() - newest / 1000))

    async def refresh_lag(self) -> None:
        """Consumer lag per running task input (see :meth:`WorkerView.input_lag`)."""
        self.lag = await self.worker.input_lag()

    async def exposition(self) -> bytes:
        await self.refresh_lag()
        return generate_latest(self.registry)


class _TaskCollector(Collector):
    """Reads task counters, task states, restore progress and lag at scrape time."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        worker = self.metrics.worker
        job = self.metrics.job
        counters = {
            "records_in": families[0],
            "records_out": families[1],
            "skipped": families[2],
            "dead_lettered": families[3],
            "checkpoints": families[4],
            "unaligned_checkpoints": families[5],
            "deduplicated": families[6],
            "late": families[13],
            "idle_checkpoints": families[16],
        }
        tasks, restored, restore_total, lag, ready, broker = families[7:13]
        watermark, watermark_lag = families[14:16]
        now_ms = time.time() * 1000
        for snap in worker.stage_snapshots():
            stage = snap.name
            for state, count in (
                ("running", len(snap.running)),
                ("restoring", len(snap.restoring)),
                ("suspended", len(snap.suspended)),
            ):
                tasks.add_metric([job, stage, state], count)
            for p, c in snap.running.items():
                labels = [job, stage, str(p)]
                for name, family in counters.items():
                    family.add_metric(labels, getattr(c, name))
                if c.watermark is not None:
                    watermark.add_metric(labels, c.watermark)
                    watermark_lag.add_metric(labels, (now_ms - c.watermark) / 1000)
            for t in snap.restores:
                labels = [job, stage, str(t.partition), t.changelog]
                restored.add_metric(labels, t.restored)
                restore_total.add_metric(labels, t.total)
        for (stage, topic, partition), n in self.metrics.lag.items():
            lag.add_metric([job, stage, topic, str(partition)], n)
        ready.add_metric([job], 1 if worker.ready() else 0)
        broker.add_metric([job], 1 if worker.broker_connected() else 0)
        yield from families

    def _families(self) -> list[Any]:
        task_labels = ["job", "stage", "partition"]
        restore_labels = ["job", "stage", "partition", "changelog"]
        return [
            CounterMetricFamily(
                "headrace_records_in", "Records consumed by a task.", labels=task_labels
            ),
            CounterMetricFamily(
                "headrace_records_out", "Records produced by a task.", labels=task_labels
            ),
            CounterMetricFamily(
                "headrace_records_skipped",
                "Records skipped by the 'skip' error policy.",
                labels=task_labels,
            ),
            CounterMetricFamily(
                "headrace_records_dead_lettered",
                "Records sent to the dead-letter topic by the 'dead_letter' error policy.",
                labels=task_labels,
            ),
            CounterMetricFamily(
                "headrace_checkpoints", "Checkpoints committed by a task.", labels=task_labels
            ),
            CounterMetricFamily(
                "headrace_unaligned_checkpoints",
                "Checkpoints a task took unaligned (alignment timeout).",
                labels=task_labels,
            ),
            CounterMetricFamily(
                "headrace_records_deduplicated",
                "Repartition records a task dropped because an upstream replay had delivered them "
                "before (at-least-once).",
                labels=task_labels,
            ),
            GaugeMetricFamily(
                "headrace_tasks",
                "Tasks of this worker by state (running, restoring, suspended).",
                labels=["job", "stage", "state"],
            ),
            GaugeMetricFamily(
                "headrace_restore_records_restored",
                "Changelog records applied so far by a restore under way.",
                labels=restore_labels,
            ),
            GaugeMetricFamily(
                "headrace_restore_records_total",
                "Changelog records a restore under way has to apply.",
                labels=restore_labels,
            ),
            GaugeMetricFamily(
                "headrace_consumer_lag_records",
                "Records between a task's consumer position and the end of its input partition.",
                labels=["job", "stage", "topic", "partition"],
            ),
            GaugeMetricFamily(
                "headrace_ready",
                "1 when every stage is a member of its consumer group and every assigned task "
                "is restored.",
                labels=["job"],
            ),
            GaugeMetricFamily(
                "headrace_broker_connected",
                "0 while the broker cannot be reached: connection errors for 1 s or more, "
                "until 5 s pass without one.",
                labels=["job"],
            ),
            CounterMetricFamily(
                "headrace_late_records",
                "Records that fell only into closed event-time windows (kept in the late topic, "
                "or counted as skipped).",
                labels=task_labels,
            ),
            GaugeMetricFamily(
                "headrace_watermark_ms",
                "The task's event-time watermark (ms since the epoch).",
                labels=task_labels,
            ),
            GaugeMetricFamily(
                "headrace_watermark_lag_seconds",
                "How far the task's watermark is behind the wall clock.",
                labels=task_labels,
            ),
            CounterMetricFamily(
                "headrace_idle_checkpoints",
                "Checkpoints a task did not commit: nothing read, written or changed since the "
                "last one.",
                labels=task_labels,
            ),
        ]


# -- HTTP ----------------------------------------------------------------------------------------


class OpsServer:
    """``/metrics``, ``/health``, ``/ready`` on the worker's event loop (HTTP/1.0, GET only)."""

    def __init__(
        self, worker: WorkerView, metrics: WorkerMetrics, port: int, host: str = ""
    ) -> None:
        self.worker = worker
        self.metrics = metrics
        self.port = port
        self.host = host
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host or None, self.port, reuse_address=True
        )
        sock = self._server.sockets[0].getsockname()
        self.port = int(sock[1])
        log.info("serving /metrics, /health and /ready on %s:%d", self.host or "*", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass  # headers are not needed
            parts = request.decode("latin-1").split()
            method = parts[0] if parts else ""
            path = parts[1].split("?", 1)[0] if len(parts) > 1 else ""
            status, ctype, body = await self._route(method, path)
            head = (
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        except Exception:
            log.exception("ops endpoint failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        worker = self.worker
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE, await self.metrics.exposition()
        if path in ("/health", "/healthz", "/live"):
            # Liveness: the event loop answers and the worker has not failed. A broker outage
            # does not fail it (restarting every pod would not bring the broker back, and the
            # worker recovers by itself); the body says so, and /ready turns 503.
            if worker.failure is not None:
                return "503 Service Unavailable", "text/plain", b"failed\n"
            problem = worker.broker_problem()
            return "200 OK", "text/plain", (f"ok; {problem}\n" if problem else "ok\n").encode()
        if path in ("/ready", "/readyz"):
            reason = unready_reason(worker)
            if not reason:
                return "200 OK", "text/plain", b"ready\n"
            return "503 Service Unavailable", "text/plain", f"not ready: {reason}\n".encode()
        return "404 Not Found", "text/plain", b"/metrics /health /ready\n"


def unready_reason(worker: WorkerView) -> str:
    """Why the worker's tasks cannot make progress now ("" if they can): it failed or is
    stopping, the broker is unreachable, a stage is not a member of its group (joining, or
    rejoining after its membership was lost) or is restoring tasks."""
    if worker.failure is not None:
        return f"the worker failed ({type(worker.failure).__name__})"
    if worker.stopping:
        return "stopping"
    problem = worker.broker_problem()
    if problem:
        return problem
    if not worker.ready():
        return worker.not_ready_reason() or "tasks not ready"
    return ""


def parse_exposition(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """``(name, labels, value)`` per sample of a Prometheus text exposition (tests, status)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            yield sample.name, dict(sample.labels), float(sample.value)
