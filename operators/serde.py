"""Serdes: how values become bytes and back.

A serde is deliberately nothing more than two plain callables plus a stable ``name``. Plain
callables keep the checkpoint path cheap (one call per dirty key, no method dispatch through
an object hierarchy) and let users plug in anything (protobuf, avro, a lambda) without
subclassing. The ``name`` is persisted in state metadata so that a restore can detect that the
serde of a state changed between deployments.

Every failure to (de)serialize surfaces as one exception type, :class:`SerdeError`, which says
*what* was being (de)serialized (a state of an operator, a topic/partition/offset) and the key,
so that an error policy can route it and a human can find the record.

Pickle is available only through :func:`pickle_serde`: state restored from Kafka must not be
able to execute code unless the user explicitly asked for it.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgpack  # type: ignore[import-untyped,unused-ignore]
import orjson

__all__ = [
    "BYTES",
    "FLOAT",
    "INT",
    "JSON",
    "MSGPACK",
    "STR",
    "Serde",
    "SerdeError",
    "deserialize_or_raise",
    "pickle_serde",
    "serde_for",
    "serialize_or_raise",
    "wrap",
]

T = TypeVar("T")


class SerdeError(Exception):
    """A value could not be serialized or deserialized.

    ``what`` names the thing being handled (``"state 'count' of operator 'counter'"``,
    ``"topic t partition 3 offset 17"``), ``key`` is the record/state key (may be ``None``)
    and ``__cause__`` is the original exception from the serde. One type for all serde
    failures lets error policies (fail / skip / dead-letter) catch exactly this and nothing
    else.
    """

    def __init__(self, what: str, key: object = None, detail: str = "") -> None:
        self.what = what
        self.key = key
        self.detail = detail
        message = what if key is None else f"{what}, key {key!r}"
        if detail:
            message = f"{message}: {detail}"
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions are pickled by re-calling __init__ with self.args; ours takes different
        # arguments, so spell them out (workers may ship errors across processes).
        return (type(self), (self.what, self.key, self.detail))


@dataclass(frozen=True, slots=True)
class Serde(Generic[T]):
    """A named pair of plain callables: ``serialize(T) -> bytes``, ``deserialize(bytes) -> T``.

    ``name`` must be stable across releases: it is stored in state metadata and compared on
    restore.
    """

    name: str
    serialize: Callable[[T], bytes]
    deserialize: Callable[[bytes], T]


def _json_loads(data: bytes) -> Any:
    return orjson.loads(data)


def _json_dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def _msgpack_dumps(value: Any) -> bytes:
    out = msgpack.packb(value, use_bin_type=True)
    assert isinstance(out, bytes)
    return out


def _msgpack_loads(data: bytes) -> Any:
    # strict_map_key=False: msgpack (unlike JSON) can round-trip int map keys; allow them.
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _str_dumps(value: str) -> bytes:
    return value.encode("utf-8")


def _str_loads(data: bytes) -> str:
    return bytes(data).decode("utf-8")


_INT64 = struct.Struct(">q")
_FLOAT64 = struct.Struct(">d")


def _int_dumps(value: int) -> bytes:
    return _INT64.pack(value)


def _int_loads(data: bytes) -> int:
    result: int = _INT64.unpack(data)[0]
    return result


def _float_dumps(value: float) -> bytes:
    return _FLOAT64.pack(value)


def _float_loads(data: bytes) -> float:
    result: float = _FLOAT64.unpack(data)[0]
    return result


JSON: Serde[Any] = Serde("json", _json_dumps, _json_loads)
"""orjson: fast, safe, and readable in a changelog topic; the default for anything untyped."""

MSGPACK: Serde[Any] = Serde("msgpack", _msgpack_dumps, _msgpack_loads)
"""msgpack: compact binary, keeps bytes and int map keys."""

BYTES: Serde[bytes] = Serde("bytes", bytes, bytes)
"""Raw bytes, passed through (``bytes()`` of a ``bytes`` object is the object itself)."""

STR: Serde[str] = Serde("str", _str_dumps, _str_loads)
"""UTF-8 text."""

INT: Serde[int] = Serde("int64", _int_dumps, _int_loads)
"""8-byte big-endian signed, byte-compatible with Kafka's LongSerializer/LongDeserializer."""

FLOAT: Serde[float] = Serde("float64", _float_dumps, _float_loads)
"""8-byte big-endian IEEE-754 double, byte-compatible with Kafka's DoubleSerializer."""


def _pickle_dumps(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _pickle_loads(data: bytes) -> Any:
    return pickle.loads(data)


def pickle_serde() -> Serde[Any]:
    """Return a pickle serde. EXPLICIT OPT-IN ONLY.

    WARNING: unpickling executes code chosen by whoever wrote the bytes. Anything that can
    write to the changelog or input topic can then run code inside your workers. Use it only
    for state and topics you fully control, and prefer JSON/msgpack. It is a function rather
    than a constant so that it never appears by accident in ``from ... import *`` or in
    :func:`serde_for`.
    """
    return Serde("pickle", _pickle_dumps, _pickle_loads)


def serde_for(tp: type | None) -> Serde[Any]:
    """Pick the serde for a declared Python type.

    Exact matches only: ``bool`` is a subclass of ``int`` but must not become an int64, so
    subclasses fall through to JSON like every other type.
    """
    if tp is int:
        return INT
    if tp is str:
        return STR
    if tp is bytes:
        return BYTES
    if tp is float:
        return FLOAT
    return JSON


def serialize_or_raise(serde: Serde[T], value: T, what: str, key: object = None) -> bytes:
    """Serialize ``value``; wrap any failure in :class:`SerdeError` naming ``what``/``key``."""
    try:
        data = serde.serialize(value)
    except Exception as exc:
        raise SerdeError(
            what, key, f"cannot serialize {type(value).__name__} with serde '{serde.name}': {exc}"
        ) from exc
    if not isinstance(data, bytes):
        raise SerdeError(
            what, key, f"serde '{serde.name}' returned {type(data).__name__}, expected bytes"
        )
    return data


def deserialize_or_raise(serde: Serde[T], data: bytes, what: str, key: object = None) -> T:
    """Deserialize ``data``; wrap any failure in :class:`SerdeError` naming ``what``/``key``."""
    try:
        return serde.deserialize(data)
    except Exception as exc:
        raise SerdeError(
            what, key, f"cannot deserialize {len(data)} bytes with serde '{serde.name}': {exc}"
        ) from exc


def wrap(serde: Serde[T], what: str) -> Serde[T]:
    """Return a serde with the same name whose failures raise :class:`SerdeError` naming ``what``.

    Convenient where the context is fixed (a topic); where it changes per record (an offset),
    call :func:`serialize_or_raise` / :func:`deserialize_or_raise` instead.
    """

    def ser(value: T) -> bytes:
        return serialize_or_raise(serde, value, what)

    def de(data: bytes) -> T:
        return deserialize_or_raise(serde, data, what)

    return Serde(serde.name, ser, de)
