"""Page views per user per 10 seconds of event time, with late data kept aside.

``views`` is keyed by user; each value is ``{"page": ..., "ts": <event time in ms>}``. The job
counts views per user in 10-second tumbling windows of *event time* and emits one final result
per window when it closes: once the watermark (the highest event time seen minus 2 s of allowed
out-of-orderness) passes the window's end plus 2 s of allowed lateness. A view that arrives after
its window closed is *late*: it goes to ``views-late`` as it came, with headers naming the window
and the watermark. When the input goes quiet for 3 s the watermark follows the wall clock, so
the last windows close without waiting for more input. With ``WINDOWS_KIND=session`` the job
counts sessions instead (views of a user less than 5 s apart); with ``WINDOWS_KIND=inactivity``
it uses a processing-time timer: a user's views are emitted once the user has been quiet for 3 s
of wall-clock time (:class:`Inactivity`).

    headrace run "examples.windows:job()"

Topic names come from WINDOWS_JOB / WINDOWS_SOURCE / WINDOWS_SINK / WINDOWS_LATE so the tests
can run it on fresh topics.
"""

from __future__ import annotations

import os
from typing import Any

from headrace.operators.job import Job
from headrace.operators.operator import Context, Operator
from headrace.operators.record import Record
from headrace.operators.serde import JSON, STR
from headrace.operators.state import ValueStateDescriptor
from headrace.operators.time import Watermarks
from headrace.operators.windows import Session, Tumbling

WINDOW_S = 10.0
OUT_OF_ORDERNESS_S = 2.0
LATENESS_S = 2.0
IDLE_S = 3.0
SESSION_GAP_S = 5.0


QUIET_MS = 3_000


class Inactivity(Operator):
    """Counts a user's views and emits the count once the user was quiet for ``QUIET_MS`` of
    wall-clock time: a processing-time timer, moved on every view."""

    views = ValueStateDescriptor[int](type=int, default=0)
    due = ValueStateDescriptor[int](type=int)

    def process(self, record: Record[Any, Any], ctx: Context) -> None:
        previous = self.due.value()
        if previous is not None:
            ctx.timers.delete_processing_time(previous)
        due = ctx.processing_time() + QUIET_MS
        ctx.timers.register_processing_time(due)
        self.due.update(due)
        self.views.update(self.views.value() + 1)

    def on_timer(self, key: Any, timestamp: int, ctx: Context) -> None:
        ctx.emit({"start": 0, "end": timestamp, "value": self.views.value()})
        self.views.clear()
        self.due.clear()


def event_time(view: dict[str, Any]) -> int:
    return int(view["ts"])


def build(
    name: str = "views-per-window",
    source: str = "views",
    sink: str = "views-per-window",
    late: str = "views-late",
    kind: str = "tumbling",
) -> Job:
    job = Job(name)
    if kind == "inactivity":
        (
            job.source(source, key_serde=STR, value_serde=JSON)
            .process(Inactivity(), name="inactivity")
            .sink(sink, key_serde=STR, value_serde=JSON)
        )
        return job
    windows = Session(SESSION_GAP_S) if kind == "session" else Tumbling(WINDOW_S)
    (
        job.source(
            source,
            key_serde=STR,
            value_serde=JSON,
            timestamp=event_time,
            watermarks=Watermarks(
                out_of_orderness=OUT_OF_ORDERNESS_S, idle_timeout=IDLE_S, advance_when_idle=True
            ),
        )
        .window(windows, allowed_lateness=LATENESS_S, late_topic=late)
        .count(name="views")
        .sink(sink, key_serde=STR, value_serde=JSON)
    )
    return job


def job() -> Job:
    """Factory: ``headrace run "examples.windows:job()"``."""
    return build(
        os.environ.get("WINDOWS_JOB", "views-per-window"),
        os.environ.get("WINDOWS_SOURCE", "views"),
        os.environ.get("WINDOWS_SINK", "views-per-window"),
        os.environ.get("WINDOWS_LATE", "views-late"),
        os.environ.get("WINDOWS_KIND", "tumbling"),
    )
