"""Logs: text or JSON lines, with secret values masked (ARCHITECTURE.md section 8).

:func:`setup_logging` gives ``--log-format json`` (``HEADRACE_LOG_FORMAT=json``): one JSON object
per line. Secret values from the environment (``HEADRACE_SASL_PASSWORD``,
``HEADRACE_SSL_PASSWORD``) are masked in every log line, in either format, as a second line of
defence behind :class:`~headrace.runtime.config.Settings` hiding them from its ``repr``.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import orjson

_SECRET_ENV = ("HEADRACE_SASL_PASSWORD", "HEADRACE_SSL_PASSWORD")
#: LogRecord attributes that are not "extra" fields
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _secrets() -> list[str]:
    return [v for name in _SECRET_ENV if len(v := os.environ.get(name, "")) >= 3]


def _mask(text: str, secrets: list[str]) -> str:
    for s in secrets:
        text = text.replace(s, "***")
    return text


class RedactingFilter(logging.Filter):
    """Replaces secret values from the environment by ``***`` in the rendered message."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets = _secrets()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            masked = _mask(message, self.secrets)
            if masked != message:
                record.msg, record.args = masked, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, exception and any ``extra``."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets = _secrets()

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        line = orjson.dumps(out, default=str).decode()
        return _mask(line, self.secrets) if self.secrets else line


def setup_logging(level: str, fmt: str = "text") -> None:
    """Root logging for the CLI: ``fmt`` is ``text`` or ``json``."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
