"""The write lease: a worker that may have lost its group membership does not write.

Kafka's group coordinator expels a member that has not sent a heartbeat for
``session.timeout.ms`` and gives its partitions to another member. The expelled member learns
this only from its *next* exchange with the coordinator. A worker that was paused (GC, swap, a
frozen VM, SIGSTOP) therefore resumes believing it still owns its tasks, and under at-least-once
nothing in Kafka stops its writes (see :mod:`headrace.runtime.checkpoint.fencing`).

The coordinator starts a member's session clock when it *receives* a heartbeat, which is after
the member *sent* it. So if the last successful heartbeat was sent at ``t`` (our monotonic
clock), the member is in the group until at least ``t + session_timeout``, and no other member
can own its partitions before that. :class:`MembershipLease` records ``t`` for every successful
heartbeat (and for a completed join) and answers one question before every write: is ``now``
still safely inside that window? The safety margin (one heartbeat interval, at most a third of
the session) covers the time a write takes to reach the broker and the rebalance the new owner
still has to go through; with the default 10 s session and 3 s heartbeat a healthy member's
lease is never older than about 3 s, so the check never fires in normal operation.

**During a rebalance** the coordinator answers heartbeats with ``REBALANCE_IN_PROGRESS``, and
aiokafka counts that as a success (it is: the member stays in the group). But the coordinator
removes a member that has not rejoined within the *rebalance timeout* of the rebalance's start,
heartbeats or not, and hands its partitions to the others. So such a heartbeat only shows the
member alive: it extends the lease to ``min(sent + session, confirmed + rebalance_timeout)``,
``confirmed`` being the send time of the last plain success (the rebalance started after the
coordinator answered that one, so its deadline is later than ``confirmed + rebalance_timeout``).
That is what lets a revocation write its tasks' final checkpoints for up to the rebalance timeout
(``Settings.rebalance_timeout_ms``, 30 s by default) instead of the session, and never longer
than the group waits for it. A heartbeat is taken as "rebalancing" when it left the consumer
asking to rejoin (aiokafka's ``_rejoin_needed_fut``; a rejoin asked for another reason is taken
the same way, which only shortens the lease).

aiokafka has no public hook for heartbeats, so the lease wraps the group coordinator's
``_do_heartbeat`` of the one consumer it guards (aiokafka 0.11-0.14 all have it; the pin in
pyproject.toml keeps it so). Where the hook is missing the lease cannot be renewed by
heartbeats and falls back to the last join: the worker then drops and re-restores its tasks
once per session, which is slow but never wrong.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiokafka.client import ConnectionGroup

log = logging.getLogger(__name__)

#: the warning that a transport cannot be guarded (another event loop) is logged once a process
_unguarded_transport_logged = False


class LeaseExpired(RuntimeError):
    """The worker cannot be sure it still owns its tasks: it must not write for them."""


class ProducerBroken(RuntimeError):
    """A batch of an idempotent producer failed: the producer must be replaced.

    aiokafka gives a batch its sequence numbers when it first takes it from the queue and never
    takes them back. A batch that fails after that (one that waited past the request timeout
    for a partition without a leader while the broker was away, or any error the sender does
    not retry) leaves a gap in its partition's sequence, and the broker answers every later
    batch to that partition with ``OutOfOrderSequenceNumber``: the producer can never write
    there again. Java's producer resets its producer id in that case; aiokafka does not.
    """


class MembershipLease:
    """Tracks the last moment this consumer's group membership was confirmed."""

    def __init__(
        self,
        group_id: str,
        *,
        session_timeout_ms: int,
        heartbeat_interval_ms: int,
        rebalance_timeout_ms: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.group_id = group_id
        self.session = session_timeout_ms / 1000
        #: aiokafka's default rebalance timeout is the session timeout
        self.rebalance = (rebalance_timeout_ms or session_timeout_ms) / 1000
        self.margin = min(heartbeat_interval_ms / 1000, self.session / 3)
        self.clock = clock
        self.confirmed_at: float | None = None  #: send time of the last confirmation
        #: send time of the last heartbeat answered "rebalancing" (module docstring)
        self.alive_at: float | None = None
        self.generation: int | None = None
        self._coordinator: Any = None

    def attach(self, consumer: Any) -> None:
        """Wrap the consumer's heartbeat so every successful one renews the lease."""
        coordinator: Any = getattr(consumer, "_coordinator", None)
        heartbeat = getattr(coordinator, "_do_heartbeat", None)
        self._coordinator = coordinator
        if heartbeat is None:
            log.warning(
                "aiokafka has no heartbeat hook here; group %s renews its write lease only on "
                "rebalances",
                self.group_id,
            )
            return
        lease = self

        async def tracked_heartbeat() -> Any:
            sent = lease.clock()
            ok = await heartbeat()
            if ok:
                rejoin = getattr(coordinator, "_rejoin_needed_fut", None)
                if rejoin is None or rejoin.done():  # "rebalancing" (aiokafka: True, rejoin)
                    lease.alive(sent)
                else:
                    lease.renew(sent)
            return ok

        coordinator._do_heartbeat = tracked_heartbeat

    def joined(self) -> None:
        """A rebalance just completed with this member in it (called on assignment)."""
        self.renew(self.clock() - self.margin)
        generation = getattr(self._coordinator, "generation", None)
        self.generation = generation if isinstance(generation, int) and generation > 0 else None

    @property
    def member_id(self) -> str | None:
        """This member's id in its group (None before the first join)."""
        member = getattr(self._coordinator, "member_id", None)
        return member if isinstance(member, str) and member else None

    def renew(self, sent_at: float) -> None:
        if self.confirmed_at is None or sent_at > self.confirmed_at:
            self.confirmed_at = sent_at

    def alive(self, sent_at: float) -> None:
        """A heartbeat sent at ``sent_at`` was answered "rebalancing" (module docstring)."""
        if self.alive_at is None or sent_at > self.alive_at:
            self.alive_at = sent_at

    def expire(self) -> None:
        """Forget the confirmation (the worker dropped its tasks; the next join renews)."""
        self.confirmed_at = None
        self.alive_at = None

    def remaining(self) -> float:
        """Seconds the lease still holds (negative: expired)."""
        confirmed = self.confirmed_at
        if confirmed is None:
            return -1.0
        deadline = confirmed + self.session
        if self.alive_at is not None:  # a rebalance: the group waits for us this long
            deadline = max(deadline, min(self.alive_at + self.session, confirmed + self.rebalance))
        return deadline - self.margin - self.clock()

    def check(self, what: str) -> None:
        """Raise :class:`LeaseExpired` unless the membership is confirmed recently enough."""
        left = self.remaining()
        if left < 0:
            since = "never" if self.confirmed_at is None else f"{-left + self.session:.1f}s ago"
            raise LeaseExpired(
                f"group {self.group_id}: membership last confirmed {since} (session timeout "
                f"{self.session:.1f}s); not writing {what}. The worker was paused, or cut off "
                "from the broker, past its session timeout: it drops its tasks and rejoins"
            )

    def request_rejoin(self) -> None:
        """Ask the consumer to rejoin its group (a new assignment follows)."""
        request = getattr(self._coordinator, "request_rejoin", None)
        if request is not None:
            request()


class ProducerGuard:
    """Fails a producer's batches at the moment they would leave the process, while any lease
    it serves has expired.

    The lease check before a write is not enough on its own: the producer sends asynchronously
    (a batch waits in aiokafka's accumulator for the sender task), so a pause between the check
    and the send would let the batch out after the process resumes, as a zombie's write. The
    guard repeats the check inside the sender, in the same synchronous step as the socket
    write (aiokafka's ``Sender._send_produce_req``: the request is built and written without
    yielding to the event loop when the connection is up), and once more before the part of a
    request the socket did not take at once leaves (:meth:`guard_transport`), so only a pause
    inside one of those two synchronous steps remains. A failed batch leaves a gap in the
    idempotent producer's sequence numbers, so once tripped the guard fails every later batch
    too, and the worker replaces the producer.

    For the same reason the guard also trips on *any* failed batch of the producer, whatever
    failed it (:class:`ProducerBroken`): it watches every batch from the moment aiokafka gives
    it its sequence numbers (``MessageAccumulator._pop_batch``, the one place that does). A
    broker away for longer than the request timeout expires the batches waiting for a leader
    there; without this, the producer went on writing into a sequence gap and the worker died
    of ``OutOfOrderSequenceNumber`` after the broker came back (CI, broker restart test).
    """

    def __init__(self, leases: Callable[[], Iterable[MembershipLease]]) -> None:
        self.leases = leases
        #: why the producer may not write any more (an expired lease, a failed batch)
        self.tripped: LeaseExpired | ProducerBroken | None = None

    def expired(self) -> LeaseExpired | None:
        for lease in self.leases():
            if lease.confirmed_at is not None and lease.remaining() < 0:
                try:
                    lease.check("produce requests")
                except LeaseExpired as exc:
                    return exc
        return None

    def install(self, producer: Any) -> None:
        sender: Any = getattr(producer, "_sender", None)
        send = getattr(sender, "_send_produce_req", None)
        if send is None:
            log.warning("aiokafka has no produce hook here; only the write lease guards writes")
            return
        guard = self

        async def guarded_send(node_id: int, batches: dict[Any, Any]) -> None:
            failure = guard.tripped or guard.expired()
            if failure is None:
                # produce requests use the node's default connection (aiokafka's client)
                conns = getattr(getattr(sender, "client", None), "_conns", None) or {}
                conn = conns.get((node_id, ConnectionGroup.DEFAULT))
                if conn is not None:
                    guard.guard_transport(conn)
                await send(node_id, batches)
                return
            guard.tripped = failure
            for batch in batches.values():
                batch.failure(exception=failure)
            sender._in_flight.discard(node_id)
            for tp in batches:
                sender._muted_partitions.discard(tp)

        sender._send_produce_req = guarded_send
        self._watch_batches(producer)

    def guard_transport(self, conn: Any) -> None:
        """Check the lease again before the rest of a request leaves the process.

        A request larger than what the socket takes at once (its send buffer: loopback and busy
        links fill it) is written partly; asyncio keeps the rest in the transport's buffer and
        sends it when the socket is writable again, which after a pause is right after the
        process resumes, before any other check could run. The guard wraps that callback of
        the connection's transport (``_write_ready``, asyncio's selector transports): if the
        lease expired meanwhile, the connection is aborted instead, and the broker, which never
        got the whole request, writes none of it. (Seen: a paused worker's sink record landed
        after the new owner's, ARCHITECTURE.md 7.1.) The request fails as a lost connection, and
        the tripped guard fails its retry and every later batch."""
        transport: Any = getattr(getattr(conn, "_writer", None), "transport", None)
        if transport is None or getattr(transport, "_headrace_guard", None) is self:
            return
        write_ready = getattr(transport, "_write_ready", None)
        if write_ready is None:  # not a selector transport: the send-time check only
            global _unguarded_transport_logged
            if not _unguarded_transport_logged:
                _unguarded_transport_logged = True
                log.warning(
                    "the producer's connections use %s, which has no _write_ready: after a "
                    "pause longer than the lease, the unsent rest of a produce request can "
                    "still leave this worker (the lease is checked when a batch is sent only; "
                    "run on asyncio's default event loop to close that window)",
                    type(transport).__name__,
                )
            return
        guard = self

        def guarded_write_ready() -> None:
            failure = guard.expired()
            if failure is not None and transport.get_write_buffer_size():
                guard.tripped = failure
                log.warning(
                    "dropping the unsent rest of a produce request (%d bytes): %s",
                    transport.get_write_buffer_size(),
                    failure,
                )
                transport.abort()
                return
            write_ready()

        transport._write_ready = guarded_write_ready
        transport._headrace_guard = self

    def _watch_batches(self, producer: Any) -> None:
        accumulator: Any = getattr(producer, "_message_accumulator", None)
        pop = getattr(accumulator, "_pop_batch", None)
        if pop is None:
            log.warning("aiokafka has no batch hook here; a failed batch does not trip the guard")
            return

        def watched_pop(tp: Any) -> Any:
            batch = pop(tp)
            if batch.retry_count == 1:  # its first drain: it has just got its sequence numbers
                batch.future.add_done_callback(lambda fut: self._batch_done(tp, fut))
            return batch

        accumulator._pop_batch = watched_pop

    def _batch_done(self, tp: Any, fut: Any) -> None:
        if fut.cancelled() or self.tripped is not None:
            return
        failure = fut.exception()
        if failure is not None:
            # (The failure is named, not chained as __cause__: the batch's own future holds
            # it with its traceback, and whoever awaits this one already has that.)
            self.tripped = ProducerBroken(
                f"a batch to {tp.topic}[{tp.partition}] failed ({type(failure).__name__}: "
                f"{failure}); its sequence numbers are spent, so the producer is replaced"
            )

    @staticmethod
    def discard_queued(producer: Any) -> None:
        """Fail every batch still queued in ``producer`` (before stopping it: ``stop`` would
        otherwise send them)."""
        accumulator: Any = getattr(producer, "_message_accumulator", None)
        queued: Any = getattr(accumulator, "_batches", None)
        if not queued:
            return
        failure = LeaseExpired("producer replaced after a lost membership")
        for tp in list(queued):
            for batch in queued.pop(tp):
                batch.failure(exception=failure)
                # Mark the outcome seen on the batch's future and its drain waiter: a delivery
                # that a task had not registered yet (a commit under way) or the waiter nobody
                # awaits would otherwise print "Future exception was never retrieved" when
                # collected. Whoever awaits them still gets the exception.
                for fut in (getattr(batch, "future", None), getattr(batch, "_drain_waiter", None)):
                    if fut is not None and fut.done() and not fut.cancelled():
                        fut.exception()
