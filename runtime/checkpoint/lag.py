"""How far a consumer group is behind, in data records: what lies past a committed checkpoint.

Kafka's usual lag, end offset minus committed offset, overstates what a headrace task still
has to do, and rarely reaches 0 on a repartition topic: checkpoint barriers follow the last data
record (a caught-up downstream commits at its next checkpoint, and that round's barriers come
after it, until a quiet round ends them), under exactly-once every transaction ends in a
commit marker that takes an offset but is never delivered, and an aligned checkpoint commits
the smallest cut of its channels, so records of the other channels past it are already
processed (ARCHITECTURE.md section 5.4).
:func:`data_lag` counts what the task will really process; ``headrace status`` shows it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka.structs import TopicPartition

from headrace.runtime.checkpoint.barrier import (
    BARRIER_HEADER,
    CHANNEL_HEADER,
    SEQUENCE_HEADER,
    BatchContext,
    dedupe_slot,
)
from headrace.runtime.checkpoint.metadata import CheckpointMetadata
from headrace.runtime.config import Settings
from headrace.runtime.kafka import clients


async def log_bounds(
    settings: Settings, tps: list[TopicPartition]
) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    """(first stored offset, end offset) per partition; the end is the last stable offset
    when the settings read committed data only."""
    consumer = clients.reader(settings, client_id="headrace-status")
    await consumer.start()
    try:
        beginnings: dict[TopicPartition, int] = await consumer.beginning_offsets(tps)
        ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
        return beginnings, ends
    finally:
        await consumer.stop()


@dataclass(frozen=True, slots=True)
class Tail:
    """What lies between a group's committed offset and the end of one input partition."""

    committed: int | None
    end: int
    #: the first offset still stored (retention deleted what lies below)
    beginning: int = 0
    #: the committed checkpoint's metadata: skip list and seen marks (None: none, or not
    #: written by headrace)
    checkpoint: CheckpointMetadata | None = None

    @property
    def start(self) -> int:
        """Where the task resumes: the committed offset, or the beginning without one (a new
        task seeks to the beginning), never below what is still stored."""
        return max(self.committed or 0, self.beginning)


#: a tail longer than this is not read: its lag is shown as the offset difference, marked "~".
#: A caught-up task's tail is a few barrier records per upstream partition (one round per
#: checkpoint interval), far below it; a longer tail is a real backlog.
EXACT_LAG_LIMIT = 2_000


def pending_data(headers: Sequence[tuple[str, bytes]], offset: int, tail: Tail) -> bool:
    """Will the task process this record of its tail as a data record?

    Not a checkpoint barrier (``hr.barrier``); on a repartition topic not a record of a channel
    whose cut lies past it (the committed checkpoint's skip list: the task processed it before
    the checkpoint and skips it on restore), and under at-least-once not a replay at or below
    the checkpoint's ``seen`` mark for its (channel, input topic), which the task drops. The
    same tests the task applies (task/cut.py), so a caught-up job shows lag 0."""
    channel: int | None = None
    seq: int | None = None
    if type(headers) is BatchContext:  # hop format 2: channel and number from the batch
        channel, seq = headers.channel, headers.sequence(offset)
    for name, value in headers:
        if name == BARRIER_HEADER:
            return False
        if name in (CHANNEL_HEADER, SEQUENCE_HEADER) and not value.isdigit():
            return True  # not written by headrace (a source topic's own header): data
        if name == CHANNEL_HEADER:
            channel = int(value)
        elif name == SEQUENCE_HEADER:
            seq = int(value)
    meta = tail.checkpoint
    if meta is None or channel is None:
        return True
    if offset < meta.skip.get(channel, -1):
        return False
    return seq is None or seq > meta.seen.get(dedupe_slot(channel, seq), -1)


async def data_lag(
    settings: Settings, tails: dict[TopicPartition, Tail]
) -> dict[TopicPartition, tuple[int, bool]]:
    """Data records the group has still to process per partition, and whether the count is
    exact: the tail past the committed offset is read and only records :func:`pending_data`
    accepts count (transaction markers and aborted records never reach a consumer).

    Why read the tail, rather than have the workers publish how far they got: the committed
    offset is what the job resumes from, so the answer is right whether workers run, died or
    are being rebalanced, and needs nothing from them; a worker's published position would be
    up to a status interval old, and gone with the worker. It is cheap: a caught-up tail is a
    few barrier records per upstream partition, read in one fetch per partition, and only when
    someone runs ``headrace status``. A tail longer than :data:`EXACT_LAG_LIMIT` is not read
    (it is a real backlog): its offset difference is reported, marked approximate.
    """
    out: dict[TopicPartition, tuple[int, bool]] = {}
    reads: dict[TopicPartition, Tail] = {}
    for tp, tail in tails.items():
        gap = tail.end - tail.start
        if gap <= 0:
            out[tp] = (0, True)
        elif gap > EXACT_LAG_LIMIT:
            out[tp] = (gap, False)
        else:
            reads[tp] = tail
    if not reads:
        return out
    consumer = clients.reader(settings, client_id="headrace-status")
    await consumer.start()
    try:
        consumer.assign(list(reads))
        for tp, tail in reads.items():
            consumer.seek(tp, tail.start)
            out[tp] = (0, True)
        pending = set(reads)
        deadline = time.monotonic() + 30
        while pending and time.monotonic() < deadline:
            batches = await consumer.getmany(*pending, timeout_ms=500)
            for tp, records in batches.items():
                tail = reads[tp]
                data = sum(
                    1
                    for r in records
                    if r.offset < tail.end and pending_data(r.headers, r.offset, tail)
                )
                out[tp] = (out[tp][0] + data, True)
            for tp in list(pending):
                if await consumer.position(tp) >= reads[tp].end:
                    pending.discard(tp)
        for tp in pending:  # not read in time: fall back to the offset difference
            tail = reads[tp]
            out[tp] = (tail.end - tail.start, False)
        return out
    finally:
        await consumer.stop()
