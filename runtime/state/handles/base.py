"""What every handle shares: the per-state write-back cache, dirty marks and store hooks."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, Protocol

from headrace.operators.serde import Serde, SerdeError
from headrace.operators.state import StateDescriptor, StateKind
from headrace.runtime.state.backend import StateBackend
from headrace.runtime.state.encoding import (
    U32,
    expiry_of,
    fast_serde_function,
    payload,
    with_expiry,
)
from headrace.runtime.state.keys import StatePartitionKey, state_prefix

Change = tuple[bytes, bytes | None]


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


_MISS: Any = _Sentinel("<not cached>")
_ABSENT: Any = _Sentinel("<absent>")

#: The cache sentinels, for the runtime's compiled per-record steps of the built-in
#: aggregations, which work on a handle's cache through its :class:`CachePort`.
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


class CachePort(NamedTuple):
    """A handle's write-back cache, for the runtime's compiled steps of the built-in
    aggregations (headrace.runtime.task.fusion), which do on it exactly what the handle's
    methods would: ``cache.get(key, MISS)`` is MISS when the key is not cached (``load`` it)
    and ABSENT when it is known not to exist; a write sets ``cache[key]`` and calls
    ``dirty_add(key)``. A handle never rebinds its cache or dirty set (they are cleared and
    evicted in place), so holding the port for the handle's lifetime is safe."""

    store: Any  #: the store the handle is bound to
    cache: dict[Any, Any]
    dirty_add: Callable[[Any], None]
    load: Callable[[Any], Any]
    default: Callable[[], Any]
    ttl: float | None


def serialize_fast_first(
    out: list[Change],
    serialize: Callable[..., None],
    exact: tuple[Callable[[Any], bytes], ...],
    fast: tuple[Callable[[Any], bytes], ...],
) -> None:
    """``serialize(out, *fast)`` with the C-level variants of the built-in serdes
    (:func:`~headrace.runtime.state.encoding.fast_serde_function`); where that raises, what it
    appended is taken back and ``serialize(out, *exact)`` runs: the serdes' own functions decide
    and name the error. A checkpoint serialises every dirty entry, so this is worth a pass."""
    if fast == exact:
        serialize(out, *exact)
        return
    mark = len(out)
    try:
        serialize(out, *fast)
    except Exception:
        del out[mark:]
        serialize(out, *exact)


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
        return self._prefix + U32.pack(len(ukb)) + ukb

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

    @property
    def record_scoped(self) -> bool:
        """One stored value per record key (a record's writes to it can be taken back)."""
        return False

    def image(self, ukb: bytes) -> tuple[Any, bool] | None:
        """A copy of this state's value for record key ``ukb``, or None where a record's
        writes cannot be isolated (see :class:`_ScalarState`)."""
        return None

    def restore_image(self, ukb: bytes, image: tuple[Any, bool]) -> None:
        raise NotImplementedError

    def encoded_size(self, ukb: bytes) -> int:
        return 0

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

    def cache_port(self) -> CachePort:
        """Direct access to the cache for compiled steps (see :class:`CachePort`)."""
        load: Callable[[Any], Any] = getattr(self, "_load", self._no_load)
        return CachePort(self._store, self._cache, self._dirty.add, load, self._default, self._ttl)

    def _no_load(self, key: Any) -> Any:
        raise TypeError(f"{type(self).__name__} has no per-key load")

    def invalidate(self) -> None:
        """Forget everything cached and every dirty mark (after a restore or reset)."""
        self._cache.clear()
        self._dirty.clear()


class _ScalarState(BoundState):
    """One stored value per user key (value, list, aggregating, reducing, keyed)."""

    __slots__ = ()
    #: scoped to the record key (whose bytes key the cache); KeyedState keys it by user objects
    _scoped: ClassVar[bool] = True

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
            expires = expiry_of(raw)
            if expires <= self._clock():
                return _ABSENT
            return _Expiring(self._from_bytes(payload(raw, True)), expires)
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
        to_bytes: Callable[[Any], bytes] = self._to_bytes
        if type(self)._to_bytes is _ScalarState._to_bytes:
            to_bytes = self._serde.serialize
        serialize_fast_first(
            out, self._serialize_dirty, (to_bytes,), (fast_serde_function(to_bytes),)
        )
        self._dirty.clear()

    def _serialize_dirty(self, out: list[Change], to_bytes: Callable[[Any], bytes]) -> None:
        # Runs once per dirty key per checkpoint: locals instead of attribute/method lookups.
        cache = self._cache
        ttl = self._ttl
        prefix = self._prefix
        pack = U32.pack
        scoped = self._scoped  # scoped: the user key is already the record key's bytes
        ukb_of = self._ukb
        dirty = list(self._dirty)
        values = list(map(cache.pop, dirty))  # move them to the end (most recently written,
        cache.update(zip(dirty, values, strict=True))  # see evict), C loops, same order
        uk: Any = None
        try:
            for uk, value in zip(dirty, values, strict=True):
                ukb = uk if scoped else ukb_of(uk)
                key = prefix + pack(len(ukb)) + ukb
                if value is _ABSENT:
                    out.append((key, None))
                elif ttl is None:
                    out.append((key, to_bytes(value)))
                else:
                    out.append((key, with_expiry(value.expires, to_bytes(value.value))))
        except SerdeError:
            raise
        except Exception as exc:
            raise self._error(uk, "serialize", exc) from exc

    @property
    def record_scoped(self) -> bool:
        return self._scoped

    # -- the guard of a key whose value grew close to its changelog's record limit ---------
    # (headrace.runtime.task.chain.compile_feed): off the normal per-record path, used only
    # for the few keys a checkpoint found large.

    def image(self, ukb: bytes) -> tuple[Any, bool] | None:
        """A copy of what this state holds for record key ``ukb`` (None: not scoped by the
        record key, so a record's writes cannot be told apart from other keys')."""
        if not self._scoped:
            return None
        value = self._cache.get(ukb, _MISS)
        if value is not _MISS and value is not _ABSENT:
            value = copy.deepcopy(value)  # a list or an accumulator is changed in place
        return value, ukb in self._dirty

    def restore_image(self, ukb: bytes, image: tuple[Any, bool]) -> None:
        value, dirty = image
        if value is _MISS:
            self._cache.pop(ukb, None)
        else:
            self._cache[ukb] = value
        if dirty:
            self._dirty.add(ukb)
        else:
            self._dirty.discard(ukb)

    def encoded_size(self, ukb: bytes) -> int:
        """Bytes the changelog record of ``ukb`` would take if written now (0: nothing to
        write). Serializes the value: the guard's cost, paid per guarded record only."""
        if not self._scoped or ukb not in self._dirty:
            return 0
        value = self._cache.get(ukb, _MISS)
        if value is _MISS or value is _ABSENT:
            return 0
        if self._ttl is not None:
            return len(self._prefix) + len(ukb) + 12 + len(self._to_bytes(value.value))
        return len(self._prefix) + len(ukb) + 4 + len(self._to_bytes(value))

    def decode_entry(self, user_key: bytes, map_key: bytes | None, raw: bytes) -> tuple[Any, Any]:
        try:
            return None, self._from_bytes(payload(raw, self._ttl is not None))
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
