"""headrace under the benchmark (project venv). Runs until SIGTERM (final checkpoint, exit 0).

``--mode keyed`` (S1/S2/S4): one stage, source keyed by word -> count -> sink; no key_by.
``--mode lines`` (issue 4, S5): the examples.wordcount job shape (flat_map split, key_by, count).
``--mode user`` (S6): a user operator with a ValueState (the user's record count) and a MapState
(category -> count), keyed by user; emits ``("<user>:<category>", count)`` per record.
``--mode window`` (S7): count per key per 10 s tumbling window of the record timestamp (2 s
out-of-orderness, no lateness), one final result per window, re-keyed to
``"<key>@<window start>"`` with an int64 count like the other systems.
``--restore-only``: join the group, restore, print ``RESTORED <seconds>`` once ready, exit.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

from examples.wordcount import build as build_wordcount
from headrace.operators.job import Job
from headrace.operators.operator import Context, Operator
from headrace.operators.record import Record
from headrace.operators.serde import BYTES, INT, STR
from headrace.operators.state import MapStateDescriptor, ValueStateDescriptor
from headrace.operators.time import Watermarks
from headrace.operators.windows import Tumbling
from headrace.runtime.config import Guarantee, Settings
from headrace.runtime.worker import Worker


def keyed_job(name: str, source: str, sink: str) -> Job:
    job = Job(name)
    (
        job.source(source, key_serde=STR, value_serde=BYTES)
        .count(name="counts")
        .sink(sink, key_serde=STR, value_serde=INT)
    )
    return job


class UserStats(Operator):
    """S6: per user, the record count and the count per category (the text before ``|``)."""

    total = ValueStateDescriptor[int](type=int, default=0)
    per_category = MapStateDescriptor[str, int](key_type=str, type=int)

    def process(self, record: Record[Any, Any], ctx: Context) -> None:
        category = record.value.split(b"|", 1)[0].decode()
        self.total.update(self.total.value() + 1)
        n = (self.per_category.get(category) or 0) + 1
        self.per_category.put(category, n)
        ctx.emit(n, key=f"{record.key}:{category}")


def user_job(name: str, source: str, sink: str) -> Job:
    job = Job(name)
    (
        job.source(source, key_serde=STR, value_serde=BYTES)
        .process(UserStats(), name="user-stats")
        .sink(sink, key_serde=STR, value_serde=INT)
    )
    return job


class WindowKey(Operator):
    """S7: a window result ``{"start", "end", "value"}`` as ``("<key>@<start>", count)``."""

    def process(self, record: Record[Any, Any], ctx: Context) -> None:
        result = record.value
        ctx.emit(result["value"], key=f"{record.key}@{result['start']}")


def window_job(name: str, source: str, sink: str) -> Job:
    job = Job(name)
    (
        job.source(source, key_serde=STR, value_serde=BYTES, watermarks=Watermarks(2.0))
        .window(Tumbling(10.0))
        .count(name="per-window")
        .process(WindowKey())
        .sink(sink, key_serde=STR, value_serde=INT)
    )
    return job


class _RestoreTimes(logging.Handler):
    pattern = re.compile(r"restored task\(s\) .* in ([0-9.]+)s")

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = self.pattern.search(record.getMessage())
        if m:
            self.seconds.append(float(m.group(1)))


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--mode", choices=["keyed", "lines", "user", "window"], default="keyed")
    ap.add_argument("--guarantee", default="at_least_once")
    ap.add_argument("--backend", default="memory")
    ap.add_argument("--state-dir", default=".headrace/bench-state")
    ap.add_argument("--interval-ms", type=int, default=1000)
    ap.add_argument("--hop-format", type=int, default=2)  # runtime/kafka/hopformat.py
    ap.add_argument("--restore-only", action="store_true")
    a = ap.parse_args()
    times = _RestoreTimes()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("headrace.runtime.worker").setLevel(logging.INFO)
    logging.getLogger("headrace.runtime.worker").addHandler(times)
    if a.mode == "keyed":
        job = keyed_job(a.job, a.input, a.output)
    elif a.mode == "user":
        job = user_job(a.job, a.input, a.output)
    elif a.mode == "window":
        job = window_job(a.job, a.input, a.output)
    else:
        job = build_wordcount(a.job, a.input, a.output)
    settings = Settings(
        bootstrap_servers=a.bootstrap,
        processing_guarantee=Guarantee(a.guarantee),
        checkpoint_interval_ms=a.interval_ms,
        state_backend=a.backend,
        state_dir=Path(a.state_dir),
        hop_format=a.hop_format,
    )
    worker = Worker(job, settings)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, worker.stop)
    loop.add_signal_handler(signal.SIGINT, worker.stop)
    started = time.monotonic()
    run = asyncio.create_task(worker.run())
    if a.restore_only:
        while not (worker.ready() and all(r.tasks for r in worker.runners)):
            if run.done():
                break
            await asyncio.sleep(0.01)
        total = time.monotonic() - started
        print(f"RESTORED {max(times.seconds, default=float('nan'))} {total}", flush=True)
        worker.stop()
    await run


if __name__ == "__main__":
    asyncio.run(main())
