"""A real single-node Apache Kafka broker (KRaft, broker+controller) run from Maven jars.

Why this exists: headrace's exactly-once and recovery guarantees are only worth something if
they are tested against a real broker (transactions, group coordinator, fencing, log
recovery after a crash). CI and many developer machines have a JDK but no Docker daemon, so
instead of a container we fetch the broker jars from Maven Central (deploy/kafka/pom.xml)
and run ``java -cp 'lib/*' kafka.Kafka server.properties`` ourselves.

Everything about one broker lives in its *run directory* (default ``deploy/kafka/run``)::

    run_dir/
      broker.json        ports + cluster id: lets another process (the CLI, a pytest
                         session, .ci/run) wrap the same broker and restart it on the
                         same address
      server.properties  rendered on every start from broker.json
      log4j.properties
      broker.pid         only while the broker runs
      data/              Kafka log dirs (formatted once, kept across restarts)
      logs/server.log    the broker's own log (tailed into our error messages)
      logs/stdout.log    JVM stdout/stderr (JVM crashes, bad flags)

So ``start()`` on an existing run dir restarts the *same* broker (same ports, same data, same
cluster id) and never reformats: recovery tests stop/kill and restart it while data flows.

Topic auto-creation is left at Kafka's default (enabled) so the local broker behaves like
the testcontainers image and like most real clusters; headrace's own tests create every
topic explicitly (with the partition count they need) through the pytest plugin's
``topic_factory``, and the runtime must not rely on auto-creation either. Pass
``auto_create_topics=False`` to catch code that does.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "BrokerStartError",
    "JarsUnavailableError",
    "LocalBroker",
    "LocalBrokerError",
    "default_run_dir",
    "ensure_jars",
    "kafka_home",
    "kafka_version",
]

_T = TypeVar("_T")

#: Env var naming the directory that holds pom.xml (and target/lib). Needed when headrace is
#: installed as a package rather than run from a checkout (deploy/ is not in the wheel).
KAFKA_HOME_ENV = "HEADRACE_KAFKA_HOME"
#: Extra JVM flags appended to the defaults (e.g. a bigger heap for benchmarks).
JVM_OPTS_ENV = "HEADRACE_KAFKA_JVM_OPTS"

_BROKER_MAIN = "kafka.Kafka"
_STORAGE_TOOL_MAIN = "kafka.tools.StorageTool"
_NODE_ID = 1
_STATE_FILE = "broker.json"
_PID_FILE = "broker.pid"

DEFAULT_JVM_OPTS: tuple[str, ...] = (
    "-Xms128m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-Djava.awt.headless=true",
)

# Kafka 3.9 logs through slf4j -> reload4j (log4j 1.x syntax). Kafka 4.x uses log4j2: this
# template (and the binding in pom.xml) is what changes with the major version.
LOG4J_TEMPLATE = """\
log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.RollingFileAppender
log4j.appender.file.File={log_file}
log4j.appender.file.MaxFileSize=20MB
log4j.appender.file.MaxBackupIndex=2
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.kafka.network.RequestChannel$=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.log.LogCleaner=INFO
log4j.logger.org.apache.kafka.raft=WARN
log4j.logger.org.apache.kafka.controller=INFO
"""

SERVER_PROPERTIES_TEMPLATE = """\
# Rendered by runtime/kafka/local_broker.py on every start; edit the code, not this file.
process.roles=broker,controller
node.id={node_id}
controller.quorum.voters={node_id}@{host}:{controller_port}
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}
advertised.listeners=PLAINTEXT://{host}:{port}
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={data_dir}

# Single node: every internal topic must be satisfiable with one replica, or transactions
# and consumer groups hang waiting for replicas that will never exist.
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
# Fewer internal partitions: the coordinator loads faster after every (re)start, which is
# what recovery tests wait on. Semantics are unchanged.
offsets.topic.num.partitions=10
transaction.state.log.num.partitions=10
num.partitions=1
auto.create.topics.enable={auto_create}

# Tests start consumer groups constantly; the default 3 s join delay only slows them down.
group.initial.rebalance.delay.ms=0

# After a crash (SIGKILL) the restarted broker cannot register until the controller expires
# the dead incarnation's session (default 9 s). Recovery tests kill the broker on purpose,
# so keep the session short; heartbeats are on loopback inside one JVM, so 500 ms is cheap.
broker.heartbeat.interval.ms=500
broker.session.timeout.ms=4000

# Small machine (2 cores, broker heap <= 512 MiB): the cleaner's default 128 MiB dedupe
# buffer would take a quarter of the heap. Compaction (changelog topics) still works.
log.cleaner.dedupe.buffer.size=16777216
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=2
"""


class LocalBrokerError(RuntimeError):
    """Anything that stops the local broker from being fetched, started or stopped."""


class JarsUnavailableError(LocalBrokerError):
    """The broker jars are missing and could not be fetched (no Maven, no network...)."""


class BrokerStartError(LocalBrokerError):
    """The broker process did not come up; the message includes the tail of its log."""


# --------------------------------------------------------------------------------------
# Jars
# --------------------------------------------------------------------------------------


def kafka_home() -> Path:
    """Directory holding ``pom.xml`` for the broker jars.

    ``$HEADRACE_KAFKA_HOME`` wins; otherwise ``deploy/kafka`` of the checkout this module
    lives in, which is the normal case (editable install / CI clone).
    """
    env = os.environ.get(KAFKA_HOME_ENV)
    if env:
        return Path(env).expanduser().resolve()
    candidate = Path(__file__).resolve().parents[2] / "deploy" / "kafka"
    if (candidate / "pom.xml").is_file():
        return candidate
    raise JarsUnavailableError(
        f"cannot find deploy/kafka/pom.xml next to {Path(__file__).resolve().parents[2]}; "
        f"set {KAFKA_HOME_ENV} to a directory containing headrace's deploy/kafka/pom.xml"
    )


def default_run_dir() -> Path:
    """``deploy/kafka/run`` of the checkout: git-ignored, survives between commands."""
    return kafka_home() / "run"


def kafka_version(home: Path | None = None) -> str:
    """The ``kafka.version`` property of pom.xml: the single source of the broker version."""
    pom = (home or kafka_home()) / "pom.xml"
    try:
        root = ET.parse(pom).getroot()
    except (OSError, ET.ParseError) as exc:
        raise JarsUnavailableError(f"cannot read {pom}: {exc}") from exc
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = root.find("m:properties/m:kafka.version", ns)
    if node is None or not (node.text or "").strip():
        raise JarsUnavailableError(f"{pom} has no <kafka.version> property")
    return (node.text or "").strip()


def _lib_dir(home: Path) -> Path:
    return home / "target" / "lib"


def _jars_present(home: Path, version: str) -> bool:
    return (_lib_dir(home) / f"kafka_2.13-{version}.jar").is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise Maven runs: `make`, CI and parallel pytest sessions may all ask at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_jars(home: Path | None = None, *, offline: bool = False) -> Path:
    """Return the directory of broker jars, running Maven first if they are missing.

    Jars of another Kafka version (pom.xml was bumped) are removed so the classpath never
    mixes two brokers. Maven's output goes to ``target/maven.log`` and is shown only on
    failure, because a quiet success is what every test run wants.
    """
    home = home or kafka_home()
    version = kafka_version(home)
    lib = _lib_dir(home)
    if _jars_present(home, version):
        return lib
    with _file_lock(home / "target" / ".jars.lock"):
        if _jars_present(home, version):  # another process fetched them meanwhile
            return lib
        mvn = shutil.which("mvn")
        if mvn is None:
            raise JarsUnavailableError(
                f"Kafka {version} jars are missing from {lib} and `mvn` is not on PATH; "
                "install Maven 3.8+ (and a JDK 17) or run `make kafka-jars` on a machine "
                "that has it"
            )
        if lib.exists():
            shutil.rmtree(lib)
        cmd = [mvn, "-B", "-q", "-f", str(home / "pom.xml"), "package"]
        if offline:
            cmd.insert(1, "-o")
        log_path = home / "target" / "maven.log"
        started = time.monotonic()
        with log_path.open("w") as log:
            rc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False
            ).returncode
        if rc != 0 or not _jars_present(home, version):
            raise JarsUnavailableError(
                f"`{' '.join(cmd)}` failed (exit {rc}) after {time.monotonic() - started:.1f}s; "
                f"last lines of {log_path}:\n{_tail(log_path, 30)}"
            )
    return lib


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return f"  ({path} does not exist)"
    return "\n".join("  " + line for line in data.splitlines()[-lines:])


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _random_cluster_id() -> str:
    """Same shape as ``kafka-storage random-uuid``: 16 random bytes, base64url, no padding.

    Kafka refuses ids starting with '-' (they look like command-line flags).
    """
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise LocalBrokerError("`java` not found (set JAVA_HOME or put a JDK 17 on PATH)")
    return java


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _run_coroutine_sync(factory: Callable[[], Awaitable[_T]]) -> _T:
    """Run a coroutine to completion from sync code, even if an event loop is running.

    ``start()`` is called from sync pytest fixtures but also from async tests (restarts);
    ``asyncio.run`` refuses to nest, so in that case a helper thread gets its own loop.
    """

    async def _main() -> _T:
        return await factory()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_main())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, _main()).result()


async def _metadata_ok(bootstrap: str, wait_s: float) -> bool:
    """True when the broker answers a Metadata request listing at least one broker.

    An open port is not enough: a KRaft broker accepts connections before it has caught up
    with the controller and been unfenced, and clients would see transient errors.
    """
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=max(1000, int(wait_s * 1000)),
        client_id="headrace-local-broker-probe",
    )
    try:
        async with asyncio.timeout(wait_s):
            await admin.start()
            cluster: dict[str, Any] = await admin.describe_cluster()
        return bool(cluster.get("brokers"))
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) process; reaps it if it is our exited child."""
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str | None:
    """The process's command line (Linux), or None when it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode("utf-8", "replace")


# --------------------------------------------------------------------------------------
# The broker
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _State:
    """What must survive between processes to restart the same broker on the same address."""

    host: str
    port: int
    controller_port: int
    cluster_id: str
    kafka_version: str


class LocalBroker:
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
        home: Path | None = None,
        jvm_opts: tuple[str, ...] | None = None,
        auto_create_topics: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir).expanduser().resolve() if run_dir else default_run_dir()
        self._home = home
        self._requested_port = port
        self._requested_controller_port = controller_port
        self.host = host
        extra = tuple(os.environ.get(JVM_OPTS_ENV, "").split())
        self.jvm_opts: tuple[str, ...] = (jvm_opts or DEFAULT_JVM_OPTS) + extra
        self.auto_create_topics = auto_create_topics
        #: Seconds the last ``start()`` took from spawning the JVM to a good Metadata reply.
        self.last_startup_seconds: float | None = None
        self._state: _State | None = self._load_state()

    # -- paths ---------------------------------------------------------------------------

    @property
    def home(self) -> Path:
        """deploy/kafka (pom.xml + target/lib)."""
        if self._home is None:
            self._home = kafka_home()
        return self._home

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

    # -- state ---------------------------------------------------------------------------

    def _load_state(self) -> _State | None:
        path = self.run_dir / _STATE_FILE
        try:
            raw = json.loads(path.read_text())
            return _State(**raw)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise LocalBrokerError(f"corrupt {path}: {exc}; delete the run dir") from exc

    def _save_state(self, state: _State) -> None:
        path = self.run_dir / _STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(state), indent=2) + "\n")
        tmp.replace(path)
        self._state = state

    def _resolve_state(self) -> _State:
        """Ports and cluster id for this start: keep the old ones unless told otherwise."""
        old = self._state
        port = self._requested_port or (old.port if old else None) or _free_port(self.host)
        cport = self._requested_controller_port or (old.controller_port if old else None)
        if cport is None or cport == port:
            cport = _free_port(self.host)
            while cport == port:
                cport = _free_port(self.host)
        formatted = (self.data_dir / "meta.properties").is_file()
        cluster_id = old.cluster_id if (old and formatted) else _random_cluster_id()
        return _State(self.host, port, cport, cluster_id, kafka_version(self.home))

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
    def pid(self) -> int | None:
        """PID of the running broker, or None (stale PID files are ignored)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if not _pid_alive(pid):
            return None
        cmd = _cmdline(pid)
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
        if not _port_open(self.host, self.port):
            return False
        bootstrap = self.bootstrap_servers
        return _run_coroutine_sync(lambda: _metadata_ok(bootstrap, timeout))

    def status(self) -> dict[str, Any]:
        """A JSON-able summary, for ``headrace kafka status`` and debugging."""
        pid = self.pid
        return {
            "run_dir": str(self.run_dir),
            "running": pid is not None,
            "pid": pid,
            "bootstrap_servers": f"{self.host}:{self.port}" if self.port else None,
            "controller_port": self.controller_port,
            "accepting_connections": bool(pid and self.port and _port_open(self.host, self.port)),
            "formatted": (self.data_dir / "meta.properties").is_file(),
            "cluster_id": self.cluster_id,
            "kafka_version": self._state.kafka_version if self._state else None,
            "log_file": str(self.log_file),
        }

    # -- lifecycle -----------------------------------------------------------------------

    def _write_configs(self, state: _State) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(
            SERVER_PROPERTIES_TEMPLATE.format(
                node_id=_NODE_ID,
                host=state.host,
                port=state.port,
                controller_port=state.controller_port,
                data_dir=self.data_dir,
                auto_create="true" if self.auto_create_topics else "false",
            )
        )
        (self.run_dir / "log4j.properties").write_text(
            LOG4J_TEMPLATE.format(log_file=self.log_file)
        )

    def _java_cmd(self, lib: Path, main: str, *args: str) -> list[str]:
        return [
            _java(),
            *self.jvm_opts,
            f"-Dlog4j.configuration=file:{self.run_dir / 'log4j.properties'}",
            f"-Dkafka.logs.dir={self.logs_dir}",
            "-cp",
            f"{lib}/*",
            main,
            *args,
        ]

    def _format_storage(self, lib: Path, state: _State) -> None:
        """Format the log dir once. Never on restart: that would wipe the cluster's data."""
        if (self.data_dir / "meta.properties").is_file():
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
        turns into an error. We reap our own child in ``_pid_alive`` instead.
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
        lib = ensure_jars(self.home)
        started = time.monotonic()
        pid = self.pid
        if pid is None:
            state = self._resolve_state()
            for p in (state.port, state.controller_port):
                if _port_open(state.host, p, timeout=0.2):
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
            if not _pid_alive(pid):
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
            if _port_open(self.host, self.port) and _run_coroutine_sync(
                functools.partial(_metadata_ok, bootstrap, probe_s)
            ):
                return
            time.sleep(0.2)

    def _failure_report(self, what: str) -> str:
        return (
            f"{what} (run dir {self.run_dir}).\n"
            f"Last lines of {self.log_file}:\n{_tail(self.log_file, 40)}\n"
            f"Last lines of {self.stdout_file}:\n{_tail(self.stdout_file, 15)}"
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
            if not _pid_alive(pid):
                return True
            time.sleep(0.1)
        return not _pid_alive(pid)

    def __repr__(self) -> str:
        return f"LocalBroker(run_dir={str(self.run_dir)!r}, port={self.port}, pid={self.pid})"
