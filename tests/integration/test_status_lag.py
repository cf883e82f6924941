"""``headrace status``'s lag over a real topic: only records the task will process count.

A repartition partition written by hand: data records and barriers of two channels, then a
committed checkpoint whose skip list says channel 1 is cut further on. No worker is needed:
the lag is read from the topic and the commit metadata, as ``headrace status`` reads it.
"""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.structs import TopicPartition

from headrace.runtime.checkpoint import lag
from headrace.runtime.checkpoint.barrier import barrier_headers, channel_headers
from headrace.runtime.checkpoint.lag import Tail, data_lag, log_bounds
from headrace.runtime.checkpoint.metadata import CheckpointMetadata
from headrace.runtime.config import Settings
from headrace.runtime.pytest_plugin import TopicFactory

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]

#: offset -> (channel, barrier checkpoint id or None for a data record)
LAYOUT = [(0, None), (1, None), (0, 7), (1, None), (1, 7), (0, None), (0, 8), (1, 8)]


async def test_lag_counts_data_the_task_has_not_processed(
    kafka_bootstrap_servers: str, topic_factory: TopicFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = await topic_factory("lag-rep", partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap_servers, acks="all")
    await producer.start()
    try:
        for channel, barrier in LAYOUT:
            headers = (
                channel_headers(channel) if barrier is None else barrier_headers(channel, barrier)
            )
            value = b"" if barrier is not None else b"word"
            await producer.send_and_wait(topic, value, partition=0, headers=headers)
    finally:
        await producer.stop()
    tp = TopicPartition(topic, 0)
    settings = Settings(bootstrap_servers=kafka_bootstrap_servers)
    beginnings, ends = await log_bounds(settings, [tp])
    assert (beginnings[tp], ends[tp]) == (0, 8)

    # checkpoint 7 committed offset 3 (channel 0's cut); channel 1 is cut at 5: offset 3 is
    # in the checkpoint already, offset 5 (channel 0) is not; the rest are barriers
    cut = Tail(3, 8, checkpoint=CheckpointMetadata(7, skip={1: 5}))
    # caught up: past the last data record only barriers remain
    done = Tail(6, 8, checkpoint=CheckpointMetadata(8))
    fresh = Tail(None, 8)  # no commit yet: every data record from the beginning
    lags = await data_lag(settings, {tp: cut})
    assert lags[tp] == (1, True)
    assert (await data_lag(settings, {tp: done}))[tp] == (0, True)
    assert (await data_lag(settings, {tp: fresh}))[tp] == (4, True)

    # a tail longer than the limit is not read: the offset difference, marked approximate
    monkeypatch.setattr(lag, "EXACT_LAG_LIMIT", 2)
    assert (await data_lag(settings, {tp: cut}))[tp] == (5, False)
