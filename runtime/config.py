"""Worker settings: one dataclass, filled from CLI flags or ``HEADRACE_*`` environment variables.

Every setting has one flag and one environment variable, named alike: ``--checkpoint-interval-ms``
and ``HEADRACE_CHECKPOINT_INTERVAL_MS``. The table :data:`SETTINGS` is the one place that names
them; the CLI builds its options from it and :meth:`Settings.from_env` reads the same names, so
the two can never drift apart. Every value is validated when the :class:`Settings` is built, and
a bad one raises :class:`SettingsError` naming the flag, the environment variable, the value and
what is allowed: a worker refuses to start rather than fail minutes later in a division by zero.

Secrets (SASL password, SSL key password) come from the environment only, are kept out of
``repr`` and are never echoed in an error message.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

ENV_PREFIX = "HEADRACE_"


class Guarantee(StrEnum):
    EXACTLY_ONCE = "exactly_once"
    AT_LEAST_ONCE = "at_least_once"


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
STATE_BACKENDS = ("memory", "rocksdb")
ERROR_POLICIES = ("fail", "skip", "dead_letter")


@dataclass(frozen=True, slots=True)
class SettingInfo:
    """How one :class:`Settings` field is named and described to a user."""

    field: str
    flag: str  #: without the leading dashes; also gives the environment variable
    help: str
    #: older environment variable names still read (with a warning)
    aliases: tuple[str, ...] = ()
    #: read from the environment only (secrets): no flag
    env_only: bool = False

    @property
    def envvar(self) -> str:
        return ENV_PREFIX + self.flag.upper().replace("-", "_")

    @property
    def option(self) -> str:
        return "--" + self.flag

    def names(self) -> str:
        """How an error message names the setting: ``--flag / HEADRACE_FLAG``."""
        return self.envvar if self.env_only else f"{self.option} / {self.envvar}"


#: Every setting a worker has, in the order ``--help`` shows them.
SETTINGS: tuple[SettingInfo, ...] = (
    SettingInfo(
        "bootstrap_servers",
        "bootstrap-servers",
        "Kafka bootstrap servers, host:port[,host:port...] (also read from "
        "KAFKA_BOOTSTRAP_SERVERS).",
    ),
    SettingInfo(
        "processing_guarantee",
        "guarantee",
        "exactly_once (Kafka transactions, the default) or at_least_once.",
        aliases=("HEADRACE_PROCESSING_GUARANTEE",),
    ),
    SettingInfo(
        "checkpoint_interval_ms", "checkpoint-interval-ms", "Checkpoint interval (default 1000)."
    ),
    SettingInfo(
        "alignment_timeout_s",
        "alignment-timeout-s",
        "Checkpoint unaligned after waiting this long for barriers (default 60).",
    ),
    SettingInfo("state_backend", "state-backend", "State backend: memory (default) or rocksdb."),
    SettingInfo("state_dir", "state-dir", "Directory for RocksDB state (default .headrace/state)."),
    SettingInfo(
        "error_policy",
        "error-policy",
        "Override the job's error policy: fail, skip or dead_letter.",
    ),
    SettingInfo(
        "restore_batch_size",
        "restore-batch-size",
        "Changelog records applied per restore step (default 10000).",
    ),
    SettingInfo("max_poll_records", "max-poll-records", "Records fetched per poll (default 2000)."),
    SettingInfo(
        "gc_young_threshold",
        "gc-young-threshold",
        "Python's young-generation garbage-collector threshold while the worker runs "
        "(default 20000; Python's own is 700; 0 leaves it alone). Fewer cycle searches "
        "(runtime/gctuning.py).",
    ),
    SettingInfo("client_id", "client-id", "Kafka client id prefix (default headrace)."),
    SettingInfo(
        "session_timeout_ms",
        "session-timeout-ms",
        "Consumer-group session timeout (default 10000; the broker allows 6000-1800000 by "
        "default): a worker silent this long loses its tasks, and stops writing for them (its "
        "write lease).",
    ),
    SettingInfo(
        "rebalance_timeout_ms",
        "rebalance-timeout-ms",
        "How long a rebalance waits for every member to rejoin (default 30000, at least the "
        "session timeout): the time a worker has for its revoked tasks' final checkpoints "
        "before the group goes on without it. Java consumers bind it to max.poll.interval.ms; "
        "aiokafka's default, the session timeout, was outlasted by workers with hundreds of "
        "tasks, and each member left behind cost the group another rebalance.",
    ),
    SettingInfo(
        "heartbeat_interval_ms",
        "heartbeat-interval-ms",
        "Consumer-group heartbeat interval (default 3000), below a third of the session timeout.",
    ),
    SettingInfo(
        "producer_request_timeout_ms",
        "producer-request-timeout-ms",
        "How long a producer waits for the broker to acknowledge a request, and how long a "
        "batch waits for its partition's leader before it fails (default 40000, aiokafka's). "
        "A batch that fails costs the worker its tasks' uncommitted work, which they redo "
        "from their last checkpoint.",
    ),
    SettingInfo(
        "security_protocol",
        "security-protocol",
        "Kafka security protocol: " + ", ".join(SECURITY_PROTOCOLS) + ".",
    ),
    SettingInfo(
        "sasl_mechanism", "sasl-mechanism", "SASL mechanism: " + ", ".join(SASL_MECHANISMS) + "."
    ),
    SettingInfo("sasl_username", "sasl-username", "SASL user name."),
    SettingInfo("sasl_password", "sasl-password", "SASL password.", env_only=True),
    SettingInfo("ssl_cafile", "ssl-cafile", "CA bundle for SSL."),
    SettingInfo("ssl_certfile", "ssl-certfile", "Client certificate for SSL."),
    SettingInfo("ssl_keyfile", "ssl-keyfile", "Client key for SSL."),
    SettingInfo("ssl_password", "ssl-password", "Password of the SSL key.", env_only=True),
    SettingInfo(
        "metrics_port",
        "metrics-port",
        "Serve Prometheus /metrics, /health and /ready on this port (0: any free port).",
    ),
    SettingInfo(
        "metrics_host",
        "metrics-host",
        "Interface for --metrics-port (default 127.0.0.1; 0.0.0.0 for every interface, as a "
        "container needs).",
    ),
    SettingInfo(
        "hop_format",
        "hop-format",
        "Format of the repartition records this worker writes: 2 (the default: channel and "
        "sequence numbers once per record batch) or 1 (a header on every record). This "
        "version reads both, older ones only 1: in a rolling upgrade from an older version "
        "use 1 until none of its workers is left, then 2.",
    ),
    SettingInfo(
        "status_interval_s",
        "status-interval-s",
        "How often a worker publishes its status for `headrace status` (default 5).",
    ),
)
SETTING_BY_FIELD: dict[str, SettingInfo] = {s.field: s for s in SETTINGS}

#: ``HEADRACE_*`` variables that are not worker settings but are read by headrace somewhere.
OTHER_ENV: dict[str, str] = {
    "HEADRACE_LOG_LEVEL": "log level (--log-level)",
    "HEADRACE_LOG_FORMAT": "log format (--log-format)",
    "HEADRACE_KAFKA_HOME": "local broker: jars cache (a Maven project per Kafka version)",
    "HEADRACE_KAFKA_VERSION": "local broker: Kafka version",
    "HEADRACE_KAFKA_JVM_OPTS": "local broker: extra JVM flags",
    "HEADRACE_KAFKA_IMAGE": "test broker: testcontainers image",
    "HEADRACE_LOCAL_BROKER_DIR": "test broker: run dir of a running local broker",
    "HEADRACE_FAULT_PHASE": "recovery tests: crash at this checkpoint phase",
    "HEADRACE_FAULT_AFTER": "recovery tests: crash at this occurrence of the phase",
    "HEADRACE_FAULT_ACTION": "recovery tests: kill (default) or stop (SIGSTOP once) at the phase",
    "HEADRACE_SOAK_SEED": "soak tests: seed",
    "HEADRACE_SOAK_SCALE": "soak tests: length factor",
}


class SettingsError(ValueError):
    """A setting has a value headrace cannot use: names the flag, the variable and what fits."""

    def __init__(self, name: str, value: Any, allowed: str) -> None:
        info = SETTING_BY_FIELD.get(name)
        self.setting = name
        self.names = info.names() if info is not None else name
        if value is None:
            super().__init__(f"{self.names} is not set: {allowed}")
            return
        shown = "***" if info is not None and info.env_only else repr(value)
        super().__init__(f"invalid value {shown} for {self.names}: {allowed}")


@dataclass(slots=True)
class Settings:
    bootstrap_servers: str = "127.0.0.1:9092"
    processing_guarantee: Guarantee = Guarantee.EXACTLY_ONCE
    checkpoint_interval_ms: int = 1000
    alignment_timeout_s: float = 60.0
    state_backend: str = "memory"
    state_dir: Path = Path(".headrace/state")
    error_policy: str | None = None  #: overrides the job's policy when set
    restore_batch_size: int = 10_000
    max_poll_records: int = 2000
    #: the collector's young-generation threshold while a worker runs (runtime/gctuning.py)
    gc_young_threshold: int = 20_000
    client_id: str = "headrace"
    #: consumer-group session: a member silent for this long is expelled and its tasks move.
    #: It is also the task's write lease (see headrace.runtime.kafka.lease): a worker that has
    #: not heard a successful heartbeat within it stops writing and rejoins.
    session_timeout_ms: int = 10_000
    #: how long a rebalance waits for members to rejoin (their revocations); the write lease
    #: holds through a rebalance for at most this long (headrace.runtime.kafka.lease)
    rebalance_timeout_ms: int = 30_000
    heartbeat_interval_ms: int = 3_000
    #: aiokafka's request_timeout_ms for producers (runtime/kafka/clients.py)
    producer_request_timeout_ms: int = 40_000
    # security: passed through to aiokafka unchanged
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = field(default=None, repr=False)
    metrics_port: int | None = None
    #: interface of the ops HTTP server (/metrics, /health, /ready); loopback unless asked
    metrics_host: str = "127.0.0.1"
    status_interval_s: float = 5.0
    #: repartition record format written (runtime/kafka/hopformat.py); both are read
    hop_format: int = 2

    def __post_init__(self) -> None:
        # Accept plain strings/ints from code as well as from the environment.
        for name, value in _coerce({f.name: getattr(self, f.name) for f in fields(self)}).items():
            object.__setattr__(self, name, value)
        _check_together(self)

    @property
    def exactly_once(self) -> bool:
        return self.processing_guarantee is Guarantee.EXACTLY_ONCE

    def secrets(self) -> list[str]:
        """The secret values these settings hold (for log masking)."""
        return [s for s in (self.sasl_password, self.ssl_password) if s]

    def kafka_kwargs(self) -> dict[str, Any]:
        """Connection and security settings shared by every aiokafka client."""
        kw: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            kw["sasl_mechanism"] = self.sasl_mechanism
            kw["sasl_plain_username"] = self.sasl_username
            kw["sasl_plain_password"] = self.sasl_password
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            kw["ssl_context"] = create_ssl_context(
                cafile=self.ssl_cafile,
                certfile=self.ssl_certfile,
                keyfile=self.ssl_keyfile,
                password=self.ssl_password,
            )
        return kw

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """``HEADRACE_<FLAG>`` for every setting, then explicit overrides (CLI flags) win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for info in SETTINGS:
            for name in (info.envvar, *info.aliases):
                raw = env.get(name)
                if raw is not None:
                    values[info.field] = raw
                    break
        if "KAFKA_BOOTSTRAP_SERVERS" in env and "bootstrap_servers" not in values:
            values["bootstrap_servers"] = env["KAFKA_BOOTSTRAP_SERVERS"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def env_warnings(environ: Mapping[str, str] | None = None) -> list[str]:
    """Warnings about the ``HEADRACE_*`` environment: unknown names (a typo is otherwise
    silently ignored, and the worker runs with the default) and deprecated aliases."""
    env = os.environ if environ is None else environ
    known = {s.envvar for s in SETTINGS} | set(OTHER_ENV)
    aliases = {alias: s for s in SETTINGS for alias in s.aliases}
    out: list[str] = []
    for name in sorted(n for n in env if n.startswith(ENV_PREFIX)):
        if name in aliases:
            out.append(f"{name} is deprecated: use {aliases[name].envvar}")
        elif name not in known:
            close = _closest(name, known)
            hint = f" (did you mean {close}?)" if close else ""
            out.append(f"unknown environment variable {name} is ignored{hint}")
    return out


def _closest(name: str, known: set[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
    return match[0] if match else None


# -- validation ------------------------------------------------------------------------------


def _int(low: int, high: int | None = None, unit: str = "") -> Callable[[str, Any], int]:
    def conv(name: str, value: Any) -> int:
        bound = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
        try:
            out = int(value)
        except (TypeError, ValueError):
            raise SettingsError(name, value, bound + unit) from None
        if out < low or (high is not None and out > high):
            raise SettingsError(name, value, bound + unit)
        return out

    return conv


def _positive_float(unit: str) -> Callable[[str, Any], float]:
    def conv(name: str, value: Any) -> float:
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise SettingsError(name, value, f"a number > 0{unit}") from None
        if not out > 0 or out == float("inf"):
            raise SettingsError(name, value, f"a number > 0{unit}")
        return out

    return conv


def _choice(options: tuple[str, ...], *, upper: bool = False) -> Callable[[str, Any], str]:
    def conv(name: str, value: Any) -> str:
        text = str(value).strip()
        text = text.upper() if upper else text.lower()
        if text not in options:
            raise SettingsError(name, value, "one of " + ", ".join(options))
        return text

    return conv


def _guarantee(name: str, value: Any) -> Guarantee:
    try:
        return Guarantee(str(value).strip().lower())
    except ValueError:
        raise SettingsError(
            name, value, "one of " + ", ".join(g.value for g in Guarantee)
        ) from None


def _bootstrap(name: str, value: Any) -> str:
    text = str(value).strip()
    hosts = [h.strip() for h in text.split(",") if h.strip()]
    for host in hosts:
        _, sep, port = host.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise SettingsError(name, value, "host:port[,host:port...], e.g. 127.0.0.1:9092")
    if not hosts:
        raise SettingsError(name, value, "host:port[,host:port...], e.g. 127.0.0.1:9092")
    return ",".join(hosts)


def _nonempty(name: str, value: Any) -> str:
    text = str(value).strip()
    if not text:
        raise SettingsError(name, value, "a non-empty string")
    return text


def _existing_file(name: str, value: Any) -> str:
    if not Path(str(value)).is_file():
        raise SettingsError(name, value, "the path of an existing file")
    return str(value)


_CONVERTERS: dict[str, Callable[[str, Any], Any]] = {
    "bootstrap_servers": _bootstrap,
    "processing_guarantee": _guarantee,
    "checkpoint_interval_ms": _int(1, unit=" (milliseconds)"),
    "alignment_timeout_s": _positive_float(" (seconds)"),
    "state_backend": _choice(STATE_BACKENDS),
    "state_dir": lambda _name, value: Path(value),
    "error_policy": _choice(ERROR_POLICIES),
    "restore_batch_size": _int(1),
    "max_poll_records": _int(1),
    "gc_young_threshold": _int(0),
    "client_id": _nonempty,
    "session_timeout_ms": _int(1, unit=" (milliseconds)"),
    "rebalance_timeout_ms": _int(1, unit=" (milliseconds)"),
    "heartbeat_interval_ms": _int(1, unit=" (milliseconds)"),
    "producer_request_timeout_ms": _int(1, unit=" (milliseconds)"),
    "security_protocol": _choice(SECURITY_PROTOCOLS, upper=True),
    "sasl_mechanism": _choice(SASL_MECHANISMS, upper=True),
    "ssl_cafile": _existing_file,
    "ssl_certfile": _existing_file,
    "ssl_keyfile": _existing_file,
    "metrics_port": _int(0, 65535),
    "metrics_host": _nonempty,
    "status_interval_s": _positive_float(" (seconds)"),
    "hop_format": _int(1, 2),
}


def _coerce(values: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    for name, conv in _CONVERTERS.items():
        if out.get(name) is not None:
            out[name] = conv(name, out[name])
    return out


def _check_together(s: Settings) -> None:
    """Rules that involve more than one setting."""
    if s.heartbeat_interval_ms >= s.session_timeout_ms:
        raise SettingsError(
            "heartbeat_interval_ms",
            s.heartbeat_interval_ms,
            f"less than the session timeout ({s.session_timeout_ms} ms; "
            f"{SETTING_BY_FIELD['session_timeout_ms'].names()}), ideally a third of it or less",
        )
    if s.rebalance_timeout_ms < s.session_timeout_ms:
        raise SettingsError(
            "rebalance_timeout_ms",
            s.rebalance_timeout_ms,
            f"at least the session timeout ({s.session_timeout_ms} ms; "
            f"{SETTING_BY_FIELD['session_timeout_ms'].names()})",
        )
    if s.security_protocol.startswith("SASL_"):
        for name in ("sasl_mechanism", "sasl_username", "sasl_password"):
            if not getattr(s, name):
                raise SettingsError(
                    name,
                    None,
                    f"required with security protocol {s.security_protocol}: set "
                    f"{SETTING_BY_FIELD[name].envvar}",
                )
    elif s.sasl_mechanism:
        raise SettingsError(
            "sasl_mechanism",
            s.sasl_mechanism,
            f"only used with security protocol SASL_PLAINTEXT or SASL_SSL (it is "
            f"{s.security_protocol}; {SETTING_BY_FIELD['security_protocol'].names()})",
        )
