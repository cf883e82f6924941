"""The checkpoint layer's own records: what a task hands to the committer, and what it gets back.

A task *prepares* a :class:`PendingCheckpoint` synchronously at its cut (between two records);
the :class:`~headrace.runtime.checkpoint.commit.Committer` makes it durable and returns a
:class:`CommitResult`; the caller (the task host) then lets the task apply the changes to its
local stores and reports the result to whoever observes commits (the worker's metrics). Nothing
in this layer knows the task or the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from headrace.runtime.kafka.producer import OutRecord


@dataclass(slots=True)
class PendingCheckpoint:
    """Everything checkpoint ``checkpoint_id`` of one task commits, captured synchronously.

    The snapshot is taken at the cut, between two records; the I/O (changelog writes, commit)
    happens afterwards while the task's later records wait in its output buffer.
    """

    checkpoint_id: int
    #: (topic, partition) -> offset to commit
    offsets: dict[tuple[str, int], int]
    skip: dict[int, int]
    aligned: bool
    final: bool
    #: operator id -> [(storage key, value bytes or None for a delete)]
    changes: dict[str, list[tuple[bytes, bytes | None]]]
    #: at-least-once: highest repartition sequence processed per slot (part of the cut)
    seen: dict[int, int]
    #: outputs produced before the cut (they belong to this checkpoint's transaction)
    outputs: list[OutRecord]
    #: barrier records for the partitions of the repartition output that need one
    barriers: list[OutRecord] = field(default_factory=list)
    alignment_seconds: float = 0.0
    #: the task's watermark at the cut (event-time jobs; None otherwise)
    watermark: int | None = None
    #: quiet upstream channels at the cut -> their watermark (checkpoint/alignment.py)
    quiet: dict[int, int | None] = field(default_factory=dict)
    #: downstream partitions whose barrier from this checkpoint was not quiet (None: the stage
    #: has no repartition output); recorded under exactly-once for the next owner
    loud: frozenset[int] | None = None
    #: nothing happened since the last committed checkpoint: same cut, no state change, no
    #: output, no barrier. The host may skip its commit (host.commit_checkpoint)
    idle: bool = False


@dataclass(frozen=True, slots=True)
class CommitResult:
    """What one committed checkpoint made durable (for the task, the metrics and the logs)."""

    stage: str
    partition: int
    checkpoint_id: int
    #: operator id -> offset of the last changelog record the task's state now includes
    changelog_offsets: dict[str, int | None]
    changed_keys: int
    changed_bytes: int
    #: outputs the commit itself sent (those produced before the cut)
    outputs: int
    aligned: bool
    final: bool
    alignment_seconds: float
    seconds: float
