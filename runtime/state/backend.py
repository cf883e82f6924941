"""The byte-level state backend protocol and its factory.

Backends know nothing about operators, serdes or keys' structure: bytes in, bytes out, with
ordered prefix scans. Everything typed lives above them in :mod:`headrace.runtime.state.store`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

__all__ = ["BACKEND_KINDS", "StateBackend", "open_backend"]

BACKEND_KINDS = ("memory", "rocksdb")


@runtime_checkable
class StateBackend(Protocol):
    """Byte-level key/value storage owned by one task.

    Not thread-safe: a task is driven by one coroutine at a time.
    """

    def get(self, key: bytes) -> bytes | None:
        """The value under ``key``, or ``None``."""
        ...

    def put(self, key: bytes, value: bytes) -> None:
        """Insert or overwrite."""
        ...

    def delete(self, key: bytes) -> None:
        """Remove ``key`` (no error if absent)."""
        ...

    def range_scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Entries whose key starts with ``prefix``, in byte order of the key.

        The result reflects the content when the scan starts; writing to the backend while
        iterating is allowed and does not affect the iteration.
        """
        ...

    def write_batch(self, changes: Iterable[tuple[bytes, bytes | None]]) -> None:
        """Apply puts (``value`` bytes) and deletes (``None``) atomically, in order."""
        ...

    def write_columns(self, keys: list[bytes], values: list[bytes | None]) -> None:
        """:meth:`write_batch` for a bulk load given as two parallel lists (changelog restore).

        Atomic and in order like :meth:`write_batch`, but *trusted*: the caller guarantees
        that every key is ``bytes`` and every value ``bytes`` or ``None`` (a delete), so nothing
        is validated per item.
        """
        ...

    def delete_prefix(self, prefix: bytes) -> None:
        """Remove every key starting with ``prefix`` (atomically)."""
        ...

    def checkpoint(self, checkpoint_id: int) -> bytes:
        """A self-validating snapshot of the whole content (see :mod:`.snapshot`)."""
        ...

    def restore(self, snapshot: bytes) -> None:
        """Replace the whole content with ``snapshot``.

        The snapshot is decoded and validated completely before anything is touched; on any
        error the backend is unchanged, and the replacement itself is atomic.
        """
        ...

    def size_bytes(self) -> int:
        """Approximate footprint of the data (keys + values; RocksDB: live data estimate)."""
        ...

    def key_count(self) -> int:
        """Number of keys (exact for memory; RocksDB's estimate otherwise)."""
        ...

    def clear(self) -> None:
        """Remove everything."""
        ...

    def close(self) -> None:
        """Release resources; the backend must not be used afterwards. Idempotent."""
        ...


def open_backend(kind: str, path: Path | None = None) -> StateBackend:
    """Open a backend: ``"memory"`` (``path`` ignored) or ``"rocksdb"`` (``path`` required:
    the task's own directory; it is created if missing and reopened if it exists)."""
    if kind == "memory":
        from headrace.runtime.state.memory import MemoryBackend

        return MemoryBackend()
    if kind == "rocksdb":
        if path is None:
            raise ValueError("the rocksdb state backend needs a directory (path=...)")
        from headrace.runtime.state.rocksdb import RocksDBBackend

        return RocksDBBackend(path)
    raise ValueError(f"unknown state backend {kind!r}; expected one of {BACKEND_KINDS}")
