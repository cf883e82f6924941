"""Graceful shutdown (SIGTERM) under load: a final checkpoint, exit 0, nothing replayed."""

from __future__ import annotations

import asyncio
import re
import signal

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition
from scenario import PARTITIONS, MakeRun
from test_pause import ZOMBIE_ENV

from headrace.runtime.checkpoint.log import CheckpointAck
from headrace.runtime.recovery import read_topic, wait_changelog_committed

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
async def test_sigterm_under_load_takes_a_final_checkpoint_and_restart_replays_nothing(
    wordcount_run: MakeRun, guarantee: str
) -> None:
    """SIGTERM while both workers are busy: each exits 0 after a final checkpoint whose offsets
    are the group's committed offsets; a restart then continues from there, so even under
    at-least-once the output has no repeat. (A task with nothing new since its last checkpoint
    writes no final one, ARCHITECTURE.md 5.8: every task's last ack holds the committed
    offsets either way.)"""
    run = await wordcount_run(guarantee, "memory", seed=51)
    d = run.driver
    first = [d.start_worker(), d.start_worker()]
    for w in first:
        assert await w.wait_started()
    await asyncio.sleep(2.0)  # joined and restored
    producer = run.produce(8000, rate=4000)  # still producing when the workers stop
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
    # the workers stopped busy: their tasks took final checkpoints (a task with nothing new
    # since its last one, like the idle partition's or one taken over a moment before the
    # stop, writes none: its last ack is that checkpoint, whose offsets are committed too)
    assert any(a.final for a in acks), acks
    admin = AIOKafkaAdminClient(bootstrap_servers=run.bootstrap)
    await admin.start()
    try:
        for stage in run.job.stages:
            committed = await admin.list_consumer_group_offsets(run.job.group_id(stage))
            for p in range(PARTITIONS):
                ack = last[f"{stage.name}/{p}"]
                for key, off in ack.offsets.items():
                    topic, _, part = key.rpartition("/")
                    assert committed[TopicPartition(topic, int(part))].offset == off
    finally:
        await admin.close()

    report = await run.finish_and_verify()
    run.assert_ok(report)
    assert report.repeats == 0, report.summary()


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
async def test_rocksdb_restart_after_sigterm_reuses_every_store_and_replays_no_changelog(
    wordcount_run: MakeRun, guarantee: str
) -> None:
    """A clean stop leaves RocksDB stores exactly at the final checkpoint: the restart in the same
    slot (same state directory) reuses every task's store, applies no changelog record, and the
    counts go on exactly from there."""
    run = await wordcount_run(guarantee, "rocksdb", seed=52)
    d = run.driver
    first = d.start_worker(slot=0)
    assert await first.wait_started()
    producer = run.produce(4000, rate=1000)
    # Stop only once every stage-1 task has committed state: the stores then have something
    # to reuse, and data is still flowing when SIGTERM comes.
    await wait_changelog_committed(
        run.job, "counts", run.bootstrap, min_offset=20, alive=d.any_alive
    )
    codes = await d.stop_all()
    assert all(c == 0 for c in codes.values()), f"{codes}\n{run.diagnostics()}"
    assert "stopped cleanly" in first.log(), run.diagnostics()

    second = d.start_worker(slot=0)
    await producer
    report = await run.finish_and_verify(workers=1)
    run.assert_ok(report)
    assert report.repeats == 0, report.summary()
    log = second.log()
    reused = re.findall(r"reusing local state of (\S+)\[(\d+)\]", log)
    assert len(set(reused)) == PARTITIONS, run.diagnostics()  # every stage-1 task's store
    assert "rebuilding" not in log, run.diagnostics()
    applied = re.findall(r"restoring (\S+)\[(\d+)\]: (\d+)/(\d+) records", log)
    assert applied, run.diagnostics()
    assert all(int(n) == 0 for _t, _p, n, _total in applied), applied


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
async def test_sigterm_during_a_join_that_waits_for_a_killed_member_stops_at_once(
    wordcount_run: MakeRun, guarantee: str
) -> None:
    """A worker started while a kill -9'd member is still in the groups joins a rebalance that
    waits for that member's session to run out (6 s). SIGTERM during that join: the worker
    leaves the groups at once instead of waiting for the join to end, takes nothing over (no
    producer started, no state restored only to be closed), exits 0, and the survivor counts
    exactly. aiokafka's stop alone waited for the join (5 s) and then took the tasks over."""
    run = await wordcount_run(guarantee, "memory", seed=53, env=ZOMBIE_ENV)
    d = run.driver
    survivor, doomed = d.start_worker(), d.start_worker()
    for w in (survivor, doomed):
        assert await w.wait_started()
    producer = run.produce(1500, rate=500)
    await asyncio.sleep(3.0)  # both joined and counting
    await d.kill(doomed)  # its members stay in the groups until their session runs out
    late = d.start_worker()
    assert await late.wait_started()
    await asyncio.sleep(0.3)  # its consumers are in the join that waits for the dead member
    started = asyncio.get_running_loop().time()
    late.signal(signal.SIGTERM)
    code = await late.wait(30)
    took = asyncio.get_running_loop().time() - started
    assert code == 0, run.diagnostics()
    assert took < 3.0, f"the stop took {took:.1f} s (the join waits up to 6 s)\n{late.log()}"
    assert "took over" not in late.log() and "restored task" not in late.log(), late.log()
    await producer
    report = await run.finish_and_verify(workers=1)
    run.assert_ok(report)
