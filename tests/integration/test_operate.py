"""Operating a real word-count worker: /metrics, /health, /ready, JSON logs, ``headrace status``.

The worker is the real thing (``python -m headrace.runtime.cli run examples.wordcount:job``)
against the
session's Kafka broker, with unique topic and job names. The pure rendering and collector tests
at the bottom need no broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from examples.demo import create_topics, produce_lines, wait_for_counts
from headrace.runtime.checkpoint.log import CheckpointSummary
from headrace.runtime.kafka.health import CONNECTION_FAILURES
from headrace.runtime.localkafka import LocalBroker
from headrace.runtime.logs import JsonFormatter, RedactingFilter
from headrace.runtime.metrics import parse_exposition
from headrace.runtime.status import GroupStatus, JobStatus, Member, progress_bar, render

ROOT = Path(__file__).resolve().parents[2]
VOCAB = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
SECRET = "hunter2-not-in-logs"


def corpus(n: int) -> list[str]:
    return [
        " ".join(VOCAB[(i * 7 + j * 3) % len(VOCAB)] for j in range(1 + i % 5)) for i in range(n)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:  # no answer: shown with the output of a failing test
        print(f"GET {path} on port {port}: {exc!r}", file=sys.stderr)
        return 0, ""


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(labels, v) for n, labels, v in parse_exposition(text) if n == name]


def total(text: str, name: str, **match: str) -> float:
    return sum(
        v for labels, v in samples(text, name) if all(labels.get(k) == m for k, m in match.items())
    )


class WordCountJob:
    """Unique names for one word-count job plus the env a worker / the CLI needs."""

    def __init__(self, bootstrap: str, source: str, sink: str, tmp: Path) -> None:
        self.name = f"wc-op-{uuid.uuid4().hex[:10]}"
        self.env = dict(
            os.environ,
            KAFKA_BOOTSTRAP_SERVERS=bootstrap,
            WORDCOUNT_JOB=self.name,
            WORDCOUNT_SOURCE=source,
            WORDCOUNT_SINK=sink,
            HEADRACE_STATE_DIR=str(tmp / "state"),
            HEADRACE_STATUS_INTERVAL_S="1",
            HEADRACE_CHECKPOINT_INTERVAL_MS="500",
            HEADRACE_SASL_PASSWORD=SECRET,  # unused with PLAINTEXT; must never be logged
            PYTHONUNBUFFERED="1",
        )

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "headrace.runtime.cli", "--log-level", "WARNING", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@contextlib.contextmanager
def worker_process(env: dict[str, str], args: list[str], log: Path) -> Any:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "headrace.runtime.cli", *args],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for(predicate: Any, timeout: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"worker exited with {proc.returncode} while waiting for {what}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.kafka
async def test_metrics_health_status_of_a_running_word_count(
    kafka_bootstrap_servers: str, topic_factory: Any, tmp_path: Path
) -> None:
    source = await topic_factory("op-lines", partitions=4)
    sink = await topic_factory("op-counts", partitions=4)
    lines = corpus(3000)
    expected = dict(Counter(w for line in lines for w in line.split()))
    await produce_lines(kafka_bootstrap_servers, source, lines)
    job = WordCountJob(kafka_bootstrap_servers, source, sink, tmp_path)
    port = free_port()
    log = tmp_path / "worker.log"
    args = ["--log-format", "json", "run", "examples.wordcount:job", "--metrics-port", str(port)]
    with worker_process(job.env, args, log) as proc:
        wait_for(lambda: http_get(port, "/health")[0] == 200, 60, "/health", proc)
        wait_for(lambda: http_get(port, "/ready")[0] == 200, 90, "/ready", proc)
        counts = await wait_for_counts(kafka_bootstrap_servers, sink, expected, 120)
        assert counts == expected

        # every line and word went through; the lag is gone once the last checkpoint is in
        def caught_up() -> bool:
            text = http_get(port, "/metrics")[1]
            return (
                total(text, "headrace_records_in_total", stage="stage0") == len(lines)
                and total(text, "headrace_records_in_total", stage="stage1")
                == sum(expected.values())
                and bool(samples(text, "headrace_consumer_lag_records"))
                and total(text, "headrace_consumer_lag_records", stage="stage0") == 0
            )

        wait_for(caught_up, 30, "records_in to reach the corpus size and lag 0", proc)
        status, text = http_get(port, "/metrics")
        assert status == 200
        assert total(text, "headrace_records_out_total", stage="stage0") == sum(expected.values())
        assert total(text, "headrace_checkpoint_duration_seconds_count", stage="stage0") > 0
        assert total(text, "headrace_checkpoint_duration_seconds_count", stage="stage1") > 0
        assert total(text, "headrace_checkpoint_changed_keys_sum", stage="stage1") >= len(expected)
        assert total(text, "headrace_checkpoint_bytes_sum", stage="stage1") > 0
        assert total(text, "headrace_checkpoint_alignment_seconds_count", stage="stage1") > 0
        assert total(text, "headrace_batch_processing_seconds_count", stage="stage0") > 0
        assert total(text, "headrace_checkpoints_total", stage="stage1", partition="0") > 0
        assert total(text, "headrace_records_skipped_total") == 0
        assert total(text, "headrace_records_dead_lettered_total") == 0
        assert total(text, "headrace_tasks", stage="stage1", state="running") == 4
        assert total(text, "headrace_tasks", stage="stage1", state="restoring") == 0
        assert total(text, "headrace_ready", job=job.name) == 1
        assert http_get(port, "/nope")[0] == 404

        # headrace status: members, tasks per worker, lag per partition, last checkpoint
        def status_ok() -> bool:
            out = job.cli("status", "examples.wordcount:job").stdout
            return "yes" in out and "none reported" not in out and "none yet" not in out

        wait_for(status_ok, 30, "a complete checkpoint and a worker status record", proc)
        result = job.cli("status", "examples.wordcount:job")
        assert result.returncode == 0, result.stderr
        out = result.stdout
        assert f"job {job.name}" in out
        assert f"group {job.name}.stage0 (Stable, 1 member(s))" in out
        assert f"group {job.name}.stage1 (Stable, 1 member(s))" in out
        for p in range(4):
            assert f"{source}/{p}" in out
            assert f"{job.name}.stage1.repartition/{p}" in out
        worker_line = next(line for line in out.splitlines() if f"-{proc.pid} " in line)
        assert worker_line.split()[1] == "yes"
        assert worker_line.count("0,1,2,3") == 2  # all tasks of both stages
        assert re.search(r"last complete checkpoint: \d+ \(acknowledged by \d/8 tasks", out), out
        assert "no restores under way" in out

        # caught up: the lag counts data records only (no barriers, no transaction markers)
        last: list[str] = []

        def no_lag() -> bool:
            out = job.cli("status", "examples.wordcount:job").stdout
            last[:] = [out]
            rows = [line.split() for line in out.splitlines() if line.strip()]
            rows = [r for r in rows if r[0].startswith((f"{source}/", f"{job.name}.stage1."))]
            return len(rows) == 8 and all(r[-1] == "0" for r in rows)

        try:
            wait_for(no_lag, 30, "status to show lag 0 on every partition", proc)
        except pytest.fail.Exception:
            pytest.fail(f"status never showed lag 0 on every partition:\n{last[0]}")

    assert proc.returncode == 0, log.read_text()[-3000:]
    # JSON logs: one object per line; the secret from the environment never appears
    raw = log.read_text()
    assert SECRET not in raw
    records = [json.loads(line) for line in raw.splitlines() if line.strip()]
    assert any(r["message"].startswith("serving /metrics") for r in records)
    assert any("stopped cleanly" in r["message"] for r in records)
    assert all({"ts", "level", "logger", "message"} <= set(r) for r in records)

    # a clean stop leaves a tombstone: the worker is no longer reported
    out = job.cli("status", "examples.wordcount:job").stdout
    assert "workers: none reported" in out
    assert f"group {job.name}.stage0 (Empty, 0 member(s))" in out


@pytest.mark.kafka
async def test_status_drops_a_worker_killed_with_sigkill(
    kafka_bootstrap_servers: str, topic_factory: Any, tmp_path: Path
) -> None:
    """kill -9 leaves no tombstone in <job>.status: once the group has expelled the worker,
    ``headrace status`` no longer shows it (nor its tasks) and says it left or died."""
    source = await topic_factory("op-kill-lines", partitions=2)
    sink = await topic_factory("op-kill-counts", partitions=2)
    await produce_lines(kafka_bootstrap_servers, source, corpus(200))
    job = WordCountJob(kafka_bootstrap_servers, source, sink, tmp_path)
    job.env["HEADRACE_SESSION_TIMEOUT_MS"] = "6000"
    job.env["HEADRACE_HEARTBEAT_INTERVAL_MS"] = "1000"
    log = tmp_path / "worker.log"
    with worker_process(job.env, ["run", "examples.wordcount:job"], log) as proc:

        def reported() -> bool:
            out = job.cli("status", "examples.wordcount:job").stdout
            return f"-{proc.pid} " in out and "(Stable, 1 member(s))" in out

        wait_for(reported, 60, "the worker in headrace status", proc)
        proc.kill()
        proc.wait()

    def expelled() -> bool:
        out = job.cli("status", "examples.wordcount:job").stdout
        return "(Empty, 0 member(s))" in out or "(Dead, 0 member(s))" in out

    deadline = time.monotonic() + 30
    while not expelled():
        assert time.monotonic() < deadline, "the group never expelled the killed worker"
        await asyncio.sleep(1)
    out = job.cli("status", "examples.wordcount:job").stdout
    assert f"-{proc.pid} " not in out.split("not shown:")[0], out
    assert "workers: none reported" in out, out
    assert "not shown: 1 worker(s) that left or died" in out and str(proc.pid) in out, out


@pytest.fixture
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """A broker of this test's own (own run dir and ports): the outage test stops it, and the
    session's broker may be shared with other runs that must never see an outage."""
    broker = LocalBroker(tmp_path_factory.mktemp("outage-kafka"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.mark.kafka
async def test_a_broker_outage_is_one_warning_per_interval_a_gauge_and_not_ready(
    tmp_path: Path, own_broker: LocalBroker
) -> None:
    """While the broker is down (12 s, past the 10 s session timeout): a handful of log lines
    instead of ~250 a second, headrace_broker_connected 0, /health 200 naming the outage,
    /ready 503. Afterwards the worker is ready again, says so, and the counts are exact.

    The broker is this test's own: stopping the session's broker would take it from every
    other test (and from anyone else sharing it)."""
    bootstrap = own_broker.bootstrap_servers
    suffix = uuid.uuid4().hex[:8]
    source, sink = f"op-out-lines-{suffix}", f"op-out-counts-{suffix}"
    await create_topics(bootstrap, [source, sink], 2)
    first = corpus(300)
    await produce_lines(bootstrap, source, first)
    job = WordCountJob(bootstrap, source, sink, tmp_path)
    port = free_port()
    log = tmp_path / "worker.log"
    args = ["run", "examples.wordcount:job", "--metrics-port", str(port)]
    with worker_process(job.env, args, log) as proc:
        wait_for(lambda: http_get(port, "/ready")[0] == 200, 90, "/ready", proc)
        expected = dict(Counter(w for line in first for w in line.split()))
        assert await wait_for_counts(bootstrap, sink, expected, 60) == expected
        assert total(http_get(port, "/metrics")[1], "headrace_broker_connected") == 1
        assert http_get(port, "/health") == (200, "ok\n")
        before = len(log.read_text().splitlines())
        await asyncio.to_thread(own_broker.stop)
        try:
            await asyncio.sleep(3)
            metrics = http_get(port, "/metrics")[1]
            assert total(metrics, "headrace_broker_connected") == 0
            health, ready = http_get(port, "/health"), http_get(port, "/ready")
            # (once, in CI, /health did not answer here: say whether the worker still ran and
            # what it logged, to find out why the next time)
            seen = (health, ready, proc.poll(), log.read_text()[-4000:])
            assert health[0] == 200 and "broker unreachable since" in health[1], seen
            assert ready[0] == 503 and "broker unreachable since" in ready[1], seen
            await asyncio.sleep(9)
            assert total(http_get(port, "/metrics")[1], "headrace_broker_connected") == 0
            assert http_get(port, "/ready")[0] == 503
            during = log.read_text().splitlines()[before:]
        finally:
            await asyncio.to_thread(own_broker.start)
        # one line when it starts, one summary per 10 s, and whatever else is new (a lease
        # expiring, a rejoin): nowhere near the ~3,000 lines aiokafka writes in 12 s
        shown = "\n".join(during)
        assert len(during) <= 12, shown
        assert sum("cannot reach the broker" in line for line in during) == 1, shown
        summaries = [line for line in during if "broker still unreachable" in line]
        assert len(summaries) == 1 and "connection errors in the last 1" in summaries[0], shown
        raw = [
            line for line in during if line.split()[3:4] and line.split()[3].startswith("aiokafka")
        ]
        assert not any(m in line for line in raw for m in CONNECTION_FAILURES), shown

        def recovered() -> bool:
            text = http_get(port, "/metrics")[1]
            return total(text, "headrace_broker_connected") == 1 and (
                http_get(port, "/ready")[0] == 200
            )

        wait_for(recovered, 90, "the broker gauge and /ready after the outage", proc)
        assert http_get(port, "/health") == (200, "ok\n")
        assert "broker reachable again" in log.read_text()
        more = corpus(100)
        await produce_lines(bootstrap, source, more)
        expected = dict(Counter(w for line in first + more for w in line.split()))
        assert await wait_for_counts(bootstrap, sink, expected, 90) == expected
    assert proc.returncode == 0, log.read_text()[-3000:]


@pytest.mark.kafka
async def test_ready_after_restore_on_restart(
    kafka_bootstrap_servers: str, topic_factory: Any, tmp_path: Path
) -> None:
    """A second worker life restores the counts from the changelog, then turns ready; its
    restore-progress series are gone once restored, and counts continue exactly."""
    source = await topic_factory("op-lines", partitions=2)
    sink = await topic_factory("op-counts", partitions=2)
    first, second = corpus(500), corpus(700)[500:]
    job = WordCountJob(kafka_bootstrap_servers, source, sink, tmp_path)
    await produce_lines(kafka_bootstrap_servers, source, first)
    expected = dict(Counter(w for line in first for w in line.split()))
    port = free_port()
    args = ["run", "examples.wordcount:job", "--metrics-port", str(port)]
    with worker_process(job.env, args, tmp_path / "w1.log") as proc:
        assert await wait_for_counts(kafka_bootstrap_servers, sink, expected, 120) == expected
    assert proc.returncode == 0

    await produce_lines(kafka_bootstrap_servers, source, second)
    expected = dict(Counter(w for line in first + second for w in line.split()))
    with worker_process(job.env, args, tmp_path / "w2.log") as proc:
        wait_for(lambda: http_get(port, "/ready")[0] == 200, 90, "/ready after restore", proc)
        assert await wait_for_counts(kafka_bootstrap_servers, sink, expected, 120) == expected
        text = http_get(port, "/metrics")[1]
        assert total(text, "headrace_ready") == 1
        assert samples(text, "headrace_restore_records_total") == []
    assert proc.returncode == 0
    assert "restored task(s)" in (tmp_path / "w2.log").read_text()


# -- no broker needed ----------------------------------------------------------------------------


def test_status_render_shows_restore_progress_bars() -> None:
    status = JobStatus(
        job="wc",
        groups=[
            GroupStatus(
                "wc.stage1",
                "stage1",
                "Stable",
                [
                    Member(
                        "headrace-stage1-abc", "headrace-stage1", "10.0.0.7", [("r", 0), ("r", 1)]
                    )
                ],
                {("r", 0): (90, 100), ("r", 1): (None, 5)},
            )
        ],
        workers=[
            {
                "worker": "pod-0-1",
                "ready": False,
                "timestamp_ms": 10_000,
                "interval_s": 5,
                "stages": {
                    "stage1": {
                        "running": [0],
                        "restoring": [1],
                        "restores": {"1:wc.counts.changelog": {"restored": 2500, "total": 10000}},
                    }
                },
            }
        ],
        checkpoints=[CheckpointSummary(7, {"stage1/0"}, {"stage1/0", "stage1/1"}, True, 3.0)],
        now_ms=11_000,
        gone=[{"worker": "pod-9-9"}],
    )
    out = render(status)
    assert "last complete checkpoint: none yet" in out
    assert "group wc.stage1 (Stable, 1 member(s))" in out
    assert "headrace-stage1-abc" in out and "10.0.0.7" in out and "0,1" in out
    assert "r/0" in out and " ~10" in out  # no data lag measured: the offset difference
    assert "not shown: 1 worker(s) that left or died (pod-9-9)" in out
    assert "0 +restoring 1" in out
    assert "restores under way" in out
    bar = next(line for line in out.splitlines() if "wc.counts.changelog" in line)
    assert "stage1/1" in bar and "25.0%" in bar and "2,500/10,000" in bar
    assert progress_bar(5, 10, width=10) == "[#####.....]  50.0%  5/10"
    assert progress_bar(0, 0, width=4) == "[####] 100.0%  0/0"


def test_live_workers_are_the_members_of_the_groups() -> None:
    from headrace.runtime.status import live_workers

    groups = [GroupStatus("wc.stage0", "stage0", "Stable", [Member("m-1", "c", "h", [])])]
    alive = {"worker": "a", "timestamp_ms": 0, "stages": {"stage0": {"member_id": "m-1"}}}
    killed = {"worker": "k", "timestamp_ms": 99_000, "stages": {"stage0": {"member_id": "m-0"}}}
    joining = {"worker": "j", "timestamp_ms": 99_000, "interval_s": 5, "stages": {}}
    silent = {"worker": "s", "timestamp_ms": 0, "interval_s": 5, "stages": {}}
    live, gone = live_workers([alive, killed, joining, silent], groups, now_ms=100_000)
    assert [w["worker"] for w in live] == ["a", "j"]
    assert [w["worker"] for w in gone] == ["k", "s"]


def test_collector_reports_restore_progress_and_counters() -> None:
    """The scrape-time collector reads the worker's view: tasks, restore progress, counters."""
    from headrace.runtime.metrics import WorkerMetrics
    from headrace.runtime.task import TaskCounters
    from headrace.runtime.view import RestoreProgress, StageSnapshot

    counters = TaskCounters(records_in=12, records_out=3, skipped=2, dead_lettered=1)
    snapshot = StageSnapshot(
        "stage1",
        running={0: counters},
        restoring=[1],
        restores=[RestoreProgress(1, "wc.counts.changelog", 400, 1000)],
    )
    worker = SimpleNamespace(
        job=SimpleNamespace(name="wc"),
        worker_id="w-1",
        stage_snapshots=lambda: [snapshot],
        ready=lambda: False,
        broker_connected=lambda: False,
    )
    metrics = WorkerMetrics(worker)  # type: ignore[arg-type]
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    assert total(text, "headrace_restore_records_restored", partition="1") == 400
    assert total(text, "headrace_restore_records_total", partition="1") == 1000
    assert total(text, "headrace_records_in_total", partition="0") == 12
    assert total(text, "headrace_records_skipped_total") == 2
    assert total(text, "headrace_records_dead_lettered_total") == 1
    assert total(text, "headrace_tasks", state="restoring") == 1
    assert total(text, "headrace_ready") == 0
    assert total(text, "headrace_broker_connected") == 0
    # registries are per worker: a second one starts empty and does not clash
    other = WorkerMetrics(worker)  # type: ignore[arg-type]
    assert other.registry is not metrics.registry


def test_json_logs_mask_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    monkeypatch.setenv("HEADRACE_SASL_PASSWORD", SECRET)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "pw=%s", (SECRET,), None)
    record.task = "stage0/1"
    assert RedactingFilter().filter(record)
    line = JsonFormatter().format(record)
    obj = json.loads(line)
    assert obj["message"] == "pw=***" and obj["task"] == "stage0/1" and obj["level"] == "INFO"
    assert SECRET not in line


async def test_the_ops_server_binds_loopback_unless_told_otherwise() -> None:
    from headrace.runtime.config import Settings
    from headrace.runtime.metrics import OpsServer

    worker = SimpleNamespace(job=SimpleNamespace(name="wc"), worker_id="w-1")
    for host, expected in ((Settings().metrics_host, {"127.0.0.1"}), ("0.0.0.0", {"0.0.0.0"})):
        server = OpsServer(worker, SimpleNamespace(), 0, host=host)  # type: ignore[arg-type]
        await server.start()
        try:
            assert server._server is not None
            bound = {sock.getsockname()[0] for sock in server._server.sockets}
            assert bound == expected, bound
        finally:
            await server.stop()
