"""Storage keys: unambiguous, ordered, and metadata kept out of state scans."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from headrace.runtime.state.keys import (
    KeyFormatError,
    StatePartitionKey,
    decode_metadata_key,
    decode_storage_key,
    encode_metadata_key,
    encode_storage_key,
    metadata_prefix,
    partition_prefix,
    prefix_successor,
    state_prefix,
)

pks = st.builds(
    StatePartitionKey,
    st.text(max_size=8),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
)
names = st.text(max_size=8)
parts = st.tuples(pks, names, st.binary(max_size=8), st.none() | st.binary(max_size=8))


def test_operator_id_with_colon_cannot_collide() -> None:
    """The seed's "{op}:{partition}:{subtask}:" prefix made these two the same bytes."""
    pk_a, pk_b = StatePartitionKey("a:1", 2, 3), StatePartitionKey("a", 1, 2)
    seed_a = b"a:1:2:3:" + b"k"  # operator "a:1", partition 2, subtask 3, user key "k"
    seed_b = b"a:1:2:" + b"3:k"  # operator "a", partition 1, subtask 2, user key "3:k"
    assert seed_a == seed_b  # the ambiguity this encoding exists to remove

    a = encode_storage_key(pk_a, "s", b"k")
    b = encode_storage_key(pk_b, "s", b"3:k")
    assert a != b
    assert decode_storage_key(a) == (pk_a, "s", b"k", None)
    assert decode_storage_key(b) == (pk_b, "s", b"3:k", None)
    # No key of one namespace falls into another namespace's scans.
    assert not a.startswith(partition_prefix(pk_b))
    assert not b.startswith(partition_prefix(pk_a))
    # Separators in state names and user keys cannot reach across either.
    c = encode_storage_key(StatePartitionKey("op", 0, 0), "x:y", b"k")
    d = encode_storage_key(StatePartitionKey("op", 0, 0), "x", b"y:k")
    assert c != d
    assert not c.startswith(state_prefix(StatePartitionKey("op", 0, 0), "x"))


@given(parts)
def test_round_trip(p: tuple[StatePartitionKey, str, bytes, bytes | None]) -> None:
    assert decode_storage_key(encode_storage_key(*p)) == p


@given(parts, parts)
def test_injective_and_prefix_exact(
    a: tuple[StatePartitionKey, str, bytes, bytes | None],
    b: tuple[StatePartitionKey, str, bytes, bytes | None],
) -> None:
    ka, kb = encode_storage_key(*a), encode_storage_key(*b)
    assert (ka == kb) == (a == b)
    # A state scan returns exactly that state of that partition.
    assert kb.startswith(state_prefix(a[0], a[1])) == (a[:2] == b[:2])
    # A user-key scan returns exactly that user key (including all its map entries).
    assert kb.startswith(state_prefix(a[0], a[1], a[2])) == (a[:3] == b[:3])
    assert kb.startswith(partition_prefix(a[0])) == (a[0] == b[0])


@given(pks, names, parts)
def test_metadata_never_in_state_scans(
    pk: StatePartitionKey, name: str, p: tuple[StatePartitionKey, str, bytes, bytes | None]
) -> None:
    meta = encode_metadata_key(pk, name)
    assert decode_metadata_key(meta) == (pk, name)
    assert meta.startswith(metadata_prefix(pk))
    assert not meta.startswith(partition_prefix(p[0]))
    assert not meta.startswith(state_prefix(p[0], p[1]))
    assert not encode_storage_key(*p).startswith(metadata_prefix(pk))


def test_order_one_state_is_contiguous() -> None:
    pk = StatePartitionKey("op", 2, 0)
    keys = sorted(
        [encode_storage_key(pk, "b", bytes([i])) for i in range(5)]
        + [encode_storage_key(pk, "a", b"z"), encode_storage_key(pk, "c", b"")]
        + [encode_storage_key(StatePartitionKey("op", 10, 0), "b", b"\x00")]
    )
    states = [decode_storage_key(k)[1] for k in keys]
    assert states == ["a", "b", "b", "b", "b", "b", "c", "b"]  # partition 2 before 10


def test_map_key_none_vs_empty() -> None:
    pk = StatePartitionKey("op", 0, 0)
    assert encode_storage_key(pk, "m", b"u") != encode_storage_key(pk, "m", b"u", b"")
    assert decode_storage_key(encode_storage_key(pk, "m", b"u", b""))[3] == b""


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a state key"),
        (b"\x00abc", "not a state key"),
        (b"\x01\x00\x00", "truncated reading length of operator id"),
        (b"\x01\x00\x00\x00\x05ab", "truncated reading operator id"),
        (encode_storage_key(StatePartitionKey("o", 0, 0), "s", b"u") + b"\x07", "unexpected"),
        (b"\x01\x00\x00\x00\x01\xff" + b"\x00" * 8, "invalid utf-8"),
    ],
)
def test_decode_rejects(data: bytes, message: str) -> None:
    with pytest.raises(KeyFormatError, match=message):
        decode_storage_key(data)


def test_partition_key_range() -> None:
    with pytest.raises(ValueError, match="partition_id"):
        StatePartitionKey("o", -1, 0)
    with pytest.raises(ValueError, match="subtask_index"):
        StatePartitionKey("o", 0, 2**32)


@given(st.binary(max_size=6), st.binary(max_size=6))
def test_prefix_successor(prefix: bytes, other: bytes) -> None:
    end = prefix_successor(prefix)
    if end is None:
        assert prefix.strip(b"\xff") == b""
    else:
        assert end > prefix
        assert ((prefix + other) < end) is True
        if not other.startswith(prefix) and other > prefix:
            assert other >= end


@given(
    op=st.text(min_size=1, max_size=8),
    partition=st.integers(0, 2**32 - 1),
    state=st.text(max_size=8),
    user_key=st.binary(max_size=16),
    map_key=st.none() | st.binary(max_size=16),
)
def test_a_state_key_moves_to_another_partition_by_its_suffix(
    op: str, partition: int, state: str, user_key: bytes, map_key: bytes | None
) -> None:
    """What a savepoint stores (the key without its partition part) gives back the state,
    user key and map key, and a new partition prefix makes that partition's key."""
    from headrace.runtime.state.keys import partition_prefix, split_state_suffix

    pk, moved = StatePartitionKey(op, partition, partition), StatePartitionKey(op, 7, 7)
    key = encode_storage_key(pk, state, user_key, map_key)
    suffix = key[len(partition_prefix(pk)) :]
    assert split_state_suffix(suffix) == (state, user_key, map_key)
    assert partition_prefix(moved) + suffix == encode_storage_key(moved, state, user_key, map_key)
