"""The error policy of a task: what happens to a record that fails on the per-record path.

``fail`` raises :class:`~headrace.runtime.task.records.RecordError` naming topic, partition,
offset and key (the worker stops; nothing past the record is committed). ``skip`` counts the
record and goes on. ``dead_letter`` appends the record, as it came, to ``<job>.dlq`` with
``hr.error.kind/topic/partition/offset/message`` headers; the message is masked for secrets,
because it leaves the process. Nothing is dropped silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from headrace.operators.job import ErrorPolicy
from headrace.runtime.kafka.producer import OutRecord
from headrace.runtime.logs import mask
from headrace.runtime.task.records import FAILED, RawRecord, RecordError, TaskCounters

log = logging.getLogger("headrace.runtime.task")


class RecordErrors:
    """Applies one task's error policy; outputs go to the task's output list."""

    __slots__ = ("counters", "dead_letter_topic", "out", "policy")

    def __init__(
        self,
        policy: ErrorPolicy,
        dead_letter_topic: str,
        counters: TaskCounters,
        out: list[OutRecord],
    ) -> None:
        self.policy = policy
        self.dead_letter_topic = dead_letter_topic
        self.counters = counters
        self.out = out

    def deserialize_failed(
        self,
        r: RawRecord,
        exc: Exception,
        fast: Callable[[Any], Any],
        serde_fn: Callable[[Any], Any],
        data: Any,
    ) -> Any:
        """A deserializer raised on the per-record path: the value, or FAILED once the error
        policy has dealt with the record. If it was a faster variant of the serde's function,
        the serde's own function decides (it accepts more input types, and its error is the
        one reported); a user's serde is never called twice."""
        if fast is not serde_fn:
            try:
                return serde_fn(data)
            except Exception as real:
                exc = real
        self.on_error(r, "deserialization", exc)
        return FAILED

    def on_error(self, r: RawRecord, kind: str, exc: Exception) -> None:
        policy = self.policy
        if policy is ErrorPolicy.FAIL:
            raise RecordError(r, kind, exc) from exc
        where = f"topic {r.topic!r} partition {r.partition} offset {r.offset}"
        if policy is ErrorPolicy.SKIP:
            self.counters.skipped += 1
            log.warning("skipped record at %s after %s error: %r", where, kind, exc)
            return
        self.counters.dead_lettered += 1
        headers = [
            ("hr.error.kind", kind.encode()),
            ("hr.error.topic", r.topic.encode()),
            ("hr.error.partition", b"%d" % r.partition),
            ("hr.error.offset", b"%d" % r.offset),
            # masked: an error message can quote a secret, and this header leaves the process
            ("hr.error.message", mask(f"{type(exc).__name__}: {exc}")[:1000].encode()),
        ]
        self.out.append((self.dead_letter_topic, None, r.key, r.value, headers, None))
        log.warning("dead-lettered record at %s after %s error: %r", where, kind, exc)
