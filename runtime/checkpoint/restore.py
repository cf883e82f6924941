"""Rebuilding task state from changelog partitions (ARCHITECTURE.md section 6).

All changelog partitions of the tasks being restored are read by one consumer at once, in
batches, and applied to the stores as write batches. Three rules decide what is applied:

* exactly-once: the consumer reads ``read_committed``, so aborted checkpoint writes are
  invisible; everything up to the last stable offset is applied.
* at-least-once: records past the committed checkpoint's changelog offset (``cl`` in the offset
  metadata) belong to a checkpoint whose offsets never committed. They are not applied; their
  keys are marked so the next checkpoint rewrites them with the committed values.
* a local RocksDB store records, atomically with its data, the changelog offset it includes; it
  is reused when that offset is not past what the committed checkpoint covers, and only the tail
  is replayed. Otherwise it is wiped and rebuilt.

* writer epochs (:mod:`headrace.runtime.checkpoint.fencing`): a record whose ``hr.epoch`` is
  lower than an epoch seen earlier in the partition was written by an owner that had already
  been replaced (a zombie). It is not applied, and its key is rewritten with the restored value
  at the next checkpoint, so that compaction can never leave the zombie's record as the last
  one of that key.

A record whose key is not in the task's namespace (corruption, or a topic shared by mistake)
stops the restore with an error naming topic, partition and offset: half a state is worse than
none.

Per record, :meth:`RestoreTarget.apply` runs no Python bytecode: every pass over a fetched
batch is a C loop (``map`` over ``attrgetter``, ``min``/``max``, ``list.extend``, then
:meth:`StateBackend.write_columns`: ``dict.update`` in the memory backend, a ``WriteBatch``
filled by ``map`` in RocksDB). The namespace check tests the state prefix on the smallest and
the largest key only (the keys with a prefix are one interval of the byte order); a batch that
fails it (the one holding the state metadata records, or a corrupt one) is sorted out record by
record. Offsets within one partition's batch increase (Kafka's order), so ``valid_until`` cuts a
batch in two with one comparison, or a bisection when the cut falls inside it.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from headrace.runtime.checkpoint.fencing import EpochFilter, proves_commit
from headrace.runtime.faults import maybe_crash
from headrace.runtime.state.keys import metadata_prefix, partition_prefix
from headrace.runtime.state.store import OperatorStateStore

log = logging.getLogger(__name__)

_KEY = attrgetter("key")
_VALUE = attrgetter("value")
_OFFSET = attrgetter("offset")
_HEADERS = attrgetter("headers")


class ChangelogCorruptError(RuntimeError):
    """A changelog record cannot belong to the state being restored."""

    def __init__(self, topic: str, partition: int, offset: int, why: str) -> None:
        self.topic, self.partition, self.offset = topic, partition, offset
        super().__init__(
            f"restore stopped: changelog record at topic {topic!r} partition {partition} "
            f"offset {offset} is not valid state: {why}"
        )


class StateWithoutCheckpointError(RuntimeError):
    """A changelog holds state but the committed offsets do not say which checkpoint it is."""

    def __init__(self, target: RestoreTarget, records: int) -> None:
        self.target, self.records = target, records
        super().__init__(
            f"{target.topic}[{target.partition}] holds {records} record(s) but the committed "
            f"offsets ({target.unverified}) carry no checkpoint"
        )


@dataclass(slots=True)
class RestoreTarget:
    """One operator's store of one task and where its changelog is."""

    store: OperatorStateStore
    topic: str
    partition: int
    #: at-least-once: last valid changelog offset of the committed checkpoint (-1: none);
    #: exactly-once: None (read_committed already hides what never committed)
    valid_until: int | None
    start: int | None = None  #: None: from the beginning
    end: int = 0
    applied: int = 0
    stale: set[bytes] = field(default_factory=set)
    #: keys of records written by a fenced (older) owner: skipped, rewritten at the next
    #: checkpoint (see :mod:`headrace.runtime.checkpoint.fencing`)
    fenced: set[bytes] = field(default_factory=set)
    fenced_count: int = 0
    #: the highest writer epoch seen in this partition so far
    epochs: EpochFilter = field(default_factory=EpochFilter)
    last_applied: int | None = None
    #: the task's committed input offsets carry no headrace checkpoint (named here): its
    #: changelog must hold nothing, or the restore stops before touching the store
    unverified: str | None = None
    #: the task has no committed input offset at all: look for proof that a checkpoint
    #: committed all the same (its offsets were deleted; see checkpoint/fencing.py)
    no_offsets: bool = False
    #: the changelog offset of the first such proof: under exactly-once any committed state
    #: record (a transaction commits changelog and offsets together); under at-least-once a
    #: record with the ``hr.committed`` header
    commit_proof: int | None = None
    # the write batch being gathered: parallel key/value lists, and its metadata records
    _keys: list[bytes] = field(default_factory=list)
    _values: list[bytes | None] = field(default_factory=list)
    _meta: list[tuple[bytes, bytes | None]] = field(default_factory=list)
    _prefixes: tuple[bytes, bytes] | None = None  # (state, metadata) of the store

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    def apply(self, records: Sequence[Any], batch_size: int) -> None:
        """Apply changelog records of this partition (anything with offset/key/value, in
        offset order as one fetch returns them), batching the writes."""
        n = len(records)
        if not n:
            return
        prefixes = self._prefixes
        if prefixes is None:
            pk = self.store.partition_key
            prefixes = self._prefixes = (partition_prefix(pk), metadata_prefix(pk))
        keys = list(map(_KEY, records))
        # The keys starting with a prefix form one interval of the byte order, so if the
        # smallest and the largest key start with the state prefix, all of them do. Two C
        # passes of memcmp; bytes.startswith per key would build an argument tuple each.
        state_prefix = prefixes[0]
        try:
            clean = min(keys).startswith(state_prefix) and max(keys).startswith(state_prefix)
        except (TypeError, AttributeError):  # a key that is not bytes (None: no key)
            clean = False
        meta_at: Sequence[int] = () if clean else self._sort_out(records, keys, prefixes)
        values = list(map(_VALUE, records))
        # Epochs first, over the whole batch: a claim past the committed checkpoint still
        # raises the epoch (it is a claim, whether or not its owner ever committed).
        headers = list(map(_HEADERS, records))
        fenced = self.epochs.split(headers)
        valid_until = self.valid_until
        if self.no_offsets and self.commit_proof is None:
            if valid_until is None:
                # a committed state record: only a checkpoint that committed input offsets in
                # the same transaction writes one (a task without input writes metadata only)
                meta = set(meta_at)
                self.commit_proof = next(
                    (r.offset for i, r in enumerate(records) if i not in meta), None
                )
            else:
                self.commit_proof = next(
                    (r.offset for r, h in zip(records, headers, strict=True) if proves_commit(h)),
                    None,
                )
        cut = n
        if valid_until is not None and records[-1].offset > valid_until:
            # at-least-once: written by a checkpoint that never committed; not applied
            cut = bisect_right(records, valid_until, key=_OFFSET)
            self.stale.update(keys[cut:])
            del keys[cut:], values[cut:]
        if cut:
            self.last_applied = records[cut - 1].offset
            if fenced and fenced[0] < cut:
                skip = {i for i in fenced if i < cut}
                self.fenced.update(keys[i] for i in skip)
                self.fenced_count += len(skip)
                keep = [i for i in range(cut) if i not in skip]
                keys = [keys[i] for i in keep]
                values = [values[i] for i in keep]
                if meta_at:
                    was_meta = set(meta_at)
                    meta_at = [j for j, i in enumerate(keep) if i in was_meta]
                cut = len(keep)
            if meta_at:
                self._meta.extend((keys[i], values[i]) for i in meta_at if i < cut)
            if self._keys:
                self._keys += keys
                self._values += values
            else:
                self._keys, self._values = keys, values
        self.applied += n
        if len(self._keys) >= batch_size:
            self.flush()
            maybe_crash("during-restore")

    def _sort_out(
        self, records: Sequence[Any], keys: list[bytes], prefixes: tuple[bytes, bytes]
    ) -> list[int]:
        """Positions of the metadata records; raises at the first key outside the namespace."""
        state_prefix, meta_prefix = prefixes
        meta_at = []
        for i, key in enumerate(keys):
            if isinstance(key, bytes):
                if key.startswith(state_prefix):
                    continue
                if key.startswith(meta_prefix):
                    meta_at.append(i)
                    continue
            raise ChangelogCorruptError(
                self.topic,
                self.partition,
                records[i].offset,
                "its key is not in this task's namespace",
            )
        return meta_at

    def flush(self) -> None:
        """Write the gathered records as one atomic batch."""
        if self._keys:
            keys, values, meta = self._keys, self._values, self._meta
            self._keys, self._values, self._meta = [], [], []
            self.store.restore_columns(keys, values, meta)

    def finish(self) -> None:
        """Last batch, stale-key compensation, and the local store's new changelog offset."""
        self.flush()
        if self.fenced:
            log.warning(
                "%s[%d]: skipped %d record(s) written by a worker that had already lost this "
                "task (a zombie: paused past its session timeout); their %d key(s) will be "
                "rewritten with the restored values",
                self.topic,
                self.partition,
                self.fenced_count,
                len(self.fenced),
            )
            self.store.force_dirty(self.fenced)
        if self.stale:
            log.info(
                "%s[%d]: %d key(s) written by a checkpoint that never committed; they will be "
                "rewritten with their committed values",
                self.topic,
                self.partition,
                len(self.stale),
            )
            self.store.force_dirty(self.stale)
        # Record how far the local store now is, so a restart replays only what follows.
        self.store.apply_changes(
            [], changelog_offset=self.last_applied, writer_epoch=self.epochs.highest
        )


def plan_start(target: RestoreTarget, end: int | None = None) -> None:
    """Decide whether the local store can be reused and from which offset to replay.

    ``end``: the changelog's end offset. A local store that includes an offset at or past it
    was made from a changelog that is not this one any more (deleted and created again): it
    is rebuilt, never reused.
    """
    local = target.store.changelog_offset
    if local is not None and end is not None and local >= end:
        log.warning(
            "local state of %s[%d] includes changelog offset %d but the topic ends at %d (it "
            "was deleted and created again): rebuilding",
            target.topic,
            target.partition,
            local,
            end,
        )
        local = None
        target.store.reset()
    if local is not None and (target.valid_until is None or local <= target.valid_until):
        target.start = local + 1
        target.last_applied = local
        target.epochs.highest = target.store.writer_epoch
        log.info(
            "reusing local state of %s[%d] at changelog offset %d; replaying the tail",
            target.topic,
            target.partition,
            local,
        )
    else:
        if local is not None:
            log.info(
                "local state of %s[%d] is past the committed checkpoint; rebuilding",
                target.topic,
                target.partition,
            )
        target.store.reset()
        target.start = None


async def restore(
    consumer: AIOKafkaConsumer,
    targets: list[RestoreTarget],
    *,
    batch_size: int = 10_000,
    progress: Callable[[RestoreTarget], None] | None = None,
    progress_interval: float = 5.0,
) -> None:
    """Restore every target; ``consumer`` is group-less and owned by the caller.

    A target whose task has no checkpoint to place its state (``unverified``) is checked
    first, before any store is touched (a local RocksDB store must survive the refusal).
    """
    unverified = [t for t in targets if t.unverified is not None]
    if unverified:
        tps = [t.tp for t in unverified]
        firsts = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        for t in unverified:
            if ends[t.tp] > firsts[t.tp]:
                raise StateWithoutCheckpointError(t, ends[t.tp] - firsts[t.tp])
    tps = [t.tp for t in targets]
    if not tps:
        return
    consumer.assign(tps)
    ends = await consumer.end_offsets(tps)
    by_tp = {t.tp: t for t in targets}
    pending: set[TopicPartition] = set()
    beginning: list[TopicPartition] = []
    for t in targets:
        plan_start(t, ends[t.tp])
        t.end = ends[t.tp]
        if t.start is None:
            beginning.append(t.tp)
        else:
            consumer.seek(t.tp, t.start)
        if t.end > (t.start or 0):
            pending.add(t.tp)
    if beginning:
        # One call for all: aiokafka's seek_to_beginning waits for its fetcher to reset, up
        # to a fetch wait (~0.5 s) each; one call per partition made 64 empty changelogs
        # take 32 s to restore (bench/scale.py, issue 18).
        await consumer.seek_to_beginning(*beginning)
    consumer.pause(*[tp for tp in tps if tp not in pending])
    last_report = time.monotonic()
    while pending:
        batches = await consumer.getmany(*pending, timeout_ms=500, max_records=batch_size)
        for tp, records in batches.items():
            by_tp[tp].apply(records, batch_size)
        for tp in list(pending):
            if await consumer.position(tp) >= by_tp[tp].end:
                pending.discard(tp)
                consumer.pause(tp)
        now = time.monotonic()
        if progress is not None and now - last_report >= progress_interval:
            last_report = now
            for t in targets:
                progress(t)
    for t in targets:
        t.finish()
        if progress is not None:
            progress(t)
    # Every partition is paused now. The assignment is deliberately not emptied: aiokafka 0.14
    # can hang in stop() on a group-less consumer whose assignment is empty.


async def read_keys(
    consumer: AIOKafkaConsumer, tp: TopicPartition, start: int, end: int
) -> set[bytes]:
    """The keys of the records at offsets ``[start, end)`` of one changelog partition.

    The fencing catch-up (:mod:`headrace.runtime.checkpoint.fencing`): records another
    writer put where only this task should write are not state, but their keys must be
    rewritten. ``consumer`` is group-less and owned by the caller; its assignment is replaced.
    """
    consumer.assign([tp])
    consumer.seek(tp, start)
    keys: set[bytes] = set()
    while await consumer.position(tp) < end:
        batches = await consumer.getmany(tp, timeout_ms=500)
        for r in batches.get(tp, ()):
            if r.offset < end and r.key is not None:
                keys.add(r.key)
    return keys
