"""Page views per user per 10 seconds of event time, with late data kept aside.

``views`` is keyed by user; each value is ``{"page": ..., "ts": <event time in ms>}``. The job
counts views per user in 10-second tumbling windows of *event time* and emits one final result
per window when it closes: once the watermark (the highest event time seen minus 2 s of allowed
out-of-orderness) passes the window's end plus 2 s of allowed lateness. A view that arrives after
its window closed is *late*: it goes to ``views-late`` as it came, with headers naming the window
and the watermark. When the input goes quiet for 3 s the watermark follows the wall clock, so
the last windows close without waiting for more input. With ``WINDOWS_KIND=session`` the job
counts sessions instead (views of a user less than 5 s apart).

    headrace run "examples.windows:job()"

Topic names come from WINDOWS_JOB / WINDOWS_SOURCE / WINDOWS_SINK / WINDOWS_LATE so the tests
can run it on fresh topics.
"""

from __future__ import annotations

import os
from typing import Any

from headrace.operators.job import Job
from headrace.operators.serde import JSON, STR
from headrace.operators.time import Watermarks
from headrace.operators.windows import Session, Tumbling

WINDOW_S = 10.0
OUT_OF_ORDERNESS_S = 2.0
LATENESS_S = 2.0
IDLE_S = 3.0
SESSION_GAP_S = 5.0


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
