"""The batch reader of runtime/kafka/fetch.py hands out exactly what aiokafka's own
``FetchResult.getall`` hands out: the same records in the same order and the same positions,
for any log of plain batches, transactions (committed, aborted, still open) and their control
markers, any fetch offset inside the first batch, any ``max_records`` sequence and both
isolation levels. The logs are real record batches made by aiokafka's batch builder; the
control batches are made the way a broker writes them (the control bit, a CRC over it)."""

from __future__ import annotations

import gc
import struct
import weakref
from dataclasses import dataclass
from typing import Any

from aiokafka.consumer.fetcher import READ_COMMITTED, FetchResult, PartitionRecords
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c
from aiokafka.structs import TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st

from headrace.runtime.kafka.fetch import FetchedRecord, _BatchReader, _FetchResults, aiokafka_fits

TP = TopicPartition("fetch", 3)
READ_UNCOMMITTED = 0
_CONTROL_BIT = 0x20


def _builder(producer_id: int = -1) -> DefaultRecordBatchBuilder:
    transactional = producer_id >= 0
    return DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=int(transactional),
        producer_id=producer_id,
        producer_epoch=0 if transactional else -1,
        base_sequence=0 if transactional else -1,
        batch_size=1 << 20,
    )


def _batch(
    base: int, values: list[tuple[bytes | None, bytes, list[Any]]], producer_id: int = -1
) -> bytes:
    builder = _builder(producer_id)
    for i, (key, value, headers) in enumerate(values):
        builder.append(
            i, timestamp=1_700_000_000_000 + base + i, key=key, value=value, headers=headers
        )
    batch = bytearray(builder.build())
    struct.pack_into(">q", batch, 0, base)
    return bytes(batch)


def _compacted(base: int, kept: list[int], span: int) -> bytes:
    """A batch of ``span`` offsets of which compaction kept only the deltas in ``kept``: its
    last offset stays ``base + span - 1`` (the batch header keeps it) even if that record is
    gone."""
    builder = _builder()
    for delta in kept:
        builder.append(
            delta,
            timestamp=1_700_000_000_000 + base + delta,
            key=b"c",
            value=b"c%d" % (base + delta),
            headers=[],
        )
    batch = bytearray(builder.build())
    struct.pack_into(">q", batch, 0, base)
    struct.pack_into(">i", batch, 23, span - 1)  # lastOffsetDelta
    struct.pack_into(">I", batch, 17, calc_crc32c(bytes(batch[21:])))
    return bytes(batch)


def _marker(base: int, producer_id: int, commit: bool) -> bytes:
    """A control batch with one end-transaction marker, as the broker writes it."""
    key = struct.pack(">hh", 0, 1 if commit else 0)
    batch = bytearray(_batch(base, [(key, struct.pack(">hi", 0, 0), [])], producer_id))
    attributes = struct.unpack_from(">h", batch, 21)[0] | _CONTROL_BIT
    struct.pack_into(">h", batch, 21, attributes)
    struct.pack_into(">I", batch, 17, calc_crc32c(bytes(batch[21:])))
    return bytes(batch)


@dataclass
class _Position:
    position: int
    paused: bool = False

    def consumed_to(self, position: int) -> None:
        self.position = position


class _Assignment:
    active = True

    def __init__(self, position: int) -> None:
        self.state = _Position(position)

    def state_value(self, tp: TopicPartition) -> _Position:
        return self.state


def _result(data: bytes, aborted: list[tuple[int, int]], at: int, isolation: int) -> FetchResult:
    records = PartitionRecords(
        TP, MemoryRecords(data), list(aborted), at, None, None, True, isolation
    )
    return FetchResult(TP, assignment=_Assignment(at), partition_records=records, backoff=0)


def _read(result: FetchResult, limits: list[int | None], batched: bool) -> list[Any]:
    """Each call's records and the position after it, until the result is drained."""
    if batched:
        reader = _BatchReader(result, result._partition_records)
        getall = reader.getall
    else:
        getall = result.getall
    calls: list[Any] = []
    for i in range(200):
        limit = limits[i % len(limits)] if limits else None
        got = getall(limit)
        if got:  # aiokafka may need one more (empty) call to notice it is drained
            calls.append(
                [
                    [
                        (
                            r.topic,
                            r.partition,
                            r.offset,
                            r.timestamp,
                            r.key,
                            r.value,
                            list(r.headers),
                        )
                        for r in got
                    ],
                    result._assignment.state.position,
                ]
            )
        if not result.has_more():
            break
    return [calls, result._assignment.state.position]


segment = st.one_of(
    st.tuples(st.just("plain"), st.integers(1, 6), st.booleans()),
    st.tuples(st.just("txn"), st.integers(0, 2), st.integers(1, 5)),
    st.tuples(st.just("end"), st.integers(0, 2), st.booleans()),
    st.tuples(st.just("compacted"), st.sets(st.integers(0, 5), min_size=1), st.integers(0, 2)),
)


def _log(segments: list[Any]) -> tuple[bytes, list[tuple[int, int]], int]:
    data = bytearray()
    offset = 0
    open_txn: dict[int, int] = {}  # producer -> first offset of its open transaction
    aborted: list[tuple[int, int]] = []
    for kind, a, b in segments:
        if kind == "plain":
            values = [
                (
                    None if (offset + i) % 3 == 0 else b"k%d" % (offset + i),
                    b"v%d" % (offset + i),
                    [("hr.ch", b"%d" % i)] if b else [],
                )
                for i in range(a)
            ]
            data += _batch(offset, values)
            offset += a
        elif kind == "compacted":
            span = max(a) + 1 + b  # b offsets after the last kept record were compacted away
            data += _compacted(offset, sorted(a), span)
            offset += span
        elif kind == "txn":
            producer = 100 + a
            open_txn.setdefault(producer, offset)
            data += _batch(
                offset, [(b"t", b"txn%d" % (offset + i), []) for i in range(b)], producer
            )
            offset += b
        else:
            producer = 100 + a
            if producer not in open_txn:
                continue
            first = open_txn.pop(producer)
            if not b:
                aborted.append((producer, first))
            data += _marker(offset, producer, commit=b)
            offset += 1
    return bytes(data), aborted, offset


def test_this_aiokafka_fits_the_batch_reader() -> None:
    """A new aiokafka whose fetch results changed shape fails here, not silently slower."""
    assert aiokafka_fits()


@settings(max_examples=300, deadline=None)
@given(
    segments=st.lists(segment, min_size=1, max_size=12),
    limits=st.lists(st.one_of(st.none(), st.integers(1, 7)), max_size=4),
    skip=st.integers(0, 3),
    committed=st.booleans(),
)
def test_the_batch_reader_reads_what_aiokafka_reads(
    segments: list[Any], limits: list[int | None], skip: int, committed: bool
) -> None:
    data, aborted, end = _log(segments)
    at = min(skip, end - 1) if end else 0  # a fetch offset inside the first batch
    isolation = READ_COMMITTED if committed else READ_UNCOMMITTED
    theirs = _read(_result(data, aborted, at, isolation), limits, batched=False)
    ours = _read(_result(data, aborted, at, isolation), limits, batched=True)
    assert ours == theirs


def test_records_are_fetched_records_and_aborted_ones_stay_hidden() -> None:
    data, aborted, _ = _log(
        [("plain", 2, True), ("txn", 0, 3), ("end", 0, False), ("txn", 1, 2), ("end", 1, True)]
    )
    result = _result(data, aborted, 0, READ_COMMITTED)
    records = _BatchReader(result, result._partition_records).getall()
    assert all(isinstance(r, FetchedRecord) for r in records)
    assert [r.value for r in records] == [b"v0", b"v1", b"txn6", b"txn7"]
    assert records[0].headers == [("hr.ch", b"0")] and records[0].key is None
    assert result._assignment.state.position == 9  # past the last marker


def test_a_dropped_fetch_result_is_freed_at_once() -> None:
    """A fetch result holds a whole fetch response: when the fetcher drops it, reference
    counting must free it, read or not (a reference cycle would keep responses until the
    collector runs: tens of MB at the worker's collector threshold)."""
    data, aborted, _ = _log([("plain", 5, False), ("plain", 3, True)])
    for read in (0, 2, None):
        results = _FetchResults()
        results[TP] = _result(data, aborted, 0, READ_UNCOMMITTED)
        if read is not None:
            results[TP].getall(read)
        gone = [weakref.ref(results[TP]), weakref.ref(results[TP]._partition_records)]
        gc.disable()
        try:
            del results[TP]
            assert [ref() for ref in gone] == [None, None], f"kept after reading {read}"
        finally:
            gc.enable()
