"""pytest plugin: a real Kafka broker for tests, found or started once per session.

Registered as a ``pytest11`` entry point, so anyone who installs headrace gets these
fixtures for testing their own jobs; headrace's suite also loads it from tests/conftest.py.

Where the broker comes from (first match wins):

1. ``KAFKA_BOOTSTRAP_SERVERS`` is set: use it. If ``HEADRACE_LOCAL_BROKER_DIR`` is set too
   (``.ci/run`` and ``headrace kafka start`` export both) the broker in that run dir is
   wrapped as a :class:`LocalBroker`, so restart/crash tests can control it.
2. testcontainers is installed (headrace's ``test`` extra, not a dependency of the wheel) and
   a Docker daemon answers a ping: testcontainers' Kafka (KRaft) container.
3. Otherwise: a :class:`LocalBroker` from the Maven jars in a temporary run dir, stopped and
   removed at session end. An installed wheel fetches them itself (``headrace kafka``).

``HEADRACE_KAFKA=local|docker`` forces 2 or 3 (e.g. ``local`` to run restart tests on a
machine that has Docker). When no broker can be had, tests skip with the reason, except
when ``CI=true``: then they fail, because a CI run that silently skips every Kafka test
would look green while testing nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import importlib.util
import os
import shutil
import socket
import tempfile
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, NoReturn, Protocol

import pytest

from headrace.runtime.localkafka import LocalBroker, LocalBrokerError

BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"
BROKER_DIR_ENV = "HEADRACE_LOCAL_BROKER_DIR"
BACKEND_ENV = "HEADRACE_KAFKA"
IMAGE_ENV = "HEADRACE_KAFKA_IMAGE"
#: Confluent Platform 7.9 ships Apache Kafka 3.9, the local broker's default version.
DEFAULT_IMAGE = "confluentinc/cp-kafka:7.9.0"

BrokerKind = Literal["env", "docker", "local"]

__all__ = [
    "KafkaEndpoint",
    "TopicFactory",
    "in_ci",
    "new_topic",
]


def in_ci() -> bool:
    """CI sets ``CI=true``; there a missing broker is an error, never a skip."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _unavailable(reason: str) -> NoReturn:
    if in_ci():
        pytest.fail(f"Kafka broker required in CI but unavailable: {reason}", pytrace=False)
    pytest.skip(f"no Kafka broker: {reason}")


@dataclasses.dataclass(frozen=True)
class KafkaEndpoint:
    """The session's broker: where it is and, if we can control it, the LocalBroker."""

    bootstrap_servers: str
    kind: BrokerKind
    local: LocalBroker | None = None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kafka: needs a real Kafka broker")


# --------------------------------------------------------------------------------------
# Finding / starting the broker
# --------------------------------------------------------------------------------------


def _docker_available() -> bool:
    """Really ask the daemon (``GET /_ping``): the docker CLI or a socket file prove nothing.

    Plain unix/tcp endpoints are pinged with a raw socket because the docker SDK leaks a
    socket when the daemon is absent, and this suite turns ResourceWarnings into errors.
    Anything else (ssh://, TLS) goes through the SDK with that warning silenced.
    """
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith(("unix://", "tcp://")) and not os.environ.get("DOCKER_TLS_VERIFY"):
        return _raw_docker_ping(host)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            import docker  # type: ignore[import-untyped]

            client = docker.from_env(timeout=3)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:
            return False
        finally:
            gc.collect()  # finalise any leaked socket while the warning is silenced


def _raw_docker_ping(host: str) -> bool:
    try:
        if host.startswith("unix://"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: str | tuple[str, int] = host.removeprefix("unix://")
        else:
            hostname, _, port = host.removeprefix("tcp://").rstrip("/").rpartition(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (hostname or "localhost", int(port or 2375))
    except (OSError, ValueError):
        return False
    with sock:
        sock.settimeout(3)
        try:
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
        except OSError:
            return False
    return reply.startswith(b"HTTP/") and b" 200 " in reply.split(b"\r\n", 1)[0]


def _wrap_external_local(bootstrap: str) -> LocalBroker | None:
    """The LocalBroker behind ``bootstrap`` when HEADRACE_LOCAL_BROKER_DIR points at it."""
    run_dir = os.environ.get(BROKER_DIR_ENV)
    if not run_dir:
        return None
    try:
        broker = LocalBroker(Path(run_dir))
    except LocalBrokerError:
        return None
    if broker.port is None or broker.bootstrap_servers not in bootstrap.split(","):
        return None  # the env points at some other broker: don't touch that one
    return broker


def _start_docker() -> tuple[KafkaEndpoint, Callable[[], None]]:
    from testcontainers.community.kafka import KafkaContainer

    container = (
        KafkaContainer(os.environ.get(IMAGE_ENV, DEFAULT_IMAGE))
        .with_kraft()
        # The image only sets the offsets topic to one replica; transactions need this too.
        .with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
    )
    container.start(timeout=180)
    endpoint = KafkaEndpoint(str(container.get_bootstrap_server()), "docker")
    return endpoint, container.stop


def _start_local() -> tuple[KafkaEndpoint, Callable[[], None]]:
    run_dir = Path(tempfile.mkdtemp(prefix="headrace-kafka-"))
    broker = LocalBroker(run_dir)
    try:
        broker.start()
    except BaseException:
        with contextlib.suppress(Exception):
            broker.stop()
        raise

    def teardown() -> None:
        broker.stop()
        shutil.rmtree(run_dir, ignore_errors=True)

    return KafkaEndpoint(broker.bootstrap_servers, "local", broker), teardown


@pytest.fixture(scope="session")
def kafka_endpoint() -> Iterator[KafkaEndpoint]:
    """Resolve the session's broker once (see module docstring for the order)."""
    bootstrap = os.environ.get(BOOTSTRAP_ENV, "").strip()
    if bootstrap:
        yield KafkaEndpoint(bootstrap, "env", _wrap_external_local(bootstrap))
        return

    backend = os.environ.get(BACKEND_ENV, "").strip().lower()
    if backend not in {"", "local", "docker"}:
        pytest.fail(f"{BACKEND_ENV}={backend!r}: expected 'local' or 'docker'", pytrace=False)
    # without testcontainers a Docker daemon is no use: a user who installed only headrace
    # gets the local broker, not an ImportError
    use_docker = backend == "docker" or (
        backend == ""
        and importlib.util.find_spec("testcontainers") is not None
        and _docker_available()
    )

    try:
        endpoint, teardown = _start_docker() if use_docker else _start_local()
    except Exception as exc:
        how = "testcontainers Kafka" if use_docker else "local broker (headrace kafka start)"
        _unavailable(f"starting {how} failed: {type(exc).__name__}: {exc}")
    try:
        yield endpoint
    finally:
        teardown()


@pytest.fixture(scope="session")
def kafka_bootstrap_servers(kafka_endpoint: KafkaEndpoint) -> str:
    """``host:port[,...]`` of a real broker, for any Kafka client."""
    return kafka_endpoint.bootstrap_servers


@pytest.fixture
def local_broker(kafka_endpoint: KafkaEndpoint) -> Iterator[LocalBroker]:
    """The broker as a LocalBroker a test may ``stop()``/``kill()``/``start()``.

    Skips when the broker is not ours to control (env without HEADRACE_LOCAL_BROKER_DIR, or
    Docker); fails instead in CI, where .ci/run always provides a controllable one. After
    the test the broker is started again if the test left it down, so one failing restart
    test does not take every later test with it.
    """
    broker = kafka_endpoint.local
    if broker is None:
        where = {
            "env": f"an external broker from ${BOOTSTRAP_ENV}",
            "docker": "a testcontainers Kafka container",
            "local": "a local broker",
        }[kafka_endpoint.kind]
        reason = (
            f"test needs to stop/restart the broker, but the session uses {where} "
            f"({kafka_endpoint.bootstrap_servers}); to run it, unset {BOOTSTRAP_ENV}, or also "
            f"set {BROKER_DIR_ENV} to its run dir, or set {BACKEND_ENV}=local"
        )
        if in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    yield broker
    if not broker.is_running():
        broker.start()


# --------------------------------------------------------------------------------------
# Admin client and topics
# --------------------------------------------------------------------------------------


async def new_topic(
    admin: Any,
    prefix: str = "t",
    *,
    partitions: int = 1,
    replication_factor: int = 1,
    config: Mapping[str, str] | None = None,
    wait_s: float = 30.0,
) -> str:
    """Create a uniquely named topic and wait until every partition has a leader.

    Unique names (uuid suffix) let tests share one broker without seeing each other's data.
    Waiting for leaders avoids the first produce racing metadata propagation.
    """
    from aiokafka.admin import NewTopic
    from aiokafka.errors import for_code

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    resp = await admin.create_topics(
        [
            NewTopic(
                name,
                num_partitions=partitions,
                replication_factor=replication_factor,
                topic_configs=dict(config or {}),
            )
        ]
    )
    for topic, code, *rest in resp.topic_errors:
        if code:
            msg = rest[0] if rest else ""
            raise for_code(code)(f"creating topic {topic!r}: {msg}")

    deadline = time.monotonic() + wait_s
    while True:
        described = await admin.describe_topics([name])
        parts = described[0].get("partitions", []) if described else []
        if (
            described
            and not described[0].get("error_code")
            and len(parts) == partitions
            and all(p.get("leader", -1) >= 0 for p in parts)
        ):
            return name
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {name} has no leader for all partitions: {described}")
        await asyncio.sleep(0.1)


class TopicFactory(Protocol):
    """``await topic_factory("orders", partitions=3)`` -> unique topic name."""

    def __call__(
        self,
        prefix: str = "t",
        *,
        partitions: int = 1,
        replication_factor: int = 1,
        config: Mapping[str, str] | None = None,
    ) -> Awaitable[str]: ...


try:
    import pytest_asyncio
except ImportError:  # users without pytest-asyncio still get the sync fixtures
    pytest_asyncio = None  # type: ignore[assignment]

if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def kafka_admin(kafka_bootstrap_servers: str) -> AsyncIterator[Any]:
        """A started ``aiokafka.admin.AIOKafkaAdminClient``, closed after the test."""
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(
            bootstrap_servers=kafka_bootstrap_servers, client_id="headrace-test-admin"
        )
        await admin.start()
        try:
            yield admin
        finally:
            await admin.close()

    @pytest_asyncio.fixture
    async def topic_factory(kafka_admin: Any) -> AsyncIterator[TopicFactory]:
        """Create unique topics for one test; they are deleted afterwards (best effort)."""
        created: list[str] = []

        async def create(
            prefix: str = "t",
            *,
            partitions: int = 1,
            replication_factor: int = 1,
            config: Mapping[str, str] | None = None,
        ) -> str:
            name = await new_topic(
                kafka_admin,
                prefix,
                partitions=partitions,
                replication_factor=replication_factor,
                config=config,
            )
            created.append(name)
            return name

        yield create
        if created:
            # Best effort: the broker may have been stopped by the test itself.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(kafka_admin.delete_topics(created), 10)


# --------------------------------------------------------------------------------------
# Recovery testing: fault driver and replay verifier (headrace.runtime.recovery)
# --------------------------------------------------------------------------------------


@pytest.fixture
def fault_driver(kafka_endpoint: KafkaEndpoint, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``fault_driver("pkg.mod:job", env={...}, seed=1)`` -> a started-nothing FaultDriver.

    It runs ``headrace run`` worker processes against the session broker and injects faults
    (kill -9, checkpoint-phase crashes, rebalance storms, broker restarts when the broker is a
    LocalBroker). Every process it started is killed and reaped after the test.
    """
    from headrace.runtime.recovery.driver import FaultDriver

    drivers: list[FaultDriver] = []

    def make(job_spec: str, **kwargs: Any) -> FaultDriver:
        kwargs.setdefault("broker", kafka_endpoint.local)
        kwargs.setdefault("workdir", tmp_path / f"driver-{len(drivers)}")
        driver = FaultDriver(job_spec, bootstrap_servers=kafka_endpoint.bootstrap_servers, **kwargs)
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        driver.close()


@pytest.fixture
def recovery_verifier(kafka_bootstrap_servers: str) -> Callable[..., Any]:
    """``recovery_verifier(replay, key_serde=..., value_serde=...)`` -> a Verifier."""
    from headrace.runtime.recovery.verify import Verifier

    def make(replay: Callable[..., Any], **kwargs: Any) -> Verifier:
        return Verifier(kafka_bootstrap_servers, replay, **kwargs)

    return make


@pytest.fixture
def wordcount_verifier(kafka_bootstrap_servers: str) -> Any:
    """The Verifier for word-count-shaped jobs (STR lines in, per-word INT counts out)."""
    from headrace.runtime.recovery.verify import wordcount_verifier as make

    return make(kafka_bootstrap_servers)
