"""State with explicit keys: keyed state (one value per key) and map state (one storage entry
per map key, so a map grows without being rewritten)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from operator import itemgetter
from typing import Any

from headrace.operators.serde import Serde, SerdeError
from headrace.operators.state import (
    KeyedState,
    KeyedStateDescriptor,
    MapState,
    MapStateDescriptor,
    StateKind,
)
from headrace.runtime.state.encoding import (
    MAP_TAG,
    expiry_of,
    fast_serde_function,
    payload,
    with_expiry,
)
from headrace.runtime.state.handles.base import (
    _ABSENT,
    _MISS,
    BoundState,
    Change,
    StoreView,
    _Expiring,
    _ScalarState,
    serialize_fast_first,
)


class KeyedHandle(_ScalarState, KeyedState[Any, Any]):
    """Explicit-key state; cached by key object, key bytes computed only at checkpoints."""

    __slots__ = ("_key_serde",)
    kind = StateKind.KEYED
    _scoped = False

    def __init__(self, store: StoreView, descriptor: KeyedStateDescriptor[Any, Any]) -> None:
        super().__init__(store, descriptor)
        self._key_serde: Serde[Any] = descriptor.key_serde

    def _ukb(self, uk: Any) -> bytes:
        try:
            data = self._key_serde.serialize(uk)
        except Exception as exc:
            raise SerdeError(
                self._what, uk, f"cannot serialize key with serde '{self._key_serde.name}': {exc}"
            ) from exc
        return data

    def _uk_from_bytes(self, ukb: bytes) -> Any:
        try:
            return self._key_serde.deserialize(ukb)
        except Exception as exc:
            raise SerdeError(
                self._what,
                ukb,
                f"cannot deserialize key with serde '{self._key_serde.name}': {exc}",
            ) from exc

    def get(self, key: Any) -> Any:
        value = self._get(key)
        return self._default() if value is _ABSENT else value

    def put(self, key: Any, value: Any) -> None:
        if value is None:
            self._remove(key)
        else:
            self._set(key, value)

    def delete(self, key: Any) -> None:
        self._remove(key)

    def update(self, key: Any, fn: Callable[[Any], Any]) -> Any:
        current = self._get(key)
        new = fn(self._default() if current is _ABSENT else current)
        self.put(key, new)
        return new

    def items(self) -> Iterator[tuple[Any, Any]]:
        # Cached entries first (they are newer than storage), then stored entries that are not
        # cached. A snapshot of the cache keeps this correct if the caller writes meanwhile.
        cached = dict(self._cache)
        for key in list(cached):
            value = self._get(key)
            if value is not _ABSENT:
                yield key, value
        skip = len(self._prefix) + 4
        for skey, raw in self._store.backend.range_scan(self._prefix):
            key = self._uk_from_bytes(skey[skip:])
            if key in cached:
                continue
            if key in self._cache:  # cached while we were iterating: the cache is newer
                live = self._get(key)
                if live is not _ABSENT:
                    yield key, live
                continue
            value = self._decode(raw, key)
            if value is _ABSENT:  # expired: becomes a delete
                self._remove(key)
                continue
            yield key, (value if self._ttl is None else value.value)

    def keys(self) -> Iterator[Any]:
        return (key for key, _ in self.items())


class MapHandle(BoundState, MapState[Any, Any]):
    """MapState: the whole map of a record key is loaded on first touch (one prefix scan)
    and cached as a dict; each map entry is its own storage entry, so a growing map only
    writes the entries that changed."""

    __slots__ = ("_complete", "_key_serde")
    kind = StateKind.MAP

    _cache: dict[bytes, dict[Any, Any]]
    # The dirty map entries: record key bytes -> the one map key written since the last
    # checkpoint, or a set of them once there are two. A set per record key (what this was)
    # lives until the checkpoint, so a job that writes one entry each for many keys per
    # interval (S6: a new set per user per checkpoint) makes the collector promote thousands
    # of containers to its older generations every interval and walk them there.
    _dirty: dict[bytes, Any]

    def __init__(self, store: StoreView, descriptor: MapStateDescriptor[Any, Any]) -> None:
        super().__init__(store, descriptor)
        self._key_serde: Serde[Any] = descriptor.key_serde
        self._cache = {}
        self._dirty = {}
        # Whether every map of this state that the backend holds is cached too: True when
        # the state was empty in the backend at its first load and nothing was evicted since
        # (everything in the backend then came from this cache's checkpoints). A record key
        # whose map is not cached then has none, and its first touch costs no prefix scan:
        # a job that meets a new key per record (a new user, a new session) scanned the
        # backend once per key, and the memory backend re-sorted its keys for the first scan
        # after every checkpoint (~5 % of S6's CPU, bench/README.md). None: not known yet
        # (decided at the next load: after a restore the backend holds what was restored).
        self._complete: bool | None = None

    def invalidate(self) -> None:
        super().invalidate()
        self._complete = None

    def evict(self, count: int) -> None:
        cached = len(self._cache)
        super().evict(count)
        if len(self._cache) < cached:
            self._complete = False  # evicted maps live in the backend only

    def dirty_count(self) -> int:
        return sum(len(mk) if mk.__class__ is set else 1 for mk in self._dirty.values())

    def _touch(self, uk: bytes, mk: Any) -> None:
        dirty = self._dirty
        marked = dirty.get(uk, _MISS)
        if marked is _MISS:
            dirty[uk] = mk
        elif marked.__class__ is set:
            marked.add(mk)
        elif marked != mk:
            dirty[uk] = {marked, mk}

    def _load_map(self, uk: bytes) -> dict[Any, Any]:
        complete = self._complete
        if complete is None:
            scan = self._store.backend.range_scan(self._prefix)
            complete = self._complete = next(iter(scan), None) is None
        if complete:
            entries: dict[Any, Any] = {}
            self._cache[uk] = entries
            return entries
        prefix = self._skey(uk)
        start = len(prefix) + 1
        kde = self._key_serde.deserialize
        de = self._serde.deserialize
        ttl = self._ttl
        now = self._clock() if ttl is not None else 0.0
        entries = {}
        expired = []
        for skey, raw in self._store.backend.range_scan(prefix):
            mkb = skey[start:]
            try:
                mk = kde(mkb)
            except Exception as exc:
                raise SerdeError(
                    self._what, (uk, mkb), f"cannot deserialize map key: {exc}"
                ) from exc
            try:
                if ttl is None:
                    entries[mk] = de(raw)
                else:
                    expires = expiry_of(raw)
                    if expires <= now:
                        expired.append(mk)
                    else:
                        entries[mk] = _Expiring(de(payload(raw, True)), expires)
            except Exception as exc:
                raise self._error((uk, mk), "deserialize map value", exc) from exc
        self._cache[uk] = entries
        for mk in expired:
            self._touch(uk, mk)
        return entries

    def _map(self) -> tuple[bytes, dict[Any, Any]]:
        uk = self._store.current_key
        entries = self._cache.get(uk)
        if entries is None:
            entries = self._load_map(uk)
        return uk, entries

    def _live(self) -> tuple[bytes, dict[Any, Any]]:
        """The current map with expired entries removed (and turned into deletes)."""
        uk, entries = self._map()
        if self._ttl is not None and entries:
            now = self._clock()
            for mk in [mk for mk, v in entries.items() if v.expires <= now]:
                del entries[mk]
                self._touch(uk, mk)
        return uk, entries

    # get and put are a user operator's per-record path: _map and _touch inlined.
    def get(self, key: Any, default: Any = None) -> Any:
        uk = self._store.current_key
        entries = self._cache.get(uk)
        if entries is None:
            entries = self._load_map(uk)
        value = entries.get(key, _MISS)
        if value is _MISS:
            return default
        if self._ttl is None:
            return value
        if value.expires <= self._clock():
            del entries[key]
            self._touch(uk, key)
            return default
        return value.value

    def put(self, key: Any, value: Any) -> None:
        uk = self._store.current_key
        entries = self._cache.get(uk)
        if entries is None:
            entries = self._load_map(uk)
        ttl = self._ttl
        entries[key] = value if ttl is None else _Expiring(value, self._clock() + ttl)
        dirty = self._dirty  # _touch, inlined
        marked = dirty.get(uk, _MISS)
        if marked is _MISS:
            dirty[uk] = key
        elif marked.__class__ is set:
            marked.add(key)
        elif marked != key:
            dirty[uk] = {marked, key}

    def remove(self, key: Any) -> None:
        uk, entries = self._map()
        if key in entries:
            del entries[key]
            self._touch(uk, key)

    def contains(self, key: Any) -> bool:
        return self.get(key, _MISS) is not _MISS

    def keys(self) -> Iterator[Any]:
        return iter(list(self._live()[1]))

    def values(self) -> Iterator[Any]:
        entries = self._live()[1]
        if self._ttl is None:
            return iter(list(entries.values()))
        return iter([v.value for v in entries.values()])

    def items(self) -> Iterator[tuple[Any, Any]]:
        entries = self._live()[1]
        if self._ttl is None:
            return iter(list(entries.items()))
        return iter([(k, v.value) for k, v in entries.items()])

    def is_empty(self) -> bool:
        return not self._live()[1]

    def clear(self) -> None:
        uk, entries = self._map()
        for mk in entries:
            self._touch(uk, mk)
        entries.clear()

    # store hooks
    def changes(self, out: list[Change]) -> None:
        kser, ser = self._key_serde.serialize, self._serde.serialize
        fast = (fast_serde_function(kser), fast_serde_function(ser))
        serialize_fast_first(out, self._serialize_dirty, (kser, ser), fast)
        self._dirty.clear()

    def _serialize_dirty(
        self, out: list[Change], kser: Callable[[Any], bytes], ser: Callable[[Any], bytes]
    ) -> None:
        cache = self._cache
        ttl = self._ttl
        uk: bytes = b""
        mk: Any = None
        dirty = list(self._dirty.items())
        written = list(map(itemgetter(0), dirty))
        maps = list(map(cache.pop, written))  # to the end (see evict), with
        cache.update(zip(written, maps, strict=True))  # C loops, same order
        skey = self._skey
        try:
            for (uk, marked), entries in zip(dirty, maps, strict=True):
                base = skey(uk) + MAP_TAG
                for mk in marked if marked.__class__ is set else (marked,):
                    value = entries.get(mk, _MISS)
                    key = base + kser(mk)
                    if value is _MISS:
                        out.append((key, None))
                    elif ttl is None:
                        out.append((key, ser(value)))
                    else:
                        out.append((key, with_expiry(value.expires, ser(value.value))))
        except Exception as exc:
            raise self._error((uk, mk), "serialize map entry", exc) from exc

    def decode_entry(self, user_key: bytes, map_key: bytes | None, raw: bytes) -> tuple[Any, Any]:
        try:
            mk = None if map_key is None else self._key_serde.deserialize(map_key)
            return mk, self._serde.deserialize(payload(raw, self._ttl is not None))
        except Exception as exc:
            raise self._error((user_key, map_key), "deserialize stored map entry", exc) from exc

    def mark(self, user_key: bytes, map_key: bytes | None) -> bool:
        if map_key is None or user_key not in self._cache:
            return False
        try:
            mk = self._key_serde.deserialize(map_key)
        except Exception:
            return False
        self._touch(user_key, mk)
        return True
