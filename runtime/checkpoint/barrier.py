"""Barrier ids and the wire format of control records.

Barrier ids come from the clock: ``n = floor(now_ms / interval_ms)``. Every source task injects
barrier ``n`` when its clock crosses the boundary, so ids agree across workers without a
coordinator, and idle partitions still produce them (DESIGN.md section 5.1).

On a repartition topic every record carries the ``hr.ch`` header (the upstream partition that
wrote it: the *channel*), and a barrier is a record with an empty value and a second header
``hr.barrier``. Header order is fixed by the writer so the reader can index instead of search:
the per-record cost downstream is one ``int()`` of a short byte string.
"""

from __future__ import annotations

CHANNEL_HEADER = "hr.ch"
BARRIER_HEADER = "hr.barrier"


def barrier_id(now_seconds: float, interval_ms: int) -> int:
    """The checkpoint id whose interval contains ``now_seconds``."""
    return int(now_seconds * 1000) // interval_ms


def channel_headers(channel: int) -> list[tuple[str, bytes]]:
    """Headers of a data record (a list: aiokafka's C batch builder accepts nothing else)."""
    return [(CHANNEL_HEADER, b"%d" % channel)]


def barrier_headers(channel: int, checkpoint_id: int) -> list[tuple[str, bytes]]:
    return [(CHANNEL_HEADER, b"%d" % channel), (BARRIER_HEADER, b"%d" % checkpoint_id)]
