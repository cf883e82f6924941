"""Barrier alignment for a task that reads a repartition partition.

This module is where the checkpoint *cut* of a downstream task is decided. It does no I/O.

The problem
-----------
A repartition partition ``q`` interleaves records from every upstream task (a *channel*: the
upstream partition that wrote the record, carried in the ``hr.ch`` header). Each upstream task
writes barrier ``n`` into the repartition partitions it wrote to when it checkpoints ``n`` (the
others hear nothing: see "Quiet channels" below). Checkpoint ``n``
of the downstream task must contain, from every channel, exactly the records that channel wrote
before its barrier ``n`` — the records its upstream checkpoint ``n`` already accounted for.

Alignment (Flink's rule, ARCHITECTURE.md section 5.4): after barrier ``n`` arrives on channel ``c``,
later records of ``c`` are *held* until barrier ``n`` has arrived on every channel; then the task
checkpoints and releases them. A channel whose next barrier is ``m > n`` (its task restarted, or
skipped ids while catching up) counts as having passed ``n``; the checkpoint id is then the
smallest id any channel passed. An alignment timeout lets the task checkpoint *unaligned*
(every channel not yet passed contributes everything read so far) rather than stall for ever.

Why a single committed offset is not enough
--------------------------------------------
Kafka stores one committed offset per partition, but the cut above is not a prefix of the
partition: held records of an early channel sit *before* included records of a late channel.
Committing the offset after the last barrier would lose the held records; committing the
offset of the first held record would count the late channel's records twice on replay.

So a checkpoint records, per channel ``c``, ``X_c``: the first offset of ``c`` that is *not* in
the checkpoint (the offset after ``c``'s barrier when ``c`` passed, else the read position).
The committed offset is ``O = min(X_c)``: everything before ``O`` is included. On restore the
task seeks to ``O`` and skips records of channel ``c`` below ``X_c`` (they are already in the
state). Only channels with ``X_c > O`` need to be stored, in the offset-commit metadata. This
gives exactly-once state across the hop without any coordinator and without a second topic.

Quiet channels: barrier traffic that follows the data, not the square of the partitions
---------------------------------------------------------------------------------------
If every upstream task wrote barrier ``n`` to every downstream partition, each interval would
cost ``P x Q`` barrier records (and, under exactly-once, as many transaction markers) whether
or not any data flowed: 65k records a second at 256 partitions, for an idle job (issue 18).
So an upstream task writes barrier ``n`` to partition ``q`` only if it wrote data to ``q``
since its last barrier there, and once more after that, *quiet*: a quiet barrier (header
``hr.quiet``) says "nothing of mine follows this in ``q`` until a data record of mine does"
(:mod:`headrace.runtime.task.stage_task` decides what to send; a new ownership, a changed
watermark and a savepoint's drain send to every partition).

Here a quiet channel counts as having passed every checkpoint: the task does not wait for a
barrier that will not come. It stops being quiet at its next data record (read in partition
order, so that record's own barrier will follow it) or at a barrier without the flag. Why the
quiet barrier comes one interval *after* the last data and not with it: under exactly-once an
interval's records and its barrier become visible together at the upstream commit, so a channel
taken for quiet right after barrier ``n - 1`` would let this task checkpoint ``n`` before the
upstream's interval-``n`` records appear: every checkpoint would miss the latest interval of
the channels that are busiest. Declared one clean interval later, quiet means quiet. What stays
open is the moment a quiet channel wakes up: its first records may miss the downstream
checkpoint of their interval and fall into the next one. Each task's state is still exactly the
input before its committed cut (the skip list is per channel, and a record is either before or
after it), and under at-least-once the hop's sequence numbers still drop replays; only the
job-wide reading of checkpoint ``n`` as one cut loses those first records. The quiet channels
and their watermarks are part of the cut (``q`` and ``qwm`` in the metadata): a restored task
could not otherwise tell a quiet channel from one whose barrier is late.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Cut:
    """Where checkpoint ``checkpoint_id`` cuts one input partition.

    ``offset`` is the offset to commit; ``skip`` maps channel -> first offset of that channel
    that is *not* included, for channels whose included records extend past ``offset``.
    """

    checkpoint_id: int
    offset: int
    skip: dict[int, int] = field(default_factory=dict)
    aligned: bool = True
    #: channels quiet at the cut -> their watermark (event-time jobs; None: idle, or no event
    #: time), restored with the cut (see "Quiet channels" above)
    quiet: dict[int, int | None] = field(default_factory=dict)


class BarrierAligner:
    """Per-channel alignment state of one repartition input partition.

    The owner feeds items in partition order through :meth:`on_record` / :meth:`on_barrier`
    and processes records for which they return True. When :attr:`ready` becomes True the
    owner takes the checkpoint (:meth:`cut`), then calls :meth:`complete` and processes the
    records it releases.
    """

    __slots__ = (
        "_align_started",
        "_barrier_offset",
        "_clock",
        "_held",
        "_passed",
        "_quiet",
        "_skip",
        "_watermarks",
        "channels",
        "event_time",
        "last_checkpoint",
        "position",
        "timeout",
    )

    def __init__(
        self,
        channels: int,
        *,
        last_checkpoint: int = 0,
        position: int = 0,
        skip: dict[int, int] | None = None,
        timeout: float = 60.0,
        clock: Callable[[], float],
        watermark: int = -(2**63),
        event_time: bool = False,
        quiet: dict[int, int | None] | None = None,
    ) -> None:
        self.channels = channels
        self.event_time = event_time
        self.last_checkpoint = last_checkpoint
        #: next offset to read (everything below was consumed: processed, held or skipped)
        self.position = position
        self.timeout = timeout
        self._clock = clock
        self._passed = [last_checkpoint] * channels
        self._barrier_offset = [-1] * channels
        self._held: list[deque[tuple[int, Any, int | None]]] = [deque() for _ in range(channels)]
        self._skip = dict(skip or {})
        self._align_started: float | None = None
        #: event-time jobs: per channel the watermark of the last barrier that passed, or None
        #: while the channel is idle; all start at the restored watermark
        self._watermarks: list[int | None] = [watermark] * channels
        #: channels whose last barrier was quiet and nothing of theirs came after it
        self._quiet = [False] * channels
        for c, wm in (quiet or {}).items():
            if c < channels:
                self._quiet[c] = True
                if event_time:
                    self._watermarks[c] = wm

    def add_channels(self, count: int) -> None:
        """More upstream channels than at start (partitions were added to the upstream stage's
        input while the job runs). A new channel starts like every channel at a task's start:
        it has passed the last checkpoint and nothing after it, so its records are processed
        until its first barrier, and an alignment under way waits for that barrier too (a new
        upstream task's first round goes to every partition: StageTask.open)."""
        current = self.watermark()
        for _ in range(self.channels, count):
            self._passed.append(self.last_checkpoint)
            self._barrier_offset.append(-1)
            self._held.append(deque())
            self._watermarks.append(current)
            self._quiet.append(False)
        self.channels = max(self.channels, count)

    # -- feeding -------------------------------------------------------------------------------
    def admit(self, channel: int, offset: int) -> bool:
        """Is a record at ``offset`` of ``channel`` new (not already in the restored state)?

        Only consulted while a restore skip list is active (rare), so the hot path is a
        truthiness test of an empty dict.
        """
        self.position = offset + 1
        skip = self._skip
        if skip:
            if offset >= max(skip.values()):
                skip.clear()
            elif offset < skip.get(channel, -1):
                return False
        return True

    def on_record(self, channel: int, offset: int, item: Any) -> bool:
        """A data record; True if it should be processed now, False if it is held.

        A record of a quiet channel ends its quiet (its barrier will follow it); a held one
        ends it when it is released, in line with the barriers held before it."""
        if self._passed[channel] > self.last_checkpoint:
            self._held[channel].append((offset, item, None))
            return False
        if self._quiet[channel]:
            self._quiet[channel] = False
        return True

    def on_barrier(
        self,
        channel: int,
        offset: int,
        checkpoint_id: int,
        watermark: bytes | None = None,
        quiet: bool = False,
    ) -> None:
        """A barrier record of ``channel``; may make the aligner :attr:`ready`.
        ``watermark``: the upstream task's (``b"<ms>"`` or ``b"idle"``), taken when it passes;
        ``quiet``: nothing of the channel follows it until a data record does."""
        if self._passed[channel] > self.last_checkpoint:
            # The channel is already blocked: its later barriers wait in line with its records
            # (the item slot of a held barrier carries its watermark and quiet flag).
            self._held[channel].append((offset, (watermark, quiet), checkpoint_id))
            return
        self._pass(channel, offset, checkpoint_id, watermark, quiet)

    def watermark(self) -> int | None:
        """The minimum watermark over the channels that are not idle (None: all idle).

        A channel's watermark moves only when its barrier *passes* (not when it is read and
        held): records held behind it have not been processed yet, and they must not look late.
        """
        active = [w for w in self._watermarks if w is not None]
        return min(active) if active else None

    def _pass(
        self,
        channel: int,
        offset: int,
        checkpoint_id: int,
        watermark: bytes | None = None,
        quiet: bool = False,
    ) -> None:
        # In partition order, even for a stale barrier: what follows it is all that counts.
        self._quiet[channel] = quiet
        if watermark is not None:
            if watermark == b"idle":
                self._watermarks[channel] = None
            else:
                previous = self._watermarks[channel]
                value = int(watermark)
                self._watermarks[channel] = value if previous is None else max(previous, value)
        if checkpoint_id <= self._passed[channel]:
            return  # a stale or repeated barrier (an upstream replay): nothing to align
        self._passed[channel] = checkpoint_id
        self._barrier_offset[channel] = offset
        if checkpoint_id > self.last_checkpoint and self._align_started is None:
            self._align_started = self._clock()

    # -- checkpointing -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Some channel passed a barrier newer than the last checkpoint, and every other one
        did too or is quiet."""
        last = self.last_checkpoint
        passed = self._passed
        if min(passed) > last:
            return True
        quiet = self._quiet
        return max(passed) > last and all(q or p > last for p, q in zip(passed, quiet, strict=True))

    def quiet_channels(self) -> dict[int, int | None]:
        """Quiet channels -> their watermark (event-time jobs; else None): part of the cut."""
        wms = self._watermarks
        return {c: (wms[c] if self.event_time else None) for c, q in enumerate(self._quiet) if q}

    @property
    def aligning(self) -> bool:
        return self._align_started is not None

    def timed_out(self) -> bool:
        started = self._align_started
        return started is not None and self._clock() - started >= self.timeout

    def alignment_seconds(self) -> float:
        started = self._align_started
        return 0.0 if started is None else self._clock() - started

    def cut(self, *, force: bool = False) -> Cut:
        """The cut for the checkpoint to take now.

        Without ``force`` the aligner must be :attr:`ready`. With ``force`` (alignment timeout,
        or a final checkpoint on revocation) channels that have not passed contribute every
        record read so far, and the checkpoint is marked unaligned unless it was ready anyway.
        """
        aligned = self.ready
        if not aligned and not force:
            raise RuntimeError("cut() before alignment completed")
        last = self.last_checkpoint
        passed = [p for p in self._passed if p > last]
        checkpoint_id = min(passed) if passed else last
        firsts = [
            self._barrier_offset[c] + 1 if self._passed[c] > last else self.position
            for c in range(self.channels)
        ]
        # Records already skipped as restored stay skipped: carry an active skip list forward.
        for c, x in self._skip.items():
            firsts[c] = max(firsts[c], x)
        offset = min(firsts) if firsts else self.position
        skip = {c: x for c, x in enumerate(firsts) if x > offset}
        return Cut(checkpoint_id, offset, skip, aligned, self.quiet_channels())

    def complete(self, checkpoint_id: int) -> list[Any]:
        """Checkpoint ``checkpoint_id`` is taken: unblock channels and release held records.

        Returns the released data records in per-channel order; releasing may pass further
        barriers, so the owner checks :attr:`ready` again after processing them.
        """
        self.last_checkpoint = max(self.last_checkpoint, checkpoint_id)
        self._align_started = None
        released: list[Any] = []
        for c in range(self.channels):
            held = self._held[c]
            while held and self._passed[c] <= self.last_checkpoint:
                offset, item, barrier = held.popleft()
                if barrier is None:
                    self._quiet[c] = False
                    released.append(item)
                else:
                    self._pass(c, offset, barrier, *item)
        return released

    def held_count(self) -> int:
        return sum(len(h) for h in self._held)
