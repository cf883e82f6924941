"""BatchSender appends straight into aiokafka's record batch builder; the batches it submits
are the ones ``BatchBuilder.append`` would have built (records, offsets, counts, splits)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch
from hypothesis import given, settings
from hypothesis import strategies as st

from headrace.runtime.kafka.producer import BatchSender, _raw_append, murmur2, murmur2_python


class _Meta:
    offset = 0


class StubProducer:
    """create_batch/send_batch of AIOKafkaProducer, without a network."""

    def __init__(self, max_batch_size: int, builder: type[BatchBuilder] = BatchBuilder) -> None:
        self.max_batch_size = max_batch_size
        self.builder = builder
        self.sent: list[tuple[str, int, BatchBuilder]] = []

    def create_batch(self) -> BatchBuilder:
        return self.builder(self.max_batch_size, 0)

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> Any:
        self.sent.append((topic, partition, batch))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(_Meta())
        return fut


class PublicOnly(BatchBuilder):
    """Another batch type: the sender must go through the public ``append``."""


def decode(producer: StubProducer) -> list[tuple[str, int, int, list[Any]]]:
    """(topic, partition, record_count, [(offset, key, value, headers)]) per submitted batch."""
    out = []
    for topic, p, batch in producer.sent:
        count = batch.record_count()
        recs = [
            (r.offset, r.key, r.value, list(r.headers))
            for r in DefaultRecordBatch(bytearray(batch._build()))
        ]
        out.append((topic, p, count, recs))
    return out


def outputs(n: int) -> list[Any]:
    recs: list[Any] = []
    for i in range(n):
        key = None if i % 7 == 0 else b"key-%d" % (i % 13)
        if i % 5 == 0:
            recs.append(("rep", i % 3, key, b"v" * (i % 50), [("hr.c", b"%d" % i)], None))
        else:
            recs.append(("out", None, key, b"%d" % i, [], None))
    return recs


def send(producer: StubProducer, records: list[Any], pairs: list[Any]) -> list[int]:
    async def go() -> list[int]:
        sender = BatchSender(producer, {"out": 4, "rep": 3})  # type: ignore[arg-type]
        deliveries = await sender.send(records)
        deliveries += await sender.send_pairs("log", 2, pairs)
        return [count for _, count in deliveries]

    return asyncio.run(go())


@pytest.mark.parametrize("max_batch_size", [16 * 1024 * 1024, 2048, 1])
def test_batches_are_those_the_public_append_builds(max_batch_size: int) -> None:
    import random

    records = outputs(600)
    pairs = [(b"k%d" % i, None if i % 4 == 0 else b"x" * i) for i in range(300)]
    random.seed(3)  # records without a key go to a random partition: the same for both
    fast = StubProducer(max_batch_size)
    counts = send(fast, records, pairs)
    random.seed(3)
    public = StubProducer(max_batch_size, PublicOnly)
    assert send(public, records, pairs) == counts
    assert _raw_append(fast.create_batch()) is not None
    assert _raw_append(public.create_batch()) is None
    got, expected = decode(fast), decode(public)
    assert got == expected
    assert sum(counts) == len(records) + len(pairs)
    for _, _, count, recs in got:
        assert [r[0] for r in recs] == list(range(count))  # relative offsets 0..n-1
    if max_batch_size == 1:
        assert all(count == 1 for _, _, count, _ in got)  # each record fills a batch


def test_a_full_batch_is_closed_before_it_is_submitted() -> None:
    producer = StubProducer(256)
    send(producer, [("out", 0, b"k", b"x" * 100, [], None)] * 5, [])
    assert len(producer.sent) >= 2
    assert all(batch.closed() for _, _, batch in producer.sent[:-1])


# -- output partitioning ---------------------------------------------------------------------------


# A key must land in the partition every other Kafka client picks for it (the Java client's
# Utils.murmur2, which aiokafka's pure-Python partitioner reproduces), whichever murmur2 this
# platform runs.
@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_murmur2_is_kafkas_murmur2(key: bytes) -> None:
    from aiokafka.partitioner import murmur2 as aiokafka_murmur2

    assert murmur2(key) == murmur2_python(key) == aiokafka_murmur2(bytearray(key))


def test_the_native_murmur2_is_used_where_its_wheel_is_installed() -> None:
    pytest.importorskip("murmurhash2")
    assert murmur2 is not murmur2_python


def test_batch_sender_partitions_keys_as_kafka_does() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    producer = StubProducer(1 << 20)
    sender = BatchSender(producer, {"out": 7})  # type: ignore[arg-type]
    keys = [f"user-{i}".encode() for i in range(500)]
    records = [("out", None, k, b"v", [], None) for k in keys]
    asyncio.run(sender.send(records))  # type: ignore[arg-type]
    got = {
        rec.key: p
        for topic, p, batch in producer.sent
        for rec in DefaultRecordBatch(bytearray(batch._builder.build()))
    }
    partitioner = DefaultPartitioner()
    assert got == {k: partitioner(k, list(range(7)), list(range(7))) for k in keys}
