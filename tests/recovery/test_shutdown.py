"""Graceful shutdown (SIGTERM) under load: a final checkpoint, exit 0, nothing replayed."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition
from scenario import PARTITIONS, MakeRun

from runtime.checkpoint.log import CheckpointAck
from runtime.recovery import read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
async def test_sigterm_under_load_takes_a_final_checkpoint_and_restart_replays_nothing(
    wordcount_run: MakeRun, guarantee: str
) -> None:
    """SIGTERM while both workers are busy: each exits 0 after a final checkpoint whose offsets
    are the group's committed offsets; a restart then continues from there, so even under
    at-least-once the output has no repeat."""
    run = await wordcount_run(guarantee, "memory", seed=51)
    d = run.driver
    first = [d.start_worker(), d.start_worker()]
    for w in first:
        assert await w.wait_started()
    await asyncio.sleep(2.0)  # joined and restored
    producer = run.produce(4000, rate=4000)  # as fast as the producer goes
    await asyncio.sleep(1.5)
    codes = await d.stop_all()
    assert all(c == 0 for c in codes.values()), f"{codes}\n{run.diagnostics()}"
    for w in first:
        assert "stopped cleanly" in w.log(), run.diagnostics()
    await producer

    # The last ack of every task is its final checkpoint, and its offsets are what is committed.
    acks = [
        CheckpointAck.decode(v)
        for _p, _o, _k, v, _h in await read_topic(run.bootstrap, run.job.checkpoint_topic)
        if v
    ]
    last: dict[str, CheckpointAck] = {}
    for a in acks:
        last[a.task] = a
    assert len(last) == 2 * PARTITIONS, sorted(last)
    admin = AIOKafkaAdminClient(bootstrap_servers=run.bootstrap)
    await admin.start()
    try:
        for stage in run.job.stages:
            committed = await admin.list_consumer_group_offsets(run.job.group_id(stage))
            for p in range(PARTITIONS):
                ack = last[f"{stage.name}/{p}"]
                assert ack.final, ack
                for key, off in ack.offsets.items():
                    topic, _, part = key.rpartition("/")
                    assert committed[TopicPartition(topic, int(part))].offset == off
    finally:
        await admin.close()

    report = await run.finish_and_verify()
    run.assert_ok(report)
    assert report.repeats == 0, report.summary()
