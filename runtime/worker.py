"""The worker process: every stage of a job, as consumer-group members, with tasks per partition.

For each stage the worker runs a :class:`~headrace.runtime.stage_runner.StageRunner`, a member
of the consumer group ``<job>.<stage>``; the partitions Kafka assigns to it become tasks
(:class:`headrace.runtime.task.StageTask`). The range assignor keeps partition ``p`` of
co-partitioned inputs on one member. Scaling out is starting another worker. The worker owns
what the stages share: the admin client, the at-least-once producer, the stores' factory, the
metrics and the ops endpoints (over the worker as a :class:`~headrace.runtime.view.WorkerView`).

Rebalances are eager in aiokafka (every member gives up everything, then receives its new
share), so revoked tasks are *suspended* after their final checkpoint rather than dropped: when a
partition comes straight back and nobody committed anything for it meanwhile, the task resumes
with its in-memory state; otherwise it is restored from its changelog in the background while
its inputs stay paused (ARCHITECTURE.md section 6).

Partial failures. A worker that was paused past its session timeout (see
:mod:`headrace.runtime.kafka.lease`) or whose commit says it is no longer a member (a failed
offset commit, a fenced producer) drops every task of that stage *without* a checkpoint and
rejoins the group; it does not exit. Under at-least-once every new ownership of a task claims a
writer epoch in the task's changelog partitions before it processes anything
(:mod:`headrace.runtime.checkpoint.fencing`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    KafkaConnectionError,
)
from aiokafka.structs import TopicPartition

from headrace.operators.job import ErrorPolicy, Job
from headrace.runtime.checkpoint.lag import Tail, data_lag
from headrace.runtime.config import Settings
from headrace.runtime.gctuning import young_threshold
from headrace.runtime.kafka import clients
from headrace.runtime.kafka.control import ControlWatcher
from headrace.runtime.kafka.health import BROKER_AWAY, BrokerHealth
from headrace.runtime.kafka.identity import check_identity
from headrace.runtime.kafka.lease import ProducerGuard
from headrace.runtime.kafka.topics import TopicLayout, ensure_topics
from headrace.runtime.logs import register_secrets
from headrace.runtime.metrics import WorkerMetrics
from headrace.runtime.stage_runner import StageRunner
from headrace.runtime.state.backend import open_backend
from headrace.runtime.state.keys import StatePartitionKey
from headrace.runtime.state.store import OperatorStateStore
from headrace.runtime.status import Operations
from headrace.runtime.view import InputLag, LagKey, StageSnapshot

#: how long a scrape (or a savepoint's drain check) waits for consumer positions, all together
LAG_DEADLINE_S = 0.5
#: how often a new shared producer tries to reach the broker (see _start_shared_producer)
PRODUCER_RETRY_S = 1.0

log = logging.getLogger(__name__)


class Worker:
    """Runs one job until stopped; ``await worker.run()``; ``worker.stop()`` from a signal."""

    def __init__(self, job: Job, settings: Settings, *, clock: Callable[[], float] = time.time):
        self.job = job
        self.settings = settings
        self.clock = clock
        register_secrets(settings.secrets())  # masked in every log line, whatever the source
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}"
        self.error_policy = ErrorPolicy(settings.error_policy or job.error_policy)
        self._stop = asyncio.Event()
        self.runners: list[StageRunner] = []
        self.layout: TopicLayout | None = None
        #: follows <job>.control (runtime/kafka/control.py) while the stages run
        self.control: ControlWatcher | None = None
        #: the job's incarnation (runtime/kafka/identity.py): local state lives under it
        self.incarnation = "unchecked"
        self.admin: AIOKafkaAdminClient | None = None
        self.shared_producer: AIOKafkaProducer | None = None
        #: at-least-once: fails the shared producer's sends while a stage's lease is expired
        self.producer_guard: ProducerGuard | None = None
        self._replacing = asyncio.Lock()
        self.failure: BaseException | None = None
        self.metrics = WorkerMetrics(self)  #: its own registry (runtime/metrics.py)
        self.ops_port: int | None = None  #: where /metrics, /health, /ready are served
        #: ops HTTP server + status publisher (runtime/status.py), over this worker as a view
        self.ops = Operations(self, self.metrics)
        #: broker reachability: aiokafka's connection errors counted and summarised
        self.broker = BrokerHealth(settings.bootstrap_servers)

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def until_stopping(self) -> None:
        await self._stop.wait()

    def ready(self) -> bool:
        """Every stage is a confirmed member of its group (its write lease holds) and none of
        its assigned tasks is restoring: the worker does its share (the /ready endpoint, the
        headrace_ready gauge, the status snapshot). Not before a stage's first assignment, not
        once its heartbeats have failed for a session (the group has expelled it), and not
        after it dropped its tasks, until it has rejoined. A worker with no partitions assigned
        (more workers than partitions) is ready."""
        return bool(self.runners) and all(
            r.ready() and r.lease.remaining() > 0 for r in self.runners
        )

    def not_ready_reason(self) -> str:
        """Why :meth:`ready` is False, naming the stages ("" when it is True)."""
        if not self.runners:
            return "starting: no stage has joined its group yet"
        reasons = []
        for r in self.runners:
            if r.lease.confirmed_at is None:
                reasons.append(f"stage {r.stage.name} is joining group {r.group_id}")
            elif r.lease.remaining() <= 0:
                unconfirmed = r.lease.clock() - r.lease.confirmed_at
                reasons.append(
                    f"stage {r.stage.name}: membership of group {r.group_id} not confirmed for "
                    f"{unconfirmed:.0f}s (session timeout {r.lease.session:.0f}s)"
                )
            elif r.restoring:
                reasons.append(f"stage {r.stage.name} is restoring task(s) {sorted(r.restoring)}")
            elif not r.ready():
                reasons.append(f"stage {r.stage.name} is taking over its assigned task(s)")
        return "; ".join(reasons)

    # -- the view operations read (headrace.runtime.view.WorkerView) ---------------------------
    def broker_connected(self) -> bool:
        return self.broker.connected()

    def broker_problem(self) -> str:
        return self.broker.describe()

    async def _watch_broker(self) -> None:
        """About once a second: the outage summary or the recovery line (kafka/health.py)."""
        while True:
            await asyncio.sleep(1.0)
            self.broker.report()

    def stage_snapshots(self) -> list[StageSnapshot]:
        return [r.snapshot() for r in list(self.runners)]

    async def input_lag(self) -> InputLag:
        """Last stable offset (exactly-once) or high watermark minus the consumer's position,
        per running task input. Both come from the last fetch response, so this costs no
        request; partitions not fetched yet, or whose position is not known within
        :data:`LAG_DEADLINE_S`, are left out."""
        tails, _ = await self._input_tails()
        return {key: max(0, t.end - t.start) for key, t in tails.items()}

    async def _input_tails(self) -> tuple[dict[LagKey, Tail], set[LagKey]]:
        """Per running task input, its :class:`Tail` from the consumer's position to the end
        (last stable offset or high watermark); and the inputs whose position was not known in
        time.

        A position is usually known at once; it is not while a seek waits for the broker (a
        rewind, a task starting, an outage). The positions are awaited together, under one
        deadline: a scrape of /metrics used to await them one by one, up to a second each, so a
        worker with many partitions answered it slowly or not at all during an outage, when it
        is needed most."""
        exactly_once = self.settings.exactly_once
        keys: list[LagKey] = []
        ends: list[int] = []
        positions: list[asyncio.Task[int]] = []
        for runner in list(self.runners):
            consumer = runner.consumer
            for p in list(runner.tasks):
                for tp in runner.input_tps(p):
                    try:
                        end = (
                            consumer.last_stable_offset(tp)
                            if exactly_once
                            else consumer.highwater(tp)
                        )
                    except Exception:  # revoked meanwhile
                        continue
                    if end is None or end < 0:
                        continue
                    keys.append((runner.stage.name, tp.topic, tp.partition))
                    ends.append(end)
                    positions.append(asyncio.ensure_future(consumer.position(tp)))
        if not positions:
            return {}, set()
        _, late = await asyncio.wait(positions, timeout=LAG_DEADLINE_S)
        for task in late:
            task.cancel()
        await asyncio.gather(*positions, return_exceptions=True)
        tails: dict[LagKey, Tail] = {}
        unknown: set[LagKey] = set()
        for key, end, task in zip(keys, ends, positions, strict=True):
            if task.cancelled() or task.exception() is not None:
                unknown.add(key)  # not known in time, or revoked meanwhile
            else:
                tails[key] = Tail(committed=task.result(), end=end)
        return tails, unknown

    async def run(self) -> None:
        s = self.settings
        log.info("worker %s starting job %r with %r", self.worker_id, self.job.name, s)
        self.admin = clients.admin_client(s, client_id=f"{s.client_id}-admin")
        self.broker.install()
        watch = asyncio.create_task(self._watch_broker(), name="broker-health")
        try:
            loop = asyncio.get_running_loop()
            with (
                young_threshold(s.gc_young_threshold),
                clients.fenced_producer_errors_consumed(loop),
            ):
                await self._run()
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            self.broker.uninstall()

    async def _run(self) -> None:
        s = self.settings
        assert self.admin is not None
        try:
            await self.admin.start()
        except KafkaConnectionError:
            await clients.preflight(s)  # raises KafkaSetupError naming the cause
            raise
        try:
            self.incarnation = await check_identity(self.admin, s, self.job)
            self.layout = await ensure_topics(self.admin, self.job)
            await self.ops.start()
            self.runners = [StageRunner(self, stage) for stage in self.job.stages]
            if not s.exactly_once:
                await self._start_shared_producer()
            for r in self.runners:
                await r.start()
            self.control = ControlWatcher(self.settings, self.job)
            await self.control.start()
            loops = [
                asyncio.create_task(r.loop(), name=f"loop-{r.stage.name}") for r in self.runners
            ]
            control = asyncio.create_task(self._watch_control(), name="control")
            stop_wait = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait([*loops, stop_wait], return_when=asyncio.FIRST_COMPLETED)
            self._stop.set()
            for t in done:
                if t is not stop_wait and t.exception() is not None:
                    self.failure = t.exception()
            # loops exit at their next iteration once _stop is set; a second failing loop must
            # not skip the shutdown of the others (their clients would be left unclosed)
            results = await asyncio.gather(*loops, return_exceptions=True)
            for t, result in zip(loops, results, strict=True):
                if isinstance(result, BaseException) and self.failure is None:
                    self.failure = result
                    log.debug("loop %s failed", t.get_name(), exc_info=result)
            control.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await control
            # Every stage takes nothing over from here on, before the first one shuts down: a
            # stage's shutdown can wait for its group's join to end, and the next stage's join
            # ending meanwhile used to start a takeover (producers, restores) of tasks that
            # were closed right after.
            for r in self.runners:
                r.stopping = True
            for r in self.runners:
                try:
                    await r.shutdown(final_checkpoint=self.failure is None)
                except Exception as exc:
                    if self.failure is None:
                        self.failure = exc
                    else:
                        log.warning("shutdown of stage %s after a failure: %r", r.stage.name, exc)
        finally:
            if self.control is not None:
                with contextlib.suppress(Exception):
                    await self.control.stop()
            await self.ops.stop()
            if self.shared_producer is not None:
                await self.shared_producer.stop()
            await self.admin.close()
        if self.failure is not None:
            raise self.failure
        log.info("worker %s stopped cleanly", self.worker_id)

    async def _watch_control(self) -> None:
        """Follow ``<job>.control`` (runtime/kafka/control.py): on a drain request stop reading
        input, and stop once everything in flight is processed (stop-with-savepoint)."""
        watcher = self.control
        assert watcher is not None
        calm = 0
        # started and stopped by _run: a cancel never leaves its consumer half started
        while not self.stopping:
            await asyncio.sleep(1.0)
            request = await watcher.drain_request()
            if request is None:
                for r in self.runners:
                    r.undrain()  # a savepoint of the running job is taken: go on
                continue
            for r in self.runners:
                r.drain()
            if not request.get("stop", True):
                continue
            calm = calm + 1 if await self.drained() else 0
            if calm >= 3:  # three looks a second apart: nothing came in between
                log.info("worker %s drained for a stop-with-savepoint: stopping", self.worker_id)
                self.stop()

    async def drained(self) -> bool:
        """Nothing left in flight for this worker's tasks: no restore under way, no record
        held by an alignment, no data record behind any position of a stage behind a key_by.

        Data records, not offsets: while draining, every upstream task commits every
        checkpoint with a full barrier round (``StageRunner.drain``), so a repartition topic
        gets barrier records (and, under exactly-once, transaction markers) every interval and
        its offset lag is rarely 0 at the moment of a look; requiring that made a drain of a
        job with 8 downstream partitions wait ~30 s for three lucky looks in a row. The tail
        between position and end is read (:func:`data_lag`, what ``headrace status`` shows)
        and only data counts, which is also what the savepoint command checks afterwards."""
        internal = set()
        for r in self.runners:
            if r.restoring:
                return False
            if not r.stage.source.internal:
                continue
            internal.add(r.stage.name)
            for io in list(r.tasks.values()):
                aligner = getattr(io.task.cut, "aligner", None)
                if aligner is not None and (aligner.held_count() or aligner.aligning):
                    return False
        tails, unknown = await self._input_tails()
        if any(stage in internal for stage, _, _ in unknown):
            return False  # a position not known yet is not "nothing behind it"
        behind = {
            TopicPartition(topic, p): tail
            for (stage, topic, p), tail in tails.items()
            if stage in internal and tail.end > tail.start
        }
        if not behind:
            return True
        # a tail of a checkpoint's barriers is read in one fetch per partition; without the
        # committed checkpoint's metadata every record that is not a barrier counts as data
        # (an at-least-once replay the task would drop included): never drained too early
        return all(n == 0 for n, _ in (await data_lag(self.settings, behind)).values())

    async def _start_shared_producer(self, *, wait_for_broker: bool = False) -> bool:
        """The at-least-once producer every task shares, guarded by the stages' leases.

        ``wait_for_broker``: a start that cannot reach the broker is tried again every
        :data:`PRODUCER_RETRY_S` until it can, or until the worker stops (returns False, the
        old producer left in place). A replacement needs it: a lease expires precisely when the
        broker is out of reach, and a start that raised there ended the worker (found by
        ``tests/recovery/test_rebalance.py``'s broker restart in CI).
        """
        s = self.settings
        waiting = False
        while True:
            producer = clients.producer(s, client_id=s.client_id)
            try:
                await producer.start()
                break
            except BROKER_AWAY:  # the broker is not reachable (yet)
                with contextlib.suppress(Exception):
                    await producer.stop()
                if not wait_for_broker:
                    raise
            if not waiting:
                waiting = True
                log.warning("a new shared producer waits for the broker to answer")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), PRODUCER_RETRY_S)
            if self._stop.is_set():
                return False
        guard = ProducerGuard(lambda: [r.lease for r in self.runners])
        guard.install(producer)
        self.shared_producer, self.producer_guard = producer, guard
        return True

    async def replace_tripped_producer(self) -> None:
        """The guard failed writes of the shared producer (the worker was paused past its
        session) or saw one of its batches fail (kafka/lease.py ProducerBroken): its sequence
        numbers have a gap, so every stage drops its tasks and the worker goes on with a new
        producer; the old one is stopped without sending what it still holds."""
        async with self._replacing:
            old, guard = self.shared_producer, self.producer_guard
            if old is None or guard is None or guard.tripped is None:
                return  # already replaced
            log.warning("replacing the shared producer: %s", guard.tripped)
            if not await self._start_shared_producer(wait_for_broker=True):
                return  # stopping: the tripped producer fails what is still written
            for r in self.runners:
                await r.abandon(guard.tripped)
            ProducerGuard.discard_queued(old)
            with contextlib.suppress(Exception):
                await old.stop()

    # -- shared factories --------------------------------------------------------------------
    def partition_counts(self) -> dict[str, int]:
        assert self.layout is not None
        counts = dict(self.layout.sinks)
        counts.update({t.name: t.partitions for t in self.layout.internal})
        return counts

    def open_store(self, operator_id: str, partition: int) -> OperatorStateStore:
        s = self.settings
        path: Path | None = None
        if s.state_backend == "rocksdb":
            path = s.state_dir / self.job.name / self.incarnation / operator_id / str(partition)
            path.parent.mkdir(parents=True, exist_ok=True)
        backend = open_backend(s.state_backend, path)
        return OperatorStateStore(
            backend, StatePartitionKey(operator_id, partition, partition), clock=self.clock
        )
