"""A consumer's stop while its member is in the middle of a join (``clients.stop_consumer``).

aiokafka's ``stop()`` lets the join under way finish before it leaves, and a join waits for
every member of the group (a kill -9'd one until its session runs out). The stop sends a
LeaveGroup with the member id the join got, on a connection of its own, and the broker answers
the pending JoinGroup at once. These fakes model the parts of aiokafka the stop reads; the
broker's side is in `tests/recovery/test_shutdown.py`
(``test_sigterm_during_a_join_that_waits_for_a_killed_member_stops_at_once``).
"""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.client import ConnectionGroup
from aiokafka.protocol.group import LeaveGroupRequest
from aiokafka.structs import TopicPartition

from headrace.runtime.kafka.clients import rebalancing, stop_consumer

#: how long the fake join takes when nobody leaves (the rest of the group's session)
JOIN_S = 1.0


class _Client:
    def __init__(self, joined: asyncio.Event) -> None:
        self.joined = joined
        self.sent: list[tuple[int, Any, Any]] = []

    async def send(
        self, node_id: int, request: Any, *, group: Any = ConnectionGroup.DEFAULT
    ) -> None:
        self.sent.append((node_id, request, group))
        if isinstance(request, LeaveGroupRequest):
            self.joined.set()  # the broker answers the pending JoinGroup: UNKNOWN_MEMBER_ID


class _Consumer:
    """A consumer whose stop waits for the join under way, as aiokafka's coordinator does."""

    def __init__(self, *, joining: bool, member_id: str, static: bool = False) -> None:
        self.joined = asyncio.Event()
        self._client = _Client(self.joined)
        self._subscription = SimpleNamespace(reassignment_in_progress=joining)
        self._coordinator = SimpleNamespace(
            coordinator_id=1,
            group_id="job.stage0",
            member_id=member_id,
            _group_instance_id="pod-0" if static else None,
        )
        self.stopped = False

    async def stop(self) -> None:
        if self._subscription.reassignment_in_progress:
            # without a leave the join ends by itself: the dead member's session ran out
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.joined.wait(), JOIN_S)
        self.stopped = True


async def _timed_stop(consumer: _Consumer) -> float:
    loop = asyncio.get_running_loop()
    started = loop.time()
    await stop_consumer(consumer)  # type: ignore[arg-type]
    assert consumer.stopped
    return loop.time() - started


async def test_a_stop_during_a_join_leaves_the_group_with_its_member_id_at_once() -> None:
    consumer = _Consumer(joining=True, member_id="m-1")
    took = await _timed_stop(consumer)
    assert took < JOIN_S / 2, took
    [(node, request, group)] = consumer._client.sent
    assert node == 1 and group == ConnectionGroup.DEFAULT  # not the JoinGroup's connection
    assert isinstance(request, LeaveGroupRequest)
    assert (request._group, request._member_id) == ("job.stage0", "m-1")


@pytest.mark.parametrize(
    ("joining", "member_id", "static"),
    [
        (False, "m-1", False),  # a stable member: aiokafka's own stop leaves the group
        (True, "", False),  # no member id yet: there is nothing to leave with
        (True, "m-1", True),  # a static member keeps its place across restarts
    ],
    ids=["stable", "no-member-id-yet", "static-member"],
)
async def test_a_stop_sends_no_leave_of_its_own_otherwise(
    joining: bool, member_id: str, static: bool
) -> None:
    consumer = _Consumer(joining=joining, member_id=member_id, static=static)
    await _timed_stop(consumer)
    assert consumer._client.sent == []


async def test_rebalancing_reads_the_state_a_real_aiokafka_consumer_has() -> None:
    """``clients.rebalancing`` (the stop above and the stage loop's poll ask it) reads a
    private attribute of aiokafka's: an aiokafka release that renames it fails here, not as
    a stop that silently waits out joins again."""
    real = AIOKafkaConsumer("t", bootstrap_servers="localhost:1", group_id="g")
    try:
        assert rebalancing(real) is True  # subscribed, not joined yet: no assignment
        # what aiokafka's coordinator does when a join and sync bring the assignment ...
        real._subscription.assign_from_subscribed({TopicPartition("t", 0)})
        assert rebalancing(real) is False
        # ... and when the member must join again (a rebalance, a lost membership)
        real._subscription.begin_reassignment()
        assert rebalancing(real) is True
    finally:
        await real.stop()
    assert rebalancing(SimpleNamespace()) is False  # type: ignore[arg-type]
