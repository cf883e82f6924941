"""State scoped to the record key: value (with and without TTL), list, aggregating, reducing."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from headrace.operators.state import (
    AggregatingState,
    AggregatingStateDescriptor,
    ListState,
    ReducingState,
    ReducingStateDescriptor,
    StateKind,
    ValueState,
)
from headrace.runtime.state.encoding import decode_list, encode_list
from headrace.runtime.state.handles.base import _ABSENT, _MISS, StoreView, _ScalarState


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
        return encode_list(value, self._serde.serialize)

    def _from_bytes(self, data: bytes) -> Any:
        return decode_list(data, self._serde.deserialize)

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

    @property
    def function(self) -> Any:
        """The state's AggregateFunction (compiled steps call it directly)."""
        return self._fn

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
