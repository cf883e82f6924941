"""The topics a job reads, writes and owns, checked and created before anything is consumed.

Partition counts of internal topics follow their source: a repartition topic has the partition
count of the stage that writes it (unless ``key_by(partitions=...)`` says otherwise), and a
changelog has one partition per task of its stage. headrace creates what is missing and refuses
to start, naming the topic, when an existing one does not fit (ARCHITECTURE.md section 4): a wrong
partition count would silently send keys to the wrong task and state to the wrong changelog.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from headrace.operators.job import Job, RepartitionSpec, Stage
from headrace.operators.state import declared_state
from headrace.runtime.kafka.clients import MAX_REQUEST_SIZE

log = logging.getLogger(__name__)


class TopicConfigError(RuntimeError):
    """A topic is missing or does not fit the job; raised at start-up, before consuming."""


@dataclass(frozen=True, slots=True)
class InternalTopic:
    name: str
    partitions: int
    compact: bool
    configs: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class TopicLayout:
    """Partition counts of every stage's input, and the internal topics they imply."""

    stage_partitions: dict[str, int]
    internal: list[InternalTopic]
    sinks: dict[str, int]
    #: the largest record each sink and internal topic takes: its max.message.bytes, capped
    #: by the producer's max.request.size (read at start-up; empty: the producer's limit)
    record_limits: dict[str, int] = field(default_factory=dict)

    def partitions_of(self, stage: Stage) -> int:
        return self.stage_partitions[stage.name]

    def downstream_partitions(self, stage: Stage) -> int | None:
        output = stage.output
        if isinstance(output, RepartitionSpec):
            return next(t.partitions for t in self.internal if t.name == output.topic)
        return None


async def topic_partitions(
    admin: AIOKafkaAdminClient, topics: list[str], *, led: bool = False
) -> dict[str, int]:
    """Partition count per existing topic (missing topics are absent from the result; with
    ``led``, so is a topic with a partition that has no leader yet).

    Only topics that exist are described: a metadata request naming a missing topic makes a
    broker with ``auto.create.topics.enable=true`` create it with its default partition count,
    which would then be "wrong" for a changelog or repartition topic.
    """
    present = set(await admin.list_topics())
    names = [t for t in topics if t in present]
    found: dict[str, int] = {}
    if not names:
        return found
    for t in await admin.describe_topics(names):
        partitions = t.get("partitions")
        if t.get("error_code", 0) != 0 or not partitions:
            continue
        if led and not all(
            p.get("error_code", 0) == 0 and p.get("leader", -1) >= 0 for p in partitions
        ):
            continue
        found[t["topic"]] = len(partitions)
    return found


def plan_layout(
    job: Job,
    source_partitions: int,
    sinks: dict[str, int],
    existing: dict[str, int] | None = None,
) -> TopicLayout:
    """The partition count of every stage and internal topic.

    A repartition topic without ``key_by(partitions=...)`` gets its source's count when it is
    created, and keeps the count it has once it exists (``existing``): partitions added to the
    source later give the source stage more tasks (more upstream channels downstream), they do
    not move the keys of the stages behind the ``key_by``.
    """
    existing = existing or {}
    stage_partitions: dict[str, int] = {}
    internal: list[InternalTopic] = []
    partitions = source_partitions
    for stage in job.stages:
        stage_partitions[stage.name] = partitions
        if stage.source.internal:  # its checkpoints may spill (checkpoint/metadata.py)
            internal.append(InternalTopic(job.cuts_topic(stage), partitions, compact=True))
        for step in stage.process_steps():
            if declared_state(type(step.prototype)):
                internal.append(
                    InternalTopic(job.changelog_topic(step.operator_id), partitions, compact=True)
                )
        if isinstance(stage.output, RepartitionSpec):
            partitions = stage.output.partitions or existing.get(stage.output.topic) or partitions
            internal.append(InternalTopic(stage.output.topic, partitions, compact=False))
    internal.append(
        InternalTopic(
            job.checkpoint_topic, 1, compact=False, configs={"retention.ms": str(86_400_000)}
        )
    )
    internal.append(InternalTopic(job.dead_letter_topic, 1, compact=False))
    # Requests to the running workers (runtime/kafka/control.py): stop-with-savepoint.
    internal.append(InternalTopic(f"{job.name}.control", 1, compact=True))
    # What the job is (runtime/kafka/identity.py): checked and written before this layout.
    internal.append(InternalTopic(identity_topic(job), 1, compact=True))
    # Worker status for `headrace status` (runtime/status.py): latest record per worker.
    internal.append(
        InternalTopic(
            status_topic(job), 1, compact=True, configs={"delete.retention.ms": str(3_600_000)}
        )
    )
    return TopicLayout(stage_partitions, internal, sinks)


#: the refusal when the source of a stateful source stage gained partitions (README
#: "Rescaling and savepoints" runs this procedure)
SOURCE_GREW = (
    "job {job!r}: its source topic gained partitions, and its first stage keeps state per "
    "source partition ({topics}): the producers' partitioner now sends some keys to other "
    "partitions than the ones holding their state, so going on would split their state. The "
    "procedure: (1) stop the producers and let the job drain (`headrace status` shows no "
    "lag), (2) stop every worker with SIGTERM, (3) `headrace savepoint create MODULE:JOB "
    "FILE`, (4) `headrace reset MODULE:JOB --yes`, (5) `headrace run MODULE:JOB "
    "--from-savepoint FILE` (the state is redistributed with Kafka's default partitioner, "
    "murmur2 of the key bytes, which producers must use), (6) resume the producers. The "
    "savepoint of step 3 can be taken after the partitions were added, as long as the job "
    "processed nothing since"
)


def identity_topic(job: Job) -> str:
    """``<job>.identity``: what the job is, recorded by its first worker (kafka/identity.py)."""
    return f"{job.name}.identity"


def status_topic(job: Job) -> str:
    """``<job>.status``: each worker's latest status record, keyed by worker id."""
    return f"{job.name}.status"


async def ensure_topics(
    admin: AIOKafkaAdminClient, job: Job, *, replication_factor: int = 1
) -> TopicLayout:
    """Check sources and sinks, create missing internal topics, verify existing ones."""
    job.validate()
    sources = list(job.stages[0].source.topics)
    sink_topics = job.output_topics()  # sinks and late-data topics
    found = await topic_partitions(admin, sources + sink_topics)
    missing = [t for t in sources + sink_topics if t not in found]
    if missing:
        raise TopicConfigError(
            f"job {job.name!r}: topic(s) {', '.join(missing)} do not exist; create the source "
            "and sink topics (and late topics) before starting the job (headrace only creates "
            "its own topics)"
        )
    counts = {t: found[t] for t in sources}
    if len(set(counts.values())) > 1:
        raise TopicConfigError(
            f"job {job.name!r}: source topics must be co-partitioned (same partition count), "
            f"found {counts}"
        )
    hops = [s.output.topic for s in job.stages if isinstance(s.output, RepartitionSpec)]
    layout = plan_layout(
        job,
        counts[sources[0]],
        {t: found[t] for t in sink_topics},
        await topic_partitions(admin, hops),
    )

    wanted = {t.name: t for t in layout.internal}
    existing = await create_and_await_topics(admin, layout.internal, replication_factor)
    wrong = [
        f"{name} has {existing.get(name)} partitions, expected {t.partitions}"
        for name, t in wanted.items()
        if existing.get(name) != t.partitions
    ]
    if wrong:
        source_state = [
            t.name
            for t in layout.internal
            if t.name
            in {job.changelog_topic(step.operator_id) for step in job.stages[0].process_steps()}
            and existing.get(t.name) != t.partitions
        ]
        if source_state:
            raise TopicConfigError(SOURCE_GREW.format(job=job.name, topics=", ".join(source_state)))
        raise TopicConfigError(
            f"job {job.name!r}: internal topics do not fit: {'; '.join(wrong)}. Their partition "
            "counts follow the source topics; delete them (state is lost) or restore the source "
            "partition count"
        )
    sizes = await topic_config(admin, [*wanted, *sink_topics], "max.message.bytes")
    layout.record_limits = {t: min(int(v), MAX_REQUEST_SIZE) for t, v in sizes.items()}
    policies = await topic_config(
        admin, [t.name for t in wanted.values() if t.compact], "cleanup.policy"
    )
    not_compacted = [n for n, p in policies.items() if "compact" not in p]
    if not_compacted:
        raise TopicConfigError(
            f"job {job.name!r}: changelog topic(s) {', '.join(not_compacted)} must have "
            "cleanup.policy=compact, or old state would be deleted by retention"
        )
    return layout


async def create_and_await_topics(
    admin: AIOKafkaAdminClient, topics: list[InternalTopic], replication_factor: int
) -> dict[str, int]:
    """Create the missing ones of ``topics``, then wait for every partition of all of them to
    have a leader (:func:`await_topics`); returns their partition counts.

    Every worker waits for the leaders, not only the one that created the topics: workers
    starting together find topics another one created a moment ago, possibly still without
    leaders in the metadata. (The broker may still answer ``NotLeaderForPartition`` for a few
    seconds after it published a leader, while it loads a thousand new partitions; clients
    retry that, and no metadata says when it ends.) An existing topic is awaited with the
    count it has (a wrong count is the caller's to report, not to wait for); topics that are
    all led cost one metadata request.
    """
    existing = await topic_partitions(admin, [t.name for t in topics])
    to_create = [t for t in topics if t.name not in existing]
    if to_create:
        log.info("creating topics: %s", ", ".join(t.name for t in to_create))
        for name, code in await create_internal_topics(admin, to_create, replication_factor):
            raise TopicConfigError(f"could not create topic {name!r}: error code {code}")
    return await await_topics(admin, {t.name: existing.get(t.name, t.partitions) for t in topics})


async def await_topics(
    admin: AIOKafkaAdminClient, wanted: dict[str, int], wait_s: float = 15.0
) -> dict[str, int]:
    """Wait until freshly created topics have their partition counts and a leader for every
    partition (metadata propagates asynchronously), polling every 0.2 s; then their partition
    counts (after ``wait_s``: whatever the broker says, leaders or not).

    Why wait for the leaders too: a client that reads or writes a partition without a leader
    retries at once, without a backoff (aiokafka's offset lookup asks for metadata again and
    again: 500-600 metadata requests and as many ERROR lines per worker in the 2.5 s a fresh
    identity topic took to get its leader with four workers starting on two cores).
    """
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        existing = await topic_partitions(admin, list(wanted), led=True)
        if all(existing.get(name) == count for name, count in wanted.items()):
            return existing
        if asyncio.get_running_loop().time() > deadline:
            return await topic_partitions(admin, list(wanted))
        await asyncio.sleep(0.2)


async def topic_config(admin: AIOKafkaAdminClient, topics: list[str], name: str) -> dict[str, str]:
    """The effective value of config ``name`` per topic (its own, else the broker's default)."""
    if not topics:
        return {}
    resources = [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics]
    out: dict[str, str] = {}
    for response in await admin.describe_configs(resources):
        obj: Any = response.to_object()
        for res in obj["resources"]:
            for entry in res["config_entries"]:
                if entry["config_names"] == name:
                    out[res["resource_name"]] = entry["config_value"]
    return out


async def create_internal_topics(
    admin: AIOKafkaAdminClient, topics: list[InternalTopic], replication_factor: int
) -> list[tuple[str, int]]:
    """Create ``topics`` (compacted or deleting, with their configs); returns the (name, error
    code) of those that could not be created. A topic another worker created meanwhile
    (``TOPIC_ALREADY_EXISTS``, 36) is not an error."""
    resp = await admin.create_topics(
        [
            NewTopic(
                t.name,
                t.partitions,
                replication_factor,
                topic_configs={"cleanup.policy": "compact" if t.compact else "delete", **t.configs},
            )
            for t in topics
        ]
    )
    return [(name, code) for name, code, *_ in resp.topic_errors if code not in (0, 36)]
