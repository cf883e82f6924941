"""The record an operator sees.

A plain slotted dataclass (the aiokafka style): cheap to build once per input record, typed,
and carrying where it came from so that errors can name topic, partition and offset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


@dataclass(slots=True)
class Record(Generic[K, V]):
    """One input record, deserialized with the stage's key and value serde."""

    key: K
    value: V
    topic: str = ""
    partition: int = 0
    offset: int = -1
    timestamp: int = -1
    headers: tuple[tuple[str, bytes], ...] = field(default=())

    def where(self) -> str:
        """Human-readable origin, used in every error about this record."""
        return f"topic {self.topic!r} partition {self.partition} offset {self.offset}"


def describe_key(key: Any) -> str:
    """A short, safe rendering of a key for error messages (never the whole value)."""
    text = repr(key)
    return text if len(text) <= 80 else text[:77] + "..."
