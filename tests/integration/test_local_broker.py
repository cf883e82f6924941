"""The local broker of the Kafka line under test logs to server.log and quotes it on failure.

The line is ``HEADRACE_KAFKA_VERSION`` (default 3.9.2): `make test` runs this against 3.9 and
.ci/run's second pass sets 4.1.1, so both logging set-ups (log4j 1 syntax for 3.x, log4j2 for
4.x) are shown to write ``logs/server.log``, to keep the whole controlled shutdown in it, and to
put a start-up failure's cause into the error a developer sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from headrace.runtime.localkafka import BrokerStartError, LocalBroker, LocalBrokerError
from headrace.runtime.localkafka.jars import ensure_jars, kafka_version
from headrace.runtime.localkafka.process import java
from headrace.runtime.pytest_plugin import in_ci

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    version = kafka_version()
    try:
        java()
        ensure_jars(version)
    except LocalBrokerError as exc:
        if in_ci():
            pytest.fail(f"local broker unavailable in CI: {exc}", pytrace=False)
        pytest.skip(f"local broker unavailable: {exc}")
    broker = LocalBroker(tmp_path / "kafka", version=version)
    try:
        yield broker
    finally:
        broker.stop()


def test_server_log_holds_start_and_shutdown_and_a_failed_start_quotes_it(
    broker: LocalBroker,
) -> None:
    broker.start()
    started = broker.log_file.read_text()
    assert f"Kafka version: {broker.version}" in started, started[-2000:]
    assert "Kafka Server started" in started

    assert broker.stop()
    # the whole controlled shutdown reaches the file (log4j2's own shutdown hook would cut it)
    stopped = broker.log_file.read_text()
    assert "[BrokerServer id=1] shut down completed" in stopped, stopped[-2000:]

    # a data dir formatted for another node id: Kafka exits during start-up, and says why
    meta = broker.data_dir / "meta.properties"
    meta.write_text(meta.read_text().replace("node.id=1", "node.id=7"))
    with pytest.raises(BrokerStartError) as failure:
        broker.start(timeout=90)
    message = str(failure.value)
    assert f"Last lines of {broker.log_file}" in message
    assert "Stored node id 7 doesn't match previous node id 1" in message, message
