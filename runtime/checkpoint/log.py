"""The checkpoint log ``<job>.checkpoints``: one acknowledgement per task per checkpoint.

After committing checkpoint ``n`` a task appends an ack (under exactly-once inside the same
transaction, so only committed checkpoints are ever acknowledged). Checkpoint ``n`` of the job is
complete when every task of every stage has acknowledged it; since barrier ids come from the
clock, a complete checkpoint is a consistent cut of the whole job. A task with nothing to commit
(no input, output or state change since its last checkpoint) skips the commit and its ack
(ARCHITECTURE.md 5.8): while part of a job is idle its checkpoints are not complete, and while
a savepoint drains the job every task acknowledges every checkpoint again.
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
    acked: set[str]
    expected: set[str]
    aligned: bool
    max_duration_ms: float

    @property
    def complete(self) -> bool:
        return self.expected <= self.acked


def summarize(acks: list[CheckpointAck], expected_tasks: set[str]) -> list[CheckpointSummary]:
    """Group acks per checkpoint id, newest first; ``final`` acks (revocations) are listed too."""
    by_id: dict[int, list[CheckpointAck]] = defaultdict(list)
    for a in acks:
        by_id[a.checkpoint_id].append(a)
    out = []
    for cp in sorted(by_id, reverse=True):
        group = by_id[cp]
        out.append(
            CheckpointSummary(
                cp,
                {a.task for a in group},
                expected_tasks,
                all(a.aligned for a in group),
                max(a.duration_ms for a in group),
            )
        )
    return out
