"""A task: one stage instance for one input partition. No I/O.

* :mod:`.stage_task`: :class:`StageTask`, the task itself: open, feed, tick, prepare and
  complete checkpoints;
* :mod:`.chain`: the stage's chain compiled once per task into closures (the per-record path);
* :mod:`.fusion`: fast paths that change no behaviour (built-in aggregations as direct cache
  steps; the narrower serde functions live with the state format,
  :func:`headrace.runtime.state.encoding.fast_serde_function`);
* :mod:`.cut`: the input cut, as two strategies: clock barriers for a source stage, aligned
  in-band barriers for a stage fed by a repartition topic;
* :mod:`.errors`: the error policy (fail, skip, dead letter);
* :mod:`.records`: raw records, the operator context, counters, ``RecordError``.
"""

from __future__ import annotations

from headrace.runtime.state.encoding import fast_serde_function
from headrace.runtime.task.fusion import builtin_handle, builtin_step
from headrace.runtime.task.records import RawRecord, RecordError, TaskContext, TaskCounters
from headrace.runtime.task.stage_task import StageTask

__all__ = [
    "RawRecord",
    "RecordError",
    "StageTask",
    "TaskContext",
    "TaskCounters",
    "builtin_handle",
    "builtin_step",
    "fast_serde_function",
]
