"""Storage-key encoding: an unambiguous, ordered namespace for every byte of state.

Layout of a state key (all integers fixed-width unsigned 32-bit big-endian)::

    0x01                                   namespace: state
    len(operator_id) operator_id(utf-8)
    partition_id subtask_index
    len(state_name) state_name(utf-8)
    len(user_key) user_key
    [0x01 map_key]                         only for MapState entries; map_key runs to the end

and of a store metadata key::

    0x00 len(operator_id) operator_id partition_id subtask_index len(name) name

Why length prefixes: the seed's ``"{op}:{partition}:{subtask}:"`` lets operator ``"a:1"`` of
partition 2 collide with operator ``"a"`` of partition 1. Every variable part here carries its
length first, so the decoding is unique whatever bytes a part contains.

Why fixed u32 rather than varints: one ``struct`` call decodes a header, numbers sort
numerically under byte order (partition 2 before partition 10, so a scan walks partitions in
order), and the extra bytes are part of a shared prefix that RocksDB's block prefix
compression elides; the memory backend pays ~6 bytes per key, which we accept for simplicity.

Why the order of parts: the namespace byte, then the partition key, then the state name, then
the user key, so ``state_prefix(pk, name)`` selects exactly one state of one partition and
``state_prefix(pk, name, user_key)`` exactly one user key's entries (all map entries of it).
Metadata lives under namespace 0x00 so it never appears in a state scan.

The map key is not length-prefixed: it is the last part, so its bytes order map entries the
way the key serde orders them, and the explicit 0x01 tag distinguishes "no map key" from an
empty map key.

Nothing in a key depends on the worker holding the task, so state keys survive rebalances.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "NS_METADATA",
    "NS_STATE",
    "KeyFormatError",
    "StatePartitionKey",
    "decode_metadata_key",
    "decode_storage_key",
    "encode_metadata_key",
    "encode_storage_key",
    "metadata_prefix",
    "partition_prefix",
    "prefix_successor",
    "split_state_suffix",
    "state_prefix",
    "user_key_suffix",
]

NS_METADATA = b"\x00"
NS_STATE = b"\x01"
_MAP_TAG = b"\x01"
_U32 = struct.Struct(">I")
_U32_MAX = 0xFFFFFFFF
_U32x2 = struct.Struct(">II")


class KeyFormatError(ValueError):
    """Bytes that are not a storage key of the expected namespace."""


@dataclass(frozen=True, slots=True)
class StatePartitionKey:
    """Which operator, partition and subtask a piece of state belongs to."""

    operator_id: str
    partition_id: int
    subtask_index: int

    def __post_init__(self) -> None:
        if not 0 <= self.partition_id <= _U32_MAX:
            raise ValueError(f"partition_id out of range: {self.partition_id}")
        if not 0 <= self.subtask_index <= _U32_MAX:
            raise ValueError(f"subtask_index out of range: {self.subtask_index}")


def _part(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def _pk_body(pk: StatePartitionKey) -> bytes:
    return _part(pk.operator_id.encode("utf-8")) + _U32x2.pack(pk.partition_id, pk.subtask_index)


def partition_prefix(pk: StatePartitionKey) -> bytes:
    """Prefix of every state key of one operator/partition/subtask."""
    return NS_STATE + _pk_body(pk)


def metadata_prefix(pk: StatePartitionKey) -> bytes:
    """Prefix of every metadata key of one operator/partition/subtask."""
    return NS_METADATA + _pk_body(pk)


def state_prefix(pk: StatePartitionKey, state_name: str, user_key: bytes | None = None) -> bytes:
    """Prefix selecting one state (or one user key of it, including all its map entries)."""
    prefix = partition_prefix(pk) + _part(state_name.encode("utf-8"))
    if user_key is not None:
        prefix += _part(user_key)
    return prefix


def user_key_suffix(user_key: bytes) -> bytes:
    """The user-key part appended to a state prefix (what the store adds per key)."""
    return _U32.pack(len(user_key)) + user_key


def encode_storage_key(
    pk: StatePartitionKey, state_name: str, user_key: bytes, map_key: bytes | None = None
) -> bytes:
    """The full storage key of one state entry."""
    key = state_prefix(pk, state_name, user_key)
    if map_key is not None:
        key += _MAP_TAG + map_key
    return key


def encode_metadata_key(pk: StatePartitionKey, name: str) -> bytes:
    """A store metadata key (never inside any state prefix)."""
    return metadata_prefix(pk) + _part(name.encode("utf-8"))


def prefix_successor(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with ``prefix``.

    ``None`` when there is none (empty prefix or all 0xff bytes).
    """
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


class _Reader:
    """Cursor over a key; every read names what was truncated."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise KeyFormatError(
                f"storage key truncated reading {what}: needs {n} bytes at offset {self.pos}, "
                f"key has {len(self.data)}"
            )
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u32(self, what: str) -> int:
        value: int = _U32.unpack(self.take(4, what))[0]
        return value

    def part(self, what: str) -> bytes:
        return self.take(self.u32(f"length of {what}"), what)

    def text(self, what: str) -> str:
        raw = self.part(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise KeyFormatError(f"storage key has invalid utf-8 in {what}: {exc}") from exc


def _read_pk(reader: _Reader) -> StatePartitionKey:
    operator_id = reader.text("operator id")
    partition = reader.u32("partition id")
    subtask = reader.u32("subtask index")
    return StatePartitionKey(operator_id, partition, subtask)


def decode_storage_key(key: bytes) -> tuple[StatePartitionKey, str, bytes, bytes | None]:
    """Inverse of :func:`encode_storage_key`; raises :class:`KeyFormatError` on bad input."""
    if key[:1] != NS_STATE:
        raise KeyFormatError(f"not a state key (namespace byte {key[:1]!r}, expected 0x01)")
    reader = _Reader(key)
    reader.pos = 1
    pk = _read_pk(reader)
    state_name = reader.text("state name")
    user_key = reader.part("user key")
    rest = key[reader.pos :]
    if not rest:
        return pk, state_name, user_key, None
    if rest[:1] != _MAP_TAG:
        raise KeyFormatError(f"storage key has unexpected byte {rest[:1]!r} after the user key")
    return pk, state_name, user_key, rest[1:]


def decode_metadata_key(key: bytes) -> tuple[StatePartitionKey, str]:
    """Inverse of :func:`encode_metadata_key`."""
    if key[:1] != NS_METADATA:
        raise KeyFormatError(f"not a metadata key (namespace byte {key[:1]!r}, expected 0x00)")
    reader = _Reader(key)
    reader.pos = 1
    pk = _read_pk(reader)
    name = reader.text("metadata name")
    if reader.pos != len(key):
        raise KeyFormatError(f"metadata key has {len(key) - reader.pos} trailing bytes")
    return pk, name


def split_state_suffix(suffix: bytes) -> tuple[str, bytes, bytes | None]:
    """(state name, user key, map key or None) of a state key without its partition part
    (``key[len(partition_prefix(pk)):]``): what a savepoint stores, so that the entries move
    to another partition by prepending another partition prefix."""
    n = int.from_bytes(suffix[0:4], "big")
    name = suffix[4 : 4 + n].decode()
    i = 4 + n
    u = int.from_bytes(suffix[i : i + 4], "big")
    user_key = suffix[i + 4 : i + 4 + u]
    rest = suffix[i + 4 + u :]
    if rest and rest[:1] != _MAP_TAG:
        raise KeyFormatError(f"bad state key suffix {suffix[:60]!r}")
    return name, user_key, (rest[1:] if rest else None)
