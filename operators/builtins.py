"""Built-in keyed aggregations, written with the same state API users get.

Reduce and aggregate carry a per-job function and serde, while state is declared on the
class (that is how the runtime discovers it). Each call therefore makes a small subclass with
its own descriptor: the runtime sees ordinary declared state and nothing is special-cased.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from headrace.operators.operator import Context, Operator
from headrace.operators.record import Record
from headrace.operators.serde import Serde
from headrace.operators.state import (
    AggregateFunction,
    AggregatingStateDescriptor,
    ValueStateDescriptor,
)


class Count(Operator):
    """Running count per key."""

    count = ValueStateDescriptor[int](type=int, default=0)

    def process(self, record: Record[Any, Any], ctx: Context) -> None:
        n = self.count.value() + 1
        self.count.update(n)
        ctx.emit(n)


class _Fold(Operator):
    """Running ``fn(acc, value)`` per key; ``acc`` is declared by the generated subclass."""

    acc: Any

    def __init__(self, fn: Callable[[Any, Any], Any], initial: Any) -> None:
        self.fn = fn
        self.initial = initial

    def process(self, record: Record[Any, Any], ctx: Context) -> None:
        cur = self.acc.value()
        new = record.value if cur is None and self.initial is None else self.fn(cur, record.value)
        self.acc.update(new)
        ctx.emit(new)


class _Aggregate(Operator):
    state: Any

    def process(self, record: Record[Any, Any], ctx: Context) -> None:
        self.state.add(record.value)
        ctx.emit(self.state.get())


def fold_operator(
    kind: str, fn: Callable[[Any, Any], Any], serde: Serde[Any], initial: Any = None
) -> Operator:
    """``sum`` (initial 0) and ``reduce`` (initial: the first value) as one operator."""
    cls = type(kind, (_Fold,), {"acc": ValueStateDescriptor[Any](serde=serde, default=initial)})
    op: Operator = cls(fn, initial)
    return op


def aggregate_operator(function: AggregateFunction[Any, Any, Any], serde: Serde[Any]) -> Operator:
    desc = AggregatingStateDescriptor[Any, Any, Any](aggregate_function=function, serde=serde)
    op: Operator = type("Aggregate", (_Aggregate,), {"state": desc})()
    return op


def builtin_kind(op: Operator) -> tuple[str, str] | None:
    """``(kind, state attribute)`` when ``op`` runs a built-in aggregation's own ``process``
    (``count``, a ``sum``/``reduce`` fold, ``aggregate``), else None (a user operator, or a
    subclass that overrides ``process``).

    The runtime compiles these into steps that do what ``process`` does on the state's cache
    (headrace.runtime.task.fusion); this is how it recognises them without reaching into this
    module's private classes.
    """
    process = type(op).process
    if process is Count.process:
        return "count", "count"
    if process is _Fold.process:
        return "fold", "acc"
    if process is _Aggregate.process:
        return "aggregate", "state"
    return None
