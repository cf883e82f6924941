"""Skewed input (one partition far ahead) and an idle partition."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka.structs import TopicPartition
from scenario import IDLE_PARTITION, MakeRun

from headrace.runtime.checkpoint.barrier import barrier_id
from headrace.runtime.checkpoint.log import CheckpointAck
from headrace.runtime.config import Settings
from headrace.runtime.inspect import read_all
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
    round) and then goes quiet: no ack, no barriers, no commit (ARCHITECTURE.md 5.8). So it
    acknowledged a checkpoint before the kill, and if the killed worker owned it, the worker
    that took it over acknowledged one after. (A survivor that gets its own task back after the
    rebalance resumes it and, under exactly-once, goes on from its committed round without a
    new ack: ARCHITECTURE.md 5.3.)"""
    run = await wordcount_run(guarantee, "memory", seed=41, interval_ms=CHECKPOINT_INTERVAL_MS)
    d = run.driver
    d.start_worker()
    d.start_worker()
    await run.produce(1000, rate=500, hot_share=0.95)
    await asyncio.sleep(2.0)  # every partition idle for a while
    killed_at = barrier_id(time.time(), CHECKPOINT_INTERVAL_MS)
    killed = await d.kill()
    await run.produce(1000, rate=500, hot_share=0.95, seed_offset=1)
    report = await run.finish_and_verify()
    run.assert_ok(report)
    _, summaries = await wait_complete_checkpoint(run.job, run.bootstrap)
    idle_task = f"stage0/{IDLE_PARTITION}"
    assert any(idle_task in s.acked for s in summaries), f"{idle_task} acknowledged nothing"
    settings = Settings(bootstrap_servers=run.bootstrap)
    records = await read_all(
        settings, [TopicPartition(run.job.checkpoint_topic, 0)], committed=True
    )
    decoded = [CheckpointAck.decode(r.value) for r in records if r.value]
    acks = sorted((a for a in decoded if a.task == idle_task), key=lambda a: a.checkpoint_id)
    before = [a for a in acks if a.checkpoint_id <= killed_at]
    assert before, f"{idle_task} acknowledged no checkpoint before the kill ({killed_at}): {acks}"
    if before[-1].worker.endswith(f"-{killed.pid}"):  # the killed worker owned it
        after = [a for a in acks if a.checkpoint_id > killed_at]
        assert after, (
            f"{idle_task}, owned by the killed worker {before[-1].worker}, acknowledged no "
            f"checkpoint after the kill ({killed_at}): "
            f"{[(a.checkpoint_id, a.worker) for a in acks]}"
        )
