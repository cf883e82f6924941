"""A real Apache Kafka broker for development and tests, run from Maven jars (no Docker).

Development tooling, not part of the runtime: workers never import it. ``headrace kafka
start|stop|status|jars`` (:mod:`headrace.runtime.localkafka.cli`) drives it from a shell, the
pytest plugin falls back to it when no broker is configured, and the recovery tests stop, kill
and restart it while data flows.

* :mod:`~headrace.runtime.localkafka.jars`: which Kafka version, its Maven project rendered from
  code, the jars fetched into a per-version cache (works from an installed wheel);
* :mod:`~headrace.runtime.localkafka.config`: ``server.properties`` and the logging
  configuration for the 3.x and 4.x lines;
* :mod:`~headrace.runtime.localkafka.broker`: :class:`LocalBroker`, one single-node KRaft
  broker in a run directory.
"""

from __future__ import annotations

from headrace.runtime.localkafka.broker import BrokerStartError, LocalBroker, default_run_dir
from headrace.runtime.localkafka.jars import (
    DEFAULT_VERSION,
    JarsUnavailableError,
    LocalBrokerError,
    ensure_jars,
    jars_home,
    kafka_version,
)

__all__ = [
    "DEFAULT_VERSION",
    "BrokerStartError",
    "JarsUnavailableError",
    "LocalBroker",
    "LocalBrokerError",
    "default_run_dir",
    "ensure_jars",
    "jars_home",
    "kafka_version",
]
