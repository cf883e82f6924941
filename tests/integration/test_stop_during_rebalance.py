"""A worker stopped while its groups rebalance closes every client it started, on the real
broker (exactly-once: a transactional producer per task).

SIGTERM takes a final checkpoint of every task and leaves the groups; until its consumers have
left, the groups go on rebalancing. A rebalance then could hand the stopping worker partitions:
it started their producers and a restore after its shutdown had looked for restores to cancel,
and nothing closed them (bench/scale.py, four workers at 256 partitions: 342-1,046 "Unclosed
AIOKafkaProducer" per run, transactions left open until the next owner fenced them). Here a
second worker joins while the first one is stopping, the first one's final checkpoints wait
until the group has handed it partitions, and it restores them (its suspended state is taken
as stale, as when another owner committed meanwhile) in 3 s (a large state), so the stop ends
while the restores are under way."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from examples.wordcount import build
from headrace.runtime.config import Settings
from headrace.runtime.pytest_plugin import TopicFactory
from headrace.runtime.stage_runner import StageRunner
from headrace.runtime.worker import Worker

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]

PARTITIONS = 4


async def until(check: Callable[[], bool], what: str, timeout_s: float = 90.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        await asyncio.sleep(0.2)


def running_tasks(worker: Worker) -> int:
    return sum(len(r.tasks) for r in worker.runners)


async def test_a_worker_stopped_while_its_groups_rebalance_leaves_no_producer_open(
    kafka_bootstrap_servers: str, topic_factory: TopicFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = await topic_factory("stop-rebalance-lines", partitions=PARTITIONS)
    sink = await topic_factory("stop-rebalance-counts", partitions=PARTITIONS)
    job = build(f"stop-rebalance-{uuid.uuid4().hex[:6]}", source, sink)
    s = Settings(
        bootstrap_servers=kafka_bootstrap_servers,
        processing_guarantee="exactly_once",
        checkpoint_interval_ms=500,
    )
    first, second = Worker(job, s), Worker(job, s)
    started: dict[int, list[AIOKafkaProducer]] = {id(first): [], id(second): []}
    make_producer = StageRunner._transactional_producer
    close_all = StageRunner._close_all
    on_assigned = StageRunner.on_partitions_assigned
    restore = StageRunner._restore
    reusable = StageRunner._reusable
    second_run: list[asyncio.Task[None]] = []
    handed_while_stopping: set[str] = set()  # stages of the first worker

    def recorded(self: StageRunner, partition: int) -> AIOKafkaProducer:
        producer = make_producer(self, partition)
        started[id(self.worker)].append(producer)
        return producer

    async def assigned(self: StageRunner, partitions: list[Any]) -> None:
        if self.worker is first and second_run and partitions:
            handed_while_stopping.add(self.stage.name)
        await on_assigned(self, partitions)

    async def stale(self: StageRunner, *args: Any) -> bool:
        return False if self.worker is first and second_run else await reusable(self, *args)

    async def slow_restore(self: StageRunner, *args: Any) -> None:
        if self.worker is first and second_run:
            await asyncio.sleep(3.0)
        await restore(self, *args)

    async def close_all_while_the_group_rebalances(self: StageRunner, **kwargs: Any) -> None:
        if self.worker is first:
            if not second_run:
                second_run.append(asyncio.create_task(second.run()))
            await until(
                lambda: self.stage.name in handed_while_stopping,
                f"the group hands the stopping worker partitions of {self.stage.name}",
            )
        await close_all(self, **kwargs)

    monkeypatch.setattr(StageRunner, "_transactional_producer", recorded)
    first_run = asyncio.create_task(first.run())
    try:
        await until(lambda: running_tasks(first) == 2 * PARTITIONS, "the first worker runs")
        monkeypatch.setattr(StageRunner, "_close_all", close_all_while_the_group_rebalances)
        monkeypatch.setattr(StageRunner, "on_partitions_assigned", assigned)
        monkeypatch.setattr(StageRunner, "_restore", slow_restore)
        monkeypatch.setattr(StageRunner, "_reusable", stale)
        first.stop()
        await asyncio.wait_for(first_run, 120)
        assert second_run, "the stop did not reach the final checkpoints"
        left_open = [p for p in started[id(first)] if not p._closed]
        assert left_open == [], f"{len(left_open)} producer(s) of the stopped worker left open"
        assert len(started[id(first)]) >= 2 * PARTITIONS
        # the second worker took the whole job over
        await until(lambda: running_tasks(second) == 2 * PARTITIONS, "the second worker runs all")
    finally:
        first.stop()
        second.stop()
        for run in [first_run, *second_run]:
            await asyncio.wait_for(asyncio.gather(run, return_exceptions=True), 120)
    assert [p for p in started[id(second)] if not p._closed] == []
