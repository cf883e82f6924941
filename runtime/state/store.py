"""OperatorStateStore: all state of one operator for one task, over one backend.

It is the write-back cache layer between handles and the backend. The checkpoint protocol
the runtime drives is::

    changes = store.take_changes()         # on barrier n: serialise each dirty key once
    ... write changes to the changelog, commit the transaction ...
    store.apply_changes(changes, changelog_offset=end)   # one atomic batch, offset included

so the backend (and, for RocksDB, the local directory) only ever holds committed state
together with the changelog offset it corresponds to: local state reuse then replays the tail
from that offset.

Store metadata (the bound states' kinds, serdes and value format, and the changelog offset)
lives in the metadata namespace of the storage keys. State metadata is also emitted once in
``take_changes`` so that it travels through the changelog and a restore on another worker can
check that the state was written by compatible descriptors.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from operator import itemgetter
from typing import Any, TypeVar, cast

import orjson

from headrace.operators.state import (
    KeyedStateDescriptor,
    MapStateDescriptor,
    StateDescriptor,
    declared_state,
)
from headrace.runtime.state.backend import StateBackend
from headrace.runtime.state.encoding import FORMAT_VERSION
from headrace.runtime.state.handles import BoundState, Change, make_handle
from headrace.runtime.state.keys import (
    KeyFormatError,
    StatePartitionKey,
    decode_metadata_key,
    decode_storage_key,
    encode_metadata_key,
    metadata_prefix,
    partition_prefix,
)

__all__ = [
    "STATE_FORMAT_VERSION",
    "OperatorStateStore",
    "StateMetadata",
    "StateMetadataError",
    "StoreStats",
]

H = TypeVar("H")

STATE_FORMAT_VERSION = FORMAT_VERSION  #: the value encodings of headrace.runtime.state.encoding
"""Version of the value encodings in :mod:`headrace.runtime.state.handles` (list framing, TTL
envelope)."""

_OFFSET_NAME = "changelog_offset"
#: a task's claim record (also written to the changelog by the owner; see
#: headrace.runtime.checkpoint.fencing, which must use the same name)
CLAIM_NAME = "writer_epoch"
_STATE_META_PREFIX = "state:"
_I64 = struct.Struct(">q")
_U64 = struct.Struct(">Q")
_RESTORE_BATCH = 10_000
_UNKNOWN: Any = object()  # changelog offset not read from the backend yet
_BYTES, _BYTES_OR_NONE = frozenset({bytes}), frozenset({bytes, type(None)})


class StateMetadataError(ValueError):
    """Stored state was written by a different declaration (kind, serde, TTL, format)."""


@dataclass(frozen=True, slots=True)
class StateMetadata:
    """What must not change about a state between the writer and the reader of its bytes."""

    name: str
    kind: str
    serde: str
    key_serde: str | None
    ttl: bool
    format_version: int = STATE_FORMAT_VERSION

    @classmethod
    def of(cls, descriptor: StateDescriptor[Any]) -> StateMetadata:
        key_serde = None
        if isinstance(descriptor, MapStateDescriptor | KeyedStateDescriptor):
            key_serde = descriptor.key_serde.name
        return cls(
            name=descriptor.state_name,
            kind=str(descriptor.kind),
            serde=descriptor.serde.name,
            key_serde=key_serde,
            ttl=descriptor.ttl is not None,
        )

    def to_bytes(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_bytes(cls, data: bytes) -> StateMetadata:
        try:
            fields = orjson.loads(data)
            return cls(**fields)
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise StateMetadataError(f"unreadable state metadata {data!r}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Point-in-time figures for metrics. key_count/size_bytes are the backend's."""

    key_count: int
    size_bytes: int
    cached_entries: int
    dirty_entries: int


class OperatorStateStore:
    """All state of ONE operator for ONE task.

    ``current_key`` is set by the runtime before each record (raw record-key bytes); scoped
    handles read it directly, so there is no per-record call into the store.
    """

    __slots__ = (
        "_changelog_offset",
        "_claim_key",
        "_clock",
        "_forced",
        "_meta_prefix",
        "_offset_key",
        "_part_prefix",
        "_pending_meta",
        "_states",
        "backend",
        "cache_max_entries",
        "current_key",
        "partition_key",
    )

    def __init__(
        self,
        backend: StateBackend,
        partition_key: StatePartitionKey,
        *,
        clock: Callable[[], float] = time.time,
        cache_max_entries: int = 100_000,
    ) -> None:
        self.backend = backend
        self.partition_key = partition_key
        self.current_key: bytes = b""
        self.cache_max_entries = cache_max_entries
        self._clock = clock
        self._states: dict[str, BoundState] = {}
        self._forced: set[bytes] = set()
        self._pending_meta: dict[bytes, bytes] = {}
        self._part_prefix = partition_prefix(partition_key)
        self._meta_prefix = metadata_prefix(partition_key)
        self._offset_key = encode_metadata_key(partition_key, _OFFSET_NAME)
        self._claim_key = encode_metadata_key(partition_key, CLAIM_NAME)
        self._changelog_offset: int | object | None = _UNKNOWN

    @property
    def clock(self) -> Callable[[], float]:
        """The TTL clock (seconds)."""
        return self._clock

    # -- binding ------------------------------------------------------------------------------

    def bind(self, descriptor: StateDescriptor[H]) -> H:
        """Create (or return the already bound) handle for ``descriptor``."""
        name = descriptor.state_name
        existing = self._states.get(name)
        if existing is not None:
            if existing.descriptor is descriptor:
                return cast(H, existing)
            raise ValueError(
                f"operator '{self.partition_key.operator_id}' already has a state named '{name}'"
            )
        meta = StateMetadata.of(descriptor)
        meta_key = self._state_meta_key(name)
        stored = self.backend.get(meta_key)
        if stored is None:
            self._pending_meta[meta_key] = meta.to_bytes()
        else:
            self._check_meta(meta, stored)
        handle = make_handle(self, descriptor)
        self._states[name] = handle
        return cast(H, handle)

    def bind_operator(self, operator: object) -> None:
        """Bind every state declared on ``type(operator)`` into ``operator.__dict__``."""
        try:
            namespace = vars(operator)
        except TypeError:
            raise TypeError(
                f"{type(operator).__qualname__} has no __dict__ (uses __slots__?): state "
                "handles are bound into the instance dictionary"
            ) from None
        for attr, descriptor in declared_state(type(operator)).items():
            if descriptor.name is None:
                descriptor.name = attr
            namespace[attr] = self.bind(descriptor)

    def handles(self) -> dict[str, BoundState]:
        """Bound handles by state name."""
        return dict(self._states)

    def metadata(self) -> dict[str, StateMetadata]:
        """What each bound state is (kind, serdes, TTL, value format)."""
        return {name: StateMetadata.of(h.descriptor) for name, h in self._states.items()}

    def _state_meta_key(self, name: str) -> bytes:
        return encode_metadata_key(self.partition_key, _STATE_META_PREFIX + name)

    def _check_meta(self, declared: StateMetadata, stored_bytes: bytes) -> None:
        stored = StateMetadata.from_bytes(stored_bytes)
        if stored == declared:
            return
        diffs = ", ".join(
            f"{field} {getattr(stored, field)!r} -> {getattr(declared, field)!r}"
            for field in ("kind", "serde", "key_serde", "ttl", "format_version", "name")
            if getattr(stored, field) != getattr(declared, field)
        )
        raise StateMetadataError(
            f"state '{declared.name}' of operator '{self.partition_key.operator_id}' "
            f"(partition {self.partition_key.partition_id}) was written with a different "
            f"declaration: {diffs}. Its stored bytes cannot be read by the new declaration; "
            "migrate the state or reset it (new state name or application id)."
        )

    # -- checkpointing ------------------------------------------------------------------------

    def take_changes(self) -> list[Change]:
        """Serialise every dirty entry once and clear the dirty marks.

        A key written several times yields one change with its latest value; written then
        cleared yields one delete. A key created and cleared within one interval that never
        reached the backend still yields a delete: detecting that would cost a backend read
        per cleared key, and a delete of a missing key is harmless (a tombstone in the
        changelog that compaction drops). Pending state metadata comes first, so a restore
        meets the metadata before the entries it describes.
        """
        out: list[Change] = list(self._pending_meta.items())
        self._pending_meta.clear()
        raw: list[bytes] = []
        if self._forced:
            for skey in self._forced:
                if not self._mark_cached(skey):
                    raw.append(skey)
            self._forced.clear()
        for handle in self._states.values():
            handle.changes(out)
        if raw:
            emitted = {key for key, _ in out}
            get = self.backend.get
            out.extend((skey, get(skey)) for skey in raw if skey not in emitted)
        return out

    def _mark_cached(self, skey: bytes) -> bool:
        if not skey.startswith(self._part_prefix):
            return False
        try:
            pk, name, user_key, map_key = decode_storage_key(skey)
        except KeyFormatError:
            return False
        handle = self._states.get(name)
        if pk != self.partition_key or handle is None:
            return False
        try:
            return handle.mark(user_key, map_key)
        except Exception:  # an undecodable key is re-emitted from the backend as bytes
            return False

    def key_image(self, ukb: bytes) -> list[tuple[BoundState, tuple[Any, bool]]]:
        """What the record-key-scoped states hold for ``ukb``, to take a record's writes back
        (see :meth:`BoundState.image`)."""
        out = []
        for handle in self._states.values():
            image = handle.image(ukb)
            if image is not None:
                out.append((handle, image))
        return out

    def restore_key_image(
        self, ukb: bytes, images: list[tuple[BoundState, tuple[Any, bool]]]
    ) -> None:
        for handle, image in images:
            handle.restore_image(ukb, image)

    def largest_write(self, ukb: bytes) -> tuple[str, int]:
        """(state name, bytes) of the largest changelog record ``ukb``'s dirty record-scoped
        states would write now ("", 0 if none)."""
        best = ("", 0)
        for name, handle in self._states.items():
            size = handle.encoded_size(ukb)
            if size > best[1]:
                best = (name, size)
        return best

    def force_dirty(self, storage_keys: Iterable[bytes]) -> None:
        """Make the next :meth:`take_changes` re-emit these keys with their current value
        (cached, else stored, else a delete): compensates stale changelog records written
        before an at-least-once crash."""
        self._forced.update(storage_keys)

    def apply_changes(
        self,
        changes: Iterable[Change],
        *,
        changelog_offset: int | None = None,
        writer_epoch: int | None = None,
    ) -> None:
        """Write a checkpoint's changes to the backend in ONE atomic batch.

        The batch also records ``changelog_offset`` (call this only after the changelog
        write committed). With ``None`` the recorded offset is deleted in the same batch:
        the local state is then ahead of any offset we could claim, so it must not be reused
        as "state at offset X". Evicts clean cache entries above ``cache_max_entries``
        afterwards: eviction happens here, never on the per-record path. ``writer_epoch``,
        when given, is recorded as the task's claim (:mod:`headrace.runtime.checkpoint.fencing`)
        in the same batch, so a warm restart resumes the epoch filter where it stopped.
        """
        batch = list(changes)
        if writer_epoch is not None:
            batch.append((self._claim_key, _U64.pack(writer_epoch)))
        offset = None if changelog_offset is None else _I64.pack(changelog_offset)
        batch.append((self._offset_key, offset))
        # Two columns for the backends' bulk path (C loops), checked as write_batch would.
        keys, values = list(map(itemgetter(0), batch)), list(map(itemgetter(1), batch))
        if set(map(type, keys)) - _BYTES or set(map(type, values)) - _BYTES_OR_NONE:
            raise TypeError("apply_changes takes (bytes, bytes | None) pairs")
        self.backend.write_columns(keys, values)
        self._changelog_offset = changelog_offset
        self._evict()

    def _evict(self) -> None:
        states = self._states.values()
        total = sum(h.cached_count() for h in states)
        excess = total - self.cache_max_entries
        if excess <= 0:
            return
        for handle in states:
            share = math.ceil(excess * handle.cached_count() / total)
            handle.evict(share)

    # -- restore / reset ----------------------------------------------------------------------

    def restore(
        self,
        changes: Iterable[Change],
        *,
        changelog_offset: int | None = None,
        batch_size: int = _RESTORE_BATCH,
    ) -> int:
        """Apply changelog records (latest bytes per key; ``None`` = tombstone) on top of the
        backend, in write batches of ``batch_size``. Returns the number of records applied.

        Cached objects and dirty marks are discarded first: the changelog is the truth. State
        metadata records for bound states are checked before their batch is written. With
        ``changelog_offset`` the offset is recorded after the last batch.
        """
        self._invalidate()
        meta_prefix = self._meta_prefix
        count = 0
        iterator: Iterator[Change] = iter(changes)
        while batch := list(islice(iterator, batch_size)):
            for key, value in batch:
                if value is not None and key.startswith(meta_prefix):
                    self._check_restored_meta(key, value)
            self.backend.write_batch(batch)
            count += len(batch)
        if changelog_offset is not None:
            self.backend.write_batch([(self._offset_key, _I64.pack(changelog_offset))])
        self._changelog_offset = _UNKNOWN
        self._refresh_pending_meta()
        return count

    def restore_columns(
        self,
        keys: list[bytes],
        values: list[bytes | None],
        metadata: Iterable[Change] = (),
    ) -> None:
        """Write ONE batch of changelog records atomically: the bulk path of
        :class:`headrace.runtime.checkpoint.restore.RestoreTarget`.

        ``keys``/``values`` are parallel lists (latest bytes per key; ``None`` = tombstone).
        The caller has already checked every key against this store's namespace, and passes
        the records among them that are in the metadata namespace as ``metadata``; those are
        checked against the bound states before anything is written. Nothing else is done
        per record here: the backend takes the lists as a trusted batch
        (:meth:`StateBackend.write_columns`). Cached objects and dirty marks are discarded
        first, as in :meth:`restore`; restored entries are not loaded into the cache.
        """
        self._invalidate()
        meta = list(metadata)
        for key, value in meta:
            if value is not None:
                self._check_restored_meta(key, value)
        self.backend.write_columns(keys, values)
        self._changelog_offset = _UNKNOWN
        if meta:  # only metadata records can change what is pending
            self._refresh_pending_meta()

    def _check_restored_meta(self, key: bytes, value: bytes) -> None:
        try:
            pk, name = decode_metadata_key(key)
        except KeyFormatError:
            return
        if pk != self.partition_key or not name.startswith(_STATE_META_PREFIX):
            return
        handle = self._states.get(name[len(_STATE_META_PREFIX) :])
        if handle is not None:
            self._check_meta(StateMetadata.of(handle.descriptor), value)

    def _refresh_pending_meta(self) -> None:
        self._pending_meta.clear()
        for name, handle in self._states.items():
            key = self._state_meta_key(name)
            stored = self.backend.get(key)
            declared = StateMetadata.of(handle.descriptor)
            if stored is None:
                self._pending_meta[key] = declared.to_bytes()
            else:
                self._check_meta(declared, stored)

    def _invalidate(self) -> None:
        for handle in self._states.values():
            handle.invalidate()
        self._forced.clear()

    def reset(self) -> None:
        """Drop all state and metadata of this store (backend and cache).

        Only this store's namespace is deleted, so stores sharing a backend are unaffected.
        Metadata (the changelog offset) goes first: a crash in between must never leave an
        offset claiming state that is gone.
        """
        self.backend.delete_prefix(self._meta_prefix)
        self.backend.delete_prefix(self._part_prefix)
        self._invalidate()
        self._changelog_offset = None
        self._refresh_pending_meta()

    # -- introspection ------------------------------------------------------------------------

    @property
    def changelog_offset(self) -> int | None:
        """The changelog offset the backend content corresponds to, if recorded."""
        offset = self._changelog_offset
        if offset is _UNKNOWN:
            raw = self.backend.get(self._offset_key)
            offset = None if raw is None else _I64.unpack(raw)[0]
            self._changelog_offset = offset
        assert offset is None or isinstance(offset, int)
        return offset

    @property
    def writer_epoch(self) -> int | None:
        """The latest writer epoch claim this store holds (None: none)."""
        raw = self.backend.get(self._claim_key)
        return None if raw is None else int(_U64.unpack(raw)[0])

    def stats(self) -> StoreStats:
        states = self._states.values()
        return StoreStats(
            key_count=self.backend.key_count(),
            size_bytes=self.backend.size_bytes(),
            cached_entries=sum(h.cached_count() for h in states),
            dirty_entries=sum(h.dirty_count() for h in states),
        )

    def dump(self) -> Iterator[tuple[str, bytes, Any, Any]]:
        """Every STORED entry of this store as ``(state name, user key bytes, map key, value)``
        (map key decoded, ``None`` except for MapState; value decoded with the bound state's
        serde, raw bytes for states that are not bound). For inspection tools: it reads the
        backend only, so call it after a restore or a checkpoint, not mid-interval."""
        for skey, raw in self.backend.range_scan(self._part_prefix):
            _, name, user_key, map_key = decode_storage_key(skey)
            handle = self._states.get(name)
            if handle is None:
                yield name, user_key, map_key, raw
            else:
                mk, value = handle.decode_entry(user_key, map_key, raw)
                yield name, user_key, mk, value

    def storage_keys(self) -> Iterator[tuple[bytes, bytes]]:
        """Every stored entry of this store's states (not metadata), in key order."""
        return self.backend.range_scan(self._part_prefix)
