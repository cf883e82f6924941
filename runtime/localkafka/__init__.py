"""A real Apache Kafka broker for development and tests, run from Maven jars (no Docker).

Development tooling, not part of the runtime: workers never import it. ``headrace kafka
start|stop|status|jars`` (:mod:`headrace.runtime.localkafka.cli`) drives it from a shell, the
pytest plugin falls back to it when no broker is configured, and the recovery tests stop, kill
and restart it while data flows.

* :mod:`~headrace.runtime.localkafka.errors`: what goes wrong, with messages that say how to
  fix it;
* :mod:`~headrace.runtime.localkafka.jars`: which Kafka version, its Maven project rendered from
  code, the jars fetched into a per-version cache (works from an installed wheel);
* :mod:`~headrace.runtime.localkafka.config`: ``server.properties`` and the logging
  configuration for the 3.x and 4.x lines;
* :mod:`~headrace.runtime.localkafka.process`: ports, the JVM, PIDs, readiness probes;
* :mod:`~headrace.runtime.localkafka.rundir`: a broker's run directory (layout, ``broker.json``:
  the ports, cluster id and version a restart keeps);
* :mod:`~headrace.runtime.localkafka.broker`: :class:`LocalBroker`, one single-node KRaft
  broker in a run directory: start, stop, kill, restart;
* :mod:`~headrace.runtime.localkafka.cli`: ``headrace kafka``.
"""

from __future__ import annotations

from headrace.runtime.localkafka.broker import LocalBroker
from headrace.runtime.localkafka.errors import (
    BrokerStartError,
    JarsUnavailableError,
    LocalBrokerError,
)
from headrace.runtime.localkafka.jars import DEFAULT_VERSION, ensure_jars, jars_home, kafka_version
from headrace.runtime.localkafka.rundir import default_run_dir

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
