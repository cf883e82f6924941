"""Event time inside a task: the watermark, the operators' timers, and firing them. No I/O.

Where the watermark comes from (operators/time.py for the user's side):

* a **source** task observes the event time of every record it processes (after the
  ``timestamp=`` extractor, which also becomes the record's timestamp for everything after it)
  and keeps, per input topic, the highest one; its watermark is the minimum of those minus the
  out-of-orderness, over the inputs that are not idle. It is updated *per record*, after the
  record ran, so whether a record is late depends only on the order of the input;
* a task behind a ``key_by`` takes it from the barriers: each upstream task writes its watermark
  (or "idle") on every barrier (``hr.wm``), the aligner keeps it per channel as the barrier
  passes, and the task's watermark is the minimum over the channels that are not idle;
* ``tick`` (between batches): inputs without records for ``idle_timeout`` turn idle; when all
  are idle and ``advance_when_idle`` is set, the watermark follows the wall clock.

The watermark is part of the checkpoint (``wm`` in the commit metadata): a restored task goes on
from the watermark of its committed cut, never from the beginning.

**Timers** are state: each operator that defines ``on_timer`` has a keyed state ``hr.timers``
(declared in operators/operator.py) whose keys are ``domain + time + record key``. The state is
the truth (changelogged, checkpointed, restored); the heaps here are an index rebuilt from it
when the task opens. A timer fires by being deleted from that state and calling ``on_timer``
in the same step, so the deletion and whatever ``on_timer`` wrote and emitted are in the same
checkpoint: after a crash a fired timer either fired (its checkpoint committed) or is still in
the restored state and fires again into a run whose earlier outputs were aborted
(``exactly_once``) or may repeat (``at_least_once``). It is never lost and, under
``exactly_once``, never fires twice.
"""

from __future__ import annotations

import heapq
import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from headrace.operators.operator import Operator
from headrace.operators.time import MIN_WATERMARK, Watermarks

if TYPE_CHECKING:
    from headrace.runtime.state.store import OperatorStateStore
    from headrace.runtime.task.errors import RecordErrors
    from headrace.runtime.task.records import TaskContext

log = logging.getLogger("headrace.runtime.task")

EVENT, PROCESSING = 0, 1
_TIME = struct.Struct(">q")


def timer_key(domain: int, timestamp: int, key: bytes) -> bytes:
    """The storage key of a timer: domain byte, 8-byte time, the record key's bytes."""
    return bytes((domain,)) + _TIME.pack(timestamp) + key


def parse_timer_key(data: bytes) -> tuple[int, int, bytes]:
    return data[0], _TIME.unpack_from(data, 1)[0], bytes(data[9:])


class TimerRecord:
    """The raw record a firing timer passes down the chain: where it fired (for error reports
    and, under at-least-once, the sequence numbers of its outputs) and its time."""

    __slots__ = ("headers", "key", "offset", "partition", "timestamp", "topic", "value")

    def __init__(self, topic: str, partition: int, offset: int, timestamp: int, key: Any):
        self.topic, self.partition, self.offset = topic, partition, offset
        self.timestamp, self.key = timestamp, key
        self.value: bytes | None = None
        self.headers: tuple[tuple[str, bytes], ...] = ()


class OperatorTimers:
    """The timers of one operator of one task (``ctx.timers``): scoped to the store's key."""

    __slots__ = ("_heaps", "_registered", "handle", "store", "time")

    def __init__(self, handle: Any, store: OperatorStateStore, time: TaskTime) -> None:
        self.handle = handle
        self.store = store
        self.time = time
        self._heaps: tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]] = ([], [])
        self._registered: set[bytes] = set()

    def load(self) -> None:
        """Rebuild the index from the (restored) timer state."""
        self._heaps = ([], [])
        self._registered = set()
        for key, _ in self.handle.items():
            domain, ts, sk = parse_timer_key(key)
            self._registered.add(bytes(key))
            self._heaps[domain].append((ts, sk))
        for heap in self._heaps:
            heapq.heapify(heap)

    def _register(self, domain: int, timestamp: int) -> None:
        sk = self.store.current_key
        key = timer_key(domain, int(timestamp), sk)
        if key in self._registered:
            return
        self._registered.add(key)
        self.handle.put(key, 1)
        heapq.heappush(self._heaps[domain], (int(timestamp), sk))
        if domain == EVENT and timestamp <= self.time.watermark:
            # already due: it fires right after the record (or batch) that set it, not at the
            # next advance, which might never come (a watermark at the end of time)
            self.time.overdue = True

    def _delete(self, domain: int, timestamp: int) -> None:
        key = timer_key(domain, int(timestamp), self.store.current_key)
        if key in self._registered:
            self._registered.discard(key)
            self.handle.delete(key)

    def register_event_time(self, timestamp: int) -> None:
        self._register(EVENT, timestamp)

    def delete_event_time(self, timestamp: int) -> None:
        self._delete(EVENT, timestamp)

    def register_processing_time(self, timestamp: int) -> None:
        self._register(PROCESSING, timestamp)

    def delete_processing_time(self, timestamp: int) -> None:
        self._delete(PROCESSING, timestamp)

    def pop_due(self, domain: int, until: int) -> tuple[int, bytes] | None:
        """The earliest registered timer at or before ``until``, removed from the state."""
        heap = self._heaps[domain]
        while heap and heap[0][0] <= until:
            ts, sk = heapq.heappop(heap)
            key = timer_key(domain, ts, sk)
            if key in self._registered:
                self._registered.discard(key)
                self.handle.delete(key)
                return ts, sk
        return None

    def pending(self) -> int:
        return len(self._registered)


class TaskTime:
    """Watermark and timers of one task (see the module docstring)."""

    def __init__(
        self,
        *,
        watermarks: Watermarks,
        topic: str,
        partition: int,
        clock: Callable[[], float],
        key_deserialize: Callable[[Any], Any],
        stores: dict[str, OperatorStateStore],
        errors: RecordErrors,
        out: list[Any],
    ) -> None:
        self.watermark = MIN_WATERMARK
        self.ooo = watermarks.out_of_orderness_ms
        self.idle_ms = watermarks.idle_timeout_ms
        self.advance_when_idle = watermarks.advance_when_idle
        self.topic, self.partition = topic, partition
        self.clock = clock
        self.key_deserialize = key_deserialize
        self.stores = tuple(stores.values())
        self.errors = errors
        self.out = out
        #: per input topic: the highest event time seen, and when its last batch came (clock s)
        self.max_ts: dict[str, int] = {}
        self.last_seen: dict[str, float] = {}
        #: the inputs of a source task (its topics); channels of a downstream one
        self.inputs: list[str] = []
        #: True when every input is idle (published on barriers as "idle")
        self.idle = False
        self.timers: list[tuple[OperatorTimers, Operator, TaskContext]] = []
        #: an event-time timer was set at or below the watermark: fire it after this record
        self.overdue = False

    # -- opening -------------------------------------------------------------------------------
    def add_operator(self, op: Operator, ctx: TaskContext, store: OperatorStateStore) -> None:
        handle = store.handles()[Operator.TIMER_STATE]
        timers = OperatorTimers(handle, store, self)
        ctx.timers = timers
        ctx.time = self
        self.timers.append((timers, op, ctx))

    def open(self, inputs: list[str], watermark: int | None) -> None:
        """Start at the committed cut's watermark, with the timers of the restored state."""
        self.inputs = list(inputs)
        self.watermark = MIN_WATERMARK if watermark is None else watermark
        self.errors.counters.watermark = watermark
        self.max_ts = {}
        now = self.clock()
        self.last_seen = dict.fromkeys(self.inputs, now)
        self.idle = False
        for timers, _, _ in self.timers:
            timers.load()

    # -- a source task ---------------------------------------------------------------------------
    def observe(self, r: Any, ts: int) -> None:
        """After a record ran: its event time may move the watermark (and fire timers)."""
        topic = r.topic
        if ts <= self.max_ts.get(topic, MIN_WATERMARK):
            if self.overdue:
                self.fire_overdue(r)
            return
        self.max_ts[topic] = ts
        max_ts = self.max_ts
        if len(max_ts) == 1 and len(self.inputs) <= 1:
            low = ts
        else:
            active = [max_ts.get(t, MIN_WATERMARK) for t in self.inputs if not self._idle(t)]
            low = min(active) if active else ts
        if low != MIN_WATERMARK:
            self.advance(low - self.ooo, r)
        if self.overdue:
            self.fire_overdue(r)

    def fire_overdue(self, after: Any = None) -> None:
        """Fire event-time timers that were set at or below the current watermark."""
        self.overdue = False
        if self.timers:
            self._fire(0, self.watermark, after)

    def batch_seen(self, topic: str) -> None:
        self.last_seen[topic] = self.clock()
        self.idle = False

    def _idle(self, topic: str) -> bool:
        idle = self.idle_ms
        return idle is not None and (self.clock() - self.last_seen.get(topic, 0.0)) * 1000 >= idle

    def tick_source(self, now: float) -> None:
        """Between batches: idleness, and the wall-clock watermark of a quiet task."""
        if self.idle_ms is None or not self.inputs:
            return
        if all(self._idle(t) for t in self.inputs):
            self.idle = True
            if self.advance_when_idle:
                self.advance(int(now * 1000) - self.idle_ms - self.ooo)
        elif len(self.inputs) > 1:
            # an idle input stops holding the others back
            active = [self.max_ts.get(t, MIN_WATERMARK) for t in self.inputs if not self._idle(t)]
            if active and min(active) > MIN_WATERMARK:
                self.advance(min(active) - self.ooo)

    # -- any task --------------------------------------------------------------------------------
    def advance(self, watermark: int, after: Any = None) -> None:
        """Move the watermark forward (never back) and fire the event-time timers it passes.

        ``after``: the input record after which this happens (None: between batches). Under
        at-least-once the outputs of those timers are sequenced as further outputs of that
        record (same topic, same offset), which is what makes them deduplicable after a hop:
        a replay of one input partition from the committed cut (whose watermark it restores)
        moves the watermark at the same records, or later where the original run had moved it
        between batches (idle), so a replayed timer output never takes a sequence number below
        one the downstream task has seen unless it is a replay itself.
        """
        if watermark <= self.watermark:
            return
        self.watermark = watermark
        self.errors.counters.watermark = watermark
        if self.timers:
            self._fire(0, watermark, after)

    def fire_processing(self, now: float) -> None:
        if self.timers:
            self._fire(1, int(now * 1000), None)

    def _fire(self, domain: int, until: int, after: Any) -> None:
        errors = self.errors
        out = self.out
        for timers, op, ctx in self.timers:
            while True:
                due = timers.pop_due(domain, until)
                if due is None:
                    break
                ts, sk = due
                for store in self.stores:
                    store.current_key = sk
                kb = None if sk == b"" else sk
                if after is None or len(self.inputs) > 1:
                    # Not sequenced (its replays are not recognised after a hop: they may
                    # repeat under at-least-once, never go missing). Between batches there is
                    # no input position; and with several co-partitioned inputs the watermark
                    # depends on how their batches interleave, which a replay does not repeat,
                    # so a timer could fire at another record and take a sequence number that
                    # belongs to an output already seen: dropped, i.e. lost.
                    raw = TimerRecord(self.topic, self.partition, -1, ts, kb)
                else:
                    raw = TimerRecord(after.topic, after.partition, after.offset, ts, kb)
                mark = len(out)
                try:
                    key = None if kb is None else self.key_deserialize(kb)
                    ctx.key, ctx._kb, ctx._raw = key, kb, raw
                    op.on_timer(key, ts, ctx)
                except Exception as exc:
                    del out[mark:]
                    errors.on_error(raw, "timer", exc)

    def pending_timers(self) -> int:
        return sum(t.pending() for t, _, _ in self.timers)
