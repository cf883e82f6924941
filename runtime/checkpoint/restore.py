"""Rebuilding task state from changelog partitions (DESIGN.md section 6).

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

A record whose key is not in the task's namespace (corruption, or a topic shared by mistake)
stops the restore with an error naming topic, partition and offset: half a state is worse than
none.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from runtime.faults import maybe_crash
from runtime.state.keys import metadata_prefix, partition_prefix
from runtime.state.store import OperatorStateStore

log = logging.getLogger(__name__)


class ChangelogCorruptError(RuntimeError):
    """A changelog record cannot belong to the state being restored."""

    def __init__(self, topic: str, partition: int, offset: int, why: str) -> None:
        self.topic, self.partition, self.offset = topic, partition, offset
        super().__init__(
            f"restore stopped: changelog record at topic {topic!r} partition {partition} "
            f"offset {offset} is not valid state: {why}"
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
    last_applied: int | None = None
    _batch: list[tuple[bytes, bytes | None]] = field(default_factory=list)

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    def apply(self, records: Sequence[Any], batch_size: int) -> None:
        """Apply changelog records (anything with offset/key/value), batching the writes."""
        state_prefix = partition_prefix(self.store.partition_key)
        meta_prefix = metadata_prefix(self.store.partition_key)
        prefixes = (state_prefix, meta_prefix)
        valid_until = self.valid_until
        batch = self._batch
        for r in records:
            key = r.key
            if key is None or not key.startswith(prefixes):
                raise ChangelogCorruptError(
                    self.topic, self.partition, r.offset, "its key is not in this task's namespace"
                )
            if valid_until is not None and r.offset > valid_until:
                self.stale.add(key)
                continue
            batch.append((key, r.value))
            self.last_applied = r.offset
        self.applied += len(records)
        if len(batch) >= batch_size:
            self.flush()
            maybe_crash("during-restore")

    def flush(self) -> None:
        if self._batch:
            self.store.restore(self._batch)
            self._batch = []

    def finish(self) -> None:
        """Last batch, stale-key compensation, and the local store's new changelog offset."""
        self.flush()
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
        self.store.apply_changes([], changelog_offset=self.last_applied)


def plan_start(target: RestoreTarget) -> None:
    """Decide whether the local store can be reused and from which offset to replay."""
    local = target.store.changelog_offset
    if local is not None and (target.valid_until is None or local <= target.valid_until):
        target.start = local + 1
        target.last_applied = local
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
    """Restore every target; ``consumer`` is group-less and owned by the caller."""
    for t in targets:
        plan_start(t)
    tps = [t.tp for t in targets]
    if not tps:
        return
    consumer.assign(tps)
    ends = await consumer.end_offsets(tps)
    by_tp = {t.tp: t for t in targets}
    pending: set[TopicPartition] = set()
    for t in targets:
        t.end = ends[t.tp]
        if t.start is None:
            await consumer.seek_to_beginning(t.tp)
        else:
            consumer.seek(t.tp, t.start)
        if t.end > (t.start or 0):
            pending.add(t.tp)
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
