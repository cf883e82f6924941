"""The input cut of a task: where in its input a checkpoint falls. Two strategies.

* :class:`ClockCut` for a **source** stage: barrier ids come from the clock
  (:func:`~headrace.runtime.checkpoint.barrier.barrier_id`); the task cuts between two batches
  when the clock crosses an interval boundary, so no coordinator is needed and idle
  partitions checkpoint too. The cut is the position after the last record processed.
* :class:`AlignedCut` for a stage fed by a **repartition** topic: barriers arrive in-band from
  every upstream task (channel) and are aligned by a
  :class:`~headrace.runtime.checkpoint.alignment.BarrierAligner`: records of a channel whose
  barrier ``n`` has arrived are held until every channel's has (or the alignment times out and
  the checkpoint is taken unaligned). Under at-least-once, records replayed by an upstream
  that restarted are dropped by sequence number (``seen``).

Both answer the same questions for :class:`~headrace.runtime.task.stage_task.StageTask`: how to
feed a batch, what the clock asks for between batches, and what the cut is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from headrace.runtime.checkpoint.alignment import BarrierAligner
from headrace.runtime.checkpoint.barrier import (
    BARRIER_HEADER,
    CHANNEL_HEADER,
    QUIET_HEADER,
    SEQ_TOPIC_BITS,
    SEQUENCE_HEADER,
    TIME_HEADER,
    WATERMARK_HEADER,
    BatchContext,
    barrier_id,
    dedupe_slot,
    read_header,
    read_internal,
)
from headrace.runtime.task.records import RawRecord

if TYPE_CHECKING:
    from headrace.operators.job import Stage
    from headrace.runtime.checkpoint.pending import PendingCheckpoint
    from headrace.runtime.task.chain import Feed
    from headrace.runtime.task.records import TaskCounters
    from headrace.runtime.task.timers import TaskTime

log = logging.getLogger("headrace.runtime.task")


class CutOwner(Protocol):
    """What a cut strategy reads and calls of its task (a StageTask); a protocol, so that the
    strategies do not import the task that imports them."""

    stage: Stage
    partition: int
    clock: Callable[[], float]
    checkpoint_interval_ms: int
    last_checkpoint: int
    counters: TaskCounters
    seen: dict[int, int]
    run: Feed
    time: TaskTime | None

    def prepare(self, *, force: bool, final: bool, checkpoint_id: int | None = None) -> None: ...


@dataclass(slots=True)
class Cut:
    """Where a checkpoint falls: its id, the input offsets, the per-channel skip list and the
    quiet channels (checkpoint/alignment.py)."""

    checkpoint_id: int
    offsets: dict[tuple[str, int], int]
    skip: dict[int, int]
    aligned: bool
    alignment_seconds: float
    quiet: dict[int, int | None] = field(default_factory=dict)


class ClockCut:
    """A source stage: clock barriers between batches."""

    def __init__(self, task: CutOwner) -> None:
        self.task = task
        self.positions: dict[tuple[str, int], int] = {}

    def open(
        self,
        positions: dict[tuple[str, int], int],
        skip: dict[int, int] | None,
        quiet: dict[int, int | None] | None = None,
    ) -> None:
        self.positions = dict(positions)

    rewind = open

    def position(self, topic: str) -> int:
        return self.positions.get((topic, self.task.partition), 0)

    def feed(self, records: Sequence[RawRecord], start: int) -> int:
        n = len(records)
        if n > start:
            task = self.task
            task.run(records, start, n)
            last = records[-1]
            self.positions[(last.topic, last.partition)] = last.offset + 1
            task.counters.records_in += n - start
            if task.time is not None:
                task.time.batch_seen(last.topic)
        return n

    def tick(self, now: float) -> None:
        task = self.task
        if task.time is not None:
            task.time.tick_source(now)
            task.time.fire_processing(now)
            if task.time.overdue:
                task.time.fire_overdue()
        n = barrier_id(now, task.checkpoint_interval_ms)
        if n > task.last_checkpoint:
            task.prepare(force=False, final=False, checkpoint_id=n)

    def final_id(self) -> int:
        task = self.task
        return max(task.last_checkpoint, barrier_id(task.clock(), task.checkpoint_interval_ms))

    def take(self, force: bool, checkpoint_id: int | None) -> Cut:
        assert checkpoint_id is not None
        return Cut(checkpoint_id, dict(self.positions), {}, True, 0.0)

    def committed(self, pending: PendingCheckpoint) -> None:
        """Nothing is held back at a source."""


class AlignedCut:
    """A stage fed by a repartition topic: in-band barriers aligned across upstream tasks."""

    def __init__(self, task: CutOwner, upstream_partitions: int, timeout: float) -> None:
        self.task = task
        self.upstream_partitions = upstream_partitions
        self.timeout = timeout
        self.topic = task.stage.source.topics[0]
        self.aligner = self._aligner(0, None, None)

    def _aligner(
        self, position: int, skip: dict[int, int] | None, quiet: dict[int, int | None] | None
    ) -> BarrierAligner:
        time = self.task.time
        return BarrierAligner(
            self.upstream_partitions,
            last_checkpoint=self.task.last_checkpoint,
            position=position,
            skip=skip,
            timeout=self.timeout,
            clock=self.task.clock,
            quiet=quiet,
            event_time=time is not None,
            **({"watermark": time.watermark} if time is not None else {}),
        )

    def open(
        self,
        positions: dict[tuple[str, int], int],
        skip: dict[int, int] | None,
        quiet: dict[int, int | None] | None = None,
    ) -> None:
        position = positions.get((self.topic, self.task.partition), 0)
        self.aligner = self._aligner(position, skip, quiet)
        if quiet and self.task.time is not None:
            self._follow_watermark()  # quiet channels keep the watermark they went quiet with

    rewind = open

    def position(self, topic: str) -> int:
        return self.aligner.position

    def feed(self, records: Sequence[RawRecord], start: int) -> int:
        """Feed records up to the next complete barrier; returns where it stopped.

        The records that pass alignment and the dedupe go through the chain in *batches*: one
        call of the compiled loop per run of records between two barriers, not one per record.
        Processing them in order in one call is the same as one by one (the chain keeps no
        state between records that a call boundary would reset), and a barrier flushes the
        batch before it is passed on, so every checkpoint contains exactly the records before
        it, as before.
        """
        aligner = self.aligner
        task = self.task
        time = task.time
        seen = task.seen
        seen_get = seen.get
        topic_mask = (1 << SEQ_TOPIC_BITS) - 1
        counted = deduplicated = 0
        n = len(records)
        i = start
        batch: list[RawRecord] = []
        # hop format 2 (kafka/hopformat.py): the records of one batch share one BatchContext
        context: object = None
        context_channel = 0
        context_numbers: Sequence[int] | None = None
        context_base = 0
        while i < n:
            r = records[i]
            i += 1
            headers = r.headers
            barrier = None
            seq: int | None = None
            nh = 0
            if headers is context or type(headers) is BatchContext:
                if headers is not context:
                    context = headers
                    context_channel = headers.channel  # type: ignore[attr-defined]
                    context_numbers = headers.numbers  # type: ignore[attr-defined]
                    context_base = headers.base  # type: ignore[attr-defined]
                channel = context_channel
                if context_numbers is not None:
                    number = context_numbers[r.offset - context_base]
                    if number:
                        seq = number - 1
            else:
                # Format 1, headers by name (barrier.py): the writer's own shape is checked
                # first (fast); anything else (a foreign header anywhere) by name.
                nh = len(headers)
                h0 = headers[0] if nh else None
                if nh == 1 and h0[0] == CHANNEL_HEADER:  # type: ignore[index]
                    channel = int(h0[1])  # type: ignore[index]
                elif nh == 2 and h0[0] == CHANNEL_HEADER:  # type: ignore[index]
                    channel = int(h0[1])  # type: ignore[index]
                    name, value = headers[1]
                    if name == BARRIER_HEADER:
                        barrier = value
                    elif name == SEQUENCE_HEADER:
                        seq = int(value)
                else:
                    channel, barrier, seq = read_internal(headers, r.topic, r.partition, r.offset)
            if not aligner.admit(channel, r.offset):
                continue
            if channel >= aligner.channels:  # the upstream stage gained partitions
                aligner.add_channels(channel + 1)
            if time is not None and barrier is None:
                # event time: a data record's comes in hr.ts, a barrier's watermark in hr.wm
                ts = read_header(headers, TIME_HEADER)
                if ts is not None:
                    r.timestamp = int(ts)  # type: ignore[misc]
            if barrier is not None:
                if batch:
                    task.run(batch, 0, len(batch))
                    batch = []
                # the writer's fast shape (two headers) is a barrier that is not quiet
                quiet = nh > 2 and read_header(headers, QUIET_HEADER) is not None
                if time is None:
                    aligner.on_barrier(channel, r.offset, int(barrier), None, quiet)
                else:
                    wm = read_header(headers, WATERMARK_HEADER)
                    aligner.on_barrier(channel, r.offset, int(barrier), wm, quiet)
                    self._follow_watermark()
                if aligner.ready:
                    task.counters.records_in += counted
                    task.counters.deduplicated += deduplicated
                    counted = deduplicated = 0
                    task.prepare(force=False, final=False)
                    break
            elif aligner.on_record(channel, r.offset, r):
                # self._fresh, inlined (once per record of the hop)
                counted += 1
                if seq is not None:
                    slot = (channel << SEQ_TOPIC_BITS) | (seq & topic_mask)  # dedupe_slot
                    if seq <= seen_get(slot, -1):
                        deduplicated += 1
                        continue
                    seen[slot] = seq
                batch.append(r)
        task.counters.records_in += counted
        task.counters.deduplicated += deduplicated
        if batch:
            task.run(batch, 0, len(batch))
        if time is not None and time.overdue:
            time.fire_overdue()
        return i

    def _fresh(self, r: RawRecord, channel: int, seq: int | None) -> bool:
        """Count a repartition record; False if an upstream replay already delivered it.
        (:meth:`feed` does the same inline.)"""
        task = self.task
        task.counters.records_in += 1
        if seq is not None:
            slot = dedupe_slot(channel, seq)
            if seq <= task.seen.get(slot, -1):
                task.counters.deduplicated += 1
                return False
            task.seen[slot] = seq
        return True

    def _follow_watermark(self) -> None:
        """The task's watermark is the minimum over its channels (event-time jobs)."""
        time = self.task.time
        assert time is not None
        low = self.aligner.watermark()
        time.idle = low is None
        if low is not None:
            time.advance(low)

    def tick(self, now: float) -> None:
        if self.task.time is not None:
            self.task.time.fire_processing(now)
            if self.task.time.overdue:
                self.task.time.fire_overdue()
        if self.aligner.timed_out():
            task = self.task
            log.warning(
                "task %s/%d: alignment timed out after %.1fs; checkpointing unaligned",
                task.stage.name,
                task.partition,
                self.aligner.alignment_seconds(),
            )
            task.prepare(force=True, final=False)

    def final_id(self) -> None:
        return None  # the aligner's cut decides

    def take(self, force: bool, checkpoint_id: int | None) -> Cut:
        seconds = self.aligner.alignment_seconds()
        cut = self.aligner.cut(force=force)
        offsets = {(self.topic, self.task.partition): cut.offset}
        return Cut(cut.checkpoint_id, offsets, cut.skip, cut.aligned, seconds, cut.quiet)

    def committed(self, pending: PendingCheckpoint) -> None:
        """Release the records held for this checkpoint, and cut again if the next barrier
        is already complete. After a final checkpoint the task stops (or is suspended and
        later rewound to this cut): held records stay unprocessed so the state is exactly the
        committed one."""
        if pending.final:
            return
        released = self.aligner.complete(pending.checkpoint_id)
        batch = []
        for r in released:
            channel, _, seq = read_internal(r.headers, r.topic, r.partition, r.offset)
            if self._fresh(r, channel, seq):
                batch.append(r)
        if batch:
            self.task.run(batch, 0, len(batch))
        if self.task.time is not None:
            self._follow_watermark()  # held barriers passed
        if self.aligner.ready:
            self.task.prepare(force=False, final=False)
