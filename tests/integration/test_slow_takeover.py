"""A takeover slower than the session timeout keeps the member in its group, on the real broker.

aiokafka stops a member's heartbeats before it rejoins and starts them again only after the
assignment callback returned. The takeover (a transactional producer per task, the committed
offsets, resumes and restores) used to run inside that callback: at 256 partitions, on a broker
busy creating the job's ~1,000 partitions, one worker's takeover of 320 tasks took 17 s, the
coordinator expelled it after its 10 s session, the group rebalanced, and the next takeovers
did the same (bench/scale.py: 14-52 s until every task ran). Now the takeover runs after the
callback, as a restore does, and the member heartbeats through it.

Here the producers of the first takeover of each stage take longer to start than the session
timeout; the member must keep its member id (an expelled one is given a new one when it
rejoins), and the word count must be exact.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from examples.wordcount import build
from headrace import INT, STR
from headrace.runtime.config import Settings
from headrace.runtime.kafka import clients
from headrace.runtime.pytest_plugin import TopicFactory
from headrace.runtime.recovery import produce_paced, read_topic
from headrace.runtime.recovery.inprocess import run_worker_until
from headrace.runtime.stage_runner import StageRunner

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]

PARTITIONS = 2
SESSION_MS = 6_000  # the broker's smallest allowed session timeout


async def test_a_takeover_longer_than_the_session_keeps_the_member_in_its_group(
    kafka_bootstrap_servers: str, topic_factory: TopicFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = await topic_factory("slow-takeover-lines", partitions=PARTITIONS)
    sink = await topic_factory("slow-takeover-counts", partitions=PARTITIONS)
    job = build(f"slow-takeover-{uuid.uuid4().hex[:6]}", source, sink)
    s = Settings(
        bootstrap_servers=kafka_bootstrap_servers,
        processing_guarantee="exactly_once",
        checkpoint_interval_ms=300,
        session_timeout_ms=SESSION_MS,
        heartbeat_interval_ms=1_000,
    )
    lines = [f"w{i % 7} w{i % 3} common" for i in range(300)]
    await produce_paced(
        kafka_bootstrap_servers,
        source,
        [line.encode() for line in lines],
        rate=10_000,
        partition_of=lambda i: i % PARTITIONS,
    )
    expected = Counter(" ".join(lines).split())

    start_producers = clients.start_producers
    slowed: set[str] = set()
    members: dict[str, list[str | None]] = {}
    on_assigned = StageRunner.on_partitions_assigned

    async def slow_first_start(make: Callable[[int], Any], partitions: list[int]) -> Any:
        stage = make.__self__.stage.name  # type: ignore[attr-defined]  # the runner's method
        if partitions and stage not in slowed:
            slowed.add(stage)
            await asyncio.sleep(SESSION_MS / 1000 * 1.5)
        return await start_producers(make, partitions)

    async def assigned(self: StageRunner, partitions: list[Any]) -> None:
        members.setdefault(self.stage.name, []).append(self.lease.member_id)
        await on_assigned(self, partitions)

    monkeypatch.setattr(clients, "start_producers", slow_first_start)
    monkeypatch.setattr(StageRunner, "on_partitions_assigned", assigned)

    async def counted() -> dict[str, int]:
        latest: dict[str, int] = {}
        for _, _, k, v, _ in await read_topic(
            kafka_bootstrap_servers, sink, key_serde=STR, value_serde=INT
        ):
            latest[k] = v
        return latest

    async def all_counted() -> bool:
        return await counted() == expected

    await run_worker_until(job, s, all_counted, timeout_s=150)
    assert len(slowed) == 2, slowed  # both stages' first takeovers outlasted the session
    for stage, ids in members.items():
        assert len(set(ids)) == 1, f"stage {stage}: expelled and rejoined as {ids}"
