"""Barrier ids and the wire format of control records.

Barrier ids come from the clock: ``n = floor(now_ms / interval_ms)``. Every source task injects
barrier ``n`` when its clock crosses the boundary, so ids agree across workers without a
coordinator, and idle partitions still produce them (ARCHITECTURE.md section 5.1).

On a repartition topic every record carries the ``hr.ch`` header (the upstream partition that
wrote it: the *channel*), and a barrier is a record with an empty value and a second header
``hr.barrier``. Header order is fixed by the writer so the reader can index instead of search:
the per-record cost downstream is one ``int()`` of a short byte string.
"""

from __future__ import annotations

CHANNEL_HEADER = "hr.ch"
BARRIER_HEADER = "hr.barrier"
SEQUENCE_HEADER = "hr.seq"

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


def barrier_headers(channel: int, checkpoint_id: int) -> list[tuple[str, bytes]]:
    return [(CHANNEL_HEADER, b"%d" % channel), (BARRIER_HEADER, b"%d" % checkpoint_id)]
