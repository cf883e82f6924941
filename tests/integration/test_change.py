"""Exact under change (issue 15), against the real broker: a job's life is new deployments, a
second job under a name already used, offsets moved with Kafka's own tools, and a reset. Each
either keeps state exact or is refused before anything is consumed, with a message that says
what changed and what to do; none may lose or mix state silently.

Workers run in this process (``Worker.run()``), one job per test with its own name and topics.
"""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from headrace import JSON, STR, Job
from headrace.operators.job import JobDefinitionError
from headrace.operators.operator import Context, Operator
from headrace.operators.record import Record
from headrace.operators.state import ListStateDescriptor, ValueStateDescriptor
from headrace.runtime.config import Settings
from headrace.runtime.host import CheckpointMissingError
from headrace.runtime.kafka.identity import JobIdentityError
from headrace.runtime.pytest_plugin import TopicFactory
from headrace.runtime.recovery import read_topic
from headrace.runtime.recovery.inprocess import run_worker_until
from headrace.runtime.worker import Worker

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]

GUARANTEES = ["exactly_once", "at_least_once"]


def settings(bootstrap: str, guarantee: str = "exactly_once", **extra: Any) -> Settings:
    return Settings(
        bootstrap_servers=bootstrap,
        processing_guarantee=guarantee,
        checkpoint_interval_ms=200,
        **extra,
    )


async def produce(bootstrap: str, topic: str, pairs: list[tuple[str, str]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for key, value in pairs:
            await (await producer.send(topic, value.encode(), key=key.encode(), partition=0))
    finally:
        await producer.stop()


async def last_counts(bootstrap: str, sink: str) -> dict[str, Any]:
    records = await read_topic(bootstrap, sink, key_serde=STR, value_serde=JSON)
    return {key: value for _, _, key, value, _ in records}


async def run_until(
    job: Job, s: Settings, sink: str, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Run a worker until the latest value per key in ``sink`` satisfies ``done``; stop it
    (a final checkpoint) and return those values."""

    async def check() -> bool:
        return done(await last_counts(s.bootstrap_servers, sink))

    await run_worker_until(job, s, check)
    return await last_counts(s.bootstrap_servers, sink)


async def refused(job: Job, s: Settings) -> str:
    """Start a worker that must be refused at start-up; the refusal's message."""
    with pytest.raises((JobIdentityError, CheckpointMissingError)) as caught:
        await asyncio.wait_for(Worker(job, s).run(), 120)
    return str(caught.value)


class Tally(Operator):
    """A count in a ValueState whose serde the test changes between deployments."""

    n = ValueStateDescriptor[int](type=int, default=0)

    def process(self, record: Record[Any, Any], ctx: Context) -> None:
        n = self.n.value() + 1
        self.n.update(n)
        ctx.emit(n)


class TallyJson(Tally):
    """The same operator after a deployment that changed the state's serde to JSON."""

    n = ValueStateDescriptor[int](serde=JSON, default=0)


@pytest.fixture
async def topics(topic_factory: TopicFactory) -> tuple[str, str, str]:
    """(job name, source, sink) with 8 records of key "a" in the source."""
    return (
        f"change-{uuid.uuid4().hex[:8]}",
        await topic_factory("change-in"),
        await topic_factory("change-out"),
    )


def counting(name: str, source: str, sink: str, *counts: str | None) -> Job:
    """source -> count(name) for each entry of ``counts`` (None: unnamed) -> sink."""
    job = Job(name)
    stream = job.source(source, key_serde=STR, value_serde=STR)
    for count_name in counts:
        stream = stream.count(name=count_name)
    stream.sink(sink, key_serde=STR, value_serde=JSON)
    return job


async def test_operators_added_and_removed_keep_state_or_are_refused(
    kafka_bootstrap_servers: str, topics: tuple[str, str, str]
) -> None:
    """Issue 15 item 1: an unnamed count upstream used to rename the running one from
    ``count-1`` to ``count-2`` (its state started from zero), and removing it again brought
    back state of two deployments ago."""
    name, source, sink = topics
    s = settings(kafka_bootstrap_servers)
    await produce(kafka_bootstrap_servers, source, [("a", "x")] * 8)
    first = await run_until(counting(name, source, sink, None), s, sink, lambda c: c == {"a": 8})
    assert first == {"a": 8}

    # A second unnamed count: refused when the job is built, naming what to do.
    with pytest.raises(JobDefinitionError, match=r"both be called 'count'.*count\(name=\.\.\.\)"):
        counting(name, source, sink, None, None)

    # Named, it is a new operator with empty state; the running one keeps its 8.
    await produce(kafka_bootstrap_servers, source, [("a", "x")] * 8)
    second = await run_until(
        counting(name, source, sink, "first", None), s, sink, lambda c: c.get("a") == 16
    )
    assert second == {"a": 16}

    # Removing it again is refused while its state exists: no silent orphan that a later
    # deployment would pick up.
    message = await refused(counting(name, source, sink, None), s)
    assert "operator 'first' removed or renamed" in message
    assert f"{name}.first.changelog" in message
    assert "headrace reset" in message


async def test_a_renamed_operator_and_a_changed_serde_are_refused_at_start(
    kafka_bootstrap_servers: str, topics: tuple[str, str, str]
) -> None:
    name, source, sink = topics
    s = settings(kafka_bootstrap_servers)
    await produce(kafka_bootstrap_servers, source, [("a", "x")] * 4)
    job = Job(name)
    job.source(source, key_serde=STR, value_serde=STR).process(Tally(), name="tally").sink(
        sink, key_serde=STR, value_serde=JSON
    )
    assert await run_until(job, s, sink, lambda c: c == {"a": 4}) == {"a": 4}

    changed = Job(name)
    changed.source(source, key_serde=STR, value_serde=STR).process(TallyJson(), name="tally").sink(
        sink, key_serde=STR, value_serde=JSON
    )
    message = await refused(changed, s)
    assert "state 'n' of 'tally' changed serde int64 -> json" in message, message
    assert "class Tally -> TallyJson" in message

    renamed = Job(name)
    renamed.source(source, key_serde=STR, value_serde=STR).process(Tally(), name="tallies").sink(
        sink, key_serde=STR, value_serde=JSON
    )
    message = await refused(renamed, s)
    assert "operator 'tally' removed or renamed" in message
    assert "operator 'tallies' added" in message

    # The job as it was still resumes exactly.
    await produce(kafka_bootstrap_servers, source, [("a", "x")] * 4)
    assert await run_until(job, s, sink, lambda c: c == {"a": 8}) == {"a": 8}


async def test_a_different_job_under_a_name_in_use_is_refused(
    kafka_bootstrap_servers: str, topics: tuple[str, str, str], topic_factory: TopicFactory
) -> None:
    """Issue 15 item 2: sequentially it used to continue the first job's counts; concurrently
    it died of a bare ProducerFenced."""
    name, source, sink = topics
    other_source = await topic_factory("change-other")
    s = settings(kafka_bootstrap_servers)
    await produce(kafka_bootstrap_servers, source, [("a", "x")] * 5)
    await produce(kafka_bootstrap_servers, other_source, [("a", "y")] * 3)
    owner = counting(name, source, sink, "counts")
    assert await run_until(owner, s, sink, lambda c: c == {"a": 5}) == {"a": 5}

    intruder = counting(name, other_source, sink, "counts")
    message = await refused(intruder, s)
    assert f"sources changed: ['{source}'] -> ['{other_source}']" in message
    assert "give it its own name" in message

    # Concurrently: the owner runs, the intruder is refused, the owner's counts stay exact.
    worker = Worker(owner, s)
    running = asyncio.create_task(worker.run())
    try:
        await asyncio.sleep(3)
        message = await refused(intruder, s)
        assert "sources changed" in message
        await produce(kafka_bootstrap_servers, source, [("a", "x")] * 5)
        for _ in range(120):
            await asyncio.sleep(0.5)
            if (await last_counts(kafka_bootstrap_servers, sink)) == {"a": 10}:
                break
        assert not running.done()
        assert await last_counts(kafka_bootstrap_servers, sink) == {"a": 10}
    finally:
        worker.stop()
        await running


JOB_MODULE = textwrap.dedent(
    """
    import os

    from headrace import JSON, STR, Job

    job = Job(os.environ["T_JOB"])
    job.source(os.environ["T_SOURCE"], key_serde=STR, value_serde=STR).count(
        name="counts"
    ).sink(os.environ["T_SINK"], key_serde=STR, value_serde=JSON)
    """
)


async def headrace_reset(project: Path, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """``headrace reset userjob:job [args]`` in the user's project: (exit code, out, err)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "headrace.runtime.cli",
        "reset",
        "userjob:job",
        *args,
        cwd=project,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.mark.parametrize("guarantee", GUARANTEES)
async def test_offsets_reset_with_kafka_tools_never_erase_state(
    kafka_bootstrap_servers: str,
    topics: tuple[str, str, str],
    guarantee: str,
    tmp_path: Path,
) -> None:
    """Issue 15 item 3: offsets committed again without headrace's metadata (what
    ``kafka-consumer-groups --reset-offsets --to-current`` leaves) used to make an
    at-least-once restore treat the whole changelog as stale and erase it (the next "a"
    counted 1, not 7). Now the worker stops before touching state, names the cause and
    ``headrace reset``; the reset then gives a clean start."""
    name, source, sink = topics
    s = settings(kafka_bootstrap_servers, guarantee, state_backend="rocksdb", state_dir=tmp_path)
    job = counting(name, source, sink, "counts")
    await produce(kafka_bootstrap_servers, source, [("a", "x")] * 6)
    assert await run_until(job, s, sink, lambda c: c == {"a": 6}) == {"a": 6}

    # What kafka-consumer-groups --reset-offsets does: commit offsets, no metadata.
    tp = TopicPartition(source, 0)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap_servers,
        group_id=job.group_id(job.stages[0]),
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.commit({tp: 6})
    finally:
        await consumer.stop()

    await produce(kafka_bootstrap_servers, source, [("a", "x")])
    message = await refused(job, s)
    assert "carry no headrace checkpoint" in message
    assert f"{name}.counts.changelog[0] holds" in message
    assert "headrace reset" in message
    assert await last_counts(kafka_bootstrap_servers, sink) == {"a": 6}  # nothing consumed

    # headrace reset, as a user runs it: refused while a worker runs is covered by its
    # plan; here every worker is stopped. --to earliest replays the 7 records from scratch.
    (tmp_path / "userjob.py").write_text(JOB_MODULE)
    env = dict(
        os.environ,
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap_servers,
        HEADRACE_STATE_DIR=str(tmp_path),
        T_JOB=name,
        T_SOURCE=source,
        T_SINK=sink,
    )
    rc, out, err = await headrace_reset(tmp_path, env)
    assert rc == 0, err
    assert "nothing changed: add --yes" in out
    assert f"{name}.counts.changelog" in out
    rc, out, err = await headrace_reset(tmp_path, env, "--yes")
    assert rc == 0, out + err
    assert (tmp_path / name).exists() is False  # local state deleted

    # A clean restart: every input counted once from an empty state (the sink's earlier
    # records stay; the newest value per key is the new run's).
    before = len(await read_topic(kafka_bootstrap_servers, sink))
    await run_until(
        job,
        s,
        sink,
        lambda c: c == {"a": 7},
    )
    after = await read_topic(kafka_bootstrap_servers, sink, key_serde=STR, value_serde=JSON)
    assert [v for *_, v, _ in after[before:]] == list(range(1, 8))


@pytest.mark.parametrize("guarantee", GUARANTEES)
async def test_a_deleted_group_never_double_counts_or_erases_state(
    kafka_bootstrap_servers: str,
    kafka_admin: Any,
    topics: tuple[str, str, str],
    guarantee: str,
    tmp_path: Path,
) -> None:
    """The group's offsets deleted (``kafka-consumer-groups --delete``, or the broker expiring
    an empty group's offsets after ``offsets.retention.minutes``): the task finds no offset at
    all. Exactly-once used to restore the changelog and count the input again from the earliest
    offset ("a" counted 13, not 7); at-least-once took the changelog for the leftovers of a
    checkpoint that never committed, rewrote it as deleted and counted again from whatever the
    input's retention had kept. Now the changelog proves a checkpoint committed and the worker
    stops before consuming anything."""
    from aiokafka.protocol.admin import DeleteGroupsRequest

    name, source, sink = topics
    s = settings(kafka_bootstrap_servers, guarantee, state_backend="rocksdb", state_dir=tmp_path)
    job = counting(name, source, sink, "counts")
    await produce(kafka_bootstrap_servers, source, [("a", "x")] * 6)
    assert await run_until(job, s, sink, lambda c: c == {"a": 6}) == {"a": 6}

    group = job.group_id(job.stages[0])
    node = await kafka_admin.find_coordinator(group)
    response = await kafka_admin._send_request_to_node(node, DeleteGroupsRequest([group]))
    assert [code for _, code in response.results] == [0], response

    await produce(kafka_bootstrap_servers, source, [("a", "x")])
    message = await refused(job, s)
    assert "the group's offsets were deleted" in message, message
    assert f"{name}.counts.changelog[0] holds the state of a checkpoint that committed" in message
    assert "offsets.retention.minutes" in message and "headrace reset" in message
    assert await last_counts(kafka_bootstrap_servers, sink) == {"a": 6}  # nothing consumed


async def test_reset_is_refused_while_a_worker_runs(
    kafka_bootstrap_servers: str, topics: tuple[str, str, str], tmp_path: Path
) -> None:
    name, source, sink = topics
    s = settings(kafka_bootstrap_servers)
    job = counting(name, source, sink, "counts")
    await produce(kafka_bootstrap_servers, source, [("a", "x")] * 2)
    worker = Worker(job, s)
    running = asyncio.create_task(worker.run())
    try:
        for _ in range(120):
            await asyncio.sleep(0.5)
            if await last_counts(kafka_bootstrap_servers, sink) == {"a": 2}:
                break
        (tmp_path / "userjob.py").write_text(JOB_MODULE)
        env = dict(
            os.environ,
            KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap_servers,
            T_JOB=name,
            T_SOURCE=source,
            T_SINK=sink,
        )
        rc, out, err = await headrace_reset(tmp_path, env, "--yes")
        assert rc == 1, out + err
        assert "the job is running" in err
        assert f"group {name}.stage0 has member(s)" in err
        assert not running.done()
    finally:
        worker.stop()
        await running


BIG = 2_000_000  #: a 2 MB output: over the broker's default max.message.bytes (1 MB)


def enlarge(value: str) -> str:
    return "x" * BIG if value == "big" else value


@pytest.mark.parametrize("guarantee", GUARANTEES)
@pytest.mark.parametrize("policy", ["fail", "skip", "dead_letter"])
async def test_an_output_that_does_not_fit_goes_through_the_error_policy(
    kafka_bootstrap_servers: str, topics: tuple[str, str, str], guarantee: str, policy: str
) -> None:
    """Issue 15 item 4: a 2 MB output used to fail the checkpoint with a bare
    MessageSizeTooLargeError, ignore the error policy and crash every restart (re-emitting
    earlier outputs under at-least-once). It is now the failure of the input record that made
    it, named, under the job's policy; nothing is repeated across a restart."""
    name, source, sink = topics
    s = settings(kafka_bootstrap_servers, guarantee)
    job = Job(name, error_policy=policy)
    job.source(source, key_serde=STR, value_serde=STR).map(enlarge).sink(
        sink, key_serde=STR, value_serde=STR
    )
    await produce(kafka_bootstrap_servers, source, [("k", "a"), ("k", "big"), ("k", "b")])

    async def outputs() -> list[str]:
        return [v for *_, v, _ in await read_topic(kafka_bootstrap_servers, sink, value_serde=STR)]

    if policy == "fail":
        with pytest.raises(Exception) as caught:
            await asyncio.wait_for(Worker(job, s).run(), 120)
        message = str(caught.value)
        assert f"topic {source!r} partition 0 offset 1" in message, message
        assert f"the output to topic {sink!r} is 2,000,001 bytes (key + value)" in message
        assert "max.message.bytes" in message
        assert "big" not in await outputs() and all(len(v) < BIG for v in await outputs())
        return

    for _ in range(2):  # the second run must not repeat anything
        worker = Worker(job, s)
        running = asyncio.create_task(worker.run())
        try:
            for _ in range(120):
                await asyncio.sleep(0.5)
                assert not running.done(), running.result()
                if await outputs() == ["a", "b"]:
                    break
            await asyncio.sleep(1)
        finally:
            worker.stop()
            await running
        assert await outputs() == ["a", "b"]
    letters = await read_topic(kafka_bootstrap_servers, job.dead_letter_topic)
    if policy == "skip":
        assert letters == []
    else:
        assert [(v, dict(h)["hr.error.offset"]) for *_, v, h in letters] == [(b"big", b"1")]
        assert b"is 2,000,001 bytes (key + value)" in dict(letters[0][4])["hr.error.message"]


class Collect(Operator):
    """Appends every value to a ListState: 200 KB elements grow it past 1 MB at the 6th."""

    seen = ListStateDescriptor[str](type=str)

    def process(self, record: Record[Any, Any], ctx: Context) -> None:
        self.seen.add(record.value * 200_000)
        ctx.emit(len(self.seen.get()))


@pytest.mark.parametrize(
    ("guarantee", "spaced"),
    [("exactly_once", True), ("at_least_once", True), ("exactly_once", False)],
    ids=[
        "exactly_once-grows-across-checkpoints",
        "at_least_once-grows-across-checkpoints",
        "exactly_once-grows-within-one-checkpoint",
    ],
)
@pytest.mark.parametrize("policy", ["fail", "skip", "dead_letter"])
async def test_a_state_value_that_does_not_fit_goes_through_the_error_policy(
    kafka_bootstrap_servers: str,
    topics: tuple[str, str, str],
    guarantee: str,
    spaced: bool,
    policy: str,
) -> None:
    """Issue 15 item 4: a ListState growing past 1 MB used to fail every checkpoint with a
    bare MessageSizeTooLargeError. Now the record that makes it too large (the 6th, offset 5)
    fails under the job's policy with its state write taken back; the 1st to 5th stay.

    Grown across checkpoints, the key is watched once a checkpoint sees it past half the
    limit and the record is caught as it runs; grown within one checkpoint interval, the
    checkpoint finds it, the task runs its records again checked (exactly-once: its
    transaction aborted, so nothing is repeated either way)."""
    name, source, sink = topics
    s = settings(kafka_bootstrap_servers, guarantee)
    job = Job(name, error_policy=policy)
    job.source(source, key_serde=STR, value_serde=STR).process(Collect(), name="collect").sink(
        sink, key_serde=STR, value_serde=JSON
    )
    worker = Worker(job, s)
    running = asyncio.create_task(worker.run())

    async def sizes() -> list[int]:
        return [v for *_, v, _ in await read_topic(kafka_bootstrap_servers, sink, value_serde=JSON)]

    try:
        for _ in range(8):
            await produce(kafka_bootstrap_servers, source, [("user-7", "y")])
            if spaced:
                await asyncio.sleep(0.6)  # a checkpoint (200 ms) between two records
        for _ in range(120):
            if running.done() or (await sizes() == [1, 2, 3, 4, 5] and policy != "fail"):
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.5)  # anything repeated or late would show now
    finally:
        worker.stop()
        failure = None
        try:
            await running
        except Exception as exc:
            failure = exc
    if policy == "fail":
        message = str(failure)
        assert f"topic {source!r} partition 0 offset 5" in message, message
        assert "state 'seen' of operator 'collect'" in message
        assert "this record's state writes were taken back" in message
    else:
        assert failure is None, failure
        assert await sizes() == [1, 2, 3, 4, 5]
        letters = await read_topic(kafka_bootstrap_servers, job.dead_letter_topic)
        offsets = [dict(h)["hr.error.offset"] for *_, h in letters]
        assert offsets == ([] if policy == "skip" else [b"5", b"6", b"7"])
