"""The write lease's arithmetic and the producer guard (runtime/kafka/lease.py): its discard of
queued batches, and its trip on a failed batch, over aiokafka's own accumulator, without a
broker."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.errors import NotLeaderForPartitionError
from aiokafka.producer.message_accumulator import BatchBuilder, MessageAccumulator, MessageBatch
from aiokafka.producer.transaction_manager import TransactionManager
from aiokafka.structs import TopicPartition

from headrace.runtime.kafka.lease import (
    LeaseExpired,
    MembershipLease,
    ProducerBroken,
    ProducerGuard,
)


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


class Cluster:
    """aiokafka's cluster metadata as the accumulator sees it: a leader per partition, or
    None while the broker is away."""

    def __init__(self) -> None:
        self.leader: int | None = None

    def leader_for_partition(self, tp: TopicPartition) -> int | None:
        return self.leader


def _guarded_idempotent_producer(
    cluster: Cluster, *, batch_ttl_s: float
) -> tuple[Any, list[dict[Any, Any]], TransactionManager]:
    """An idempotent producer's accumulator (aiokafka's own) and a sender whose produce
    requests are recorded instead of sent, with a guard installed on them."""
    txn = TransactionManager(None, 60_000)
    txn.set_pid_and_epoch(7, 0)
    accumulator = MessageAccumulator(cluster, 1 << 16, 0, batch_ttl_s, txn_manager=txn)
    sent: list[dict[Any, Any]] = []

    async def send_produce_req(node_id: int, batches: dict[Any, Any]) -> None:
        sent.append(batches)

    producer = SimpleNamespace(
        _message_accumulator=accumulator,
        _sender=SimpleNamespace(
            _send_produce_req=send_produce_req, _in_flight=set(), _muted_partitions=set()
        ),
    )
    return producer, sent, txn


async def test_a_batch_expired_while_the_broker_was_away_trips_the_guard() -> None:
    """A batch that waited past its time-to-live for a leader fails after aiokafka gave it its
    sequence numbers: the guard trips (the worker replaces the producer) and fails every
    later batch instead of letting it into the gap (``OutOfOrderSequenceNumber``)."""
    cluster = Cluster()
    producer, sent, txn = _guarded_idempotent_producer(cluster, batch_ttl_s=0.0)
    guard = ProducerGuard(lambda: [])
    guard.install(producer)
    tp = TopicPartition("counts", 2)
    lost = await producer._message_accumulator.add_message(tp, b"k", b"v", timeout=1)
    await asyncio.sleep(0.01)
    producer._message_accumulator.drain_by_nodes(ignore_nodes=set())
    with pytest.raises(NotLeaderForPartitionError):
        await lost
    assert txn.sequence_number(tp) == 1  # spent by aiokafka, though nothing was written
    await asyncio.sleep(0)
    assert isinstance(guard.tripped, ProducerBroken)
    assert "counts[2]" in str(guard.tripped) and "NotLeaderForPartitionError" in str(guard.tripped)

    # The broker is back: the next batch would carry sequence 1 where the broker expects 0.
    cluster.leader = 0
    later = await producer._message_accumulator.add_message(tp, b"k", b"w", timeout=1)
    nodes, _ = producer._message_accumulator.drain_by_nodes(ignore_nodes=set())
    await producer._sender._send_produce_req(0, nodes[0])
    assert sent == []
    with pytest.raises(ProducerBroken):
        await later


async def test_delivered_and_retried_batches_do_not_trip_the_guard() -> None:
    cluster = Cluster()
    cluster.leader = 0
    producer, sent, _ = _guarded_idempotent_producer(cluster, batch_ttl_s=30.0)
    guard = ProducerGuard(lambda: [])
    guard.install(producer)
    accumulator = producer._message_accumulator
    tp = TopicPartition("counts", 0)
    delivered = await accumulator.add_message(tp, b"k", b"v", timeout=1)
    nodes, _ = accumulator.drain_by_nodes(ignore_nodes=set())
    (batch,) = nodes[0].values()
    accumulator.reenqueue(batch)  # a retriable error: the same batch, drained again
    nodes, _ = accumulator.drain_by_nodes(ignore_nodes=set())
    await producer._sender._send_produce_req(0, nodes[0])
    batch.done(base_offset=41)
    assert (await delivered).offset == 41
    assert len(sent) == 1 and guard.tripped is None


async def _unread_connection(
    received: bytearray, go: asyncio.Event
) -> tuple[asyncio.StreamWriter, asyncio.Task[None], asyncio.Server]:
    """A loopback connection whose server reads nothing until ``go``, then everything into
    ``received`` until the connection ends; the client's socket takes 4 KB at a time."""
    ended = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await go.wait()
        try:
            while chunk := await reader.read(1 << 16):
                received.extend(chunk)
        except ConnectionError:
            pass
        writer.close()
        ended.set_result(None)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    async def wait_ended() -> None:
        await ended

    return writer, asyncio.create_task(wait_ended()), server


@pytest.mark.parametrize("paused_past_the_lease", [True, False])
async def test_the_rest_of_a_request_is_not_sent_after_the_lease_expired(
    paused_past_the_lease: bool,
) -> None:
    """A request larger than the socket takes at once waits partly in asyncio's transport
    buffer; a worker paused then would send that rest when it resumes, as a zombie. The guard
    checks the lease before the rest leaves and aborts the connection instead."""
    received = bytearray()
    go = asyncio.Event()
    writer, ended, server = await _unread_connection(received, go)
    clock = Clock()
    lease = MembershipLease(
        "g", session_timeout_ms=10_000, heartbeat_interval_ms=3_000, clock=clock
    )
    lease.renew(clock.now)
    guard = ProducerGuard(lambda: [lease])
    guard.guard_transport(SimpleNamespace(_writer=writer))
    request = b"r" * (2 << 20)
    writer.write(request)
    assert writer.transport.get_write_buffer_size() > (1 << 20)  # most of it still here
    if paused_past_the_lease:
        clock.now += 60.0  # the process was stopped for a minute
    go.set()  # the socket becomes writable again
    deadline = asyncio.get_running_loop().time() + 10
    while not ended.done() and len(received) < len(request):
        assert asyncio.get_running_loop().time() < deadline, len(received)
        await asyncio.sleep(0.01)
    writer.close()
    await asyncio.wait_for(ended, 10)
    server.close()
    await server.wait_closed()
    got = len(received)
    if paused_past_the_lease:
        assert got < len(request) // 2, f"{got} of {len(request)} bytes sent after the pause"
        assert isinstance(guard.tripped, LeaseExpired)
        assert writer.transport.is_closing()
    else:
        assert got == len(request) and bytes(received) == request
        assert guard.tripped is None


def test_a_transport_that_cannot_be_guarded_is_named_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another event loop's transports (uvloop's) have no ``_write_ready`` to wrap: the worker
    says so, once, instead of running without the check silently."""
    monkeypatch.setattr("headrace.runtime.kafka.lease._unguarded_transport_logged", False)

    class OtherLoopTransport:
        pass

    guard = ProducerGuard(lambda: [])
    conn = SimpleNamespace(_writer=SimpleNamespace(transport=OtherLoopTransport()))
    with caplog.at_level(logging.WARNING, logger="headrace.runtime.kafka.lease"):
        guard.guard_transport(conn)
        guard.guard_transport(conn)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "OtherLoopTransport" in warnings[0] and "no _write_ready" in warnings[0]
