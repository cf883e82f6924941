"""Soak: more data and more faults (``pytest -m soak tests/recovery``; deselected by default).

``HEADRACE_SOAK_SCALE=N`` multiplies data and fault rounds; ``HEADRACE_SOAK_SEED`` picks the
seed (print it from a failure's driver summary to repeat a run).
"""

from __future__ import annotations

import asyncio
import os

import pytest
from scenario import MakeRun, soak_scale
from test_pause import PAUSE_S, ZOMBIE_ENV, pause_storm

from headrace.runtime.localkafka import LocalBroker

pytestmark = [pytest.mark.kafka, pytest.mark.soak, pytest.mark.timeout(1800)]


@pytest.mark.parametrize("backend", ["memory", "rocksdb"])
@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
async def test_soak_kills_phase_crashes_rebalances_and_broker_restarts_keep_counts_exact(
    wordcount_run: MakeRun, local_broker: LocalBroker, guarantee: str, backend: str
) -> None:
    scale = soak_scale()
    seed = int(os.environ.get("HEADRACE_SOAK_SEED", "1001"))
    run = await wordcount_run(guarantee, backend, seed=seed, env=ZOMBIE_ENV)
    d = run.driver
    producer = run.produce(20_000 * scale, rate=700)
    d.start_worker()
    d.start_worker()
    for round_ in range(3 * scale):
        await d.random_kills(2, interval=(1.0, 3.0))
        await d.crash_at_phase("after-changelog", after=2)
        await d.crash_at_phase("before-commit", after=2)
        await d.crash_at_phase("after-commit", after=2)
        await run.crash_during_restore(slot=10 + round_)  # a fresh slot: no local state
        # zombies: one pause on its own, one during the storm's joins and leaves
        await d.pause(pause_s=PAUSE_S)
        zombie = asyncio.create_task(d.pause(pause_s=PAUSE_S))
        await d.rebalance_storm(6, interval=(0.5, 1.5), max_workers=3)
        await zombie
        if not producer.done():
            await asyncio.sleep(1.0)
            await d.restart_broker(down_s=3.0)
        for w in d.workers:
            if not w.alive():
                w.reap()
        while len(d.alive()) < 2:
            d.start_worker()
    await producer
    report = await run.finish_and_verify(catch_up_s=300)
    print(f"\nsoak {guarantee}/{backend}: {len(run.lines)} lines, {d.faults} faults")
    print(report.summary())
    print(d.summary())
    run.assert_ok(report)
    assert not d.zombies_that_died(), f"{d.zombies_that_died()}\n{run.diagnostics()}"


@pytest.mark.parametrize("backend", ["memory", "rocksdb"])
@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
async def test_soak_pauses_kills_and_joins_keep_counts_exact(
    wordcount_run: MakeRun, guarantee: str, backend: str
) -> None:
    """Several rounds of the pause storm (three pauses, a kill -9 and a join per round)."""
    scale = soak_scale()
    seed = int(os.environ.get("HEADRACE_SOAK_SEED", "2002"))
    run = await wordcount_run(guarantee, backend, seed=seed, env=ZOMBIE_ENV)
    await pause_storm(run, lines=6000 * scale, rate=100, rounds=3 * scale)
    zombies_died = run.driver.zombies_that_died()
    report = await run.finish_and_verify(workers=3, catch_up_s=300)
    print(f"\nsoak pauses {guarantee}/{backend}: {len(run.lines)} lines")
    print(report.summary())
    run.assert_ok(report)
    assert not zombies_died, f"{zombies_died}\n{run.diagnostics()}"
