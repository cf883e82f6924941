"""User-facing state API: handle interfaces and the descriptors that declare them.

Flink style: one small interface per state kind. An operator *declares* state as class
attributes::

    class Counter(Operator):
        count = ValueStateDescriptor(type=int, default=0)

        def process(self, record):
            self.count.update(self.count.value() + 1)

and the runtime *binds* a handle per operator instance (it writes the handle into the
instance ``__dict__``, which wins over a non-data descriptor). Nothing here touches storage:
this module must stay free of I/O and never import ``runtime``.

Scoped handles (Value/List/Map/Aggregating/Reducing) act on the key of the record being
processed; :class:`KeyedState` takes explicit keys (the seed's ``KeyedStateStore``).

Values returned by handles are the cached Python objects. Mutating one in place without
calling ``update``/``put`` is not tracked: always write back what you changed.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, Self, TypeVar, overload

from headrace.operators.serde import Serde, serde_for

__all__ = [
    "AggregateFunction",
    "AggregatingState",
    "AggregatingStateDescriptor",
    "KeyedState",
    "KeyedStateDescriptor",
    "ListState",
    "ListStateDescriptor",
    "MapState",
    "MapStateDescriptor",
    "ReducingState",
    "ReducingStateDescriptor",
    "StateDescriptor",
    "StateKind",
    "StateNotBoundError",
    "ValueState",
    "ValueStateDescriptor",
    "declared_state",
]

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")
IN = TypeVar("IN")
ACC = TypeVar("ACC")
OUT = TypeVar("OUT")
H = TypeVar("H")


class StateNotBoundError(RuntimeError):
    """A state attribute was used on an operator the runtime has not bound.

    Not an ``AttributeError`` on purpose: ``hasattr``/``getattr(..., default)`` must not
    silently swallow a missing binding.
    """


class StateKind(enum.StrEnum):
    """The kind of a state; persisted in state metadata."""

    VALUE = "value"
    LIST = "list"
    MAP = "map"
    AGGREGATING = "aggregating"
    REDUCING = "reducing"
    KEYED = "keyed"


# --------------------------------------------------------------------------------------------
# Handle interfaces. Empty __slots__ so that runtime implementations can be fully slotted.
# --------------------------------------------------------------------------------------------


class ValueState(ABC, Generic[T]):
    """One value per record key."""

    __slots__ = ()

    @abstractmethod
    def value(self) -> T:
        """The value for the current key, or the declared default if unset/expired."""

    @abstractmethod
    def update(self, value: T) -> None:
        """Set the value for the current key (``None`` clears it, as in Flink)."""

    @abstractmethod
    def clear(self) -> None:
        """Remove the value for the current key."""


class ListState(ABC, Generic[T]):
    """A list per record key, stored as one value."""

    __slots__ = ()

    @abstractmethod
    def get(self) -> list[T]:
        """A copy of the list for the current key (empty if unset)."""

    @abstractmethod
    def add(self, value: T) -> None:
        """Append one element."""

    @abstractmethod
    def add_all(self, values: Iterable[T]) -> None:
        """Append many elements."""

    @abstractmethod
    def update(self, values: Iterable[T]) -> None:
        """Replace the list (an empty list clears it)."""

    @abstractmethod
    def clear(self) -> None:
        """Remove the list for the current key."""


class MapState(ABC, Generic[K, V]):
    """A map per record key; each map entry is its own storage entry."""

    __slots__ = ()

    @abstractmethod
    def get(self, key: K, default: V | None = None) -> V | None:
        """The value under ``key`` or ``default``."""

    @abstractmethod
    def put(self, key: K, value: V) -> None:
        """Set ``key`` to ``value``."""

    @abstractmethod
    def remove(self, key: K) -> None:
        """Remove ``key`` (no error if absent)."""

    @abstractmethod
    def contains(self, key: K) -> bool:
        """Whether ``key`` is present."""

    @abstractmethod
    def keys(self) -> Iterator[K]:
        """The map keys (a snapshot: mutating the map while iterating is safe)."""

    @abstractmethod
    def values(self) -> Iterator[V]:
        """The map values (a snapshot)."""

    @abstractmethod
    def items(self) -> Iterator[tuple[K, V]]:
        """The map entries (a snapshot)."""

    @abstractmethod
    def is_empty(self) -> bool:
        """Whether the map of the current key has no entries."""

    def __iter__(self) -> Iterator[K]:
        """Iterate the keys (a snapshot), like a dict."""
        return self.keys()

    def __contains__(self, key: object) -> bool:
        """``key in state``, like a dict."""
        return self.contains(key)  # type: ignore[arg-type]

    @abstractmethod
    def clear(self) -> None:
        """Remove every entry of the current key's map."""


class AggregatingState(ABC, Generic[IN, OUT]):
    """Folds inputs into an accumulator per record key."""

    __slots__ = ()

    @abstractmethod
    def add(self, value: IN) -> None:
        """Fold ``value`` into the accumulator."""

    @abstractmethod
    def get(self) -> OUT:
        """The result for the current key (of an empty accumulator if nothing was added)."""

    @abstractmethod
    def clear(self) -> None:
        """Drop the accumulator of the current key."""


class ReducingState(ABC, Generic[T]):
    """Aggregating state whose input and output types agree, combined by ``reduce_fn``."""

    __slots__ = ()

    @abstractmethod
    def add(self, value: T) -> None:
        """Combine ``value`` with the current value (or store it if none)."""

    @abstractmethod
    def get(self) -> T:
        """The reduced value, or the declared default (``None`` unless given) if empty."""

    @abstractmethod
    def clear(self) -> None:
        """Drop the value of the current key."""


class KeyedState(ABC, Generic[K, V]):
    """Explicit-key state (the seed's ``KeyedStateStore``), independent of the record key."""

    __slots__ = ()

    @abstractmethod
    def get(self, key: K) -> V | None:
        """The value under ``key``, else the declared default (``None`` unless given)."""

    @abstractmethod
    def put(self, key: K, value: V) -> None:
        """Set ``key`` to ``value``."""

    @abstractmethod
    def delete(self, key: K) -> None:
        """Remove ``key`` (no error if absent)."""

    @abstractmethod
    def update(self, key: K, fn: Callable[[V], V]) -> V:
        """Store and return ``fn(old value or default)`` (the seed's ``update_or_default``)."""

    @abstractmethod
    def items(self) -> Iterator[tuple[K, V]]:
        """All live entries (cached and stored), each once, in no particular order."""

    @abstractmethod
    def keys(self) -> Iterator[K]:
        """All live keys."""


class AggregateFunction(ABC, Generic[IN, ACC, OUT]):
    """Flink's AggregateFunction: how an :class:`AggregatingState` folds its inputs.

    ``add`` may mutate and return the accumulator it is given: the state stores whatever
    ``add`` returns and marks it dirty.
    """

    @abstractmethod
    def create_accumulator(self) -> ACC:
        """A fresh, empty accumulator."""

    @abstractmethod
    def add(self, value: IN, accumulator: ACC) -> ACC:
        """Fold ``value`` into ``accumulator`` and return the accumulator."""

    @abstractmethod
    def merge(self, a: ACC, b: ACC) -> ACC:
        """Merge two accumulators (for session windows and rescaling)."""

    @abstractmethod
    def get_result(self, accumulator: ACC) -> OUT:
        """The output for an accumulator."""


# --------------------------------------------------------------------------------------------
# Descriptors
# --------------------------------------------------------------------------------------------


def _default_factory(default: Any) -> Callable[[], Any]:
    """Normalise ``default`` to a zero-arg factory.

    Callables (``list``, ``dict``, ``lambda: {...}``) are factories, so a mutable default is
    never shared between keys; anything else is an immutable value returned as is.
    """
    if callable(default):
        return default  # type: ignore[no-any-return]
    return lambda: default


class StateDescriptor(Generic[H]):
    """Declares one piece of state. ``H`` is the handle type the runtime binds.

    A non-data descriptor: the runtime binds by writing ``instance.__dict__[attr] = handle``,
    which shadows this object; reaching ``__get__`` on an instance therefore means the
    binding is missing, and we say so instead of returning something half-working.
    """

    kind: StateKind

    def __init__(
        self,
        name: str | None,
        *,
        serde: Serde[Any],
        default: Any = None,
        ttl: float | None = None,
    ) -> None:
        if name is not None and not name:
            raise ValueError("state name must not be empty")
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
        self.name: str | None = name
        self.attr_name: str | None = None
        self.owner_name: str | None = None
        self.serde: Serde[Any] = serde
        self.default: Any = default
        self.default_factory: Callable[[], Any] = _default_factory(default)
        self.ttl: float | None = None if ttl is None else float(ttl)

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr_name = name
        self.owner_name = owner.__qualname__
        if self.name is None:
            self.name = name

    @property
    def state_name(self) -> str:
        """The storage name; raises if the descriptor was never named."""
        if self.name is None:
            raise ValueError(
                f"{type(self).__name__} has no name: pass name=... or declare it as a class "
                "attribute of an operator"
            )
        return self.name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> Self: ...

    @overload
    def __get__(self, instance: object, owner: type | None = None) -> H: ...

    def __get__(self, instance: object | None, owner: type | None = None) -> Self | H:
        if instance is None:
            return self
        cls = type(instance).__qualname__
        raise StateNotBoundError(
            f"state '{self.name}' of {cls} is not bound: state handles are created by the "
            f"runtime when it starts a task (or by OperatorStateStore.bind_operator in tests); "
            f"do not use '{self.attr_name}' before the operator is bound"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, serde={self.serde.name!r})"


class ValueStateDescriptor(StateDescriptor[ValueState[T]]):
    """Declares a :class:`ValueState`. ``default`` is a value or a zero-arg factory."""

    kind = StateKind.VALUE

    def __init__(
        self,
        name: str | None = None,
        *,
        type: type[T] | None = None,
        serde: Serde[T] | None = None,
        default: T | Callable[[], T] | None = None,
        ttl: float | None = None,
    ) -> None:
        super().__init__(name, serde=serde or serde_for(type), default=default, ttl=ttl)


class ListStateDescriptor(StateDescriptor[ListState[T]]):
    """Declares a :class:`ListState`; ``type``/``serde`` describe one element."""

    kind = StateKind.LIST

    def __init__(
        self,
        name: str | None = None,
        *,
        type: type[T] | None = None,
        serde: Serde[T] | None = None,
        ttl: float | None = None,
    ) -> None:
        super().__init__(name, serde=serde or serde_for(type), default=list, ttl=ttl)


class MapStateDescriptor(StateDescriptor[MapState[K, V]]):
    """Declares a :class:`MapState`; ``key_*`` describe map keys, ``type``/``serde`` values.

    The key serde must be deterministic (equal keys give equal bytes): its output is part of
    the storage key.
    """

    kind = StateKind.MAP

    def __init__(
        self,
        name: str | None = None,
        *,
        key_type: type[K] | None = None,
        key_serde: Serde[K] | None = None,
        type: type[V] | None = None,
        serde: Serde[V] | None = None,
        ttl: float | None = None,
    ) -> None:
        super().__init__(name, serde=serde or serde_for(type), ttl=ttl)
        self.key_serde: Serde[Any] = key_serde or serde_for(key_type)


class AggregatingStateDescriptor(StateDescriptor[AggregatingState[IN, OUT]], Generic[IN, ACC, OUT]):
    """Declares an :class:`AggregatingState`; the accumulator is what gets stored.

    ``type``/``serde`` are accepted as aliases of ``accumulator_type``/``accumulator_serde``
    (the common descriptor arguments describe the stored value, here the accumulator).
    """

    kind = StateKind.AGGREGATING

    def __init__(
        self,
        name: str | None = None,
        *,
        aggregate_function: AggregateFunction[IN, ACC, OUT],
        accumulator_type: type[ACC] | None = None,
        accumulator_serde: Serde[ACC] | None = None,
        type: type[ACC] | None = None,
        serde: Serde[ACC] | None = None,
        ttl: float | None = None,
    ) -> None:
        acc_serde = accumulator_serde or serde or serde_for(accumulator_type or type)
        super().__init__(name, serde=acc_serde, ttl=ttl)
        self.aggregate_function: AggregateFunction[IN, ACC, OUT] = aggregate_function


class ReducingStateDescriptor(StateDescriptor[ReducingState[T]]):
    """Declares a :class:`ReducingState` combined with ``reduce_fn(old, new)``."""

    kind = StateKind.REDUCING

    def __init__(
        self,
        name: str | None = None,
        *,
        reduce_fn: Callable[[T, T], T],
        type: type[T] | None = None,
        serde: Serde[T] | None = None,
        default: T | Callable[[], T] | None = None,
        ttl: float | None = None,
    ) -> None:
        super().__init__(name, serde=serde or serde_for(type), default=default, ttl=ttl)
        self.reduce_fn: Callable[[T, T], T] = reduce_fn


class KeyedStateDescriptor(StateDescriptor[KeyedState[K, V]]):
    """Declares an explicit-key :class:`KeyedState`. Keys must be hashable, and the key
    serde deterministic (its bytes are the storage key)."""

    kind = StateKind.KEYED

    def __init__(
        self,
        name: str | None = None,
        *,
        key_type: type[K] | None = None,
        key_serde: Serde[K] | None = None,
        type: type[V] | None = None,
        serde: Serde[V] | None = None,
        default: V | Callable[[], V] | None = None,
        ttl: float | None = None,
    ) -> None:
        super().__init__(name, serde=serde or serde_for(type), default=default, ttl=ttl)
        self.key_serde: Serde[Any] = key_serde or serde_for(key_type)


def declared_state(operator_cls: type) -> dict[str, StateDescriptor[Any]]:
    """Attribute name -> descriptor for every state declared on ``operator_cls`` and its bases.

    A subclass attribute overrides its base's (also with a non-descriptor, which removes the
    state). Two attributes naming the same state are rejected: they would share storage.
    """
    found: dict[str, StateDescriptor[Any]] = {}
    for klass in reversed(operator_cls.__mro__):
        for attr, value in vars(klass).items():
            if isinstance(value, StateDescriptor):
                found[attr] = value
            else:
                found.pop(attr, None)
    by_name: dict[str, str] = {}
    for attr, desc in found.items():
        name = desc.name or attr
        if name in by_name:
            raise ValueError(
                f"{operator_cls.__qualname__}: attributes '{by_name[name]}' and '{attr}' both "
                f"declare state '{name}'"
            )
        by_name[name] = attr
    return found
