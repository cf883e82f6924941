"""Serdes: round trips, Kafka byte compatibility, and the one wrapped error type."""

from __future__ import annotations

import pickle
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from headrace.operators.serde import (
    BYTES,
    FLOAT,
    INT,
    JSON,
    MSGPACK,
    STR,
    Serde,
    SerdeError,
    deserialize_or_raise,
    pickle_serde,
    serde_for,
    serialize_or_raise,
    wrap,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)


@given(json_values)
def test_json_and_msgpack_round_trip(value: Any) -> None:
    assert JSON.deserialize(JSON.serialize(value)) == value
    assert MSGPACK.deserialize(MSGPACK.serialize(value)) == value


@given(st.integers(-(2**63), 2**63 - 1))
def test_int_is_kafka_long(value: int) -> None:
    data = INT.serialize(value)
    assert data == struct.pack(">q", value)  # Kafka LongSerializer: 8 bytes big-endian
    assert INT.deserialize(data) == value


@given(st.floats(allow_nan=False))
def test_float_round_trip(value: float) -> None:
    assert FLOAT.deserialize(FLOAT.serialize(value)) == value


@given(st.text(), st.binary())
def test_str_and_bytes(text: str, data: bytes) -> None:
    assert STR.deserialize(STR.serialize(text)) == text
    assert BYTES.deserialize(BYTES.serialize(data)) == data


def test_msgpack_keeps_int_map_keys() -> None:
    assert MSGPACK.deserialize(MSGPACK.serialize({1: "a"})) == {1: "a"}


def test_serde_for() -> None:
    assert serde_for(int) is INT
    assert serde_for(str) is STR
    assert serde_for(bytes) is BYTES
    assert serde_for(float) is FLOAT
    assert serde_for(None) is JSON
    assert serde_for(dict) is JSON
    assert serde_for(bool) is JSON  # bool is an int subclass but must not become int64


def test_pickle_is_opt_in_only() -> None:
    serde = pickle_serde()
    assert serde.name == "pickle"
    assert serde.deserialize(serde.serialize({"a": (1, 2)})) == {"a": (1, 2)}
    assert "executes code" in (pickle_serde.__doc__ or "").replace("\n", " ")
    for tp in (int, str, bytes, float, dict, list, object, None):
        assert serde_for(tp).name != "pickle"


def test_serde_is_two_plain_callables() -> None:
    serde: Serde[int] = Serde("x", lambda v: bytes([v]), lambda b: b[0])
    assert serde.deserialize(serde.serialize(7)) == 7
    with pytest.raises(AttributeError):
        serde.name = "y"  # type: ignore[misc]


def test_serde_error_names_what_and_key() -> None:
    with pytest.raises(SerdeError) as info:
        deserialize_or_raise(JSON, b"{not json", "topic t partition 3 offset 17", b"k1")
    err = info.value
    assert err.what == "topic t partition 3 offset 17"
    assert err.key == b"k1"
    assert isinstance(err.__cause__, ValueError)
    assert "topic t partition 3 offset 17" in str(err) and "b'k1'" in str(err)

    with pytest.raises(SerdeError, match="cannot serialize"):
        serialize_or_raise(INT, 2**70, "state 'count' of operator 'counter'", "user-1")


def test_serde_error_pickles() -> None:
    err = SerdeError("state 'x' of operator 'o'", b"k", "boom")
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.what, clone.key, str(clone)) == (err.what, err.key, str(err))


def test_wrap() -> None:
    wrapped = wrap(INT, "topic t")
    assert wrapped.name == INT.name
    assert wrapped.deserialize(wrapped.serialize(5)) == 5
    with pytest.raises(SerdeError, match="topic t"):
        wrapped.deserialize(b"short")


def test_serializer_must_return_bytes() -> None:
    bad: Serde[str] = Serde("bad", lambda v: v, lambda b: b.decode())  # type: ignore[arg-type,return-value]
    with pytest.raises(SerdeError, match="expected bytes"):
        serialize_or_raise(bad, "x", "state 'x'")
