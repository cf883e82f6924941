"""What a faust agent is in headrace's words: the job, stage and topic layout of one bridge.

A bridge is one headrace **stage** whose records come from faust instead of a stage runner, so
that the task host (:class:`~headrace.runtime.host.StageHost`) can assemble, restore, claim,
open, feed and checkpoint its tasks exactly as it does for a worker. This module builds that
stage from what :func:`~headrace.runtime.integrations.faust.headrace_agent` was given:

* a bridge reading a plain topic is a **source stage** (clock barriers, ``ClockCut``);
* a bridge writing a topic that another bridge of the same app reads is a **hop**: its output
  is a :class:`~headrace.operators.job.RepartitionSpec` (every record carries ``hr.ch`` and,
  from a source stage, ``hr.seq``; every checkpoint writes barriers), and the reading bridge's
  stage is fed by that hop (aligned barriers, ``AlignedCut``, with the ``hr.seq`` dedupe of
  :mod:`headrace.runtime.checkpoint.barrier`). Headrace's own dedupe and alignment then keep
  the downstream state exact across the hop, with no bridge-specific header.

Names follow a job called after the faust app id: the stage is the bridge's name, so the
group holding its checkpoints is ``<app id>.<name>`` (never faust's own group, whose commits
carry no metadata), its changelog ``<app id>.<name>.changelog`` (or the one given), the
checkpoint log ``<app id>.checkpoints``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient

from headrace.operators.job import Job, ProcessStep, RepartitionSpec, SinkSpec, SourceSpec, Stage
from headrace.operators.operator import Operator
from headrace.operators.record import Record
from headrace.operators.serde import Serde
from headrace.runtime.kafka.topics import (
    InternalTopic,
    TopicLayout,
    create_internal_topics,
    topic_config,
    topic_partitions,
)

#: the checkpoint log's retention (as the worker's, see kafka/topics.py plan_layout)
_CHECKPOINT_RETENTION_MS = 86_400_000


@dataclass(slots=True)
class BridgeSpec:
    """What one ``headrace_agent`` call asked for, with topics by name."""

    name: str
    operator: Operator
    source: str
    sink: str | None
    key_serde: Serde[Any]
    value_serde: Serde[Any]
    #: the sink's serdes: the ones given, else the sink topic's faust codecs
    sink_key_serde: Serde[Any]
    sink_value_serde: Serde[Any]
    changelog_topic: str


#: the bridges registered per faust app, to find the hops between them at start-up
_REGISTRY: weakref.WeakKeyDictionary[Any, list[BridgeSpec]] = weakref.WeakKeyDictionary()


def register(app: Any, spec: BridgeSpec) -> None:
    """Remember ``spec`` as one of ``app``'s bridges (hops are found among them)."""
    specs = _REGISTRY.setdefault(app, [])
    if any(s.name == spec.name for s in specs):
        raise ValueError(f"app {app.conf.id!r} already has a headrace_agent named {spec.name!r}")
    specs.append(spec)


def upstream_of(app: Any, spec: BridgeSpec) -> BridgeSpec | None:
    """The bridge of the same app that writes ``spec``'s source topic (None: a plain topic)."""
    writers = [s for s in _REGISTRY.get(app, []) if s.sink == spec.source and s is not spec]
    if len(writers) > 1:
        raise ValueError(
            f"bridges {', '.join(s.name for s in writers)} all write {spec.source!r}, which "
            f"bridge {spec.name!r} reads: a hop between bridges has one writer (their "
            "channels would collide)"
        )
    return writers[0] if writers else None


def feeds_a_bridge(app: Any, spec: BridgeSpec) -> bool:
    """True when another bridge of the app reads what ``spec`` writes: its output is a hop."""
    return spec.sink is not None and any(
        s.source == spec.sink and s is not spec for s in _REGISTRY.get(app, [])
    )


class BridgeJob(Job):
    """The job of a bridge: named after the app, with the changelog names the bridges chose
    (``headrace_agent(changelog_topic=...)`` may name one outside the job's scheme)."""

    def __init__(self, name: str, changelogs: dict[str, str]) -> None:
        super().__init__(name)
        self.changelogs = changelogs

    def changelog_topic(self, operator_id: str) -> str:
        return self.changelogs.get(operator_id) or super().changelog_topic(operator_id)


class _KeyedValue(Operator):
    """The last step before a hop: carries the key the operator emitted into the value, so
    that the hop's ``key_fn`` (which sees values only) partitions by that key."""

    def process(self, record: Record[Any, Any], ctx: Any) -> None:
        ctx.emit((record.key, record.value))


def _hop_key(pair: tuple[Any, Any]) -> Any:
    return pair[0]


def _hop_value(serde: Serde[Any]) -> Serde[Any]:
    def serialize(pair: tuple[Any, Any]) -> bytes:
        return serde.serialize(pair[1])

    return Serde(f"{serde.name}[hop]", serialize, serde.deserialize)


def faust_serde(app: Any, topic: Any, which: str) -> Serde[Any]:
    """A serde writing with the faust topic's own codec (``which``: ``key`` or ``value``);
    used when ``headrace_agent`` got no sink serde. Only ``serialize`` is ever called."""
    registry = app.serializers
    if which == "key":
        typ, codec, dump = topic.key_type, topic.key_serializer, registry.dumps_key
    else:
        typ, codec, dump = topic.value_type, topic.value_serializer, registry.dumps_value

    def serialize(obj: Any) -> bytes:
        data = dump(typ, obj, serializer=codec)
        return data.encode() if isinstance(data, str) else bytes(data)

    return Serde(f"faust:{codec}", serialize, bytes)


@dataclass(slots=True)
class BridgePlan:
    """The stage of one bridge and everything the host and the sender need to know of it."""

    job: BridgeJob
    stage: Stage
    layout: TopicLayout
    #: partition count of every topic this bridge writes (the BatchSender's map)
    partition_counts: dict[str, int] = field(default_factory=dict)

    @property
    def hop_fed(self) -> bool:
        return self.stage.source.internal


def _stage(app: Any, spec: BridgeSpec, index: int, fed: bool) -> Stage:
    steps: list[Any] = [ProcessStep(spec.name, spec.operator)]
    key_serde, value_serde = spec.sink_key_serde, spec.sink_value_serde
    output: SinkSpec | RepartitionSpec | None = None
    if spec.sink is not None and feeds_a_bridge(app, spec):
        steps.append(ProcessStep(f"{spec.name}.hop", _KeyedValue()))
        output = RepartitionSpec(spec.sink, _hop_key, key_serde, _hop_value(value_serde), None)
    elif spec.sink is not None:
        output = SinkSpec(spec.sink, key_serde, value_serde)
    source = SourceSpec((spec.source,), spec.key_serde, spec.value_serde, internal=fed)
    return Stage(index, spec.name, source, steps, output)


async def build_plan(
    app: Any, spec: BridgeSpec, admin: AIOKafkaAdminClient, *, replication_factor: int
) -> BridgePlan:
    """The bridge's stage, behind the stages of the bridges that feed it, with its topics
    checked (source, sink) and created (changelog, checkpoint log, cuts)."""
    chain = [spec]
    while (up := upstream_of(app, chain[0])) is not None:
        if up in chain:
            raise ValueError(f"bridges {[s.name for s in chain]} feed each other in a cycle")
        chain.insert(0, up)
    stages = [_stage(app, s, i, i > 0) for i, s in enumerate(chain)]
    job = BridgeJob(app.conf.id, {s.name: s.changelog_topic for s in chain})
    job.stages = stages
    stage = stages[-1]
    names = [s.source for s in chain] + ([spec.sink] if spec.sink else [])
    found = await topic_partitions(admin, names)
    missing = [t for t in names if t not in found]
    if missing:
        raise RuntimeError(f"headrace[{spec.name}]: topic(s) {missing} do not exist")
    partitions = found[spec.source]
    internal: list[InternalTopic] = [
        InternalTopic(
            job.checkpoint_topic,
            1,
            compact=False,
            configs={"retention.ms": str(_CHECKPOINT_RETENTION_MS)},
        )
    ]
    if any(st is stage for st, _ in job.stateful_operators()):
        internal.append(InternalTopic(spec.changelog_topic, partitions, compact=True))
    if stage.source.internal:
        internal.append(InternalTopic(job.cuts_topic(stage), partitions, compact=True))
    if isinstance(stage.output, RepartitionSpec):
        internal.append(InternalTopic(stage.output.topic, found[stage.output.topic], False))
    own = [t for t in internal if t.name != spec.sink]  # the hop topic is the user's
    await _ensure(admin, spec.name, own, partitions, replication_factor)
    layout = TopicLayout(
        {s.name: found[s.source] for s in chain},
        internal,
        {spec.sink: found[spec.sink]} if spec.sink else {},
    )
    counts = {t.name: t.partitions for t in internal}
    if spec.sink:
        counts[spec.sink] = found[spec.sink]
    return BridgePlan(job, stage, layout, counts)


async def _ensure(
    admin: AIOKafkaAdminClient,
    name: str,
    topics: list[InternalTopic],
    partitions: int,
    replication_factor: int,
) -> None:
    """Create the bridge's own topics that are missing; refuse a changelog or cuts topic whose
    partition count or cleanup policy does not fit (keys would go to the wrong task, or
    retention would delete state)."""
    existing = await topic_partitions(admin, [t.name for t in topics])
    new = [t for t in topics if t.name not in existing]
    if new:
        for topic, code in await create_internal_topics(admin, new, replication_factor):
            raise RuntimeError(f"headrace[{name}]: could not create {topic!r}: code {code}")
    compacted = [t for t in topics if t.compact and t.name in existing]
    policies = await topic_config(admin, [t.name for t in compacted], "cleanup.policy")
    for t in compacted:
        if existing[t.name] != partitions:
            raise RuntimeError(
                f"headrace[{name}]: {t.name!r} has {existing[t.name]} partitions, the source "
                f"has {partitions}: they must match (delete it, losing the state, or restore "
                "the count)"
            )
        if "compact" not in policies.get(t.name, ""):
            raise RuntimeError(
                f"headrace[{name}]: {t.name!r} must have cleanup.policy=compact, has "
                f"{policies.get(t.name, '')!r}: retention would delete state"
            )
