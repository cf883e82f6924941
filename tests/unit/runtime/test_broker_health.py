"""BrokerHealth: aiokafka's connection errors counted, summarised, and nothing else hidden."""

from __future__ import annotations

import logging

import pytest

from headrace.runtime.kafka.health import QUIET_S, BrokerHealth


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_outage_is_summarised_and_its_end_reported(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    health = BrokerHealth("k:9092", clock=clock, interval_s=10)
    health.install()
    aiokafka = logging.getLogger("aiokafka")
    fetcher = logging.getLogger("aiokafka.consumer.fetcher")
    caplog.set_level(logging.INFO)
    try:
        assert health.connected() and health.describe() == ""
        for i in range(500):  # 25 s of aiokafka retrying 20 times a second
            clock.now += 0.05
            aiokafka.error("Unable connect to node with id 1: Connect call failed ('k', 9092)")
            fetcher.error("Failed fetch messages from 1: NodeNotReadyError: not ready")
            if i % 20 == 0:
                health.report()
        fetcher.error("Fetch offset out of range for partition x")  # a different error
        assert not health.connected()
        assert "broker unreachable since" in health.describe()
        lines = [r.getMessage() for r in caplog.records]
        assert sum("Unable connect" in m for m in lines) == 1  # only inside the first warning
        assert any("Fetch offset out of range" in m for m in lines), "a new error is shown"
        summaries = [m for m in lines if m.startswith("broker still unreachable")]
        assert len(summaries) == 2 and "connection errors in the last 11s" in summaries[0]
        clock.now += QUIET_S + 0.1
        assert health.connected()
        assert "broker reachable again" in caplog.records[-1].getMessage()
        assert len(caplog.records) <= 6
    finally:
        health.uninstall()
    aiokafka.error("Unable connect to node with id 1")  # uninstalled: passes again
    assert caplog.records[-1].getMessage() == "Unable connect to node with id 1"
