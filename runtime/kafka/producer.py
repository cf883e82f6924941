"""Batched production: headrace hands aiokafka whole record batches, not single records.

``AIOKafkaProducer.send`` costs a coroutine, a future and a dict lookup per record; building
``BatchBuilder`` batches per (topic, partition) and submitting them with ``send_batch`` moves that
cost to once per batch, which is most of the gap to a hand-written loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache, partial
from operator import itemgetter
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.producer.message_accumulator import BatchBuilder

from headrace.runtime.kafka import hopformat
from headrace.runtime.kafka.hopformat import BATCH_HEADER

Headers = list[tuple[str, bytes]]
#: A record to write: (topic, partition or None for the sink's partitioner, key bytes, value
#: bytes, headers, timestamp in ms or None). Tasks produce them; the sender writes them. The
#: timestamp is the record's event time (None: the broker's "now" through the producer); see
#: runtime/task/timers.py. A repartition record of hop format 2 has a *mark* (an int: its
#: channel and sequence number, ``kafka/hopformat.py``) where the header list goes.
OutRecord = tuple[str, int | None, bytes | None, bytes | None, Headers | int, int | None]


_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
_SEED = 0x9747B28C  # the Java client's Utils.murmur2 seed
_WORDS = [struct.Struct(f"<{n}I") for n in range(64)]


def murmur2_python(data: bytes) -> int:
    """Kafka's murmur2 (the Java client's ``Utils.murmur2``) in Python, bit-identical to
    aiokafka's: the fallback where the ``murmurhash2`` wheel is not installed (see
    :data:`murmur2`), and the reference its tests compare it with.

    aiokafka's pure-Python version reads one byte at a time; this one unpacks the 4-byte words
    with one ``struct`` call and masks only where the result can overflow 32 bits: ~3x faster.
    """
    length = len(data)
    h = _SEED ^ length
    n4 = length >> 2
    if n4:
        words = _WORDS[n4].unpack_from(data) if n4 < 64 else struct.unpack_from(f"<{n4}I", data)
        for k in words:
            k = (k * _M) & _MASK
            k ^= k >> 24
            k = (k * _M) & _MASK
            h = ((h * _M) & _MASK) ^ k
    extra = length & 3
    if extra:
        base = length & ~3
        if extra >= 3:
            h ^= data[base + 2] << 16
        if extra >= 2:
            h ^= data[base + 1] << 8
        h ^= data[base]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def _native_murmur2() -> Callable[[bytes], int] | None:
    try:
        from murmurhash2 import murmurhash2
    except ImportError:
        return None
    native: Callable[[bytes], int] = partial(murmurhash2, seed=_SEED)
    # the same function, or not used: a wheel that disagrees would send keys to other
    # partitions than every other Kafka client does
    if all(native(k) == murmur2_python(k) for k in (b"", b"a", b"ab", b"abc", b"abcd", b"k" * 9)):
        return native
    return None  # pragma: no cover


#: Kafka's murmur2 of ``bytes``: the ``murmurhash2`` wheel's (Rust, ~10x faster than
#: :func:`murmur2_python`; a dependency on the platforms it has wheels for), else the Python
#: one. Output partitioning of a high-cardinality sink (S6's 2M distinct keys, issue 18) hashes
#: nearly every record: the partition cache cannot help there.
murmur2: Callable[[bytes], int] = _native_murmur2() or murmur2_python


@lru_cache(maxsize=131_072)
def default_partition(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner (same as the Java client), cached: hot keys repeat."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def _raw_append(batch: Any) -> Any:
    """The record batch builder's own ``append(offset, timestamp, key, value, headers)`` of an
    empty aiokafka ``BatchBuilder`` without serializers, else None.

    ``BatchBuilder.append`` is two Python calls per record around that (C) call: checks that
    hold for the whole batch, the serializers (we have none) and ``_relative_offset += 1``.
    :class:`BatchSender` calls the builder directly with the offset it counts, and sets
    ``_relative_offset`` (what ``record_count()`` reports) and closes a full batch the way
    ``BatchBuilder.append`` does, before the batch is submitted.
    """
    if type(batch) is not BatchBuilder:
        return None
    try:
        if (
            batch._closed
            or batch._relative_offset
            or batch._key_serializer is not None
            or batch._value_serializer is not None
        ):
            return None
        return batch._builder.append
    except AttributeError:  # another aiokafka version's internals: use the public append
        return None


_PARTITION_CACHE_MAX = 131_072
_NO_HEADERS: list[tuple[str, bytes]] = []  # shared, never mutated (aiokafka only reads it)
#: records per hop batch tried first (the batch's ``hr.b`` header is written on its first
#: record, so the sender decides how many records a batch holds before it appends them)
_HOP_BATCH_RECORDS = 16_384


#: an output tuple's headers or mark (C speed: once per hop record)
_mark_of: Callable[[OutRecord], Headers | int] = itemgetter(4)


def _hop_numbers(marks: list[Any]) -> tuple[int | None, list[int] | None]:
    """The channel of a run of marks and their numbers (None: none is sequenced); channel
    None when the run holds no mark at all (only records with headers of their own).

    The common case (every record a mark of one channel) runs in two comprehensions; a run with
    header lists among the marks (a record that keeps format 1) takes the loop."""
    try:
        channels = {m & 0xFFFFFFFF for m in marks}
        numbers = [m >> 32 for m in marks]
    except TypeError:
        channels = {m & 0xFFFFFFFF for m in marks if type(m) is int}
        numbers = [m >> 32 if type(m) is int else 0 for m in marks]
    if not channels:
        return None, None
    if len(channels) != 1:
        # one send() is one task's outputs (one channel): anything else is a bug, not data
        raise ValueError(f"hop records of several channels in one batch: {sorted(channels)}")
    return channels.pop(), numbers if any(numbers) else None


def as_format1(rec: OutRecord) -> OutRecord:
    """``rec`` with hop format 1 headers instead of a mark (writers without batch control)."""
    m = rec[4]
    if type(m) is not int:
        return rec
    return (rec[0], rec[1], rec[2], rec[3], hopformat.format1_headers(m), rec[5])


class BatchSender:
    """Groups output tuples per (topic, partition) and submits them as batches.

    Per record this does one dict lookup for the partition (a per-topic cache of
    key -> partition, bounded; hot keys repeat), one list append into its group and one call of
    the record batch builder's own ``append`` (see :func:`_raw_append`).
    """

    def __init__(self, producer: AIOKafkaProducer, partition_counts: dict[str, int]) -> None:
        self.producer = producer
        self.partition_counts = partition_counts
        self._caches: dict[str, dict[bytes, int]] = {}
        #: records per hop batch that fitted last, per topic (see :meth:`_fill_hop`)
        self._hop_sizes: dict[str, int] = {}

    def _partition(self, topic: str, key: bytes | None) -> int:
        n = self.partition_counts[topic]
        if key is None:
            return random.randrange(n)
        return default_partition(key, n)

    def _group(self, records: Iterable[OutRecord]) -> dict[tuple[str, int], list[OutRecord]]:
        groups: dict[tuple[str, int], list[OutRecord]] = {}
        caches = self._caches
        counts = self.partition_counts
        last_topic: str | None = None
        cache: dict[bytes, int] = {}
        by_p: dict[int, list[OutRecord]] = {}
        for rec in records:
            topic, p = rec[0], rec[1]
            if topic is not last_topic:
                last_topic = topic
                found = caches.get(topic)
                if found is None:
                    found = caches[topic] = {}
                cache = found
                by_p = {}
            if p is None:
                key = rec[2]
                if key is None:
                    p = random.randrange(self.partition_counts[topic])
                else:
                    p = cache.get(key)
                    if p is None:
                        if len(cache) >= _PARTITION_CACHE_MAX:
                            cache.clear()
                        p = cache[key] = (murmur2(key) & 0x7FFFFFFF) % counts[topic]
            g = by_p.get(p)
            if g is None:
                tp = (topic, p)
                g = groups.get(tp)
                if g is None:
                    g = groups[tp] = []
                by_p[p] = g
            g.append(rec)
        return groups

    async def send(self, records: Iterable[OutRecord]) -> list[Delivery]:
        """Submit ``records``; returns one delivery per batch (in submission order).

        The records of one call are one task's outputs: their hop records share a channel."""
        futures: list[Delivery] = []
        for (topic, p), recs in self._group(records).items():
            if type(recs[0][4]) is int:
                await self._fill_hop(futures, topic, p, recs)
            else:
                await self._fill(futures, topic, p, recs, pairs=False)
        return futures

    async def _fill_hop(
        self, futures: list[Delivery], topic: str, partition: int, records: list[OutRecord]
    ) -> None:
        """Hop format 2 (``kafka/hopformat.py``): each batch's first record carries the batch's
        channel and numbers in ``hr.b``, the others no internal header.

        The header must be written before the records it describes, so the number of records
        of a batch is chosen first: as many as fitted last time (``_hop_sizes``, per topic),
        and when the batch fills up before, the unsubmitted batch is dropped and built again
        with the records that fitted (rare: the guess then shrinks to what fits)."""
        create = self.producer.create_batch
        sizes = self._hop_sizes
        total = len(records)
        i = 0
        while i < total:
            batch = create()
            append = _raw_append(batch)
            if append is None:  # another batch type: format 1, per-record headers
                rest = [as_format1(r) for r in records[i:]]
                await self._fill_public(
                    futures, topic, partition, rest, batch, pairs=False, headers=_NO_HEADERS
                )
                return
            want = min(total - i, sizes.get(topic, _HOP_BATCH_RECORDS))
            chunk = records[i : i + want]
            channel, numbers = _hop_numbers(list(map(_mark_of, chunk)))
            first = chunk[0]
            own = first[4]
            head = [] if channel is None else [(BATCH_HEADER, hopformat.encode(channel, numbers))]
            if not isinstance(own, int):
                head += own
            if append(0, first[5], first[2], first[3], head) is None:  # an empty batch takes one
                raise ValueError(f"a record for topic {topic!r} exceeds max_batch_size")
            n = 1
            for rec in chunk[1:] if want > 1 else ():
                m = rec[4]
                if append(n, rec[5], rec[2], rec[3], _NO_HEADERS if type(m) is int else m) is None:
                    break
                n += 1
            if n < want:  # full before the chunk's end: build it again with what fitted
                sizes[topic] = max(1, (n * 9) // 10)
                continue
            if want == sizes.get(topic, _HOP_BATCH_RECORDS) < _HOP_BATCH_RECORDS:
                sizes[topic] = min(_HOP_BATCH_RECORDS, want * 2)  # it fitted: try more
            await self._submit_raw(futures, batch, topic, partition, n, full=False)
            i += n

    async def send_pairs(
        self,
        topic: str,
        partition: int,
        pairs: Iterable[tuple[bytes | None, bytes | None]],
        headers: list[tuple[str, bytes]] | None = None,
    ) -> list[Delivery]:
        """Submit ``(key, value)`` pairs to one partition (changelog writes), every record
        with the same ``headers`` (one shared list, or none): no per-record tuple is built."""
        futures: list[Delivery] = []
        await self._fill(futures, topic, partition, pairs, pairs=True, headers=headers)
        return futures

    async def _fill(
        self,
        futures: list[Delivery],
        topic: str,
        partition: int,
        records: Iterable[Any],
        *,
        pairs: bool,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """Append ``records`` (output tuples, or ``(key, value)`` pairs sharing ``headers``) to
        batches for one partition, submitting each batch as it fills and the last at the end."""
        create = self.producer.create_batch
        batch = create()
        append = _raw_append(batch)
        shared = _NO_HEADERS if headers is None else headers
        if append is None:
            return await self._fill_public(
                futures, topic, partition, records, batch, pairs=pairs, headers=shared
            )
        n = 0
        if not pairs:
            for rec in records:
                try:
                    appended = append(n, rec[5], rec[2], rec[3], rec[4])
                except TypeError:  # a hop mark among header lists: that record in format 1
                    rec = as_format1(rec)
                    appended = append(n, rec[5], rec[2], rec[3], rec[4])
                if appended is None:
                    await self._submit_raw(futures, batch, topic, partition, n, full=True)
                    batch = create()
                    append = _raw_append(batch)
                    if append is None or append(0, rec[5], rec[2], rec[3], rec[4]) is None:
                        raise ValueError(f"a record for topic {topic!r} exceeds max_batch_size")
                    n = 0
                n += 1
        else:
            for key, value in records:
                if append(n, None, key, value, shared) is None:
                    await self._submit_raw(futures, batch, topic, partition, n, full=True)
                    batch = create()
                    append = _raw_append(batch)
                    if append is None or append(0, None, key, value, shared) is None:
                        raise ValueError(f"a record for topic {topic!r} exceeds max_batch_size")
                    n = 0
                n += 1
        if n:
            await self._submit_raw(futures, batch, topic, partition, n, full=False)

    async def _submit_raw(
        self,
        futures: list[Delivery],
        batch: Any,
        topic: str,
        partition: int,
        count: int,
        *,
        full: bool,
    ) -> None:
        if not count:
            raise ValueError(f"a record for topic {topic!r} exceeds max_batch_size")
        # What BatchBuilder.append keeps up to date per record, set once per batch.
        batch._relative_offset = count
        if full:
            batch.close()
        futures.append(await self._submit(batch, topic, partition, count))

    async def _fill_public(
        self,
        futures: list[Delivery],
        topic: str,
        partition: int,
        records: Iterable[Any],
        batch: Any,
        *,
        pairs: bool,
        headers: list[tuple[str, bytes]],
    ) -> None:
        """:meth:`_fill` through the public ``BatchBuilder.append`` (another batch type)."""
        producer = self.producer
        count = 0
        shared = headers
        for rec in records:
            if pairs:
                key, value, headers, ts = rec[0], rec[1], shared, None
            else:
                key, value, own, ts = as_format1(rec)[2:6]
                headers = own if isinstance(own, list) else shared
            if batch.append(key=key, value=value, timestamp=ts, headers=headers) is None:
                futures.append(await self._submit(batch, topic, partition, count))
                batch = producer.create_batch()
                count = 0
                if batch.append(key=key, value=value, timestamp=ts, headers=headers) is None:
                    raise ValueError(f"a record for topic {topic!r} exceeds max_batch_size")
            count += 1
        if count:
            futures.append(await self._submit(batch, topic, partition, count))

    async def _submit(self, batch: Any, topic: str, partition: int, count: int) -> Delivery:
        fut = await self.producer.send_batch(batch, topic, partition=partition)
        return fut, count


#: a batch's delivery future (resolves to its RecordMetadata: the base offset) and record count
Delivery = tuple["asyncio.Future[Any]", int]


async def last_offset(deliveries: list[Delivery]) -> int | None:
    """Offset of the last record of these batches (all to one partition), once delivered."""
    last: int | None = None
    with _abandoned_on_failure(deliveries):
        for fut, count in deliveries:
            meta = await fut
            last = meta.offset + count - 1
    return last


async def first_gap(deliveries: list[Delivery], expected: int) -> tuple[int, int] | None:
    """The first range ``(start, end)`` of offsets between ``expected`` and these batches (all
    to one partition, in submission order) that somebody else's records filled, if any.

    A partition has one legitimate writer (the task's owner), whose batches get consecutive
    offsets; a gap means another producer, a zombie, wrote in between.
    """
    with _abandoned_on_failure(deliveries):
        for fut, count in deliveries:
            meta = await fut
            if meta.offset > expected:
                return expected, meta.offset
            expected = meta.offset + count
    return None


async def wait_delivered(deliveries: list[Delivery]) -> None:
    """Raise the first delivery error, if any (at-least-once acknowledgement)."""
    with _abandoned_on_failure(deliveries):
        for fut, _ in deliveries:
            await fut


def abandon(deliveries: list[Delivery]) -> None:
    """Nobody will wait for these deliveries any more: consume their outcomes when they come.

    When one batch fails (an expired lease, a fenced producer), the batches after it usually
    fail with the same error; without this, asyncio prints "Future exception was never
    retrieved" and a traceback for every one of them, burying the one warning that matters.
    """
    for fut, _ in deliveries:
        fut.add_done_callback(_consume_outcome)


@contextlib.contextmanager
def _abandoned_on_failure(deliveries: list[Delivery]) -> Iterator[None]:
    try:
        yield
    except BaseException:
        abandon(deliveries)
        raise


def _consume_outcome(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
