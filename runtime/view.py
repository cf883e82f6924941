"""What operations see of a worker: a small read-only view the worker implements.

The metrics collector, the ops HTTP server and the status publisher read a worker only through
:class:`WorkerView`. They never walk the worker's stage runners or their private dicts, and
they do not import the worker: the worker sits above them (ARCHITECTURE.md section 2) and hands
itself over as a view. Snapshots are taken on the worker's event loop, the thread that changes
what they copy, so no locking is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from headrace.operators.job import Job
from headrace.runtime.config import Settings
from headrace.runtime.task import TaskCounters


@dataclass(frozen=True, slots=True)
class RestoreProgress:
    """One changelog partition of a restore under way."""

    partition: int
    changelog: str
    restored: int
    total: int


@dataclass(frozen=True, slots=True)
class StageSnapshot:
    """The tasks of one stage on this worker, by state."""

    name: str
    #: partition -> counters of each running task
    running: dict[int, TaskCounters] = field(default_factory=dict)
    restoring: list[int] = field(default_factory=list)
    suspended: list[int] = field(default_factory=list)
    restores: list[RestoreProgress] = field(default_factory=list)
    #: this worker's member id in the stage's consumer group (None before it joined)
    member_id: str | None = None


#: (stage, topic, partition) of a running task's input
LagKey = tuple[str, str, int]
#: records between a running task's position and the input's end
InputLag = dict[LagKey, int]


class WorkerView(Protocol):
    """The worker as operations see it."""

    job: Job
    worker_id: str
    settings: Settings
    #: the error the worker failed with (None while it runs or after a clean stop)
    failure: BaseException | None
    #: where /metrics, /health and /ready are served (None: not served)
    ops_port: int | None

    @property
    def stopping(self) -> bool: ...

    def ready(self) -> bool:
        """Every stage is a group member and every assigned task is restored (readiness)."""
        ...

    def not_ready_reason(self) -> str:
        """Why :meth:`ready` is False, for /ready ("" when it is True)."""
        ...

    def broker_connected(self) -> bool:
        """False while the broker cannot be reached (headrace.runtime.kafka.health)."""
        ...

    def broker_problem(self) -> str:
        """What is wrong with the broker connection, for /health and /ready ("" if nothing)."""
        ...

    def stage_snapshots(self) -> list[StageSnapshot]: ...

    async def input_lag(self) -> InputLag:
        """Lag of every running task's inputs, from the consumers' last fetch responses."""
        ...
