"""A local broker's run directory: where its files live and what survives between processes.

Everything about one broker lives in its *run directory* (default: ``deploy/kafka/run`` in a
headrace checkout, else ``.headrace/kafka`` in the working directory; never inside an
installed package)::

    run_dir/
      broker.json        ports + cluster id + Kafka version: lets another process (the CLI,
                         a pytest session, .ci/run) wrap the same broker and restart it on the
                         same address
      server.properties  rendered on every start from broker.json
      log4j.properties   (Kafka 3.x) or log4j2.properties (4.x)
      broker.pid         only while the broker runs
      data/              Kafka log dirs (formatted once, kept across restarts)
      logs/server.log    the broker's own log (tailed into our error messages)
      logs/stdout.log    JVM stdout/stderr (JVM crashes, bad flags)

:class:`RunDir` owns that layout and ``broker.json``;
:class:`~headrace.runtime.localkafka.broker.LocalBroker` adds the process on top of it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

from headrace.runtime.localkafka.errors import BrokerStartError, LocalBrokerError
from headrace.runtime.localkafka.jars import VERSION_ENV, kafka_version
from headrace.runtime.localkafka.process import free_port, random_cluster_id

_STATE_FILE = "broker.json"
_PID_FILE = "broker.pid"
#: the checkout this module lives in, if it is one (deploy/kafka is where its broker runs);
#: in an installed wheel this path lies inside site-packages and does not exist
_CHECKOUT_KAFKA = Path(__file__).resolve().parents[2] / "deploy" / "kafka"


def default_run_dir() -> Path:
    """``deploy/kafka/run`` of a headrace checkout (git-ignored), else ``.headrace/kafka`` in
    the working directory: next to the project's other local state, never in site-packages."""
    if _CHECKOUT_KAFKA.is_dir():
        return _CHECKOUT_KAFKA / "run"
    return Path.cwd() / ".headrace" / "kafka"


@dataclasses.dataclass
class BrokerState:
    """What must survive between processes to restart the same broker on the same address."""

    host: str
    port: int
    controller_port: int
    cluster_id: str
    kafka_version: str
    #: a second client listener with SASL/PLAIN (None: none), see ``RunDir.sasl_users``
    sasl_port: int | None = None


class RunDir:
    """The files of one broker and its ``broker.json``: addresses known before it runs.

    Holds no process: any process can construct one for the same directory and read the
    ports, cluster id and Kafka version another process chose.
    """

    def __init__(
        self,
        run_dir: Path | str | None = None,
        *,
        port: int | None = None,
        controller_port: int | None = None,
        host: str = "127.0.0.1",
        version: str | None = None,
        sasl_users: Mapping[str, str] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir).expanduser().resolve() if run_dir else default_run_dir()
        self._version = version
        self._requested_port = port
        self._requested_controller_port = controller_port
        self.host = host
        #: user -> password of a SASL_PLAINTEXT (mechanism PLAIN) listener on a second port,
        #: for tests of authentication failures; the PLAINTEXT listener stays
        self.sasl_users = dict(sasl_users or {})
        self._state: BrokerState | None = self._load_state()

    # -- paths ---------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data"

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def log_file(self) -> Path:
        """The broker's server.log: the first place to look when something is off."""
        return self.logs_dir / "server.log"

    @property
    def stdout_file(self) -> Path:
        return self.logs_dir / "stdout.log"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / _PID_FILE

    @property
    def config_file(self) -> Path:
        return self.run_dir / "server.properties"

    @property
    def formatted(self) -> bool:
        """The data dir has been formatted (by ``kafka-storage format``) and holds a cluster."""
        return (self.data_dir / "meta.properties").is_file()

    # -- broker.json ---------------------------------------------------------------------

    def _load_state(self) -> BrokerState | None:
        path = self.run_dir / _STATE_FILE
        try:
            raw = json.loads(path.read_text())
            return BrokerState(**raw)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise LocalBrokerError(f"corrupt {path}: {exc}; delete the run dir") from exc

    def _save_state(self, state: BrokerState) -> None:
        path = self.run_dir / _STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(state), indent=2) + "\n")
        tmp.replace(path)
        self._state = state

    def _resolve_state(self) -> BrokerState:
        """Ports, cluster id and version for this start: keep the old ones unless told
        otherwise, so a restart is the same cluster on the same address."""
        old = self._state
        port = self._requested_port or (old.port if old else None) or free_port(self.host)
        cport = self._requested_controller_port or (old.controller_port if old else None)
        if cport is None or cport == port:
            cport = free_port(self.host)
            while cport == port:
                cport = free_port(self.host)
        formatted = self.formatted
        cluster_id = old.cluster_id if (old and formatted) else random_cluster_id()
        # a run dir keeps its Kafka version unless another one is asked for explicitly
        asked = self._version or os.environ.get(VERSION_ENV)
        if asked is None and old is not None and formatted:
            asked = old.kafka_version
        version = kafka_version(asked)
        if old and formatted and old.kafka_version != version:
            raise BrokerStartError(
                f"the run dir {self.run_dir} holds a Kafka {old.kafka_version} cluster; this "
                f"start asks for Kafka {version}: delete the run dir (its data goes) or start "
                "with another --run-dir"
            )
        sasl_port = None
        if self.sasl_users:
            sasl_port = (old.sasl_port if old else None) or free_port(self.host)
            while sasl_port in (port, cport):
                sasl_port = free_port(self.host)
        return BrokerState(self.host, port, cport, cluster_id, version, sasl_port)

    # -- what clients need -----------------------------------------------------------------

    @property
    def version(self) -> str:
        """The Kafka version asked for, else the one this run dir was formatted with, else the
        default."""
        if self._version is None and self._state is not None:
            return self._state.kafka_version
        return kafka_version(self._version)

    @property
    def port(self) -> int | None:
        return self._state.port if self._state else self._requested_port

    @property
    def controller_port(self) -> int | None:
        return self._state.controller_port if self._state else self._requested_controller_port

    @property
    def cluster_id(self) -> str | None:
        return self._state.cluster_id if self._state else None

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for clients; known once the broker has been started (or configured)."""
        if self.port is None:
            raise LocalBrokerError(f"broker in {self.run_dir} has never been started: no port")
        return f"{self.host}:{self.port}"

    @property
    def sasl_bootstrap_servers(self) -> str | None:
        """``host:port`` of the SASL_PLAINTEXT/PLAIN listener (None without ``sasl_users``)."""
        if self._state is None or self._state.sasl_port is None:
            return None
        return f"{self.host}:{self._state.sasl_port}"
