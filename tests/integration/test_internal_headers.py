"""Internal headers are read by name (issue 15 item 5), and hop format 2 reads as format 1.

Records written to a real repartition-shaped topic (channel, sequence and barrier headers as
headrace writes them), once as written and once with a foreign header (tracing, an interceptor)
in every position: read back from the broker and fed through a repartition-fed task's aligned
cut, both give the same processed records, the same dedupe and the same checkpoints.

The same records written in hop format 2 (kafka/hopformat.py: channel and sequence numbers in
one header per batch, by headrace's own BatchSender) and read by headrace's consumer from any
offset, the middle of a batch included, give what format 1 gives from that offset; on the wire
only the first record of each data batch carries an internal header.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from headrace.runtime.checkpoint.barrier import (
    SEQUENCE_HEADER,
    barrier_headers,
    channel_headers,
    sequence,
)
from headrace.runtime.config import Settings
from headrace.runtime.kafka import clients, hopformat
from headrace.runtime.kafka.producer import BatchSender, wait_delivered
from headrace.runtime.task.cut import AlignedCut
from headrace.runtime.task.records import TaskCounters

pytestmark = pytest.mark.kafka

FOREIGN = ("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")


@dataclass
class _Source:
    topics: list[str]


@dataclass
class _Stage:
    source: _Source
    name: str = "counts"


@dataclass
class _Owner:
    """The parts of a StageTask an aligned cut reads: records it runs, checkpoints it takes."""

    stage: Any
    partition: int = 0
    checkpoint_interval_ms: int = 1000
    last_checkpoint: int = -1
    counters: TaskCounters = field(default_factory=TaskCounters)
    seen: dict[int, int] = field(default_factory=dict)
    processed: list[tuple[bytes | None, bytes | None]] = field(default_factory=list)
    checkpoints: int = 0
    cut: Any = None
    #: no event time: the cut reads no watermarks
    time: Any = None

    def clock(self) -> float:
        return 0.0

    def run(self, records: Any, start: int, end: int) -> None:
        self.processed.extend((r.key, r.value) for r in records[start:end])

    def prepare(self, *, force: bool, final: bool, checkpoint_id: int | None = None) -> None:
        """Take the cut and commit it at once: the records held behind the barrier are
        released (read again, by name, in ``committed``)."""
        self.checkpoints += 1
        taken = self.cut.take(force, checkpoint_id)
        self.cut.committed(SimpleNamespace(checkpoint_id=taken.checkpoint_id, final=False))


def _written() -> list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]:
    """Two channels: sequenced data, a replay of channel 0's first records, then a barrier."""
    out: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = []
    for ch in (0, 1):
        for i in range(5):
            seq = (SEQUENCE_HEADER, b"%d" % sequence(i, 0, 0))
            out.append((b"k%d" % i, b"v%d-%d" % (ch, i), [*channel_headers(ch), seq]))
    for i in range(3):  # an upstream replay: dropped by the dedupe
        seq = (SEQUENCE_HEADER, b"%d" % sequence(i, 0, 0))
        out.append((b"k%d" % i, b"v0-%d" % i, [*channel_headers(0), seq]))
    for ch in (0, 1):
        out.append((None, b"", barrier_headers(ch, 7)))
    for ch in (0, 1):  # after the barrier, unsequenced (a later hop)
        out.append((b"late", b"late-%d" % ch, channel_headers(ch)))
    return out


def _with_foreign(headers: list[tuple[str, bytes]], i: int) -> list[tuple[str, bytes]]:
    pos = i % (len(headers) + 1)  # first, between, last: every position in turn
    return [*headers[:pos], FOREIGN, *headers[pos:]]


async def _round_trip(servers: str, topic: str, foreign: bool) -> _Owner:
    producer = AIOKafkaProducer(bootstrap_servers=servers)
    await producer.start()
    try:
        for i, (k, v, h) in enumerate(_written()):
            await producer.send_and_wait(
                topic, v, key=k, partition=0, headers=_with_foreign(h, i) if foreign else h
            )
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=servers, auto_offset_reset="earliest")
    await consumer.start()
    records: list[Any] = []
    try:
        while len(records) < len(_written()):
            batch = await consumer.getmany(timeout_ms=2000)
            for rs in batch.values():
                records.extend(rs)
    finally:
        await consumer.stop()
    if foreign:
        assert all(FOREIGN in list(r.headers) for r in records)
    return _feed(topic, records)


async def test_foreign_headers_on_a_repartition_topic_change_nothing(
    kafka_bootstrap_servers: str, topic_factory: Any
) -> None:
    plain = await _round_trip(kafka_bootstrap_servers, await topic_factory("rp-plain"), False)
    traced = await _round_trip(kafka_bootstrap_servers, await topic_factory("rp-traced"), True)
    assert plain.checkpoints == 1
    assert len(plain.processed) == 12  # 10 data records + 2 after the barrier; 3 replays dropped
    assert plain.counters.deduplicated == 3
    assert traced.processed == plain.processed
    assert traced.checkpoints == plain.checkpoints
    assert traced.counters.deduplicated == plain.counters.deduplicated
    assert traced.seen == plain.seen


def _sends_format2(topic: str) -> list[list[Any]]:
    """``_written()`` as a task's sends: one channel's outputs per send, marks instead of
    header lists, barriers in a send of their own (as checkpoint/commit.py sends them)."""
    sends: list[list[Any]] = []
    for ch in (0, 1):
        sends.append(
            [
                (
                    topic,
                    0,
                    b"k%d" % i,
                    b"v%d-%d" % (ch, i),
                    hopformat.mark(ch, sequence(i, 0, 0)),
                    None,
                )
                for i in range(5)
            ]
        )
    sends.append(
        [
            (topic, 0, b"k%d" % i, b"v0-%d" % i, hopformat.mark(0, sequence(i, 0, 0)), None)
            for i in range(3)
        ]
    )
    sends.append([(topic, 0, None, b"", barrier_headers(ch, 7), None) for ch in (0, 1)])
    for ch in (0, 1):
        sends.append([(topic, 0, b"late", b"late-%d" % ch, hopformat.mark(ch, None), None)])
    return sends


async def _write(servers: str, topic: str, fmt: int) -> None:
    if fmt == 1:
        producer = AIOKafkaProducer(bootstrap_servers=servers)
        await producer.start()
        try:
            for k, v, h in _written():
                await producer.send_and_wait(topic, v, key=k, partition=0, headers=h)
        finally:
            await producer.stop()
        return
    producer = AIOKafkaProducer(bootstrap_servers=servers, max_batch_size=512 * 1024)
    await producer.start()
    try:
        sender = BatchSender(producer, {topic: 1})
        for records in _sends_format2(topic):
            await wait_delivered(await sender.send(records))
    finally:
        await producer.stop()


async def _read_from(servers: str, topic: str, start: int) -> list[Any]:
    """The records from ``start`` on, through headrace's consumer (kafka/fetch.py)."""
    consumer = clients.reader(Settings(bootstrap_servers=servers), client_id="hop-format-test")
    await consumer.start()
    tp = TopicPartition(topic, 0)
    records: list[Any] = []
    try:
        consumer.assign([tp])
        consumer.seek(tp, start)
        while len(records) < len(_written()) - start:
            batch = await consumer.getmany(timeout_ms=2000)
            for rs in batch.values():
                records.extend(rs)
    finally:
        await consumer.stop()
    return records


def _feed(topic: str, records: list[Any]) -> _Owner:
    owner = _Owner(stage=_Stage(_Source([topic])))
    cut = AlignedCut(owner, upstream_partitions=2, timeout=60.0)  # type: ignore[arg-type]
    owner.cut = cut
    i = 0
    while i < len(records):
        i = cut.feed(records, i)
    return owner


async def test_hop_format_2_reads_as_format_1_from_any_offset(
    kafka_bootstrap_servers: str, topic_factory: Any
) -> None:
    servers = kafka_bootstrap_servers
    one = await topic_factory("rp-format1")
    two = await topic_factory("rp-format2")
    await _write(servers, one, 1)
    await _write(servers, two, 2)

    # on the wire: the first record of each data batch carries hr.b, the others nothing
    raw = AIOKafkaConsumer(two, bootstrap_servers=servers, auto_offset_reset="earliest")
    await raw.start()
    wire: list[Any] = []
    try:
        while len(wire) < len(_written()):
            for rs in (await raw.getmany(timeout_ms=2000)).values():
                wire.extend(rs)
    finally:
        await raw.stop()
    names = [[n for n, _ in r.headers] for r in wire]
    batch_starts = {0, 5, 10, 15, 16}  # a batch per send: 5, 5, 3 records, 2 barriers, 1, 1
    for offset, got in enumerate(names):
        if offset in (13, 14):  # the barriers keep their own headers (a batch of format 1)
            assert got == ["hr.ch", "hr.barrier"]
        elif offset in batch_starts:
            assert got == ["hr.b"], (offset, got)
        else:
            assert got == [], (offset, got)

    for start in range(len(_written())):
        plain = _feed(one, await _read_from(servers, one, start))
        batched = _feed(two, await _read_from(servers, two, start))
        assert batched.processed == plain.processed, start
        assert batched.counters.deduplicated == plain.counters.deduplicated, start
        assert batched.seen == plain.seen, start
        assert batched.checkpoints == plain.checkpoints, start
    full = _feed(two, await _read_from(servers, two, 0))
    assert len(full.processed) == 12 and full.counters.deduplicated == 3
