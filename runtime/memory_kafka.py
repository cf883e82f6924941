"""Kafka in memory for :class:`~headrace.runtime.testing.JobTester`: a log with offsets per
partition, transactions whose records stay invisible to ``read_committed`` readers until they
commit (and for ever after an abort), committed offsets with metadata, and the client calls the
task host makes (sender, transactional producer, offset commit, changelog reader)."""

from __future__ import annotations

import asyncio
import itertools
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from headrace.runtime.kafka.producer import Delivery, OutRecord, as_format1

__all__ = ["MemoryChangelogReader", "MemoryLog", "MemoryRecord"]


@dataclass(slots=True)
class MemoryRecord:
    """A record in the in-memory log; has the shape of aiokafka's ConsumerRecord."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    timestamp: int = 0
    txn: int | None = None  #: transaction id; None for non-transactional writes


@dataclass(slots=True)
class _Metadata:
    offset: int


class _SimulatedCrash(Exception):
    """Raised at a commit phase to simulate the process dying there."""


class MemoryLog:
    """Topics, transactions and committed offsets, in memory."""

    def __init__(self) -> None:
        self.topics: dict[str, list[list[MemoryRecord]]] = {}
        self.committed: dict[str, dict[tuple[str, int], tuple[int, str]]] = {}
        self.txn_state: dict[int, str] = {}  # txn id -> "open" | "committed" | "aborted"
        self._txn_ids = itertools.count(1)

    def create(self, topic: str, partitions: int) -> None:
        self.topics.setdefault(topic, [[] for _ in range(partitions)])

    def append(self, rec: OutRecord, partition: int, txn: int | None) -> int:
        # hop marks as format-1 headers: this log keeps records, not batches
        topic, _, key, value, headers, ts = as_format1(rec)
        log = self.topics[topic][partition]
        offset = len(log)
        log.append(
            MemoryRecord(
                topic,
                partition,
                offset,
                key,
                value,
                list(headers) if isinstance(headers, list) else [],
                timestamp=ts or 0,
                txn=txn,
            )
        )
        return offset

    def visible(self, rec: MemoryRecord, committed_only: bool) -> bool:
        return rec.txn is None or not committed_only or self.txn_state[rec.txn] == "committed"

    def read(
        self, topic: str, partition: int, start: int, *, committed_only: bool
    ) -> list[MemoryRecord]:
        """Records from ``start`` up to the last stable offset (like read_committed)."""
        out = []
        for rec in self.topics[topic][partition][start:]:
            if rec.txn is not None and committed_only and self.txn_state[rec.txn] == "open":
                break  # the last stable offset: nothing past an open transaction is readable
            if self.visible(rec, committed_only):
                out.append(rec)
        return out


class MemoryChangelogReader:
    """The consumer calls :func:`headrace.runtime.checkpoint.restore.restore` makes, over the
    memory log: so the tester restores through the production restore code.

    Like a ``read_committed`` consumer under exactly-once: records of aborted transactions are
    skipped (the position still moves past them), and nothing past an open transaction is
    returned (the end offset is the last stable offset).
    """

    def __init__(self, log: MemoryLog, *, committed_only: bool) -> None:
        self.log = log
        self.committed_only = committed_only
        self._positions: dict[Any, int] = {}
        self._paused: set[Any] = set()

    def _records(self, tp: Any) -> list[MemoryRecord]:
        return self.log.topics[tp.topic][tp.partition]

    def _stable_end(self, tp: Any) -> int:
        records = self._records(tp)
        if self.committed_only:
            for r in records:
                if r.txn is not None and self.log.txn_state[r.txn] == "open":
                    return r.offset
        return len(records)

    def assign(self, tps: Iterable[Any]) -> None:
        self._positions = {tp: 0 for tp in tps}
        self._paused.clear()

    async def end_offsets(self, tps: Iterable[Any]) -> dict[Any, int]:
        return {tp: self._stable_end(tp) for tp in tps}

    async def beginning_offsets(self, tps: Iterable[Any]) -> dict[Any, int]:
        return dict.fromkeys(tps, 0)  # the memory log keeps everything

    async def seek_to_beginning(self, *tps: Any) -> None:
        for tp in tps:
            self._positions[tp] = 0

    def seek(self, tp: Any, offset: int) -> None:
        self._positions[tp] = offset

    def pause(self, *tps: Any) -> None:
        self._paused.update(tps)

    async def position(self, tp: Any) -> int:
        return self._positions[tp]

    async def getmany(
        self, *tps: Any, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[Any, list[MemoryRecord]]:
        out: dict[Any, list[MemoryRecord]] = {}
        for tp in tps or list(self._positions):
            if tp in self._paused:
                continue
            end = self._stable_end(tp)
            position = self._positions[tp]
            batch: list[MemoryRecord] = []
            for r in self._records(tp)[position:end]:
                if max_records is not None and len(batch) >= max_records:
                    break
                position = r.offset + 1
                if self.log.visible(r, self.committed_only):
                    batch.append(r)
            self._positions[tp] = position
            if batch:
                out[tp] = batch
        return out


class _MemorySender:
    """Stands in for BatchSender: same ``send`` contract, writes to the memory log."""

    def __init__(self, log: MemoryLog, producer: _MemoryProducer | None) -> None:
        self.log = log
        self.producer = producer
        self._round_robin = itertools.count()

    async def send(self, records: Iterable[OutRecord]) -> list[Delivery]:
        deliveries: list[Delivery] = []
        txn = self.producer.txn if self.producer is not None else None
        loop = asyncio.get_running_loop()
        for rec in records:
            partitions = len(self.log.topics[rec[0]])
            p = rec[1]
            if p is None:
                key = rec[2]
                p = (zlib.crc32(key) if key is not None else next(self._round_robin)) % partitions
            fut: asyncio.Future[Any] = loop.create_future()
            fut.set_result(_Metadata(self.log.append(rec, p, txn)))
            deliveries.append((fut, 1))
        return deliveries

    async def send_pairs(
        self,
        topic: str,
        partition: int,
        pairs: Iterable[tuple[bytes | None, bytes | None]],
        headers: list[tuple[str, bytes]] | None = None,
    ) -> list[Delivery]:
        """BatchSender.send_pairs: (key, value) pairs to one partition, shared headers."""
        h = headers or []
        return await self.send([(topic, partition, k, v, h, None) for k, v in pairs])


class _MemoryProducer:
    """A transactional producer: commit/abort flip the visibility of everything it wrote."""

    def __init__(self, log: MemoryLog) -> None:
        self.log = log
        self.txn: int | None = None
        self._offsets: dict[tuple[str, int], tuple[int, str]] = {}
        self._group = ""

    async def begin_transaction(self) -> None:
        self.txn = next(self.log._txn_ids)
        self.log.txn_state[self.txn] = "open"
        self._offsets = {}

    async def send_offsets_to_transaction(self, offsets: dict[Any, Any], group_id: str) -> None:
        self._group = group_id
        self._offsets = {
            (tp.topic, tp.partition): (om.offset, om.metadata) for tp, om in offsets.items()
        }

    async def commit_transaction(self) -> None:
        assert self.txn is not None
        self.log.txn_state[self.txn] = "committed"
        self.log.committed.setdefault(self._group, {}).update(self._offsets)
        self.txn = None

    def abort(self) -> None:
        if self.txn is not None:
            self.log.txn_state[self.txn] = "aborted"
            self.txn = None


class _MemoryConsumer:
    """The at-least-once offset commit."""

    def __init__(self, log: MemoryLog, group: str) -> None:
        self.log, self.group = log, group

    async def commit(self, offsets: dict[Any, Any]) -> None:
        self.log.committed.setdefault(self.group, {}).update(
            {(tp.topic, tp.partition): (om.offset, om.metadata) for tp, om in offsets.items()}
        )
