"""Errors a user can act on, with real worker processes on the real broker.

* An operator that raises under the ``fail`` policy: the worker exits 1 and its log holds the
  traceback down to the user's own line, in text logs and in JSON logs (``exception`` field).
* Secrets: a secret that holds a quote, a backslash and a newline, quoted by the user's error
  message, appears nowhere in the process output (message, traceback, JSON fields) nor in the
  ``hr.error.message`` header of a dead-lettered record.
* A wrong SASL password (on a broker with a SASL listener) is named as an authentication
  failure, never echoed. A client that speaks SASL to a plain listener is told so; a
  session timeout the broker refuses is named, and the worker closes its clients.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from headrace.runtime.localkafka import LocalBroker
from headrace.runtime.pytest_plugin import TopicFactory
from headrace.runtime.recovery import read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]

#: a secret with the characters that break naive masking: a quote, a backslash, a newline
SECRET = 'pa"ss\\wo\nrd-7Q'

USER_JOB = textwrap.dedent(
    """
    import os

    from headrace import JSON, STR, Job

    SECRET = os.environ["HEADRACE_SASL_PASSWORD"]


    def parse(line: str) -> str:
        if line == "boom":
            raise ValueError(f"cannot parse {line!r} with key {SECRET!r} / {SECRET}")  # USER LINE
        return line


    job = Job(os.environ["T_JOB"], error_policy=os.environ["T_POLICY"])
    job.source(os.environ["T_SOURCE"], value_serde=STR).map(parse).sink(
        os.environ["T_SINK"], key_serde=JSON, value_serde=STR
    )
    """
)
USER_LINE = next(i for i, line in enumerate(USER_JOB.splitlines(), 1) if "USER LINE" in line)


def secret_spellings() -> list[str]:
    return [SECRET, repr(SECRET)[1:-1], json.dumps(SECRET)[1:-1], 'pa"ss', "wo\nrd-7Q"]


async def produce(bootstrap: str, topic: str, values: list[str]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for v in values:
            await (await producer.send(topic, v.encode(), partition=0))
    finally:
        await producer.stop()


async def run_user_job(
    tmp_path: Path,
    bootstrap: str,
    topic_factory: TopicFactory,
    *,
    policy: str,
    log_format: str,
    run_s: float = 60,
    extra_env: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess[str], str, str]:
    """Run the user's job (in its own project dir) over "a", "boom", "b" until it exits or
    ``run_s`` passed (then SIGTERM); returns the process, the job name and the sink topic."""
    (tmp_path / "userjob.py").write_text(USER_JOB)
    source = await topic_factory("err-in")
    sink = await topic_factory("err-out")
    name = f"err-{uuid.uuid4().hex[:8]}"
    await produce(bootstrap, source, ["a", "boom", "b"])
    env = dict(
        os.environ,
        KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        HEADRACE_SASL_PASSWORD=SECRET,
        HEADRACE_CHECKPOINT_INTERVAL_MS="200",
        T_JOB=name,
        T_POLICY=policy,
        T_SOURCE=source,
        T_SINK=sink,
        PYTHONUNBUFFERED="1",
        **(extra_env or {}),
    )
    args = [sys.executable, "-m", "headrace.runtime.cli", "--log-format", log_format]
    child = await asyncio.create_subprocess_exec(
        *args,
        "run",
        "userjob:job",
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(child.communicate(), run_s)
    except TimeoutError:
        child.send_signal(signal.SIGTERM)  # a worker that does not fail runs until stopped
        out, err = await child.communicate()
    proc = subprocess.CompletedProcess(args, child.returncode or 0, out.decode(), err.decode())
    return proc, name, sink


def start_worker(project: Path, env: dict[str, str], *options: str) -> tuple[int, str]:
    """``headrace [options] run userjob:job`` in the user's project: (exit code, output)."""
    proc = subprocess.run(
        [sys.executable, "-m", "headrace.runtime.cli", *options, "run", "userjob:job"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def assert_no_secret(text: str) -> None:
    for spelling in secret_spellings():
        assert spelling not in text, f"secret spelling {spelling!r} leaked:\n{text}"


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_an_operator_error_under_fail_logs_the_users_traceback_and_no_secret(
    tmp_path: Path, kafka_bootstrap_servers: str, topic_factory: TopicFactory, log_format: str
) -> None:
    proc, _, _ = await run_user_job(
        tmp_path, kafka_bootstrap_servers, topic_factory, policy="fail", log_format=log_format
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert_no_secret(output)
    user_frame = f'userjob.py", line {USER_LINE}, in parse'
    if log_format == "text":
        assert "worker failed: " in output and "offset 1" in output, output
        assert "Traceback (most recent call last)" in output and user_frame in output, output
    else:
        lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
        failed = [rec for rec in lines if rec["message"].startswith("worker failed: ")]
        assert failed, proc.stderr
        assert "offset 1" in failed[0]["message"]
        assert user_frame in failed[0]["exception"], failed[0]
        assert "***" in failed[0]["exception"]  # the secret was there, masked


async def test_a_dead_lettered_records_error_header_does_not_carry_the_secret(
    tmp_path: Path, kafka_bootstrap_servers: str, topic_factory: TopicFactory
) -> None:
    # the worker runs until stopped: give it a few seconds, then read the dead-letter topic
    proc, name, sink = await run_user_job(
        tmp_path,
        kafka_bootstrap_servers,
        topic_factory,
        policy="dead_letter",
        log_format="text",
        run_s=12,
    )
    assert_no_secret(proc.stdout + proc.stderr)
    dead = await read_topic(kafka_bootstrap_servers, f"{name}.dlq", committed=False)
    assert len(dead) == 1, dead
    headers = dict(dead[0][4])
    message = headers["hr.error.message"].decode()
    assert message.startswith("ValueError: cannot parse 'boom'") and "***" in message, message
    assert_no_secret(message)
    out = await read_topic(kafka_bootstrap_servers, sink, committed=False)
    assert sorted(v for *_, v, _h in out) == [b"a", b"b"]


def test_speaking_sasl_to_a_plain_listener_names_the_settings_to_check(
    tmp_path: Path, kafka_bootstrap_servers: str
) -> None:
    (tmp_path / "userjob.py").write_text("from headrace import Job\njob = Job('x')\n")
    env = dict(
        os.environ,
        HEADRACE_BOOTSTRAP_SERVERS=kafka_bootstrap_servers,
        HEADRACE_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        HEADRACE_SASL_MECHANISM="PLAIN",
        HEADRACE_SASL_USERNAME="bob",
        HEADRACE_SASL_PASSWORD=SECRET,
    )
    code, output = start_worker(tmp_path, env)
    assert code == 1, output
    assert "worker cannot start: cannot use Kafka at" in output, output
    assert "security protocol SASL_PLAINTEXT" in output and "--security-protocol" in output
    assert "Traceback" not in output
    assert_no_secret(output)


async def test_a_session_timeout_the_broker_refuses_is_named_and_nothing_is_left_open(
    tmp_path: Path, kafka_bootstrap_servers: str, topic_factory: TopicFactory
) -> None:
    proc, _, _ = await run_user_job(
        tmp_path,
        kafka_bootstrap_servers,
        topic_factory,
        policy="fail",
        log_format="text",
        extra_env={"HEADRACE_SESSION_TIMEOUT_MS": "5000", "HEADRACE_HEARTBEAT_INTERVAL_MS": "1000"},
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "the broker rejected the session timeout of 5000 ms" in output, output
    assert "--session-timeout-ms / HEADRACE_SESSION_TIMEOUT_MS" in output
    assert "Traceback" not in output and "Unclosed" not in output, output


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """A broker of its own with a SASL_PLAINTEXT/PLAIN listener (user bob)."""
    broker = LocalBroker(tmp_path_factory.mktemp("sasl-kafka"), sasl_users={"bob": "right-1"})
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.mark.parametrize("password", ["wrong-2", SECRET])
def test_a_wrong_sasl_password_is_named_as_such_and_never_shown(
    tmp_path: Path, sasl_broker: LocalBroker, password: str
) -> None:
    (tmp_path / "userjob.py").write_text(
        "from headrace import Job\njob = Job('x')\njob.source('in').sink('out')\n"
    )
    assert sasl_broker.sasl_bootstrap_servers is not None
    env = dict(
        os.environ,
        HEADRACE_BOOTSTRAP_SERVERS=sasl_broker.sasl_bootstrap_servers,
        HEADRACE_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        HEADRACE_SASL_MECHANISM="PLAIN",
        HEADRACE_SASL_USERNAME="bob",
        HEADRACE_SASL_PASSWORD=password,
    )
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    for log_format in ("text", "json"):
        code, output = start_worker(tmp_path, env, "--log-format", log_format)
        assert code == 1, output
        assert "SASL authentication failed for user 'bob' with mechanism PLAIN" in output, output
        assert "HEADRACE_SASL_PASSWORD" in output and "Traceback" not in output
        assert password not in output and repr(password)[1:-1] not in output
        if password == SECRET:
            assert_no_secret(output)
