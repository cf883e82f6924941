"""A stage behind a key_by with 256 upstream partitions (issue 15 item 6), on the real broker.

Its checkpoint metadata (a skip entry and, under at-least-once, a dedupe mark per upstream
channel) can grow far past the broker's ``offset.metadata.max.bytes`` (4096): the commit used
to fail. The document is spilled to ``<job>.stage1.cuts`` and the committed metadata refers to
it; the job checkpoints, stops, restores from the spilled document and stays exact."""

from __future__ import annotations

import uuid
from collections import Counter

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from headrace import JSON, STR, Job
from headrace.runtime.config import Settings
from headrace.runtime.pytest_plugin import TopicFactory
from headrace.runtime.recovery import read_topic
from headrace.runtime.recovery.inprocess import run_worker_until

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]

UPSTREAM = 256


async def produce(bootstrap: str, topic: str, round_: int) -> Counter[str]:
    """One line per source partition; words shared across partitions."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    await producer.start()
    counts: Counter[str] = Counter()
    try:
        for p in range(UPSTREAM):
            words = [f"w{(p * 7 + i + round_) % 50}" for i in range(3)]
            counts.update(words)
            await producer.send(topic, " ".join(words).encode(), partition=p)
        await producer.flush()
    finally:
        await producer.stop()
    return counts


async def run_until(job: Job, s: Settings, sink: str, expected: Counter[str]) -> None:
    async def counted() -> bool:
        records = await read_topic(s.bootstrap_servers, sink, key_serde=STR, value_serde=JSON)
        return {k: v for _, _, k, v, _ in records} == dict(expected)

    # settle: a few more checkpoints, with every channel's mark
    await run_worker_until(job, s, counted, timeout_s=300, settle_s=1.5)


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
async def test_a_stage_with_256_upstream_partitions_checkpoints_and_restores_exactly(
    kafka_bootstrap_servers: str,
    topic_factory: TopicFactory,
    guarantee: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bootstrap = kafka_bootstrap_servers
    # How long the document is depends on where the checkpoint fell: a skip entry for every
    # channel whose barrier came after the committed offset (none when they all came before;
    # exactly-once then has no per-channel entry at all), and under at-least-once a dedupe mark
    # per channel. At this test's small offsets 256 of either take ~2.5 KB, at a long-running
    # topic's 10-digit offsets over 4 KB. Spill every document, so that whichever checkpoint
    # comes last, the spill is what this run exercises.
    monkeypatch.setattr("headrace.runtime.checkpoint.commit.METADATA_LIMIT", 0)
    source = await topic_factory("wide-lines", partitions=UPSTREAM)
    sink = await topic_factory("wide-counts")
    job = Job(f"wide-{uuid.uuid4().hex[:6]}")
    job.source(source, value_serde=STR).flat_map(str.split).key_by(
        lambda w: w, key_serde=STR, value_serde=STR, partitions=1
    ).count(name="counts").sink(sink, key_serde=STR, value_serde=JSON)
    s = Settings(bootstrap_servers=bootstrap, processing_guarantee=guarantee)

    expected = await produce(bootstrap, source, 0)
    await run_until(job, s, sink, expected)

    # the committed metadata of the stage behind the key_by refers to a spilled document
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        tp = TopicPartition(f"{job.name}.stage1.repartition", 0)
        committed = await admin.list_consumer_group_offsets(f"{job.name}.stage1", partitions=[tp])
    finally:
        await admin.close()
    metadata = committed[tp].metadata
    assert len(metadata) < 4096 and "x" in orjson.loads(metadata), metadata
    spilled = await read_topic(bootstrap, f"{job.name}.stage1.cuts")
    document = orjson.loads([v for *_, v, _ in spilled if v][-1])
    assert document["cl"]["counts"] >= 0
    if guarantee == "at_least_once":
        assert len(document["seen"]) >= UPSTREAM - 1  # a dedupe mark per upstream channel

    # restart: restored from the spilled document (skip list, dedupe marks, changelog offset)
    expected.update(await produce(bootstrap, source, 1))
    await run_until(job, s, sink, expected)
    if guarantee == "exactly_once":
        per_word: dict[str, list[int]] = {}
        for _, _, k, v, _ in await read_topic(bootstrap, sink, key_serde=STR, value_serde=JSON):
            per_word.setdefault(k, []).append(v)
        assert all(v == list(range(1, expected[w] + 1)) for w, v in per_word.items())
