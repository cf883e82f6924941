"""Who owns a job name: the job's identity, recorded in Kafka and checked at every start.

A job's name prefixes every topic and consumer group it owns, so two programs started under
one name share state: the second one used to continue the first one's counts silently (run one
after the other) or die of a bare ``ProducerFenced`` (run together). And a new deployment of
the same job could drop, rename or re-type a stateful operator, and its state would be lost or
read with the wrong serde. So before anything is consumed or any internal topic is created, a
worker compares what the job *is* with what was recorded under its name, in the compacted
topic ``<job>.identity``:

* the description (:func:`describe`): the sources, each stage's input and key serde, and every
  stateful operator with its stage and its states (kind, serdes, TTL, format version), plus a
  fingerprint of it. Stateless steps and sinks are listed for the reader but hold no state.
* **the same** fingerprint: the job resumes.
* **a safe change** (:func:`compare`): stateless steps or sinks changed, a stateful operator
  added (with no state left under its name), a state added to an operator, an operator's
  class renamed with the same states. Accepted, logged line by line, and recorded.
* **anything else** is refused with the readable difference and what to do: a source changed
  (most likely a different job under a name in use), a stateful operator removed or renamed
  while its changelog holds state, a state removed or its kind, serde or TTL changed, an
  operator moved to another stage, a stage's key serde changed.

Several workers start at once, and two different jobs may race for a fresh name. Every worker
writes only after reading, and decides from the whole topic, read in offset order, which is
the same for every reader: the first record is the identity; a later record replaces it only if
it is a safe change of it (a refused writer's record is ignored by everyone). A worker that
wrote re-reads and goes on only if the identity in force is its own job (or a safe change of
it). Kafka orders the records; no lock is needed.

A name used before this check existed has internal topics but no record: changelog topics of
operators the job does not have are refused the same way (their state would be orphaned, or
come back under a recycled name later).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition

from headrace.operators.job import Job, RepartitionSpec, SinkSpec, Step
from headrace.operators.state import declared_state
from headrace.runtime.config import Settings
from headrace.runtime.kafka import clients
from headrace.runtime.kafka.topics import (
    TopicConfigError,
    await_topics,
    identity_topic,
    topic_partitions,
)
from headrace.runtime.state.store import StateMetadata

__all__ = ["JobIdentityError", "check_identity", "compare", "describe", "identity_topic"]

log = logging.getLogger(__name__)

FORMAT = 1
_KEY = b"identity"


class JobIdentityError(TopicConfigError):
    """The job does not match what runs (or ran) under its name; raised before consuming."""


def describe(job: Job) -> dict[str, Any]:
    """What the job is, as far as its state is concerned (plus readable stateless parts)."""
    stages = []
    operators: dict[str, Any] = {}
    own = f"{job.name}."

    def topic(name: str) -> str:  # the job's own topics without its name (a savepoint moves)
        return "<job>." + name[len(own) :] if name.startswith(own) else name

    for stage in job.stages:
        output = _output_name(stage.output)
        stages.append(
            {
                "name": stage.name,
                "input": [topic(t) for t in stage.source.topics],
                "key_serde": stage.source.key_serde.name,
                "steps": [_step_name(step) for step in stage.steps],
                "output": None if output is None else output.replace(own, "<job>."),
            }
        )
    for stage, step in job.stateful_operators():
        states = {
            name: _state_doc(StateMetadata.of(desc))
            for name, desc in declared_state(type(step.prototype)).items()
        }
        operators[step.operator_id] = {
            "stage": stage.name,
            "class": type(step.prototype).__name__,
            "states": states,
        }
        # How an operator lays its state out, where that is configuration rather than its
        # declared states (a window's assigner and lateness: its keys are window starts and its
        # timers are at end + lateness). Only present where an operator says so.
        layout = getattr(step.prototype, "state_layout", None)
        if isinstance(layout, str):
            operators[step.operator_id]["layout"] = layout
    doc = {
        "job": job.name,
        "sources": list(job.stages[0].source.topics) if job.stages else [],
        "stages": stages,
        "operators": operators,
    }
    doc["fingerprint"] = fingerprint(doc)
    return doc


#: what a record carries besides the description itself
_NOT_IDENTITY = ("fingerprint", "recorded", "incarnation", "savepoint")


def fingerprint(doc: dict[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k not in _NOT_IDENTITY}
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def _state_doc(meta: StateMetadata) -> dict[str, Any]:
    return {
        "kind": meta.kind,
        "serde": meta.serde,
        "key_serde": meta.key_serde,
        "ttl": meta.ttl,
        "format": meta.format_version,
    }


def _step_name(step: Step) -> str:
    op_id = getattr(step, "operator_id", None)
    kind = type(step).__name__.removesuffix("Step").lower()
    return f"{kind} {op_id}" if op_id else kind


def _output_name(output: SinkSpec | RepartitionSpec | None) -> str | None:
    if isinstance(output, SinkSpec):
        return f"sink {output.topic}"
    if isinstance(output, RepartitionSpec):
        return f"key_by -> {output.topic}"
    return None


@dataclass(frozen=True, slots=True)
class Difference:
    """How a job differs from the identity recorded under its name."""

    safe: list[str]  #: accepted changes (logged)
    refused: list[str]  #: changes that would lose or mix state


def compare(
    recorded: dict[str, Any], job: dict[str, Any], *, has_state: set[str] | None = None
) -> Difference:
    """The difference from ``recorded`` to ``job`` (both from :func:`describe`).

    ``has_state``: operator ids whose changelog topic exists (None: assume every recorded
    operator has state). A recorded operator that is gone is refused only if state is left.
    """
    safe: list[str] = []
    refused: list[str] = []
    if recorded.get("sources") != job.get("sources"):
        refused.append(f"sources changed: {recorded.get('sources')} -> {job.get('sources')}")
    old_stages = {s["name"]: s for s in recorded.get("stages", [])}
    new_stages = {s["name"]: s for s in job.get("stages", [])}
    old_ops: dict[str, Any] = recorded.get("operators", {})
    new_ops: dict[str, Any] = job.get("operators", {})
    stateful_stages = {op["stage"] for op in new_ops.values()} | {
        op["stage"] for op in old_ops.values()
    }
    for name in sorted(old_stages.keys() | new_stages.keys()):
        old, new = old_stages.get(name), new_stages.get(name)
        if old is None or new is None:  # what it means for state is said per operator
            safe.append(f"stage {name} {'added' if old is None else 'removed'}")
            continue
        if old["key_serde"] != new["key_serde"] and name in stateful_stages:
            refused.append(
                f"key serde of stage {name} changed {old['key_serde']} -> {new['key_serde']} "
                "(state is stored under the serialized key)"
            )
        for part in ("input", "steps", "output"):
            if old[part] != new[part]:
                safe.append(f"stage {name}: {part} changed {old[part]} -> {new[part]}")
    for op_id in sorted(old_ops.keys() - new_ops.keys()):
        if has_state is None or op_id in has_state:
            refused.append(
                f"operator {op_id!r} removed or renamed (its state is in "
                f"{recorded['job']}.{op_id}.changelog)"
            )
        else:
            safe.append(f"operator {op_id!r} removed (its changelog topic is gone)")
    for op_id in sorted(new_ops.keys() - old_ops.keys()):
        if has_state is not None and op_id in has_state:
            refused.append(
                f"operator {op_id!r} added, but {job['job']}.{op_id}.changelog already holds "
                "state of an earlier operator of that name"
            )
        else:
            safe.append(f"operator {op_id!r} added (its state starts empty)")
    for op_id in sorted(old_ops.keys() & new_ops.keys()):
        old, new = old_ops[op_id], new_ops[op_id]
        if old["stage"] != new["stage"]:
            refused.append(f"operator {op_id!r} moved from {old['stage']} to {new['stage']}")
        if old["class"] != new["class"]:
            safe.append(f"operator {op_id!r}: class {old['class']} -> {new['class']}")
        if old.get("layout") != new.get("layout"):
            refused.append(
                f"operator {op_id!r} lays its state out differently: {old.get('layout')} -> "
                f"{new.get('layout')} (its state was made for the first; give the changed "
                "operator a new name, or reset the job)"
            )
        for state in sorted(old["states"].keys() | new["states"].keys()):
            was, now = old["states"].get(state), new["states"].get(state)
            if was is None:
                safe.append(f"state {state!r} of {op_id!r} added (starts empty)")
            elif now is None:
                refused.append(f"state {state!r} of {op_id!r} removed")
            else:
                for field in ("kind", "serde", "key_serde", "ttl", "format"):
                    if was.get(field) != now.get(field):
                        label = "TTL" if field == "ttl" else field
                        refused.append(
                            f"state {state!r} of {op_id!r} changed {label} "
                            f"{was.get(field)} -> {now.get(field)}"
                        )
    return Difference(safe, refused)


def current_identity(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The identity in force after ``records`` (offset order): the first one, replaced by each
    later one that is a safe change of it. The same answer for every reader."""
    current: dict[str, Any] | None = None
    for doc in records:
        if (
            current is None
            or doc["fingerprint"] == current["fingerprint"]
            or not compare(current, doc).refused
        ):
            current = doc
    return current


async def check_identity(
    admin: AIOKafkaAdminClient, settings: Settings, job: Job, *, savepoint: str | None = None
) -> str:
    """Refuse to start a job that differs unsafely from what its name recorded; record it.

    Called before the job's internal topics are created or anything is consumed. Returns the
    job's *incarnation*: a random id made when the name was first taken and kept through safe
    changes, new after ``headrace reset``. Local state lives under it, so a RocksDB directory
    left on some machine by an earlier incarnation is never taken for this one's state.
    """
    mine = describe(job)
    topic = identity_topic(job)
    changelogs = await _changelog_topics(admin, job)
    if topic not in await topic_partitions(admin, [topic]):
        await _create(admin, topic)
    await await_topics(admin, {topic: 1})  # created just now, maybe by another worker
    records = await _read(settings, topic)
    recorded = current_identity(records)
    if recorded is None:
        orphans = sorted(set(changelogs) - set(mine["operators"]))
        if orphans:
            raise JobIdentityError(
                _refusal(
                    job,
                    [
                        f"changelog topic {job.name}.{op}.changelog holds state of operator "
                        f"{op!r}, which this job does not have"
                        for op in orphans
                    ],
                    None,
                )
            )
    elif recorded["fingerprint"] == mine["fingerprint"]:
        log.info("job %r matches its recorded identity %s", job.name, mine["fingerprint"])
        return str(recorded["incarnation"])
    else:
        diff = compare(recorded, mine, has_state=set(changelogs))
        if diff.refused:
            raise JobIdentityError(_refusal(job, diff.refused + diff.safe, recorded))
        for line in diff.safe:
            log.warning("job %r changed since its last deployment: %s", job.name, line)
    mine["incarnation"] = recorded["incarnation"] if recorded else uuid.uuid4().hex[:12]
    if savepoint is not None:  # loaded from it (runtime/savepoint.py); not part of the identity
        mine["savepoint"] = savepoint
    await _write(settings, topic, mine)
    winner = current_identity(await _read(settings, topic))
    assert winner is not None  # ours is in the topic now
    if winner["fingerprint"] != mine["fingerprint"]:
        diff = compare(winner, mine, has_state=set(changelogs))
        if diff.refused:  # another program took the name first, a moment ago
            raise JobIdentityError(_refusal(job, diff.refused + diff.safe, winner))
    log.info("job %r recorded its identity %s in %s", job.name, mine["fingerprint"], topic)
    return str(winner["incarnation"])


def _refusal(job: Job, lines: list[str], recorded: dict[str, Any] | None) -> str:
    source = ""
    if recorded is not None:
        by = recorded.get("recorded", {})
        source = (
            f" (recorded by {by.get('worker', '?')} at {by.get('at', '?')}: a job reading "
            f"{', '.join(recorded.get('sources', []))})"
        )
    details = "".join(f"\n  - {line}" for line in lines)
    return (
        f"job {job.name!r} does not match the job that ran under this name{source}:{details}\n"
        "Nothing was consumed. If this is a different job, give it its own name "
        "(Job(name=...)). If you meant to change this job: keep the names of stateful "
        "operators (name=...) and their states' serdes, or start it over from scratch with "
        f"`headrace reset MODULE:JOB --yes` (deletes the state of {job.name!r})."
    )


async def _changelog_topics(admin: AIOKafkaAdminClient, job: Job) -> dict[str, str]:
    """Operator id -> changelog topic, for every ``<job>.<op>.changelog`` that exists."""
    prefix, suffix = f"{job.name}.", ".changelog"
    return {
        t[len(prefix) : -len(suffix)]: t
        for t in await admin.list_topics()
        if t.startswith(prefix) and t.endswith(suffix) and len(t) > len(prefix) + len(suffix)
    }


async def _create(admin: AIOKafkaAdminClient, topic: str) -> None:
    resp = await admin.create_topics(
        [NewTopic(topic, 1, 1, topic_configs={"cleanup.policy": "compact"})]
    )
    for name, code, *_ in resp.topic_errors:
        if code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS (another worker was first)
            raise TopicConfigError(f"could not create topic {name!r}: error code {code}")


async def recorded_identity(settings: Settings, job: Job) -> dict[str, Any] | None:
    """The identity in force under the job's name (None: none recorded, or no topic yet)."""
    topic = identity_topic(job)
    admin = clients.admin_client(settings, client_id="headrace-identity")
    await admin.start()
    try:
        exists = topic in await topic_partitions(admin, [topic])
    finally:
        await admin.close()
    return current_identity(await _read(settings, topic)) if exists else None


async def _read(settings: Settings, topic: str) -> list[dict[str, Any]]:
    tp = TopicPartition(topic, 0)
    consumer = clients.reader(settings, client_id="headrace-identity", committed_only=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        await consumer.seek_to_beginning(tp)
        docs: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while await consumer.position(tp) < end:
            if time.monotonic() > deadline:
                raise TopicConfigError(f"could not read {topic} to its end within 60 s")
            for r in (await consumer.getmany(tp, timeout_ms=500)).get(tp, []):
                if r.key == _KEY and r.value:
                    doc = orjson.loads(r.value)
                    if doc.get("v") != FORMAT:
                        raise JobIdentityError(
                            f"{topic} holds an identity of format {doc.get('v')!r} (this "
                            f"headrace reads {FORMAT}): was the job run by a newer headrace?"
                        )
                    docs.append(doc["job"])
        return docs
    finally:
        await consumer.stop()


async def _write(settings: Settings, topic: str, doc: dict[str, Any]) -> None:
    recorded = dict(doc)
    recorded["recorded"] = {
        "worker": f"{socket.gethostname()}-{os.getpid()}",
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    producer = clients.producer(settings, client_id="headrace-identity")
    await producer.start()
    try:
        await producer.send_and_wait(
            topic, orjson.dumps({"v": FORMAT, "job": recorded}), key=_KEY, partition=0
        )
    finally:
        await producer.stop()
