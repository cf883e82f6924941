"""Backends (memory and RocksDB) against a dict model, snapshots, restore and reopen."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headrace.runtime.state import SnapshotError, StateBackend, open_backend
from headrace.runtime.state import memory as memory_module
from headrace.runtime.state.memory import MemoryBackend

BackendFactory = Callable[[], StateBackend]

# Few distinct bytes (including 0x00 and 0xff) so keys share prefixes and hit the edge cases
# of prefix scans (prefix successor of a 0xff tail).
keys = st.binary(max_size=4).map(lambda b: bytes(x % 4 for x in b).translate(_ALPHABET))
_ALPHABET = bytes.maketrans(b"\x00\x01\x02\x03", b"\x00\x01a\xff")
values = st.binary(max_size=6)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), keys, values),
        st.tuples(st.just("delete"), keys),
        st.tuples(st.just("batch"), st.lists(st.tuples(keys, st.none() | values), max_size=8)),
        # the trusted bulk path of a changelog restore (runs of puts between deletes)
        st.tuples(st.just("columns"), st.lists(st.tuples(keys, st.none() | values), max_size=8)),
        st.tuples(st.just("scan"), keys),
    ),
    max_size=40,
)

backend_settings = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def content(backend: StateBackend) -> dict[bytes, bytes]:
    return dict(backend.range_scan(b""))


def expected_scan(model: dict[bytes, bytes], prefix: bytes) -> list[tuple[bytes, bytes]]:
    return sorted((k, v) for k, v in model.items() if k.startswith(prefix))


def apply(backend: StateBackend, model: dict[bytes, bytes], op: tuple[Any, ...]) -> None:
    kind = op[0]
    if kind == "put":
        backend.put(op[1], op[2])
        model[op[1]] = op[2]
    elif kind == "delete":
        backend.delete(op[1])
        model.pop(op[1], None)
    elif kind in ("batch", "columns"):
        if kind == "batch":
            backend.write_batch(op[1])
        else:
            backend.write_columns([k for k, _ in op[1]], [v for _, v in op[1]])
        for k, v in op[1]:
            if v is None:
                model.pop(k, None)
            else:
                model[k] = v
    else:
        assert list(backend.range_scan(op[1])) == expected_scan(model, op[1])


@backend_settings
@given(ops=ops, probes=st.lists(keys, max_size=10))
def test_behaves_like_a_dict(
    make_backend: BackendFactory, backend_kind: str, ops: list[tuple[Any, ...]], probes: list[bytes]
) -> None:
    with contextlib.closing(make_backend()) as backend:
        model: dict[bytes, bytes] = {}
        for op in ops:
            apply(backend, model, op)
        for key in [*model, *probes]:
            assert backend.get(key) == model.get(key)
        prefixes = {b"", *probes, *(k[:i] for k in model for i in range(len(k) + 1))}
        for prefix in prefixes:
            assert list(backend.range_scan(prefix)) == expected_scan(model, prefix)
        if backend_kind == "memory":
            assert backend.key_count() == len(model)
            assert backend.size_bytes() == sum(len(k) + len(v) for k, v in model.items())


@backend_settings
@given(ops=ops, junk=st.dictionaries(keys, values, max_size=5), checkpoint_id=st.integers(0, 99))
def test_restore_of_checkpoint_round_trips_and_replaces(
    make_backend: BackendFactory,
    ops: list[tuple[Any, ...]],
    junk: dict[bytes, bytes],
    checkpoint_id: int,
) -> None:
    with contextlib.closing(make_backend()) as source, contextlib.closing(make_backend()) as target:
        model: dict[bytes, bytes] = {}
        for op in ops:
            apply(source, model, op)
        snapshot = source.checkpoint(checkpoint_id)
        target.write_batch(junk.items())  # restore must replace this, not merge with it
        target.restore(snapshot)
        assert content(target) == model
        assert target.checkpoint(checkpoint_id) == snapshot
        source.restore(snapshot)  # restoring onto itself is a no-op
        assert content(source) == model


@backend_settings
@given(
    source_content=st.dictionaries(keys, values, max_size=4),
    target_content=st.dictionaries(keys, values, max_size=4),
    mask=st.integers(1, 255),
)
def test_every_bad_snapshot_rejected_and_backend_untouched(
    make_backend: BackendFactory,
    source_content: dict[bytes, bytes],
    target_content: dict[bytes, bytes],
    mask: int,
) -> None:
    with contextlib.closing(make_backend()) as source, contextlib.closing(make_backend()) as target:
        source.write_batch(source_content.items())
        target.write_batch(target_content.items())
        snapshot = source.checkpoint(5)
        bad = [snapshot[:size] for size in range(len(snapshot))]
        bad += [
            snapshot[:pos] + bytes([snapshot[pos] ^ mask]) + snapshot[pos + 1 :]
            for pos in range(len(snapshot))
        ]
        bad.append(snapshot + b"\x00")
        for data in bad:
            with pytest.raises(SnapshotError):
                target.restore(data)
        assert content(target) == target_content


def test_restore_into_backend_with_data_replaces_it(backend: StateBackend) -> None:
    backend.put(b"old", b"1")
    backend.put(b"zzz\xff\xff", b"2")
    other = MemoryBackend()
    other.put(b"new", b"3")
    backend.restore(other.checkpoint(1))
    assert content(backend) == {b"new": b"3"}


def test_delete_prefix_and_clear(backend: StateBackend) -> None:
    backend.write_batch([(b"a1", b"1"), (b"a2", b"2"), (b"b", b"3"), (b"\xff\xff", b"4")])
    backend.delete_prefix(b"a")
    assert content(backend) == {b"b": b"3", b"\xff\xff": b"4"}
    backend.delete_prefix(b"\xff")
    assert content(backend) == {b"b": b"3"}
    backend.clear()
    assert content(backend) == {}
    backend.delete_prefix(b"")  # on an empty backend


def test_write_batch_is_atomic_when_the_iterable_fails(backend: StateBackend) -> None:
    def changes() -> Any:
        yield b"a", b"1"
        raise RuntimeError("producer of changes failed")

    with pytest.raises(RuntimeError):
        backend.write_batch(changes())
    assert backend.get(b"a") is None


def test_scan_is_not_affected_by_writes_while_iterating(backend: StateBackend) -> None:
    backend.write_batch([(b"p1", b"1"), (b"p2", b"2"), (b"p3", b"3")])
    seen = []
    for key, _ in backend.range_scan(b"p"):
        seen.append(key)
        backend.delete(b"p3")
        backend.put(b"p0", b"0")
    assert seen == [b"p1", b"p2", b"p3"]


def test_memory_sorted_index_patch_and_rebuild_paths() -> None:
    backend = MemoryBackend()
    model: dict[bytes, bytes] = {}
    for round_ in range(4):
        # A few changes (patched with bisect), then many (rebuilt with a linear merge).
        count = 10 if round_ % 2 == 0 else 2_000
        for i in range(count):
            key = f"{(i * 7919 + round_) % 3001:05d}".encode()
            if i % 3 == 0:
                backend.delete(key)
                model.pop(key, None)
            else:
                backend.put(key, b"v")
                model[key] = b"v"
        assert list(backend.range_scan(b"")) == sorted(model.items())
        assert list(backend.range_scan(b"01")) == expected_scan(model, b"01")


@backend_settings
@given(ops=ops)
def test_memory_switches_between_patching_and_sorting_exactly(
    monkeypatch: pytest.MonkeyPatch, ops: list[tuple[Any, ...]]
) -> None:
    """With a patch limit of 2 a memory backend keeps switching between patching its sorted
    keys and dropping them for a sort at the next scan: content, scans and size stay exact."""
    monkeypatch.setattr(memory_module, "_PATCH_LIMIT", 2)
    backend = MemoryBackend()
    model: dict[bytes, bytes] = {}
    for op in ops:
        apply(backend, model, op)
        assert backend.size_bytes() == sum(len(k) + len(v) for k, v in model.items())
    assert list(backend.range_scan(b"")) == sorted(model.items())


def test_memory_stops_patching_when_the_pending_keys_outgrow_the_sorted_ones() -> None:
    backend = MemoryBackend()
    backend.write_columns([b"a%05d" % i for i in range(1000)], [b"v"] * 1000)
    assert len(list(backend.range_scan(b""))) == 1000  # sorted now
    small = [b"b%05d" % i for i in range(100)]
    backend.write_columns(small, [b"w"] * 100)  # 100 pending of 1,100: patched
    assert not backend._rebuild and backend._added == set(small)
    many = [b"c%05d" % i for i in range(500)]
    backend.write_columns(many, [b"x"] * 500)  # 600 pending: the next scan sorts
    assert backend._rebuild and not backend._added and not backend._sorted
    assert [k for k, _ in backend.range_scan(b"b")] == small
    assert [k for k, _ in backend.range_scan(b"c")] == many
    assert backend.key_count() == 1600
    assert backend.size_bytes() == 1600 * 7


def test_memory_bulk_load_defers_sorting_and_size() -> None:
    """write_columns into an unsorted backend skips the per-key bookkeeping; scans, sizes and
    later point writes still see exactly the content."""
    backend = MemoryBackend()
    model: dict[bytes, bytes] = {}
    keys_ = [f"k{i * 7919 % 5000:05d}".encode() for i in range(5000)]
    vals: list[bytes | None] = [None if i % 97 == 0 else b"v%d" % i for i in range(5000)]
    for start in range(0, 5000, 1000):  # several bulk batches before any scan
        backend.write_columns(keys_[start : start + 1000], vals[start : start + 1000])
        for k, v in zip(keys_[start : start + 1000], vals[start : start + 1000], strict=True):
            if v is None:
                model.pop(k, None)
            else:
                model[k] = v
    backend.delete(keys_[1])  # point writes while the rebuild is pending
    backend.put(b"k-new", b"x")
    model.pop(keys_[1])
    model[b"k-new"] = b"x"
    assert backend.size_bytes() == sum(len(k) + len(v) for k, v in model.items())
    assert backend.key_count() == len(model)
    assert list(backend.range_scan(b"")) == sorted(model.items())
    # once sorted, a bulk batch is patched in key by key
    backend.write_columns([b"k00003", b"k-new", b"k99999"], [b"y", None, b"z"])
    model.update({b"k00003": b"y", b"k99999": b"z"})
    model.pop(b"k-new")
    assert list(backend.range_scan(b"k0000")) == expected_scan(model, b"k0000")
    assert list(backend.range_scan(b"")) == sorted(model.items())
    assert backend.size_bytes() == sum(len(k) + len(v) for k, v in model.items())


def test_write_columns_applies_puts_and_deletes_in_order(backend: StateBackend) -> None:
    backend.write_columns([b"a", b"a", b"b", b"a", b"c", b"b"], [b"1", None, b"2", b"3", b"", None])
    assert content(backend) == {b"a": b"3", b"c": b""}
    backend.write_columns([], [])
    assert content(backend) == {b"a": b"3", b"c": b""}


def test_write_columns_large_batch_keeps_the_last_write_of_repeated_keys(
    backend: StateBackend,
) -> None:
    """Large batches may be reordered by key (RocksDB sorts them): repeats keep their order."""
    rng = random.Random(5)
    pairs = [(b"k%03d" % rng.randrange(300), b"v%d" % i) for i in range(2_000)]
    backend.write_columns([k for k, _ in pairs], [v for _, v in pairs])
    assert content(backend) == dict(pairs)


def test_rocksdb_survives_close_and_reopen(tmp_path: Path) -> None:
    backend = open_backend("rocksdb", tmp_path / "task-0")
    backend.write_batch([(b"a", b"1"), (b"b", b"2")])
    backend.delete(b"b")
    backend.close()
    backend.close()  # idempotent
    reopened = open_backend("rocksdb", tmp_path / "task-0")
    try:
        assert content(reopened) == {b"a": b"1"}
    finally:
        reopened.close()
    with pytest.raises(Exception, match="closed"):
        backend.get(b"a")


def test_rocksdb_close_with_an_abandoned_scan_releases_the_lock(tmp_path: Path) -> None:
    backend = open_backend("rocksdb", tmp_path / "task-1")
    backend.write_batch([(bytes([i]), b"v") for i in range(10)])
    scan = backend.range_scan(b"")
    next(scan)  # half-consumed: its RocksDB iterator would keep the database open
    backend.close()
    reopened = open_backend("rocksdb", tmp_path / "task-1")  # LOCK must be free
    try:
        assert len(content(reopened)) == 10
    finally:
        reopened.close()


def test_open_backend_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown state backend"):
        open_backend("redis", tmp_path)
    with pytest.raises(ValueError, match="needs a directory"):
        open_backend("rocksdb")
    assert isinstance(open_backend("memory"), StateBackend)
