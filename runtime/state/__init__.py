"""State layer: byte backends (memory, RocksDB), storage keys, snapshots, handles, stores.

Independent of Kafka. The runtime creates one :class:`OperatorStateStore` per operator and
task over a backend from :func:`open_backend`, binds the operator's declared state with
:meth:`OperatorStateStore.bind_operator`, sets ``store.current_key`` before each record, and
drives ``take_changes`` / ``apply_changes`` / ``restore`` from the checkpoint code.
"""

from headrace.runtime.state.backend import BACKEND_KINDS, StateBackend, open_backend
from headrace.runtime.state.keys import (
    KeyFormatError,
    StatePartitionKey,
    decode_metadata_key,
    decode_storage_key,
    encode_metadata_key,
    encode_storage_key,
    metadata_prefix,
    partition_prefix,
    state_prefix,
)
from headrace.runtime.state.memory import MemoryBackend
from headrace.runtime.state.snapshot import (
    FORMAT_VERSION,
    SnapshotError,
    decode_snapshot,
    encode_snapshot,
)
from headrace.runtime.state.store import (
    STATE_FORMAT_VERSION,
    OperatorStateStore,
    StateMetadata,
    StateMetadataError,
    StoreStats,
)

__all__ = [
    "BACKEND_KINDS",
    "FORMAT_VERSION",
    "STATE_FORMAT_VERSION",
    "KeyFormatError",
    "MemoryBackend",
    "OperatorStateStore",
    "SnapshotError",
    "StateBackend",
    "StateMetadata",
    "StateMetadataError",
    "StatePartitionKey",
    "StoreStats",
    "decode_metadata_key",
    "decode_snapshot",
    "decode_storage_key",
    "encode_metadata_key",
    "encode_snapshot",
    "encode_storage_key",
    "metadata_prefix",
    "open_backend",
    "partition_prefix",
    "state_prefix",
]
