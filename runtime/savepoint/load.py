"""Loading a savepoint into a job without state, for its current layout (``headrace savepoint
load``, ``headrace run --from-savepoint``)."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from headrace.operators.job import Job
from headrace.operators.operator import Operator
from headrace.runtime.checkpoint.metadata import CheckpointMetadata
from headrace.runtime.config import Settings
from headrace.runtime.faults import maybe_crash
from headrace.runtime.kafka import clients
from headrace.runtime.kafka.identity import check_identity, compare, describe
from headrace.runtime.kafka.producer import BatchSender, Delivery, default_partition, last_offset
from headrace.runtime.kafka.reset import carry_out, commit_offsets, group_members, plan_reset
from headrace.runtime.kafka.topics import ensure_topics, identity_topic
from headrace.runtime.savepoint.fileformat import (
    SavepointError,
    sections,
    verify,
)
from headrace.runtime.savepoint.migrate import Migration, plan_migrations
from headrace.runtime.state.backend import open_backend
from headrace.runtime.state.keys import StatePartitionKey, partition_prefix, split_state_suffix
from headrace.runtime.state.store import OperatorStateStore

log = logging.getLogger(__name__)

#: the identity topic's mark of a load under way (cleared when it completed)
LOADING_KEY = b"loading"


# -- load -----------------------------------------------------------------------------------------


@dataclass(slots=True)
class LoadReport:
    savepoint: str
    entries: dict[str, int] = field(default_factory=dict)  #: per target operator
    partitions: dict[str, int] = field(default_factory=dict)  #: per target operator


async def load_savepoint(
    settings: Settings,
    job: Job,
    path: Path,
    mapping: dict[str, str] | None = None,
    migrations: dict[str, Callable[[Any], Any]] | None = None,
) -> LoadReport:
    """Write the savepoint's state into ``job``'s changelogs for its current layout, commit the
    offsets and checkpoint metadata that make it the committed state, and record the job's
    identity. ``job`` must have no state yet (a fresh name, or after ``headrace reset``).

    ``mapping``: savepoint operator id -> this job's; ``migrations``: ``"operator.state"``
    (this job's names) -> a function from the old value to the new (:mod:`.migrate`)."""
    mapping = dict(mapping or {})
    header = verify(path)
    recorded = dict(header["job"])
    ops = dict(recorded["operators"])
    unknown = [old for old in mapping if old not in ops]
    if unknown:
        raise SavepointError(f"--map names operators the savepoint does not hold: {unknown}")
    recorded["operators"] = {mapping.get(op, op): doc for op, doc in ops.items()}
    header = dict(header, job=recorded)
    plans = plan_migrations(header, job, dict(migrations or {}))
    # every operator of the savepoint has state (in the file): dropping one is refused
    diff = compare(recorded, describe(job), has_state=set(recorded["operators"]))
    migrated = tuple(f"state {state!r} of {op!r} changed" for op, state in plans)
    diff.refused[:] = [line for line in diff.refused if not line.startswith(migrated)]
    if diff.refused:
        lines = "".join(f"\n  - {line}" for line in diff.refused)
        raise SavepointError(
            f"savepoint {header['id']} (job {header['job']['job']!r}) does not fit job "
            f"{job.name!r}:{lines}\nMap renamed operators with --map OLD=NEW"
        )
    for line in diff.safe:
        log.warning("loading savepoint %s: %s", header["id"], line)

    admin = clients.admin_client(settings, client_id="headrace-savepoint")
    await admin.start()
    try:
        await _make_room(admin, settings, job, header["id"])
        layout = await ensure_topics(admin, job)
        producer = clients.producer(settings, client_id="headrace-savepoint")
        await producer.start()
        try:
            await producer.send_and_wait(
                identity_topic(job), orjson.dumps({"savepoint": header["id"]}), key=LOADING_KEY
            )
            report, last = await _write_state(producer, job, layout, path, mapping, header, plans)
            await _commit(settings, job, layout, header, last)
            await check_identity(admin, settings, job, savepoint=header["id"])
            await producer.send_and_wait(identity_topic(job), None, key=LOADING_KEY)
        finally:
            await producer.stop()
    finally:
        await admin.close()
    return report


async def _make_room(admin: AIOKafkaAdminClient, settings: Settings, job: Job, sp: str) -> None:
    """Refuse a job that has state; clean up what a killed load of this savepoint left."""
    busy = await group_members(admin, [job.group_id(s) for s in job.stages])
    if busy:
        raise SavepointError(f"job {job.name!r} is running ({', '.join(busy)}): stop it first")
    topic = identity_topic(job)
    existing = set(await admin.list_topics())
    owned = [t for t in existing if t.startswith(f"{job.name}.") and t != job.dead_letter_topic]
    if not owned:
        return
    marks = await _identity_keys(settings, topic) if topic in existing else {}
    loading = marks.get(LOADING_KEY)
    if loading is not None and orjson.loads(loading).get("savepoint") == sp:
        log.warning(
            "a load of savepoint %s into %r was interrupted: starting it over", sp, job.name
        )
        await carry_out(admin, settings, await plan_reset(admin, settings, job))
        return
    raise SavepointError(
        f"job {job.name!r} already has state or topics ({', '.join(sorted(owned)[:5])}...): a "
        "savepoint is loaded into a job without state. Run `headrace reset MODULE:JOB --yes` "
        "first, or load it under a new job name"
    )


async def _identity_keys(settings: Settings, topic: str) -> dict[bytes, bytes | None]:
    from headrace.runtime.inspect import read_all

    latest: dict[bytes, bytes | None] = {}
    for r in await read_all(settings, [TopicPartition(topic, 0)], committed=False):
        if r.key is not None:
            latest[r.key] = r.value
    return latest


async def _write_state(
    producer: Any,
    job: Job,
    layout: Any,
    path: Path,
    mapping: dict[str, str],
    header: dict[str, Any],
    plans: dict[tuple[str, str], Migration],
) -> tuple[LoadReport, dict[tuple[str, int], int]]:
    """Write every entry to its target changelog partition, a frame of entries at a time,
    through the batch sender the commits use (records appended to batches, not one send
    each); returns the last offset written per (operator, partition)."""
    report = LoadReport(header["id"])
    sender = BatchSender(producer, {})
    deliveries: dict[tuple[str, int], list[Delivery]] = {}
    steps = {step.operator_id: (stage, step) for stage, step in job.stateful_operators()}
    saved = {op: len(doc["entries"]) for op, doc in header["operators"].items()}
    for old_op, old_partition, entries in sections(path):
        maybe_crash("savepoint-load")
        op = mapping.get(old_op, old_op)
        stage, step = steps[op]
        n = layout.partitions_of(stage)
        topic = job.changelog_topic(op)
        groups: dict[int, list[tuple[bytes, bytes | None]]] = {}
        prefixes: dict[int, bytes] = {}
        routed = stage.source.internal or n != saved[old_op]
        for suffix, raw in entries:
            if routed or plans:
                state, user_key, _ = split_state_suffix(suffix)
                # a timer's key ends with the record key it belongs to (task/timers.py): it
                # moves with that key's state
                route = user_key[9:] if state == Operator.TIMER_STATE else user_key
            if stage.source.internal:
                p = zlib.crc32(route) % n  # the repartitioner's rule (task/chain.py)
            elif n == saved[old_op]:
                p = old_partition
            else:
                # The source gained partitions: producers now send a key where Kafka's
                # default partitioner (murmur2 of the key bytes, as in the Java client and
                # aiokafka) puts it; its state goes there too (topics.SOURCE_GREW).
                p = default_partition(route, n)
            group = groups.get(p)
            if group is None:
                group = groups[p] = []
                prefixes[p] = partition_prefix(StatePartitionKey(op, p, p))
                if (op, p) not in deliveries:  # first entries there: the state metadata first
                    store = OperatorStateStore(open_backend("memory"), StatePartitionKey(op, p, p))
                    store.bind_operator(step.instantiate())
                    group.extend(store.take_changes())
            migration = plans.get((op, state)) if plans else None
            if migration is not None:
                try:
                    raw = migration(raw)
                except Exception as exc:
                    raise SavepointError(
                        f"migrating state {state!r} of {op!r} for key {bytes(user_key)!r} "
                        f"failed: {type(exc).__name__}: {exc} (nothing was loaded in full; "
                        "run the load again once the function is fixed)"
                    ) from exc
            group.append((prefixes[p] + suffix, raw))
        for p, pairs in groups.items():
            deliveries.setdefault((op, p), []).extend(await sender.send_pairs(topic, p, pairs))
        report.entries[op] = report.entries.get(op, 0) + len(entries)
        report.partitions[op] = n
    last: dict[tuple[str, int], int] = {}
    for target, sent in deliveries.items():
        offset = await last_offset(sent)
        assert offset is not None
        last[target] = offset
    return report, last


async def _commit(
    settings: Settings,
    job: Job,
    layout: Any,
    header: dict[str, Any],
    last: dict[tuple[str, int], int],
) -> None:
    """Per stage, offsets whose checkpoint metadata makes the written changelog its state."""
    checkpoint = int(header["checkpoint"])
    sources = {
        TopicPartition(t, int(p)): off
        for t, _, p in (k.rpartition(":") for k in header["sources"])
        for off in [header["sources"][f"{t}:{p}"]]
    }
    for stage in job.stages:
        ops = [step.operator_id for st, step in job.stateful_operators() if st is stage]
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for p in range(layout.partitions_of(stage)):
            cl = {op: last[(op, p)] for op in ops if (op, p) in last}
            meta = CheckpointMetadata(checkpoint, changelog_offsets=cl).encode()
            for topic in stage.source.topics:
                tp = TopicPartition(topic, p)
                if stage.source.internal:
                    offsets[tp] = OffsetAndMetadata(0, meta)
                else:
                    # a partition the source gained after the savepoint starts at its
                    # beginning, with the state the load gave it
                    offsets[tp] = OffsetAndMetadata(sources.get(tp, 0), meta)
        if offsets:
            await commit_offsets(settings, job.group_id(stage), offsets)
