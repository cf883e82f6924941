"""OperatorStateStore and every handle kind, on both backends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headrace.operators.serde import INT, JSON, STR, Serde, SerdeError
from headrace.operators.state import (
    AggregateFunction,
    AggregatingStateDescriptor,
    KeyedStateDescriptor,
    ListStateDescriptor,
    MapStateDescriptor,
    ReducingStateDescriptor,
    ValueStateDescriptor,
)
from headrace.runtime.state import (
    OperatorStateStore,
    StateBackend,
    StateMetadataError,
    StatePartitionKey,
    decode_storage_key,
    encode_storage_key,
    open_backend,
)

PK = StatePartitionKey("counter", 3, 3)


class Avg(AggregateFunction[float, list[float], float]):
    def create_accumulator(self) -> list[float]:
        return [0.0, 0]

    def add(self, value: float, accumulator: list[float]) -> list[float]:
        return [accumulator[0] + value, accumulator[1] + 1]

    def merge(self, a: list[float], b: list[float]) -> list[float]:
        return [a[0] + b[0], a[1] + b[1]]

    def get_result(self, accumulator: list[float]) -> float:
        return accumulator[0] / accumulator[1] if accumulator[1] else 0.0


class Op:
    count = ValueStateDescriptor(type=int, default=0)
    doc = ValueStateDescriptor[dict[str, Any]](default=dict)
    seen = ListStateDescriptor(type=str)
    words = MapStateDescriptor(key_type=str, type=int)
    avg = AggregatingStateDescriptor(aggregate_function=Avg())
    total = ReducingStateDescriptor(reduce_fn=lambda a, b: a + b, type=int, default=0)
    table = KeyedStateDescriptor(key_type=str, type=int, default=0)


def bound(store: OperatorStateStore) -> Op:
    op = Op()
    store.bind_operator(op)
    return op


def state_changes(store: OperatorStateStore) -> dict[tuple[str, bytes, bytes | None], Any]:
    """take_changes() decoded to {(state, user key, map key): bytes | None}, metadata dropped."""
    out = {}
    for key, value in store.take_changes():
        if key[:1] == b"\x01":
            _, name, user_key, map_key = decode_storage_key(key)
            assert (name, user_key, map_key) not in out, "a key must appear once"
            out[(name, user_key, map_key)] = value
    return out


def checkpoint(store: OperatorStateStore, offset: int | None = None) -> None:
    store.apply_changes(store.take_changes(), changelog_offset=offset)


def reopen(store: OperatorStateStore, **kwargs: Any) -> tuple[OperatorStateStore, Op]:
    """A fresh store over the same backend (nothing cached)."""
    fresh = OperatorStateStore(store.backend, store.partition_key, clock=store.clock, **kwargs)
    return fresh, bound(fresh)


# --- value -----------------------------------------------------------------------------------


def test_value_state(store: OperatorStateStore) -> None:
    op = bound(store)
    store.current_key = b"alice"
    assert op.count.value() == 0
    op.count.update(op.count.value() + 1)
    op.count.update(op.count.value() + 1)
    store.current_key = b"bob"
    op.count.update(10)
    store.current_key = b"alice"
    assert op.count.value() == 2
    checkpoint(store)

    store2, op2 = reopen(store)
    store2.current_key = b"alice"
    assert op2.count.value() == 2
    store2.current_key = b"bob"
    assert op2.count.value() == 10
    op2.count.clear()
    assert op2.count.value() == 0


def test_mutable_default_is_not_shared(store: OperatorStateStore) -> None:
    op = bound(store)
    store.current_key = b"a"
    d = op.doc.value()
    d["x"] = 1
    store.current_key = b"b"
    assert op.doc.value() == {}


def test_write_back_cache_changes(store: OperatorStateStore) -> None:
    op = bound(store)
    store.current_key = b"k1"
    op.count.update(1)
    op.count.update(2)  # set twice -> one change with the latest value
    store.current_key = b"k2"
    op.count.update(5)
    op.count.clear()  # set then cleared -> one delete
    store.current_key = b"k3"
    op.count.value()  # a read is not a change
    changes = state_changes(store)
    assert changes == {
        ("count", b"k1", None): INT.serialize(2),
        ("count", b"k2", None): None,
    }
    assert state_changes(store) == {}  # marks cleared
    assert store.stats().dirty_entries == 0
    assert store.stats().cached_entries == 3  # entries stay cached, clean


def test_changes_are_serialised_once_per_checkpoint(store: OperatorStateStore) -> None:
    calls = []

    def ser(value: int) -> bytes:
        calls.append(value)
        return INT.serialize(value)

    class Counting:
        n = ValueStateDescriptor[int](serde=Serde("int64", ser, INT.deserialize), default=0)

    op = Counting()
    store.bind_operator(op)
    store.current_key = b"k"
    for _ in range(1000):
        op.n.update(op.n.value() + 1)
    assert calls == []  # nothing serialised on the per-record path
    store.take_changes()
    assert calls == [1000]


def test_metadata_travels_first_and_once(store: OperatorStateStore) -> None:
    op = bound(store)
    store.current_key = b"k"
    op.count.update(1)
    changes = store.take_changes()
    meta = [k for k, _ in changes if k[:1] == b"\x00"]
    assert len(meta) == len(store.metadata()) == 7
    assert all(k[:1] == b"\x00" for k, _ in changes[: len(meta)])
    store.apply_changes(changes)
    op.count.update(2)
    assert all(k[:1] == b"\x01" for k, _ in store.take_changes())


# --- list / map / aggregating / reducing / keyed --------------------------------------------


def test_list_state(store: OperatorStateStore) -> None:
    op = bound(store)
    store.current_key = b"k"
    assert op.seen.get() == []
    op.seen.add("a")
    op.seen.add_all(["b", "c"])
    got = op.seen.get()
    got.append("not stored")
    assert op.seen.get() == ["a", "b", "c"]
    checkpoint(store)
    store2, op2 = reopen(store)
    store2.current_key = b"k"
    assert op2.seen.get() == ["a", "b", "c"]
    op2.seen.update(["z"])
    assert op2.seen.get() == ["z"]
    op2.seen.update([])
    assert state_changes(store2) == {("seen", b"k", None): None}


def test_map_state(store: OperatorStateStore) -> None:
    op = bound(store)
    store.current_key = b"doc1"
    assert op.words.is_empty()
    op.words.put("a", 1)
    op.words.put("b", 2)
    op.words.put("c", 3)
    op.words.remove("c")
    op.words.remove("missing")
    assert op.words.get("a") == 1
    assert op.words.get("zz", -1) == -1
    assert op.words.contains("b") and not op.words.contains("c")
    assert "b" in op.words and "c" not in op.words
    store.current_key = b"doc2"
    op.words.put("a", 100)
    changes = state_changes(store)
    assert changes == {
        ("words", b"doc1", b"a"): INT.serialize(1),
        ("words", b"doc1", b"b"): INT.serialize(2),
        ("words", b"doc1", b"c"): None,
        ("words", b"doc2", b"a"): INT.serialize(100),
    }
    store.backend.write_batch(
        [(encode_storage_key(PK, "words", u, m), v) for (_, u, m), v in changes.items()]
    )
    store2, op2 = reopen(store)
    store2.current_key = b"doc1"
    assert sorted(op2.words.items()) == [("a", 1), ("b", 2)]
    assert sorted(op2.words.keys()) == ["a", "b"]
    assert sorted(op2.words.values()) == [1, 2]
    # Growing the map writes only the new entry, not the whole map.
    op2.words.put("d", 4)
    assert state_changes(store2) == {("words", b"doc1", b"d"): INT.serialize(4)}
    for key in op2.words:  # iterating is over a snapshot: mutation is safe
        op2.words.remove(key)
    assert op2.words.is_empty()
    op2.words.put("e", 5)
    op2.words.clear()
    assert state_changes(store2) == {("words", b"doc1", m): None for m in (b"a", b"b", b"d", b"e")}


def test_aggregating_state(store: OperatorStateStore) -> None:
    op = bound(store)
    store.current_key = b"k"
    assert op.avg.get() == 0.0
    op.avg.add(1.0)
    op.avg.add(3.0)
    assert op.avg.get() == 2.0
    assert state_changes(store) == {("avg", b"k", None): JSON.serialize([4.0, 2])}
    op.avg.clear()
    assert op.avg.get() == 0.0


def test_reducing_state(store: OperatorStateStore) -> None:
    op = bound(store)
    store.current_key = b"k"
    assert op.total.get() == 0
    op.total.add(5)
    op.total.add(7)
    assert op.total.get() == 12
    checkpoint(store)
    store2, op2 = reopen(store)
    store2.current_key = b"k"
    assert op2.total.get() == 12


def test_keyed_state(store: OperatorStateStore) -> None:
    op = bound(store)
    assert op.table.get("x") == 0
    op.table.put("x", 1)
    assert op.table.update("x", lambda v: v + 10) == 11
    assert op.table.update("new", lambda v: v + 1) == 1
    op.table.put("gone", 3)
    op.table.delete("gone")
    assert dict(op.table.items()) == {"x": 11, "new": 1}
    changes = state_changes(store)
    assert changes[("table", b"x", None)] == INT.serialize(11)
    assert changes[("table", b"gone", None)] is None
    store.apply_changes(
        [(encode_storage_key(PK, "table", u, m), v) for (_, u, m), v in changes.items()]
    )
    _, op2 = reopen(store)
    op2.table.put("y", 2)  # cached only
    op2.table.delete("new")  # stored, deleted in cache
    assert dict(op2.table.items()) == {"x": 11, "y": 2}
    assert sorted(op2.table.keys()) == ["x", "y"]
    assert op2.table.get("missing") == 0


def test_current_key_isolation_between_states(store: OperatorStateStore) -> None:
    op = bound(store)
    store.current_key = b"k"
    op.count.update(1)
    op.total.add(1)
    changes = state_changes(store)
    assert set(changes) == {("count", b"k", None), ("total", b"k", None)}


# --- TTL -------------------------------------------------------------------------------------


class TtlOp:
    v = ValueStateDescriptor(type=int, default=-1, ttl=10)
    lst = ListStateDescriptor(type=int, ttl=10)
    m = MapStateDescriptor(key_type=str, type=int, ttl=10)
    agg = ReducingStateDescriptor(reduce_fn=lambda a, b: a + b, type=int, ttl=10)
    kv = KeyedStateDescriptor(key_type=str, type=int, ttl=10)


def test_ttl_expiry_in_cache(store: OperatorStateStore, clock: Any) -> None:
    op = TtlOp()
    store.bind_operator(op)
    store.current_key = b"k"
    op.v.update(1)
    op.lst.add(1)
    op.m.put("a", 1)
    op.agg.add(1)
    op.kv.put("x", 1)
    clock.advance(9)
    assert op.v.value() == 1
    op.m.put("b", 2)  # written later: expires later
    checkpoint(store)
    clock.advance(2)  # 11 s after the first writes, 2 s after "b"
    assert op.v.value() == -1
    assert op.lst.get() == []
    assert op.agg.get() is None
    assert op.kv.get("x") is None
    assert dict(op.m.items()) == {"b": 2}
    assert state_changes(store) == {
        ("v", b"k", None): None,
        ("lst", b"k", None): None,
        ("agg", b"k", None): None,
        ("kv", b"x", None): None,
        ("m", b"k", b"a"): None,
    }


def test_ttl_expiry_from_storage(store: OperatorStateStore, clock: Any) -> None:
    op = TtlOp()
    store.bind_operator(op)
    store.current_key = b"k"
    op.v.update(1)
    op.m.put("a", 1)
    op.kv.put("x", 1)
    op.kv.put("y", 2)
    checkpoint(store)
    clock.advance(5)
    op.kv.put("y", 3)  # refreshed on write
    checkpoint(store)
    clock.advance(6)

    fresh = OperatorStateStore(store.backend, PK, clock=clock)
    op2 = TtlOp()
    fresh.bind_operator(op2)
    fresh.current_key = b"k"
    assert op2.v.value() == -1  # expired in storage: default ...
    assert op2.m.is_empty()
    assert dict(op2.kv.items()) == {"y": 3}
    # ... and a delete at the next checkpoint.
    assert state_changes(fresh) == {
        ("v", b"k", None): None,
        ("m", b"k", b"a"): None,
        ("kv", b"x", None): None,
    }


# --- restore, force_dirty, offsets, eviction -------------------------------------------------


def test_apply_changes_records_offset_atomically(store: OperatorStateStore) -> None:
    op = bound(store)
    assert store.changelog_offset is None
    store.current_key = b"k"
    op.count.update(1)
    checkpoint(store, offset=41)
    assert store.changelog_offset == 41
    fresh, _ = reopen(store)
    assert fresh.changelog_offset == 41
    op.count.update(2)
    checkpoint(store, offset=None)  # local state now ahead of any offset we could claim
    assert store.changelog_offset is None
    assert reopen(store)[0].changelog_offset is None


def test_restore_from_changelog(make_backend: Any, store: OperatorStateStore) -> None:
    op = bound(store)
    changelog: list[tuple[bytes, bytes | None]] = []
    for i in range(25):
        store.current_key = f"user-{i % 5}".encode()
        op.count.update(op.count.value() + 1)
        op.words.put(str(i), i)
        if i % 10 == 9:
            changes = store.take_changes()
            changelog.extend(changes)
            store.apply_changes(changes, changelog_offset=len(changelog) - 1)
    changelog.extend(store.take_changes())

    target = OperatorStateStore(make_backend(), PK)
    top = bound(target)
    target.current_key = b"user-0"
    top.count.update(999)  # stale cache/dirty state must be discarded by restore
    applied = target.restore(iter(changelog), changelog_offset=len(changelog) - 1, batch_size=7)
    assert applied == len(changelog)
    assert target.changelog_offset == len(changelog) - 1
    assert target.take_changes() == []  # nothing dirty after a restore
    for u in range(5):
        target.current_key = f"user-{u}".encode()
        assert top.count.value() == 5
        assert sorted(int(k) for k in top.words) == list(range(u, 25, 5))


def test_restore_rejects_incompatible_metadata(
    make_backend: Any, store: OperatorStateStore
) -> None:
    op = bound(store)
    store.current_key = b"k"
    op.count.update(1)
    changelog = store.take_changes()

    class Changed:
        count = ValueStateDescriptor[str](type=str)  # serde changed: int64 -> str

    target = OperatorStateStore(make_backend(), PK)
    target.bind_operator(Changed())
    with pytest.raises(StateMetadataError, match=r"state 'count'.*serde 'int64' -> 'str'"):
        target.restore(changelog)


def test_bind_rejects_incompatible_local_state(store: OperatorStateStore) -> None:
    op = bound(store)
    store.current_key = b"k"
    op.count.update(1)
    checkpoint(store)

    class Changed:
        count = ValueStateDescriptor[int](type=int, ttl=5)

    fresh = OperatorStateStore(store.backend, PK)
    with pytest.raises(StateMetadataError, match="ttl False -> True"):
        fresh.bind_operator(Changed())


def test_force_dirty(store: OperatorStateStore) -> None:
    op = bound(store)
    store.current_key = b"cached"
    op.count.update(7)
    store.current_key = b"stored"
    op.count.update(8)
    checkpoint(store)
    fresh, op2 = reopen(store)
    fresh.current_key = b"cached"
    assert op2.count.value() == 7  # now cached in the fresh store
    op2.words.put("w", 1)  # a cached map
    keys = [
        encode_storage_key(PK, "count", b"cached"),
        encode_storage_key(PK, "count", b"stored"),  # not cached: backend bytes
        encode_storage_key(PK, "count", b"never"),  # nowhere: a delete
        encode_storage_key(PK, "words", b"cached", b"\x00\x00\x00\x00\x00\x00\x00\x01"),
    ]
    fresh.take_changes()
    fresh.force_dirty(keys)
    changes = dict(fresh.take_changes())
    assert changes[keys[0]] == INT.serialize(7)
    assert changes[keys[1]] == INT.serialize(8)
    assert changes[keys[2]] is None
    assert keys[3] in changes
    assert fresh.take_changes() == []


def test_eviction_only_in_apply_changes(store: OperatorStateStore) -> None:
    small = OperatorStateStore(store.backend, PK, cache_max_entries=10)
    op = bound(small)
    for i in range(50):
        small.current_key = str(i).encode()
        op.count.update(i)
    assert small.stats().cached_entries == 50  # never evicted on the record path
    checkpoint(small)
    assert small.stats().cached_entries == 10
    small.current_key = b"7"
    op.count.update(-7)  # written in the last interval: survives the next eviction
    small.current_key = b"new"
    op.count.update(1)
    checkpoint(small)
    cache = op.count._cache  # type: ignore[attr-defined]
    assert len(cache) == 10 and b"7" in cache and b"new" in cache
    for i in range(50):  # evicted entries reload from the backend
        small.current_key = str(i).encode()
        assert op.count.value() == (-7 if i == 7 else i)


def test_dump(store: OperatorStateStore) -> None:
    op = bound(store)
    store.current_key = b"k"
    op.count.update(3)
    op.words.put("w", 4)
    op.table.put("t", 5)
    checkpoint(store)
    assert sorted(store.dump()) == [
        ("count", b"k", None, 3),
        ("table", b"t", None, 5),
        ("words", b"k", "w", 4),
    ]


def test_dirty_entries_survive_eviction(store: OperatorStateStore) -> None:
    small = OperatorStateStore(store.backend, PK, cache_max_entries=1)
    op = bound(small)
    for i in range(5):
        small.current_key = str(i).encode()
        op.count.update(i)
    changes = small.take_changes()
    small.current_key = b"late"  # written between take_changes and apply_changes
    op.count.update(99)
    small.apply_changes(changes)
    assert state_changes(small) == {("count", b"late", None): INT.serialize(99)}


def test_reset(store: OperatorStateStore) -> None:
    op = bound(store)
    other = OperatorStateStore(store.backend, StatePartitionKey("other", 0, 0))
    oop = bound(other)
    other.current_key = store.current_key = b"k"
    op.count.update(1)
    oop.count.update(2)
    checkpoint(store, offset=3)
    checkpoint(other, offset=4)
    store.reset()
    assert store.changelog_offset is None
    assert op.count.value() == 0
    assert list(store.storage_keys()) == []
    assert oop.count.value() == 2 and other.changelog_offset == 4  # other namespace intact
    fresh, op2 = reopen(other)
    fresh.current_key = b"k"
    assert op2.count.value() == 2
    # The reset store re-emits its metadata at the next checkpoint.
    assert any(k[:1] == b"\x00" for k, _ in store.take_changes())


def test_serde_error_names_state_operator_and_key(store: OperatorStateStore) -> None:
    op = bound(store)
    store.current_key = b"user-7"
    op.count.update("not an int")  # type: ignore[arg-type]
    with pytest.raises(SerdeError) as info:
        store.take_changes()
    err = info.value
    assert err.what == "state 'count' of operator 'counter'"
    assert err.key == b"user-7"
    assert "b'user-7'" in str(err) and err.__cause__ is not None

    store.backend.put(encode_storage_key(PK, "seen", b"bad"), b"\x00\x00\x00\x09junk")
    store.current_key = b"bad"
    with pytest.raises(SerdeError, match=r"state 'seen' of operator 'counter', key b'bad'"):
        op.seen.get()


def test_a_value_the_fast_serde_refuses_is_reported_by_the_serde(
    store: OperatorStateStore,
) -> None:
    """Checkpoint serialisation tries C-level variants of the built-in serdes first; where one
    raises, the serde's own function decides and names the state, key and map key."""
    op = bound(store)
    store.current_key = b"user-1"
    op.words.put("fine", 1)
    op.words.put(7, 2)  # type: ignore[arg-type]  # not a str: STR cannot encode it
    with pytest.raises(SerdeError) as info:
        store.take_changes()
    assert info.value.what == "state 'words' of operator 'counter'"
    assert "7" in str(info.value) and "user-1" in str(info.value)
    with pytest.raises(SerdeError):  # nothing was taken: the entries are still dirty
        store.take_changes()


def test_bind_errors(store: OperatorStateStore) -> None:
    class Slotted:
        __slots__ = ()
        count = ValueStateDescriptor[int](type=int)

    with pytest.raises(TypeError, match="__dict__"):
        store.bind_operator(Slotted())
    d = ValueStateDescriptor[int]("x")
    assert store.bind(d) is store.bind(d)
    with pytest.raises(ValueError, match="already has a state named 'x'"):
        store.bind(ValueStateDescriptor[int]("x"))


def test_stats(store: OperatorStateStore) -> None:
    op = bound(store)
    store.current_key = b"k"
    op.count.update(1)
    op.words.put("a", 1)
    stats = store.stats()
    assert stats.dirty_entries == 2
    assert stats.cached_entries == 2
    checkpoint(store)
    assert store.stats().key_count >= 2
    assert store.stats().size_bytes > 0
    assert {m.kind for m in store.metadata().values()} == {
        "value",
        "list",
        "map",
        "aggregating",
        "reducing",
        "keyed",
    }
    assert store.metadata()["words"].key_serde == "str"


def test_rocksdb_store_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "task-3"
    backend = open_backend("rocksdb", path)
    store = OperatorStateStore(backend, PK)
    op = bound(store)
    for i in range(100):
        store.current_key = f"k{i}".encode()
        op.count.update(i)
        op.words.put("w", i)
        op.table.put(str(i), i)
    checkpoint(store, offset=123)
    backend.close()

    reopened: StateBackend = open_backend("rocksdb", path)
    try:
        store2 = OperatorStateStore(reopened, PK)
        op2 = bound(store2)
        assert store2.changelog_offset == 123
        for i in range(100):
            store2.current_key = f"k{i}".encode()
            assert op2.count.value() == i
            assert op2.words.get("w") == i
        assert len(dict(op2.table.items())) == 100
    finally:
        reopened.close()


def test_str_user_key_serde_in_keyed_state(store: OperatorStateStore) -> None:
    class K:
        t = KeyedStateDescriptor(key_serde=STR, serde=JSON)

    op = K()
    store.bind_operator(op)
    op.t.put("a:b", {"x": [1, 2]})
    changes = state_changes(store)
    assert changes == {("t", b"a:b", None): b'{"x":[1,2]}'}


# --- map state: first touches without a backend scan ------------------------------------------


class _CountingScans:
    """Wraps a backend; counts range scans under a prefix."""

    def __init__(self, backend: StateBackend) -> None:
        self.inner = backend
        self.scans = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def range_scan(self, prefix: bytes) -> Any:
        self.scans += 1
        return self.inner.range_scan(prefix)


def test_map_first_touches_of_a_fresh_state_do_not_scan(store: OperatorStateStore) -> None:
    counting = _CountingScans(store.backend)
    fresh = OperatorStateStore(counting, PK)
    op = bound(fresh)
    for i in range(100):  # a new user per record
        fresh.current_key = f"user-{i}".encode()
        assert op.words.get("x") is None
        op.words.put("x", i)
    checkpoint(fresh)
    for i in range(100, 200):
        fresh.current_key = f"user-{i}".encode()
        op.words.put("x", i)
    assert counting.scans == 1  # one look at the state's prefix, not one per user
    fresh.current_key = b"user-7"
    assert op.words.get("x") == 7


def test_map_loads_from_the_backend_after_an_eviction(store: OperatorStateStore) -> None:
    small = OperatorStateStore(store.backend, PK, cache_max_entries=5)
    op = bound(small)
    for i in range(20):
        small.current_key = f"user-{i}".encode()
        op.words.put("a", i)
        op.words.put("b", -i)
    checkpoint(small)  # evicts maps: they are in the backend only now
    assert small.stats().cached_entries <= 5
    for i in range(20):
        small.current_key = f"user-{i}".encode()
        assert dict(op.words.items()) == {"a": i, "b": -i}


def test_map_loads_from_the_backend_after_a_restore(make_backend: Any) -> None:
    source = OperatorStateStore(make_backend(), PK)
    op = bound(source)
    source.current_key = b"alice"
    op.words.put("w", 1)
    changelog = source.take_changes()

    target = OperatorStateStore(make_backend(), PK)
    top = bound(target)
    target.current_key = b"bob"
    assert top.words.get("w") is None  # decided "complete" while the backend was empty
    target.restore(iter(changelog))
    target.current_key = b"alice"
    assert top.words.get("w") == 1  # a restore makes it look again
    keys = [k for k, _ in changelog]
    values = [v for _, v in changelog]
    other = OperatorStateStore(make_backend(), PK)
    oop = bound(other)
    other.current_key = b"carol"
    assert oop.words.is_empty()
    other.restore_columns(keys, values)
    other.current_key = b"alice"
    assert oop.words.get("w") == 1


def test_map_reopened_over_a_backend_with_state_scans(store: OperatorStateStore) -> None:
    op = bound(store)
    store.current_key = b"alice"
    op.words.put("w", 3)
    checkpoint(store)
    again, op2 = reopen(store)  # a warm restart: the backend holds alice's map
    again.current_key = b"bob"
    assert op2.words.get("w") is None
    again.current_key = b"alice"
    assert op2.words.get("w") == 3


_USERS = st.sampled_from([b"u1", b"u2", b"u3"])
_MAP_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), _USERS, st.sampled_from("abcd")),
        st.tuples(st.just("remove"), _USERS, st.sampled_from("abcd")),
        st.tuples(st.just("clear"), _USERS, st.just("")),
        st.tuples(st.just("checkpoint"), st.just(b""), st.just("")),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=_MAP_OPS)
def test_map_state_checkpoints_match_a_dict_model(ops: list[tuple[str, bytes, str]]) -> None:
    """Map writes of one or several map keys per record key between checkpoints (the dirty
    marks hold one map key per record key until a second comes), with a cache of 1 entry so
    that checkpoints evict: every checkpoint's changes name each changed entry once, count
    as many dirty entries, and a store reopened over the backend holds the model's maps."""
    from headrace.runtime.state.memory import MemoryBackend

    store = OperatorStateStore(MemoryBackend(), PK, cache_max_entries=1)
    op = bound(store)
    model: dict[bytes, dict[str, int]] = {}
    touched: set[tuple[bytes, str]] = set()
    n = 0
    for action, user, key in [*ops, ("checkpoint", b"", "")]:
        store.current_key = user
        entries = model.setdefault(user, {})
        if action == "put":
            n += 1
            op.words.put(key, n)
            entries[key] = n
            touched.add((user, key))
        elif action == "remove":
            op.words.remove(key)
            if entries.pop(key, None) is not None:
                touched.add((user, key))
        elif action == "clear":
            touched.update((user, k) for k in op.words)
            op.words.clear()
            entries.clear()
        else:
            assert store.stats().dirty_entries == len(touched)
            changes = state_changes(store)
            assert set(changes) == {("words", u, k.encode()) for u, k in touched}
            for (_, u, k), value in changes.items():
                expected = model[u].get(k.decode())
                assert value == (None if expected is None else INT.serialize(expected))
            store.apply_changes(
                [(encode_storage_key(PK, "words", u, m), v) for (_, u, m), v in changes.items()],
                changelog_offset=None,
            )
            touched.clear()
    fresh, op2 = reopen(store)
    for user, entries in model.items():
        fresh.current_key = user
        assert dict(op2.words.items()) == entries
