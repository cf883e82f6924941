"""Event-time windows as built-in operators, made of the same timers and state users get.

    (job.source("views", key_serde=STR, value_serde=JSON, timestamp=lambda v: v["ts"],
                watermarks=Watermarks(out_of_orderness=5, idle_timeout=10))
        .window(Tumbling(60), allowed_lateness=30, late_topic="views-late")
        .count(name="views-per-minute")
        .sink("views-per-minute", key_serde=STR, value_serde=JSON))

Every result is emitted with the record key and the value ``{"start": ms, "end": ms, "value":
result}``; its event time (the Kafka timestamp of the output) is the window's end.

The rules, in milliseconds, with ``L`` the allowed lateness and ``w`` the watermark *before* the
record (so that the outcome depends only on the order of the input, not on batching):

* **Tumbling and hopping**: a record at ``t`` belongs to every window ``[start, end)`` that
  contains ``t``. A window is *closed* once ``w >= end + L``: a timer at ``end + L`` emits its
  final result (``emit="final"``) and deletes its state (a tombstone in the changelog). A record
  is late for a window that is already closed; it still counts in its open windows.
* **Sliding** (size ``s``): one window ``[t - s, t]`` per distinct record time ``t`` of a key; it
  closes once ``w >= t + L``. A record is late when its own window is closed; it then counts in
  no window (so results equal a batch computation over the records that were not late).
* **Session** (gap ``g``): a record at ``t`` opens ``[t, t + g)`` and merges with every session it
  overlaps; a session closes once ``w >= end + L``. A record is late when ``t < w - L``: any
  session it could touch may have closed already, and merging into a result that was emitted
  would change history. This is what makes the results equal a batch computation over the
  records that were not late (tests/unit/test_windows.py checks it with hypothesis).

Late records are never dropped silently: they are counted (``headrace_late_records_total``)
and written to ``late_topic`` as they arrived, with headers ``hr.late.windows`` (the closed
windows, ``start-end`` comma-separated), ``hr.late.watermark`` and ``hr.late.operator``; without a
late topic they are counted as skipped and logged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from headrace.operators.operator import Context, Operator
from headrace.operators.record import Record
from headrace.operators.serde import INT, JSON, Serde
from headrace.operators.state import AggregateFunction, MapStateDescriptor


def _ms(seconds: float, what: str, *, positive: bool = True) -> int:
    ms = round(seconds * 1000)
    if ms <= 0 if positive else ms < 0:
        raise ValueError(f"{what} must be {'> 0' if positive else '>= 0'} seconds, got {seconds}")
    return ms


@dataclass(frozen=True, slots=True)
class Tumbling:
    """Fixed windows of ``size`` seconds, one after the other: ``[k*size, (k+1)*size)``."""

    size: float

    def __post_init__(self) -> None:
        _ms(self.size, "window size")

    @property
    def size_ms(self) -> int:
        return _ms(self.size, "window size")

    def assign(self, t: int) -> list[tuple[int, int]]:
        size = self.size_ms
        start = t - t % size
        return [(start, start + size)]


@dataclass(frozen=True, slots=True)
class Hopping:
    """Windows of ``size`` seconds starting every ``advance`` seconds (Flink's sliding windows);
    a record belongs to ``size / advance`` of them."""

    size: float
    advance: float

    def __post_init__(self) -> None:
        if _ms(self.advance, "advance") > _ms(self.size, "window size"):
            raise ValueError("a hopping window's advance must not exceed its size")

    @property
    def size_ms(self) -> int:
        return _ms(self.size, "window size")

    def assign(self, t: int) -> list[tuple[int, int]]:
        size, advance = self.size_ms, _ms(self.advance, "advance")
        last = t - t % advance
        return [(s, s + size) for s in range(last, t - size, -advance)][::-1]


@dataclass(frozen=True, slots=True)
class Sliding:
    """One window per record, ending at it: ``[t - size, t]`` (both ends included), i.e. "the
    last ``size`` seconds at every event" (a per-key rolling aggregate). Records with the same
    time share their window. (Flink calls hopping windows "sliding": that is :class:`Hopping`.)
    """

    size: float

    def __post_init__(self) -> None:
        _ms(self.size, "window size")


@dataclass(frozen=True, slots=True)
class Session:
    """Per key, records closer than ``gap`` seconds to each other form one session."""

    gap: float

    def __post_init__(self) -> None:
        _ms(self.gap, "session gap")


class _Count(AggregateFunction[Any, int, int]):
    def create_accumulator(self) -> int:
        return 0

    def add(self, value: Any, accumulator: int) -> int:
        return accumulator + 1

    def merge(self, a: int, b: int) -> int:
        return a + b

    def get_result(self, accumulator: int) -> int:
        return accumulator


class _Fold(AggregateFunction[Any, Any, Any]):
    """``sum`` (initial 0, values through ``get``) and ``reduce`` (the first value starts)."""

    def __init__(self, fn: Callable[[Any, Any], Any], merge: Callable[[Any, Any], Any]) -> None:
        self.fn, self._merge = fn, merge

    def create_accumulator(self) -> Any:
        return None

    def add(self, value: Any, accumulator: Any) -> Any:
        return value if accumulator is None else self.fn(accumulator, value)

    def merge(self, a: Any, b: Any) -> Any:
        if a is None:
            return b
        return a if b is None else self._merge(a, b)

    def get_result(self, accumulator: Any) -> Any:
        return accumulator


class WindowedStream:
    """A keyed stream grouped into windows; an aggregation makes it a stream again."""

    def __init__(
        self, stream: Any, windows: Any, lateness: float, emit: str, late_topic: str | None
    ) -> None:
        if not isinstance(windows, Tumbling | Hopping | Sliding | Session):
            raise TypeError(
                f"window() takes Tumbling, Hopping, Sliding or Session, got {windows!r}"
            )
        if emit not in ("final", "update"):
            raise ValueError(f'emit must be "final" or "update", got {emit!r}')
        self._stream = stream
        self._windows = windows
        self._lateness = _ms(lateness, "allowed_lateness", positive=False)
        self._updates = emit == "update"
        self._late_topic = late_topic

    def count(self, name: str | None = None) -> Any:
        """Per key and window, the number of records."""
        return self._make(_Count(), INT, name, "count")

    def sum(
        self,
        fn: Callable[[Any], Any] | None = None,
        *,
        serde: Serde[Any] = JSON,
        name: str | None = None,
    ) -> Any:
        """Per key and window, the sum of ``fn(value)`` (default: the value)."""
        get = fn or (lambda v: v)
        agg = _Fold(lambda acc, v: acc + v, lambda a, b: a + b)
        return self._make(_Mapped(agg, get), serde, name, "sum")

    def reduce(
        self, fn: Callable[[Any, Any], Any], *, serde: Serde[Any] = JSON, name: str | None = None
    ) -> Any:
        """Per key and window, the values folded with ``fn(acc, value)``."""
        return self._make(_Fold(fn, fn), serde, name, "reduce")

    def aggregate(
        self,
        function: AggregateFunction[Any, Any, Any],
        *,
        serde: Serde[Any] = JSON,
        name: str | None = None,
    ) -> Any:
        """Per key and window, a user :class:`AggregateFunction` (its ``merge`` is used when
        sessions merge)."""
        return self._make(function, serde, name, "aggregate")

    def _make(
        self, agg: AggregateFunction[Any, Any, Any], serde: Serde[Any], name: str | None, kind: str
    ) -> Any:
        session = isinstance(self._windows, Session)
        if session and serde is INT:
            serde = JSON  # the session state is JSON; a count is a JSON number
        # The window state: per key, window start -> accumulator ([end, accumulator] for a
        # session, whose end moves). Declared on a generated class, like the built-in
        # aggregations, so the runtime sees ordinary declared state.
        desc = MapStateDescriptor[int, Any](key_serde=INT, serde=JSON if session else serde)
        base: type[_WindowOperator] = _FixedWindow
        if session:
            base = _SessionWindow
        elif isinstance(self._windows, Sliding):
            base = _SlidingWindow
        cls = type(f"Window{kind.capitalize()}", (base,), {"windows": desc})
        op = cls(self._windows, self._lateness, self._updates, self._late_topic, agg, serde)
        how = f"window(...).{kind}(name=...)"
        return self._stream._process(op, name, f"window-{kind}", how)


class _Mapped(AggregateFunction[Any, Any, Any]):
    """An aggregate over ``get(value)``."""

    def __init__(self, inner: AggregateFunction[Any, Any, Any], get: Callable[[Any], Any]):
        self.inner, self.get = inner, get

    def create_accumulator(self) -> Any:
        return self.inner.create_accumulator()

    def add(self, value: Any, accumulator: Any) -> Any:
        return self.inner.add(self.get(value), accumulator)

    def merge(self, a: Any, b: Any) -> Any:
        return self.inner.merge(a, b)

    def get_result(self, accumulator: Any) -> Any:
        return self.inner.get_result(accumulator)


class _WindowOperator(Operator):
    """What tumbling, hopping and session windows share: configuration and late records."""

    windows: Any  #: MapState declared by the generated subclass

    def __init__(
        self,
        assigner: Any,
        lateness_ms: int,
        updates: bool,
        late_topic: str | None,
        agg: AggregateFunction[Any, Any, Any],
        serde: Serde[Any],
    ) -> None:
        self.assigner = assigner
        #: the window size or session gap in ms, computed once (not per record)
        self.span = _ms(getattr(assigner, "size", getattr(assigner, "gap", 0)), "window span")
        self.tumbling = isinstance(assigner, Tumbling)
        self.lateness = lateness_ms
        self.updates = updates
        self.late_topic = late_topic
        self.agg = agg
        self.serde = serde

    @property
    def state_layout(self) -> str:
        """What the job identity records about this operator's state beyond its declared
        states: the window assigner and the lateness (state keys are window starts and
        timers sit at ``end + lateness``, so changing either on existing state would mix
        windows or leave them open for ever: refused, runtime/kafka/identity.py)."""
        return f"{self.assigner!r} lateness={self.lateness}ms"

    def _result(self, start: int, end: int, acc: Any, ctx: Context) -> None:
        ctx.emit({"start": start, "end": end, "value": self.agg.get_result(acc)}, timestamp=end)

    def _late(self, record: Record[Any, Any], ctx: Context, missed: list[tuple[int, int]]) -> None:
        headers = [
            ("hr.late.windows", ",".join(f"{s}-{e}" for s, e in missed).encode()),
            ("hr.late.watermark", b"%d" % ctx.watermark),
            ("hr.late.operator", self.operator_id.encode()),
        ]
        late = getattr(ctx, "late", None)
        if late is not None:
            late(self.late_topic, headers)
        elif self.late_topic is not None:  # a context without late accounting (a user's own)
            ctx.side_output(self.late_topic, headers)


class _FixedWindow(_WindowOperator):
    """Tumbling and hopping windows."""

    def process(self, record: Record[Any, Any], ctx: Context) -> None:
        t = record.timestamp
        w = ctx.watermark
        lateness = self.lateness
        missed = []
        state = self.windows
        agg = self.agg
        if self.tumbling:  # one window: no list to build
            start = t - t % self.span
            windows: Any = ((start, start + self.span),)
        else:
            windows = self.assigner.assign(t)
        for start, end in windows:
            if w >= end + lateness:
                missed.append((start, end))
                continue
            acc = state.get(start)
            if acc is None:
                acc = agg.create_accumulator()
                ctx.timers.register_event_time(end + lateness)
            acc = agg.add(record.value, acc)
            state.put(start, acc)
            if self.updates:
                self._result(start, end, acc, ctx)
        if missed:
            self._late(record, ctx, missed)

    def on_timer(self, key: Any, timestamp: int, ctx: Context) -> None:
        state = self.windows
        size = self.span
        for start in sorted(state.keys()):
            end = start + size
            if end + self.lateness > timestamp:
                continue
            if not self.updates:
                self._result(start, end, state.get(start), ctx)
            state.remove(start)


class _SlidingWindow(_WindowOperator):
    """Sliding windows: per key, record time -> accumulator of the records at that time.

    The window ending at ``t`` closes (a timer at ``t + L`` emits it) once the watermark reaches
    ``t + L``; the entry of ``t`` is kept until no open window can contain it (a timer at
    ``t + size + L`` deletes it). A record whose own window is already closed is late and counts
    nowhere, so the results are those of a batch computation over the records that were not.
    """

    def process(self, record: Record[Any, Any], ctx: Context) -> None:
        t = record.timestamp
        lateness = self.lateness
        size = self.span
        if ctx.watermark >= t + lateness:
            self._late(record, ctx, [(t - size, t)])
            return
        state, agg = self.windows, self.agg
        acc = state.get(t)
        if acc is None:
            acc = agg.create_accumulator()
            ctx.timers.register_event_time(t + lateness)
            ctx.timers.register_event_time(t + size + lateness)
        state.put(t, agg.add(record.value, acc))
        if self.updates:  # every window that contains t changed
            for end in sorted(e for e in state if t <= e <= t + size):
                self._emit_window(end, size, ctx)

    def _emit_window(self, end: int, size: int, ctx: Context) -> None:
        state, agg = self.windows, self.agg
        acc = agg.create_accumulator()
        for s in state:
            if end - size <= s <= end:
                acc = agg.merge(acc, state.get(s))
        self._result(end - size, end, acc, ctx)

    def on_timer(self, key: Any, timestamp: int, ctx: Context) -> None:
        state = self.windows
        size = self.span
        lateness = self.lateness
        stored = sorted(state.keys())
        if not self.updates:
            for t in stored:
                if t + lateness == timestamp:
                    self._emit_window(t, size, ctx)
        for t in stored:
            if t + size + lateness <= timestamp:
                state.remove(t)


class _SessionWindow(_WindowOperator):
    """Session windows: per key, ``start -> [end, accumulator]``."""

    def process(self, record: Record[Any, Any], ctx: Context) -> None:
        t = record.timestamp
        w = ctx.watermark
        lateness = self.lateness
        gap = self.span
        if w != _MIN and t < w - lateness:
            self._late(record, ctx, [(t, t + gap)])
            return
        state = self.windows
        agg = self.agg
        start, end = t, t + gap
        acc = agg.create_accumulator()
        for s in list(state.keys()):
            e, a = state.get(s)
            if s < t + gap and e > t:  # overlaps [t, t + gap): merge it in
                start, end = min(start, s), max(end, e)
                acc = agg.merge(acc, self._load(a))
                state.remove(s)
                ctx.timers.delete_event_time(e + lateness)
        acc = agg.add(record.value, acc)
        state.put(start, [end, self._store(acc)])
        ctx.timers.register_event_time(end + lateness)
        if self.updates:
            self._result(start, end, acc, ctx)

    def on_timer(self, key: Any, timestamp: int, ctx: Context) -> None:
        state = self.windows
        for start in sorted(state.keys()):
            end, acc = state.get(start)
            if end + self.lateness > timestamp:
                continue
            if not self.updates:
                self._result(start, end, self._load(acc), ctx)
            state.remove(start)

    # The session state is JSON ([end, accumulator]); a user serde encodes the accumulator.
    def _store(self, acc: Any) -> Any:
        if self.serde is JSON:
            return acc
        return self.serde.serialize(acc).hex()

    def _load(self, raw: Any) -> Any:
        if self.serde is JSON:
            return raw
        return self.serde.deserialize(bytes.fromhex(raw))


_MIN = -(2**63)
