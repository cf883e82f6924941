"""The sticky task assignor on a real broker's group protocol (runtime/kafka/assignor.py): the
owned tasks travel in the JoinGroup metadata, so members keep their partitions when another
joins; the group stays stable once assigned (offering a second assignor made aiokafka's members
rebalance every heartbeat, for ever); a member of an older version (the range assignor) joins
the same group."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from headrace.runtime.config import Settings
from headrace.runtime.kafka import clients

pytestmark = pytest.mark.kafka


def owned(consumer: AIOKafkaConsumer) -> set[int]:
    return {tp.partition for tp in consumer.assignment()}


async def settle(consumers: list[AIOKafkaConsumer], partitions: int, wait_s: float = 60) -> None:
    """Poll every member until the group's assignment covers every partition exactly once
    and has been stable for a second."""
    deadline = time.monotonic() + wait_s
    stable_since = None
    last: list[set[int]] | None = None
    while time.monotonic() < deadline:
        await asyncio.gather(*(c.getmany(timeout_ms=200) for c in consumers))
        now = [owned(c) for c in consumers]
        complete = sum(map(len, now)) == partitions and set().union(*now) == set(range(partitions))
        if complete and now == last:
            if stable_since is None:
                stable_since = time.monotonic()
            elif time.monotonic() - stable_since > 1.0:
                return
        else:
            stable_since = None
        last = now
    raise AssertionError(f"the group did not settle: {[sorted(s) for s in last or []]}")


async def assert_stable(consumers: list[AIOKafkaConsumer], seconds: float = 7.0) -> None:
    """No rebalance for longer than two heartbeat intervals: same generation, same tasks."""
    generations = [c._coordinator.generation for c in consumers]
    tasks = [owned(c) for c in consumers]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.gather(*(c.getmany(timeout_ms=200) for c in consumers))
    assert [c._coordinator.generation for c in consumers] == generations
    assert [owned(c) for c in consumers] == tasks


async def test_members_keep_their_tasks_when_others_join(
    kafka_bootstrap_servers: str, topic_factory: Any
) -> None:
    topic = await topic_factory("sticky", partitions=6)
    settings = Settings(bootstrap_servers=kafka_bootstrap_servers, session_timeout_ms=10_000)
    group = f"{topic}.group"
    members: list[AIOKafkaConsumer] = []
    try:
        for i in range(3):
            before = [owned(c) for c in members]  # before the join starts a rebalance
            consumer = clients.group_consumer(settings, group, client_id=f"member-{i}")
            consumer.subscribe([topic])
            await consumer.start()
            members.append(consumer)
            await settle(members, 6)
            after = [owned(c) for c in members]
            assert [len(s) for s in after] == [6 // len(members)] * len(members)
            for had, has in zip(before, after, strict=False):
                assert has <= had, (before, after)  # nothing moved between old members
            await assert_stable(members)

        # a member of an older version offers only the range assignor: the group agrees on
        # it (no error, every partition once) and the sticky hints are ignored, not misread
        old = AIOKafkaConsumer(
            **settings.kafka_kwargs(),
            group_id=group,
            enable_auto_commit=False,
            partition_assignment_strategy=(RangePartitionAssignor,),
        )
        old.subscribe([topic])
        await old.start()
        members.append(old)
        await settle(members, 6)
        assert sorted(len(owned(c)) for c in members) == [1, 1, 2, 2]
        await assert_stable(members)
    finally:
        for consumer in members:
            with contextlib.suppress(Exception):
                await consumer.stop()
