"""Barrier ids and the wire format of control records.

Barrier ids come from the clock: ``n = floor(now_ms / interval_ms)``. Every source task injects
barrier ``n`` when its clock crosses the boundary, so ids agree across workers without a
coordinator, and idle partitions still produce them (ARCHITECTURE.md section 5.1).

On a repartition topic every record has a *channel* (the upstream partition that wrote it): in
the ``hr.ch`` header (hop format 1), or in its batch's ``hr.b`` header (hop format 2, data
records: ``kafka/hopformat.py``). A barrier is a record with an empty value and the headers
``hr.ch`` and ``hr.barrier``, in either format. Readers recognise these headers by *name*,
never by position (issue 15 item 5): a foreign header (tracing, a producer interceptor, a tool
that copies records) may appear in any position and is ignored. The writer still puts ``hr.ch``
first and the barrier or sequence second, so the reader's fast path is a check of that exact
shape (two string compares) before one ``int()``; any other shape takes ``read_internal``,
which searches by name.
"""

from __future__ import annotations

from collections.abc import Sequence

from headrace.runtime.kafka.hopformat import (
    BATCH_HEADER,
    CHANNEL_HEADER,
    SEQUENCE_HEADER,
    BatchContext,
)

__all__ = [
    "BARRIER_HEADER",
    "BATCH_HEADER",
    "CHANNEL_HEADER",
    "IDLE",
    "QUIET_HEADER",
    "SEQUENCE_HEADER",
    "SEQ_INDEX_BITS",
    "SEQ_TOPIC_BITS",
    "TIME_HEADER",
    "WATERMARK_HEADER",
    "BatchContext",
    "barrier_headers",
    "barrier_id",
    "channel_headers",
    "dedupe_slot",
    "read_header",
    "read_internal",
    "sequence",
]

BARRIER_HEADER = "hr.barrier"
#: event-time jobs: a data record's event time (ms), and a barrier's watermark ("idle": the
#: writing task has no input that holds the watermark; runtime/task/timers.py)
TIME_HEADER = "hr.ts"
WATERMARK_HEADER = "hr.wm"
IDLE = b"idle"
#: on a barrier: nothing of the writing task follows it in this partition until a data record
#: of its does (checkpoint/alignment.py, "Quiet channels")
QUIET_HEADER = "hr.quiet"

# At-least-once dedupe across a repartition hop.
#
# Under at-least-once a source task that crashes replays its input from its last committed
# offsets and writes the same repartition records again. Kafka transactions are what prevent
# that under exactly-once; under at-least-once the downstream task drops the replays itself:
# every repartition record of a *source* stage carries a sequence number derived from where it
# came from — (input offset, index of the output for that input, input topic) — which is the
# same on replay because the source stage processes each input partition in offset order. The
# downstream task keeps, per (channel, input topic), the highest sequence it has *processed*
# (not merely received: held records are not in the checkpoint), stores it in the checkpoint
# metadata, and skips records at or below it. State is then exact across the hop even under
# at-least-once; only the sink output may repeat. Later hops (a stage fed by a repartition
# topic, whose processing order is not offset order because of alignment) carry no sequence.
#
# Why every record has its own number, not an implicit one: the cheaper designs number records
# *implicitly* (a number on the first record after an upstream restart, or on the first output
# of each input record, and the reader counts the others). Counting assumes that a channel's
# records reach a partition as one unbroken stream per owner, and at-least-once has no fencing:
# a paused worker's queued produce request can land after the new owner's records
# (ARCHITECTURE.md 7.1), and every count after it would be off, dropping new records as
# replays. A number derived from the input position describes itself: a zombie's late record
# is a replay (dropped) or a record the new owner writes again (that copy is then dropped).
# Dense counters instead of offsets would need a rule for a restart from a cut that has none
# (an older version's, exactly-once's, an offset reset), and every rule found could number new
# records below old ones; they would also shift every later number when an operator's outputs
# differ on replay.
#
# Where the number travels: in hop format 1 a header per record (``hr.seq``, with ``hr.ch``);
# in hop format 2 (the default since issue 18's thirteenth round) all numbers of a Kafka record
# batch in one header on its first record (``kafka/hopformat.py``: the same numbers, the same
# dedupe, the batch's atomicity instead of a header per record; ~2.5 µs less per word).
SEQ_INDEX_BITS = 20  #: up to ~1M outputs per input record
SEQ_TOPIC_BITS = 4  #: up to 16 co-partitioned source topics


def barrier_id(now_seconds: float, interval_ms: int) -> int:
    """The checkpoint id whose interval contains ``now_seconds``."""
    return int(now_seconds * 1000) // interval_ms


def channel_headers(channel: int) -> list[tuple[str, bytes]]:
    """Headers of a data record (a list: aiokafka's C batch builder accepts nothing else)."""
    return [(CHANNEL_HEADER, b"%d" % channel)]


def sequence(offset: int, index: int, topic_index: int) -> int:
    return (((offset << SEQ_INDEX_BITS) | index) << SEQ_TOPIC_BITS) | topic_index


def dedupe_slot(channel: int, seq: int) -> int:
    """The (channel, input topic) pair a sequence number is ordered within."""
    return (channel << SEQ_TOPIC_BITS) | (seq & ((1 << SEQ_TOPIC_BITS) - 1))


def read_internal(
    headers: Sequence[tuple[str, bytes]], topic: str, partition: int, offset: int
) -> tuple[int, bytes | None, int | None]:
    """``(channel, barrier, sequence number)`` of an internal record, found by header name, or
    from its batch (hop format 2: ``headers`` is the batch's ``BatchContext``).

    Headers with other names are ignored wherever they are. A record without ``hr.ch`` was not
    written by headrace: it is refused loudly (it cannot be assigned to a channel, so it cannot
    be aligned or deduplicated), naming where it is."""
    if type(headers) is BatchContext:
        return headers.channel, None, headers.sequence(offset)
    channel: bytes | None = None
    barrier: bytes | None = None
    seq: bytes | None = None
    for name, value in headers:
        if name == CHANNEL_HEADER:
            channel = value
        elif name == BARRIER_HEADER:
            barrier = value
        elif name == SEQUENCE_HEADER:
            seq = value
    if channel is None:
        raise ValueError(
            f"record at {topic}/{partition}@{offset} on an internal topic has no "
            f"{CHANNEL_HEADER!r} header (headers: {[n for n, _ in headers]}): it was not "
            "written by headrace (internal topics must only be written by the job's own "
            f"stages), or its batch's {BATCH_HEADER!r} header was not read (hop format 2 "
            "needs headrace's batch reader, kafka/fetch.py)"
        )
    return int(channel), barrier, None if seq is None else int(seq)


def barrier_headers(
    channel: int, checkpoint_id: int, watermark: bytes | None = None, quiet: bool = False
) -> list[tuple[str, bytes]]:
    """A barrier's headers; ``watermark`` (event-time jobs): ``b"<ms>"`` or :data:`IDLE`;
    ``quiet``: the writer sends nothing more to this partition until it sends data."""
    headers = [(CHANNEL_HEADER, b"%d" % channel), (BARRIER_HEADER, b"%d" % checkpoint_id)]
    if watermark is not None:
        headers.append((WATERMARK_HEADER, watermark))
    if quiet:
        headers.append((QUIET_HEADER, b"1"))
    return headers


def read_header(headers: Sequence[tuple[str, bytes]], name: str) -> bytes | None:
    """The value of header ``name`` (the last one, if several), else None."""
    found = None
    for n, value in headers:
        if n == name:
            found = value
    return found
