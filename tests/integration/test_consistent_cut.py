"""Barrier alignment produces consistent cuts, checked against the real broker.

``examples.pageviews`` reads two co-partitioned topics (``views`` and ``clicks``, keyed by user)
into a stateful per-user operator, re-keys by page, and keeps per-page totals downstream. While
events flow, every task acknowledges each checkpoint in ``<job>.checkpoints`` with its input
offsets and its changelog offset. For each checkpoint that is complete for the whole job:

* per source task, the per-user state at that checkpoint (its changelog read up to the
  acknowledged offset) equals a replay of exactly the ``views`` and ``clicks`` records before
  the acknowledged offsets of *both* inputs: the two inputs are cut consistently;
* the per-page state at that checkpoint, over all downstream tasks, equals a replay of exactly
  the records before the *source* stage's offsets of that checkpoint: barriers crossed the
  repartition topic and were aligned, so checkpoint ``n`` is one cut of the whole job.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.structs import TopicPartition

from examples.pageviews import build
from headrace.operators.job import Job
from headrace.runtime.checkpoint.log import CheckpointAck, summarize
from headrace.runtime.checkpoint.restore import RestoreTarget
from headrace.runtime.config import Settings
from headrace.runtime.inspect import read_all
from headrace.runtime.state.backend import open_backend
from headrace.runtime.state.keys import StatePartitionKey
from headrace.runtime.state.store import OperatorStateStore

pytestmark = pytest.mark.kafka

PAGES = [f"/page/{i}" for i in range(40)]


async def produce_events(bootstrap: str, views: str, clicks: str, seconds: float) -> None:
    """Events keyed by user, at a bounded rate, so many checkpoints cut the stream."""
    rng = random.Random(3)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    await producer.start()
    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            for _ in range(200):
                user = f"user-{rng.randrange(300)}".encode()
                page = rng.choice(PAGES)
                topic = views if rng.random() < 0.7 else clicks
                await producer.send(topic, orjson.dumps({"page": page}), key=user)
            await asyncio.sleep(0.05)
        await producer.flush()
    finally:
        await producer.stop()


def state_at(
    job: Job, operator_id: str, partition: int, records: list[Any], upto: int | None
) -> list[tuple[str, bytes, Any, Any]]:
    """An operator's state of one task at a checkpoint: its changelog up to ``upto``."""
    _, step = job.find_operator(operator_id)
    store = OperatorStateStore(
        open_backend("memory"), StatePartitionKey(operator_id, partition, partition)
    )
    store.bind_operator(step.instantiate())
    target = RestoreTarget(store, job.changelog_topic(operator_id), partition, None)
    if upto is not None:
        target.apply([r for r in records if r.offset <= upto], 10_000)
    target.finish()
    return list(store.dump())


async def test_complete_checkpoints_are_consistent_cuts_of_the_whole_job(
    kafka_bootstrap_servers: str,
    topic_factory: Any,
    fault_driver: Callable[..., Any],
) -> None:
    views = await topic_factory("views", partitions=3)
    clicks = await topic_factory("clicks", partitions=3)
    sink = await topic_factory("page-stats", partitions=3)
    name = "pv-" + views.rsplit("-", 1)[-1]
    job = build(name, views, clicks, sink)
    driver = fault_driver(
        "examples.pageviews:job",
        env={
            "PAGEVIEWS_JOB": name,
            "PAGEVIEWS_VIEWS": views,
            "PAGEVIEWS_CLICKS": clicks,
            "PAGEVIEWS_SINK": sink,
            "HEADRACE_CHECKPOINT_INTERVAL_MS": "300",
        },
    )
    # Two workers: source tasks in different processes checkpoint at different moments, so
    # data records land between the barriers of different channels and must be held.
    workers = [driver.start_worker(), driver.start_worker()]
    for w in workers:
        await w.wait_started()
    await produce_events(kafka_bootstrap_servers, views, clicks, seconds=8)
    await asyncio.sleep(3)
    for w in workers:
        assert await driver.terminate(w) == 0, w.log()[-3000:]

    settings = Settings(bootstrap_servers=kafka_bootstrap_servers)
    acks = [
        CheckpointAck.decode(r.value)
        for r in await read_all(settings, [TopicPartition(job.checkpoint_topic, 0)], committed=True)
    ]
    tasks = {f"stage0/{p}" for p in range(3)} | {f"stage1/{p}" for p in range(3)}
    complete = [s for s in summarize(acks, tasks) if s.complete and s.aligned]
    by_task = {(a.task, a.checkpoint_id): a for a in acks if not a.final}
    chosen = [
        s.checkpoint_id for s in complete if all((t, s.checkpoint_id) in by_task for t in tasks)
    ]
    assert len(chosen) >= 3, f"only {len(chosen)} complete checkpoints"

    inputs = {
        (t, p): await read_all(settings, [TopicPartition(t, p)], committed=True)
        for t in (views, clicks)
        for p in range(3)
    }
    changelogs = {
        (op, p): await read_all(
            settings, [TopicPartition(job.changelog_topic(op), p)], committed=True
        )
        for op in ("per-user", "per-page")
        for p in range(3)
    }
    # A few checkpoints spread over the run (early, middle, late).
    for n in sorted(chosen)[:: max(1, len(chosen) // 4)]:
        pages: Counter[tuple[str, str]] = Counter()
        for p in range(3):
            ack = by_task[(f"stage0/{p}", n)]
            users: Counter[tuple[str, str]] = Counter()
            for topic, kind in ((views, "views"), (clicks, "clicks")):
                cut = ack.offsets.get(f"{topic}/{p}", 0)
                for r in inputs[(topic, p)]:
                    if r.offset < cut:
                        users[(r.key.decode(), kind)] += 1
                        pages[(orjson.loads(r.value)["page"], kind)] += 1
            state = state_at(
                job,
                "per-user",
                p,
                changelogs[("per-user", p)],
                ack.changelog_offsets.get("per-user"),
            )
            got = Counter({(uk.decode(), mk): v for _, uk, mk, v in state})
            assert got == users, f"checkpoint {n}: per-user state of task {p} is not the cut"
        downstream: Counter[tuple[str, str]] = Counter()
        for q in range(3):
            ack = by_task[(f"stage1/{q}", n)]
            for _, uk, _, totals in state_at(
                job,
                "per-page",
                q,
                changelogs[("per-page", q)],
                ack.changelog_offsets.get("per-page"),
            ):
                for kind, count in totals.items():
                    downstream[(uk.decode(), kind)] += count
        assert downstream == pages, f"checkpoint {n}: per-page state is not the job-wide cut"
    assert sum(pages.values()) > 0
