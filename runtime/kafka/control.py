"""Requests to a running job's workers, through ``<job>.control``: the drain of a savepoint.

Workers may run on many machines, so ``headrace savepoint create --stop`` cannot signal them;
it writes a *drain* request to the job's compacted control topic, which every worker polls
about once a second (:class:`ControlWatcher`). On it a worker stops reading the job's input
(its source stage pauses; the source tasks still checkpoint on the clock, so barriers keep
flowing), lets every later stage consume what is in flight, and stops as SIGTERM would (a
final checkpoint per task) once nothing is left: no data records behind any task's position
and no records held by an alignment. When every group of the job is empty, the command takes
the savepoint from the stopped, drained job and deletes the request (a tombstone), so a job
started later is not drained again. A request older than :data:`MAX_AGE_S` is ignored (a
command that died before deleting it).

Without ``stop`` (a savepoint of a job that keeps running) the workers only pause the input
and go on checkpointing; the command waits for a complete checkpoint cut after the pause and
for the stages behind a ``key_by`` to have consumed everything, takes the savepoint from the
committed state (which no longer changes), and deletes the request: the workers resume.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from headrace.operators.job import Job
from headrace.runtime.config import Settings
from headrace.runtime.kafka import clients

__all__ = ["MAX_AGE_S", "ControlWatcher", "clear_drain", "control_topic", "request_drain"]

DRAIN = b"drain"
#: a drain request older than this is stale
MAX_AGE_S = 900


def control_topic(job: Job) -> str:
    return f"{job.name}.control"


async def _write(settings: Settings, job: Job, value: bytes | None) -> None:
    producer = clients.producer(settings, client_id="headrace-control")
    await producer.start()
    try:
        await producer.send_and_wait(control_topic(job), value, key=DRAIN, partition=0)
    finally:
        await producer.stop()


async def request_drain(settings: Settings, job: Job, *, stop: bool = True) -> float:
    """Ask the workers to pause the job's input and, with ``stop``, to stop once drained;
    returns the request's time (seconds)."""
    at = time.time()
    doc = {"id": uuid.uuid4().hex[:12], "at": at, "stop": stop}
    await _write(settings, job, orjson.dumps(doc))
    return at


async def clear_drain(settings: Settings, job: Job) -> None:
    await _write(settings, job, None)


class ControlWatcher:
    """A worker's view of the control topic: the drain request in force, if any."""

    def __init__(self, settings: Settings, job: Job) -> None:
        self.tp = TopicPartition(control_topic(job), 0)
        self.consumer: AIOKafkaConsumer = clients.reader(
            settings, client_id=f"{settings.client_id}-control", committed_only=False
        )
        self.latest: dict[str, Any] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        self.consumer.assign([self.tp])
        await self.consumer.seek_to_beginning(self.tp)

    async def stop(self) -> None:
        await clients.stop_consumer(self.consumer)

    async def drain_request(self) -> dict[str, Any] | None:
        """Read what arrived; the drain request in force (``stop``: stop once drained, else
        only pause until it is deleted), or None."""
        batches = await self.consumer.getmany(self.tp, timeout_ms=200)
        for record in batches.get(self.tp, []):
            if record.key == DRAIN:
                self.latest = orjson.loads(record.value) if record.value else None
        latest = self.latest
        if latest is None or time.time() - float(latest["at"]) >= MAX_AGE_S:
            return None
        return latest
