"""Handle implementations: typed state over a per-state write-back cache.

Each bound state is one handle object that owns its slice of the store's cache:

- ``_cache``: user key -> Python object (or ``_ABSENT`` = known not to exist, so a missing key
  costs one backend read, not one per record). Scoped states key it by the raw record-key
  bytes the runtime puts in ``store.current_key``, so the per-record path is one dict lookup
  with no encoding. ``KeyedState`` keys it by the user's key objects.
- ``_dirty``: which cache entries changed since the last checkpoint. Serialization happens
  only in ``_changes`` (once per dirty key per checkpoint), never per record.

TTL states wrap cached values in :class:`_Expiring` and store ``expires_at`` (a big-endian
double, seconds on the store's clock) in front of the serde bytes. Expiry is checked when a
value is read; an expired value reads as the default and becomes a delete at the next
checkpoint. TTL is refreshed on every write (Flink's ``OnCreateAndWrite``); for a list the
whole list shares one expiry, for a map each entry has its own.

Value encodings (format version 1, recorded in the state metadata):
value/reducing/keyed: the serde bytes; aggregating: the accumulator serde bytes; list:
``u32 count`` then ``count x (u32 length, element serde bytes)``; map: one storage entry per map
key with the value serde bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, Protocol

from headrace.operators.serde import Serde, SerdeError
from headrace.operators.state import (
    AggregatingState,
    AggregatingStateDescriptor,
    KeyedState,
    KeyedStateDescriptor,
    ListState,
    ListStateDescriptor,
    MapState,
    MapStateDescriptor,
    ReducingState,
    ReducingStateDescriptor,
    StateDescriptor,
    StateKind,
    ValueState,
    ValueStateDescriptor,
)
from headrace.runtime.state.backend import StateBackend
from headrace.runtime.state.keys import StatePartitionKey, state_prefix

__all__ = [
    "ABSENT",
    "MISS",
    "AggregatingHandle",
    "BoundState",
    "KeyedHandle",
    "ListHandle",
    "MapHandle",
    "ReducingHandle",
    "TtlValueHandle",
    "ValueHandle",
    "make_handle",
]

Change = tuple[bytes, bytes | None]

_U32 = struct.Struct(">I")
_F64 = struct.Struct(">d")
_MAP_TAG = b"\x01"


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


_MISS: Any = _Sentinel("<not cached>")
_ABSENT: Any = _Sentinel("<absent>")

#: The cache sentinels, for the runtime's compiled per-record steps of the built-in
#: aggregations (``headrace.runtime.task``), which read and write a handle's ``_cache``/``_dirty``
#: directly: ``_cache.get(key, MISS)`` is MISS when the key is not cached (``_load`` it) and
#: ABSENT when it is known not to exist. A handle never rebinds ``_cache`` or ``_dirty`` (they
#: are cleared and evicted in place), so holding them for the handle's lifetime is safe.
MISS: Any = _MISS
ABSENT: Any = _ABSENT


class _Expiring:
    """A cached value of a TTL state with its expiry (seconds on the store's clock)."""

    __slots__ = ("expires", "value")

    def __init__(self, value: Any, expires: float) -> None:
        self.value = value
        self.expires = expires


class StoreView(Protocol):
    """What handles need from :class:`~headrace.runtime.state.store.OperatorStateStore`."""

    current_key: bytes

    @property
    def backend(self) -> StateBackend: ...

    @property
    def partition_key(self) -> StatePartitionKey: ...

    @property
    def clock(self) -> Callable[[], float]: ...


class BoundState:
    """Common machinery of every bound state (not user-facing)."""

    __slots__ = (
        "_cache",
        "_clock",
        "_default",
        "_dirty",
        "_prefix",
        "_serde",
        "_store",
        "_ttl",
        "_what",
        "descriptor",
        "name",
    )
    kind: ClassVar[StateKind]

    _cache: dict[Any, Any]
    _dirty: Any

    def __init__(self, store: StoreView, descriptor: StateDescriptor[Any]) -> None:
        name = descriptor.state_name
        pk = store.partition_key
        self.descriptor = descriptor
        self.name = name
        self._store = store
        self._clock = store.clock
        self._ttl = descriptor.ttl
        self._serde: Serde[Any] = descriptor.serde
        self._default = descriptor.default_factory
        self._prefix = state_prefix(pk, name)
        self._what = f"state '{name}' of operator '{pk.operator_id}'"

    # -- storage helpers ----------------------------------------------------------------------

    def _skey(self, ukb: bytes) -> bytes:
        return self._prefix + _U32.pack(len(ukb)) + ukb

    def _error(self, key: object, action: str, exc: Exception) -> SerdeError:
        return SerdeError(
            self._what, key, f"cannot {action} with serde '{self._serde.name}': {exc}"
        )

    # -- store hooks --------------------------------------------------------------------------

    def changes(self, out: list[Change]) -> None:
        """Append (storage key, bytes | None) for every dirty entry and clear the marks."""
        raise NotImplementedError

    def mark(self, user_key: bytes, map_key: bytes | None) -> bool:
        """Mark a cached entry dirty (force_dirty); False if it is not cached."""
        raise NotImplementedError

    def decode_entry(self, user_key: bytes, map_key: bytes | None, raw: bytes) -> tuple[Any, Any]:
        """(map key, value) of a stored entry, for inspection (TTL envelope stripped, expiry
        not checked)."""
        raise NotImplementedError

    def dirty_count(self) -> int:
        return len(self._dirty)

    def cached_count(self) -> int:
        return len(self._cache)

    def evict(self, count: int) -> None:
        """Drop up to ``count`` clean cache entries, oldest-written first.

        Dicts keep insertion order and ``changes`` re-inserts each written key at the end, so
        iteration order is "least recently written first": hot keys survive.
        """
        if count <= 0:
            return
        dirty = self._dirty
        victims = []
        for key in self._cache:
            if key not in dirty:
                victims.append(key)
                if len(victims) >= count:
                    break
        cache = self._cache
        for key in victims:
            del cache[key]

    def invalidate(self) -> None:
        """Forget everything cached and every dirty mark (after a restore or reset)."""
        self._cache.clear()
        self._dirty.clear()


class _ScalarState(BoundState):
    """One stored value per user key (value, list, aggregating, reducing, keyed)."""

    __slots__ = ()

    def __init__(self, store: StoreView, descriptor: StateDescriptor[Any]) -> None:
        super().__init__(store, descriptor)
        self._cache = {}
        self._dirty = set()

    # subclass hooks: user key <-> bytes, value <-> bytes
    def _ukb(self, uk: Any) -> bytes:
        assert isinstance(uk, bytes)
        return uk

    def _uk_from_bytes(self, ukb: bytes) -> Any:
        return ukb

    def _to_bytes(self, value: Any) -> bytes:
        return self._serde.serialize(value)

    def _from_bytes(self, data: bytes) -> Any:
        return self._serde.deserialize(data)

    # cache access
    def _decode(self, raw: bytes, uk: Any) -> Any:
        """Stored bytes -> cached representation, or _ABSENT if expired."""
        try:
            if self._ttl is None:
                return self._from_bytes(raw)
            (expires,) = _F64.unpack_from(raw)
            if expires <= self._clock():
                return _ABSENT
            return _Expiring(self._from_bytes(raw[8:]), expires)
        except SerdeError:
            raise
        except Exception as exc:
            raise self._error(uk, f"deserialize {len(raw)} stored bytes", exc) from exc

    def _load(self, uk: Any) -> Any:
        raw = self._store.backend.get(self._skey(self._ukb(uk)))
        if raw is None:
            value = _ABSENT
        else:
            value = self._decode(raw, uk)
            if value is _ABSENT:  # expired in storage: delete it at the next checkpoint
                self._dirty.add(uk)
        self._cache[uk] = value
        return value

    def _get(self, uk: Any) -> Any:
        """The live value for ``uk`` or _ABSENT (TTL checked)."""
        value = self._cache.get(uk, _MISS)
        if value is _MISS:
            value = self._load(uk)
        if self._ttl is None or value is _ABSENT:
            return value
        if value.expires <= self._clock():
            self._cache[uk] = _ABSENT
            self._dirty.add(uk)
            return _ABSENT
        return value.value

    def _set(self, uk: Any, value: Any) -> None:
        ttl = self._ttl
        self._cache[uk] = value if ttl is None else _Expiring(value, self._clock() + ttl)
        self._dirty.add(uk)

    def _remove(self, uk: Any) -> None:
        self._cache[uk] = _ABSENT
        self._dirty.add(uk)

    # store hooks
    def changes(self, out: list[Change]) -> None:
        # Runs once per dirty key per checkpoint: locals instead of attribute/method lookups.
        cache = self._cache
        ttl = self._ttl
        prefix = self._prefix
        pack = _U32.pack
        scoped = not isinstance(self, KeyedHandle)  # scoped: the user key is already bytes
        ukb_of = self._ukb
        to_bytes: Callable[[Any], bytes] = self._to_bytes
        if type(self)._to_bytes is _ScalarState._to_bytes:
            to_bytes = self._serde.serialize
        uk: Any = None
        try:
            for uk in self._dirty:
                value = cache.pop(uk)
                cache[uk] = value  # move to the end: most recently written
                ukb = uk if scoped else ukb_of(uk)
                key = prefix + pack(len(ukb)) + ukb
                if value is _ABSENT:
                    out.append((key, None))
                elif ttl is None:
                    out.append((key, to_bytes(value)))
                else:
                    out.append((key, _F64.pack(value.expires) + to_bytes(value.value)))
        except SerdeError:
            raise
        except Exception as exc:
            raise self._error(uk, "serialize", exc) from exc
        self._dirty.clear()

    def decode_entry(self, user_key: bytes, map_key: bytes | None, raw: bytes) -> tuple[Any, Any]:
        try:
            return None, self._from_bytes(raw if self._ttl is None else raw[8:])
        except Exception as exc:
            raise self._error(user_key, "deserialize stored bytes", exc) from exc

    def mark(self, user_key: bytes, map_key: bytes | None) -> bool:
        if map_key is not None:
            return False
        uk = self._uk_from_bytes(user_key)
        if uk in self._cache:
            self._dirty.add(uk)
            return True
        return False


class ValueHandle(_ScalarState, ValueState[Any]):
    """ValueState without TTL: the benchmarked hot path, kept to one dict op per call."""

    __slots__ = ()
    kind = StateKind.VALUE

    def value(self) -> Any:
        key = self._store.current_key
        value = self._cache.get(key, _MISS)
        if value is _MISS:
            value = self._load(key)
        if value is _ABSENT:
            return self._default()
        return value

    def update(self, value: Any) -> None:
        key = self._store.current_key
        self._cache[key] = _ABSENT if value is None else value
        self._dirty.add(key)

    def clear(self) -> None:
        key = self._store.current_key
        self._cache[key] = _ABSENT
        self._dirty.add(key)


class TtlValueHandle(_ScalarState, ValueState[Any]):
    """ValueState with TTL."""

    __slots__ = ()
    kind = StateKind.VALUE

    def value(self) -> Any:
        value = self._get(self._store.current_key)
        return self._default() if value is _ABSENT else value

    def update(self, value: Any) -> None:
        key = self._store.current_key
        if value is None:
            self._remove(key)
        else:
            self._set(key, value)

    def clear(self) -> None:
        self._remove(self._store.current_key)


class ListHandle(_ScalarState, ListState[Any]):
    """ListState: the list of one key is one stored value (framed element serde bytes)."""

    __slots__ = ()
    kind = StateKind.LIST

    def _to_bytes(self, value: Any) -> bytes:
        ser = self._serde.serialize
        pack = _U32.pack
        parts = [pack(len(value))]
        for element in value:
            data = ser(element)
            parts.append(pack(len(data)))
            parts.append(data)
        return b"".join(parts)

    def _from_bytes(self, data: bytes) -> Any:
        de = self._serde.deserialize
        view = memoryview(data)
        (count,) = _U32.unpack_from(view, 0)
        pos = 4
        out = []
        for _ in range(count):
            (length,) = _U32.unpack_from(view, pos)
            pos += 4
            if pos + length > len(view):
                raise ValueError("list element runs past the end of the stored value")
            out.append(de(bytes(view[pos : pos + length])))
            pos += length
        if pos != len(view):
            raise ValueError(f"{len(view) - pos} trailing bytes after the list elements")
        return out

    def get(self) -> list[Any]:
        value = self._get(self._store.current_key)
        return [] if value is _ABSENT else list(value)

    def add(self, value: Any) -> None:
        key = self._store.current_key
        current = self._get(key)
        if current is _ABSENT:
            current = []
        current.append(value)
        self._set(key, current)

    def add_all(self, values: Iterable[Any]) -> None:
        new = list(values)
        if not new:
            return
        key = self._store.current_key
        current = self._get(key)
        if current is _ABSENT:
            current = []
        current.extend(new)
        self._set(key, current)

    def update(self, values: Iterable[Any]) -> None:
        key = self._store.current_key
        new = list(values)
        if new:
            self._set(key, new)
        else:
            self._remove(key)

    def clear(self) -> None:
        self._remove(self._store.current_key)


class AggregatingHandle(_ScalarState, AggregatingState[Any, Any]):
    """AggregatingState: stores the accumulator."""

    __slots__ = ("_fn",)
    kind = StateKind.AGGREGATING

    def __init__(self, store: StoreView, descriptor: AggregatingStateDescriptor[Any, Any, Any]):
        super().__init__(store, descriptor)
        self._fn = descriptor.aggregate_function

    def add(self, value: Any) -> None:
        key = self._store.current_key
        acc = self._get(key)
        if acc is _ABSENT:
            acc = self._fn.create_accumulator()
        self._set(key, self._fn.add(value, acc))

    def get(self) -> Any:
        acc = self._get(self._store.current_key)
        if acc is _ABSENT:
            acc = self._fn.create_accumulator()
        return self._fn.get_result(acc)

    def clear(self) -> None:
        self._remove(self._store.current_key)


class ReducingHandle(_ScalarState, ReducingState[Any]):
    """ReducingState: stores the reduced value."""

    __slots__ = ("_reduce",)
    kind = StateKind.REDUCING

    def __init__(self, store: StoreView, descriptor: ReducingStateDescriptor[Any]) -> None:
        super().__init__(store, descriptor)
        self._reduce = descriptor.reduce_fn

    def add(self, value: Any) -> None:
        key = self._store.current_key
        current = self._get(key)
        self._set(key, value if current is _ABSENT else self._reduce(current, value))

    def get(self) -> Any:
        current = self._get(self._store.current_key)
        return self._default() if current is _ABSENT else current

    def clear(self) -> None:
        self._remove(self._store.current_key)


class KeyedHandle(_ScalarState, KeyedState[Any, Any]):
    """Explicit-key state; cached by key object, key bytes computed only at checkpoints."""

    __slots__ = ("_key_serde",)
    kind = StateKind.KEYED

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

    __slots__ = ("_key_serde",)
    kind = StateKind.MAP

    _cache: dict[bytes, dict[Any, Any]]
    _dirty: dict[bytes, set[Any]]

    def __init__(self, store: StoreView, descriptor: MapStateDescriptor[Any, Any]) -> None:
        super().__init__(store, descriptor)
        self._key_serde: Serde[Any] = descriptor.key_serde
        self._cache = {}
        self._dirty = {}

    def dirty_count(self) -> int:
        return sum(len(keys) for keys in self._dirty.values())

    def _touch(self, uk: bytes, mk: Any) -> None:
        keys = self._dirty.get(uk)
        if keys is None:
            keys = self._dirty[uk] = set()
        keys.add(mk)

    def _load_map(self, uk: bytes) -> dict[Any, Any]:
        prefix = self._skey(uk)
        start = len(prefix) + 1
        kde = self._key_serde.deserialize
        de = self._serde.deserialize
        ttl = self._ttl
        now = self._clock() if ttl is not None else 0.0
        entries: dict[Any, Any] = {}
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
                    (expires,) = _F64.unpack_from(raw)
                    if expires <= now:
                        expired.append(mk)
                    else:
                        entries[mk] = _Expiring(de(raw[8:]), expires)
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

    def get(self, key: Any, default: Any = None) -> Any:
        uk, entries = self._map()
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
        uk, entries = self._map()
        ttl = self._ttl
        entries[key] = value if ttl is None else _Expiring(value, self._clock() + ttl)
        self._touch(uk, key)

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
        cache = self._cache
        kser = self._key_serde.serialize
        ser = self._serde.serialize
        ttl = self._ttl
        uk: bytes = b""
        mk: Any = None
        try:
            for uk, keys in self._dirty.items():
                entries = cache.pop(uk)
                cache[uk] = entries
                base = self._skey(uk) + _MAP_TAG
                for mk in keys:
                    value = entries.get(mk, _MISS)
                    skey = base + kser(mk)
                    if value is _MISS:
                        out.append((skey, None))
                    elif ttl is None:
                        out.append((skey, ser(value)))
                    else:
                        out.append((skey, _F64.pack(value.expires) + ser(value.value)))
        except Exception as exc:
            raise self._error((uk, mk), "serialize map entry", exc) from exc
        self._dirty.clear()

    def decode_entry(self, user_key: bytes, map_key: bytes | None, raw: bytes) -> tuple[Any, Any]:
        try:
            mk = None if map_key is None else self._key_serde.deserialize(map_key)
            return mk, self._serde.deserialize(raw if self._ttl is None else raw[8:])
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


def make_handle(store: StoreView, descriptor: StateDescriptor[Any]) -> BoundState:
    """The handle implementation for a descriptor."""
    if isinstance(descriptor, ValueStateDescriptor):
        if descriptor.ttl is not None:
            return TtlValueHandle(store, descriptor)
        return ValueHandle(store, descriptor)
    if isinstance(descriptor, ListStateDescriptor):
        return ListHandle(store, descriptor)
    if isinstance(descriptor, MapStateDescriptor):
        return MapHandle(store, descriptor)
    if isinstance(descriptor, AggregatingStateDescriptor):
        return AggregatingHandle(store, descriptor)
    if isinstance(descriptor, ReducingStateDescriptor):
        return ReducingHandle(store, descriptor)
    if isinstance(descriptor, KeyedStateDescriptor):
        return KeyedHandle(store, descriptor)
    raise TypeError(f"unsupported state descriptor {descriptor!r}")
