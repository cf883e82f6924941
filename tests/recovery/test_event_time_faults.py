"""Event-time windows against the real broker, through kill -9 and checkpoint-phase crashes.

``examples.windows`` counts page views per user in 10 s tumbling windows (or sessions) of event
time, with late data to a side topic. Two workers run while views are produced near the wall
clock (out of order by up to 1.5 s, within the 2 s the job allows) plus a set of views two
minutes old, which must all be late; workers are killed at random and inside checkpoints, and a
rebalance storm moves partitions between them (joins, SIGTERM leaves, kill -9); after
the input stops, the watermark follows the wall clock (``advance_when_idle``), so the last
windows close without more input. The expected results are a batch computation over the input
read back from Kafka, per partition in offset order, under the lateness rule of
operators/windows.py (the same model as tests/unit/test_event_time.py):

* ``exactly_once``: every window's final result is committed exactly once and equals the batch
  computation; the late topic holds exactly the late views, once each;
* ``at_least_once``: the same results and late views, each possibly more than once.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from scenario import REPO
from test_pause import ZOMBIE_ENV

from examples import windows as example
from headrace.operators.serde import JSON, STR
from headrace.operators.time import MIN_WATERMARK
from headrace.operators.windows import Tumbling
from headrace.runtime.pytest_plugin import TopicFactory
from headrace.runtime.recovery import FaultDriver, produce_paced
from headrace.runtime.recovery.verify import read_topic

PARTITIONS = 4
OOO = int(example.OUT_OF_ORDERNESS_S * 1000)
LATENESS = int(example.LATENESS_S * 1000)
GAP = int(example.SESSION_GAP_S * 1000)


def views(count: int, rate: float, seed: int) -> tuple[list[bytes], list[bytes]]:
    """``count`` views of 40 users paced at ``rate``/s: event time = when it is due to be sent
    minus up to 1.5 s, and every 97th view two minutes old (late whatever happens)."""
    rng = random.Random(seed)
    start = int(time.time() * 1000) + 500
    values, keys = [], []
    for i in range(count):
        due = start + int(i * 1000 / rate)
        ts = due - 120_000 if i % 97 == 50 else due - rng.randint(0, 1_500)
        values.append(JSON.serialize({"page": f"/p{rng.randint(0, 9)}", "ts": ts}))
        keys.append(b"user-%d" % rng.randint(0, 39))
    return values, keys


def batch_model(
    rows: list[tuple[int, int, Any, Any, Any]], kind: str
) -> tuple[Counter[tuple[str, int, int, int]], Counter[tuple[str, int]]]:
    """Per partition in offset order: the windows' final counts and the late views."""
    windows: Counter[tuple[str, int, int]] = Counter()
    kept: dict[str, list[int]] = {}
    late: Counter[tuple[str, int]] = Counter()
    highest: dict[int, int] = {}
    assign = Tumbling(example.WINDOW_S).assign
    for partition, _, key, value, _ in rows:
        ts = value["ts"]
        top = highest.get(partition, MIN_WATERMARK)
        wm = top - OOO if top != MIN_WATERMARK else MIN_WATERMARK
        if kind == "session":
            if wm != MIN_WATERMARK and ts < wm - LATENESS:
                late[(key, ts)] += 1
            else:
                kept.setdefault(key, []).append(ts)
        else:
            (start, end) = assign(ts)[0]
            if wm >= end + LATENESS:
                late[(key, ts)] += 1
            else:
                windows[(key, start, end)] += 1
        highest[partition] = max(top, ts)
    for key, stamps in kept.items():
        stamps.sort()
        start, end, n = stamps[0], stamps[0] + GAP, 0
        for ts in stamps:
            if ts >= end:
                windows[(key, start, end)] = n
                start, n = ts, 0
            end = max(end, ts + GAP)
            n += 1
        windows[(key, start, end)] = n
    return Counter({(k, s, e, n): 1 for (k, s, e), n in windows.items()}), late


async def wait_for(check: Callable[[], Any], wait_s: float, driver: FaultDriver) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and driver.any_alive():
        if await check():
            return
        await asyncio.sleep(1.0)


async def start_example(
    topic_factory: TopicFactory,
    fault_driver: Callable[..., FaultDriver],
    kind: str,
    guarantee: str,
    seed: int,
) -> tuple[str, str, str, FaultDriver]:
    """Fresh topics and a fault driver for ``examples.windows`` (nothing started yet)."""
    source = await topic_factory("views", partitions=PARTITIONS)
    sink = await topic_factory(kind, partitions=PARTITIONS)
    late_topic = await topic_factory("late", partitions=1)
    env = {
        "WINDOWS_JOB": f"{kind}-{uuid.uuid4().hex[:8]}",
        "WINDOWS_SOURCE": source,
        "WINDOWS_SINK": sink,
        "WINDOWS_LATE": late_topic,
        "WINDOWS_KIND": kind,
        "HEADRACE_GUARANTEE": guarantee,
        "HEADRACE_CHECKPOINT_INTERVAL_MS": "500",
        **ZOMBIE_ENV,
    }
    driver = fault_driver("examples.windows:job()", env=env, seed=seed, cwd=REPO)
    return source, sink, late_topic, driver


@pytest.mark.parametrize(
    ("guarantee", "kind"),
    [
        ("exactly_once", "tumbling"),
        ("at_least_once", "tumbling"),
        # session windows under both guarantees run in CI's extended pass (the default suite
        # has a time budget)
        pytest.param("exactly_once", "session", marks=pytest.mark.extended),
        pytest.param("at_least_once", "session", marks=pytest.mark.extended),
    ],
)
async def test_windows_are_exact_through_kill9_and_crashes_inside_checkpoints(
    topic_factory: TopicFactory,
    fault_driver: Callable[..., FaultDriver],
    kafka_bootstrap_servers: str,
    guarantee: str,
    kind: str,
) -> None:
    source, sink, late_topic, driver = await start_example(
        topic_factory, fault_driver, kind, guarantee, seed=17
    )
    values, keys = views(3_000, rate=300, seed=17)
    producer = asyncio.create_task(
        produce_paced(kafka_bootstrap_servers, source, values, rate=300, key_of=lambda i: keys[i])
    )
    driver.start_worker()
    driver.start_worker()
    await driver.random_kills(1, interval=(2.0, 3.0))
    await driver.crash_at_phase("after-changelog", after=2)
    # a rebalance storm: workers join, leave with SIGTERM and die by kill -9 while data flows
    await driver.rebalance_storm(3, interval=(0.5, 1.5), max_workers=3)
    await producer
    while len(driver.alive()) < 2:
        driver.start_worker()

    rows = await read_topic(kafka_bootstrap_servers, source, key_serde=STR, value_serde=JSON)
    assert len(rows) == len(values)
    expected, late = batch_model(rows, kind)
    assert sum(late.values()) >= len(values) // 97  # the two-minute-old views, at least
    committed = guarantee == "exactly_once"

    async def results() -> Counter[tuple[str, int, int, int]]:
        out = await read_topic(
            kafka_bootstrap_servers, sink, committed=committed, key_serde=STR, value_serde=JSON
        )
        return Counter((k, v["start"], v["end"], v["value"]) for _, _, k, v, _ in out)

    async def complete() -> bool:
        return set(await results()) >= set(expected)

    # the last windows close once the quiet input lets the watermark follow the wall clock:
    # the last window ends at most 10 s after the last view, and closes 3 s (idle) + 2 s
    # (out-of-orderness) + 2 s (lateness) after that in wall-clock time
    quiet_since = time.monotonic()
    await wait_for(complete, 120, driver)
    closed_after = time.monotonic() - quiet_since
    codes = await driver.stop_all()
    assert all(c == 0 for c in codes.values()), f"{codes}\n{driver.summary()}"
    got = await results()
    late_rows = await read_topic(
        kafka_bootstrap_servers, late_topic, committed=committed, key_serde=STR, value_serde=JSON
    )
    got_late = Counter((k, v["ts"]) for _, _, k, v, _ in late_rows)
    assert driver.faults >= 3, driver.summary()
    assert late_rows, "no late record reached the late topic"
    assert closed_after < 45, f"the last windows closed {closed_after:.0f} s after the input"
    if committed:
        assert got == expected, driver.summary()
        assert got_late == late
    else:
        assert set(got) == set(expected), driver.summary()
        assert set(got_late) == set(late)
    headers = dict(late_rows[0][4])
    assert {"hr.late.windows", "hr.late.watermark", "hr.late.operator"} <= set(headers)


# at-least-once only checks "at least once": it runs in CI's extended pass (pytest -m extended)
# to keep the default suite under its time budget
@pytest.mark.parametrize(
    "guarantee", ["exactly_once", pytest.param("at_least_once", marks=pytest.mark.extended)]
)
async def test_processing_time_timers_fire_once_per_quiet_user_through_kill9(
    topic_factory: TopicFactory,
    fault_driver: Callable[..., FaultDriver],
    kafka_bootstrap_servers: str,
    guarantee: str,
) -> None:
    """``examples.windows`` with a processing-time timer per user (emit the user's views after
    3 s of quiet): which views an emission holds depends on the wall clock, but every view is
    in exactly one committed emission under exactly_once (a timer that fired twice would count
    views twice, a lost one would lose them), and in at least one under at_least_once."""
    source, sink, _, driver = await start_example(
        topic_factory, fault_driver, "inactivity", guarantee, seed=23
    )
    values, keys = views(2_000, rate=250, seed=23)
    # bursts: users go quiet in between, so timers fire while the workers are being killed
    rng = random.Random(23)
    for i in range(len(keys)):
        keys[i] = b"user-%d" % ((i // 200) * 5 + rng.randint(0, 4))
    producer = asyncio.create_task(
        produce_paced(kafka_bootstrap_servers, source, values, rate=250, key_of=lambda i: keys[i])
    )
    driver.start_worker()
    driver.start_worker()
    await driver.random_kills(1, interval=(2.0, 3.0))
    await driver.crash_at_phase("after-changelog", after=2)
    await driver.random_kills(1, interval=(1.0, 2.0))
    await producer
    while len(driver.alive()) < 2:
        driver.start_worker()
    expected = Counter(k.decode() for k in keys)
    committed = guarantee == "exactly_once"

    async def emitted() -> Counter[str]:
        out = await read_topic(
            kafka_bootstrap_servers, sink, committed=committed, key_serde=STR, value_serde=JSON
        )
        total: Counter[str] = Counter()
        for _, _, k, v, _ in out:
            total[k] += v["value"]
        return total

    async def complete() -> bool:
        got = await emitted()
        return all(got[k] >= n for k, n in expected.items())

    await wait_for(complete, 120, driver)
    codes = await driver.stop_all()
    assert all(c == 0 for c in codes.values()), f"{codes}\n{driver.summary()}"
    got = await emitted()
    if committed:
        assert got == expected, driver.summary()
    else:
        assert all(got[k] >= n for k, n in expected.items()), driver.summary()
