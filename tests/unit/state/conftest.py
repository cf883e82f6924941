"""Fixtures for the state layer, parametrised over both backends."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from headrace.runtime.state import OperatorStateStore, StateBackend, StatePartitionKey, open_backend

BackendFactory = Callable[[], StateBackend]


class FakeClock:
    """An injectable clock for TTL tests: time only moves when the test says so."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=["memory", "rocksdb"])
def backend_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_backend(backend_kind: str, tmp_path: Path) -> Iterator[BackendFactory]:
    """A factory of fresh, empty backends (one directory each for RocksDB); closes them all.

    Hypothesis tests call the factory once per example, which is why it is a factory rather
    than a backend: a function-scoped backend would leak state between examples.
    """
    opened: list[StateBackend] = []
    counter = itertools.count()

    def factory() -> StateBackend:
        backend = open_backend(backend_kind, tmp_path / f"db{next(counter)}")
        opened.append(backend)
        return backend

    yield factory
    for backend in opened:
        backend.close()


@pytest.fixture
def backend(make_backend: BackendFactory) -> StateBackend:
    return make_backend()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


PK = StatePartitionKey("counter", 3, 3)


@pytest.fixture
def store(backend: StateBackend, clock: FakeClock) -> OperatorStateStore:
    return OperatorStateStore(backend, PK, clock=clock)
