"""Taking a savepoint of a stopped, drained job (``headrace savepoint create``)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import orjson
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from headrace.operators.job import Job, Stage
from headrace.runtime.checkpoint.lag import Tail, data_lag
from headrace.runtime.checkpoint.log import CheckpointAck
from headrace.runtime.checkpoint.metadata import CheckpointMetadata
from headrace.runtime.checkpoint.restore import RestoreTarget, restore
from headrace.runtime.config import Settings
from headrace.runtime.faults import maybe_crash
from headrace.runtime.inspect import read_all
from headrace.runtime.kafka import clients
from headrace.runtime.kafka.control import clear_drain, request_drain
from headrace.runtime.kafka.identity import describe
from headrace.runtime.kafka.reset import group_members
from headrace.runtime.kafka.topics import topic_partitions
from headrace.runtime.savepoint.fileformat import (
    _BATCH,
    ENTRIES,
    HEADER,
    SECTION,
    SavepointError,
    Writer,
)
from headrace.runtime.state.backend import open_backend
from headrace.runtime.state.keys import StatePartitionKey, partition_prefix
from headrace.runtime.state.store import OperatorStateStore

log = logging.getLogger(__name__)


# -- create -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Committed:
    offset: int
    meta: CheckpointMetadata | None


async def _committed(
    admin: AIOKafkaAdminClient, group: str, tps: list[TopicPartition]
) -> dict[TopicPartition, _Committed]:
    found = await admin.list_consumer_group_offsets(group, partitions=tps)
    return {
        tp: _Committed(om.offset, CheckpointMetadata.decode(om.metadata))
        for tp, om in found.items()
        if om is not None and om.offset >= 0
    }


async def create_savepoint(
    settings: Settings, job: Job, path: Path, *, stop: bool = False, wait_s: float = 600
) -> dict[str, Any]:
    """Write the state of ``job`` to ``path``; the header.

    A stopped job must be drained (nothing between stages). A running job is asked through
    ``<job>.control`` (:mod:`headrace.runtime.kafka.control`) to pause its input: with
    ``stop`` its workers drain and stop, and the savepoint follows once they are gone;
    without, they keep running, and the savepoint is taken once a complete, aligned
    checkpoint was cut after the pause and everything in flight is consumed; deleting the
    request afterwards resumes the input.
    """
    requested = await _quiesce(settings, job, stop=stop, wait_s=wait_s)
    try:
        committed, partitions = await _committed_cut(settings, job)
        await _check_drained(settings, job, committed, partitions)
        return await _write(settings, job, path, committed, partitions)
    finally:
        if requested:  # a later start is not drained again; a running job resumes
            await clear_drain(settings, job)


async def _quiesce(settings: Settings, job: Job, *, stop: bool, wait_s: float) -> bool:
    """Nothing for a stopped job; for a running one, a drain request and the wait for its
    effect (see :func:`create_savepoint`). True if a request was made."""
    admin = clients.admin_client(settings, client_id="headrace-savepoint")
    await admin.start()
    try:
        groups = [job.group_id(s) for s in job.stages]
        busy = await group_members(admin, groups)
        if not busy:
            return False
        at = await request_drain(settings, job, stop=stop)
        log.info(
            "asked the workers of job %r to pause their input%s",
            job.name,
            " and stop" if stop else "",
        )
        deadline = time.monotonic() + wait_s
        while True:
            if time.monotonic() > deadline:
                raise SavepointError(
                    f"job {job.name!r} did not {'stop' if stop else 'quiesce'} within "
                    f"{wait_s:.0f} s (members in {', '.join(busy) or 'none'})"
                    + ("; the request stays in force for the workers still running" if stop else "")
                )
            await asyncio.sleep(1.0)
            if stop:
                busy = await group_members(admin, groups)
                if not busy:
                    return True
            elif await _quiet_since(settings, job, at):
                return True
    except BaseException:
        if not stop:
            await clear_drain(settings, job)
        raise
    finally:
        await admin.close()


#: how long after a pause request every worker has seen it (they poll every second)
_SEEN_WITHIN_S = 2.0


async def _quiet_since(settings: Settings, job: Job, at: float) -> bool:
    """A complete, aligned checkpoint of every task was cut after every worker paused, and
    the stages behind a ``key_by`` have consumed all data: the committed state is a cut
    that no longer moves."""
    committed, partitions = await _committed_cut(settings, job)
    expected = {f"{s.name}/{p}" for s in job.stages for p in range(partitions[s.source.topics[0]])}
    records = await read_all(settings, [TopicPartition(job.checkpoint_topic, 0)], committed=True)
    acks = [CheckpointAck.decode(r.value) for r in records if r.value]
    after = (at + _SEEN_WITHIN_S) * 1000
    by_id: dict[int, list[CheckpointAck]] = {}
    for a in acks:
        if a.job == job.name:
            by_id.setdefault(a.checkpoint_id, []).append(a)
    cut_after_pause = any(
        expected <= {a.task for a in group}
        and all(a.aligned and a.timestamp_ms - a.duration_ms > after for a in group)
        for group in by_id.values()
    )
    if not cut_after_pause:
        return False
    try:
        await _check_drained(settings, job, committed, partitions)
    except SavepointError:
        return False
    return True


async def _committed_cut(
    settings: Settings, job: Job
) -> tuple[dict[str, dict[TopicPartition, _Committed]], dict[str, int]]:
    """Per stage, the committed offsets (and checkpoint metadata); partition counts."""
    admin = clients.admin_client(settings, client_id="headrace-savepoint")
    await admin.start()
    try:
        changelogs = [job.changelog_topic(step.operator_id) for _, step in job.stateful_operators()]
        partitions = await topic_partitions(
            admin, [t for s in job.stages for t in s.source.topics] + changelogs
        )
        missing = [t for s in job.stages for t in s.source.topics if t not in partitions]
        if missing:
            raise SavepointError(f"topics {missing} do not exist: has job {job.name!r} run here?")
        committed: dict[str, dict[TopicPartition, _Committed]] = {}
        for stage in job.stages:
            tps = [TopicPartition(t, p) for t in stage.source.topics for p in range(partitions[t])]
            committed[stage.name] = await _committed(admin, job.group_id(stage), tps)
        return committed, partitions
    finally:
        await admin.close()


async def _write(
    settings: Settings,
    job: Job,
    path: Path,
    committed: dict[str, dict[TopicPartition, _Committed]],
    partitions: dict[str, int],
) -> dict[str, Any]:
    source = job.stages[0]
    header: dict[str, Any] = {
        "id": uuid.uuid4().hex[:12],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "guarantee": str(settings.processing_guarantee),
        "job": describe(job),
        "checkpoint": max(
            (c.meta.checkpoint_id for cs in committed.values() for c in cs.values() if c.meta),
            default=0,
        ),
        "sources": {
            f"{tp.topic}:{tp.partition}": c.offset for tp, c in committed[source.name].items()
        },
        "stages": {s.name: partitions[s.source.topics[0]] for s in job.stages},
        "operators": {},
    }
    writer = Writer(path)
    try:
        writer.frame(HEADER, orjson.dumps(header))
        consumer = clients.reader(settings, client_id="headrace-savepoint")
        await consumer.start()
        try:
            for stage, step in job.stateful_operators():
                op = step.operator_id
                # the changelog's count: a source may have gained partitions since (they hold
                # no state yet; see topics.SOURCE_GREW)
                n = partitions.get(job.changelog_topic(op), 0)
                counts = []
                for p in range(n):
                    entries = await _operator_entries(
                        consumer, settings, job, stage, step, p, committed[stage.name]
                    )
                    writer.frame(SECTION, orjson.dumps({"operator": op, "partition": p}))
                    for i in range(0, len(entries), _BATCH):
                        writer.frame(ENTRIES, msgpack.packb(entries[i : i + _BATCH]))
                    writer.entries += len(entries)
                    maybe_crash("savepoint-write")
                    counts.append(len(entries))
                header["operators"][op] = {"stage": stage.name, "entries": counts}
        finally:
            await consumer.stop()
        # the per-operator counts are known only now: a second header frame, read last-wins
        writer.frame(HEADER, orjson.dumps(header))
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    log.info("savepoint %s of job %r written to %s", header["id"], job.name, path)
    return header


async def _check_drained(
    settings: Settings,
    job: Job,
    committed: dict[str, dict[TopicPartition, _Committed]],
    partitions: dict[str, int],
) -> None:
    """Nothing in flight between stages: the cut is then one state of the whole job."""
    tails: dict[TopicPartition, Tail] = {}
    if len(job.stages) < 2:
        return  # nothing between stages (and aiokafka 0.14 can hang stopping an idle reader)
    consumer = clients.reader(settings, client_id="headrace-savepoint")
    await consumer.start()
    try:
        for stage in job.stages[1:]:
            topic = stage.source.topics[0]
            tps = [TopicPartition(topic, p) for p in range(partitions[topic])]
            ends = await consumer.end_offsets(tps)
            firsts = await consumer.beginning_offsets(tps)
            for tp in tps:
                c = committed[stage.name].get(tp)
                tails[tp] = Tail(
                    c.offset if c else None, ends[tp], firsts[tp], c.meta if c else None
                )
    finally:
        await consumer.stop()
    lags = await data_lag(settings, tails)
    busy = {f"{tp.topic}[{tp.partition}]": n for tp, (n, _) in lags.items() if n}
    if busy:
        raise SavepointError(
            f"records are still in flight between stages ({busy}): a savepoint needs a "
            "drained job. Start the job with its producers stopped, wait until `headrace "
            "status` shows no lag, stop it with SIGTERM, then create the savepoint"
        )


async def _operator_entries(
    consumer: Any,
    settings: Settings,
    job: Job,
    stage: Stage,
    step: Any,
    partition: int,
    committed: dict[TopicPartition, _Committed],
) -> list[list[Any]]:
    """One operator's entries in one partition, restored at the committed checkpoint."""
    op = step.operator_id
    store = OperatorStateStore(open_backend("memory"), StatePartitionKey(op, partition, partition))
    store.bind_operator(step.instantiate())
    metas = [
        c.meta for tp, c in committed.items() if tp.partition == partition and c.meta is not None
    ]
    valid_until = None
    if not settings.exactly_once:
        valid_until = max((m.changelog_offsets.get(op, -1) for m in metas), default=-1)
    await restore(consumer, [RestoreTarget(store, job.changelog_topic(op), partition, valid_until)])
    # the key without its partition part: moving it to another partition is a new prefix
    cut = len(partition_prefix(store.partition_key))
    return [[skey[cut:], raw] for skey, raw in store.storage_keys()]
