"""``headrace reset``: start a job over from scratch, deliberately (Kafka Streams' reset tool).

A job's state is its changelog topics, its committed offsets (with the checkpoint metadata in
them), its repartition topics (records in flight between stages, with sequence numbers the
next stage deduplicates on) and its identity record. They only make sense together: resetting
the offsets alone with ``kafka-consumer-groups`` leaves state that no offset explains, which a
worker now refuses to start from (:class:`headrace.runtime.host.CheckpointMissingError`). A
reset removes all of them at once:

1. refuse while any consumer group of the job has members (workers must be stopped first: a
   running worker would recreate what is being deleted, or commit over the reset);
2. delete the job's consumer groups (offsets and checkpoint metadata), then its internal
   topics: changelogs (also those of operators the job no longer has), repartition,
   checkpoints, identity and status topics. The dead-letter topic ``<job>.dlq`` is kept: it
   holds input the user may still want (``--delete-dead-letters`` removes it too);
3. commit the source offsets the user chose (earliest, latest, or the first record at or after
   a time), with no checkpoint metadata: the next start finds empty state and no checkpoint,
   which is consistent;
4. delete the job's local state directory on this machine. Other machines' directories are
   harmless: local state lives under the job's incarnation (:mod:`~.identity`), which a reset
   renews, so they are never read again (delete them to free the disk).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.admin import DeleteGroupsRequest
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from headrace.operators.job import Job
from headrace.runtime.config import Settings
from headrace.runtime.kafka import clients
from headrace.runtime.kafka.topics import plan_layout, topic_partitions

__all__ = ["ResetError", "ResetPlan", "carry_out", "plan_reset"]

log = logging.getLogger(__name__)

_GROUP_NOT_FOUND, _NON_EMPTY_GROUP = 69, 68


class ResetError(RuntimeError):
    """The reset cannot be done now (members in a group, a topic that will not go away)."""


@dataclass(slots=True)
class ResetPlan:
    job: Job
    groups: list[str]
    topics: list[str]
    #: source partition -> the offset its group will start from
    offsets: dict[TopicPartition, int]
    state_dir: Path | None
    kept: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"reset of job {self.job.name!r}:"]
        lines.append(f"  delete consumer groups: {', '.join(self.groups)}")
        lines.append(f"  delete topics: {', '.join(self.topics) or '(none exist)'}")
        by_topic: dict[str, list[str]] = {}
        for tp, off in sorted(self.offsets.items()):
            by_topic.setdefault(tp.topic, []).append(f"{tp.partition}:{off}")
        for topic, parts in by_topic.items():
            lines.append(f"  start {topic} at offsets (partition:offset) {' '.join(parts)}")
        if self.state_dir is not None:
            lines.append(f"  delete local state directory {self.state_dir}")
        if self.kept:
            lines.append(f"  keep: {', '.join(self.kept)}")
        return "\n".join(lines)


async def plan_reset(
    admin: AIOKafkaAdminClient,
    settings: Settings,
    job: Job,
    *,
    to: str = "earliest",
    delete_dead_letters: bool = False,
) -> ResetPlan:
    """What a reset would do; raises :class:`ResetError` while any group has members.

    ``to``: ``earliest``, ``latest`` or an ISO 8601 time (the first record at or after it).
    """
    job.validate()
    groups = [job.group_id(stage) for stage in job.stages]
    busy = await group_members(admin, groups)
    if busy:
        raise ResetError(
            "the job is running: "
            + "; ".join(f"group {g} has member(s) on {', '.join(h)}" for g, h in busy.items())
            + ". Stop every worker of the job, then reset (a running worker would recreate "
            "what the reset deletes)"
        )
    existing = set(await admin.list_topics())
    sources = list(job.stages[0].source.topics)
    counts = await topic_partitions(admin, sources)
    missing = [t for t in sources if t not in counts]
    if missing:
        raise ResetError(f"source topic(s) {', '.join(missing)} do not exist")
    layout = plan_layout(job, counts[sources[0]], {})
    owned = {t.name for t in layout.internal}
    prefix = f"{job.name}."
    owned |= {
        t
        for t in existing
        if t.startswith(prefix) and t.endswith((".changelog", ".repartition", ".cuts"))
    }
    kept = []
    if not delete_dead_letters:
        owned.discard(job.dead_letter_topic)
        if job.dead_letter_topic in existing:
            kept.append(f"{job.dead_letter_topic} (dead letters; --delete-dead-letters)")
    tps = [TopicPartition(t, p) for t in sources for p in range(counts[t])]
    offsets = await _offsets(settings, tps, to)
    state_dir = settings.state_dir / job.name
    return ResetPlan(
        job,
        groups,
        sorted(owned & existing),
        offsets,
        state_dir if state_dir.exists() else None,
        kept,
    )


async def carry_out(admin: AIOKafkaAdminClient, settings: Settings, plan: ResetPlan) -> None:
    """Do what ``plan`` says, in the order of the module docstring."""
    coordinator = {g: await admin.find_coordinator(g) for g in plan.groups}
    for group, node in coordinator.items():
        # aiokafka 0.14's admin client has no delete_consumer_groups: the DeleteGroups request
        # (Kafka API 42) is sent to the group's coordinator directly.
        response = await admin._send_request_to_node(node, DeleteGroupsRequest([group]))
        for gid, code in response.results:
            if code == _NON_EMPTY_GROUP:
                raise ResetError(f"group {gid} got a member meanwhile: stop its workers first")
            if code not in (0, _GROUP_NOT_FOUND):
                raise ResetError(f"could not delete group {gid}: error code {code}")
    if plan.topics:
        await admin.delete_topics(plan.topics)
        await _until_gone(admin, plan.topics)
    if plan.offsets:
        await commit_offsets(settings, plan.groups[0], plan.offsets)
    if plan.state_dir is not None:
        shutil.rmtree(plan.state_dir)
    log.info("job %r reset", plan.job.name)


async def group_members(admin: AIOKafkaAdminClient, groups: list[str]) -> dict[str, list[str]]:
    """Per group that has members, the hosts they run on (groups without any are left out)."""
    busy: dict[str, list[str]] = {}
    for gid in groups:
        # One group per request: aiokafka 0.14 fails to decode the answer for several
        # ("Buffer underrun decoding string").
        for response in await admin.describe_consumer_groups([gid]):
            for group in response.to_object()["groups"]:
                members = group.get("members") or []
                if members:
                    busy[group["group"]] = sorted({m["client_host"] for m in members})
    return busy


async def _offsets(
    settings: Settings, tps: list[TopicPartition], to: str
) -> dict[TopicPartition, int]:
    consumer = clients.reader(settings, client_id="headrace-reset", committed_only=False)
    await consumer.start()
    try:
        if to == "earliest":
            return dict(await consumer.beginning_offsets(tps))
        ends = await consumer.end_offsets(tps)
        if to == "latest":
            return dict(ends)
        try:
            when = datetime.fromisoformat(to)
        except ValueError as exc:
            raise ResetError(
                f"--to {to!r}: expected earliest, latest or an ISO 8601 time "
                "(2026-12-03T09:00:00+00:00)"
            ) from exc
        if when.tzinfo is None:
            raise ResetError(f"--to {to!r}: give the time zone (+00:00 for UTC)")
        found = await consumer.offsets_for_times(dict.fromkeys(tps, int(when.timestamp() * 1000)))
        return {tp: (found[tp].offset if found.get(tp) else ends[tp]) for tp in tps}
    finally:
        await consumer.stop()


async def commit_offsets(
    settings: Settings, group: str, offsets: Mapping[TopicPartition, int | OffsetAndMetadata]
) -> None:
    """Commit ``offsets`` for ``group`` from outside it (its members must be gone)."""
    consumer = clients.group_consumer(settings, group, client_id="headrace-offsets")
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit(offsets)
    finally:
        await consumer.stop()


async def _until_gone(admin: AIOKafkaAdminClient, topics: list[str], wait_s: float = 60) -> None:
    """Topic deletion completes asynchronously; a worker started right after the reset must
    not find a topic half deleted."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        left = set(topics) & set(await admin.list_topics())
        if not left:
            return
        if loop.time() > deadline:
            raise ResetError(f"topics still exist {wait_s:.0f}s after deletion: {sorted(left)}")
        await asyncio.sleep(0.5)
