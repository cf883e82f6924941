"""RestoreTarget.apply/finish (runtime/checkpoint/restore.py) against a record-by-record model.

The restore path has no per-record Python loop: it checks the namespace on the smallest and
largest key of a batch, cuts at-least-once batches at ``valid_until`` by bisection and hands
parallel key/value lists to the backend. These tests pin what the plain per-record loop did:
namespace errors name topic/partition/offset, records past ``valid_until`` are not applied and
mark their keys stale, tombstones delete in order, metadata records are checked before their
batch is written, batches are atomic and the fault hook fires once per flushed batch, and a
record whose writer epoch is below one seen earlier in the partition (a zombie's) is skipped and
its key rewritten.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import headrace.runtime.checkpoint.restore as restore_module
from headrace.operators.state import ValueStateDescriptor
from headrace.runtime.checkpoint.fencing import claim_record, epoch_headers
from headrace.runtime.checkpoint.restore import ChangelogCorruptError, RestoreTarget, plan_start
from headrace.runtime.state import (
    OperatorStateStore,
    StateBackend,
    StateMetadataError,
    StatePartitionKey,
    encode_metadata_key,
    encode_storage_key,
    open_backend,
)
from headrace.runtime.state.keys import metadata_prefix, partition_prefix

TOPIC = "job.counts.changelog"
PARTITION = 1
PK = StatePartitionKey("counts", PARTITION, PARTITION)
OTHER_PK = StatePartitionKey("counts", 2, 2)  # the same operator, another partition


class Counter:
    count = ValueStateDescriptor[int](type=int, default=0)


class Changed:
    count = ValueStateDescriptor[str](type=str)  # serde changed: int64 -> str


@dataclass
class Rec:
    """What RestoreTarget reads of an aiokafka ConsumerRecord."""

    topic: str
    partition: int
    offset: int
    key: Any
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


def state_key(user: int) -> bytes:
    return encode_storage_key(PK, "count", b"u%d" % user)


META_KEY = encode_metadata_key(PK, "state:count")
UNBOUND_META_KEY = encode_metadata_key(PK, "state:gone")  # a state no longer declared


def meta_value() -> bytes:
    store = OperatorStateStore(open_backend("memory"), PK)
    store.bind_operator(Counter())
    return dict(store.take_changes())[META_KEY]


@pytest.fixture(params=["memory", "rocksdb"])
def make_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., OperatorStateStore]]:
    opened: list[StateBackend] = []
    counter = itertools.count()

    def factory(operator: object | None = None) -> OperatorStateStore:
        backend = open_backend(str(request.param), tmp_path / f"db{next(counter)}")
        opened.append(backend)
        store = OperatorStateStore(backend, PK)
        store.bind_operator(operator if operator is not None else Counter())
        store.reset()  # what plan_start does for a cold restore
        return store

    yield factory
    for backend in opened:
        backend.close()


def records(
    pairs: list[tuple[Any, bytes | None]], first: int = 0, epochs: list[int | None] | None = None
) -> list[Rec]:
    """Changelog records at offsets ``first``..; ``epochs[i]``: the i-th record's writer epoch."""
    marks = epochs or [None] * len(pairs)
    return [
        Rec(TOPIC, PARTITION, first + i, k, v, [] if e is None else epoch_headers(e))
        for i, ((k, v), e) in enumerate(zip(pairs, marks, strict=True))
    ]


def stored(store: OperatorStateStore) -> dict[bytes, bytes]:
    """Everything in the store's two namespaces except the recorded changelog offset."""
    out = dict(store.backend.range_scan(partition_prefix(PK)))
    out.update(store.backend.range_scan(metadata_prefix(PK)))
    out.pop(store._offset_key, None)
    out.pop(store._claim_key, None)
    return out


def run(target: RestoreTarget, recs: list[Rec], chunk: int, batch_size: int) -> None:
    for i in range(0, len(recs), chunk):
        target.apply(recs[i : i + chunk], batch_size)
    target.finish()


# -- against the per-record model --------------------------------------------------------------

record_keys = st.one_of(
    st.integers(0, 6).map(state_key),
    st.just(META_KEY),
    st.just(UNBOUND_META_KEY),
)


@st.composite
def changelogs(draw: st.DrawFn) -> list[tuple[bytes, bytes | None]]:
    pairs = draw(st.lists(st.tuples(record_keys, st.none() | st.binary(max_size=3)), max_size=40))
    meta = meta_value()
    # a metadata record of the bound state carries its real metadata (or is a tombstone)
    return [(k, meta if k == META_KEY and v is not None else v) for k, v in pairs]


@settings(
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    pairs=changelogs(),
    chunk=st.integers(1, 12),
    batch_size=st.integers(1, 15),
    valid_until=st.none() | st.integers(-1, 45),
    epoch_runs=st.lists(st.tuples(st.none() | st.integers(1, 4), st.integers(1, 8)), max_size=8),
)
def test_apply_matches_the_record_by_record_model(
    make_store: Callable[..., OperatorStateStore],
    pairs: list[tuple[bytes, bytes | None]],
    chunk: int,
    batch_size: int,
    valid_until: int | None,
    epoch_runs: list[tuple[int | None, int]],
) -> None:
    # writer epochs come in runs (one owner writes several records), older owners included
    epochs = [e for e, n in epoch_runs for _ in range(n)][: len(pairs)]
    epochs += [None] * (len(pairs) - len(epochs))
    store = make_store()
    target = RestoreTarget(store, TOPIC, PARTITION, valid_until)
    recs = records(pairs, epochs=epochs)
    run(target, recs, chunk, batch_size)

    model: dict[bytes, bytes] = {}
    stale: set[bytes] = set()
    fenced: set[bytes] = set()
    highest: int | None = None
    last = None
    for r, epoch in zip(recs, epochs, strict=True):
        zombie = epoch is not None and highest is not None and epoch < highest
        if epoch is not None and not zombie:
            highest = epoch
        if valid_until is not None and r.offset > valid_until:
            stale.add(r.key)
            continue
        last = r.offset
        if zombie:
            fenced.add(r.key)
        elif r.value is None:
            model.pop(r.key, None)
        else:
            model[r.key] = r.value
    assert stored(store) == model
    assert target.stale == stale
    assert target.fenced == fenced
    assert target.epochs.highest == highest
    assert store.writer_epoch == highest
    assert target.last_applied == last
    assert target.applied == len(recs)
    assert store.changelog_offset == last


def test_interleaved_writes_of_two_owners_restore_exactly_the_newer_owners_state(
    make_store: Callable[..., OperatorStateStore],
) -> None:
    """The zombie scenario: owner 7 claims and writes, the new owner 8 claims, and the zombie's
    late writes (its revocation's "final checkpoint") land between and after owner 8's."""
    a, b, c = state_key(1), state_key(2), state_key(3)
    claim7, claim8 = claim_record(PK, 7), claim_record(PK, 8)
    log = [
        (claim7, 7),
        ((a, b"\x00" * 7 + b"\x05"), 7),  # a = 5, committed by owner 7
        ((b, b"\x00" * 7 + b"\x01"), 7),
        (claim8, 8),  # the new owner restored a = 5, b = 1 and claimed
        ((a, b"\x00" * 7 + b"\x1a"), 8),  # a = 26
        ((a, b"\x00" * 7 + b"\x06"), 7),  # the zombie: a = 6, b deleted, c = 9
        ((b, None), 7),
        ((c, b"\x00" * 7 + b"\x09"), 7),
        (claim7, 7),  # even a zombie's late claim does not take the task back
        ((b, b"\x00" * 7 + b"\x02"), 8),  # b = 2
    ]
    for chunk in (1, 3, len(log)):
        store = make_store()
        target = RestoreTarget(store, TOPIC, PARTITION, None)
        recs = records([kv for kv, _ in log], epochs=[e for _, e in log])
        run(target, recs, chunk, batch_size=4)
        state = stored(store)
        assert {k: state.get(k) for k in (a, b, c)} == {
            a: b"\x00" * 7 + b"\x1a",
            b: b"\x00" * 7 + b"\x02",
            c: None,
        }
        assert target.fenced == {a, b, c, claim7[0]} and target.fenced_count == 4
        assert store.writer_epoch == 8
        # the zombie's keys are rewritten with the newer owner's values (c: deleted), so that
        # compaction can never leave a zombie record as the last one of a key
        changes = dict(store.take_changes())
        assert changes[a] == b"\x00" * 7 + b"\x1a" and changes[c] is None
        assert changes[claim7[0]] == claim8[1]


def test_a_warm_restart_resumes_the_epoch_filter_from_the_local_store(
    make_store: Callable[..., OperatorStateStore],
) -> None:
    a = state_key(1)
    store = make_store()
    first = RestoreTarget(store, TOPIC, PARTITION, None)
    run(first, records([claim_record(PK, 3), (a, b"\x00" * 8)], epochs=[3, 3]), 10, 10)
    assert (store.changelog_offset, store.writer_epoch) == (1, 3)
    # the tail after a restart: a zombie of epoch 2 wrote after the local store's offset
    again = RestoreTarget(store, TOPIC, PARTITION, None)
    plan_start(again)
    assert again.start == 2 and again.epochs.highest == 3
    run(again, records([(a, b"\x00" * 7 + b"\x09")], first=2, epochs=[2]), 10, 10)
    assert stored(store)[a] == b"\x00" * 8
    assert again.fenced == {a}


@pytest.mark.parametrize(
    "bad_key",
    [
        None,
        b"foreign-key",
        "a str",
        encode_storage_key(OTHER_PK, "count", b"u1"),
        encode_metadata_key(OTHER_PK, "state:count"),
        partition_prefix(PK)[:-1],
    ],
)
@pytest.mark.parametrize("valid_until", [None, 2, -1])
@pytest.mark.parametrize("with_meta", [True, False])
def test_a_key_outside_the_namespace_stops_the_restore_naming_its_offset(
    make_store: Callable[..., OperatorStateStore],
    bad_key: Any,
    valid_until: int | None,
    with_meta: bool,
) -> None:
    store = make_store()
    target = RestoreTarget(store, TOPIC, PARTITION, valid_until)
    target.apply(records([(state_key(0), b"a")]), 1)  # flushed: a batch of its own
    other: tuple[bytes, bytes | None] = (
        (META_KEY, meta_value()) if with_meta else (state_key(3), b"")
    )
    pairs = [(state_key(1), b"b"), other, (bad_key, b"x"), (state_key(2), b"c")]
    with pytest.raises(ChangelogCorruptError) as err:
        target.apply(records(pairs, first=5), 100)
    where = f"topic {TOPIC!r} partition {PARTITION} offset 7"
    assert where in str(err.value) and "namespace" in str(err.value)
    assert (err.value.topic, err.value.partition, err.value.offset) == (TOPIC, PARTITION, 7)
    # nothing of the failing batch was written
    assert state_key(1) not in stored(store) and state_key(2) not in stored(store)


def test_records_past_valid_until_are_not_applied_and_their_keys_are_rewritten(
    make_store: Callable[..., OperatorStateStore],
) -> None:
    store = make_store()
    target = RestoreTarget(store, TOPIC, PARTITION, valid_until=3)
    pairs = [(state_key(i % 3), b"%d" % i) for i in range(8)]  # offsets 0..7
    run(target, records(pairs), chunk=3, batch_size=100)  # the cut falls inside a chunk
    assert target.last_applied == 3
    assert target.stale == {state_key(1), state_key(2), state_key(0)}
    assert stored(store)[state_key(0)] == b"3" and stored(store)[state_key(2)] == b"2"
    # the next checkpoint rewrites the stale keys with the committed (restored) values
    changes = dict(store.take_changes())
    assert {k: changes[k] for k in target.stale} == {
        state_key(0): b"3",
        state_key(1): b"1",
        state_key(2): b"2",
    }


def test_incompatible_metadata_stops_the_restore_before_its_batch_is_written(
    make_store: Callable[..., OperatorStateStore],
) -> None:
    store = make_store(Changed())
    target = RestoreTarget(store, TOPIC, PARTITION, None)
    with pytest.raises(StateMetadataError, match=r"serde 'int64' -> 'str'"):
        target.apply(records([(state_key(1), b"x"), (META_KEY, meta_value())]), 1)
    assert stored(store) == {}


def test_metadata_past_valid_until_is_neither_applied_nor_checked(
    make_store: Callable[..., OperatorStateStore],
) -> None:
    store = make_store(Changed())
    target = RestoreTarget(store, TOPIC, PARTITION, valid_until=0)
    run(target, records([(state_key(1), b"x"), (META_KEY, meta_value())]), 10, 10)
    assert stored(store) == {state_key(1): b"x"}
    assert target.stale == {META_KEY}


def test_restored_metadata_is_no_longer_pending(
    make_store: Callable[..., OperatorStateStore],
) -> None:
    with_meta = make_store()
    run(
        RestoreTarget(with_meta, TOPIC, PARTITION, None),
        records([(META_KEY, meta_value()), (state_key(1), b"x")]),
        10,
        10,
    )
    assert with_meta.take_changes() == []
    without = make_store()
    run(RestoreTarget(without, TOPIC, PARTITION, None), records([(state_key(1), b"x")]), 10, 10)
    assert [k for k, _ in without.take_changes()] == [META_KEY]


def test_restore_does_not_fill_the_cache(make_store: Callable[..., OperatorStateStore]) -> None:
    store = make_store()
    run(
        RestoreTarget(store, TOPIC, PARTITION, None),
        records([(state_key(i), b"\x00" * 7 + bytes([i])) for i in range(50)]),
        20,
        20,
    )
    assert store.stats().cached_entries == 0
    store.current_key = b"u7"
    assert store.handles()["count"].value() == 7  # type: ignore[attr-defined]
    assert store.stats().cached_entries == 1  # loaded on first access


def test_the_fault_hook_fires_once_per_flushed_batch(
    make_store: Callable[..., OperatorStateStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    phases: list[str] = []
    monkeypatch.setattr(restore_module, "maybe_crash", phases.append)
    store = make_store()
    target = RestoreTarget(store, TOPIC, PARTITION, None)
    recs = records([(state_key(i), b"v") for i in range(10)])
    for i in range(0, 10, 2):  # chunks of 2, batches of 4: flushes after 4, 8
        target.apply(recs[i : i + 2], 4)
    assert phases == ["during-restore"] * 2
    assert len(stored(store)) == 8
    target.finish()  # the last partial batch: written, no hook
    assert phases == ["during-restore"] * 2
    assert len(stored(store)) == 10


def test_empty_fetches_change_nothing(make_store: Callable[..., OperatorStateStore]) -> None:
    store = make_store()
    target = RestoreTarget(store, TOPIC, PARTITION, 5)
    target.apply([], 1)
    target.finish()
    assert (target.applied, target.last_applied, target.stale) == (0, None, set())
    assert store.changelog_offset is None
