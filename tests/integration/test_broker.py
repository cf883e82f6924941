"""The broker the test suite runs against is a real Kafka, with the features headrace needs.

Everything headrace promises (exactly-once via transactions, offsets committed inside the
transaction, restart recovery) rests on these broker behaviours; if this file fails, no
other integration or recovery test result means anything.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from headrace.runtime.localkafka import LocalBroker
from headrace.runtime.pytest_plugin import TopicFactory

pytestmark = pytest.mark.kafka

DRAIN_TIMEOUT_S = 60.0


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def _produce(
    bootstrap: str, topic: str, records: Iterable[tuple[bytes, bytes]]
) -> Counter[int]:
    """Produce (key, value) pairs with acks=all; return how many landed in each partition."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        futures = [await producer.send(topic, value=v, key=k) for k, v in records]
        metas = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return Counter(m.partition for m in metas)


async def _read_to_end(
    bootstrap: str,
    topic: str,
    partitions: int,
    *,
    isolation_level: str = "read_uncommitted",
) -> list[ConsumerRecord[bytes, bytes]]:
    """Read a whole topic without a group, up to the end offsets seen at the start.

    For read_committed the end offset is the last stable offset, so this returns once every
    committed record (and nothing of an open transaction) has been seen.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level=isolation_level,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
        out: list[ConsumerRecord[bytes, bytes]] = []
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while True:
            positions = {tp: await consumer.position(tp) for tp in tps}
            if all(positions[tp] >= ends[tp] for tp in tps):
                return out
            assert time.monotonic() < deadline, f"stuck at {positions}, end {ends}"
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out.extend(records)
    finally:
        await consumer.stop()


async def test_produce_and_consume_in_group(
    kafka_bootstrap_servers: str, topic_factory: TopicFactory, kafka_admin: Any
) -> None:
    topic = await topic_factory("smoke", partitions=3)
    n = 300
    sent = await _produce(
        kafka_bootstrap_servers, topic, ((f"k{i}".encode(), f"v{i}".encode()) for i in range(n))
    )
    assert set(sent) == {0, 1, 2}, f"keys should spread over all partitions: {sent}"

    group = _uid("smoke-group")
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap_servers,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    received: Counter[int] = Counter()
    values: set[bytes] = set()
    try:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while sum(received.values()) < n:
            assert time.monotonic() < deadline, f"consumed {received} of {sent}"
            batch = await consumer.getmany(timeout_ms=500)
            for tp, records in batch.items():
                received[tp.partition] += len(records)
                values.update(r.value for r in records if r.value is not None)
        assert {tp.partition for tp in consumer.assignment()} == {0, 1, 2}
        await consumer.commit()
    finally:
        await consumer.stop()

    assert received == sent
    assert values == {f"v{i}".encode() for i in range(n)}
    committed = await kafka_admin.list_consumer_group_offsets(group)
    assert {tp.partition: om.offset for tp, om in committed.items()} == dict(sent)


async def test_transaction_commits_output_and_group_offsets_atomically(
    kafka_bootstrap_servers: str, topic_factory: TopicFactory, kafka_admin: Any
) -> None:
    """Consume-transform-produce: the exactly-once loop every headrace task runs."""
    src = await topic_factory("txn-in", partitions=3)
    dst = await topic_factory("txn-out", partitions=3)
    n = 30
    await _produce(kafka_bootstrap_servers, src, ((b"k%d" % i, b"v%d" % i) for i in range(n)))

    group = _uid("txn-group")
    consumer = AIOKafkaConsumer(
        src,
        bootstrap_servers=kafka_bootstrap_servers,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap_servers, transactional_id=_uid("txn")
    )
    await consumer.start()
    await producer.start()
    try:
        consumed: list[ConsumerRecord[bytes, bytes]] = []
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while len(consumed) < n:
            assert time.monotonic() < deadline, f"consumed {len(consumed)} of {n}"
            for records in (await consumer.getmany(timeout_ms=500)).values():
                consumed.extend(records)

        next_offsets: dict[TopicPartition, int] = {}
        async with producer.transaction():
            for rec in consumed:
                assert rec.value is not None
                await producer.send(dst, key=rec.key, value=rec.value.upper())
                tp = TopicPartition(rec.topic, rec.partition)
                next_offsets[tp] = max(next_offsets.get(tp, 0), rec.offset + 1)
            await producer.send_offsets_to_transaction(next_offsets, group)

        # The group's offsets were committed by the transaction, not by the consumer. They
        # become visible once the coordinator has written the commit markers, which happens
        # asynchronously after commit_transaction() returns (aiokafka's OffsetFetch has no
        # require_stable), hence the polling.
        deadline = time.monotonic() + 15
        while True:
            seen = {tp: await consumer.committed(tp) for tp in next_offsets}
            if seen == next_offsets:
                break
            assert time.monotonic() < deadline, f"group offsets {seen} != {next_offsets}"
            await asyncio.sleep(0.1)
    finally:
        await producer.stop()
        await consumer.stop()

    assert len(next_offsets) == 3
    out = await _read_to_end(kafka_bootstrap_servers, dst, 3, isolation_level="read_committed")
    assert sorted(r.value for r in out if r.value) == sorted(b"V%d" % i for i in range(n))
    via_admin = await kafka_admin.list_consumer_group_offsets(group)
    assert {tp: om.offset for tp, om in via_admin.items()} == next_offsets


async def test_aborted_transaction_is_invisible_to_read_committed(
    kafka_bootstrap_servers: str, topic_factory: TopicFactory
) -> None:
    topic = await topic_factory("txn-abort", partitions=1)
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap_servers, transactional_id=_uid("txn-abort")
    )
    await producer.start()
    try:
        await producer.begin_transaction()
        for i in range(5):
            await producer.send(topic, value=b"aborted-%d" % i)
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send(topic, value=b"committed")
    finally:
        await producer.stop()

    committed = await _read_to_end(
        kafka_bootstrap_servers, topic, 1, isolation_level="read_committed"
    )
    assert [r.value for r in committed] == [b"committed"]
    everything = await _read_to_end(kafka_bootstrap_servers, topic, 1)
    assert [r.value for r in everything] == [b"aborted-%d" % i for i in range(5)] + [b"committed"]


@pytest.mark.parametrize("hard", [False, True], ids=["sigterm", "sigkill"])
async def test_restart_keeps_data_address_and_cluster(
    hard: bool,
    local_broker: LocalBroker,
    kafka_bootstrap_servers: str,
    topic_factory: TopicFactory,
) -> None:
    """Recovery tests stop or crash the broker mid-stream; it must come back as itself."""
    topic = await topic_factory("restart", partitions=2)
    n = 50
    await _produce(kafka_bootstrap_servers, topic, ((b"k%d" % i, b"v%d" % i) for i in range(n)))
    cluster_id, address, old_pid = (
        local_broker.cluster_id,
        local_broker.bootstrap_servers,
        local_broker.pid,
    )

    if hard:
        assert await asyncio.to_thread(local_broker.kill)
    else:
        assert await asyncio.to_thread(local_broker.stop)
    assert not local_broker.is_running()
    await asyncio.to_thread(local_broker.start)

    assert local_broker.is_running()
    assert local_broker.pid != old_pid
    assert local_broker.cluster_id == cluster_id
    assert local_broker.bootstrap_servers == address
    out = await _read_to_end(kafka_bootstrap_servers, topic, 2)
    assert sorted(r.value for r in out if r.value) == sorted(b"v%d" % i for i in range(n))
