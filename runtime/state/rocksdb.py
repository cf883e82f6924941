"""RocksDB backend (``rocksdict``): one directory per task, survives process restarts.

Opened in ``raw_mode`` so keys and values are plain bytes and RocksDB's own byte-wise
comparator gives exactly the ordering the storage keys were designed for.

Durability: writes go through the WAL (not fsync'd per write). That is enough because the
local store is a cache of the changelog: the store writes each checkpoint together with the
changelog offset it corresponds to in ONE write batch, so after any crash the directory holds
some consistent checkpoint and its offset, and the tail is replayed from the changelog.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from operator import itemgetter
from pathlib import Path
from typing import cast

from rocksdict import DbClosedError, Options, Rdict, WriteBatch

from headrace.runtime.state.keys import prefix_successor
from headrace.runtime.state.snapshot import decode_snapshot, encode_snapshot

__all__ = ["RocksDBBackend"]

_SORT_FROM = 256  # write_columns batches at least this long are written in key order


class RocksDBBackend:
    """A :class:`~headrace.runtime.state.backend.StateBackend` on a local RocksDB directory."""

    __slots__ = ("_db", "_path", "_scans")

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._path.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        self._db: Rdict | None = Rdict(str(self._path), options)
        self._scans: weakref.WeakSet[Generator[tuple[bytes, bytes], None, None]] = weakref.WeakSet()

    @property
    def path(self) -> Path:
        """The task's directory."""
        return self._path

    @property
    def db(self) -> Rdict:
        """The open database; raises once closed (never silently reopens)."""
        db = self._db
        if db is None:
            raise DbClosedError(f"rocksdb state backend at {self._path} is closed")
        return db

    # -- point operations ---------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        value = self.db.get(key)
        assert value is None or isinstance(value, bytes)
        return value

    def put(self, key: bytes, value: bytes) -> None:
        self.db.put(key, value)

    def delete(self, key: bytes) -> None:
        self.db.delete(key)

    def write_batch(self, changes: Iterable[tuple[bytes, bytes | None]]) -> None:
        batch = WriteBatch(raw_mode=True)
        for key, value in changes:
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        # Only now does anything reach the database: one atomic write.
        self.db.write(batch)

    def write_columns(self, keys: list[bytes], values: list[bytes | None]) -> None:
        # Trusted input (see StateBackend.write_columns). The WriteBatch is filled by C loops
        # (map over its bound put) and reaches the database in one atomic write.
        batch = WriteBatch(raw_mode=True)
        put = batch.put
        if all(values) or None not in values:  # all(): a cheaper pass, fooled only by b""
            if len(keys) >= _SORT_FROM:
                # In key order: RocksDB inserts each key into its memtable skiplist, and keys
                # in random order (hashed words, user ids) cost a cache miss per level, ~2x
                # the time of inserting them sorted. A stable sort keeps repeated keys' order.
                pick = itemgetter(*sorted(range(len(keys)), key=keys.__getitem__))
                deque(map(put, pick(keys), pick(values)), maxlen=0)
            else:
                deque(map(put, keys, values), maxlen=0)
        else:
            delete = batch.delete
            for key, value in zip(keys, values, strict=True):
                if value is None:
                    delete(key)
                else:
                    put(key, value)
        self.db.write(batch)

    # -- scans --------------------------------------------------------------------------------

    def range_scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        scan = self._scan(prefix)
        self._scans.add(scan)
        return scan

    def _scan(self, prefix: bytes) -> Generator[tuple[bytes, bytes], None, None]:
        # The iterator pins an implicit RocksDB snapshot, so concurrent writes do not show up.
        # It also keeps the database open (and its LOCK file held) for as long as it lives,
        # which is why close() closes every scan still alive first.
        items = cast(Iterator[tuple[bytes, bytes]], self.db.items(from_key=prefix))
        for key, value in items:
            if not key.startswith(prefix):
                return
            yield key, value

    def delete_prefix(self, prefix: bytes) -> None:
        end = prefix_successor(prefix)
        if end is None:  # empty or all-0xff prefix: no finite upper bound
            end = self._end_bound()
            if end is None:
                return
        batch = WriteBatch(raw_mode=True)
        batch.delete_range(prefix, end)
        self.db.write(batch)

    def _end_bound(self) -> bytes | None:
        """A key greater than every stored key (the last key + 0x00), or None if empty."""
        it = self.db.iter()
        it.seek_to_last()
        if not it.valid():
            return None
        last = it.key()
        assert isinstance(last, bytes)
        return last + b"\x00"

    # -- snapshots ----------------------------------------------------------------------------

    def checkpoint(self, checkpoint_id: int) -> bytes:
        items = cast(Iterator[tuple[bytes, bytes]], self.db.items())
        return encode_snapshot(checkpoint_id, items)

    def restore(self, snapshot: bytes) -> None:
        _, entries = decode_snapshot(snapshot)  # raises before anything is touched
        batch = WriteBatch(raw_mode=True)
        end = self._end_bound()
        if end is not None:
            batch.delete_range(b"", end)
        for key, value in entries:
            batch.put(key, value)
        # Deleting everything and writing the snapshot is one atomic batch: a crash leaves
        # either the old content or the new, never a mix.
        self.db.write(batch)

    # -- housekeeping -------------------------------------------------------------------------

    def size_bytes(self) -> int:
        db = self.db
        live = db.property_int_value("rocksdb.estimate-live-data-size") or 0
        mem = db.property_int_value("rocksdb.cur-size-all-mem-tables") or 0
        return live + mem

    def key_count(self) -> int:
        return self.db.property_int_value("rocksdb.estimate-num-keys") or 0

    def clear(self) -> None:
        self.delete_prefix(b"")

    def flush(self) -> None:
        """Flush memtables to SST files (benchmarks and tests measuring disk use)."""
        self.db.flush()

    def compact(self) -> None:
        """Compact the whole key range (drops tombstones; makes key_count exact)."""
        self.db.compact_range(None, None)

    def close(self) -> None:
        # An abandoned, half-consumed scan would keep RocksDB's LOCK held after close(), and
        # reopening the directory (the task coming back to this worker) would then fail.
        for scan in list(self._scans):
            with contextlib.suppress(ValueError):  # a scan closing us from inside its loop
                scan.close()
        db, self._db = self._db, None
        if db is not None:
            db.close()
