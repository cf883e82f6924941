import asyncio
import contextlib
import gc
import os
from collections.abc import Iterator
from pathlib import Path

# Imported here, at collection, and not left to hypothesis's pytest plugin, which imports it in
# its terminal summary when no test module did: pytest then rewrites (parses) hypothesis there,
# and CPython 3.11 before 3.11.8 can fail that parse with "SystemError: AST constructor
# recursion depth mismatch" (python/cpython#106905), turning a green run of one test file red.
import hypothesis  # noqa: F401
import pytest

from headrace.runtime.pytest_plugin import KafkaEndpoint

pytest_plugins = ["headrace.runtime.pytest_plugin"]


# Every test that runs a job leaves its internal topics (changelogs, repartition, identity, cuts)
# on the session's broker, and the suite runs about 400 such tests: by the end the broker holds
# thousands of partitions, so every restart a recovery test makes waits for the broker to load
# them all (43 s in one CI run, longer than the producers' request timeout), and every full
# metadata request carries them. The test's own topics are deleted by ``topic_factory``; what a
# test's workers created is deleted here. Only on a broker the session controls (the local
# broker), where the topics a test created are the partition directories that appeared in its
# data dir while it ran, and only while no other test session uses the same broker (a second
# `pytest` in another terminal): its topics would appear in that window too.


def _topics_on_disk(data_dir: Path) -> set[str]:
    topics = set()
    with contextlib.suppress(OSError):
        for entry in os.scandir(data_dir):
            name = entry.name
            # "<topic>-<partition>"; a deleted partition is renamed "...-delete" (or "-stray")
            if (
                entry.is_dir()
                and not name.startswith("__")
                and not name.endswith(("-delete", "-stray"))
            ):
                topic, _, partition = name.rpartition("-")
                if topic and partition.isdigit():
                    topics.add(topic)
    return topics


_registered: set[Path] = set()


def _register(data_dir: Path) -> Path:
    """This session, in the broker's run dir (removed at the end of the session)."""
    sessions = data_dir.parent / "test-sessions"
    sessions.mkdir(exist_ok=True)
    mine = sessions / str(os.getpid())
    if mine not in _registered:
        mine.touch()
        _registered.add(mine)
    return sessions


def _alone(sessions: Path) -> bool:
    """No other live test session registered on this broker."""
    for entry in sessions.iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                os.kill(int(entry.name), 0)
            except ProcessLookupError:
                entry.unlink(missing_ok=True)  # a session that ended without unregistering
            except PermissionError:
                return False  # alive, another user's
            else:
                return False
    return True


def pytest_sessionfinish(session: pytest.Session) -> None:
    for path in _registered:
        path.unlink(missing_ok=True)


async def _delete_topics(bootstrap_servers: str, topics: list[str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers,
        client_id="headrace-test-cleanup",
        request_timeout_ms=30_000,
    )
    await admin.start()
    try:
        await admin.delete_topics(topics, timeout_ms=10_000)
    finally:
        await admin.close()


@pytest.fixture(autouse=True)
def _delete_topics_the_test_created(request: pytest.FixtureRequest) -> Iterator[None]:
    if "kafka_endpoint" not in request.fixturenames:
        yield
        return
    endpoint: KafkaEndpoint = request.getfixturevalue("kafka_endpoint")
    broker = endpoint.local
    if broker is None:
        yield
        return
    sessions = _register(broker.data_dir)
    before = _topics_on_disk(broker.data_dir)
    yield
    created = sorted(_topics_on_disk(broker.data_dir) - before)
    if not created or not _alone(sessions) or not broker.is_running():
        return
    # Best effort: a failed clean-up costs later tests time, not correctness. No wait_for:
    # cancelling the admin client mid-request left its connections to be collected after the
    # loop closed, as "unraisable" warnings in the next test (CI, after the 256-partition test).
    loop = asyncio.new_event_loop()
    try:
        with contextlib.suppress(Exception):
            loop.run_until_complete(_delete_topics(endpoint.bootstrap_servers, created))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
        gc.collect()  # whatever the clean-up left is collected here, not in the next test
