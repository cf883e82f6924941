"""The job builder: sources, transformations, ``key_by`` hops and sinks.

A :class:`Job` is a description only. ``key_by`` ends a *stage*: records are re-keyed and
written to the internal repartition topic ``<job>.<stage>.repartition`` that the next stage
reads, so that all records of one key meet in one task (and one state backend). Every stage
instance for one input partition is a *task*; that is the unit that moves between workers.

    job = Job("wordcount")
    (job.source("lines", value_serde=STR)
        .flat_map(str.split)
        .key_by(lambda word: word, key_serde=STR)
        .count(name="counts")
        .sink("word-counts", key_serde=STR, value_serde=JSON))
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from headrace.operators.operator import Operator
from headrace.operators.serde import BYTES, JSON, Serde
from headrace.operators.time import Watermarks

_TOPIC_CHARS = re.compile(r"^[A-Za-z0-9._-]+$")


class ErrorPolicy(StrEnum):
    """What happens to a record that cannot be deserialized or whose operator raises.

    Nothing is dropped silently: every path is counted in metrics.
    """

    FAIL = "fail"  #: stop the worker, naming topic/partition/offset; commit nothing past it
    SKIP = "skip"  #: count it and go on
    DEAD_LETTER = "dead_letter"  #: write it to ``<job>.dlq`` with error headers and go on


class JobDefinitionError(ValueError):
    """The job description is inconsistent (reported at build time, before any I/O)."""


@dataclass(frozen=True, slots=True)
class MapStep:
    fn: Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class FlatMapStep:
    fn: Callable[[Any], Iterable[Any]]


@dataclass(frozen=True, slots=True)
class FilterStep:
    fn: Callable[[Any], bool]


@dataclass(frozen=True, slots=True)
class ProcessStep:
    """A user (or built-in) operator; ``prototype`` is copied once per task."""

    operator_id: str
    prototype: Operator

    def instantiate(self) -> Operator:
        """A fresh operator for one task: tasks never share Python objects."""
        op = copy.deepcopy(self.prototype)
        op.operator_id = self.operator_id
        return op


Step = MapStep | FlatMapStep | FilterStep | ProcessStep


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """The inputs of a stage: one or more co-partitioned topics (same partition count)."""

    topics: tuple[str, ...]
    key_serde: Serde[Any]
    value_serde: Serde[Any]
    internal: bool = False  #: a repartition topic written by the previous stage
    #: event time (ms) of a record from its deserialized value (None: the Kafka timestamp)
    timestamp: Callable[[Any], int] | None = None
    #: how the watermark follows the records (None: no out-of-orderness, never idle)
    watermarks: Watermarks | None = None


@dataclass(frozen=True, slots=True)
class SinkSpec:
    topic: str
    key_serde: Serde[Any]
    value_serde: Serde[Any]


@dataclass(frozen=True, slots=True)
class RepartitionSpec:
    """``key_by``: compute the new key from the value and hop to the next stage."""

    topic: str
    key_fn: Callable[[Any], Any]
    key_serde: Serde[Any]
    value_serde: Serde[Any]
    partitions: int | None  #: None: same count as the stage's source


@dataclass(slots=True)
class Stage:
    index: int
    name: str
    source: SourceSpec
    steps: list[Step] = field(default_factory=list)
    output: SinkSpec | RepartitionSpec | None = None

    def process_steps(self) -> list[ProcessStep]:
        return [s for s in self.steps if isinstance(s, ProcessStep)]


class Stream:
    """A chain of transformations inside one stage; ``key_by`` starts a new stage."""

    def __init__(self, job: Job, stage: Stage) -> None:
        self._job = job
        self._stage = stage

    def _add(self, step: Step) -> Stream:
        if self._stage.output is not None:
            raise JobDefinitionError(
                f"{self._stage.name} of job {self._job.name!r} already ends in "
                f"{type(self._stage.output).__name__}; add steps before it"
            )
        self._stage.steps.append(step)
        return self

    def map(self, fn: Callable[[Any], Any]) -> Stream:
        """Replace each value by ``fn(value)``; the key is kept."""
        return self._add(MapStep(fn))

    def flat_map(self, fn: Callable[[Any], Iterable[Any]]) -> Stream:
        """Replace each value by zero or more values ``fn(value)``; the key is kept."""
        return self._add(FlatMapStep(fn))

    def filter(self, fn: Callable[[Any], bool]) -> Stream:
        """Keep the values for which ``fn(value)`` is true."""
        return self._add(FilterStep(fn))

    def process(self, operator: Operator, name: str | None = None) -> Stream:
        """Run a user operator. ``name`` is its stable id (state namespace, changelog topic).

        Without a name, a stateful operator is called after its class (``WordStats`` ->
        ``wordstats``), see :meth:`Job.stable_id`.
        """
        if not isinstance(operator, Operator):
            raise JobDefinitionError(
                f"process() takes an Operator instance, got {type(operator).__name__}"
            )
        return self._process(operator, name, type(operator).__name__, "process(..., name=...)")

    def _process(self, operator: Operator, name: str | None, kind: str, how: str) -> Stream:
        from headrace.operators.state import declared_state

        op_id = name or operator.operator_id
        if op_id:
            op_id = self._job._claim_id(op_id)
        elif declared_state(type(operator)):
            op_id = self._job.stable_id(kind, how)
        else:
            op_id = self._job._claim_id(self._job._auto_id(kind))
        return self._add(ProcessStep(op_id, operator))

    # Built-in keyed aggregations: thin operators over the same state handles users get.
    def count(self, name: str | None = None) -> Stream:
        """Per key, count the records and emit the running count."""
        from headrace.operators.builtins import Count

        return self._process(Count(), name, "count", "count(name=...)")

    def sum(
        self,
        fn: Callable[[Any], Any] | None = None,
        *,
        serde: Serde[Any] = JSON,
        name: str | None = None,
    ) -> Stream:
        """Per key, sum ``fn(value)`` (default: the value) and emit the running sum."""
        from headrace.operators.builtins import fold_operator

        get = fn or _identity
        op = fold_operator("Sum", lambda acc, v: acc + get(v), serde, initial=0)
        return self._process(op, name, "sum", "sum(name=...)")

    def reduce(
        self, fn: Callable[[Any, Any], Any], *, serde: Serde[Any] = JSON, name: str | None = None
    ) -> Stream:
        """Per key, fold values with ``fn(acc, value)`` and emit the running result."""
        from headrace.operators.builtins import fold_operator

        op = fold_operator("Reduce", fn, serde)
        return self._process(op, name, "reduce", "reduce(name=...)")

    def aggregate(
        self, function: Any, *, serde: Serde[Any] = JSON, name: str | None = None
    ) -> Stream:
        """Per key, aggregate with an ``AggregateFunction`` and emit its result."""
        from headrace.operators.builtins import aggregate_operator

        op = aggregate_operator(function, serde)
        return self._process(op, name, "aggregate", "aggregate(name=...)")

    def window(
        self,
        windows: Any,
        *,
        allowed_lateness: float = 0.0,
        emit: str = "final",
        late_topic: str | None = None,
    ) -> Any:
        """Group the keyed stream into event-time windows (``Tumbling``, ``Hopping``,
        ``Session``); follow with ``count``/``sum``/``reduce``/``aggregate``.

        A window ``[start, end)`` closes when the watermark reaches ``end + allowed_lateness``
        (seconds): its state is deleted then. ``emit="final"`` emits one result per window when
        it closes; ``emit="update"`` emits the running result on every record. A record that
        only falls into closed windows is *late*: it is counted and, with ``late_topic``,
        written there as it arrived with headers naming the windows and the watermark; without
        one it is counted as skipped and logged, never silently dropped.
        """
        from headrace.operators.windows import WindowedStream

        if late_topic is not None:
            _check_topic(late_topic)
        return WindowedStream(self, windows, allowed_lateness, emit, late_topic)

    def key_by(
        self,
        fn: Callable[[Any], Any],
        *,
        key_serde: Serde[Any] = JSON,
        value_serde: Serde[Any] = JSON,
        partitions: int | None = None,
    ) -> Stream:
        """Re-key by ``fn(value)`` and repartition: ends this stage, starts the next one.

        The values cross an internal topic, so ``value_serde`` must be able to encode them.
        """
        next_index = self._stage.index + 1
        next_name = f"stage{next_index}"
        topic = f"{self._job.name}.{next_name}.repartition"
        self._stage.output = RepartitionSpec(topic, fn, key_serde, value_serde, partitions)
        stage = Stage(
            next_index, next_name, SourceSpec((topic,), key_serde, value_serde, internal=True)
        )
        self._job.stages.append(stage)
        return Stream(self._job, stage)

    def sink(
        self, topic: str, *, key_serde: Serde[Any] = JSON, value_serde: Serde[Any] = JSON
    ) -> None:
        """Write ``(key, value)`` to ``topic`` (the job's output; not created by headrace)."""
        _check_topic(topic)
        if self._stage.output is not None:
            raise JobDefinitionError(f"{self._stage.name} already has an output")
        self._stage.output = SinkSpec(topic, key_serde, value_serde)


class Job:
    """A named dataflow. Its name prefixes every topic and consumer group it owns."""

    def __init__(self, name: str, *, error_policy: ErrorPolicy | str = ErrorPolicy.FAIL) -> None:
        _check_topic(name)
        self.name = name
        self.error_policy = ErrorPolicy(error_policy)
        self.stages: list[Stage] = []
        self._ids: set[str] = set()
        self._auto_counter = 0

    def source(
        self,
        *topics: str,
        key_serde: Serde[Any] = BYTES,
        value_serde: Serde[Any] = BYTES,
        timestamp: Callable[[Any], int] | None = None,
        watermarks: Watermarks | None = None,
    ) -> Stream:
        """Read one topic, or several co-partitioned topics (same partition count).

        Partition ``p`` of every topic goes to the same task, so state keyed by the record key
        sees all topics' records of that key.

        Event time: ``timestamp`` returns a record's event time in milliseconds from its value
        (default: the Kafka record timestamp); ``watermarks`` says how far out of order records
        may arrive and when a quiet partition stops holding the watermark back.
        """
        if self.stages:
            raise JobDefinitionError("a job has one source; use key_by to add stages")
        if not topics:
            raise JobDefinitionError("source() needs at least one topic")
        for t in topics:
            _check_topic(t)
        if timestamp is not None and not callable(timestamp):
            raise JobDefinitionError("timestamp= takes a function of the value returning ms")
        spec = SourceSpec(
            tuple(topics), key_serde, value_serde, timestamp=timestamp, watermarks=watermarks
        )
        stage = Stage(0, "stage0", spec)
        self.stages.append(stage)
        return Stream(self, stage)

    # -- derived names -----------------------------------------------------------------------
    def group_id(self, stage: Stage) -> str:
        return f"{self.name}.{stage.name}"

    def changelog_topic(self, operator_id: str) -> str:
        return f"{self.name}.{operator_id}.changelog"

    def cuts_topic(self, stage: Stage) -> str:
        """Checkpoint documents of a stage behind a ``key_by`` too long for offset metadata."""
        return f"{self.name}.{stage.name}.cuts"

    @property
    def checkpoint_topic(self) -> str:
        return f"{self.name}.checkpoints"

    @property
    def dead_letter_topic(self) -> str:
        return f"{self.name}.dlq"

    def transactional_id(self, stage: Stage, partition: int) -> str:
        return f"{self.name}.{stage.name}.{partition}"

    def output_topics(self) -> list[str]:
        """Topics the job writes to that it does not own: sinks and late-data side outputs
        (they must exist before the job starts)."""
        topics = [s.output.topic for s in self.stages if isinstance(s.output, SinkSpec)]
        for stage in self.stages:
            for step in stage.process_steps():
                side = getattr(step.prototype, "late_topic", None)
                if isinstance(side, str) and side not in topics:
                    topics.append(side)
        return topics

    @property
    def event_time(self) -> bool:
        """Whether the job tracks watermarks: its source extracts event time or configures
        watermarks, or an operator has timers. Jobs that do not pay nothing for it."""
        source = self.stages[0].source if self.stages else None
        if source is not None and (source.timestamp is not None or source.watermarks):
            return True
        return any(
            type(step.prototype).on_timer is not Operator.on_timer
            for stage in self.stages
            for step in stage.process_steps()
        )

    @property
    def watermarks(self) -> Watermarks:
        source = self.stages[0].source if self.stages else None
        return (source.watermarks if source else None) or Watermarks()

    def stateful_operators(self) -> list[tuple[Stage, ProcessStep]]:
        from headrace.operators.state import declared_state

        return [
            (stage, step)
            for stage in self.stages
            for step in stage.process_steps()
            if declared_state(type(step.prototype))
        ]

    def find_operator(self, operator_id: str) -> tuple[Stage, ProcessStep]:
        for stage in self.stages:
            for step in stage.process_steps():
                if step.operator_id == operator_id:
                    return stage, step
        known = ", ".join(s.operator_id for st in self.stages for s in st.process_steps())
        raise JobDefinitionError(
            f"job {self.name!r} has no operator {operator_id!r} (operators: {known or 'none'})"
        )

    def validate(self) -> None:
        """Check the description is complete; called by the runtime before any I/O."""
        if not self.stages:
            raise JobDefinitionError(f"job {self.name!r} has no source")

    # -- ids ---------------------------------------------------------------------------------
    def stable_id(self, kind: str, how: str) -> str:
        """The id of an unnamed stateful operator: its kind (``count``, ``sum``, the class name
        of a user operator), lower-cased.

        The id names the operator's state (its namespace and changelog topic), so it must not
        depend on anything but the operator itself. It used to come from a job-wide counter
        (``count-1``, ``count-2``): adding an unnamed operator upstream renamed every later one
        and moved state between operators silently. Now a second unnamed stateful operator of
        the same kind is refused when the job is built, and the user names one of them.
        """
        op_id = kind.lower()
        if op_id in self._ids:
            raise JobDefinitionError(
                f"job {self.name!r} has two stateful operators that would both be called "
                f"{op_id!r}: an unnamed stateful operator is named after its kind, and its "
                f"state lives under that name. Give this one its own name with {how}; keep "
                f"the name of the one that already runs, or its state starts from zero"
            )
        return self._claim_id(op_id)

    def _auto_id(self, kind: str) -> str:
        """Ids of stateless operators (no state hangs on them, so a counter is harmless)."""
        self._auto_counter += 1
        return f"{kind.lower()}-{self._auto_counter}"

    def _claim_id(self, op_id: str) -> str:
        _check_topic(op_id)
        if op_id in self._ids:
            raise JobDefinitionError(f"operator id {op_id!r} is used twice in job {self.name!r}")
        self._ids.add(op_id)
        return op_id


def _identity(value: Any) -> Any:
    return value


def _check_topic(name: str) -> None:
    if not _TOPIC_CHARS.match(name) or len(name) > 200:
        raise JobDefinitionError(
            f"{name!r} is not usable in a Kafka topic name (use letters, digits, '.', '_', '-')"
        )
