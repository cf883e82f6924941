"""A job without input writes nothing (issue 18 item 5), on the real broker.

Barrier rounds go only to the repartition partitions that got data, with one quiet barrier
after the last data (checkpoint/alignment.py, "Quiet channels"), and a checkpoint with nothing
to commit is not committed (ARCHITECTURE.md 5.8). So once a word count has counted its input,
none of its topics grows any more: no barrier, no transaction marker, no checkpoint ack, no
changelog record. When input comes again the job counts it exactly, the quiet channels
included."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from headrace import INT, STR, Job
from headrace.runtime.config import Settings
from headrace.runtime.pytest_plugin import TopicFactory
from headrace.runtime.recovery import read_topic
from headrace.runtime.recovery.inprocess import run_worker_until

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]

PARTITIONS = 4
#: how long the job's topics must stay unchanged: 8 checkpoint intervals
STILL_S = 4.0


async def produce(bootstrap: str, topic: str, lines: list[str]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i, line in enumerate(lines):
            await producer.send(topic, line.encode(), partition=i % PARTITIONS)
        await producer.flush()
    finally:
        await producer.stop()


async def end_offsets(bootstrap: str, topics: list[str]) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tps = [
            TopicPartition(t, p)
            for t in topics
            for p in sorted(consumer.partitions_for_topic(t) or await _partitions(consumer, t))
        ]
        return dict(await consumer.end_offsets(tps))
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer._client.force_metadata_update()  # a topic the worker created meanwhile
    return consumer.partitions_for_topic(topic) or set()


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
async def test_an_idle_job_writes_nothing_and_counts_exactly_when_input_returns(
    kafka_bootstrap_servers: str, topic_factory: TopicFactory, guarantee: str
) -> None:
    bootstrap = kafka_bootstrap_servers
    source = await topic_factory("idle-lines", partitions=PARTITIONS)
    sink = await topic_factory("idle-counts", partitions=PARTITIONS)
    job = Job(f"idle-{uuid.uuid4().hex[:6]}")
    job.source(source, value_serde=STR).flat_map(str.split).key_by(
        lambda w: w, key_serde=STR, value_serde=STR
    ).count(name="counts").sink(sink, key_serde=STR, value_serde=INT)
    internal = [
        job.stages[0].output.topic,  # type: ignore[union-attr]
        job.checkpoint_topic,
        job.changelog_topic("counts"),
    ]
    s = Settings(
        bootstrap_servers=bootstrap, processing_guarantee=guarantee, checkpoint_interval_ms=500
    )
    expected: Counter[str] = Counter()

    async def counted() -> bool:
        records = await read_topic(bootstrap, sink, key_serde=STR, value_serde=INT)
        return {k: v for _, _, k, v, _ in records} == dict(expected)

    loop = asyncio.get_running_loop()
    still: dict[str, object] = {"ends": None, "since": 0.0}

    async def is_still() -> bool:
        """The job's topics did not grow for STILL_S seconds."""
        ends = await end_offsets(bootstrap, internal)
        if ends != still["ends"]:
            still.update(ends=ends, since=loop.time())
            return False
        return loop.time() - float(still["since"]) >= STILL_S  # type: ignore[arg-type]

    first = [f"w{i % 7} w{i % 5} w{i % 3}" for i in range(40)]
    second = ["w1 w2 late", "late"]
    phase = ["first"]

    async def done() -> bool:
        if not await counted() or not await is_still():
            return False
        if phase[0] == "second":
            return True
        # Idle: every partition got data, then one quiet round and the downstream commit that
        # read it, then nothing (a job that kept writing would never be still and time out).
        # Now input again, to one source partition only, with the same worker running: its
        # downstream tasks' channels are all quiet, and the one that wakes up is waited for.
        phase[0] = "second"
        expected.update(w for line in second for w in line.split())
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for line in second:
                await producer.send(source, line.encode(), partition=2)
            await producer.flush()
        finally:
            await producer.stop()
        still.update(ends=None, since=0.0)
        return False

    expected.update(w for line in first for w in line.split())
    await produce(bootstrap, source, first)
    await run_worker_until(job, s, done, timeout_s=120)
    assert phase[0] == "second"
