"""Every Kafka client the runtime makes, built from :class:`~headrace.runtime.config.Settings`.

One place decides the flags that must agree across clients: connection and security settings
(SASL/SSL pass through unchanged, secrets never logged), the isolation level that follows the
processing guarantee (``read_committed`` under exactly-once, so aborted transactions stay
invisible to task inputs, restores and inspection alike), no auto-commit (offsets are committed
by checkpoints only), reading from the earliest offset when nothing is committed, and the
producer settings of durable writes (``acks=all``, idempotence).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar, cast

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import ProducerFenced
from aiokafka.protocol.group import LeaveGroupRequest

from headrace.runtime.config import Settings
from headrace.runtime.kafka.fetch import FetchingConsumer

log = logging.getLogger(__name__)

__all__ = [
    "MAX_REQUEST_SIZE",
    "PRODUCER_SETTINGS",
    "admin_client",
    "group_consumer",
    "producer",
    "reader",
    "status_producer",
]

#: the largest request (and so record) a producer sends: aiokafka's default, named here because
#: the task checks every output and state value against it (and the topic's max.message.bytes)
MAX_REQUEST_SIZE = 1_048_576

#: durable writes: every in-sync replica acknowledges, idempotent retries, batched sends
PRODUCER_SETTINGS: dict[str, Any] = {
    "acks": "all",
    "max_request_size": MAX_REQUEST_SIZE,
    "enable_idempotence": True,
    "linger_ms": 5,
    "max_batch_size": 512 * 1024,
}


def _isolation(settings: Settings, committed_only: bool | None) -> str:
    committed = settings.exactly_once if committed_only is None else committed_only
    return "read_committed" if committed else "read_uncommitted"


def group_consumer(settings: Settings, group_id: str, *, client_id: str) -> AIOKafkaConsumer:
    """A task-input consumer: a member of ``group_id`` that commits only through checkpoints.

    The range assignor keeps partition ``p`` of co-partitioned inputs on one member; the
    session timeout is also the member's write lease (:mod:`headrace.runtime.kafka.lease`).
    Its records are :class:`~headrace.runtime.kafka.fetch.FetchedRecord` (as every consumer's
    here: :mod:`headrace.runtime.kafka.fetch`).
    """
    return FetchingConsumer(
        **settings.kafka_kwargs(),
        client_id=client_id,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=_isolation(settings, None),
        partition_assignment_strategy=(RangePartitionAssignor,),
        max_partition_fetch_bytes=4 * 1024 * 1024,
        session_timeout_ms=settings.session_timeout_ms,
        rebalance_timeout_ms=settings.rebalance_timeout_ms,
        # A JoinGroup waits up to the rebalance timeout for the other members (Java's
        # consumer gives it the rebalance timeout plus 5 s too).
        request_timeout_ms=max(40_000, settings.rebalance_timeout_ms + 5_000),
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        # Partitions added to an input topic are seen within seconds, not at aiokafka's
        # default 5-minute refresh: the group rebalances and the new partitions get tasks.
        metadata_max_age_ms=GROUP_METADATA_MAX_AGE_MS,
    )


#: how often a task-input consumer refreshes topic metadata (one small request each time)
GROUP_METADATA_MAX_AGE_MS = 5_000


def reader(
    settings: Settings,
    *,
    client_id: str,
    committed_only: bool | None = None,
    max_partition_fetch_bytes: int = 8 * 1024 * 1024,
) -> AIOKafkaConsumer:
    """A group-less consumer that reads assigned partitions (restores, inspection).

    ``committed_only`` defaults to the guarantee's isolation level.
    """
    return FetchingConsumer(
        **settings.kafka_kwargs(),
        client_id=client_id,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=_isolation(settings, committed_only),
        max_partition_fetch_bytes=max_partition_fetch_bytes,
    )


def producer(
    settings: Settings, *, client_id: str, transactional_id: str | None = None
) -> AIOKafkaProducer:
    """A durable producer; with ``transactional_id``, a task's exactly-once producer."""
    extra: dict[str, Any] = {}
    if transactional_id is not None:
        extra["transactional_id"] = transactional_id
    return AIOKafkaProducer(
        **settings.kafka_kwargs(),
        client_id=client_id,
        request_timeout_ms=settings.producer_request_timeout_ms,
        **PRODUCER_SETTINGS,
        **extra,
    )


class Startable(Protocol):
    """What :func:`start_producers` needs of a producer."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...


ProducerT = TypeVar("ProducerT", bound=Startable)


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """``consumer.stop()``, without aiokafka's own cancellation escaping from it.

    aiokafka 0.14's ``Fetcher.close`` cancels its pending fetch requests and awaits them
    unguarded: a request waiting in its retry backoff (the broker unreachable) turns the stop
    into a ``CancelledError`` in a caller nobody cancelled, and the consumer's client is left
    open. A worker whose lease expired during a broker outage died of it (rc 1, the failure
    that stopped it hidden behind the cancellation). Here the stop completes: that error is
    swallowed and the client closed, unless the caller itself is being cancelled.
    """
    try:
        await _stop_leaving_a_pending_join(consumer)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
        client = getattr(consumer, "_client", None)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()


#: how long a stop lets a join in progress end by itself before it leaves the group
PENDING_JOIN_GRACE_S = 0.2


def rebalancing(consumer: AIOKafkaConsumer) -> bool:
    """The consumer's group is between assignments (a join or sync under way).

    The one place that reads aiokafka's private subscription state for it (no public API says
    so); False where that state is not there to ask."""
    subscription: Any = getattr(consumer, "_subscription", None)
    return subscription is not None and bool(subscription.reassignment_in_progress)


async def _stop_leaving_a_pending_join(consumer: AIOKafkaConsumer) -> None:
    """``consumer.stop()``; if the member is in the middle of a join, it leaves the group first.

    aiokafka's stop lets its coordinator finish the join under way before it leaves, and a
    join lasts until every member of the group rejoined: up to the session timeout when a
    kill -9'd member is still in the group, up to the rebalance timeout when one is slow.
    A SIGTERM then took that long (5 s of every recovery test's final stop, with 6 s
    sessions). Once the join has given the member its id, a LeaveGroup with that id makes the
    broker answer the pending JoinGroup at once (UNKNOWN_MEMBER_ID, which ends aiokafka's
    coordination routine as it is closing) and go on with the rebalance without this member;
    without it the group would also have waited for, and then timed out, a member that never
    comes back. The LeaveGroup goes on a connection of its own: the broker answers a
    connection's requests in order, and the JoinGroup holds the coordinator connection."""
    coordinator: Any = getattr(consumer, "_coordinator", None)
    if (
        coordinator is None
        or not rebalancing(consumer)
        or not getattr(coordinator, "member_id", "")
        # a static member (group.instance.id) keeps its place across restarts: it never leaves
        or getattr(coordinator, "_group_instance_id", None) is not None
    ):
        await consumer.stop()
        return
    stopping = asyncio.ensure_future(consumer.stop())
    try:
        done, _ = await asyncio.wait((stopping,), timeout=PENDING_JOIN_GRACE_S)
        if not done:
            await _leave_group(consumer, coordinator)
        await stopping
    except asyncio.CancelledError:
        stopping.cancel()
        raise


async def _leave_group(consumer: AIOKafkaConsumer, coordinator: Any) -> None:
    node, member = coordinator.coordinator_id, coordinator.member_id
    client: Any = getattr(consumer, "_client", None)
    if node is None or not member or client is None:
        return
    try:
        await client.send(node, LeaveGroupRequest(coordinator.group_id, member))
    except Exception as exc:  # the stop goes on as before: it waits for the join
        log.debug("LeaveGroup of a pending join of %s failed: %r", coordinator.group_id, exc)
    else:
        log.debug("left group %s during a pending join", coordinator.group_id)


async def stop_producer(producer: AIOKafkaProducer) -> None:
    """``producer.stop()``, errors swallowed (the caller is dropping the producer), and the
    error of a fenced transactional producer taken as seen.

    When aiokafka's sender meets ``ProducerFenced`` (a new owner of the task's transactional
    id, a normal step of a rebalance under exactly-once) it puts the error on its transaction
    manager's waiter future, which nothing awaits once the task is dropped: asyncio then
    logged ``ERROR Future exception was never retrieved`` with a traceback for every fenced
    producer (four workers starting 256 tasks together: one per worker per rebalance). The
    runner has handled the fencing (the task is dropped and the worker rejoins) by the time it
    stops the producer, so the error is marked retrieved here.
    """
    with contextlib.suppress(Exception):
        await producer.stop()
    txn = getattr(producer, "_txn_manager", None)
    waiter = getattr(txn, "_transaction_waiter", None)
    if isinstance(waiter, asyncio.Future) and waiter.done() and not waiter.cancelled():
        waiter.exception()


def in_empty_transaction(producer: AIOKafkaProducer) -> bool:
    """The transactional ``producer`` is running, inside a transaction that holds nothing yet
    (no partition added, no offsets): it can go on as if it had just begun it. False where
    aiokafka's transaction manager is not there to ask (then the caller starts a new one)."""
    txn: Any = getattr(producer, "_txn_manager", None)
    sender: Any = getattr(producer, "_sender", None)
    try:
        return bool(
            getattr(producer, "_closed", None) is False  # started, not stopped
            and txn.is_in_transaction()
            and txn.is_empty_transaction()
            and not txn.partitions_to_add()
            and txn.consumer_group_to_add() is None
            and sender is not None
            and sender.sender_task is not None
            and not sender.sender_task.done()
        )
    except AttributeError:
        return False


@contextlib.contextmanager
def fenced_producer_errors_consumed(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """While the worker runs: a ``ProducerFenced`` that asyncio finds never retrieved on a
    future is not logged (everything else goes to the handler that was there before).

    Fencing is a normal step of a rebalance under exactly-once: the new owner of a task's
    transactional id fences the old producer, the runner drops the task (one WARNING for all
    of them) and rejoins. aiokafka's sender then fails *every* future of that producer with the
    same error: its transaction waiter (:func:`stop_producer` marks it seen), the delivery
    futures (:func:`~headrace.runtime.kafka.producer.abandon`), and internal ones nobody
    outside aiokafka can reach (its batches' drain waiters). asyncio logged each of the
    latter as ``ERROR Future exception was never retrieved`` with a traceback: 466 of them in
    one worker's log at 256 partitions (bench/scale.py), burying the one warning that matters.
    """
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if isinstance(context.get("exception"), ProducerFenced) and "never retrieved" in str(
            context.get("message", "")
        ):
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    try:
        yield
    finally:
        # The dropped producers' futures are reported when the collector frees them, which
        # for those in reference cycles is after the worker returned (256 tracebacks at the
        # end of a run at 256 partitions): collect them while the handler is still here.
        gc.collect()
        loop.set_exception_handler(previous)


async def start_producers(
    make: Callable[[int], ProducerT], partitions: list[int]
) -> dict[int, ProducerT]:
    """Create and start one producer per partition, concurrently (``InitProducerId`` is a
    round trip each).

    Nothing leaks: if any start fails, every producer is stopped and the first error raised;
    if the caller is cancelled half-way (the worker stops, the assignment is revoked while it
    is being taken over), the producers already started are stopped too, and a start under
    way stops its own. Before this, a takeover cancelled mid-way left its started producers
    to the garbage collector ("Unclosed AIOKafkaProducer", their connections open until then).
    """

    async def start(partition: int) -> ProducerT:
        producer = make(partition)
        try:
            await producer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        return producer

    tasks = [asyncio.ensure_future(start(p)) for p in partitions]

    async def stop_started() -> None:
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is None:
                with contextlib.suppress(Exception):
                    await task.result().stop()

    try:
        results = await asyncio.gather(*tasks, return_exceptions=True)
    except BaseException:  # cancelled: gather cancelled the starts under way
        await asyncio.gather(*tasks, return_exceptions=True)  # let them stop their own
        await stop_started()
        raise
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is not None:
        await stop_started()
        raise failed
    return dict(zip(partitions, cast("list[ProducerT]", results), strict=True))


def status_producer(settings: Settings, *, client_id: str) -> AIOKafkaProducer:
    """A producer for best-effort operational records (worker status): one ack, no batching
    delay; never used for anything a checkpoint depends on."""
    return AIOKafkaProducer(**settings.kafka_kwargs(), client_id=client_id, acks=1, linger_ms=0)


def admin_client(settings: Settings, *, client_id: str) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**settings.kafka_kwargs(), client_id=client_id)


class KafkaSetupError(RuntimeError):
    """headrace cannot talk to Kafka with these settings: unreachable, refused credentials, a
    TLS or protocol mismatch. The message names the broker, the cause and the settings to check;
    it is a problem of the environment, not a bug, so the CLI shows it without a traceback."""


async def preflight(settings: Settings, timeout_s: float = 10.0) -> None:
    """Connect to the bootstrap servers once, as every client will, and explain a failure.

    aiokafka reports every bootstrap failure as "Unable to bootstrap from [...]", whether the
    host is down, the SASL password is wrong or a TLS client talks to a plain listener. This
    opens one connection per bootstrap server until one succeeds and, if none does, raises
    :class:`KafkaSetupError` with the cause per server, naming the settings to check. Secrets
    never appear in the message.
    """
    import asyncio

    from aiokafka import errors
    from aiokafka.conn import create_conn
    from aiokafka.protocol.metadata import MetadataRequest

    kw = settings.kafka_kwargs()
    causes: list[str] = []
    for server in settings.bootstrap_servers.split(","):
        host, _, port = server.rpartition(":")
        try:
            conn = await asyncio.wait_for(
                create_conn(
                    host,
                    int(port),
                    client_id=f"{settings.client_id}-preflight",
                    request_timeout_ms=int(timeout_s * 1000),
                    ssl_context=kw.get("ssl_context"),
                    security_protocol=settings.security_protocol,
                    sasl_mechanism=settings.sasl_mechanism or "PLAIN",
                    sasl_plain_username=settings.sasl_username,
                    sasl_plain_password=settings.sasl_password,
                ),
                timeout_s,
            )
        except (errors.SaslAuthenticationFailed, errors.AuthenticationFailedError) as exc:
            causes.append(
                f"{server}: SASL authentication failed for user {settings.sasl_username!r} "
                f"with mechanism {settings.sasl_mechanism} ({_describe(exc)}); check "
                "HEADRACE_SASL_USERNAME / --sasl-username, HEADRACE_SASL_PASSWORD and "
                "HEADRACE_SASL_MECHANISM / --sasl-mechanism"
            )
            continue
        except errors.UnsupportedSaslMechanismError as exc:
            causes.append(
                f"{server}: the broker does not offer SASL mechanism {settings.sasl_mechanism} "
                f"({_describe(exc)}); set HEADRACE_SASL_MECHANISM / --sasl-mechanism"
            )
            continue
        except (TimeoutError, errors.KafkaError, OSError) as exc:
            causes.append(f"{server}: {_connection_hint(settings, exc)}")
            continue
        try:
            await asyncio.wait_for(conn.send(MetadataRequest([])), timeout_s)
        except (TimeoutError, errors.KafkaError, OSError) as exc:
            causes.append(f"{server}: {_connection_hint(settings, exc)}")
            continue
        finally:
            conn.close()
        return
    raise KafkaSetupError(
        f"cannot use Kafka at {settings.bootstrap_servers} (--bootstrap-servers / "
        f"HEADRACE_BOOTSTRAP_SERVERS) with security protocol {settings.security_protocol}:\n  "
        + "\n  ".join(causes)
    )


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _connection_hint(settings: Settings, exc: BaseException) -> str:
    """What a failed connection most likely means, given the security protocol in use."""
    if isinstance(exc, ConnectionRefusedError) or "Connect call failed" in str(exc):
        return f"connection refused ({_describe(exc)}): is a broker listening there?"
    if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
        return f"cannot connect ({_describe(exc)})"
    hint = "does the listener use this security protocol? (--security-protocol)"
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        hint += "; check the certificates (--ssl-cafile, --ssl-certfile, --ssl-keyfile)"
    return f"the connection failed ({_describe(exc)}): {hint}"
