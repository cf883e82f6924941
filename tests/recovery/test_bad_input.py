"""Bad input: undeserializable records under each error policy, a corrupted changelog, and an
internal topic with the wrong partition count. Real workers, real broker."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from scenario import REPO

from headrace.operators.serde import JSON
from headrace.runtime.pytest_plugin import TopicFactory
from headrace.runtime.recovery import FaultDriver, Verifier, read_topic, wordcount_replay
from headrace.runtime.recovery.jobs import build_json_wordcount

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]

JOB_SPEC = "headrace.runtime.recovery.jobs:json_wordcount()"
BAD = b"\xffthis is not JSON"
GOOD = [f"line {i} of good words and more {i % 7}" for i in range(300)]
BAD_AT = 100  #: offset of the bad record in partition 0


def _is_json(value: bytes | None) -> bool:
    try:
        orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return False
    return True


async def _produce(bootstrap: str, topic: str, values: list[bytes], partition: int = 0) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for v in values:
            await (await producer.send(topic, v, partition=partition))
    finally:
        await producer.stop()


class JsonJob:
    def __init__(
        self,
        bootstrap: str,
        topic_factory: TopicFactory,
        fault_driver: Callable[..., FaultDriver],
    ) -> None:
        self.bootstrap = bootstrap
        self.topic_factory = topic_factory
        self.fault_driver = fault_driver

    async def make(
        self, policy: str, guarantee: str = "exactly_once", partitions: int = 2
    ) -> tuple[Any, FaultDriver]:
        source = await self.topic_factory("jl", partitions=partitions)
        sink = await self.topic_factory("jc", partitions=partitions)
        name = f"jwc-{uuid.uuid4().hex[:8]}"
        env = {
            "RECOVERY_JOB": name,
            "RECOVERY_SOURCE": source,
            "RECOVERY_SINK": sink,
            "HEADRACE_PROCESSING_GUARANTEE": guarantee,
            "HEADRACE_ERROR_POLICY": policy,
            "HEADRACE_CHECKPOINT_INTERVAL_MS": "500",
        }
        driver = self.fault_driver(JOB_SPEC, env=env, cwd=REPO)
        return build_json_wordcount(name, source, sink), driver


@pytest.fixture
def json_job(
    kafka_bootstrap_servers: str,
    topic_factory: TopicFactory,
    fault_driver: Callable[..., FaultDriver],
) -> JsonJob:
    return JsonJob(kafka_bootstrap_servers, topic_factory, fault_driver)


def _input_with_one_bad_record() -> list[bytes]:
    values = [JSON.serialize(line) for line in GOOD]
    values.insert(BAD_AT, BAD)
    return values


def _verifier(bootstrap: str) -> Verifier:
    return Verifier(bootstrap, wordcount_replay, input_serde=JSON, input_filter=_is_json)


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
async def test_undeserializable_record_under_fail_policy_exits_nonzero_naming_it_and_commits_nothing_past_it(  # noqa: E501
    json_job: JsonJob, kafka_bootstrap_servers: str, guarantee: str
) -> None:
    job, d = await json_job.make("fail", guarantee=guarantee)
    source = job.stages[0].source.topics[0]
    await _produce(kafka_bootstrap_servers, source, _input_with_one_bad_record())
    w = d.start_worker()
    rc = await w.wait(60)
    assert rc is not None and rc != 0, w.log()
    assert f"topic {source!r} partition 0 offset {BAD_AT}" in w.log(), w.log()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap_servers)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(job.group_id(job.stages[0]))
    finally:
        await admin.close()
    for tp, om in committed.items():
        if tp.topic == source and tp.partition == 0:
            assert om.offset <= BAD_AT, (tp, om)
    # Nothing produced from records past the bad one is visible (read_committed).
    out = await read_topic(kafka_bootstrap_servers, job.stages[-1].output.topic)
    expected_before = wordcount_replay(GOOD[:BAD_AT])
    for _p, _o, k, v, _h in out:
        word, count = k.decode(), int.from_bytes(v, "big", signed=True)
        assert count <= len(expected_before.get(word, [])), (word, count)


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
async def test_undeserializable_record_under_skip_policy_is_counted_and_good_results_exact(
    json_job: JsonJob, kafka_bootstrap_servers: str, guarantee: str
) -> None:
    job, d = await json_job.make("skip", guarantee=guarantee)
    source = job.stages[0].source.topics[0]
    await _produce(kafka_bootstrap_servers, source, _input_with_one_bad_record())
    d.start_worker()
    v = _verifier(kafka_bootstrap_servers)
    expected = await v.expected(source)
    sink = job.stages[-1].output.topic
    await v.wait_caught_up(expected, sink, wait_s=60, alive=d.any_alive)
    assert all(c == 0 for c in (await d.stop_all()).values()), d.logs()
    log = d.logs()
    assert f"skipped record at topic {source!r} partition 0 offset {BAD_AT}" in log, log
    report = await v.verify(
        input_topic=source,
        output_topic=sink,
        guarantee=guarantee,
        job=job,
        operator_id="counts",
        expected=expected,
    )
    assert report.ok, report.summary()


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
async def test_undeserializable_record_under_dead_letter_policy_lands_in_dlq_with_error_headers(
    json_job: JsonJob, kafka_bootstrap_servers: str, guarantee: str
) -> None:
    """The bad record is written to <job>.dlq with hr.error.* headers, exactly once (under
    exactly_once) and the good records' counts stay exact."""
    job, d = await json_job.make("dead_letter", guarantee=guarantee)
    source = job.stages[0].source.topics[0]
    await _produce(kafka_bootstrap_servers, source, _input_with_one_bad_record())
    d.start_worker()
    v = _verifier(kafka_bootstrap_servers)
    expected = await v.expected(source)
    sink = job.stages[-1].output.topic
    await v.wait_caught_up(expected, sink, wait_s=60, alive=d.any_alive)
    assert all(c == 0 for c in (await d.stop_all()).values()), d.logs()
    dlq = await read_topic(kafka_bootstrap_servers, job.dead_letter_topic)
    assert len(dlq) == 1 if guarantee == "exactly_once" else len(dlq) >= 1, dlq
    _p, _o, _k, value, headers = dlq[0]
    assert value == BAD
    h = dict(headers)
    assert h["hr.error.kind"] == b"deserialization"
    assert h["hr.error.topic"] == source.encode()
    assert h["hr.error.partition"] == b"0"
    assert h["hr.error.offset"] == str(BAD_AT).encode()
    assert h["hr.error.message"]
    report = await v.verify(
        input_topic=source,
        output_topic=sink,
        guarantee=guarantee,
        job=job,
        operator_id="counts",
        expected=expected,
    )
    assert report.ok, report.summary()


async def test_corrupted_changelog_record_stops_restore_naming_topic_partition_offset(
    json_job: JsonJob, kafka_bootstrap_servers: str
) -> None:
    job, d = await json_job.make("fail")
    source = job.stages[0].source.topics[0]
    await _produce(kafka_bootstrap_servers, source, [JSON.serialize(x) for x in GOOD[:50]])
    v = _verifier(kafka_bootstrap_servers)
    expected = await v.expected(source)
    d.start_worker()
    await v.wait_caught_up(expected, job.stages[-1].output.topic, wait_s=60, alive=d.any_alive)
    assert all(c == 0 for c in (await d.stop_all()).values()), d.logs()

    changelog = job.changelog_topic("counts")
    before = await read_topic(kafka_bootstrap_servers, changelog, committed=False)
    partition = before[0][0]
    corrupt_offset = max(o for p, o, *_ in before if p == partition) + 1
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap_servers, acks="all")
    await producer.start()
    try:
        meta = await (await producer.send(changelog, b"x", key=b"foreign-key", partition=partition))
    finally:
        await producer.stop()
    assert meta.offset >= corrupt_offset - 1

    w = d.start_worker()
    rc = await w.wait(60)
    assert rc is not None and rc != 0, w.log()
    where = f"changelog record at topic {changelog!r} partition {partition} offset {meta.offset}"
    assert where in w.log(), w.log()


async def test_internal_topic_with_wrong_partition_count_stops_startup_before_consuming(
    json_job: JsonJob, kafka_bootstrap_servers: str, topic_factory: TopicFactory
) -> None:
    from aiokafka.admin import NewTopic

    job, d = await json_job.make("fail", partitions=4)
    source = job.stages[0].source.topics[0]
    changelog = job.changelog_topic("counts")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(changelog, 2, 1, topic_configs={"cleanup.policy": "compact"})]
        )
        await _produce(kafka_bootstrap_servers, source, [JSON.serialize(x) for x in GOOD[:20]])
        w = d.start_worker()
        rc = await w.wait(60)
        assert rc is not None and rc != 0, w.log()
        assert changelog in w.log() and "has 2 partitions, expected 4" in w.log(), w.log()
        for stage in job.stages:
            committed = await admin.list_consumer_group_offsets(job.group_id(stage))
            assert not committed, committed
        assert await read_topic(kafka_bootstrap_servers, job.stages[-1].output.topic) == []
    finally:
        await admin.delete_topics([changelog])
        await admin.close()
