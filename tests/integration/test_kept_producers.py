"""Rebalances a worker goes through while a second member comes and goes, on the real broker.

aiokafka's rebalances are eager: every generation revokes every task, and most come back to the
member that had them. Each used to stop its producer and initialise a new one (a round trip to
the transaction coordinator and a ``__transaction_state`` write each); now a task that ran in
the generation right before keeps it (``StageRunner._keeps_producer``), and the count stays
exact across both rebalances. And a revocation (the tasks' final checkpoints) longer than the
session timeout keeps the member in its group, within the rebalance timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from examples.wordcount import build
from headrace import INT, STR, Job
from headrace.runtime.config import Guarantee, Settings
from headrace.runtime.kafka import clients
from headrace.runtime.pytest_plugin import TopicFactory
from headrace.runtime.recovery import produce_paced, read_topic
from headrace.runtime.stage_runner import StageRunner
from headrace.runtime.worker import Worker

SESSION_MS = 6_000  # the broker's smallest allowed session timeout

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]

PARTITIONS = 4


async def _until(
    what: str, condition: Callable[[], bool | Awaitable[bool]], timeout_s: float = 60
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        met = condition()
        if met if isinstance(met, bool) else await met:
            return
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def _another_member(
    bootstrap: str, group_id: str, topic: str
) -> AsyncIterator[AIOKafkaConsumer]:
    """A plain consumer in the stage's group: it takes some of its partitions (and never
    commits), so the group goes through a generation in which the worker keeps the rest."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        partition_assignment_strategy=(RangePartitionAssignor,),
        session_timeout_ms=SESSION_MS,
        heartbeat_interval_ms=500,
    )
    consumer.subscribe([topic])
    await consumer.start()
    polling = asyncio.create_task(_discard(consumer))
    try:
        yield consumer
    finally:
        polling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await polling
        await consumer.stop()  # leaves the group: the next generation


async def _discard(consumer: AIOKafkaConsumer) -> None:
    while True:
        await consumer.getmany(timeout_ms=200)


async def test_tasks_back_in_the_next_generation_keep_their_producers_and_stay_exact(
    kafka_bootstrap_servers: str, topic_factory: TopicFactory
) -> None:
    bootstrap = kafka_bootstrap_servers
    run = await _WordCount.create(bootstrap, topic_factory)
    source, produce, counted = run.source, run.produce, run.counted
    worker = Worker(run.job, run.settings())
    running = asyncio.create_task(worker.run())
    try:
        await _until("the worker runs its tasks", lambda: bool(worker.runners) and worker.ready())
        first = worker.runners[0]
        assert first.stage.name == "stage0"
        await produce(200)
        await _until("the counts are exact", counted)

        generation = first.lease.generation
        assert generation is not None
        before = _producers(first)
        assert sorted(before) == list(range(PARTITIONS))
        async with _another_member(bootstrap, first.group_id, source):
            await _until(
                "the worker runs the tasks it kept",
                lambda: first.lease.generation == generation + 1 and first.ready(),
            )
            kept = _producers(first)
            assert 0 < len(kept) < PARTITIONS, kept
            for p, producer in kept.items():
                assert producer is before[p], f"task stage0/{p}: a new producer"
            await produce(200)  # the kept producers commit it (the rest waits for its tasks)
        await _until(
            "the worker runs every task again",
            lambda: (
                first.lease.generation == generation + 2
                and first.ready()
                and len(first.tasks) == PARTITIONS
            ),
        )
        again = _producers(first)
        for p in kept:  # back in the next generation again: still the same producer
            assert again[p] is before[p], f"task stage0/{p}: a new producer"
        for p in set(before) - set(kept):  # they were away for a generation: fresh ones
            assert again[p] is not before[p], f"task stage0/{p}: kept through a generation away"
        await produce(200)
        await _until("the counts are exact", counted)
    finally:
        worker.stop()
        await running


class _WordCount:
    """An exactly-once word count over PARTITIONS partitions, its input and its check."""

    def __init__(self, bootstrap: str, job: Job, source: str, sink: str) -> None:
        self.bootstrap, self.job, self.source, self.sink = bootstrap, job, source, sink
        self.lines: list[str] = []

    @classmethod
    async def create(cls, bootstrap: str, topic_factory: TopicFactory) -> _WordCount:
        source = await topic_factory("kept-producers-lines", partitions=PARTITIONS)
        sink = await topic_factory("kept-producers-counts", partitions=PARTITIONS)
        job = build(f"kept-producers-{uuid.uuid4().hex[:6]}", source, sink)
        return cls(bootstrap, job, source, sink)

    def settings(self, **overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "processing_guarantee": Guarantee.EXACTLY_ONCE,
            "checkpoint_interval_ms": 300,
            "session_timeout_ms": SESSION_MS,
            "heartbeat_interval_ms": 500,
        }
        return Settings(**{**base, **overrides})

    async def produce(self, n: int) -> None:
        lines = self.lines
        batch = [f"w{(len(lines) + i) % 7} w{(len(lines) + i) % 5} common" for i in range(n)]
        lines.extend(batch)
        await produce_paced(
            self.bootstrap,
            self.source,
            [line.encode() for line in batch],
            rate=10_000,
            partition_of=lambda i: i % PARTITIONS,
        )

    async def counted(self) -> bool:
        latest: dict[str, int] = {}
        for _, _, k, v, _ in await read_topic(
            self.bootstrap, self.sink, key_serde=STR, value_serde=INT
        ):
            latest[k] = v
        return latest == Counter(" ".join(self.lines).split())


def _producers(runner: StageRunner) -> dict[int, AIOKafkaProducer]:
    out = {}
    for p, io in runner.tasks.items():
        assert io.producer is not None
        out[p] = io.producer
    return out


async def test_a_revocation_longer_than_the_session_keeps_the_member_and_its_final_checkpoints(
    kafka_bootstrap_servers: str, topic_factory: TopicFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's revocation takes 1.5 sessions (its heartbeats go on meanwhile): within the
    rebalance timeout the group waits for it, the write lease holds, its final checkpoints are
    written (its tasks come back suspended, with their producers), and it keeps its member id.
    With aiokafka's default rebalance timeout (the session) the coordinator removed it, its
    final checkpoints met an expired lease, and it rejoined as a new member."""
    run = await _WordCount.create(kafka_bootstrap_servers, topic_factory)
    slow_s = SESSION_MS / 1000 * 1.5
    on_revoked = StageRunner.on_partitions_revoked
    slowed: list[str] = []

    async def slow_revocation(self: StageRunner, revoked: list[Any]) -> None:
        if self.stage.name == "stage0" and self.tasks and not slowed:
            slowed.append(self.stage.name)
            await asyncio.sleep(slow_s)
        await on_revoked(self, revoked)

    monkeypatch.setattr(StageRunner, "on_partitions_revoked", slow_revocation)
    worker = Worker(run.job, run.settings(rebalance_timeout_ms=4 * SESSION_MS))
    running = asyncio.create_task(worker.run())
    try:
        await _until("the worker runs its tasks", lambda: bool(worker.runners) and worker.ready())
        first = worker.runners[0]
        await run.produce(200)
        await _until("the counts are exact", run.counted)
        member, generation, before = (
            first.lease.member_id,
            first.lease.generation,
            _producers(first),
        )
        assert generation is not None
        async with _another_member(kafka_bootstrap_servers, first.group_id, run.source):
            await _until(
                "the worker runs the tasks it kept",
                lambda: first.lease.generation == generation + 1 and first.ready(),
                timeout_s=90,
            )
            assert slowed, "the revocation was not slowed"
            assert first.lease.member_id == member, "removed from the group and rejoined"
            kept = _producers(first)
            assert kept and all(kept[p] is before[p] for p in kept), "final checkpoints lost"
            await run.produce(200)
        await _until("the counts are exact", run.counted, timeout_s=90)
    finally:
        worker.stop()
        await running


async def test_a_producer_is_in_an_empty_transaction_only_until_it_writes(
    kafka_bootstrap_servers: str, topic_factory: TopicFactory
) -> None:
    """What ``_keeps_producer`` reads from aiokafka's transaction manager, on a real producer."""
    topic = await topic_factory("kept-producers-txn", partitions=1)
    settings = Settings(bootstrap_servers=kafka_bootstrap_servers)
    producer = clients.producer(
        settings, client_id="kept-producers-test", transactional_id=f"kept-{uuid.uuid4().hex}"
    )
    assert not clients.in_empty_transaction(producer)  # not started
    await producer.start()
    try:
        assert not clients.in_empty_transaction(producer)  # no transaction begun
        await producer.begin_transaction()
        assert clients.in_empty_transaction(producer)
        await producer.send_and_wait(topic, b"x")
        assert not clients.in_empty_transaction(producer)  # a partition in the transaction
        await producer.commit_transaction()
        await producer.begin_transaction()
        assert clients.in_empty_transaction(producer)
    finally:
        await producer.stop()
    assert not clients.in_empty_transaction(producer)  # stopped
