"""The write lease's arithmetic and the producer guard's discard of queued batches
(runtime/kafka/lease.py), without a broker."""

from __future__ import annotations

import asyncio
import gc
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.producer.message_accumulator import BatchBuilder, MessageBatch
from aiokafka.structs import TopicPartition

from headrace.runtime.kafka.lease import LeaseExpired, MembershipLease, ProducerGuard


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Coordinator:
    """aiokafka's group coordinator as far as the lease sees it: ``_do_heartbeat`` answers
    True both to a plain success and to "rebalancing", which also asks to rejoin."""

    def __init__(self) -> None:
        self.rebalancing = False
        self._rejoin_needed_fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def _do_heartbeat(self) -> bool:
        if self.rebalancing and not self._rejoin_needed_fut.done():
            self._rejoin_needed_fut.set_result(None)
        return True


async def _attached(
    *, session_ms: int = 10_000, rebalance_ms: int | None = None
) -> tuple[MembershipLease, Coordinator, Clock]:
    clock = Clock()
    lease = MembershipLease(
        "g",
        session_timeout_ms=session_ms,
        heartbeat_interval_ms=3_000,
        rebalance_timeout_ms=rebalance_ms,
        clock=clock,
    )
    coordinator = Coordinator()
    lease.attach(SimpleNamespace(_coordinator=coordinator))
    return lease, coordinator, clock


async def test_plain_heartbeats_hold_the_lease_for_a_session_less_the_margin() -> None:
    lease, coordinator, clock = await _attached()
    await coordinator._do_heartbeat()  # sent at 100
    clock.now = 106.0
    assert lease.remaining() == pytest.approx(100 + 10 - 3 - 106)
    clock.now = 107.5
    with pytest.raises(LeaseExpired):
        lease.check("x")


async def test_a_rebalance_holds_the_lease_up_to_the_rebalance_timeout_from_the_last_success() -> (
    None
):
    """Heartbeats answered "rebalancing" keep the member in the group, but only until the
    rebalance timeout has passed since the rebalance began (after the last plain success)."""
    lease, coordinator, clock = await _attached(rebalance_ms=30_000)
    await coordinator._do_heartbeat()  # plain success sent at 100
    coordinator.rebalancing = True
    for t in range(103, 140, 3):  # the revocation runs; heartbeats go on every 3 s
        clock.now = float(t)
        await coordinator._do_heartbeat()
    assert lease.confirmed_at == 100.0  # "rebalancing" is not a confirmation
    clock.now = 125.0
    assert lease.remaining() == pytest.approx(100 + 30 - 3 - 125)  # bound: confirmed + 30 s
    clock.now = 127.5
    with pytest.raises(LeaseExpired):
        lease.check("a final checkpoint")


async def test_a_rebalance_does_not_outlive_the_heartbeats() -> None:
    """A member that stops heartbeating during the rebalance (paused) is removed a session
    after its last heartbeat, whatever the rebalance timeout."""
    lease, coordinator, clock = await _attached(rebalance_ms=30_000)
    await coordinator._do_heartbeat()  # plain success at 100
    coordinator.rebalancing = True
    clock.now = 103.0
    await coordinator._do_heartbeat()  # the last one: the process is paused after it
    clock.now = 109.0
    assert lease.remaining() == pytest.approx(103 + 10 - 3 - 109)
    clock.now = 110.5
    assert lease.remaining() < 0


async def test_with_aiokafkas_default_rebalance_timeout_rebalancing_never_extends_the_lease() -> (
    None
):
    """Rebalance timeout = session timeout: the coordinator may remove the member a session
    after the rebalance began, so heartbeats answered "rebalancing" (which aiokafka reports as
    successes) must not carry the lease past the last plain success's session."""
    lease, coordinator, clock = await _attached(rebalance_ms=None)
    await coordinator._do_heartbeat()  # plain success at 100
    coordinator.rebalancing = True
    clock.now = 106.0
    await coordinator._do_heartbeat()
    clock.now = 107.5
    assert lease.remaining() < 0


async def test_discarded_batches_fail_with_lease_expired_and_leave_no_unretrieved_future() -> None:
    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: unretrieved.append(context))
    tp = TopicPartition("t", 0)
    awaited = MessageBatch(tp, BatchBuilder(1 << 16, 0), 30, 0)
    forgotten = MessageBatch(tp, BatchBuilder(1 << 16, 0), 30, 0)  # nobody awaits this one
    producer = SimpleNamespace(
        _message_accumulator=SimpleNamespace(_batches={tp: [awaited, forgotten]})
    )
    ProducerGuard.discard_queued(producer)
    with pytest.raises(LeaseExpired):  # whoever waits for a delivery still learns it failed
        await awaited.future
    assert producer._message_accumulator._batches == {}
    del awaited, forgotten
    gc.collect()
    await asyncio.sleep(0)
    assert unretrieved == []
