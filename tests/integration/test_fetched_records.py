"""headrace's consumers hand out ``FetchedRecord``s (runtime/kafka/fetch.py) that read exactly
what aiokafka's own ``ConsumerRecord``s read, transactions included.

One partition holds plain records with and without headers and keys, a committed transaction,
an aborted one and the control records both leave: a headrace reader and a plain aiokafka
consumer read it under both isolation levels and must see the same records (topic, partition,
offset, timestamp, key, value, headers) in the same order, and the same position after them.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from headrace.runtime.config import Guarantee, Settings
from headrace.runtime.kafka import clients
from headrace.runtime.kafka.fetch import FetchedRecord, FetchingConsumer

pytestmark = pytest.mark.kafka


async def _write(servers: str, topic: str) -> None:
    plain = AIOKafkaProducer(bootstrap_servers=servers, enable_idempotence=True)
    txn = AIOKafkaProducer(bootstrap_servers=servers, transactional_id=f"{topic}-txn")
    await plain.start()
    await txn.start()
    try:
        for i in range(50):
            headers = [("hr.ch", b"%d" % (i % 3))] if i % 2 else []
            key = None if i % 7 == 0 else b"k%d" % i
            await plain.send(topic, b"v%d" % i, key=key, partition=0, headers=headers)
        await plain.flush()
        async with txn.transaction():
            for i in range(20):
                await txn.send(topic, b"committed%d" % i, key=b"c%d" % i, partition=0)
        await txn.begin_transaction()
        for i in range(20):
            await txn.send(topic, b"aborted%d" % i, key=b"a%d" % i, partition=0)
        await txn.abort_transaction()
        await plain.send_and_wait(topic, b"last", key=b"last", partition=0, headers=[("x", b"")])
    finally:
        await txn.stop()
        await plain.stop()


async def _read(consumer: AIOKafkaConsumer, tp: TopicPartition, expected: int) -> list[Any]:
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        records: list[Any] = []
        for _ in range(100):
            batches = await consumer.getmany(tp, timeout_ms=500, max_records=7)
            records.extend(batches.get(tp, []))
            if len(records) >= expected and not batches:
                break
        return [*records, ("position", await consumer.position(tp))]
    finally:
        await consumer.stop()


def _fields(r: Any) -> Any:
    if isinstance(r, tuple):
        return r
    return (r.topic, r.partition, r.offset, r.timestamp, r.key, r.value, tuple(r.headers))


@pytest.mark.parametrize("guarantee", [Guarantee.EXACTLY_ONCE, Guarantee.AT_LEAST_ONCE])
async def test_fetched_records_read_what_aiokafka_reads(
    kafka_bootstrap_servers: str, topic_factory: Any, guarantee: Guarantee
) -> None:
    topic = await topic_factory("fetch")
    tp = TopicPartition(topic, 0)
    await _write(kafka_bootstrap_servers, topic)
    settings = Settings(bootstrap_servers=kafka_bootstrap_servers, processing_guarantee=guarantee)
    ours = clients.reader(settings, client_id="headrace-fetch-test")
    assert isinstance(ours, FetchingConsumer)
    theirs = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap_servers,
        enable_auto_commit=False,
        isolation_level=(
            "read_committed" if guarantee is Guarantee.EXACTLY_ONCE else "read_uncommitted"
        ),
    )
    expected = 71 if guarantee is Guarantee.EXACTLY_ONCE else 91  # 50 + 20 (+ 20 aborted) + 1
    read_by_us = await _read(ours, tp, expected)
    read_by_aiokafka = await _read(theirs, tp, expected)

    assert ours.fast_records, "the fast record path did not install on this aiokafka"
    assert all(isinstance(r, FetchedRecord) for r in read_by_us[:-1])
    assert [_fields(r) for r in read_by_us] == [_fields(r) for r in read_by_aiokafka]
    values = [r.value for r in read_by_us[:-1]]
    assert len(values) == expected
    assert (b"aborted0" in values) is (guarantee is Guarantee.AT_LEAST_ONCE)
    assert values[-1] == b"last" and b"committed19" in values
