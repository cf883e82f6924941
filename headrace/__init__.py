"""headrace: stateful stream processing for Python on Apache Kafka.

This module is the public API. Everything a job author needs is importable from here::

    from headrace import Job, Operator, ValueStateDescriptor, STR, INT, JobTester

What is not listed in ``__all__`` is internal: ``headrace.runtime`` and ``headrace.operators``
hold the implementation, and their module layout may change between releases.

The source tree keeps ``operators/`` (WHAT a job is: no I/O) and ``runtime/`` (HOW it runs) as
top-level folders; ``headrace/operators`` and ``headrace/runtime`` are links to them, so the
checkout, editable installs, mypy and the wheel all see one import namespace, ``headrace``, and
nothing headrace installs occupies a generic top-level name such as ``operators``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from headrace.operators.job import ErrorPolicy, Job, JobDefinitionError, Stream
from headrace.operators.operator import SAME_KEY, Context, Operator
from headrace.operators.record import Record
from headrace.operators.serde import (
    BYTES,
    FLOAT,
    INT,
    JSON,
    MSGPACK,
    STR,
    Serde,
    SerdeError,
    pickle_serde,
    serde_for,
)
from headrace.operators.state import (
    AggregateFunction,
    AggregatingState,
    AggregatingStateDescriptor,
    KeyedState,
    KeyedStateDescriptor,
    ListState,
    ListStateDescriptor,
    MapState,
    MapStateDescriptor,
    ReducingState,
    ReducingStateDescriptor,
    StateDescriptor,
    StateNotBoundError,
    ValueState,
    ValueStateDescriptor,
)
from headrace.operators.time import MIN_WATERMARK, TimerService, Watermarks
from headrace.operators.windows import Hopping, Session, Sliding, Tumbling

if TYPE_CHECKING:
    from headrace.runtime.testing import JobTester

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # JobTester pulls in the whole runtime (aiokafka, rocksdict); import it only when asked so
    # that `import headrace` for a job definition stays cheap.
    if name == "JobTester":
        from headrace.runtime.testing import JobTester

        return JobTester
    raise AttributeError(f"module 'headrace' has no attribute {name!r}")


__all__ = [
    "BYTES",
    "FLOAT",
    "INT",
    "JSON",
    "MIN_WATERMARK",
    "MSGPACK",
    "SAME_KEY",
    "STR",
    "AggregateFunction",
    "AggregatingState",
    "AggregatingStateDescriptor",
    "Context",
    "ErrorPolicy",
    "Hopping",
    "Job",
    "JobDefinitionError",
    "JobTester",
    "KeyedState",
    "KeyedStateDescriptor",
    "ListState",
    "ListStateDescriptor",
    "MapState",
    "MapStateDescriptor",
    "Operator",
    "Record",
    "ReducingState",
    "ReducingStateDescriptor",
    "Serde",
    "SerdeError",
    "Session",
    "Sliding",
    "StateDescriptor",
    "StateNotBoundError",
    "Stream",
    "TimerService",
    "Tumbling",
    "ValueState",
    "ValueStateDescriptor",
    "Watermarks",
    "pickle_serde",
    "serde_for",
]
