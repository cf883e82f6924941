"""The checkpoint log ``<job>.checkpoints``: one acknowledgement per task per checkpoint.

After committing checkpoint ``n`` a task appends an ack (under exactly-once inside the same
transaction, so only committed checkpoints are ever acknowledged). A task with nothing to commit
(no input, output or state change since its last checkpoint) skips the commit and its ack
(ARCHITECTURE.md 5.8): its committed state at its last ack *is* its state at the checkpoints it
skipped. So checkpoint ``n`` of the job is **complete** when every task of every stage has
acknowledged ``n`` or a later checkpoint: every task's committed state then includes everything
before barrier ``n`` (a task passes barriers in order, and the ids come from the clock). While
part of a job is idle, few checkpoints are acknowledged by every task themselves; the one
checkpoint that all of them acknowledged is what a consistent cut of the whole job needs
(``tests/integration/test_consistent_cut.py`` picks those), and while a savepoint drains the job
every task acknowledges every checkpoint again.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

import orjson


@dataclass(frozen=True, slots=True)
class CheckpointAck:
    job: str
    stage: str
    partition: int
    checkpoint_id: int
    offsets: dict[str, int]  #: "topic/partition" -> committed offset
    changelog_offsets: dict[str, int | None] = field(default_factory=dict)
    aligned: bool = True
    final: bool = False
    worker: str = ""
    timestamp_ms: int = 0
    duration_ms: float = 0.0
    alignment_ms: float = 0.0
    changed_keys: int = 0

    @property
    def task(self) -> str:
        return f"{self.stage}/{self.partition}"

    def encode(self) -> tuple[bytes, bytes]:
        return self.task.encode(), orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, value: bytes) -> CheckpointAck:
        return cls(**orjson.loads(value))


@dataclass(slots=True)
class CheckpointSummary:
    checkpoint_id: int
    #: the tasks that acknowledged this checkpoint
    acked: set[str]
    expected: set[str]
    #: every ack of this checkpoint was aligned
    aligned: bool
    max_duration_ms: float
    #: the tasks that acknowledged this checkpoint or a later one (None: just ``acked``)
    covered: set[str] | None = None

    @property
    def complete(self) -> bool:
        """Every task's committed state includes the input before this barrier (the module
        doc: a task that skipped its ack was idle, or acknowledged a later checkpoint)."""
        return self.expected <= (self.acked if self.covered is None else self.covered)


def summarize(acks: list[CheckpointAck], expected_tasks: set[str]) -> list[CheckpointSummary]:
    """Group acks per checkpoint id, newest first; ``final`` acks (revocations) are listed too."""
    by_id: dict[int, list[CheckpointAck]] = defaultdict(list)
    for a in acks:
        by_id[a.checkpoint_id].append(a)
    out = []
    covered: set[str] = set()
    for cp in sorted(by_id, reverse=True):
        group = by_id[cp]
        acked = {a.task for a in group}
        covered |= acked
        out.append(
            CheckpointSummary(
                cp,
                acked,
                expected_tasks,
                all(a.aligned for a in group),
                max(a.duration_ms for a in group),
                set(covered),
            )
        )
    return out
