"""Event time through JobTester: watermarks, timers, windows, late data, crashes.

The window tests compare the emitted results of random out-of-order streams (with crashes at
random points) with a batch computation over the same records under the lateness rule of
operators/windows.py: the watermark before a record is the highest event time seen so far
minus the out-of-orderness.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headrace import (
    BYTES,
    JSON,
    MIN_WATERMARK,
    STR,
    Hopping,
    Job,
    JobTester,
    Operator,
    Session,
    Sliding,
    Tumbling,
    ValueStateDescriptor,
    Watermarks,
)

OOO_MS = 2_000
LATENESS_MS = 1_000


def window_job(windows: Any, *, late: str | None = "late", emit: str = "final") -> Job:
    job = Job("ev")
    (
        job.source(
            "views",
            key_serde=STR,
            value_serde=JSON,
            timestamp=lambda v: v["ts"],
            watermarks=Watermarks(out_of_orderness=OOO_MS / 1000),
        )
        .window(windows, allowed_lateness=LATENESS_MS / 1000, late_topic=late, emit=emit)
        .count(name="per-window")
        .sink("counts", key_serde=STR, value_serde=JSON)
    )
    return job


def model(
    events: list[tuple[str, int]], assign: Any, session_gap: int | None = None
) -> tuple[Counter[tuple[str, int, int, int]], list[tuple[str, int]]]:
    """The batch computation: (key, start, end, count) of every window, and the late records."""
    wm, highest = MIN_WATERMARK, MIN_WATERMARK
    kept: list[tuple[str, int]] = []
    pairs: Counter[tuple[str, int, int]] = Counter()
    late = []
    for key, ts in events:
        if session_gap is not None:
            if wm != MIN_WATERMARK and ts < wm - LATENESS_MS:
                late.append((key, ts))
            else:
                kept.append((key, ts))
        else:
            windows = assign(ts)
            open_ = [(s, e) for s, e in windows if wm < e + LATENESS_MS]
            for s, e in open_:
                pairs[(key, s, e)] += 1
            if len(open_) < len(windows):
                late.append((key, ts))
        highest = max(highest, ts)
        wm = max(wm, highest - OOO_MS)
    if session_gap is not None:
        by_key: dict[str, list[int]] = {}
        for key, ts in kept:
            by_key.setdefault(key, []).append(ts)
        for key, stamps in by_key.items():
            stamps.sort()
            start, end, n = stamps[0], stamps[0] + session_gap, 0
            for ts in stamps:
                if ts >= end:
                    pairs[(key, start, end)] = n
                    start, n = ts, 0
                end = max(end, ts + session_gap)
                n += 1
            pairs[(key, start, end)] = n
    return Counter({(k, s, e, n): 1 for (k, s, e), n in pairs.items()}), late


def emitted(tester: JobTester) -> Counter[tuple[str, int, int, int]]:
    return Counter((k, v["start"], v["end"], v["value"]) for k, v in tester.output("counts"))


def late_records(tester: JobTester) -> list[tuple[str, int]]:
    return [(r.key.decode(), JSON.deserialize(r.value)["ts"]) for r in tester.records("late")]  # type: ignore[union-attr,arg-type]


def run_stream(
    job: Job, events: list[tuple[str, int]], crashes: set[int], guarantee: str
) -> JobTester:
    tester = JobTester(job, partitions=1, guarantee=guarantee)
    for i, (key, ts) in enumerate(events):
        tester.send("views", {"ts": ts}, key=key)
        if i in crashes:
            tester.run()
            tester.crash()  # uncommitted work (and fired timers) is lost
        elif i % 7 == 0:
            tester.checkpoint()
    tester.checkpoint()
    tester.advance_watermark(10**12)  # the end of time: every window closes
    tester.checkpoint()
    return tester


events_strategy = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 60_000)), min_size=1, max_size=60
)
crash_strategy = st.sets(st.integers(0, 59), max_size=3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=events_strategy, crashes=crash_strategy)
def test_tumbling_windows_equal_the_batch_computation(
    events: list[tuple[str, int]], crashes: set[int]
) -> None:
    expected, late = model(events, Tumbling(10.0).assign)
    with run_stream(window_job(Tumbling(10.0)), events, crashes, "exactly_once") as tester:
        assert emitted(tester) == expected
        assert late_records(tester) == late
        assert tester.state("per-window") == {}  # closed windows and fired timers are gone


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=events_strategy, crashes=crash_strategy)
def test_hopping_windows_equal_the_batch_computation(
    events: list[tuple[str, int]], crashes: set[int]
) -> None:
    windows = Hopping(10.0, 5.0)
    expected, late = model(events, windows.assign)
    with run_stream(window_job(windows), events, crashes, "exactly_once") as tester:
        assert emitted(tester) == expected
        assert late_records(tester) == late


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=events_strategy, crashes=crash_strategy)
def test_session_windows_equal_the_batch_computation(
    events: list[tuple[str, int]], crashes: set[int]
) -> None:
    expected, late = model(events, None, session_gap=3_000)
    with run_stream(window_job(Session(3.0)), events, crashes, "exactly_once") as tester:
        assert emitted(tester) == expected
        assert late_records(tester) == late
        assert tester.state("per-window") == {}


def sliding_model(
    events: list[tuple[str, int]], size: int
) -> tuple[Counter[tuple[str, int, int, int]], list[tuple[str, int]]]:
    """Per key and distinct time t of a record that was not late: the records in [t - size, t]
    (a record is late when the watermark before it reached t + lateness)."""
    wm, highest = MIN_WATERMARK, MIN_WATERMARK
    kept: dict[str, list[int]] = {}
    late = []
    for key, ts in events:
        if wm >= ts + LATENESS_MS:
            late.append((key, ts))
        else:
            kept.setdefault(key, []).append(ts)
        highest = max(highest, ts)
        wm = max(wm, highest - OOO_MS)
    out: Counter[tuple[str, int, int, int]] = Counter()
    for key, stamps in kept.items():
        for t in set(stamps):
            out[(key, t - size, t, sum(1 for s in stamps if t - size <= s <= t))] += 1
    return out, late


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=events_strategy, crashes=crash_strategy)
def test_sliding_windows_equal_the_batch_computation(
    events: list[tuple[str, int]], crashes: set[int]
) -> None:
    expected, late = sliding_model(events, 5_000)
    with run_stream(window_job(Sliding(5.0)), events, crashes, "exactly_once") as tester:
        assert emitted(tester) == expected
        assert late_records(tester) == late
        assert tester.state("per-window") == {}


def test_sliding_windows_in_update_mode_emit_every_window_a_record_changes() -> None:
    with JobTester(window_job(Sliding(5.0), emit="update"), partitions=1) as tester:
        for ts in (10_000, 12_000, 11_000):
            tester.send("views", {"ts": ts}, key="a")
        tester.checkpoint()
        out = [(v["end"], v["value"]) for _, v in tester.output("counts")]
        # 11 s arrives last: its own window and the one ending at 12 s change
        assert out == [(10_000, 1), (12_000, 2), (11_000, 2), (12_000, 3)]


def test_at_least_once_final_results_are_right_and_may_repeat() -> None:
    events = [("a", t) for t in (1_000, 4_000, 12_000, 2_000, 25_000, 13_000, 40_000)]
    expected, _ = model(events, Tumbling(10.0).assign)
    with run_stream(window_job(Tumbling(10.0)), events, {2, 5}, "at_least_once") as tester:
        assert set(emitted(tester)) == set(expected)


def test_results_carry_the_window_end_as_event_time_and_updates_are_emitted() -> None:
    with JobTester(window_job(Tumbling(10.0), emit="update"), partitions=1) as tester:
        for ts in (1_000, 3_000, 15_000):
            tester.send("views", {"ts": ts}, key="a")
        tester.checkpoint()
        out = tester.output_with_timestamps("counts")
        assert [(v["start"], v["value"], ts) for _, v, ts in out] == [
            (0, 1, 10_000),
            (0, 2, 10_000),
            (10_000, 1, 20_000),
        ]
        tester.advance_watermark(10**9)
        tester.checkpoint()
        assert len(tester.output("counts")) == 3  # update mode emits nothing more at close


def test_late_records_without_a_topic_are_counted_as_skipped() -> None:
    with JobTester(window_job(Tumbling(10.0), late=None), partitions=1) as tester:
        for ts in (1_000, 30_000, 2_000):
            tester.send("views", {"ts": ts}, key="a")
        tester.checkpoint()
        counters = tester.tasks[("stage0", 0)].task.counters
        assert (counters.late, counters.skipped) == (1, 1)


class Reminder(Operator):
    """Emits the last value of a key when nothing came for it for 10 s of event time."""

    last = ValueStateDescriptor[Any](serde=JSON)

    def process(self, record: Any, ctx: Any) -> None:
        previous = self.last.value()
        if previous is not None:
            ctx.timers.delete_event_time(previous["ts"] + 10_000)
        self.last.update(record.value)
        ctx.timers.register_event_time(record.timestamp + 10_000)

    def on_timer(self, key: Any, timestamp: int, ctx: Any) -> None:
        ctx.emit({"quiet": key, "last": self.last.value()["ts"], "at": timestamp})
        self.last.clear()


def reminder_job() -> Job:
    job = Job("rem")
    (
        job.source("in", key_serde=STR, value_serde=JSON, timestamp=lambda v: v["ts"])
        .key_by(lambda v: v["k"], key_serde=STR, value_serde=JSON)
        .process(Reminder(), name="reminder")
        .sink("out", key_serde=STR, value_serde=JSON)
    )
    return job


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_a_timer_that_fired_before_a_crash_fires_once_and_deleted_timers_never(
    guarantee: str,
) -> None:
    with JobTester(reminder_job(), partitions=2, guarantee=guarantee) as tester:
        tester.send("in", {"k": "a", "ts": 1_000})
        tester.send("in", {"k": "a", "ts": 5_000})  # deletes the timer at 11 s
        tester.send("in", {"k": "b", "ts": 2_000})
        tester.checkpoint()
        tester.checkpoint()
        # the watermark passes b's and a's timers, then the task dies before the checkpoint
        tester.crash_during_next_checkpoint("after-changelog")
        tester.advance_watermark(20_000)
        tester.checkpoint()  # restored: the timers are state again and fire again
        tester.advance_watermark(20_000)
        tester.checkpoint()
        out = sorted((v["quiet"], v["last"], v["at"]) for _, v in tester.output("out"))
        if guarantee == "exactly_once":
            assert out == [("a", 5_000, 15_000), ("b", 2_000, 12_000)]
        else:
            assert sorted(set(out)) == [("a", 5_000, 15_000), ("b", 2_000, 12_000)]
        assert tester.state("reminder") == {}


class Quiet(Operator):
    """Processing time: emits a key that saw nothing for 30 s of wall clock."""

    seen = ValueStateDescriptor[int](type=int, default=0)

    def process(self, record: Any, ctx: Any) -> None:
        self.seen.update(self.seen.value() + 1)
        ctx.timers.register_processing_time(ctx.processing_time() + 30_000)

    def on_timer(self, key: Any, timestamp: int, ctx: Any) -> None:
        ctx.emit(self.seen.value())
        self.seen.clear()


def test_processing_time_timers_fire_when_the_clock_passes_them_also_after_a_restore() -> None:
    job = Job("pt")
    job.source("in", key_serde=STR, value_serde=JSON).process(Quiet(), name="quiet").sink(
        "out", key_serde=STR, value_serde=JSON
    )
    with JobTester(job, partitions=1) as tester:
        tester.send("in", 1, key="x")
        tester.send("in", 2, key="x")
        tester.checkpoint()
        tester.advance_clock(20)
        tester.checkpoint()
        assert tester.output("out") == []
        tester.crash()
        tester.advance_clock(15)
        tester.checkpoint()
        assert tester.output("out") == [("x", 2)]
        assert tester.state("quiet") == {}


def test_the_watermark_behind_a_key_by_is_the_minimum_of_upstreams_and_idle_ones_let_go() -> None:
    job = Job("two")
    (
        job.source(
            "in",
            value_serde=JSON,
            timestamp=lambda v: v["ts"],
            watermarks=Watermarks(out_of_orderness=1.0, idle_timeout=5.0),
        )
        .key_by(lambda v: v["k"], key_serde=STR, value_serde=JSON)
        .window(Tumbling(10.0))
        .count(name="c")
        .sink("out", key_serde=STR, value_serde=JSON)
    )
    with JobTester(job, partitions=2) as tester:
        tester.send("in", {"k": "a", "ts": 50_000}, partition=0)
        tester.send("in", {"k": "a", "ts": 8_000}, partition=1)
        for _ in range(3):
            tester.checkpoint()
        assert tester.watermark("stage0", 0) == 49_000
        assert [tester.watermark("stage1", p) for p in (0, 1)] == [7_000, 7_000]
        assert tester.output("out") == []
        tester.advance_clock(6)  # partition 1 (and 0) idle for longer than idle_timeout
        tester.send("in", {"k": "a", "ts": 60_000}, partition=0)
        for _ in range(3):
            tester.checkpoint()
        assert [tester.watermark("stage1", p) for p in (0, 1)] == [59_000, 59_000]
        # [0, 10 s) closed; [50 s, 60 s) waits for a watermark of 60 s
        assert [(v["start"], v["value"]) for _, v in tester.output("out")] == [(0, 1)]
        tester.crash()
        tester.run()
        assert tester.watermark("stage1", 0) == 59_000  # restored from the checkpoint


def test_the_watermark_follows_the_wall_clock_when_every_input_is_idle() -> None:
    job = Job("quiet")
    (
        job.source(
            "in",
            key_serde=STR,
            value_serde=JSON,
            watermarks=Watermarks(out_of_orderness=1.0, idle_timeout=5.0, advance_when_idle=True),
        )
        .window(Tumbling(10.0))
        .count(name="c")
        .sink("out", key_serde=STR, value_serde=JSON)
    )
    with JobTester(job, partitions=1) as tester:
        now_ms = int(tester.now * 1000)
        tester.send("in", {}, key="a", timestamp=now_ms)
        tester.checkpoint()
        assert tester.output("out") == []
        tester.advance_clock(20)  # quiet: the watermark moves to now - 5 s - 1 s
        tester.checkpoint()
        assert tester.watermark() >= now_ms + 20_000 - 6_000 - 1_000
        assert [v["value"] for _, v in tester.output("out")] == [1]


def test_timer_state_makes_an_operator_stateful_and_jobs_without_event_time_track_nothing() -> None:
    assert "_hr_timers" in vars(Reminder)
    assert reminder_job().event_time
    plain = Job("plain")
    plain.source("in").count(name="n").sink("o", key_serde=BYTES)
    assert not plain.event_time
    with JobTester(plain, partitions=1) as tester:
        tester.send("in", b"x", key=b"k")
        tester.checkpoint()
        assert tester.tasks[("stage0", 0)].task.time is None


class Expire(Operator):
    """Per key: counts records and, 5 s of event time after the first, emits the count (and
    forgets it) once per key and round."""

    n = ValueStateDescriptor[int](type=int, default=0)

    def process(self, record: Any, ctx: Any) -> None:
        if self.n.value() == 0:
            ctx.timers.register_event_time(record.timestamp + 5_000)
        self.n.update(self.n.value() + 1)

    def on_timer(self, key: Any, timestamp: int, ctx: Any) -> None:
        ctx.emit({"key": key, "n": self.n.value()})
        self.n.clear()


@pytest.mark.parametrize("partitions", [1, 2])
@pytest.mark.parametrize("topics", [("a",), ("a", "b")])
def test_timer_outputs_across_a_hop_under_at_least_once_are_never_lost(
    partitions: int, topics: tuple[str, ...]
) -> None:
    """Timers of a source stage fire into a key_by; crashes after their outputs were written
    replay them. One input: the downstream state stays exact (timer outputs are sequenced as
    outputs of the record that moved the watermark, and their replays dropped). Two
    co-partitioned inputs: the watermark depends on how batches interleave, so timer outputs
    are not sequenced: they may count twice, never go missing."""
    job = Job("hop")
    (
        job.source(*topics, key_serde=STR, value_serde=JSON, timestamp=lambda v: v["ts"])
        .process(Expire(), name="expire")
        .key_by(lambda v: "all", key_serde=STR, value_serde=JSON)
        .sum(lambda v: v["n"], name="total")
        .sink("out", key_serde=STR, value_serde=JSON)
    )
    with JobTester(job, partitions=partitions, guarantee="at_least_once") as tester:
        sent = 0
        for i in range(60):
            topic = topics[0] if i % 3 else topics[-1]
            tester.send(topic, {"ts": i * 1_000}, key=f"k{i % 4}")
            sent += 1
            if i % 11 == 10:
                tester.run()  # timers fire (the watermark passed them): outputs pending
                tester.crash_during_next_checkpoint("after-changelog")
                tester.checkpoint()  # outputs written, offsets not committed: all replayed
            elif i % 5 == 0:
                tester.checkpoint()
        tester.advance_watermark(10**9)
        for _ in range(3):
            tester.checkpoint()
        total = tester.state("total")[("acc", "all")]
        assert total == sent if len(topics) == 1 else total >= sent
        if len(topics) == 1:  # the replays came, and were recognised
            stage1 = [io for (stage, _), io in tester.tasks.items() if stage == "stage1"]
            assert sum(io.task.counters.deduplicated for io in stage1) > 0
