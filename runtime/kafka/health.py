"""Is the broker reachable? One answer for health checks, metrics and the log.

While the broker is down, aiokafka retries every connection many times a second and logs each
failure at ERROR or WARNING: about 250 lines a second from a worker with two stages, 15,000 in
a minute, which buries everything else and costs log storage. The worker recovers by itself
when the broker returns (its retries are right); what it needs is a quiet, honest account.

:class:`BrokerHealth` is a logging filter on aiokafka's loggers. It sorts what they log at
WARNING and above into three kinds:

* **connection failures** (connection refused, node not ready, metadata update failed, ...):
  the evidence of an outage. The first one opens an outage and is logged as one WARNING that
  quotes it; the later ones are counted and suppressed.
* **follow-ups** (a coordinator marked dead, a group coordinator not available, a produce
  retried on a moved leader, a timed-out request): an outage causes them, but they also happen
  now and then in a healthy cluster (a fresh broker loading its coordinators, a leader
  moving). They are counted and suppressed while an outage is open, shown as they are
  otherwise, and never open one: a worker starting against a fresh broker is not "down".
* **everything else**, a different kind of error: always shown unchanged.

While the outage lasts the worker logs one WARNING per interval (:data:`REPORT_INTERVAL_S`)
with the count of suppressed records since the last one, by kind, and the last message
(:meth:`BrokerHealth.report`, called about once a second), and one INFO line once the errors
have stopped.

The same observations answer :meth:`connected`. The broker counts as unreachable once
connection failures have gone on for :data:`CONFIRM_S` (a single failure, such as a broker
closing an idle connection that the client then reopens, is not an outage), until
:data:`QUIET_S` seconds pass without one (aiokafka retries many times a second while it cannot
connect, so a quiet spell that long means the connections are back). Log records are the one
place every aiokafka client of the worker reports its connection state, so no probe request and
no private aiokafka field is needed. The worker exposes the answer as the
``headrace_broker_connected`` gauge, in the ``/health`` body and as ``/ready`` = 503.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from aiokafka.errors import (
    CoordinatorNotAvailableError,
    KafkaConnectionError,
    KafkaTimeoutError,
    LeaderNotAvailableError,
    NodeNotReadyError,
    NotCoordinatorForGroupError,
    NotLeaderForPartitionError,
    RequestTimedOutError,
)

#: aiokafka's loggers that are known to log; :meth:`BrokerHealth.install` adds every other
#: ``aiokafka.*`` logger that exists by then (a logger's filter sees only its own records)
AIOKAFKA_LOGGERS = (
    "aiokafka",
    "aiokafka.admin.client",
    "aiokafka.cluster",
    "aiokafka.conn",
    "aiokafka.consumer.consumer",
    "aiokafka.consumer.fetcher",
    "aiokafka.consumer.group_coordinator",
    "aiokafka.consumer.subscription_state",
    "aiokafka.producer.producer",
    "aiokafka.producer.sender",
)
#: what aiokafka says, in one form or another, when it cannot reach a broker
CONNECTION_FAILURES = (
    "Unable connect to",
    "Connect call failed",
    "KafkaConnectionError",
    "NodeNotReadyError",
    "Unable to bootstrap",
    "Unable to request metadata",
    "Unable to update metadata",
)
#: what follows from an outage but also happens in a healthy cluster (see the module doc)
FOLLOW_UPS = (
    "Marking the coordinator dead",
    "GroupCoordinatorNotAvailableError",
    "NotCoordinatorForGroupError",
    "CoordinatorNotAvailableError",
    "RequestTimedOutError",
    "KafkaTimeoutError",
    "NotLeaderForPartitionError",
    "LeaderNotAvailableError",
    "Got error produce response",
)
#: what a write or a read raises after the broker was away: its connection failed, the request
#: timed out, or a batch waited longer than the producer's request timeout (40 s) and expired
#: because its partition had no leader yet when the broker came back. Nothing of the checkpoint
#: it was part of is committed; the stage drops its tasks and rejoins (stage_runner.py), and
#: the tasks are restored from the last committed checkpoint once the broker answers.
BROKER_AWAY: tuple[type[BaseException], ...] = (
    KafkaConnectionError,
    NodeNotReadyError,
    KafkaTimeoutError,
    RequestTimedOutError,
    LeaderNotAvailableError,
    NotLeaderForPartitionError,
    NotCoordinatorForGroupError,
    CoordinatorNotAvailableError,
)
#: seconds connection failures must go on before the broker counts as unreachable
CONFIRM_S = 1.0
#: seconds without a connection failure after which the broker counts as reachable again
QUIET_S = 5.0
#: seconds between two summaries while the broker is unreachable
REPORT_INTERVAL_S = 10.0

log = logging.getLogger("headrace.runtime.broker")


def _kind(message: str, markers: tuple[str, ...]) -> str | None:
    return next((m for m in markers if m in message), None)


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
        #: when the first connection failure of the current outage came (None: none open)
        self.down_since: float | None = None
        self.down_since_wall: float | None = None
        self.last_error_at: float | None = None
        self.last_error = ""
        #: suppressed records since the last summary, by kind (the marker they matched)
        self.suppressed: Counter[str] = Counter()
        self.suppressed_total = 0  #: in the current outage
        self._last_report: float | None = None
        self._installed: list[logging.Logger] = []

    # -- logging.Filter ------------------------------------------------------------------------
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            # aiokafka's sender dies of a lost connection as "Unexpected error in sender
            # routine" with the connection error only in its traceback (CI, broker outage)
            exc = record.exc_info[1]
            message = f"{message}: {type(exc).__name__}: {exc}"
        kind = _kind(message, CONNECTION_FAILURES)
        if kind is None:
            kind = _kind(message, FOLLOW_UPS)
            if kind is None or self.down_since is None:
                return True  # a different error, or a follow-up outside an outage: shown
        else:
            now = self.clock()
            if self.down_since is None:
                self.down_since = now
                self.down_since_wall = time.time()
                self._last_report = now
                log.warning(
                    "cannot reach the broker (%s): %s; retrying, further connection errors "
                    "are summarised every %.0fs",
                    self.bootstrap_servers,
                    message,
                    self.interval_s,
                )
            self.last_error_at = now
            self.last_error = message
        self.suppressed[kind] += 1
        self.suppressed_total += 1
        return False

    def install(self) -> None:
        manager = logging.Logger.manager
        names = set(AIOKAFKA_LOGGERS) | {
            name for name in manager.loggerDict if name.startswith("aiokafka.")
        }
        for name in sorted(names):
            logger = logging.getLogger(name)
            logger.addFilter(self)
            self._installed.append(logger)

    def uninstall(self) -> None:
        for logger in self._installed:
            logger.removeFilter(self)
        self._installed.clear()

    # -- state ---------------------------------------------------------------------------------
    def connected(self) -> bool:
        """False while connection failures have gone on for CONFIRM_S and not stopped since."""
        self._settle()
        if self.down_since is None or self.last_error_at is None:
            return True
        return self.last_error_at - self.down_since < CONFIRM_S

    def report(self) -> None:
        """Log the outage summary when one is due, or the recovery once errors stopped."""
        if self._settle() or self.down_since is None:
            return
        now = self.clock()
        if self._last_report is None or now - self._last_report >= self.interval_s:
            kinds = ", ".join(f"{kind}: {n}" for kind, n in self.suppressed.most_common())
            log.warning(
                "broker still unreachable (%s) after %.0fs: %d connection errors in the last "
                "%.0fs (%s); last: %s",
                self.bootstrap_servers,
                now - self.down_since,
                sum(self.suppressed.values()),
                now - (self._last_report or now),
                kinds or "none",
                self.last_error,
            )
            self.suppressed.clear()
            self._last_report = now

    def describe(self) -> str:
        """For /health and /ready: empty while reachable."""
        if self.connected() or self.down_since_wall is None:
            return ""
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.down_since_wall))
        return f"broker unreachable since {since} ({self.bootstrap_servers}): {self.last_error}"

    def _settle(self) -> bool:
        """Close the outage once no failure came for QUIET_S; True when it just closed."""
        if self.down_since is None or self.last_error_at is None:
            return False
        now = self.clock()
        if now - self.last_error_at < QUIET_S:
            return False
        log.info(
            "broker reachable again (%s) after %.0fs; %d connection errors in all",
            self.bootstrap_servers,
            self.last_error_at - self.down_since,
            self.suppressed_total,
        )
        self.down_since = self.down_since_wall = self._last_report = None
        self.suppressed.clear()
        self.suppressed_total = 0
        return True
