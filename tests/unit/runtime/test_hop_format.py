"""Hop format 2 (kafka/hopformat.py) from the sender's batches to the hop reader, without a
broker: real aiokafka record batches built by ``BatchSender``, laid end to end as a partition's
log, read by headrace's batch reader (kafka/fetch.py) from any offset with any fetch sizes.
Every record read resolves to the channel and sequence number its task gave it, whatever the
batch sizes (small ones make the sender rebuild batches that filled up), whether the fetch
started inside a batch, and with barriers (format-1 records) among the data.

``tests/integration/test_internal_headers.py`` does the same against a broker and through the
aligned cut, and compares with format 1.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_batch_reader import READ_UNCOMMITTED, TP, _result

from headrace.runtime.checkpoint.barrier import barrier_headers, read_internal
from headrace.runtime.kafka import hopformat
from headrace.runtime.kafka.fetch import _BatchReader
from headrace.runtime.kafka.producer import BatchSender, as_format1
from headrace.runtime.task.cut import AlignedCut
from headrace.runtime.task.records import TaskCounters

CHANNEL = 5


class _Meta:
    offset = 0


class _Producer:
    """create_batch/send_batch of AIOKafkaProducer, without a network."""

    def __init__(self, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size
        self.sent: list[BatchBuilder] = []

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(self.max_batch_size, 0)

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> Any:
        self.sent.append(batch)
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(_Meta())
        return fut


def _outputs(spec: list[tuple[str, int]]) -> list[Any]:
    """A task's outputs to one partition: data records (a mark with a sequence number or
    without) and barriers (their own format-1 headers); the first is data (a hop send)."""
    out: list[Any] = []
    for i, (kind, n) in enumerate(spec):
        if kind == "barrier" and i:
            out.append((TP.topic, TP.partition, None, b"", barrier_headers(CHANNEL, n), None))
        else:
            seq = n if kind == "seq" else None
            value = b"v%d" % i * (n % 7)
            out.append(
                (TP.topic, TP.partition, b"k%d" % i, value, hopformat.mark(CHANNEL, seq), None)
            )
    return out


def _log(producer: _Producer, start: int = 0) -> bytes:
    """The submitted batches, one after another, as the broker would store them, from the
    batch that holds offset ``start`` (what a fetch from ``start`` returns)."""
    data = bytearray()
    base = 0
    for batch in producer.sent:
        built = bytearray(batch._build())
        struct.pack_into(">q", built, 0, base)
        base += batch.record_count()
        if base > start:
            data += built
    return bytes(data)


def _send(records: list[Any], max_batch_size: int) -> tuple[_Producer, list[int]]:
    producer = _Producer(max_batch_size)

    async def go() -> list[int]:
        sender = BatchSender(producer, {TP.topic: 8})  # type: ignore[arg-type]
        return [count for _, count in await sender.send(records)]

    return producer, asyncio.run(go())


def _expected(rec: Any) -> tuple[int, bytes | None, int | None]:
    return read_internal(as_format1(rec)[4], TP.topic, TP.partition, 0)  # type: ignore[arg-type]


spec = st.lists(
    st.tuples(st.sampled_from(["seq", "seq", "plain", "barrier"]), st.integers(0, 2**50)),
    min_size=1,
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(
    spec=spec,
    max_batch_size=st.sampled_from([120, 300, 1000, 512 * 1024]),
    start=st.integers(0, 200),
    limits=st.lists(st.one_of(st.none(), st.integers(1, 9)), max_size=4),
)
def test_every_record_reads_back_its_channel_and_number(
    spec: list[tuple[str, int]], max_batch_size: int, start: int, limits: list[int | None]
) -> None:
    written = _outputs(spec)
    producer, counts = _send(written, max_batch_size)
    assert sum(counts) == len(written)
    start = min(start, len(written) - 1)
    result = _result(_log(producer, start), [], start, READ_UNCOMMITTED)
    reader = _BatchReader(result, result._partition_records)
    read: list[Any] = []
    for i in range(1000):
        got = reader.getall(limits[i % len(limits)] if limits else None)
        read.extend(got)
        if not result.has_more():
            break
    assert [r.offset for r in read] == list(range(start, len(written)))
    for r in read:
        rec = written[r.offset]
        assert read_internal(r.headers, TP.topic, TP.partition, r.offset) == _expected(rec)
        assert (r.key, r.value) == (rec[2], rec[3])
        if isinstance(rec[4], int):
            assert list(r.headers) == []  # internal: an operator sees no header
            assert type(r.headers) is hopformat.BatchContext
        else:
            assert list(r.headers) == rec[4]  # a barrier keeps its own headers


def test_only_the_first_record_of_a_batch_carries_the_header() -> None:
    written = _outputs([("seq", 10 + i) for i in range(50)])
    producer, counts = _send(written, 512 * 1024)
    assert counts == [50]
    raw = list(DefaultRecordBatch(bytearray(producer.sent[0]._build())))
    assert [h for h, _ in raw[0].headers] == [hopformat.BATCH_HEADER]
    assert all(r.headers == [] for r in raw[1:])
    # 4 bytes of channel and 8 per record: less than the format-1 headers' ~20 per record
    assert len(raw[0].headers[0][1]) == 4 + 8 * 50


def test_a_batch_that_fills_up_is_built_again_smaller() -> None:
    written = _outputs([("seq", i) for i in range(400)])
    producer, counts = _send(written, 2048)
    assert sum(counts) == 400 and len(counts) > 1
    assert all(b.record_count() == c for b, c in zip(producer.sent, counts, strict=True))


def test_marks_of_two_channels_in_one_send_are_refused() -> None:
    records = [
        (TP.topic, 0, b"a", b"1", hopformat.mark(1, 7), None),
        (TP.topic, 0, b"b", b"2", hopformat.mark(2, 8), None),
    ]
    with pytest.raises(ValueError, match="several channels"):
        _send(records, 512 * 1024)


def test_a_record_larger_than_a_batch_gets_a_batch_of_its_own() -> None:
    """As aiokafka's append does: an empty batch takes any record (the broker's limit on a
    record is checked per output by the task, task/chain.py)."""
    written = _outputs([("seq", 1), ("seq", 5000), ("seq", 3)])
    written[1] = (*written[1][:3], b"x" * 5000, *written[1][4:])
    producer, counts = _send(written, 1024)
    assert counts == [1, 1, 1]
    result = _result(_log(producer), [], 0, READ_UNCOMMITTED)
    read = _BatchReader(result, result._partition_records).getall(None)
    assert [read_internal(r.headers, TP.topic, 0, r.offset)[2] for r in read] == [1, 5000, 3]


def test_a_malformed_batch_header_is_left_to_the_hop_reader_to_refuse() -> None:
    builder = BatchBuilder(1 << 20, 0)
    builder.append(key=b"k", value=b"v", timestamp=None, headers=[("hr.b", b"\x01\x02")])
    builder.append(key=b"k", value=b"v", timestamp=None, headers=[])
    result = _result(bytes(builder._build()), [], 0, READ_UNCOMMITTED)
    read = _BatchReader(result, result._partition_records).getall(None)
    assert [list(r.headers) for r in read] == [[("hr.b", b"\x01\x02")], []]
    with pytest.raises(ValueError, match=r"no 'hr\.ch' header"):
        read_internal(read[1].headers, TP.topic, TP.partition, read[1].offset)


@pytest.mark.parametrize("seq", [None, 0, 1, 2**40, hopformat.MAX_SEQUENCE])
def test_a_mark_holds_a_channel_and_a_sequence(seq: int | None) -> None:
    m = hopformat.mark(2**31 + 3, seq)
    assert hopformat.mark_channel(m) == 2**31 + 3
    assert hopformat.mark_sequence(m) == seq
    ctx = hopformat.decode(hopformat.encode(7, [m >> 32, 0]), 100)
    assert (ctx.channel, ctx.sequence(100), ctx.sequence(101)) == (7, seq, None)
    with pytest.raises(ValueError, match="outside its hop batch"):
        ctx.sequence(102)


@dataclass
class _Owner:
    """The parts of a StageTask an aligned cut reads: records it runs, checkpoints it takes
    (committed at once, which releases the records held behind a barrier)."""

    stage: Any
    partition: int = 0
    checkpoint_interval_ms: int = 1000
    last_checkpoint: int = -1
    counters: TaskCounters = field(default_factory=TaskCounters)
    seen: dict[int, int] = field(default_factory=dict)
    processed: list[tuple[int, bytes | None]] = field(default_factory=list)
    cut: Any = None
    time: Any = None

    def clock(self) -> float:
        return 0.0

    def run(self, records: Any, start: int, end: int) -> None:
        self.processed.extend((r.offset, r.value) for r in records[start:end])

    def prepare(self, *, force: bool, final: bool, checkpoint_id: int | None = None) -> None:
        taken = self.cut.take(force, checkpoint_id)
        self.cut.committed(SimpleNamespace(checkpoint_id=taken.checkpoint_id, final=False))


def _aligned_sends(fmt: int) -> list[list[Any]]:
    """Two upstream channels: channel 0's barrier comes first, so its next records are held
    until channel 1's barrier; among the held ones is a replay the release must drop."""

    def data(ch: int, seqs: list[int | None]) -> list[Any]:
        recs = [
            (TP.topic, 0, b"k", f"{ch}-{s}".encode(), hopformat.mark(ch, s), None) for s in seqs
        ]
        return recs if fmt == 2 else [as_format1(r) for r in recs]

    def barrier(ch: int) -> list[Any]:
        return [(TP.topic, 0, None, b"", barrier_headers(ch, 7), None)]

    return [
        data(0, [1, 2, 3]),
        barrier(0),
        data(0, [4, 2, 5, None]),  # held: 2 is a replay, None has no number
        data(1, [1, 2]),
        data(1, [1, 3]),  # 1 is a replay (processed at once: channel 1 has not passed)
        barrier(1),
        data(1, [4]),
    ]


def _aligned(fmt: int) -> _Owner:
    producer = _Producer(512 * 1024)

    async def go() -> None:
        sender = BatchSender(producer, {TP.topic: 8})  # type: ignore[arg-type]
        for records in _aligned_sends(fmt):
            await sender.send(records)

    asyncio.run(go())
    result = _result(_log(producer), [], 0, READ_UNCOMMITTED)
    records = _BatchReader(result, result._partition_records).getall(None)
    owner = _Owner(stage=SimpleNamespace(source=SimpleNamespace(topics=[TP.topic]), name="s"))
    owner.cut = AlignedCut(owner, upstream_partitions=2, timeout=60.0)  # type: ignore[arg-type]
    i = 0
    while i < len(records):
        i = owner.cut.feed(records, i)
    return owner


def test_records_held_behind_a_barrier_are_released_and_deduplicated_as_in_format_1() -> None:
    one, two = _aligned(1), _aligned(2)
    values = [v for _, v in two.processed]
    assert values == [
        b"0-1", b"0-2", b"0-3", b"1-1", b"1-2", b"1-3",  # before the alignment completes
        b"0-4", b"0-5", b"0-None",  # released: the replayed 0-2 dropped
        b"1-4",
    ]  # fmt: skip
    assert two.processed == one.processed
    assert two.seen == one.seen
    assert two.counters.deduplicated == one.counters.deduplicated == 2
