"""kill -9 of real worker processes, at random moments and inside checkpoints and restores.

Each run produces a seeded corpus while workers are killed (random SIGKILLs, plus workers that
kill themselves via HEADRACE_FAULT_PHASE after writing the changelog, after committing, and in
the middle of a restore), then checks output and changelog state against the replay.
"""

from __future__ import annotations

import asyncio

import pytest
from scenario import MakeRun, WordcountRun
from test_pause import PAUSE_S, ZOMBIE_ENV

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]


async def _kill_storm(run: WordcountRun, *, lines: int, rate: float, rounds: int = 1) -> None:
    """Random kill -9 interleaved with crashes at every checkpoint phase (>= 6 per round)."""
    d = run.driver
    producer = run.produce(lines, rate=rate)
    d.start_worker()
    d.start_worker()
    # a worker paused past its session timeout while the kills go on: it comes back a zombie
    zombie = asyncio.create_task(d.pause(pause_s=PAUSE_S))
    for _ in range(rounds):
        await d.random_kills(1, interval=(1.5, 2.5))
        await d.crash_at_phase("after-changelog", after=2)
        await d.random_kills(1, interval=(0.5, 1.5))
        await d.crash_at_phase("after-commit", after=2)
        # A fresh slot has no local state: it restores from the changelog and dies in it.
        await run.crash_during_restore()
        await d.random_kills(1, interval=(0.5, 1.5))
    await zombie
    await producer
    assert d.count("kill9") + d.count("phase-crash") >= 6 * rounds


@pytest.mark.parametrize(
    ("guarantee", "backend"),
    [
        ("exactly_once", "memory"),
        ("at_least_once", "rocksdb"),
        # the other two combinations run in CI's extended pass (the default suite has a time
        # budget; each guarantee and each backend meets the storm in it)
        pytest.param("exactly_once", "rocksdb", marks=pytest.mark.extended),
        pytest.param("at_least_once", "memory", marks=pytest.mark.extended),
    ],
)
async def test_kill9_at_random_and_inside_checkpoints_loses_and_duplicates_nothing(
    wordcount_run: MakeRun, guarantee: str, backend: str
) -> None:
    """exactly_once: per word the output is exactly 1..count, state = replay.
    at_least_once: state = replay, output may repeat but never skips."""
    run = await wordcount_run(guarantee, backend, seed=11, env=ZOMBIE_ENV)
    await _kill_storm(run, lines=2400, rate=400)
    report = await run.finish_and_verify()
    run.assert_ok(report)
    # Nothing here asserts that a restart *reused* RocksDB stores: whether a restart in a killed
    # worker's slot is assigned a partition that worker had flushed a store for depends on where
    # the random kills and rebalances landed (CI saw both outcomes on the same seed). Reuse is
    # pinned deterministically by the test below; the storm checks that with whatever stores the
    # slots held, the data invariant is exact.


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
async def test_rocksdb_local_state_is_reused_after_kill9_and_only_the_tail_replayed(
    wordcount_run: MakeRun, guarantee: str
) -> None:
    """One worker owns every task; kill -9 mid-stream; the restart in the same slot (same state
    dir) reuses its RocksDB stores, replays only the changelog tail, and counts stay exact."""
    run = await wordcount_run(guarantee, "rocksdb", seed=12)
    d = run.driver
    producer = run.produce(2000, rate=400)
    first = d.start_worker(slot=0)
    await asyncio.sleep(4.0)
    await d.kill(first)
    second = d.start_worker(slot=0)
    await producer
    report = await run.finish_and_verify(workers=1)
    run.assert_ok(report)
    log = second.log()
    assert "reusing local state" in log, run.diagnostics()
    assert "rebuilding" not in log, run.diagnostics()
