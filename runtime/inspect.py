"""Reading a job's durable records without running it: checkpoints and state.

State that cannot be inspected is a common complaint about streaming runtimes; in headrace the
changelog *is* the state, so ``headrace state`` rebuilds it in memory from the changelog with the
same restore code a worker uses, then decodes it with the operator's declared serdes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from headrace.operators.job import Job
from headrace.runtime.checkpoint.log import CheckpointAck, CheckpointSummary, summarize
from headrace.runtime.checkpoint.restore import RestoreTarget, restore
from headrace.runtime.config import Settings
from headrace.runtime.kafka.topics import plan_layout, topic_partitions
from headrace.runtime.state.backend import open_backend
from headrace.runtime.state.keys import StatePartitionKey
from headrace.runtime.state.store import OperatorStateStore


async def _layout_tasks(job: Job, admin: AIOKafkaAdminClient) -> dict[str, int]:
    sources = list(job.stages[0].source.topics)
    found = await topic_partitions(admin, sources)
    if sources[0] not in found:
        return {}
    return plan_layout(job, found[sources[0]], {}).stage_partitions


async def read_all(settings: Settings, tps: list[TopicPartition], *, committed: bool) -> list[Any]:
    """Every record of ``tps`` up to their current end."""
    # auto_offset_reset must be "earliest": aiokafka resolves seek_to_beginning() with the
    # consumer's reset policy, so with the default "latest" it would start at the end.
    consumer = AIOKafkaConsumer(
        **settings.kafka_kwargs(),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed" if committed else "read_uncommitted",
    )
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
    admin = AIOKafkaAdminClient(**settings.kafka_kwargs())
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
    admin = AIOKafkaAdminClient(**settings.kafka_kwargs())
    await admin.start()
    try:
        return (await topic_partitions(admin, [topic])).get(topic, 0)
    finally:
        await admin.close()


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
    if partitions is None:
        partitions = list(range(await partition_count(settings, topic)))
    consumer = AIOKafkaConsumer(
        **settings.kafka_kwargs(),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed" if committed else "read_uncommitted",
    )
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


async def read_state(
    job: Job,
    operator_id: str,
    settings: Settings,
    *,
    partition: int | None = None,
    key: str | None = None,
) -> Iterator[str]:
    stage, _ = job.find_operator(operator_id)
    lines: list[str] = []
    for p, store in await operator_states(
        job,
        operator_id,
        settings,
        partitions=None if partition is None else [partition],
        committed=settings.exactly_once,
    ):
        for state_name, user_key, map_key, value in store.dump():
            shown_key = _render_key(stage.source.key_serde, user_key)
            if key is not None and shown_key != key:
                continue
            where = f"[{map_key!r}]" if map_key is not None else ""
            lines.append(f"partition={p} state={state_name} key={shown_key}{where} value={value!r}")
    return iter(lines)


def _render_key(serde: Any, raw: bytes) -> str:
    try:
        return str(serde.deserialize(raw))
    except Exception:
        return repr(raw)
