"""The producer guard on a real producer and broker (runtime/kafka/lease.py).

The unit tests drive the guard's hooks directly; this checks that they reach what a worker's
shared producer really uses: the transport of the connection produce requests go over is
guarded once the producer has sent, and a send after the lease expired fails instead of
reaching the broker.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.client import ConnectionGroup
from aiokafka.structs import TopicPartition

from headrace.runtime.config import Settings
from headrace.runtime.kafka import clients
from headrace.runtime.kafka.lease import LeaseExpired, MembershipLease, ProducerGuard
from headrace.runtime.pytest_plugin import TopicFactory

pytestmark = pytest.mark.kafka


async def test_the_guard_reaches_the_real_connection_and_stops_writes_after_the_lease(
    kafka_bootstrap_servers: str, topic_factory: TopicFactory
) -> None:
    topic = await topic_factory("guarded")
    lease = MembershipLease("g", session_timeout_ms=10_000, heartbeat_interval_ms=3_000)
    lease.renew(time.monotonic())
    producer = clients.producer(
        Settings(bootstrap_servers=kafka_bootstrap_servers), client_id="guard-test"
    )
    await producer.start()
    try:
        guard = ProducerGuard(lambda: [lease])
        guard.install(producer)
        await (await producer.send(topic, b"before", partition=0))
        leader = producer.client.cluster.leader_for_partition(TopicPartition(topic, 0))
        conn = producer.client._conns[(leader, ConnectionGroup.DEFAULT)]
        assert conn._writer.transport._headrace_guard is guard

        lease.confirmed_at = time.monotonic() - 60  # paused past the session
        with pytest.raises(LeaseExpired):
            await asyncio.wait_for(await producer.send(topic, b"after", partition=0), 30)
    finally:
        ProducerGuard.discard_queued(producer)
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap_servers, auto_offset_reset="earliest"
    )
    await consumer.start()
    values = []
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # everything the broker has (the end is not marked)
            got = await consumer.getmany(timeout_ms=500)
            values += [r.value for records in got.values() for r in records]
    finally:
        await consumer.stop()
    assert values == [b"before"]
