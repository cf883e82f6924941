"""Skewed input (one partition far ahead) and an idle partition."""

from __future__ import annotations

import asyncio

import pytest
from scenario import IDLE_PARTITION, MakeRun

from headrace.runtime.recovery.verify import wait_complete_checkpoint

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
async def test_skewed_and_idle_input_partitions_still_align_checkpoints_and_count_exactly(
    wordcount_run: MakeRun, guarantee: str
) -> None:
    """95% of the input goes to partition 0, the last partition never gets a record, and
    production pauses half-way: the idle task still emits barriers, so downstream checkpoints
    stay aligned and complete for the whole job, and counts are exact after a kill -9."""
    run = await wordcount_run(guarantee, "memory", seed=41)
    d = run.driver
    d.start_worker()
    d.start_worker()
    await run.produce(1000, rate=500, hot_share=0.95)
    await asyncio.sleep(2.0)  # every partition idle for a while
    await d.kill()
    await run.produce(1000, rate=500, hot_share=0.95, seed_offset=1)
    report = await run.finish_and_verify()
    run.assert_ok(report)
    _, summaries = await wait_complete_checkpoint(run.job, run.bootstrap)
    idle_task = f"stage0/{IDLE_PARTITION}"
    assert sum(1 for s in summaries if idle_task in s.acked) >= 3
