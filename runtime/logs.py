"""Logs: text or JSON lines, with tracebacks, and with secret values masked (ARCHITECTURE.md 8).

:func:`setup_logging` gives ``--log-format text`` (a line per message, the traceback after it)
or ``--log-format json`` (``HEADRACE_LOG_FORMAT=json``: one JSON object per line, the traceback
in its ``exception`` field).

Secrets are masked in everything a log line carries: the message, its arguments, the traceback
and every extra field. The values come from the environment (``HEADRACE_SASL_PASSWORD``,
``HEADRACE_SSL_PASSWORD``) and from every :class:`~headrace.runtime.config.Settings` a worker
runs with (:func:`register_secrets`). Masking happens on the *text* before any escaping: the
JSON formatter masks each field and only then serialises, so a secret holding ``"``, ``\\`` or
a newline is found as it is, not in its escaped form. Because a message may also show a secret
in ``repr`` form (``%r`` of a dict, say), the ``repr`` spelling is masked too. This is a second
line of defence: :class:`~headrace.runtime.config.Settings` keeps secrets out of its ``repr``,
and nothing in headrace logs them on purpose.

:func:`mask` is the same function for text that leaves the process another way, such as the
error message header of a dead-lettered record.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable
from typing import Any

import orjson

_SECRET_ENV = ("HEADRACE_SASL_PASSWORD", "HEADRACE_SSL_PASSWORD")
#: LogRecord attributes that are not "extra" fields
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
#: shorter values are not masked: replacing every "ab" would garble the logs and hide nothing
MIN_SECRET_LEN = 3
MASK = "***"
#: how many nested layers of escaping (repr, JSON) a secret is recognised through
ESCAPE_DEPTH = 3

_registered: set[str] = set()


def register_secrets(values: Iterable[str | None]) -> None:
    """Mask these values too (a worker registers its settings' secrets at start)."""
    _registered.update(v for v in values if v and len(v) >= MIN_SECRET_LEN)


def secrets() -> list[str]:
    """Every value to mask, longest first (so a secret that contains another is masked whole).

    Each secret is masked as written and as escaped by the usual layers a message goes through,
    nested up to :data:`ESCAPE_DEPTH` deep: ``repr`` (either quote style: a message quoting a
    secret with ``!r`` inside an exception logged with ``%r`` escapes it twice) and JSON.
    """
    values = set(_registered)
    values.update(v for name in _SECRET_ENV if len(v := os.environ.get(name, "")) >= MIN_SECRET_LEN)
    spellings = set(values)
    layer = set(values)
    for _ in range(ESCAPE_DEPTH):
        layer = {e for v in layer for e in _escaped(v)} - spellings
        spellings |= layer
    return sorted(spellings, key=len, reverse=True)


def _escaped(value: str) -> tuple[str, ...]:
    """``value`` as it appears inside a ``repr`` (both quote styles) and inside JSON."""
    both = repr(value + "'\"")[1:-4]  # the quote style repr picks when both quotes occur
    return repr(value)[1:-1], both, orjson.dumps(value).decode()[1:-1]


def mask(text: str, values: list[str] | None = None) -> str:
    """``text`` with every secret replaced by ``***``."""
    for s in secrets() if values is None else values:
        if s in text:
            text = text.replace(s, MASK)
    return text


class RedactingFilter(logging.Filter):
    """Masks secrets in a record's message and traceback for any handler it is attached to.

    The formatters below mask their whole output as well; this filter also covers handlers a
    user adds to the ``headrace`` loggers with formatters of their own.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        values = secrets()
        if not values:
            return True
        message = record.getMessage()
        masked = mask(message, values)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_text is None:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask(record.exc_text, values)
        if record.stack_info:
            record.stack_info = mask(record.stack_info, values)
        return True


class TextFormatter(logging.Formatter):
    """``time level logger message``, the traceback on the lines after it, all masked."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return mask(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, pid, exception (the traceback) and
    any ``extra`` fields; every string masked before it is escaped."""

    def format(self, record: logging.LogRecord) -> str:
        values = secrets()
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
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if values:
            out = {k: _masked(v, values) for k, v in out.items()}
        return orjson.dumps(out, default=str).decode()


def _masked(value: Any, values: list[str]) -> Any:
    """``value`` with secrets masked in every string it holds, its structure kept."""
    if isinstance(value, str):
        return mask(value, values)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {mask(str(k), values): _masked(v, values) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_masked(v, values) for v in value]
    return mask(str(value), values)


def setup_logging(level: str, fmt: str = "text") -> None:
    """Root logging for the CLI: ``fmt`` is ``text`` or ``json``."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
