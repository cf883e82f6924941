"""Rebalance storms and broker restarts while data flows."""

from __future__ import annotations

import asyncio

import pytest
from scenario import MakeRun
from test_pause import PAUSE_S, ZOMBIE_ENV

from headrace.runtime.localkafka import LocalBroker

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
async def test_rebalance_storm_of_joins_sigterm_leaves_and_kill9_keeps_counts_exact(
    wordcount_run: MakeRun, guarantee: str
) -> None:
    """>= 8 membership changes (workers added, SIGTERMed and SIGKILLed) and a worker paused past
    its session timeout while input flows; tasks move and are suspended/resumed or restored;
    output and state equal the replay (exactly-once: no repeat at all)."""
    run = await wordcount_run(guarantee, "memory", seed=21, env=ZOMBIE_ENV)
    d = run.driver
    producer = run.produce(2500, rate=300)
    d.start_worker()
    d.start_worker()
    # a worker paused past its session timeout while the storm goes on: a zombie that must
    # rejoin when it resumes, in the middle of joins and leaves
    zombie = asyncio.create_task(d.pause(pause_s=PAUSE_S))
    await d.rebalance_storm(8, interval=(0.6, 1.5), min_workers=1, max_workers=3)
    await zombie
    await producer
    changes = d.count("start") - 2 + d.count("sigterm") + d.count("kill9")
    assert changes >= 8, d.summary()
    assert d.count("sigterm") >= 1 and d.count("kill9") >= 1, d.summary()
    assert d.count("pause") == 1, d.summary()
    run.assert_ok(await run.finish_and_verify())


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
async def test_broker_restart_while_data_flows_loses_and_duplicates_nothing(
    wordcount_run: MakeRun, local_broker: LocalBroker, guarantee: str
) -> None:
    """The broker is stopped for a few seconds mid-stream and started again; workers ride it
    out (or are restarted if they gave up) and the result equals the replay."""
    run = await wordcount_run(guarantee, "memory", seed=31)
    d = run.driver
    producer = run.produce(2500, rate=300)
    d.start_worker()
    d.start_worker()
    await asyncio.sleep(3.0)
    await d.restart_broker(down_s=3.0)
    await producer
    died = [w.name for w in d.workers if not w.alive()]
    report = await run.finish_and_verify()
    run.assert_ok(report)
    # Workers should retry through a short outage rather than exit (ARCHITECTURE.md section 7.2).
    assert not died, f"workers exited during the broker restart: {died}\n{run.diagnostics()}"
