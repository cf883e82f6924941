"""headrace as a user gets it: the wheel, installed into a fresh venv outside the checkout.

The user's project has its own ``operators.py`` and its own ``runtime/`` package (both names
headrace once occupied at the top level). In that project, with nothing but the installed wheel:
``headrace kafka start`` fetches the broker jars into an empty cache through the wheel's own
code and starts a broker; ``headrace run operators:job`` runs the user's stateful job on it and the
output holds exact counts; a user test file uses the pytest plugin's broker fixture (which, with
no broker configured, starts a local broker itself) and ``JobTester``; ``headrace kafka stop``
stops the broker. Slow (a wheel build and a pip install), so it is one test doing all of it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.kafka, pytest.mark.timeout(900)]

OPERATORS = textwrap.dedent(
    """
    import os

    from headrace import INT, STR, Context, Job, Operator, Record, ValueStateDescriptor
    from runtime.helpers import words  # the user's own "runtime" package


    class CountWords(Operator):
        seen = ValueStateDescriptor[int](type=int, default=0)

        def process(self, record: Record, ctx: Context) -> None:
            n = self.seen.value() + 1
            self.seen.update(n)
            ctx.emit(n)


    def build(name: str, source: str, sink: str) -> Job:
        job = Job(name)
        (
            job.source(source, value_serde=STR)
            .flat_map(words)
            .key_by(lambda w: w, key_serde=STR, value_serde=STR)
            .process(CountWords(), name="word-counts")
            .sink(sink, key_serde=STR, value_serde=INT)
        )
        return job


    job = build(
        os.environ.get("USER_JOB", "user-job"),
        os.environ.get("USER_SOURCE", "user-lines"),
        os.environ.get("USER_SINK", "user-counts"),
    )
    """
)

HELPERS = "def words(line: str) -> list[str]:\n    return line.lower().split()\n"

USER_TEST = textwrap.dedent(
    """
    import uuid

    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from headrace import JobTester
    from operators import build


    def test_counts_with_the_job_tester() -> None:
        job = build("t", "lines", "counts")
        with JobTester(job, partitions=2) as t:
            t.send("lines", "a b a")
            t.run()
            t.checkpoint()
            t.crash()
            t.send("lines", "a")
            t.run()
            t.checkpoint()
            assert t.latest("counts")["a"] == 3
            assert t.latest("counts")["b"] == 1


    async def test_the_plugins_broker_answers(kafka_bootstrap_servers: str) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap_servers)
        await admin.start()
        try:
            name = f"user-{uuid.uuid4().hex[:8]}"
            await admin.create_topics([NewTopic(name, 1, 1)])
            assert name in await admin.list_topics()
        finally:
            await admin.close()
    """
)

PRODUCE = textwrap.dedent(
    """
    import asyncio, os, sys
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    async def main() -> None:
        bootstrap = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        await admin.create_topics([NewTopic(os.environ["USER_SOURCE"], 2, 1),
                                   NewTopic(os.environ["USER_SINK"], 2, 1)])
        await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        for line in sys.stdin.read().splitlines():
            await producer.send_and_wait(os.environ["USER_SOURCE"], line.encode())
        await producer.stop()

    asyncio.run(main())
    """
)

READ = textwrap.dedent(
    """
    import asyncio, json, os
    from aiokafka import AIOKafkaConsumer

    async def main() -> None:
        consumer = AIOKafkaConsumer(os.environ["USER_SINK"],
            bootstrap_servers=os.environ["KAFKA_BOOTSTRAP_SERVERS"],
            auto_offset_reset="earliest", isolation_level="read_committed",
            enable_auto_commit=False)
        await consumer.start()
        latest = {}
        try:
            while batches := await consumer.getmany(timeout_ms=2000):
                for records in batches.values():
                    for r in records:  # headrace's INT serde: 8 bytes, big-endian
                        latest[r.key.decode()] = int.from_bytes(r.value, "big", signed=True)
        finally:
            await consumer.stop()
        print(json.dumps(latest))

    asyncio.run(main())
    """
)

LINES = ["the cat and the hat", "the end", "a cat"] * 20


def sh(
    cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    )
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(the venv's bin dir, an environment without the checkout or any Kafka settings)."""
    root = tmp_path_factory.mktemp("wheel")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HEADRACE_", "KAFKA_", "PYTHON", "VIRTUAL_ENV"))
    }
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(REPO))
    )
    dist = root / "dist"
    sh(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)],
        cwd=root,
        env=env,
    )
    wheel = next(dist.glob("headrace-*.whl"))
    venv = root / "venv"
    sh([sys.executable, "-m", "venv", str(venv)], cwd=root, env=env)
    sh(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            str(wheel),
            "pytest>=8",
            "pytest-asyncio>=0.23",
        ],
        cwd=root,
        env=env,
    )
    return venv / "bin", env


def test_the_wheel_outside_the_checkout_runs_a_users_project(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    bin_dir, env = installed
    py = str(bin_dir / "python")
    headrace = str(bin_dir / "headrace")
    project = tmp_path / "project"
    (project / "runtime").mkdir(parents=True)
    (project / "operators.py").write_text(OPERATORS)
    (project / "runtime" / "__init__.py").write_text("")
    (project / "runtime" / "helpers.py").write_text(HELPERS)
    (project / "test_user_job.py").write_text(USER_TEST)

    # nothing of the checkout is importable: headrace comes from site-packages
    where = sh(
        [py, "-c", "import headrace, headrace.runtime; print(headrace.runtime.__file__)"],
        cwd=project,
        env=env,
    ).stdout
    assert "site-packages" in where and str(REPO) not in where, where

    # an empty jars cache: the wheel's own code renders the Maven project and fetches the jars
    # (Maven's ~/.m2 makes that quick when it has run before)
    env = dict(env, HEADRACE_KAFKA_HOME=str(tmp_path / "jars"))
    run_dir = tmp_path / "kafka"
    started = sh([headrace, "kafka", "start", "--run-dir", str(run_dir)], cwd=project, env=env)
    jars = Path(sh([headrace, "kafka", "home"], cwd=project, env=env).stdout.strip())
    assert jars.parent == tmp_path / "jars", jars
    assert (jars / "pom.xml").is_file() and list((jars / "lib").glob("kafka_2.13-*.jar"))
    assert re.search(r"fetched Kafka [\d.]+ jars with Maven in", started.stderr), started.stderr
    try:
        exports = dict(
            line.removeprefix("export ").split("=", 1)
            for line in started.stdout.splitlines()
            if line.startswith("export ")
        )
        job_env = dict(
            env,
            **exports,
            USER_JOB="user-job",
            USER_SOURCE="user-lines",
            USER_SINK="user-counts",
            HEADRACE_CHECKPOINT_INTERVAL_MS="300",
        )
        (project / "produce.py").write_text(PRODUCE)
        (project / "read.py").write_text(READ)
        subprocess.run(
            [py, "produce.py"],
            cwd=project,
            env=job_env,
            input="\n".join(LINES),
            text=True,
            check=True,
            timeout=120,
        )

        expected: dict[str, int] = {}
        for line in LINES:
            for w in line.split():
                expected[w] = expected.get(w, 0) + 1
        log = (tmp_path / "worker.log").open("w")
        worker = subprocess.Popen(
            [headrace, "run", "operators:job"],
            cwd=project,
            env=job_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            latest: dict[str, int] = {}
            while time.monotonic() < deadline and latest != expected:
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()
                time.sleep(2)
                latest = json.loads(sh([py, "read.py"], cwd=project, env=job_env).stdout)
            assert latest == expected, (latest, (tmp_path / "worker.log").read_text())
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(60) == 0, (tmp_path / "worker.log").read_text()
            log.close()

        # the user's tests, with the plugin from the wheel: no broker configured, so its
        # fixture starts a local broker of its own (from the same jars cache)
        tests = subprocess.run(
            [
                str(bin_dir / "pytest"),
                "-q",
                "-p",
                "no:cacheprovider",
                "-o",
                "asyncio_mode=auto",
                "test_user_job.py",
            ],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert tests.returncode == 0, tests.stdout + tests.stderr
        assert "2 passed" in tests.stdout, tests.stdout
    finally:
        sh([headrace, "kafka", "stop", "--run-dir", str(run_dir)], cwd=project, env=env)
    status = subprocess.run(
        [headrace, "kafka", "status", "--run-dir", str(run_dir)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert status.returncode == 3 and status.stdout.startswith("stopped"), status.stdout
