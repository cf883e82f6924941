"""In-memory backend: a dict for point access plus a lazily maintained sorted key list.

Why this structure: ``get``/``put``/``delete`` must be O(1) (they are the restore and
cache-miss paths), while ``range_scan`` must not walk every key (the seed's did). A sorted
list with ``bisect`` gives O(log n + k) scans; keeping it sorted on every insert would cost an
O(n) memmove per new key. So writes only record *pending* additions and removals (O(1) set
operations) and the list is brought up to date at the next scan:

- few pending changes (the common case: scans between small checkpoints): each is applied
  with ``bisect`` + list insert/delete (a memmove of pointers, microseconds for 1M keys);
- many (bulk restore, big checkpoint): the list is rebuilt by filtering removals and sorting
  the old sorted run + the sorted additions. Timsort detects the two runs and merges them in
  linear time, so a rebuild is O(n + a log a), not O(n log n).

A scan then bisects to the prefix range and copies those keys (not the whole map), which also
makes the result immune to writes made while the caller iterates.

Bulk loads (:meth:`MemoryBackend.write_columns`, the changelog restore) into a backend that has
nothing sorted yet skip even that per-key bookkeeping: the pairs go into the dict with one
``dict.update`` (a C loop), the next scan sorts the keys of the dict (what sorting the pending
additions would have cost anyway, since every key is one), and :meth:`size_bytes` recounts the
bytes once when asked. A checkpoint's changes into sorted keys are patched in, unless the
pending additions since the last scan outgrow a quarter of the sorted keys: then the backend
drops the bookkeeping and the next scan sorts (see :meth:`MemoryBackend.write_columns`).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator
from itertools import compress, repeat
from operator import is_, is_not
from typing import cast

from headrace.runtime.state.keys import prefix_successor
from headrace.runtime.state.snapshot import decode_snapshot, encode_snapshot

__all__ = ["MemoryBackend"]

# Above this many pending changes the sorted list is rebuilt instead of patched.
_PATCH_LIMIT = 256


class MemoryBackend:
    """A :class:`~headrace.runtime.state.backend.StateBackend` held in process memory."""

    __slots__ = (
        "_added",
        "_closed",
        "_data",
        "_rebuild",
        "_removed",
        "_size",
        "_size_known",
        "_sorted",
    )

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._sorted: list[bytes] = []  # sorted keys as of the last sync
        self._added: set[bytes] = set()  # in _data, not yet in _sorted
        self._removed: set[bytes] = set()  # in _sorted, no longer in _data
        self._size = 0  # sum of len(key) + len(value), when _size_known
        self._size_known = True
        # True: _sorted, _added and _removed are void; the next scan sorts the keys of _data
        self._rebuild = False
        self._closed = False

    # -- point operations ---------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        data = self._data
        old = data.get(key)
        if old is None:
            self._size += len(key) + len(value)
            if key in self._removed:
                self._removed.discard(key)  # still present in _sorted
            else:
                self._added.add(key)
        else:
            self._size += len(value) - len(old)
        data[key] = value

    def delete(self, key: bytes) -> None:
        old = self._data.pop(key, None)
        if old is None:
            return
        self._size -= len(key) + len(old)
        if key in self._added:
            self._added.discard(key)
        else:
            self._removed.add(key)

    def write_batch(self, changes: Iterable[tuple[bytes, bytes | None]]) -> None:
        # Materialise first: if the iterable raises halfway, nothing has been applied.
        batch = list(changes)
        for key, value in batch:
            if not isinstance(key, bytes) or not (value is None or isinstance(value, bytes)):
                raise TypeError("write_batch takes (bytes, bytes | None) pairs")
        put = self.put
        delete = self.delete
        for key, value in batch:
            if value is None:
                delete(key)
            else:
                put(key, value)

    def write_columns(self, keys: list[bytes], values: list[bytes | None]) -> None:
        # Trusted input (see StateBackend.write_columns): nothing below can fail halfway, so
        # the batch is atomic without materialising or validating anything.
        if self._sorted and not self._rebuild:
            # Keys were sorted by an earlier scan: keep them patchable (a checkpoint's changes).
            self._patch_columns(keys, values)
            if len(self._added) + len(self._removed) <= max(_PATCH_LIMIT, len(self._sorted) >> 2):
                return
            # Pending work comparable to the sorted keys: the next scan's merge would cost
            # about what sorting the dict's keys does, so stop the bookkeeping until then.
            # Amortised: a store scanned between its checkpoints (eviction, TTL) keeps few
            # pending keys and stays patchable; one that is rarely scanned (S6: one scan, at
            # its first map load, then millions of new keys) writes at dict.update speed.
            self._rebuild = True
            self._sorted = []  # (not kept until then: it would hold deleted keys' bytes)
            self._added.clear()
            self._removed.clear()
            return
        # Nothing sorted to keep up to date (a restore into an empty store): no per-key
        # bookkeeping. The next scan sorts the dict's keys; size_bytes() recounts.
        self._rebuild = True
        self._size_known = False
        self._added.clear()
        self._removed.clear()
        data = self._data
        if all(values) or None not in values:  # all(): a cheaper pass, fooled only by b""
            data.update(zip(keys, cast("list[bytes]", values), strict=True))
            return
        # Runs of puts between the deletes, in order (a key may be put, deleted, put again).
        pop = data.pop
        find = values.index
        end = len(values)
        start = 0
        while start < end:
            try:
                stop = find(None, start)
            except ValueError:
                stop = end
            if stop > start:
                data.update(
                    zip(keys[start:stop], cast("list[bytes]", values[start:stop]), strict=True)
                )
            if stop < end:
                pop(keys[stop], None)
            start = stop + 1

    def _patch_columns(self, keys: list[bytes], values: list[bytes | None]) -> None:
        """:meth:`write_columns` into a backend whose sorted keys must be kept patchable.

        What :meth:`put` and :meth:`delete` do per key, done per batch with C loops (set
        operations, ``map``, ``dict.update``): a checkpoint of a job with millions of keys
        writes a million changes a second, and a Python call per change was ~8 % of such a
        job's CPU (bench/README.md, issue 18). Order matters only for a key that occurs twice;
        such a batch (never one from a checkpoint: one change per key) goes key by key.
        """
        if len(keys) != len(values):
            raise ValueError("write_columns: keys and values differ in length")
        unique = set(keys)
        if len(unique) != len(keys):
            put, delete = self.put, self.delete
            for key, value in zip(keys, values, strict=True):
                if value is None:
                    delete(key)
                else:
                    put(key, value)
            return
        data = self._data
        if None in values:
            deletes = list(compress(keys, map(is_, values, repeat(None))))
            keep = list(map(is_not, values, repeat(None)))
            keys = list(compress(keys, keep))
            values = list(compress(values, keep))
            unique.difference_update(deletes)
            delete = self.delete
            for key in deletes:
                delete(key)
        put_values = cast("list[bytes]", values)
        new = unique.difference(data)  # C: set minus dict keys
        # The byte size is recounted when asked (size_bytes): keeping it exact cost two more
        # passes of dict lookups per checkpoint for a figure nothing reads on the hot path.
        self._size_known = False
        removed = self._removed
        if removed and new:
            back = new & removed  # deleted since the last scan, still in the sorted keys
            removed -= back
            new -= back
        self._added |= new
        data.update(zip(keys, put_values, strict=True))

    # -- scans --------------------------------------------------------------------------------

    def _sync(self) -> list[bytes]:
        added, removed, keys = self._added, self._removed, self._sorted
        if self._rebuild:
            keys = self._sorted = sorted(self._data)
            added.clear()
            removed.clear()
            self._rebuild = False
            return keys
        if not added and not removed:
            return keys
        if len(added) + len(removed) <= _PATCH_LIMIT:
            for key in removed:
                del keys[bisect_left(keys, key)]
            for key in added:
                keys.insert(bisect_left(keys, key), key)
        else:
            if removed:
                keys = [k for k in keys if k not in removed]
            keys.extend(sorted(added))
            keys.sort()  # two sorted runs: a linear merge
            self._sorted = keys
        added.clear()
        removed.clear()
        return keys

    def range_scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        keys = self._sync()
        lo = bisect_left(keys, prefix)
        end = prefix_successor(prefix)
        hi = len(keys) if end is None else bisect_left(keys, end, lo)
        data = self._data
        return iter([(k, data[k]) for k in keys[lo:hi]])

    def delete_prefix(self, prefix: bytes) -> None:
        self.write_batch([(k, None) for k, _ in self.range_scan(prefix)])

    # -- snapshots ----------------------------------------------------------------------------

    def checkpoint(self, checkpoint_id: int) -> bytes:
        data = self._data
        return encode_snapshot(checkpoint_id, ((k, data[k]) for k in self._sync()))

    def restore(self, snapshot: bytes) -> None:
        _, entries = decode_snapshot(snapshot)  # raises before anything is touched
        data = dict(entries)
        self._data = data
        self._sorted = sorted(data)
        self._added = set()
        self._removed = set()
        self._rebuild = False
        self._size = sum(len(k) + len(v) for k, v in data.items())
        self._size_known = True

    # -- housekeeping -------------------------------------------------------------------------

    def size_bytes(self) -> int:
        if not self._size_known:  # after a bulk load; put/delete meanwhile do not matter
            data = self._data
            self._size = sum(map(len, data)) + sum(map(len, data.values()))
            self._size_known = True
        return self._size

    def key_count(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        self._data = {}
        self._sorted = []
        self._added = set()
        self._removed = set()
        self._rebuild = False
        self._size = 0
        self._size_known = True

    def close(self) -> None:
        self._closed = True
