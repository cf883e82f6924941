"""The repartition hop's batch format: a record's channel and sequence number once per batch.

Why
---
A repartition record needs two facts besides its key and value: its *channel* (the upstream
partition that wrote it: alignment) and, under at-least-once from a source stage, its
*sequence number* (where it came from: the downstream dedupe; checkpoint/barrier.py). The first
format (hop format 1) put both in headers of every record: ``hr.ch`` and ``hr.seq``. In Python
on aiokafka that was the most expensive part of a two-stage job: per record a header list built,
a decimal number formatted and parsed, one or two headers encoded and decoded by the record
batch builder and reader. Format 2 saves ~2.5 µs per word across the hop under at-least-once
and ~1.3 µs under exactly-once (``bench/hop_micro.py``); end to end, S5's at-least-once went
from 0.62x to 0.87x the hand-written floor's rate (bench/README.md, issue 18, thirteenth round).

Hop format 2 writes them once per Kafka record batch, in one header ``hr.b`` on the batch's
*first* record: the channel (4 bytes) and, for a sequenced batch, one 8-byte number per record
of the batch (the record's sequence number + 1; 0 for a record without one). The other records
of the batch carry no internal header.

Why this is as safe as a number on every record
-----------------------------------------------
* **A batch is atomic and contiguous.** The broker appends a record batch whole, at
  consecutive offsets, and a consumer fetching from any offset inside it receives the whole
  batch (the fetch returns batches from their first record). So headrace's batch reader
  (``kafka/fetch.py``) always sees the first record and resolves every record of the batch
  against it, including after a seek into the middle of a batch (a restore to a cut that lies
  there). Nothing has to be counted across batches. Nor are batches merged on the way: a
  producer sends at most one batch per partition in a request (aiokafka's accumulator drains
  one per partition, as Java's does), and a broker that recompresses (a topic
  ``compression.type`` other than the producer's) rebuilds a request's batch for a partition
  as one batch, headers included.
* **The numbers are still the self-describing ones** (input offset, output index, input
  topic): a paused worker's late batch is numbered by where its records came from, exactly as
  with per-record headers, so the dedupe drops its replays and nothing new (ARCHITECTURE.md
  7.1). Implicit counting, which a zombie's late request would throw off, is not used.
* **Old readers refuse loudly.** A record without ``hr.ch`` is refused by every headrace
  version since issue 15 (``read_internal``: "not written by headrace"); a worker of an older
  version never mistakes a format-2 record for one without a sequence. A rolling upgrade from
  a version that reads only format 1 is done with ``hop_format=1`` first (``--hop-format 1``,
  ``HEADRACE_HOP_FORMAT=1``), then without it: this version and later ones read both
  formats, and records of both may be mixed in one partition.

Where the batch is made and read: ``kafka/producer.py`` (``BatchSender``: a task's output tuple
carries a *mark*, one int with the channel and number, instead of a header list; the sender
builds each batch with its ``hr.b`` header) and ``kafka/fetch.py`` (every record of a format-2
batch gets the batch's :class:`BatchContext` as its ``headers``: one shared, empty list that
the hop reader, ``task/cut.py``, recognises by identity). Records that carry their own headers
(barriers; event-time jobs' records, which keep format 1 for their ``hr.ts``) keep them, in a
format-2 batch too.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence

#: hop format 1, per record: the channel, and the sequence number (checkpoint/barrier.py)
CHANNEL_HEADER = "hr.ch"
SEQUENCE_HEADER = "hr.seq"
#: hop format 2, per batch: on the first record of a batch of a repartition topic
BATCH_HEADER = "hr.b"
_CHANNEL_BYTES = 4
_CHANNEL_BITS = 32
_CHANNEL_MASK = (1 << _CHANNEL_BITS) - 1
#: sequence numbers are stored as unsigned 64-bit values (+ 1)
MAX_SEQUENCE = (1 << 64) - 2
_LITTLE = sys.byteorder == "little"


def mark(channel: int, seq: int | None) -> int:
    """A hop record's *mark*: what a task puts where an output tuple's header list goes.

    One int, ``((seq + 1) << 32) | channel`` (``seq`` None: no number), so the per-record cost
    of a sequenced output is two integer operations; the sender turns the marks of a batch
    into its ``hr.b`` header."""
    if seq is None:
        return channel
    return ((seq + 1) << _CHANNEL_BITS) | channel


def mark_channel(m: int) -> int:
    return m & _CHANNEL_MASK


def mark_sequence(m: int) -> int | None:
    n = m >> _CHANNEL_BITS
    return n - 1 if n else None


def format1_headers(m: int) -> list[tuple[str, bytes]]:
    """The format-1 headers of a mark (the in-memory test broker, a batch type the sender
    cannot control)."""
    seq = mark_sequence(m)
    headers = [(CHANNEL_HEADER, b"%d" % mark_channel(m))]
    if seq is not None:
        headers.append((SEQUENCE_HEADER, b"%d" % seq))
    return headers


def encode(channel: int, numbers: Sequence[int] | None) -> bytes:
    """The ``hr.b`` value: the channel, then (sequenced batches) one number + 1 per record
    (0: that record has none), little-endian."""
    head = channel.to_bytes(_CHANNEL_BYTES, "little")
    if numbers is None:
        return head
    packed = array("Q", numbers)
    if not _LITTLE:  # pragma: no cover - big-endian hosts
        packed.byteswap()
    return head + packed.tobytes()


class BatchContext(list[tuple[str, bytes]]):
    """The ``headers`` of every record of one format-2 batch: an *empty* list (operators and
    tools that list headers see none: hop headers are internal) that also knows the batch's
    channel, the offset of its first record and its numbers.

    One object per batch, shared by its records: the hop reader tells "same batch as the
    previous record" by identity, and reads a record's number as ``numbers[offset - base]``.
    """

    __slots__ = ("base", "channel", "numbers")

    def __init__(self, channel: int, base: int, numbers: array[int] | None) -> None:
        super().__init__()
        self.channel = channel
        self.base = base
        self.numbers = numbers

    def sequence(self, offset: int) -> int | None:
        """The sequence number of the record at ``offset``, or None (none written)."""
        if self.numbers is None:
            return None
        i = offset - self.base
        if not 0 <= i < len(self.numbers):
            raise ValueError(
                f"record at offset {offset} lies outside its hop batch "
                f"(first offset {self.base}, {len(self.numbers)} numbers)"
            )
        n = self.numbers[i]
        return n - 1 if n else None

    def __repr__(self) -> str:
        count = "-" if self.numbers is None else len(self.numbers)
        return f"BatchContext(channel={self.channel}, base={self.base}, numbers={count})"


def decode(value: bytes, base: int) -> BatchContext:
    """The context of a batch whose first record (at offset ``base``) carries ``value`` in
    ``hr.b``; a malformed value is refused (it was not written by headrace)."""
    extra = len(value) - _CHANNEL_BYTES
    if extra < 0 or extra % 8:
        raise ValueError(
            f"malformed {BATCH_HEADER!r} header ({len(value)} bytes) on the record at offset "
            f"{base}: it was not written by headrace"
        )
    channel = int.from_bytes(value[:_CHANNEL_BYTES], "little")
    if not extra:
        return BatchContext(channel, base, None)
    numbers = array("Q")
    numbers.frombytes(value[_CHANNEL_BYTES:])
    if not _LITTLE:  # pragma: no cover - big-endian hosts
        numbers.byteswap()
    return BatchContext(channel, base, numbers)
