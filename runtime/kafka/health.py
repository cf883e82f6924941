"""Is the broker reachable? One answer for health checks, metrics and the log.

While the broker is down, aiokafka retries every connection many times a second and logs each
failure at ERROR or WARNING: about 250 lines a second from a worker with two stages, 15,000 in
a minute, which buries everything else and costs log storage. The worker recovers by itself
when the broker returns (its retries are right); what it needs is a quiet, honest account.

:class:`BrokerHealth` is a logging filter on aiokafka's loggers. It recognises the records
that only say "the broker cannot be reached" (connection refused, node not ready, metadata
update failed, coordinator dead), counts and suppresses them, and instead the worker logs one
WARNING per interval with the count and the last message (:meth:`BrokerHealth.report`, called
about once a second) and an INFO line once the errors have stopped. Any other record, a new
kind of error, passes through unchanged.

The same observations answer :meth:`connected`: the broker counts as unreachable from the
first connection error until :data:`QUIET_S` seconds pass without one (aiokafka retries far
more often than that while it cannot connect). The worker exposes it as the
``headrace_broker_connected`` gauge, in the ``/health`` body and as ``/ready`` = 503.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

#: the loggers of aiokafka (its package logger and every module that logs)
AIOKAFKA_LOGGERS = (
    "aiokafka",
    "aiokafka.admin.client",
    "aiokafka.cluster",
    "aiokafka.conn",
    "aiokafka.consumer.consumer",
    "aiokafka.consumer.fetcher",
    "aiokafka.consumer.group_coordinator",
    "aiokafka.producer.producer",
    "aiokafka.producer.sender",
)
#: what aiokafka says, in one form or another, when it cannot reach the broker
_UNREACHABLE = (
    "Unable connect to",
    "Unable to update metadata",
    "Connect call failed",
    "NodeNotReadyError",
    "KafkaConnectionError",
    "Unable to request metadata",
    "Marking the coordinator dead",
    "coordinator (node",
    "RequestTimedOutError",
    "Unable to bootstrap",
)
#: seconds without a connection error after which the broker counts as reachable again
QUIET_S = 5.0
#: seconds between two summaries while the broker is unreachable
REPORT_INTERVAL_S = 10.0

log = logging.getLogger("headrace.runtime.broker")


class BrokerHealth(logging.Filter):
    """Counts and suppresses aiokafka's "cannot reach the broker" records (see module doc)."""

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        interval_s: float = REPORT_INTERVAL_S,
    ) -> None:
        super().__init__()
        self.bootstrap_servers = bootstrap_servers
        self.clock = clock
        self.interval_s = interval_s
        #: when the current outage began (None: reachable)
        self.down_since: float | None = None
        self.down_since_wall: float | None = None
        self.last_error_at: float | None = None
        self.last_error = ""
        self.suppressed = 0  #: since the last summary
        self.suppressed_total = 0  #: in the current outage
        self._last_report: float | None = None
        self._installed: list[logging.Logger] = []

    # -- logging.Filter ------------------------------------------------------------------------
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        message = record.getMessage()
        if not any(marker in message for marker in _UNREACHABLE):
            return True  # a different error: never hidden
        now = self.clock()
        if self.down_since is None:
            self.down_since = now
            self.down_since_wall = time.time()
            self._last_report = now
            log.warning(
                "broker unreachable (%s): %s; retrying, further connection errors are "
                "summarised every %.0fs",
                self.bootstrap_servers,
                message,
                self.interval_s,
            )
        self.last_error_at = now
        self.last_error = message
        self.suppressed += 1
        self.suppressed_total += 1
        return False

    def install(self) -> None:
        for name in AIOKAFKA_LOGGERS:
            logger = logging.getLogger(name)
            logger.addFilter(self)
            self._installed.append(logger)

    def uninstall(self) -> None:
        for logger in self._installed:
            logger.removeFilter(self)
        self._installed.clear()

    # -- state ---------------------------------------------------------------------------------
    def connected(self) -> bool:
        self._settle()
        return self.down_since is None

    def report(self) -> None:
        """Log the outage summary when one is due, or the recovery once errors stopped."""
        if self._settle() or self.down_since is None:
            return
        now = self.clock()
        if self._last_report is None or now - self._last_report >= self.interval_s:
            log.warning(
                "broker still unreachable (%s) after %.0fs: %d connection errors in the last "
                "%.0fs; last: %s",
                self.bootstrap_servers,
                now - self.down_since,
                self.suppressed,
                now - (self._last_report or now),
                self.last_error,
            )
            self.suppressed = 0
            self._last_report = now

    def describe(self) -> str:
        """For /health and /ready: empty while reachable."""
        if self.connected() or self.down_since_wall is None:
            return ""
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.down_since_wall))
        return f"broker unreachable since {since} ({self.bootstrap_servers}): {self.last_error}"

    def _settle(self) -> bool:
        """Close the outage once no error came for QUIET_S; True when it just closed."""
        if self.down_since is None or self.last_error_at is None:
            return False
        now = self.clock()
        if now - self.last_error_at < QUIET_S:
            return False
        log.info(
            "broker reachable again (%s) after %.0fs; %d connection errors were summarised",
            self.bootstrap_servers,
            self.last_error_at - self.down_since,
            self.suppressed_total,
        )
        self.down_since = self.down_since_wall = self._last_report = None
        self.suppressed = self.suppressed_total = 0
        return True
