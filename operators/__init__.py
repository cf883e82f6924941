"""headrace operators: WHAT a job is.

The user's API: operators, their declared state, serdes and the job builder. Nothing in this
package performs I/O, touches Kafka or asyncio; :mod:`runtime` executes what is described here.

    from headrace.operators import Job, Operator, ValueStateDescriptor, STR, INT
"""

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
