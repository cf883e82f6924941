"""Input for recovery scenarios: records produced at a steady pace, skewed across partitions.

A steady pace keeps records flowing while the fault driver kills, stops and moves workers (a
fault that hits an idle job proves little); skew puts most records on one partition and none on
another, so that hot, cold and idle tasks all meet every fault.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer

__all__ = ["produce_paced", "skewed_partitioner"]


def skewed_partitioner(
    partitions: int,
    *,
    seed: int = 0,
    hot: int = 0,
    hot_share: float = 0.8,
    idle: Sequence[int] = (),
) -> Callable[[int], int]:
    """``index -> partition``: ``hot_share`` of the records go to ``hot``, none to ``idle``."""
    rng = random.Random(seed)
    others = [p for p in range(partitions) if p != hot and p not in idle]

    def choose(_index: int) -> int:
        if not others or rng.random() < hot_share:
            return hot
        return rng.choice(others)

    return choose


async def produce_paced(
    bootstrap_servers: str,
    topic: str,
    values: Sequence[bytes],
    *,
    rate: float,
    partition_of: Callable[[int], int] | None = None,
    chunk_s: float = 0.05,
    key_of: Callable[[int], bytes | None] | None = None,
) -> int:
    """Produce ``values`` at about ``rate`` records/s (idempotent, acks=all); returns the count.

    Survives a broker restart: sends wait in the producer's buffer and are retried.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        request_timeout_ms=120_000,
        retry_backoff_ms=200,
    )
    await producer.start()
    try:
        per_chunk = max(1, int(rate * chunk_s))
        started = time.monotonic()
        futures: list[Any] = []
        for i, value in enumerate(values):
            p = partition_of(i) if partition_of is not None else None
            k = key_of(i) if key_of is not None else None
            futures.append(await producer.send(topic, value, key=k, partition=p))
            if (i + 1) % per_chunk == 0:
                due = started + (i + 1) / rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if len(futures) > 5000:
                    await asyncio.gather(*futures)
                    futures = []
        await asyncio.gather(*futures)
        return len(values)
    finally:
        await producer.stop()
