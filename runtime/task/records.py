"""What a task reads and hands on: raw records, the context operators emit through, the
compiled step signature, per-task counters, and the error a ``fail`` policy raises."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from time import time as _wall
from typing import Any, Protocol

from headrace.operators.operator import SAME_KEY
from headrace.operators.record import describe_key
from headrace.operators.time import MIN_WATERMARK
from headrace.runtime.kafka.producer import Headers

#: A compiled step of a stage's chain: ``step(raw, key_bytes, key, value)``. ``raw`` is the
#: input record being processed (operators' ``Record``s, error reports and sequence numbers
#: come from it); ``key_bytes`` is the record's key bytes while ``key`` is still the record's
#: key (so a sink with the source's key serde writes them as they came), else KEY_CHANGED.
Step = Callable[[Any, Any, Any, Any], None]

NO_HEADERS: Headers = []  # shared, never mutated


class _Marker:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


KEY_CHANGED: Any = _Marker("<key changed>")
FAILED: Any = _Marker("<failed>")


class RawRecord(Protocol):
    """What the task reads: :class:`~headrace.runtime.kafka.fetch.FetchedRecord` (what our
    consumers hand out), aiokafka's ConsumerRecord and the test driver's records have this
    shape. ``headers`` may be a list or a tuple."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


class RecordError(Exception):
    """A record failed under the ``fail`` policy; names where it is and what went wrong."""

    def __init__(self, record: RawRecord, kind: str, cause: BaseException) -> None:
        self.topic, self.partition, self.offset = record.topic, record.partition, record.offset
        self.kind = kind
        super().__init__(
            f"{kind} failed for the record at topic {record.topic!r} partition "
            f"{record.partition} offset {record.offset} key {describe_key(record.key)}: "
            f"{type(cause).__name__}: {cause}"
        )


#: bytes a record needs on the wire beyond its key and value (batch and record headers,
#: timestamps, varints): what is left of a topic's limit for key + value + headers
RECORD_OVERHEAD = 512


class RecordTooLargeError(ValueError):
    """An output does not fit its topic (``max.message.bytes``, or the producer's
    ``max.request.size``). Raised on the per-record path, so the job's error policy handles
    the input record that produced it (its other outputs are dropped with it)."""

    def __init__(self, topic: str, size: int, limit: int) -> None:
        self.topic, self.size, self.limit = topic, size, limit
        super().__init__(
            f"the output to topic {topic!r} is {size:,} bytes (key + value), more than the "
            f"{limit - RECORD_OVERHEAD:,} that fit a record of at most {limit:,} bytes "
            "(the topic's max.message.bytes, or the producer's max.request.size)"
        )


class StateTooLargeError(RuntimeError):
    """A state value does not fit its changelog topic; found when a checkpoint serializes it
    (state is never serialized per record), so it cannot be pinned to one input record."""

    def __init__(
        self,
        operator_id: str,
        state: str,
        key: str,
        size: int,
        limit: int,
        topic: str,
        *,
        at_record: bool = False,
        retry: bool = False,
    ) -> None:
        self.operator_id, self.state, self.size, self.limit = operator_id, state, size, limit
        #: found at a checkpoint for a key the task will now guard: drop the task's work since
        #: the last checkpoint and process it again, so the error policy meets the record
        self.retry = retry
        what = (
            "this record's state writes were taken back"
            if at_record
            else "the checkpoint was not taken"
        )
        super().__init__(
            f"state {state!r} of operator {operator_id!r} for key {key} would be {size:,} "
            f"bytes, more than fits a record of {topic!r} ({limit:,} bytes: its "
            f"max.message.bytes, or the producer's max.request.size); {what}. Keep state "
            "values smaller (split a growing list over keys or a MapState; clear or expire it "
            "with a TTL), or raise the topic's max.message.bytes"
        )


@dataclass(slots=True)
class TaskCounters:
    """Per-task counters, read by the worker's metrics at scrape time."""

    records_in: int = 0
    records_out: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    checkpoints: int = 0
    unaligned_checkpoints: int = 0
    #: checkpoints with nothing to commit (no input, output or state change since the last)
    idle_checkpoints: int = 0
    #: at-least-once: repartition records dropped as replays of records seen before
    deduplicated: int = 0
    #: event time: records that fell only into closed windows (kept in a late topic, or
    #: counted as skipped too)
    late: int = 0
    #: event time: the task's watermark (ms; None: the job has no event time, or none yet)
    watermark: int | None = None


class TaskContext:
    """The :class:`headrace.operators.operator.Context` given to one operator of one task.

    Besides the record key it carries the raw input record and the key's bytes (see
    :data:`Step`), so that ``emit`` passes them on without the task keeping per-record state.
    """

    __slots__ = (
        "_kb",
        "_next",
        "_raw",
        "_side",
        "key",
        "operator_id",
        "partition",
        "time",
        "timers",
    )

    def __init__(self, operator_id: str, partition: int, nxt: Step):
        self.operator_id = operator_id
        self.partition = partition
        self.key: Any = None
        self._kb: Any = None
        self._raw: Any = None
        self._next = nxt
        #: the task's TaskTime (event-time jobs) and this operator's timers (if it has on_timer)
        self.time: Any = None
        self.timers: Any = None
        #: ``side(topic, headers, raw, late)``: the task's side output (set by the task)
        self._side: Callable[..., None] | None = None

    def emit(self, value: Any, key: Any = SAME_KEY, timestamp: int | None = None) -> None:
        raw = self._raw
        if timestamp is not None and timestamp != raw.timestamp:
            raw = restamped(raw, timestamp)
        if key is SAME_KEY or key is self.key:
            self._next(raw, self._kb, self.key, value)
        else:
            self._next(raw, KEY_CHANGED, key, value)

    @property
    def timestamp(self) -> int:
        return int(self._raw.timestamp)

    @property
    def watermark(self) -> int:
        time = self.time
        return MIN_WATERMARK if time is None else int(time.watermark)

    def processing_time(self) -> int:
        time = self.time
        return int((time.clock() if time is not None else _wall()) * 1000)

    def side_output(self, topic: str, headers: list[tuple[str, bytes]]) -> None:
        assert self._side is not None
        self._side(topic, headers, self._raw, False)

    def late(self, topic: str | None, headers: list[tuple[str, bytes]]) -> None:
        """A late record: counted, and written to ``topic`` (or skipped and logged)."""
        assert self._side is not None
        self._side(topic, headers, self._raw, True)


class _Restamped:
    """A raw record with another event time (``ctx.emit(..., timestamp=...)``)."""

    __slots__ = ("headers", "key", "offset", "partition", "timestamp", "topic", "value")

    def __init__(self, raw: Any, timestamp: int) -> None:
        self.topic, self.partition, self.offset = raw.topic, raw.partition, raw.offset
        self.key, self.value, self.headers = raw.key, raw.value, raw.headers
        self.timestamp = timestamp


def restamped(raw: Any, timestamp: int) -> Any:
    return _Restamped(raw, timestamp)
