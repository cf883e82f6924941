"""Partitions added to a running job's source (issue 16 item 3), against the real broker.

A stateless first stage (the word count's) picks the new partitions up within seconds, the
stage behind the key_by aligns the new upstream channels, and every count stays exact, without
a restart and after one. A stateful first stage (input already keyed) stops with the procedure,
and the procedure, run end to end (savepoint, reset, start from the savepoint, which moves each
key's state to the partition Kafka's default partitioner now gives it), is exact."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions

from headrace import JSON, STR, Job
from headrace.runtime.config import Settings
from headrace.runtime.kafka.reset import carry_out, plan_reset
from headrace.runtime.kafka.topics import TopicConfigError
from headrace.runtime.pytest_plugin import TopicFactory
from headrace.runtime.recovery import read_topic
from headrace.runtime.recovery.inprocess import run_worker_until
from headrace.runtime.savepoint import create_savepoint, load_savepoint
from headrace.runtime.worker import Worker

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]

GUARANTEES = ["exactly_once", "at_least_once"]


async def grow(bootstrap: str, topic: str, total: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_partitions({topic: NewPartitions(total_count=total)})
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, records: list[tuple[str | None, str, int | None]]):
    """(key, value, partition or None for the default partitioner)"""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for key, value, partition in records:
            await producer.send(
                topic,
                value.encode(),
                key=None if key is None else key.encode(),
                partition=partition,
            )
        await producer.flush()
    finally:
        await producer.stop()


async def latest(bootstrap: str, sink: str) -> dict[str, list[int]]:
    per_key: dict[str, list[int]] = defaultdict(list)
    for _, _, k, v, _ in await read_topic(bootstrap, sink, key_serde=STR, value_serde=JSON):
        per_key[k].append(v)
    return per_key


def exact(per_key: dict[str, list[int]], expected: Counter[str], exactly_once: bool) -> bool:
    if {k: v[-1] for k, v in per_key.items()} != dict(expected):
        return False
    return not exactly_once or all(v == list(range(1, expected[k] + 1)) for k, v in per_key.items())


@pytest.mark.parametrize("guarantee", GUARANTEES)
async def test_a_word_count_picks_up_added_source_partitions_without_a_restart(
    kafka_bootstrap_servers: str, topic_factory: TopicFactory, guarantee: str
) -> None:
    bootstrap = kafka_bootstrap_servers
    eos = guarantee == "exactly_once"
    s = Settings(
        bootstrap_servers=bootstrap, processing_guarantee=guarantee, checkpoint_interval_ms=200
    )
    source = await topic_factory("grow-lines", partitions=4)
    sink = await topic_factory("grow-counts", partitions=2)
    job = Job(f"grow-{uuid.uuid4().hex[:6]}")
    job.source(source, value_serde=STR).flat_map(str.split).key_by(
        lambda w: w, key_serde=STR, value_serde=STR
    ).count(name="counts").sink(sink, key_serde=STR, value_serde=JSON)
    expected: Counter[str] = Counter()

    def lines(n: int, partitions: int, salt: int) -> list[tuple[str | None, str, int | None]]:
        out = []
        for i in range(n):
            words = [f"w{(i * 3 + j + salt) % 23}" for j in range(4)]
            expected.update(words)
            out.append((None, " ".join(words), i % partitions))
        return out

    worker = Worker(job, s)
    running = asyncio.create_task(worker.run())
    try:
        await produce(bootstrap, source, lines(200, 4, 0))
        for phase in range(2):
            for _ in range(120):
                await asyncio.sleep(0.5)
                assert not running.done(), running.result()
                if exact(await latest(bootstrap, sink), expected, eos):
                    break
            assert exact(await latest(bootstrap, sink), expected, eos), phase
            if phase == 0:
                await grow(bootstrap, source, 6)
                await asyncio.sleep(8)  # metadata refresh (5 s) and the rebalance
                await produce(bootstrap, source, lines(300, 6, 1))
    finally:
        worker.stop()
        await running

    # a restart keeps the repartition topic's 4 partitions and goes on exactly
    await produce(bootstrap, source, lines(60, 6, 2))

    async def counted() -> bool:
        return exact(await latest(bootstrap, sink), expected, eos)

    await run_worker_until(job, s, counted)


async def test_a_keyed_source_that_gains_partitions_stops_and_the_procedure_is_exact(
    kafka_bootstrap_servers: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    bootstrap = kafka_bootstrap_servers
    s = Settings(bootstrap_servers=bootstrap, checkpoint_interval_ms=200)
    source = await topic_factory("grow-keyed", partitions=2)
    sink = await topic_factory("grow-keyed-counts", partitions=2)
    job = Job(f"grow-{uuid.uuid4().hex[:6]}")
    job.source(source, key_serde=STR, value_serde=STR).count(name="counts").sink(
        sink, key_serde=STR, value_serde=JSON
    )
    keys = [f"user-{i}" for i in range(30)]
    expected: Counter[str] = Counter()

    def visits(rounds: int) -> list[tuple[str | None, str, int | None]]:
        expected.update(keys * rounds)
        return [(k, "visit", None) for _ in range(rounds) for k in keys]

    await produce(bootstrap, source, visits(3))
    worker = Worker(job, s)
    running = asyncio.create_task(worker.run())
    for _ in range(120):
        await asyncio.sleep(0.5)
        if exact(await latest(bootstrap, sink), expected, True):
            break
    await grow(bootstrap, source, 3)
    with pytest.raises(TopicConfigError, match=r"(?s)gained partitions.*savepoint create"):
        await asyncio.wait_for(running, 60)  # the worker stops by itself

    # the procedure: (producers went on meanwhile) savepoint, reset, start from the savepoint
    await produce(bootstrap, source, visits(2))
    await create_savepoint(s, job, tmp_path / "sp.hrsp")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await carry_out(admin, s, await plan_reset(admin, s, job))
    finally:
        await admin.close()
    await load_savepoint(s, job, tmp_path / "sp.hrsp")

    async def counted() -> bool:
        return exact(await latest(bootstrap, sink), expected, True)

    await run_worker_until(job, s, counted)
    await produce(bootstrap, source, visits(1))
    await run_worker_until(job, s, counted)
