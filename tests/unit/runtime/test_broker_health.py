"""BrokerHealth: aiokafka's connection errors counted, summarised, and nothing else hidden."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from aiokafka.errors import KafkaConnectionError, KafkaError

from headrace.runtime.kafka.health import CONFIRM_S, QUIET_S, BrokerHealth


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def health(clock: Clock, caplog: pytest.LogCaptureFixture) -> Iterator[BrokerHealth]:
    caplog.set_level(logging.INFO)
    health = BrokerHealth("k:9092", clock=clock, interval_s=10)
    health.install()
    try:
        yield health
    finally:
        health.uninstall()


REFUSED = "Unable connect to node with id 1: [Errno 111] Connect call failed ('k', 9092)"
NOT_READY = "Failed fetch messages from 1: NodeNotReadyError: not ready"


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_an_outage_is_summarised_and_its_end_reported(
    health: BrokerHealth, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    aiokafka = logging.getLogger("aiokafka")
    fetcher = logging.getLogger("aiokafka.consumer.fetcher")
    coordinator = logging.getLogger("aiokafka.consumer.group_coordinator")
    assert health.connected() and health.describe() == ""
    for i in range(500):  # 25 s of aiokafka retrying 20 times a second
        clock.now += 0.05
        aiokafka.error(REFUSED)
        fetcher.error(NOT_READY)
        if i == 100:
            coordinator.warning("Marking the coordinator dead (node 1)for group g.")
        if i % 20 == 0:
            health.report()
    fetcher.error("Fetch offset out of range for partition x")  # a different error
    assert not health.connected()
    assert "broker unreachable since" in health.describe()
    lines = messages(caplog)
    assert not any(m.startswith(("Unable connect", "Failed fetch")) for m in lines)
    assert lines[0].startswith("cannot reach the broker (k:9092): Unable connect to node")
    assert any("Fetch offset out of range" in m for m in lines), "a new error is shown"
    assert not any(m.startswith("Marking the coordinator dead") for m in lines)
    summaries = [m for m in lines if m.startswith("broker still unreachable")]
    assert len(summaries) == 2 and "connection errors in the last 11s" in summaries[0]
    assert "(Unable connect to: 2" in summaries[0] and "NodeNotReadyError: 2" in summaries[0]
    assert "Marking the coordinator dead: 1" in summaries[0]
    clock.now += QUIET_S + 0.1
    assert health.connected()
    assert "broker reachable again" in caplog.records[-1].getMessage()
    assert "1001 connection errors in all" in caplog.records[-1].getMessage()
    assert len(caplog.records) <= 6


def test_uninstalled_it_hides_nothing(
    health: BrokerHealth, caplog: pytest.LogCaptureFixture
) -> None:
    health.uninstall()
    logging.getLogger("aiokafka").error(REFUSED)
    assert messages(caplog) == [REFUSED]


def test_every_aiokafka_logger_is_covered_even_one_not_listed(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    unlisted = logging.getLogger("aiokafka.some.module_of_a_later_release")
    caplog.set_level(logging.INFO)
    health = BrokerHealth("k:9092", clock=clock)
    health.install()
    try:
        for _ in range(50):
            clock.now += 0.1
            unlisted.error(REFUSED)
        assert not health.connected()
        assert sum(REFUSED in m for m in messages(caplog)) == 1
    finally:
        health.uninstall()


def test_follow_ups_of_an_outage_are_shown_when_there_is_none(
    health: BrokerHealth, caplog: pytest.LogCaptureFixture
) -> None:
    """A fresh broker still loading its group coordinators makes aiokafka mark the coordinator
    dead: not an outage, so the lines are shown and nothing turns unhealthy."""
    coordinator = logging.getLogger("aiokafka.consumer.group_coordinator")
    coordinator.error(
        "Group Coordinator Request failed: [Error 15] GroupCoordinatorNotAvailableError"
    )
    coordinator.warning("Marking the coordinator dead (node 1)for group g.")
    assert health.connected() and health.describe() == ""
    assert len(messages(caplog)) == 2 and health.down_since is None


def test_one_failed_connection_is_not_an_outage(
    health: BrokerHealth, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker closing an idle connection: one error, the client reconnects. It is logged
    (once), but the gauge, /health and /ready stay as they are."""
    logging.getLogger("aiokafka.consumer.fetcher").error(
        "Failed fetch messages from 1: KafkaConnectionError: Connection at k:9092 closed"
    )
    clock.now += CONFIRM_S / 2
    logging.getLogger("aiokafka").error(REFUSED)
    assert health.connected() and health.describe() == ""
    clock.now += QUIET_S
    health.report()
    assert health.down_since is None and health.connected()
    lines = messages(caplog)
    assert len(lines) == 2 and "KafkaConnectionError" in lines[0], lines
    assert "broker reachable again" in lines[1]


def test_connection_failures_that_go_on_make_it_unreachable(
    health: BrokerHealth, clock: Clock
) -> None:
    aiokafka = logging.getLogger("aiokafka")
    aiokafka.error(REFUSED)
    clock.now += CONFIRM_S
    aiokafka.error(REFUSED)
    assert not health.connected()
    clock.now += QUIET_S - 0.1
    assert not health.connected(), "still within the quiet period"
    clock.now += 0.2
    assert health.connected()


def test_debug_and_info_records_are_never_touched(
    health: BrokerHealth, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("aiokafka").debug(REFUSED)
    assert messages(caplog) == [REFUSED] and health.down_since is None


def test_a_sender_that_died_of_a_lost_connection_is_part_of_the_outage(
    health: BrokerHealth, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """aiokafka logs "Unexpected error in sender routine" with the connection error only in
    the traceback; during an outage it is counted, not shown. Another error stays visible."""
    sender = logging.getLogger("aiokafka.producer.sender")
    sender.warning(REFUSED)
    clock.now += CONFIRM_S + 0.1
    sender.warning(REFUSED)
    caplog.clear()
    try:
        raise KafkaError(repr(KafkaConnectionError("Connection at k:9092 closed")))
    except KafkaError:
        sender.exception("Unexpected error in sender routine")
    assert messages(caplog) == []
    try:
        raise ValueError("a bug")
    except ValueError:
        sender.exception("Unexpected error in sender routine")
    assert messages(caplog) == ["Unexpected error in sender routine"]
