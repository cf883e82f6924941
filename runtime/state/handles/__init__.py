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

The bytes a handle writes and reads are defined in :mod:`headrace.runtime.state.encoding`.

* :mod:`.base`: the cache machinery every handle shares (``BoundState``, one value per key);
* :mod:`.scalar`: value, TTL value, list, aggregating and reducing state (scoped to the record
  key);
* :mod:`.keyed`: keyed state (explicit keys) and map state (one storage entry per map key).
"""

from __future__ import annotations

from typing import Any

from headrace.operators.state import (
    AggregatingStateDescriptor,
    KeyedStateDescriptor,
    ListStateDescriptor,
    MapStateDescriptor,
    ReducingStateDescriptor,
    StateDescriptor,
    ValueStateDescriptor,
)
from headrace.runtime.state.handles.base import ABSENT, MISS, BoundState, Change, StoreView
from headrace.runtime.state.handles.keyed import KeyedHandle, MapHandle
from headrace.runtime.state.handles.scalar import (
    AggregatingHandle,
    ListHandle,
    ReducingHandle,
    TtlValueHandle,
    ValueHandle,
)

__all__ = [
    "ABSENT",
    "MISS",
    "AggregatingHandle",
    "BoundState",
    "Change",
    "KeyedHandle",
    "ListHandle",
    "MapHandle",
    "ReducingHandle",
    "StoreView",
    "TtlValueHandle",
    "ValueHandle",
    "make_handle",
]


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
