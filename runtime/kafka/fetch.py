"""Fetched records without aiokafka's per-record Python layer: a third off a consumer's cost.

Why
---
aiokafka decodes a fetched record batch in C (its Cython reader makes one small object per
record) and then, per record, resumes a Python generator through a Python ``__next__`` and wraps
the record in a ``ConsumerRecord``: a dataclass of eleven fields built by a Python ``__init__``,
plus a ``tuple()`` of the headers, two ``len()`` calls, the deserializer tests and a checksum
lookup. That layer costs about three times the decoding itself (``bench/fetch_micro.py``), and
every consumer pays it once per record, headrace's tasks and restores included: in S1 aiokafka's
fetch path was ~40 % of the worker's samples, and a two-stage job pays it twice per word.

What
----
headrace's consumers (:class:`FetchingConsumer`, made by ``kafka/clients.py``) hand out
:class:`FetchedRecord`: exactly the seven fields a task reads
(:class:`~headrace.runtime.task.records.RawRecord`), in slots, with the headers as the list the C
reader made, decoded a record batch at a time by :class:`_BatchReader` under aiokafka's own
rules (aborted transactions under ``read_committed``, control batches, CRC checks, positions;
stated there). Only the step from fetched bytes to records changes: fetching, positions,
assignment checks and the buffer stay aiokafka's, and an application's own aiokafka consumers
in the same process are never touched (no global patch).

The hook uses private names of aiokafka 0.11-0.14 (``AIOKafkaConsumer._fetcher``,
``Fetcher._records``, ``FetchResult``'s and ``PartitionRecords``' fields). :func:`install` checks
their shape and leaves the consumer as it is if anything differs (a newer aiokafka): records are
then ``ConsumerRecord``s again, slower and equally correct, and a warning says so.
``tests/unit/runtime/test_batch_reader.py`` fails on an aiokafka the hook does not fit, so an
upgrade cannot lose the fast path unnoticed.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections import OrderedDict
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.consumer.fetcher import READ_COMMITTED, FetchResult, PartitionRecords
from aiokafka.errors import CorruptRecordException

from headrace.runtime.kafka import hopformat

log = logging.getLogger("headrace.runtime.kafka")

__all__ = ["FetchedRecord", "FetchingConsumer", "aiokafka_fits", "install"]


class FetchedRecord:
    """A fetched record: what a task reads of it, nothing more.

    ``timestamp`` is writable (event time replaces it with the extracted one); ``headers`` is
    the list aiokafka's reader decoded, not to be changed (operators get a tuple of it).
    """

    __slots__ = ("headers", "key", "offset", "partition", "timestamp", "topic", "value")

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        timestamp: int,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.timestamp = timestamp
        self.key = key
        self.value = value
        self.headers = headers

    def __repr__(self) -> str:
        return (
            f"FetchedRecord(topic={self.topic!r}, partition={self.partition}, "
            f"offset={self.offset}, timestamp={self.timestamp}, key={self.key!r}, "
            f"value={self.value!r}, headers={self.headers!r})"
        )


class _BatchReader:
    """Hands out one fetch result's records a record *batch* at a time.

    aiokafka's ``FetchResult.getall`` pulls records one by one through two Python frames per
    record (``PartitionRecords.__next__`` and its generator) and wraps each in a
    ``ConsumerRecord``. This reader walks the same ``MemoryRecords`` with the same rules and
    decodes a whole record batch in one loop. The rules, as ``PartitionRecords._unpack_records``
    states them (aiokafka 0.11-0.14): a batch with a bad CRC raises ``CorruptRecordException``;
    under ``read_committed`` the aborted-transaction list is consumed up to each batch, an abort
    marker ends its producer's abort, and transactional batches of an aborted producer are
    skipped; control batches are skipped under both isolation levels; records below the fetch
    offset are skipped (a batch may start before it); the position after a batch is the
    batch's next offset (compaction may have removed its last records), after a partly handed
    out batch the record after the last one handed out.
    ``tests/unit/runtime/test_batch_reader.py`` holds the two to the same records and positions,
    ``tests/integration/test_fetched_records.py`` on a real broker with transactions.
    """

    __slots__ = ("at", "batch_end", "pending", "records", "result")

    def __init__(self, result: Any, records: Any) -> None:
        # Memory: a fetch result holds a whole fetch response (up to max_partition_fetch_bytes)
        # and must be freed the moment the fetcher drops it, by reference counting, not by a
        # later cyclic collection (which, with the worker's collector threshold, let several
        # responses pile up: +40-80 MB peak RSS in S1 and S6). So no reference cycles: the
        # result holds this reader (its getall), the reader holds the result only weakly, and
        # aiokafka's own record generator, which would hold its PartitionRecords in a cycle
        # until it ran to its end, is replaced by an empty one (nothing reads it: getall and
        # getone are this reader's).
        self.result = weakref.ref(result)
        records._records_iterator = iter(())
        self.records = records  # aiokafka's PartitionRecords: the bytes, aborts, position
        self.pending: list[FetchedRecord] = []  # the current batch's records not handed out
        self.at = 0
        self.batch_end = 0

    def getall(self, max_records: int | None = None) -> list[FetchedRecord]:
        # our consumers have no deserializers (install checks): records are handed out as read
        result = self.result()
        if (
            result is None
            or not result.check_assignment(result._topic_partition)
            or not result.has_more()
        ):
            return []
        out, drained = self._take(max_records)
        result._update_position()
        if drained:
            result._partition_records = None  # the fetcher asks for more
        return out

    def getone(self) -> FetchedRecord | None:
        records = self.getall(1)
        return records[0] if records else None

    def _take(self, limit: int | None) -> tuple[list[FetchedRecord], bool]:
        """Up to ``limit`` records, and whether the result is drained (as aiokafka: only
        noticed when more was asked for than there was)."""
        records = self.records
        out: list[FetchedRecord] = []
        while limit is None or len(out) < limit:
            pending, at = self.pending, self.at
            if at >= len(pending):
                if pending:  # the batch was handed out: its end is the position
                    records.next_fetch_offset = self.batch_end
                    self.pending, self.at = [], 0
                if not self._decode_next_batch():
                    return out, True
                continue
            end = len(pending) if limit is None else min(len(pending), at + limit - len(out))
            if at == 0 and end == len(pending) and not out:
                out = pending  # handed over whole: never changed here again
            else:
                out.extend(pending[at:end])
            self.at = end
            records.next_fetch_offset = pending[end - 1].offset + 1
        return out, False

    def _decode_next_batch(self) -> bool:
        """Decode the next batch that has records to hand out; False when none is left."""
        records = self.records
        memory = records._records
        tp = records._tp
        committed_only = records._isolation_level == READ_COMMITTED
        while memory.has_next():
            batch = memory.next_batch()
            if records._check_crcs and not batch.validate_crc():
                raise CorruptRecordException(f"Invalid CRC - {tp}")
            if committed_only and batch.producer_id is not None:
                records._consume_aborted_up_to(batch.base_offset)
                if batch.is_control_batch and records._contains_abort_marker(batch):
                    records._aborted_producers.discard(batch.producer_id)
                if batch.is_transactional and batch.producer_id in records._aborted_producers:
                    records.next_fetch_offset = batch.next_offset
                    continue
            if batch.is_control_batch:
                records.next_fetch_offset = batch.next_offset
                continue
            first = records.next_fetch_offset
            topic, partition, make = tp.topic, tp.partition, FetchedRecord
            # a list: aiokafka's batch is its own iterator, iterable once
            batch_records = list(batch)
            head = batch_records[0] if batch_records else None
            context = None if head is None else _hop_context(head.headers, head.offset)
            if context is None:
                decoded = [
                    make(topic, partition, r.offset, r.timestamp, r.key, r.value, r.headers)
                    for r in batch_records
                    if r.offset >= first
                ]
            else:
                # hop format 2: every record of the batch without headers of its own gets
                # the batch's context (kafka/hopformat.py), also when the fetch started
                # inside the batch (the broker returns a batch from its first record)
                ctx = context
                decoded = [
                    make(topic, partition, r.offset, r.timestamp, r.key, r.value, r.headers or ctx)
                    for r in batch_records
                    if r.offset >= first
                ]
                if decoded and decoded[0].offset == context.base:
                    # the first record's own headers besides hr.b (a barrier's), if any
                    decoded[0].headers = decoded[0].headers[1:] or context
            if decoded:
                self.pending, self.at, self.batch_end = decoded, 0, batch.next_offset
                return True
            records.next_fetch_offset = batch.next_offset
        return False


def _hop_context(headers: list[tuple[str, bytes]], offset: int) -> hopformat.BatchContext | None:
    """The batch context if the first header of a batch's first record is a hop format 2
    ``hr.b`` header, else None (a record of any other topic, or of hop format 1)."""
    if not headers:
        return None
    name, value = headers[0]
    if name != hopformat.BATCH_HEADER:
        return None
    try:
        return hopformat.decode(value, offset)
    except ValueError:
        return None  # not headrace's: the hop reader refuses the record (no channel)


class _FetchResults(OrderedDict[Any, Any]):
    """The fetcher's buffer of fetch results: every result stored in it is read by a
    :class:`_BatchReader` (set before anything reads it: the fetcher stores a result as soon
    as it made it)."""

    def __setitem__(self, tp: Any, result: Any) -> None:
        records = getattr(result, "_partition_records", None)
        if records is not None:
            reader = _BatchReader(result, records)
            result.getall = reader.getall
            result.getone = reader.getone
        super().__setitem__(tp, result)


def _parameters(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


def aiokafka_fits() -> bool:
    """Whether this aiokafka's fetch results have the shape :class:`_BatchReader` reads."""
    return (
        _parameters(FetchResult.__init__)
        == ["self", "tp", "assignment", "partition_records", "backoff"]
        and _parameters(PartitionRecords.__init__)
        == [
            "self",
            "tp",
            "records",
            "aborted_transactions",
            "fetch_offset",
            "key_deserializer",
            "value_deserializer",
            "check_crcs",
            "isolation_level",
        ]
        and all(
            callable(getattr(FetchResult, name, None))
            for name in ("getall", "getone", "check_assignment", "has_more", "_update_position")
        )
        and all(
            callable(getattr(PartitionRecords, name, None))
            for name in ("_consume_aborted_up_to", "_contains_abort_marker")
        )
    )


_FITS = aiokafka_fits()


def install(consumer: AIOKafkaConsumer) -> bool:
    """Make a started consumer hand out :class:`FetchedRecord`; False (and a warning) if this
    aiokafka's fetcher does not have the shape the hook needs."""
    fetcher = getattr(consumer, "_fetcher", None)
    results = getattr(fetcher, "_records", None)
    if isinstance(results, _FetchResults):
        return True
    if (
        not _FITS
        or fetcher is None
        or type(results) is not OrderedDict
        or results
        or getattr(fetcher, "_key_deserializer", None) is not None
        or getattr(fetcher, "_value_deserializer", None) is not None
    ):
        log.warning(
            "this aiokafka's fetcher is not the one headrace's fast record path was written "
            "for: records are read as aiokafka's ConsumerRecord (correct, slower)"
        )
        return False
    fetcher._records = _FetchResults()
    return True


class FetchingConsumer(AIOKafkaConsumer):  # type: ignore[misc]  # aiokafka is untyped
    """An ``AIOKafkaConsumer`` whose records are :class:`FetchedRecord` from its start on."""

    #: whether the fast record path is installed (False: aiokafka's ConsumerRecord)
    fast_records = False

    async def start(self) -> None:
        await super().start()
        self.fast_records = install(self)
