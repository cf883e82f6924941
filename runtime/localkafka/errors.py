"""What goes wrong with the local broker, as exceptions the CLI and the test plugin show whole.

Every message names what is missing or broken and how to fix it (install Maven or a JDK,
delete a run dir, free a port), and quotes the log that says why (``maven.log``,
``server.log``), because the person reading it did not ask for a JVM and does not know where
its files are.
"""

from __future__ import annotations


class LocalBrokerError(RuntimeError):
    """Anything that stops the local broker from being fetched, started or stopped."""


class JarsUnavailableError(LocalBrokerError):
    """The broker jars are missing and could not be fetched (no Maven, no JDK, no network...)."""


class BrokerStartError(LocalBrokerError):
    """The broker process did not come up; the message includes the tail of its log."""
