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


async def test_a_failed_commit_leaves_no_unretrieved_delivery_error() -> None:
    """A commit that fails on its first changelog delivery (a fenced producer, an expired
    lease) has sent outputs whose batches fail with the same error and that nothing awaits any
    more: the commit abandons every batch it sent, so asyncio does not log one "Future
    exception was never retrieved" per batch (seen in bench/scale.py's logs). The deliveries
    are futures failed the way aiokafka's sender fails a fenced producer's batches."""
    import gc
    from types import SimpleNamespace
    from typing import Any

    from aiokafka.errors import ProducerFenced

    from headrace.runtime.checkpoint.commit import Committer
    from headrace.runtime.checkpoint.pending import PendingCheckpoint

    logged: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: logged.append(ctx["message"]))

    def failing(n: int) -> list[Any]:
        out = []
        for _ in range(n):
            fut = loop.create_future()
            loop.call_soon(fut.set_exception, ProducerFenced())
            out.append((fut, 1))
        return out

    class Sender:
        async def send(self, records: list[Any]) -> list[Any]:
            return failing(len(records))

        async def send_pairs(self, *args: Any) -> list[Any]:
            return failing(2)

    io: Any = SimpleNamespace(
        name="stage0/0",
        stage_name="stage0",
        partition=0,
        sender=Sender(),
        unacked=failing(1),  # an earlier checkpoint's ack, not acknowledged yet
        changelog_topics={"counts": "job.counts.changelog"},
        changelog_last={},
        epoch_headers=None,
    )
    pending = PendingCheckpoint(
        1,
        {("words", 0): 10},
        {},
        True,
        False,
        {"counts": [(b"k", b"1")]},
        {},
        [("out", None, b"k", b"1", [], None)] * 3,
    )
    committer = Committer(Any, exactly_once=False, consumer=Any, worker_id="w")  # type: ignore[arg-type]
    with pytest.raises(ProducerFenced):
        await committer.commit(io, pending)
    await asyncio.sleep(0)
    gc.collect()
    await asyncio.sleep(0)
    assert logged == []


async def test_a_fenced_producers_unreachable_futures_are_not_logged_while_the_worker_runs() -> (
    None
):
    """aiokafka fails every future of a fenced producer with the same ProducerFenced, some of
    them internal (its batches' drain waiters); while a worker runs those are not logged, and
    any other never-retrieved error still is."""
    import gc

    from aiokafka.errors import ProducerFenced

    from headrace.runtime.kafka.clients import fenced_producer_errors_consumed

    logged: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: logged.append(repr(ctx.get("exception"))))

    def dropped(exc: BaseException) -> None:
        fut = loop.create_future()
        fut.set_exception(exc)
        del fut
        gc.collect()

    class Cycle:
        """A future only the collector frees (a dropped producer's are in reference cycles)."""

        def __init__(self, exc: BaseException) -> None:
            self.me = self
            self.fut = loop.create_future()
            self.fut.set_exception(exc)

    gc.disable()  # (the test decides when the collector runs)
    try:
        with fenced_producer_errors_consumed(loop):
            dropped(ProducerFenced())
            dropped(ValueError("a bug"))
            Cycle(ProducerFenced())  # freed when the worker ends, still under the handler
        dropped(ProducerFenced())  # after the worker: the handler before it again
    finally:
        gc.enable()
    assert logged == [repr(ValueError("a bug")), repr(ProducerFenced())]
