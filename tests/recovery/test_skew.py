"""Skewed input (one partition far ahead) and an idle partition."""

from __future__ import annotations

import asyncio
import time

import pytest
from scenario import IDLE_PARTITION, MakeRun

from headrace.runtime.checkpoint.barrier import barrier_id
from headrace.runtime.recovery.verify import wait_complete_checkpoint

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]

CHECKPOINT_INTERVAL_MS = 500


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
async def test_skewed_and_idle_input_partitions_still_align_checkpoints_and_count_exactly(
    wordcount_run: MakeRun, guarantee: str
) -> None:
    """95% of the input goes to partition 0, the last partition never gets a record, and
    production pauses half-way: the idle task still takes part in checkpoints, so the job
    completes aligned checkpoints, and counts are exact after a kill -9.

    An idle task acknowledges the first checkpoint of each of its ownerships (a full barrier
    round) and then goes quiet: no ack, no barriers, no commit (ARCHITECTURE.md 5.8); the kill
    ends its ownership, so it acknowledged one checkpoint before the kill and one after."""
    run = await wordcount_run(guarantee, "memory", seed=41, interval_ms=CHECKPOINT_INTERVAL_MS)
    d = run.driver
    d.start_worker()
    d.start_worker()
    await run.produce(1000, rate=500, hot_share=0.95)
    await asyncio.sleep(2.0)  # every partition idle for a while
    killed_at = barrier_id(time.time(), CHECKPOINT_INTERVAL_MS)
    await d.kill()
    await run.produce(1000, rate=500, hot_share=0.95, seed_offset=1)
    report = await run.finish_and_verify()
    run.assert_ok(report)
    _, summaries = await wait_complete_checkpoint(run.job, run.bootstrap)
    idle_task = f"stage0/{IDLE_PARTITION}"
    idle_acks = sorted(s.checkpoint_id for s in summaries if idle_task in s.acked)
    assert idle_acks, f"{idle_task} acknowledged no checkpoint"
    assert idle_acks[0] <= killed_at < idle_acks[-1], (
        f"{idle_task} acknowledged checkpoints {idle_acks}, not one before the kill (checkpoint "
        f"{killed_at}) and one after"
    )
