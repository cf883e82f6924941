"""A real single-node Apache Kafka broker (KRaft, broker+controller) run from Maven jars.

Why this exists: headrace's exactly-once and recovery guarantees are only worth something if
they are tested against a real broker (transactions, group coordinator, fencing, log
recovery after a crash). CI and many developer machines have a JDK but no Docker daemon, so
instead of a container we fetch the broker jars from Maven Central
(:mod:`headrace.runtime.localkafka.jars`) and run ``java -cp 'lib/*' kafka.Kafka
server.properties`` ourselves.

Everything about one broker lives in its *run directory*
(:mod:`~headrace.runtime.localkafka.rundir`: config, data, logs, PID, ``broker.json``).
``start()`` on an existing run dir restarts the *same* broker (same ports, same data, same
cluster id) and never reformats: recovery tests stop/kill and restart it while data flows.

Topic auto-creation is left at Kafka's default (enabled) so the local broker behaves like
the testcontainers image and like most real clusters; headrace's own tests create every
topic explicitly (with the partition count they need) through the pytest plugin's
``topic_factory``, and the runtime must not rely on auto-creation either. Pass
``auto_create_topics=False`` to catch code that does.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from headrace.runtime.localkafka.config import (
    SERVER_PROPERTIES_TEMPLATE,
    logging_config,
    sasl_listener,
)
from headrace.runtime.localkafka.errors import BrokerStartError, LocalBrokerError
from headrace.runtime.localkafka.jars import ensure_jars, tail
from headrace.runtime.localkafka.process import (
    cmdline,
    java,
    metadata_ok,
    pid_alive,
    port_open,
    run_coroutine_sync,
)
from headrace.runtime.localkafka.rundir import BrokerState, RunDir

#: Extra JVM flags appended to the defaults (e.g. a bigger heap for benchmarks).
JVM_OPTS_ENV = "HEADRACE_KAFKA_JVM_OPTS"

_BROKER_MAIN = "kafka.Kafka"
_STORAGE_TOOL_MAIN = "kafka.tools.StorageTool"
_NODE_ID = 1
DEFAULT_JVM_OPTS: tuple[str, ...] = (
    "-Xms128m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-Djava.awt.headless=true",
)


class LocalBroker(RunDir):
    """One single-node KRaft Kafka broker living in ``run_dir``.

    The object holds no process handle: the PID file and ``broker.json`` in the run dir are
    the truth, so any process (CLI, pytest, CI script) can construct a ``LocalBroker`` for
    the same run dir and stop/restart the broker another process started.
    """

    def __init__(
        self,
        run_dir: Path | str | None = None,
        *,
        port: int | None = None,
        controller_port: int | None = None,
        host: str = "127.0.0.1",
        version: str | None = None,
        jvm_opts: tuple[str, ...] | None = None,
        auto_create_topics: bool = True,
        sasl_users: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            run_dir,
            port=port,
            controller_port=controller_port,
            host=host,
            version=version,
            sasl_users=sasl_users,
        )
        extra = tuple(os.environ.get(JVM_OPTS_ENV, "").split())
        self.jvm_opts: tuple[str, ...] = (jvm_opts or DEFAULT_JVM_OPTS) + extra
        self.auto_create_topics = auto_create_topics
        #: Seconds the last ``start()`` took from spawning the JVM to a good Metadata reply.
        self.last_startup_seconds: float | None = None

    # -- the process -----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """PID of the running broker, or None (stale PID files are ignored)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if not pid_alive(pid):
            return None
        cmd = cmdline(pid)
        # Guard against PID reuse: only a kafka.Kafka JVM started on *our* config is ours.
        if cmd is not None and (_BROKER_MAIN not in cmd or str(self.config_file) not in cmd):
            return None
        return pid

    def is_running(self) -> bool:
        """The broker process is alive (not necessarily ready: see ``is_ready``)."""
        return self.pid is not None

    def is_ready(self, timeout: float = 3.0) -> bool:
        """The broker process is alive and answers a Metadata request."""
        if not self.is_running() or self.port is None:
            return False
        if not port_open(self.host, self.port):
            return False
        bootstrap = self.bootstrap_servers
        return run_coroutine_sync(lambda: metadata_ok(bootstrap, timeout))

    def status(self) -> dict[str, Any]:
        """A JSON-able summary, for ``headrace kafka status`` and debugging."""
        pid = self.pid
        return {
            "run_dir": str(self.run_dir),
            "running": pid is not None,
            "pid": pid,
            "bootstrap_servers": f"{self.host}:{self.port}" if self.port else None,
            "controller_port": self.controller_port,
            "accepting_connections": bool(pid and self.port and port_open(self.host, self.port)),
            "formatted": self.formatted,
            "cluster_id": self.cluster_id,
            "kafka_version": self._state.kafka_version if self._state else None,
            "log_file": str(self.log_file),
        }

    # -- lifecycle -----------------------------------------------------------------------

    def _write_configs(self, state: BrokerState) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = SERVER_PROPERTIES_TEMPLATE.format(
            node_id=_NODE_ID,
            host=state.host,
            port=state.port,
            controller_port=state.controller_port,
            data_dir=self.data_dir,
            auto_create="true" if self.auto_create_topics else "false",
        )
        if state.sasl_port is not None and self.sasl_users:
            config = sasl_listener(config, state.host, state.sasl_port, self.sasl_users)
        self.config_file.write_text(config)
        name, text, _ = logging_config(state.kafka_version, self.log_file)
        (self.run_dir / name).write_text(text)

    def _java_cmd(self, lib: Path, main: str, *args: str) -> list[str]:
        name, _, flag = logging_config(self.version, self.log_file)
        return [
            java(),
            *self.jvm_opts,
            f"{flag}{self.run_dir / name}",
            f"-Dkafka.logs.dir={self.logs_dir}",
            "-cp",
            f"{lib}/*",
            main,
            *args,
        ]

    def _format_storage(self, lib: Path, state: BrokerState) -> None:
        """Format the log dir once. Never on restart: that would wipe the cluster's data."""
        if self.formatted:
            return
        cmd = self._java_cmd(
            lib,
            _STORAGE_TOOL_MAIN,
            "format",
            "-t",
            state.cluster_id,
            "-c",
            str(self.config_file),
        )
        # The storage tool is a short-lived JVM: a small heap starts it faster.
        cmd = [c for c in cmd if not c.startswith(("-Xms", "-Xmx"))]
        cmd.insert(1, "-Xmx256m")
        proc = subprocess.run(
            cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
        )
        if proc.returncode != 0:
            raise BrokerStartError(
                f"formatting {self.data_dir} failed (exit {proc.returncode}):\n"
                f"{proc.stdout}\n{proc.stderr}"
            )

    def _spawn(self, lib: Path) -> int:
        """Start the JVM detached (own session) so it outlives the starting process.

        ``posix_spawn`` rather than ``subprocess.Popen``: a Popen object that is garbage
        collected while the broker still runs emits a ResourceWarning, which the test suite
        turns into an error. We reap our own child in ``pid_alive`` instead.
        """
        cmd = self._java_cmd(lib, _BROKER_MAIN, str(self.config_file))
        out_flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        pid = os.posix_spawn(
            cmd[0],
            cmd,
            dict(os.environ),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, str(self.stdout_file), out_flags, 0o644),
                (os.POSIX_SPAWN_DUP2, 1, 2),
            ],
            setsid=True,
        )
        self.pid_file.write_text(f"{pid}\n")
        return pid

    def start(self, timeout: float = 120.0) -> float:
        """Start (or restart) the broker and wait until it serves metadata.

        Idempotent: if it is already running, just waits for readiness. Returns the start-up
        time in seconds (also kept in ``last_startup_seconds``). Raises ``BrokerStartError``
        with the tail of the broker's log when it dies or is not ready within ``timeout``.
        """
        started = time.monotonic()
        pid = self.pid
        if pid is None:
            state = self._resolve_state()
            lib = ensure_jars(state.kafka_version)
            for p in (state.port, state.controller_port):
                if port_open(state.host, p, timeout=0.2):
                    raise BrokerStartError(
                        f"{state.host}:{p} is already in use by another process; "
                        f"stop it or pass another port (run dir {self.run_dir})"
                    )
            self._write_configs(state)
            self._save_state(state)
            self._format_storage(lib, state)
            with self.stdout_file.open("a") as fh:
                fh.write(f"--- starting broker at {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
            started = time.monotonic()
            pid = self._spawn(lib)
        self._wait_ready(pid, started, timeout)
        self.last_startup_seconds = time.monotonic() - started
        return self.last_startup_seconds

    def _wait_ready(self, pid: int, started: float, timeout: float) -> None:
        deadline = started + timeout
        bootstrap = self.bootstrap_servers
        assert self.port is not None
        while True:
            if not pid_alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    self.pid_file.unlink()
                raise BrokerStartError(self._failure_report(f"broker process {pid} exited"))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerStartError(
                    self._failure_report(
                        f"broker (pid {pid}) not ready at {bootstrap} after {timeout:.0f}s; "
                        "it is left running for inspection"
                    )
                )
            probe_s = min(5.0, max(1.0, remaining))
            if port_open(self.host, self.port) and run_coroutine_sync(
                functools.partial(metadata_ok, bootstrap, probe_s)
            ):
                return
            time.sleep(0.2)

    def _failure_report(self, what: str) -> str:
        return (
            f"{what} (run dir {self.run_dir}).\n"
            f"Last lines of {self.log_file}:\n{tail(self.log_file, 40)}\n"
            f"Last lines of {self.stdout_file}:\n{tail(self.stdout_file, 15)}"
        )

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the broker: SIGTERM (clean, controlled shutdown), SIGKILL after ``timeout``.

        Only ever signals the PID from our PID file, and only if it still is our broker.
        Returns False if it was not running. Data is kept: ``start()`` brings it back.
        """
        pid = self.pid
        if pid is None:
            with contextlib.suppress(FileNotFoundError):
                self.pid_file.unlink()
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not self._wait_exit(pid, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if not self._wait_exit(pid, 10.0):
                raise LocalBrokerError(f"broker pid {pid} survived SIGKILL")
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        return True

    def kill(self) -> bool:
        """Crash the broker with SIGKILL (no clean shutdown): for recovery tests.

        The next ``start()`` goes through Kafka's log recovery, like after a power cut.
        """
        pid = self.pid
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not self._wait_exit(pid, 10.0):
            raise LocalBrokerError(f"broker pid {pid} survived SIGKILL")
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        return True

    def restart(self, timeout: float = 120.0, *, hard: bool = False) -> float:
        """Stop (or ``kill`` when ``hard``) and start again on the same port and data."""
        if hard:
            self.kill()
        else:
            self.stop()
        return self.start(timeout)

    @staticmethod
    def _wait_exit(pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return True
            time.sleep(0.1)
        return not pid_alive(pid)

    def __repr__(self) -> str:
        return f"LocalBroker(run_dir={str(self.run_dir)!r}, port={self.port}, pid={self.pid})"
