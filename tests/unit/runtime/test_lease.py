"""The producer guard's discard of queued batches (runtime/kafka/lease.py), without a broker."""

from __future__ import annotations

import asyncio
import gc
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.producer.message_accumulator import BatchBuilder, MessageBatch
from aiokafka.structs import TopicPartition

from headrace.runtime.kafka.lease import LeaseExpired, ProducerGuard


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
