"""The persisted byte format of state values: what a changelog record and a backend hold.

Format version 1 (recorded per state in the store's metadata, so a future format is recognised
rather than misread):

* value, reducing, keyed: the serde's bytes; aggregating: the accumulator's serde bytes;
* list: ``u32 count`` then ``count x (u32 length, element serde bytes)``;
* map: one storage entry per map key (the storage key ends in :data:`MAP_TAG` and the framed
  map key), holding the value's serde bytes;
* TTL states put ``expires_at`` in front of those bytes: a big-endian double, seconds on the
  store's clock (:func:`with_expiry`, :func:`expiry_of`, :func:`payload`).

Kept apart from the handles (which work on Python objects in a write-back cache) so that the
format can be read, reviewed and versioned in one place.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from headrace.operators.serde import BYTES, FLOAT, INT, JSON, STR

FORMAT_VERSION = 1

U32 = struct.Struct(">I")
_EXPIRY = struct.Struct(">d")
EXPIRY_SIZE = _EXPIRY.size
#: separates a map state's user key from its map keys in a storage key
MAP_TAG = b"\x01"


def with_expiry(expires: float, data: bytes) -> bytes:
    """A TTL value: its expiry, then the value's bytes."""
    return _EXPIRY.pack(expires) + data


def expiry_of(raw: bytes) -> float:
    """The expiry in front of a TTL value's bytes."""
    (expires,) = _EXPIRY.unpack_from(raw)
    return float(expires)


def payload(raw: bytes, ttl: bool) -> bytes:
    """A stored value's serde bytes (without the expiry of a TTL value)."""
    return raw[EXPIRY_SIZE:] if ttl else raw


def encode_list(values: Iterable[Any], serialize: Callable[[Any], bytes]) -> bytes:
    """``u32 count`` then each element as ``u32 length`` + its serde bytes."""
    pack = U32.pack
    items = list(values)
    parts = [pack(len(items))]
    for element in items:
        data = serialize(element)
        parts.append(pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def decode_list(data: bytes, deserialize: Callable[[bytes], Any]) -> list[Any]:
    """The inverse of :func:`encode_list`; refuses truncated or trailing bytes."""
    view = memoryview(data)
    (count,) = U32.unpack_from(view, 0)
    pos = 4
    out = []
    for _ in range(count):
        (length,) = U32.unpack_from(view, pos)
        pos += 4
        if pos + length > len(view):
            raise ValueError("list element runs past the end of the stored value")
        out.append(deserialize(bytes(view[pos : pos + length])))
        pos += length
    if pos != len(view):
        raise ValueError(f"{len(view) - pos} trailing bytes after the list elements")
    return out


#: Narrower C-level variants of the built-in serdes' functions, tried first on the per-record
#: path and in the handles' serialisation of a checkpoint's changes. Wherever a variant
#: returns, its result equals the serde function's; where it raises (another input type such
#: as a bytearray, or a genuinely bad value) the serde's own function runs and decides, so
#: results and reported errors are the serde's.
_FAST_SERDE: dict[Any, Callable[[Any], Any]] = {
    STR.deserialize: bytes.decode,  # bytes(data).decode("utf-8")
    STR.serialize: str.encode,  # value.encode("utf-8"); (a str subclass overriding encode()
    # is encoded as the str it is)
    BYTES.deserialize: bytes.__bytes__,  # bytes(data): BYTES.serialize is the same function
    INT.serialize: struct.Struct(">q").pack,
    FLOAT.serialize: struct.Struct(">d").pack,
    JSON.deserialize: orjson.loads,
    JSON.serialize: orjson.dumps,
}


def fast_serde_function(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The faster variant of a built-in serde function (see _FAST_SERDE), else ``fn``."""
    try:
        return _FAST_SERDE.get(fn, fn)
    except TypeError:  # an unhashable callable object
        return fn
