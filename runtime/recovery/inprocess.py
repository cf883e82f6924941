"""A worker run inside the test's own event loop, until what it wrote satisfies a check.

Integration tests of behaviour (not of crashes) do not need a process per worker: the same
:class:`~headrace.runtime.worker.Worker` runs here as a task, and ``stop()`` is what SIGTERM
does (a final checkpoint per task, the groups left)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from headrace.operators.job import Job
from headrace.runtime.config import Settings
from headrace.runtime.worker import Worker

__all__ = ["run_worker_until"]


async def run_worker_until(
    job: Job,
    settings: Settings,
    done: Callable[[], Awaitable[bool]],
    *,
    timeout_s: float = 120,
    settle_s: float = 0.0,
) -> None:
    """Run a worker for ``job`` until ``await done()`` is true (polled twice a second), wait
    ``settle_s`` more (a few checkpoints), then stop it as SIGTERM would. Raises what the
    worker failed with if it stopped by itself, and AssertionError after ``timeout_s``."""
    worker = Worker(job, settings)
    running = asyncio.create_task(worker.run())
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            await asyncio.sleep(0.5)
            if running.done():
                running.result()  # raises what stopped it
                raise AssertionError(f"the worker of job {job.name!r} stopped by itself")
            if await done():
                break
            if loop.time() > deadline:
                raise AssertionError(f"job {job.name!r}: not done within {timeout_s:.0f} s")
        await asyncio.sleep(settle_s)
    finally:
        worker.stop()
        await running
