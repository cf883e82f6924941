"""Descriptors: declaration, naming, binding errors, declared_state over the MRO."""

from __future__ import annotations

import pytest

from headrace.operators.serde import INT, JSON, STR
from headrace.operators.state import (
    AggregateFunction,
    AggregatingStateDescriptor,
    KeyedStateDescriptor,
    ListStateDescriptor,
    MapStateDescriptor,
    ReducingStateDescriptor,
    StateDescriptor,
    StateNotBoundError,
    ValueStateDescriptor,
    declared_state,
)


class Avg(AggregateFunction[float, list[float], float]):
    def create_accumulator(self) -> list[float]:
        return [0.0, 0.0]

    def add(self, value: float, accumulator: list[float]) -> list[float]:
        accumulator[0] += value
        accumulator[1] += 1
        return accumulator

    def merge(self, a: list[float], b: list[float]) -> list[float]:
        return [a[0] + b[0], a[1] + b[1]]

    def get_result(self, accumulator: list[float]) -> float:
        return accumulator[0] / accumulator[1] if accumulator[1] else 0.0


class Base:
    count = ValueStateDescriptor(type=int, default=0)
    seen = ListStateDescriptor(type=str)


class Child(Base):
    seen = None  # type: ignore[assignment]  # removes the base's state
    by_word = MapStateDescriptor(key_type=str, type=int)
    avg = AggregatingStateDescriptor(aggregate_function=Avg())
    total = ReducingStateDescriptor(reduce_fn=lambda a, b: a + b, type=int)
    table = KeyedStateDescriptor("renamed", key_type=str, type=int, default=0)


def test_names_default_to_attribute() -> None:
    assert Base.count.name == "count"
    assert Child.table.name == "renamed"
    assert Child.table.attr_name == "table"


def test_class_access_returns_the_descriptor() -> None:
    assert isinstance(Child.count, StateDescriptor)


def test_unbound_instance_access_raises_clearly() -> None:
    with pytest.raises(StateNotBoundError, match=r"state 'count' of Child is not bound") as info:
        _ = Child().count
    assert "created by the runtime" in str(info.value)
    assert not isinstance(info.value, AttributeError)  # hasattr() must not hide it


def test_runtime_binding_shadows_the_descriptor() -> None:
    op = Child()
    op.__dict__["count"] = "handle"
    assert op.count == "handle"  # type: ignore[comparison-overlap]


def test_declared_state_over_mro() -> None:
    declared = declared_state(Child)
    assert set(declared) == {"count", "by_word", "avg", "total", "table"}
    assert declared["count"] is Base.count


def test_duplicate_state_names_rejected() -> None:
    class Dup:
        a = ValueStateDescriptor[int]("x")
        b = ValueStateDescriptor[int]("x")

    with pytest.raises(ValueError, match="both declare state 'x'"):
        declared_state(Dup)


def test_serdes_from_types() -> None:
    assert Base.count.serde is INT
    assert Base.seen.serde is STR
    assert Child.by_word.key_serde is STR and Child.by_word.serde is INT
    assert Child.avg.serde is JSON
    assert ValueStateDescriptor[int](serde=STR).serde is STR  # type: ignore[arg-type]


def test_default_value_or_factory() -> None:
    d = ValueStateDescriptor[list[int]](default=list)
    first, second = d.default_factory(), d.default_factory()
    assert first == [] and first is not second
    assert ValueStateDescriptor(default=5).default_factory() == 5


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="ttl"):
        ValueStateDescriptor[int](ttl=0)
    with pytest.raises(ValueError, match="empty"):
        ValueStateDescriptor[int]("")
    with pytest.raises(ValueError, match="has no name"):
        _ = ValueStateDescriptor[int]().state_name
