"""headrace operators inside a faust-streaming app: ``headrace_agent(app, topic, MyOperator)``.

A team on faust keeps its app, its worker command and its other agents, and gets headrace's
declared state (value, list, map, aggregating, reducing and keyed state, write-back cache,
memory or RocksDB backend) and headrace's changelog restore for one agent::

    app = faust.App("shop", broker="kafka://localhost:9092")
    counts = headrace_agent(app, "orders", CountPerCustomer, sink="order-counts",
                            sink_key_serde=STR, sink_value_serde=INT)

The bridge registers a faust agent (concurrency 1) over ``topic``. Every source partition gets
its own operator instance and its own :class:`OperatorStateStore`; ``current_key`` is the raw
record key, exactly as in a headrace task. ``ctx.emit(value, key=...)`` sends to ``sink`` (a
faust topic or channel, or a topic name).

Guarantee: exact state, at-least-once output
============================================

Under faust's at-least-once processing the bridge gives **exact state**: after any crash
(``kill -9`` included), every source record has been applied to the operator's state exactly
once. **Outputs are at-least-once**: records processed after the last checkpoint are processed
again after a crash, so their outputs may repeat, but are never lost, and the newest output per
key is the one written last. How:

1. **Checkpoint** (every ``checkpoint_interval`` seconds, on revocation and at shutdown), per
   source partition *p*, in this order: capture the cut (``take_changes()``, the events
   processed so far, the next source offset *X*) between two records; wait until every output
   of those records is acknowledged; write the state changes to changelog partition *p*
   (compacted, keyed by storage key) and wait for the acks; then write a **checkpoint marker**
   (a metadata key of the store: ``{"next": X, "seen": ...}``) and wait for its ack; then
   update the local store with ``changelog_offset`` = the marker's offset.
2. **faust's offsets never pass a checkpoint.** The agent iterates ``stream.noack()`` and acks
   an event only after the checkpoint covering it is durable, so faust's commit (which flushes
   its producer and commits the highest contiguous acked offset) stays at or behind *X*. faust's
   shutdown and rebalance (``stream_wait_empty``) wait for these acks; the checkpoint loop keeps
   running until then.
3. **Restore** (faust's ``on_rebalance_complete`` signal, which faust awaits before it seeks the
   stream partitions and resumes them): the last marker in changelog partition *p* is found
   (reading backwards from the end), and headrace's own restore
   (:func:`headrace.runtime.checkpoint.restore.restore`) applies the changelog up to that marker.
   Records after it belong to a checkpoint whose marker was never written: they are not applied
   and their keys are rewritten at the next checkpoint, exactly like headrace's
   ``at_least_once`` mode. A RocksDB store (or a memory store kept across a rebalance) is reused
   when its changelog offset is not past the marker; only the tail is replayed.
4. **Resume at the marker.** Still inside ``on_rebalance_complete``, the bridge commits *X* as
   the group's offset for *p* (faust's consumer is the group member), so faust's seek-to-
   committed resumes exactly at the first record the state does not contain, whatever faust had
   committed. Records below *X* that arrive anyway are acked and skipped.

Across a hop (one ``headrace_agent`` writing a topic that another one reads) the downstream
state is exact too: outputs carry an ``hr.fseq`` header (upstream bridge, partition, offset,
output index) and the downstream bridge drops what it has already applied, keeping the
high-water marks in the checkpoint marker. As in headrace, this needs a deterministic upstream
operator, and only the first hop after the replaying bridge is covered.

What does *not* hold:

* Output records may repeat after a crash (at-least-once), as in headrace's ``at_least_once``.
* There is no fencing: a worker that is expelled from the group *without* a revocation (stalled
  past ``broker_session_timeout``) may still write one checkpoint for a partition that another
  worker already restored. faust's own table changelogs share this limitation; headrace's
  ``exactly_once`` mode fences with transactions.
* faust's ``processing_guarantee="exactly_once"`` is not supported by this bridge (it refuses
  to start), and an agent with ``concurrency`` > 1 could reorder a partition's records, so the
  bridge always registers its agent with concurrency 1.
* The bridge uses faust-streaming internals that are not public API (``Consumer._commit`` for
  the rewind, ``on_rebalance_complete`` ordering); it is tested with faust-streaming 0.11-0.15.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition

from headrace.operators.operator import SAME_KEY, Operator
from headrace.operators.record import Record
from headrace.operators.serde import BYTES, Serde
from headrace.operators.time import MIN_WATERMARK
from headrace.runtime.checkpoint.restore import RestoreTarget, restore
from headrace.runtime.kafka.topics import topic_config, topic_partitions
from headrace.runtime.state.backend import BACKEND_KINDS, open_backend
from headrace.runtime.state.handles import Change
from headrace.runtime.state.keys import StatePartitionKey, encode_metadata_key
from headrace.runtime.state.store import OperatorStateStore

try:
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth, server_list
    from faust.types import TP
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "headrace.runtime.integrations.faust needs faust-streaming: pip install 'headrace[faust]'"
    ) from exc

__all__ = ["SEQ_HEADER", "BridgeStats", "FaustBridge", "headrace_agent"]

log = logging.getLogger(__name__)

#: Header on every output: ``<bridge name>:<source partition>:<source offset>:<output index>``.
SEQ_HEADER = "hr.fseq"
_MARKER_NAME = "faust.checkpoint"
_MARKER_FORMAT = 1


@dataclass(slots=True)
class BridgeStats:
    """Counters of one bridge in this worker (logged at each checkpoint and restore)."""

    processed: int = 0
    replayed_skipped: int = 0  #: records below the restored checkpoint, skipped
    hop_duplicates: int = 0  #: upstream replays dropped by ``hr.fseq``
    checkpoints: int = 0
    restores: int = 0
    restored_records: int = 0


class _BridgeContext:
    """The :class:`headrace.operators.operator.Context` of one partition's operator."""

    __slots__ = ("key", "operator_id", "out", "partition", "timestamp")

    def __init__(self, operator_id: str, partition: int) -> None:
        self.operator_id = operator_id
        self.partition = partition
        self.key: Any = None
        self.timestamp: int = -1
        self.out: list[tuple[Any, Any]] = []

    def emit(self, value: Any, key: Any = SAME_KEY, timestamp: int | None = None) -> None:
        self.out.append((self.key if key is SAME_KEY else key, value))

    # Event time (watermarks, timers, side outputs) runs on headrace's own workers only.
    @property
    def watermark(self) -> int:
        return MIN_WATERMARK

    @property
    def timers(self) -> Any:
        raise NotImplementedError("timers are not available in the faust bridge")

    def processing_time(self) -> int:
        return int(time.time() * 1000)

    def side_output(self, topic: str, headers: list[tuple[str, bytes]]) -> None:
        raise NotImplementedError("side outputs are not available in the faust bridge")


@dataclass(slots=True)
class _Partition:
    """One source partition: its operator, store and the progress of its checkpoints."""

    partition: int
    operator: Operator
    store: OperatorStateStore
    ctx: _BridgeContext
    marker_key: bytes
    ready: bool = False
    opened: bool = False
    #: first source offset the state does not contain (None: no checkpoint yet)
    next_offset: int | None = None
    #: hop dedupe: upstream "<bridge>:<partition>" -> last applied (offset, output index)
    seen: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: events processed since the last checkpoint: acked once it is durable
    held: list[Any] = field(default_factory=list)
    #: deliveries of outputs emitted since the last checkpoint
    outputs: list[Any] = field(default_factory=list)
    #: state restored with stale keys, or never checkpointed: checkpoint even if idle
    dirty: bool = True


@dataclass(slots=True)
class _Cut:
    part: _Partition
    changes: list[Change]
    held: list[Any]
    outputs: list[Any]
    marker: bytes


class FaustBridge:
    """What :func:`headrace_agent` registers: one agent, its per-partition state and checkpoints.

    ``agent`` is the faust agent; ``stats`` counts what this worker did. ``checkpoint()`` can be
    awaited to checkpoint now (tests, shutdown hooks).
    """

    def __init__(
        self,
        app: Any,
        source: Any,
        prototype: Operator,
        *,
        name: str,
        sink: Any,
        key_serde: Serde[Any] | None,
        value_serde: Serde[Any] | None,
        sink_key_serde: Serde[Any] | None,
        sink_value_serde: Serde[Any] | None,
        changelog_topic: str,
        checkpoint_interval: float,
        state_backend: str,
        state_dir: Path | None,
        replication_factor: int,
    ) -> None:
        self.app = app
        self.source = source
        self.topic_name: str = source.get_topic_name()
        self.prototype = prototype
        self.name = name
        self.sink = sink
        self.key_serde = key_serde
        self.value_serde = value_serde
        self.sink_key_serde = sink_key_serde
        self.sink_value_serde = sink_value_serde
        self.changelog_topic = changelog_topic
        self.checkpoint_interval = checkpoint_interval
        self.state_backend = state_backend
        self.state_dir = state_dir
        self.replication_factor = replication_factor
        self.stats = BridgeStats()
        self.partitions: dict[int, _Partition] = {}
        self._process_lock = asyncio.Lock()  # one record's processing vs. taking a cut
        self._checkpoint_lock = asyncio.Lock()  # checkpoints and restores, one at a time
        self._changelog_ready = False
        self._failed: BaseException | None = None
        self._crash_task: asyncio.Future[Any] | None = None
        self._checkpoint_id = 0
        self._stream: Any = None
        self.agent: Any = None

    # -- kafka clients -------------------------------------------------------------------------
    def _client_kwargs(self) -> dict[str, Any]:
        conf = self.app.conf
        return {
            "bootstrap_servers": server_list(conf.broker, 9092),
            **credentials_to_aiokafka_auth(conf.broker_credentials, conf.ssl_context),
        }

    async def _ensure_changelog(self) -> None:
        """Create the changelog (compacted, one partition per source partition) or check it."""
        if self._changelog_ready:
            return
        admin = AIOKafkaAdminClient(**self._client_kwargs(), client_id=f"{self.name}-admin")
        await admin.start()
        try:
            found = await topic_partitions(admin, [self.topic_name, self.changelog_topic])
            partitions = found.get(self.topic_name)
            if partitions is None:
                raise RuntimeError(f"source topic {self.topic_name!r} does not exist")
            if self.changelog_topic not in found:
                log.info(
                    "headrace[%s]: creating changelog %s (%d partitions, compacted)",
                    self.name,
                    self.changelog_topic,
                    partitions,
                )
                resp = await admin.create_topics(
                    [
                        NewTopic(
                            self.changelog_topic,
                            partitions,
                            self.replication_factor,
                            topic_configs={"cleanup.policy": "compact"},
                        )
                    ]
                )
                for topic, code, *_ in resp.topic_errors:
                    if code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS (another worker won)
                        raise RuntimeError(f"could not create {topic!r}: error code {code}")
                deadline = time.monotonic() + 15
                while found.get(self.changelog_topic) != partitions:
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.2)
                    found = await topic_partitions(admin, [self.changelog_topic])
            if found.get(self.changelog_topic) != partitions:
                raise RuntimeError(
                    f"changelog {self.changelog_topic!r} has {found.get(self.changelog_topic)} "
                    f"partitions, the source {self.topic_name!r} has {partitions}: they must "
                    "match (delete the changelog, losing the state, or restore the count)"
                )
            policy = (await topic_config(admin, [self.changelog_topic], "cleanup.policy")).get(
                self.changelog_topic, ""
            )
            if "compact" not in policy:
                raise RuntimeError(
                    f"changelog {self.changelog_topic!r} must have cleanup.policy=compact, "
                    f"has {policy!r}: retention would delete state"
                )
        finally:
            await admin.close()
        self._changelog_ready = True

    # -- partitions ----------------------------------------------------------------------------
    def _new_partition(self, partition: int) -> _Partition:
        op = copy.deepcopy(self.prototype)
        op.operator_id = self.name
        path: Path | None = None
        if self.state_backend == "rocksdb":
            assert self.state_dir is not None
            path = self.state_dir / self.name / str(partition)
            path.parent.mkdir(parents=True, exist_ok=True)
        pk = StatePartitionKey(self.name, partition, partition)
        store = OperatorStateStore(open_backend(self.state_backend, path), pk)
        store.bind_operator(op)
        return _Partition(
            partition,
            op,
            store,
            _BridgeContext(self.name, partition),
            encode_metadata_key(pk, _MARKER_NAME),
        )

    def _close_partition(self, part: _Partition) -> None:
        part.ready = False
        if part.opened:
            try:
                part.operator.close()
            except Exception:
                log.exception("headrace[%s]: close() of partition %d", self.name, part.partition)
        part.store.backend.close()

    async def _on_rebalance_complete(self, sender: Any = None, **_: Any) -> None:
        """faust awaits this before it seeks the stream partitions and resumes them."""
        if self._failed is not None:
            return
        assigned = {
            tp.partition for tp in self.app.consumer.assignment() if tp.topic == self.topic_name
        }
        async with self._checkpoint_lock:
            for p in [p for p in self.partitions if p not in assigned]:
                self._close_partition(self.partitions.pop(p))
            if assigned:
                await self._ensure_changelog()
                await self._restore(sorted(assigned))

    async def _on_partitions_revoked(self, sender: Any = None, revoked: Any = (), **_: Any) -> None:
        """faust sends this after ``stream_wait_empty``; checkpoint what is left, then stop."""
        mine = [tp.partition for tp in revoked if tp.topic == self.topic_name]
        parts = [self.partitions[p] for p in mine if p in self.partitions]
        if not parts or self._failed is not None:
            return
        await self.checkpoint(final_for=parts)
        log.info("headrace[%s]: partitions %s revoked (%s)", self.name, mine, self.stats)

    async def _on_shutdown(self, sender: Any = None, **_: Any) -> None:
        """After faust waited for the streams (the last checkpoint acked them)."""
        log.info("headrace[%s]: shutting down (%s)", self.name, self.stats)

    async def _restore(self, partitions: list[int]) -> None:
        started = time.monotonic()
        for p in partitions:
            part = self.partitions.get(p)
            if part is None:
                part = self.partitions[p] = self._new_partition(p)
            part.ready = False
            part.held.clear()  # faust seeks back to the marker: these events come again
            part.outputs.clear()
        consumer = AIOKafkaConsumer(
            **self._client_kwargs(),
            client_id=f"{self.name}-restore",
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_uncommitted",
        )
        await consumer.start()
        try:
            markers = await _last_markers(
                consumer,
                self.changelog_topic,
                {p: self.partitions[p].marker_key for p in partitions},
            )
            targets = {
                p: RestoreTarget(self.partitions[p].store, self.changelog_topic, p, last)
                for p, last in markers.items()
                if last is not None
            }
            for p in partitions:
                if p not in targets:  # empty changelog partition: nothing to restore
                    self.partitions[p].store.reset()
            await restore(consumer, list(targets.values()))
        finally:
            await _stop_restore_consumer(consumer, TopicPartition(self.changelog_topic, 0))
        rewind: dict[Any, int] = {}
        for p in partitions:
            part = self.partitions[p]
            target = targets.get(p)
            raw = part.store.backend.get(part.marker_key)
            marker = orjson.loads(raw) if raw is not None else {}
            part.next_offset = marker.get("next")
            part.seen = {k: (int(v[0]), int(v[1])) for k, v in marker.get("seen", {}).items()}
            part.dirty = True
            if part.next_offset is not None:
                rewind[TP(self.topic_name, p)] = part.next_offset
            if not part.opened:
                part.operator.open(part.ctx)
                part.opened = True
            part.ready = True
            applied = 0 if target is None else target.applied
            self.stats.restored_records += applied
            log.info(
                "headrace[%s]: partition %d restored from %s (%d changelog records read, "
                "%d stale keys, marker at %s): resuming at source offset %s",
                self.name,
                p,
                self.changelog_topic,
                applied,
                0 if target is None else len(target.stale),
                _describe_marker(markers[p]),
                part.next_offset if part.next_offset is not None else "faust's committed offset",
            )
        if rewind:
            # faust seeks to the committed offsets right after this signal: make them the
            # checkpoint's, so the stream resumes exactly where the state ends.
            await self.app.consumer._commit(rewind)
        self.stats.restores += 1
        log.info(
            "headrace[%s]: restored partitions %s in %.2fs (%s)",
            self.name,
            partitions,
            time.monotonic() - started,
            self.stats,
        )

    # -- processing ----------------------------------------------------------------------------
    async def _run(self, stream: Any) -> None:
        self._stream = stream.noack()
        async for event in self._stream.events():
            await self._handle(event)

    async def _handle(self, event: Any) -> None:
        if self._failed is not None:
            raise RuntimeError(f"headrace[{self.name}] has failed") from self._failed
        msg = event.message
        part = self.partitions.get(msg.partition)
        if part is None or not part.ready:
            async with self._checkpoint_lock:  # not restored through the signal: do it now
                part = self.partitions.get(msg.partition)
                if part is None or not part.ready:
                    log.warning(
                        "headrace[%s]: event for partition %d before its restore; restoring now",
                        self.name,
                        msg.partition,
                    )
                    await self._ensure_changelog()
                    await self._restore([msg.partition])
                    part = self.partitions[msg.partition]
        async with self._process_lock:
            offset: int = msg.offset
            if part.next_offset is not None and offset < part.next_offset:
                self.stats.replayed_skipped += 1
                await self._stream.ack(event)
                return
            headers = tuple(msg.headers or ())
            seq = _sequence(headers)
            if seq is not None:
                src, upstream_offset, index = seq
                last = part.seen.get(src)
                if last is not None and (upstream_offset, index) <= last:
                    self.stats.hop_duplicates += 1
                    part.held.append(event)
                    part.next_offset = offset + 1
                    return
                part.seen[src] = (upstream_offset, index)
            raw_key: bytes | None = msg.key
            raw_value: bytes | None = msg.value
            try:
                key = (
                    raw_key
                    if raw_key is None or self.key_serde is None
                    else (self.key_serde.deserialize(raw_key))
                )
                value = (
                    raw_value
                    if raw_value is None or self.value_serde is None
                    else (self.value_serde.deserialize(raw_value))
                )
                part.store.current_key = b"" if raw_key is None else raw_key
                ctx = part.ctx
                ctx.key = key
                ctx.out.clear()
                ts = msg.timestamp
                part.operator.process(
                    Record(
                        key,
                        value,
                        msg.topic,
                        msg.partition,
                        offset,
                        -1 if ts is None else int(ts * 1000),
                        headers,
                    ),
                    ctx,
                )
            except Exception as exc:
                self._fail(
                    RuntimeError(
                        f"headrace[{self.name}]: record at topic {msg.topic!r} partition "
                        f"{msg.partition} offset {offset} failed: {type(exc).__name__}: {exc}"
                    )
                )
                raise
            for index, (out_key, out_value) in enumerate(ctx.out):
                part.outputs.append(await self._send(out_key, out_value, part, offset, index))
            ctx.out.clear()
            part.held.append(event)
            part.next_offset = offset + 1
            self.stats.processed += 1

    async def _send(self, key: Any, value: Any, part: _Partition, offset: int, index: int) -> Any:
        if self.sink is None:
            return None
        kwargs: dict[str, Any] = {}
        if self.sink_key_serde is not None and key is not None:
            key = self.sink_key_serde.serialize(key)
            kwargs["key_serializer"] = "raw"
        if self.sink_value_serde is not None and value is not None:
            value = self.sink_value_serde.serialize(value)
            kwargs["value_serializer"] = "raw"
        seq = f"{self.name}:{part.partition}:{offset}:{index}".encode()
        # force=True: never an "attachment" published at faust's next commit, which would wait
        # for acks that are only given after this checkpoint (a deadlock).
        return await self.sink.send(
            key=key, value=value, headers=[(SEQ_HEADER, seq)], force=True, **kwargs
        )

    def _fail(self, exc: BaseException) -> None:
        """Stop checkpointing: the state may hold part of a failed record. Unacked events are
        released, so faust's shutdown does not wait for them; a restart restores the last
        checkpoint."""
        if self._failed is None:
            self._failed = exc
            log.error("%s", exc)
            for part in self.partitions.values():
                part.ready = False
                part.held.clear()
                part.outputs.clear()
            self._crash_task = asyncio.ensure_future(self.app.crash(exc))

    # -- checkpoints ---------------------------------------------------------------------------
    async def checkpoint_loop(self) -> None:
        """Checkpoint every ``checkpoint_interval`` seconds until the app's futures are stopped
        (after faust's shutdown waited for the streams, so the last acks are still given)."""
        reported, last_report = BridgeStats(), time.monotonic()
        while True:
            await asyncio.sleep(self.checkpoint_interval)
            if self._failed is not None:
                return
            try:
                await self.checkpoint()
            except Exception as exc:
                self._fail(exc)
                return
            if time.monotonic() - last_report >= 10 and self.stats != reported:
                log.info("headrace[%s]: %s", self.name, self.stats)
                reported, last_report = copy.copy(self.stats), time.monotonic()

    async def checkpoint(self, *, final_for: Sequence[_Partition] | None = None) -> None:
        """Checkpoint every ready partition (or, on revocation, the given ones)."""
        async with self._checkpoint_lock:
            if self._failed is not None:
                return
            parts = (
                list(final_for)
                if final_for is not None
                else [p for p in self.partitions.values() if p.ready]
            )
            cuts = await self._cut([p for p in parts if p.ready])
            if final_for is not None:
                for p in parts:
                    p.ready = False
            if cuts:
                await self._commit(cuts)

    async def _cut(self, parts: list[_Partition]) -> list[_Cut]:
        self._checkpoint_id += 1
        cuts: list[_Cut] = []
        async with self._process_lock:  # between two records
            for part in parts:
                if not (part.held or part.dirty):
                    continue
                part.operator.on_checkpoint(self._checkpoint_id)
                marker = orjson.dumps(
                    {
                        "v": _MARKER_FORMAT,
                        "cp": self._checkpoint_id,
                        "next": part.next_offset,
                        "seen": {k: list(v) for k, v in part.seen.items()},
                    }
                )
                cuts.append(_Cut(part, part.store.take_changes(), part.held, part.outputs, marker))
                part.held, part.outputs, part.dirty = [], [], False
        return cuts

    async def _commit(self, cuts: list[_Cut]) -> None:
        started = time.perf_counter()
        producer = self.app.producer
        topic = self.changelog_topic
        # 1. outputs of the records in the cut are durable
        await asyncio.gather(*(o for c in cuts for o in c.outputs if o is not None))
        # 2. state changes are durable
        sends = [
            await producer.send(topic, key, value, c.part.partition, None, None)
            for c in cuts
            for key, value in c.changes
        ]
        await asyncio.gather(*sends)
        # 3. then the marker: it makes the changes before it valid
        markers = [
            await producer.send(topic, c.part.marker_key, c.marker, c.part.partition, None, None)
            for c in cuts
        ]
        delivered = await asyncio.gather(*markers)
        changed = 0
        for c, meta in zip(cuts, delivered, strict=True):
            c.part.store.apply_changes(
                [*c.changes, (c.part.marker_key, c.marker)], changelog_offset=meta.offset
            )
            changed += len(c.changes)
            # 4. only now may faust commit these offsets
            for event in c.held:
                await self._stream.ack(event)
        self.stats.checkpoints += 1
        log.debug(
            "headrace[%s]: checkpoint %d of partitions %s: %d changed keys, %.1f ms",
            self.name,
            self._checkpoint_id,
            [c.part.partition for c in cuts],
            changed,
            (time.perf_counter() - started) * 1000,
        )


async def _stop_restore_consumer(consumer: AIOKafkaConsumer, tp: TopicPartition) -> None:
    """Stop a group-less consumer without hanging.

    aiokafka 0.14's ``stop()`` waits forever for its fetcher when the assignment is empty
    (``restore()`` ends with ``assign([])``) or was just changed and the fetcher still looks up
    committed offsets (a group-less consumer never gets them). One partition with an explicit,
    already resolved position avoids both.
    """
    consumer.assign([tp])
    await consumer.seek_to_end(tp)
    await consumer.stop()


def _describe_marker(offset: int | None) -> str:
    if offset is None:
        return "none (empty changelog)"
    return "none" if offset < 0 else str(offset)


def _sequence(headers: Sequence[tuple[str, bytes]]) -> tuple[str, int, int] | None:
    for name, value in headers:
        if name == SEQ_HEADER:
            src, _, rest = bytes(value).decode().rpartition(":")
            bridge, _, upstream_offset = src.rpartition(":")
            return bridge, int(upstream_offset), int(rest)
    return None


async def _last_markers(
    consumer: AIOKafkaConsumer, topic: str, marker_keys: dict[int, bytes]
) -> dict[int, int | None]:
    """Offset of the last checkpoint marker per changelog partition (-1: none; None: the
    partition is empty).

    Every checkpoint ends with its marker, so the last one is near the end: read backwards in
    growing windows. Compaction keeps the newest marker (it is the newest record of its key).
    """
    found: dict[int, int | None] = {}
    tps = [TopicPartition(topic, p) for p in marker_keys]
    consumer.assign(tps)
    lows = await consumer.beginning_offsets(tps)
    highs = await consumer.end_offsets(tps)
    for tp in tps:
        partition, marker_key = tp.partition, marker_keys[tp.partition]
        low, high = lows[tp], highs[tp]
        if high <= low:
            found[partition] = None
            continue
        consumer.assign([tp])
        last, window = -1, 1024
        while last < 0 and high > low:
            start = max(low, high - window)
            consumer.seek(tp, start)
            while await consumer.position(tp) < high:
                batch = await consumer.getmany(tp, timeout_ms=1000, max_records=10_000)
                for r in batch.get(tp, []):
                    if r.offset < high and r.key == marker_key:
                        last = max(last, r.offset)
            high, window = start, window * 8
        found[partition] = last
    return found


def headrace_agent(
    app: Any,
    topic: Any,
    operator: Operator | type[Operator],
    *,
    name: str | None = None,
    sink: Any = None,
    key_serde: Serde[Any] | None = BYTES,
    value_serde: Serde[Any] | None = BYTES,
    sink_key_serde: Serde[Any] | None = None,
    sink_value_serde: Serde[Any] | None = None,
    changelog_topic: str | None = None,
    checkpoint_interval: float = 1.0,
    state_backend: str = "memory",
    state_dir: Path | str | None = None,
    replication_factor: int = 1,
) -> FaustBridge:
    """Run ``operator`` (an instance, copied per partition, or a class) as a faust agent.

    ``topic`` is a faust topic or a topic name (a name becomes a topic with raw serializers).
    The bridge deserializes the raw ``event.message.key/value`` with ``key_serde``/``value_serde``
    (``None`` passes bytes through), so declare a given topic with ``key_serializer="raw"`` and
    ``value_serializer="raw"`` to spare faust a decode the bridge does not use.
    ``sink`` is a faust topic/channel or a topic name; outputs are serialized
    with ``sink_key_serde``/``sink_value_serde`` when given, else by the sink's own codecs.
    ``name`` (default: the operator's id or lower-case class name) is the state namespace and
    must stay stable; the changelog defaults to ``<app id>.<name>.changelog``. ``state_backend``
    is ``memory`` or ``rocksdb`` (``state_dir`` required, default ``<app datadir>/headrace``).
    See the module docstring for the guarantee.
    """
    if isinstance(operator, type):
        operator = operator()
    if not isinstance(operator, Operator):
        raise TypeError(f"headrace_agent needs an Operator, got {type(operator).__name__}")
    if state_backend not in BACKEND_KINDS:
        raise ValueError(f"state_backend must be one of {BACKEND_KINDS}, got {state_backend!r}")
    if not checkpoint_interval > 0:
        raise ValueError("checkpoint_interval must be a positive number of seconds")
    guarantee = str(getattr(app.conf, "processing_guarantee", "at_least_once"))
    if "exactly" in guarantee.lower():
        raise ValueError(
            "headrace_agent supports faust's at_least_once processing guarantee only "
            f"(app has {guarantee!r})"
        )
    op_name = name or operator.operator_id or type(operator).__name__.lower()
    if isinstance(topic, str):
        topic = app.topic(
            topic, key_type=bytes, value_type=bytes, value_serializer="raw", key_serializer="raw"
        )
    if isinstance(sink, str):
        sink = app.topic(
            sink, key_type=bytes, value_type=bytes, value_serializer="raw", key_serializer="raw"
        )
    directory: Path | None = None
    if state_backend == "rocksdb":
        directory = (
            Path(state_dir) if state_dir is not None else Path(app.conf.datadir) / "headrace"
        )
    bridge = FaustBridge(
        app,
        topic,
        operator,
        name=op_name,
        sink=sink,
        key_serde=key_serde,
        value_serde=value_serde,
        sink_key_serde=sink_key_serde,
        sink_value_serde=sink_value_serde,
        changelog_topic=changelog_topic or f"{app.conf.id}.{op_name}.changelog",
        checkpoint_interval=checkpoint_interval,
        state_backend=state_backend,
        state_dir=directory,
        replication_factor=replication_factor,
    )

    async def run(stream: Any) -> None:
        await bridge._run(stream)

    run.__name__ = run.__qualname__ = f"headrace_{op_name.replace('-', '_').replace('.', '_')}"
    bridge.agent = app.agent(topic, name=f"headrace.{op_name}", concurrency=1)(run)
    app.on_rebalance_complete.connect(bridge._on_rebalance_complete)
    app.on_partitions_revoked.connect(bridge._on_partitions_revoked)
    app.on_before_shutdown.connect(bridge._on_shutdown)
    app.task(bridge.checkpoint_loop)
    return bridge
