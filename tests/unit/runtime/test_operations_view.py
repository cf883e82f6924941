"""What operators are told without a broker: data lag over a tail, which workers are live,
the status table, and why /ready says no."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest

from headrace.runtime.checkpoint.barrier import barrier_headers, channel_headers, sequence
from headrace.runtime.checkpoint.lag import Tail, pending_data
from headrace.runtime.checkpoint.metadata import CheckpointMetadata
from headrace.runtime.metrics import OpsServer, unready_reason
from headrace.runtime.status import GroupStatus, JobStatus, Member, live_workers, render


def test_barriers_are_never_lag() -> None:
    tail = Tail(committed=10, end=20)
    assert not pending_data(barrier_headers(0, 7), 12, tail)
    assert pending_data(channel_headers(0), 12, tail)
    assert pending_data([], 12, tail)  # a source topic's record


def test_records_a_checkpoint_already_covers_are_not_lag() -> None:
    """An aligned cut commits the smallest cut of its channels: channel 1's records below its
    own cut (15) were processed before the checkpoint and are skipped on restore."""
    tail = Tail(10, 20, checkpoint=CheckpointMetadata(7, skip={1: 15}))
    assert not pending_data(channel_headers(1), 12, tail)
    assert pending_data(channel_headers(1), 15, tail)
    assert pending_data(channel_headers(0), 12, tail)


def test_at_least_once_replays_at_or_below_the_seen_mark_are_not_lag() -> None:
    from headrace.runtime.checkpoint.barrier import SEQUENCE_HEADER, dedupe_slot

    seen = sequence(100, 0, 0)
    tail = Tail(10, 20, checkpoint=CheckpointMetadata(7, seen={dedupe_slot(2, seen): seen}))

    def record(offset: int) -> list[tuple[str, bytes]]:
        return [*channel_headers(2), (SEQUENCE_HEADER, b"%d" % sequence(offset, 0, 0))]

    assert not pending_data(record(100), 11, tail)
    assert pending_data(record(101), 12, tail)


def test_foreign_headers_on_a_source_topic_are_data() -> None:
    tail = Tail(0, 5, checkpoint=CheckpointMetadata(1, skip={0: 3}))
    assert pending_data([("hr.ch", b"not-a-number")], 1, tail)


def test_a_tail_starts_at_the_commit_or_what_retention_left() -> None:
    assert Tail(None, 50).start == 0
    assert Tail(None, 50, beginning=20).start == 20
    assert Tail(30, 50, beginning=20).start == 30
    assert Tail(10, 50, beginning=20).start == 20


def _worker(name: str, ts: int, **stages: dict[str, Any]) -> dict[str, Any]:
    return {"worker": name, "ready": True, "timestamp_ms": ts, "interval_s": 5, "stages": stages}


def test_a_stage_expelled_from_its_group_is_shown_without_tasks() -> None:
    groups = [
        GroupStatus("wc.stage0", "stage0", "Stable", [Member("m0", "c", "h", [("t", 0)])]),
        GroupStatus("wc.stage1", "stage1", "Stable", [Member("other", "c", "h", [("r", 0)])]),
    ]
    w = _worker(
        "pod-1",
        99_000,
        stage0={"member_id": "m0", "running": [0]},
        stage1={"member_id": "m1-old", "running": [0]},
    )
    live, gone = live_workers([w], groups, now_ms=100_000)
    assert gone == [] and live[0]["stages"]["stage0"]["running"] == [0]
    assert live[0]["stages"]["stage1"] == {"member_id": "m1-old", "not_member": True}
    out = render(JobStatus("wc", groups, live, [], 100_000))
    row = next(line for line in out.splitlines() if line.lstrip().startswith("pod-1"))
    assert "not a member" in row and row.split()[1] == "yes", row


def test_a_member_that_stopped_publishing_is_shown_stale() -> None:
    groups = [GroupStatus("wc.stage0", "stage0", "Stable", [Member("m0", "c", "h", [])])]
    w = _worker("pod-2", 10_000, stage0={"member_id": "m0", "running": [0, 1]})
    live, _ = live_workers([w], groups, now_ms=100_000)
    out = render(JobStatus("wc", groups, live, [], 100_000))
    row = next(line for line in out.splitlines() if line.lstrip().startswith("pod-2"))
    assert row.split()[1] == "stale" and "0,1" in row, row


def test_event_time_watermarks_are_shown_per_task_with_their_lag() -> None:
    groups = [GroupStatus("wc.stage0", "stage0", "Stable", [Member("m0", "c", "h", [])])]
    w = _worker(
        "pod-3",
        99_000,
        stage0={"member_id": "m0", "running": [0, 1], "watermarks": {"0": 88_000, "1": 40_000}},
    )
    live, _ = live_workers([w], groups, now_ms=100_000)
    out = render(JobStatus("wc", groups, live, [], 100_000)).splitlines()
    at = out.index("event-time watermarks (ms)")
    assert out[at + 1].split()[:3] == ["stage0/0", "88000", "12.0s"], out
    assert out[at + 2].split()[:3] == ["stage0/1", "40000", "60.0s"], out


class FakeWorker(SimpleNamespace):
    def __init__(self, **kw: Any) -> None:
        defaults: dict[str, Any] = dict(
            failure=None,
            stopping=False,
            problem="",
            is_ready=True,
            reason="",
        )
        super().__init__(**{**defaults, **kw})

    def broker_problem(self) -> str:
        return str(self.problem)

    def ready(self) -> bool:
        return bool(self.is_ready)

    def not_ready_reason(self) -> str:
        return str(self.reason)


@pytest.mark.parametrize(
    ("worker", "expected"),
    [
        (FakeWorker(), ""),
        (FakeWorker(failure=ValueError("x")), "the worker failed (ValueError)"),
        (FakeWorker(stopping=True), "stopping"),
        (FakeWorker(problem="broker unreachable since T (k:9092): refused"), "broker unre"),
        (
            FakeWorker(is_ready=False, reason="stage stage0 is joining group wc.stage0"),
            "stage stage0 is joining group wc.stage0",
        ),
    ],
)
def test_why_ready_says_no(worker: FakeWorker, expected: str) -> None:
    reason = unready_reason(worker)
    assert reason.startswith(expected) if expected else reason == ""


async def test_health_stays_200_naming_the_outage_and_ready_turns_503() -> None:
    outage = "broker unreachable since 2026-01-01T00:00:00Z (k:9092): refused"
    server = OpsServer(FakeWorker(problem=outage), SimpleNamespace(), 0)  # type: ignore[arg-type]
    assert await server._route("GET", "/health") == (
        "200 OK",
        "text/plain",
        f"ok; {outage}\n".encode(),
    )
    status, _, body = await server._route("GET", "/ready")
    assert status.startswith("503") and body == f"not ready: {outage}\n".encode()
    server = OpsServer(FakeWorker(failure=RuntimeError("x")), SimpleNamespace(), 0)  # type: ignore[arg-type]
    assert (await server._route("GET", "/health"))[0].startswith("503")


def test_metrics_export_watermarks_and_late_records_per_task() -> None:
    from headrace.runtime.metrics import _TaskCollector
    from headrace.runtime.task.records import TaskCounters
    from headrace.runtime.view import StageSnapshot

    timed = TaskCounters(late=3, watermark=1_000)
    plain = TaskCounters()
    view = SimpleNamespace(
        stage_snapshots=lambda: [StageSnapshot("stage0", running={0: timed, 1: plain})],
        ready=lambda: True,
        broker_connected=lambda: True,
    )
    collector = _TaskCollector(SimpleNamespace(worker=view, job="j", lag={}))  # type: ignore[arg-type]
    found = {
        (s.name, s.labels.get("partition")): s.value
        for family in collector.collect()
        for s in family.samples
    }
    assert found[("headrace_watermark_ms", "0")] == 1_000
    assert ("headrace_watermark_ms", "1") not in found  # no event time: no watermark sample
    assert found[("headrace_late_records_total", "0")] == 3
    assert found[("headrace_watermark_lag_seconds", "0")] > 1_000_000


class _Consumer:
    """aiokafka's consumer as the lag reads it: ends from the last fetch, positions that are
    known at once except for ``waiting`` partitions (a seek waiting for the broker)."""

    def __init__(self, waiting: set[int], behind: bool) -> None:
        self.waiting = waiting
        self.behind = behind  # positions 90 + partition, else at the end (100)

    def last_stable_offset(self, tp: Any) -> int:
        return 100

    async def position(self, tp: Any) -> int:
        if tp.partition in self.waiting:
            await asyncio.sleep(3600)
        return 90 + tp.partition if self.behind else 100


def _lag_worker(
    stage: str, partitions: int, waiting: set[int], *, internal: bool, behind: bool = True
) -> Any:
    from aiokafka.structs import TopicPartition

    from headrace.operators.job import Job
    from headrace.runtime.config import Settings
    from headrace.runtime.worker import Worker

    runner = SimpleNamespace(
        consumer=_Consumer(waiting, behind),
        tasks={p: SimpleNamespace(task=SimpleNamespace(cut=None)) for p in range(partitions)},
        input_tps=lambda p: [TopicPartition("in", p)],
        stage=SimpleNamespace(name=stage, source=SimpleNamespace(internal=internal)),
        restoring=False,
    )
    worker = Worker(Job("lag"), Settings(bootstrap_servers="unused:9092"))
    worker.runners = [runner]  # type: ignore[list-item]
    return worker


async def test_a_scrape_does_not_wait_a_second_per_partition_whose_position_is_pending() -> None:
    """During an outage a consumer's seek can wait for the broker; /metrics then used to wait
    up to a second per such partition, one after the other (64 partitions: over a minute)."""
    worker = _lag_worker("count", 64, waiting=set(range(0, 64, 2)), internal=False)
    started = time.monotonic()
    lag = await worker.input_lag()
    assert time.monotonic() - started < 2
    assert lag == {("count", "in", p): 10 - p for p in range(1, 10, 2)} | {
        ("count", "in", p): 0 for p in range(11, 64, 2)
    }


async def test_a_stage_behind_a_key_by_is_not_drained_while_a_position_is_unknown() -> None:
    worker = _lag_worker("count", 2, waiting={1}, internal=True, behind=False)
    assert not await worker.drained()  # partition 0 is at its end, 1's position not known
    worker.runners[0].consumer.waiting = set()
    assert await worker.drained()
