"""Reading a job's durable records without running it: checkpoints and state.

State that cannot be inspected is a common complaint about streaming runtimes; in headrace the
changelog *is* the state, so ``headrace state`` rebuilds it in memory from the changelog with the
same restore code a worker uses, then decodes it with the operator's declared serdes.
"""

from __future__ import annotations

import base64
import json
import math
import time
from dataclasses import dataclass
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from headrace.operators.job import Job, JobDefinitionError
from headrace.operators.operator import Operator
from headrace.runtime.checkpoint.log import CheckpointAck, CheckpointSummary, summarize
from headrace.runtime.checkpoint.restore import RestoreTarget, restore
from headrace.runtime.config import Settings
from headrace.runtime.kafka import clients
from headrace.runtime.kafka.topics import plan_layout, topic_partitions
from headrace.runtime.state.backend import open_backend
from headrace.runtime.state.keys import StatePartitionKey
from headrace.runtime.state.store import OperatorStateStore
from headrace.runtime.task.timers import EVENT, parse_timer_key


async def _layout_tasks(job: Job, admin: AIOKafkaAdminClient) -> dict[str, int]:
    sources = list(job.stages[0].source.topics)
    found = await topic_partitions(admin, sources)
    if sources[0] not in found:
        return {}
    return plan_layout(job, found[sources[0]], {}).stage_partitions


async def read_all(settings: Settings, tps: list[TopicPartition], *, committed: bool) -> list[Any]:
    """Every record of ``tps`` up to their current end."""
    # the reader resets to "earliest": aiokafka resolves seek_to_beginning() with the
    # consumer's reset policy, so with the default "latest" it would start at the end.
    consumer = clients.reader(settings, client_id="headrace-inspect", committed_only=committed)
    await consumer.start()
    try:
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[Any] = []
        pending = {tp for tp in tps if ends[tp] > 0}
        deadline = time.monotonic() + 120
        while pending and time.monotonic() < deadline:
            for records in (await consumer.getmany(*pending, timeout_ms=500)).values():
                out.extend(records)
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
        return out
    finally:
        await consumer.stop()


async def read_checkpoints(job: Job, settings: Settings) -> list[CheckpointSummary]:
    admin = clients.admin_client(settings, client_id="headrace-inspect")
    await admin.start()
    try:
        stage_partitions = await _layout_tasks(job, admin)
        exists = await topic_partitions(admin, [job.checkpoint_topic])
    finally:
        await admin.close()
    if not exists:
        return []
    expected = {f"{stage}/{p}" for stage, n in stage_partitions.items() for p in range(n)}
    records = await read_all(settings, [TopicPartition(job.checkpoint_topic, 0)], committed=True)
    acks = [CheckpointAck.decode(r.value) for r in records if r.value]
    return summarize([a for a in acks if a.job == job.name], expected)


async def partition_count(settings: Settings, topic: str) -> int:
    """Partitions of ``topic`` (0 if it does not exist)."""
    admin = clients.admin_client(settings, client_id="headrace-inspect")
    await admin.start()
    try:
        return (await topic_partitions(admin, [topic])).get(topic, 0)
    finally:
        await admin.close()


class InspectError(ValueError):
    """What was asked for cannot be read (no changelog topic, no such partition)."""


async def operator_states(
    job: Job,
    operator_id: str,
    settings: Settings,
    *,
    partitions: list[int] | None = None,
    committed: bool = True,
) -> list[tuple[int, OperatorStateStore]]:
    """An operator's state per task, rebuilt in memory from its changelog (restore code)."""
    _, step = job.find_operator(operator_id)
    topic = job.changelog_topic(operator_id)
    count = await partition_count(settings, topic)
    if count == 0:
        raise InspectError(
            f"changelog topic {topic!r} of operator {operator_id!r} does not exist on "
            f"{settings.bootstrap_servers}: the job has not run against this broker yet"
        )
    if partitions is None:
        partitions = list(range(count))
    outside = [p for p in partitions if not 0 <= p < count]
    if outside:
        raise InspectError(
            f"changelog topic {topic!r} has partitions 0..{count - 1}; there is no partition "
            f"{', '.join(map(str, outside))}"
        )
    consumer = clients.reader(settings, client_id="headrace-inspect", committed_only=committed)
    await consumer.start()
    stores = []
    try:
        for p in partitions:
            store = OperatorStateStore(open_backend("memory"), StatePartitionKey(operator_id, p, p))
            store.bind_operator(step.instantiate())
            await restore(consumer, [RestoreTarget(store, topic, p, None)])
            stores.append((p, store))
    finally:
        await consumer.stop()
    return stores


@dataclass(frozen=True, slots=True)
class StateEntry:
    """One stored entry of an operator's state, decoded with the operator's serdes."""

    partition: int
    state: str
    #: the record key decoded with the stage's key serde (its raw bytes if that fails)
    key: Any
    map_key: Any
    value: Any


def stateful_operator_ids(job: Job) -> list[str]:
    return [step.operator_id for _, step in job.stateful_operators()]


def check_stateful_operator(job: Job, operator_id: str) -> None:
    """Refuse an operator the job has no state for, listing the ones it has."""
    known = stateful_operator_ids(job)
    if operator_id not in known:
        listed = ", ".join(repr(o) for o in known) or "none"
        raise JobDefinitionError(
            f"job {job.name!r} has no stateful operator {operator_id!r}; its stateful "
            f"operators: {listed}"
        )


async def read_state(
    job: Job,
    operator_id: str,
    settings: Settings,
    *,
    partition: int | None = None,
    key: str | None = None,
) -> list[StateEntry]:
    """Every entry of the operator's state (``key``: only the entries whose key, as the stage's
    key serde decodes it and ``str`` shows it, equals this)."""
    check_stateful_operator(job, operator_id)
    stage, _ = job.find_operator(operator_id)
    entries: list[StateEntry] = []
    for p, store in await operator_states(
        job,
        operator_id,
        settings,
        partitions=None if partition is None else [partition],
        committed=settings.exactly_once,
    ):
        for state_name, user_key, map_key, value in store.dump():
            if state_name == Operator.TIMER_STATE:
                # a timer: shown under its record key, with its domain and time as the map key
                domain, ts, sk = parse_timer_key(user_key)
                decoded = _decode_key(stage.source.key_serde, sk)
                map_key = f"{'event' if domain == EVENT else 'processing'} time {ts}"
            else:
                decoded = _decode_key(stage.source.key_serde, user_key)
            if key is not None and str(decoded) != key:
                continue
            entries.append(StateEntry(p, state_name, decoded, map_key, value))
    return entries


def _decode_key(serde: Any, raw: bytes) -> Any:
    try:
        return serde.deserialize(raw)
    except Exception:
        return raw


def visible(text: str) -> str:
    """``text`` with every character a terminal would interpret or hide (control characters,
    escape sequences, line and paragraph separators, bidi overrides) shown as an escape: what
    reaches a terminal or a pipe is always what is stored, never an instruction to it."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return "".join(out)


def shown_key(key: Any) -> str:
    """A key as text: as it is when that is unambiguous (printable, no backslash), else its
    ``repr``. So a key shown with a backslash is always a quoted ``repr`` (``'a\\x1b'`` is an
    ESC, ``'a\\\\x1b'`` four literal characters), and one shown without is the key itself."""
    text = key if isinstance(key, str) else str(key)
    if isinstance(key, bytes) or "\\" in text or not text.isprintable():
        return repr(key)
    return text


def render_text(entry: StateEntry) -> str:
    """One line: ``partition=0 state=count key=the value=3``: keys as :func:`shown_key` shows
    them, values and map keys as their ``repr``; whatever an object's ``repr`` returns is
    escaped too (:func:`visible`), so nothing reaches a terminal raw."""
    where = f"[{entry.map_key!r}]" if entry.map_key is not None else ""
    return visible(
        f"partition={entry.partition} state={entry.state} key={shown_key(entry.key)}{where} "
        f"value={entry.value!r}"
    )


def jsonable(value: Any) -> Any:
    """``value`` as JSON can hold it: bytes as ``{"base64": ...}`` (whether UTF-8 or not, so a
    reader never guesses), tuples and sets as lists, non-string dict keys as their ``repr``,
    integers of any size, NaN and infinities as null, anything else as its ``repr``."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes | bytearray | memoryview):
        return {"base64": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, dict):
        return {k if isinstance(k, str) else repr(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    return repr(value)


def render_json(entry: StateEntry) -> str:
    """One JSON object per line (JSON Lines): ``partition``, ``state``, ``key``, ``map_key``
    (null unless a map state), ``value``, each as :func:`jsonable` makes it. Every character
    a terminal would act on is a JSON ``\\uXXXX`` escape; the document is unchanged by that."""
    doc = {
        "partition": entry.partition,
        "state": entry.state,
        "key": jsonable(entry.key),
        "map_key": jsonable(entry.map_key),
        "value": jsonable(entry.value),
    }
    text = json.dumps(doc, ensure_ascii=False, allow_nan=False)
    if text.isprintable():
        return text
    # json leaves DEL, C1 controls, separators and bidi overrides raw: valid JSON, but a
    # terminal acts on them; JSON's own \\uXXXX escapes keep the document the same
    out = []
    for ch in text:
        code = ord(ch)
        if ch.isprintable():
            out.append(ch)
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
    return "".join(out)
