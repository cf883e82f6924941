"""Writer epochs: the changelog refuses a zombie's writes, by construction.

The problem
-----------
A worker that stops for longer than the consumer session timeout (a GC or swap pause, a frozen
VM, a stalled network) is expelled from its group while it still believes it owns its tasks.
Kafka gives the partitions to another member, which restores the state and goes on. When the
paused worker resumes it is a *zombie*: before it learns that it lost its membership it may
still send what it had buffered, or take a "final checkpoint" on revocation, and write stale
state to the changelog *after* the new owner's records. Under exactly-once the new owner's
``init_transactions`` fences the zombie's transactional producer, and ``read_committed`` hides
anything it wrote. Under at-least-once nothing fences an idempotent producer: the offsets
commit of the zombie fails (the group generation moved on), but its changelog records are in
the log, and the new owner's next checkpoint commits a changelog offset past them. Without more,
the next restore would apply them: a count of 26 restored as 6.

Two layers keep at-least-once exact
-----------------------------------
1. The *write lease* (:mod:`headrace.runtime.kafka.lease`): a worker writes nothing for a task
   (outputs, changelog records, offsets) unless its group member heard a successful heartbeat
   within the session timeout. A resumed zombie finds its lease expired, drops its tasks and
   their uncommitted work, and rejoins. This removes the zombie's writes in the common case,
   but a pause that falls between the lease check and the moment a produce request leaves the
   process still lets a batch through late. Hence:

2. *Writer epochs in the changelog* (this module). Every ownership of a task has an epoch that
   only grows. The new owner, after restoring, *claims* the task: it picks an epoch above every
   epoch it has seen in the changelog (and at least the group generation it joined with), and
   writes a claim record with it to each changelog partition of the task. Every changelog record
   it writes afterwards carries its epoch in the ``hr.epoch`` header. A restore reads a
   partition in offset order and skips every record whose epoch is *lower than an epoch already
   seen earlier in that partition*: Kafka keeps the order of a partition, so a zombie's write
   that lands after the new owner's claim is recognisable, wherever it lands later.

   Records that land *between* the end of the new owner's restore and its claim were read by
   nobody: the owner reads them right after writing its claim (a "catch-up" of usually zero
   records) and treats them like any at-least-once record past the committed checkpoint: not
   state, and their keys are rewritten with the committed values at the next checkpoint.

Why the epoch is allocated from the log and not taken from the group generation alone
----------------------------------------------------------------------------------------
A generation restarts at 1 when a group is deleted (``headrace reset``, or Kafka expiring an
empty group's offsets), while the changelog keeps the epochs of earlier owners; an epoch taken
only from the generation would then be *lower* than the existing records, and the new owner's
own writes would be skipped. ``max(generation, highest epoch seen + 1)`` only grows, and the
generation still separates two members that claim concurrently (a zombie that was restoring
when it paused, and the owner that replaced it).

Compaction
----------
The changelog is compacted: only the latest record per key survives. A zombie record that lands
after the owner's record for the same key would, once compacted, be the only record of that key,
and a restore would skip it and lose the key. So every owner that *sees* a zombie record
rewrites that key with its own value at its next checkpoint: a restore force-dirties the keys of
the records it skips, and a running task notices foreign records in its changelog partition
from the offsets its own writes are given (its writes must be contiguous; a gap is somebody
else's), reads them and does the same. Kafka never compacts the active segment, so the owner's
rewrite comes long before a compaction could remove its earlier record. What remains: an owner
that crashes after a zombie's write and before its next checkpoint, while the segment rolls and
the cleaner runs before any other worker restores the task (the README's "What does not hold").

Proof that a checkpoint committed
---------------------------------
The group's committed offsets are the only record of where a checkpoint ends, and Kafka deletes
them: ``kafka-consumer-groups --delete``, or the broker expiring the offsets of a group that
has been empty for ``offsets.retention.minutes`` (7 days by default: a job stopped over a long
holiday). A task that then finds no offset at all must not take its changelog for the leftovers
of a first checkpoint that never committed (which are not state, and which it would rewrite as
deleted). So every changelog record written by an ownership that knows a checkpoint of the task
committed (it restored from one, or committed one itself) also carries ``hr.committed``; an
ownership that started without a checkpoint writes its claim once more, with the header, in
the checkpoint after its first commit. A restore without committed offsets that meets the
header (:attr:`RestoreTarget.commit_proof`) stops instead of erasing the state.

Records without an ``hr.epoch`` header (exactly-once writes, and changelogs written before
epochs existed) carry no claim: they are neither skipped nor raise the epoch. Exactly-once
needs no epochs: transactions already fence, and its changelog writes stay header-free.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from headrace.runtime.state.keys import StatePartitionKey, encode_metadata_key
from headrace.runtime.state.store import CLAIM_NAME

EPOCH_HEADER = "hr.epoch"

_U64 = struct.Struct(">Q")

Headers = list[tuple[str, bytes]]


#: on the changelog records of an ownership that knows a checkpoint of its task committed
COMMITTED_HEADER = "hr.committed"


def epoch_headers(epoch: int, *, committed: bool = False) -> Headers:
    """The header list every changelog record of an owner with ``epoch`` carries (``committed``:
    the owner knows a checkpoint of the task committed). One list per task, shared by all its
    records (aiokafka's batch builder only reads it)."""
    if committed:
        return [(EPOCH_HEADER, _U64.pack(epoch)), (COMMITTED_HEADER, b"1")]
    return [(EPOCH_HEADER, _U64.pack(epoch))]


def proves_commit(headers: Sequence[tuple[str, bytes]] | None) -> bool:
    """Whether a changelog record was written after a checkpoint of its task committed."""
    if not headers:
        return False
    return any(name == COMMITTED_HEADER for name, _ in headers)


def epoch_of(headers: Sequence[tuple[str, bytes]] | None) -> int | None:
    """The writer epoch of a record, or None for a record that carries none."""
    if not headers:
        return None
    for name, value in headers:
        if name == EPOCH_HEADER:
            try:
                return int(_U64.unpack(value)[0])
            except (struct.error, TypeError):
                return None
    return None


def claim_record(partition_key: StatePartitionKey, epoch: int) -> tuple[bytes, bytes]:
    """The (key, value) of a claim: a metadata record of the store, so a restore keeps it."""
    return encode_metadata_key(partition_key, CLAIM_NAME), _U64.pack(epoch)


def decode_epoch(value: bytes) -> int:
    return int(_U64.unpack(value)[0])


def next_epoch(seen: int | None, generation: int | None) -> int:
    """The epoch of a new ownership: above everything seen, and at least the generation."""
    return max(generation or 0, (seen if seen is not None else 0) + 1)


class EpochFilter:
    """Decides, in offset order, which records of one changelog partition are a zombie's.

    ``highest`` is the highest epoch seen so far (``None``: none). :meth:`split` takes a
    fetched batch and returns the positions of the records to skip; the common case (one
    writer for the whole batch, not older than what came before) costs one ``list.count``.
    """

    __slots__ = ("highest",)

    def __init__(self, highest: int | None = None) -> None:
        self.highest = highest

    def split(self, headers: list[Any]) -> list[int]:
        """Positions of the records written by a fenced (older) owner; updates ``highest``."""
        first = headers[0]
        if headers.count(first) == len(headers):
            epoch = epoch_of(first)
            if epoch is None:
                return []
            if self.highest is None or epoch >= self.highest:
                self.highest = epoch
                return []
            return list(range(len(headers)))
        fenced: list[int] = []
        highest = self.highest
        for i, h in enumerate(headers):
            epoch = epoch_of(h)
            if epoch is None:
                continue
            if highest is None or epoch >= highest:
                highest = epoch
            else:
                fenced.append(i)
        self.highest = highest
        return fenced
