"""Kafka clients while the broker is out of reach: a consumer's stop completes and a new shared
producer waits for the broker, instead of either ending the worker.

Both were found in CI (``tests/recovery/test_rebalance.py``, a broker restart under
at-least-once): the write lease expired during the outage, the stage dropped its tasks and
replaced the shared producer, whose start raised ``KafkaConnectionError``; the loop failed,
and the shutdown that followed died of a ``CancelledError`` leaking out of aiokafka's
``Fetcher.close`` (a fetch request in its retry backoff)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError

from headrace.operators.job import Job
from headrace.runtime import worker as worker_module
from headrace.runtime.config import Guarantee, Settings
from headrace.runtime.kafka import clients
from headrace.runtime.kafka.clients import stop_consumer


class _Client:
    closed = False

    async def close(self) -> None:
        self.closed = True


class _CancelledOnStop:
    """aiokafka 0.14's consumer when a fetch request was sleeping in its retry backoff."""

    def __init__(self) -> None:
        self._client = _Client()

    async def stop(self) -> None:
        raise asyncio.CancelledError  # Fetcher.close awaiting the request it cancelled


async def test_a_consumer_stop_completes_when_aiokafka_leaks_its_cancellation() -> None:
    consumer = _CancelledOnStop()
    await stop_consumer(consumer)  # type: ignore[arg-type]
    assert consumer._client.closed


async def test_a_consumer_stop_still_propagates_a_cancellation_of_its_caller() -> None:
    class _Slow(_CancelledOnStop):
        async def stop(self) -> None:
            await asyncio.sleep(3600)

    task = asyncio.ensure_future(stop_consumer(_Slow()))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


class _Producer:
    """Refuses to start while ``away`` says the broker is out of reach."""

    def __init__(self, away: list[bool]) -> None:
        self.away = away
        self.started = self.stopped = False

    async def start(self) -> None:
        if self.away.pop(0):
            raise KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 9092)]")
        self.started = True

    async def stop(self) -> None:
        self.stopped = True


def _worker(monkeypatch: pytest.MonkeyPatch, away: list[bool]) -> tuple[Any, list[_Producer]]:
    made: list[_Producer] = []

    def producer(settings: Settings, **kwargs: Any) -> _Producer:
        made.append(_Producer(away))
        return made[-1]

    monkeypatch.setattr(clients, "producer", producer)
    monkeypatch.setattr(worker_module, "PRODUCER_RETRY_S", 0.01)
    settings = Settings(
        bootstrap_servers="127.0.0.1:9092", processing_guarantee=Guarantee("at_least_once")
    )
    return worker_module.Worker(Job("outage"), settings), made


async def test_a_new_shared_producer_waits_for_the_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    worker, made = _worker(monkeypatch, [True, True, True, False])
    assert await worker._start_shared_producer(wait_for_broker=True)
    assert [p.started for p in made] == [False, False, False, True]
    assert all(p.stopped for p in made[:3])  # no client of a failed start is left open
    assert worker.shared_producer is made[-1] and worker.producer_guard is not None


async def test_a_worker_stopping_does_not_wait_for_the_broker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker, made = _worker(monkeypatch, [True] * 1000)
    loop = asyncio.get_running_loop()
    loop.call_later(0.1, worker.stop)
    assert not await worker._start_shared_producer(wait_for_broker=True)
    assert worker.shared_producer is None and not any(p.started for p in made)


async def test_the_first_shared_producer_still_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    worker, _ = _worker(monkeypatch, [True, False])
    with pytest.raises(KafkaConnectionError):
        await worker._start_shared_producer()
