"""Worker settings: one dataclass, filled from CLI flags or ``HEADRACE_*`` environment variables.

Secrets (SASL password, SSL key password) are kept out of ``repr`` so that logging the settings
never leaks them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any


class Guarantee(StrEnum):
    EXACTLY_ONCE = "exactly_once"
    AT_LEAST_ONCE = "at_least_once"


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
    client_id: str = "headrace"
    #: consumer-group session: a member silent for this long is expelled and its tasks move.
    #: It is also the task's write lease (see headrace.runtime.lease): a worker that has not
    #: heard a successful heartbeat within it stops writing and rejoins.
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
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

    def __post_init__(self) -> None:
        # Accept plain strings/ints from code as well as from the environment.
        for name, value in _coerce({f.name: getattr(self, f.name) for f in fields(self)}).items():
            object.__setattr__(self, name, value)

    @property
    def exactly_once(self) -> bool:
        return self.processing_guarantee is Guarantee.EXACTLY_ONCE

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
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """``HEADRACE_<FIELD>`` for every field, then explicit overrides (CLI flags) win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"HEADRACE_{f.name.upper()}")
            if raw is not None:
                values[f.name] = raw
        if "KAFKA_BOOTSTRAP_SERVERS" in env and "bootstrap_servers" not in values:
            values["bootstrap_servers"] = env["KAFKA_BOOTSTRAP_SERVERS"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _coerce(values: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    for name, conv in (
        ("checkpoint_interval_ms", int),
        ("restore_batch_size", int),
        ("max_poll_records", int),
        ("session_timeout_ms", int),
        ("heartbeat_interval_ms", int),
        ("alignment_timeout_s", float),
        ("metrics_port", int),
    ):
        if name in out and out[name] is not None:
            out[name] = conv(out[name])
    if "processing_guarantee" in out:
        out["processing_guarantee"] = Guarantee(out["processing_guarantee"])
    if "state_dir" in out:
        out["state_dir"] = Path(out["state_dir"])
    if out.get("state_backend") not in (None, "memory", "rocksdb"):
        raise ValueError(
            f"state backend must be 'memory' or 'rocksdb', got {out['state_backend']!r}"
        )
    return out
