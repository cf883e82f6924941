"""clients.start_producers: a task takeover starts its producers concurrently and never leaks
one, whether a start fails or the takeover is cancelled half-way."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from headrace.runtime.kafka.clients import start_producers


class FakeProducer:
    """Records start/stop; ``start`` waits for ``release`` (or fails for ``fail``)."""

    def __init__(self, partition: int, release: asyncio.Event, fail: frozenset[int]) -> None:
        self.partition = partition
        self.release = release
        self.fail = fail
        self.started = False
        self.stopped = False

    async def start(self) -> None:
        if self.partition in self.fail:
            raise ConnectionError(f"partition {self.partition}: broker away")
        if self.partition % 2:  # odd partitions wait: some starts finish, some are under way
            await self.release.wait()
        self.started = True

    async def stop(self) -> None:
        self.stopped = True


def factory(
    made: list[FakeProducer], release: asyncio.Event, fail: frozenset[int] = frozenset()
) -> Callable[[int], FakeProducer]:
    def make(partition: int) -> FakeProducer:
        producer = FakeProducer(partition, release, fail)
        made.append(producer)
        return producer

    return make


async def test_all_started_concurrently_and_returned_by_partition() -> None:
    made: list[FakeProducer] = []
    release = asyncio.Event()
    run = asyncio.create_task(start_producers(factory(made, release), [0, 1, 2, 3]))
    await asyncio.sleep(0.01)
    assert len(made) == 4  # all four started before any odd one finished: concurrently
    release.set()
    producers = await run
    assert sorted(producers) == [0, 1, 2, 3]
    assert all(p.started and not p.stopped for p in made)


async def test_a_failed_start_stops_every_producer_and_raises() -> None:
    made: list[FakeProducer] = []
    release = asyncio.Event()
    release.set()
    with pytest.raises(ConnectionError, match="partition 2"):
        await start_producers(factory(made, release, frozenset({2})), [0, 1, 2, 3])
    assert len(made) == 4 and all(p.stopped for p in made)


async def test_a_cancelled_takeover_stops_what_started_and_what_was_starting() -> None:
    made: list[FakeProducer] = []
    release = asyncio.Event()  # never set: odd partitions are still starting
    run = asyncio.create_task(start_producers(factory(made, release), [0, 1, 2, 3]))
    await asyncio.sleep(0.01)
    assert [p.started for p in made] == [True, False, True, False]
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert all(p.stopped for p in made), [(p.partition, p.stopped) for p in made]


async def test_stopping_a_fenced_producer_leaves_no_unretrieved_error() -> None:
    """aiokafka puts a fenced transactional producer's error on its transaction waiter, which
    nothing awaits once the task is dropped; asyncio logged it as an ERROR with a traceback
    when the future was collected. stop_producer marks it seen (a real, never started
    AIOKafkaProducer; the fencing as aiokafka's sender reports it)."""
    import gc

    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import ProducerFenced

    from headrace.runtime.kafka.clients import stop_producer

    logged: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: logged.append(ctx["message"]))

    async def fenced(stop: bool) -> None:
        producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", transactional_id="t")
        txn = producer._txn_manager
        txn._transaction_waiter = loop.create_future()  # a transaction under way
        txn.fatal_error(ProducerFenced())
        if stop:
            await stop_producer(producer)
        else:
            await producer.stop()

    await fenced(stop=False)  # the control: without it, the error is logged
    gc.collect()
    assert logged == ["Future exception was never retrieved"]
    logged.clear()
    await fenced(stop=True)
    gc.collect()
    assert logged == []
