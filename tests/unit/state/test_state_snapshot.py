"""Snapshot codec: round trips, and every truncation/corruption rejected with a clear error."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from headrace.runtime.state.snapshot import MAGIC, SnapshotError, decode_snapshot, encode_snapshot

entries_st = st.dictionaries(st.binary(max_size=12), st.binary(max_size=12), max_size=8).map(
    lambda d: sorted(d.items())
)


@given(st.integers(0, 2**64 - 1), entries_st)
def test_round_trip(checkpoint_id: int, entries: list[tuple[bytes, bytes]]) -> None:
    assert decode_snapshot(encode_snapshot(checkpoint_id, entries)) == (checkpoint_id, entries)


SAMPLE = encode_snapshot(42, [(b"", b""), (b"key-1", b"value-1"), (b"k\xff", b"\x00" * 5)])


def test_every_truncation_rejected() -> None:
    for size in range(len(SAMPLE)):
        with pytest.raises(SnapshotError, match=r"truncated|bad magic") as info:
            decode_snapshot(SAMPLE[:size])
        if size >= 4:
            assert f"truncated at byte {size}" in str(info.value)


def test_every_single_byte_corruption_rejected() -> None:
    """Exhaustive: every position, every other byte value (crc32 catches all of these)."""
    data = bytearray(SAMPLE)
    for pos in range(len(data)):
        original = data[pos]
        for value in range(256):
            if value == original:
                continue
            data[pos] = value
            with pytest.raises(SnapshotError):
                decode_snapshot(bytes(data))
        data[pos] = original
    assert decode_snapshot(bytes(data))[0] == 42


def test_error_messages_name_the_defect() -> None:
    with pytest.raises(SnapshotError, match="bad magic"):
        decode_snapshot(b"XXXX" + SAMPLE[4:])
    with pytest.raises(SnapshotError, match="unsupported snapshot format version 2"):
        decode_snapshot(MAGIC + struct.pack(">H", 2) + SAMPLE[6:])
    with pytest.raises(SnapshotError, match="header checksum mismatch"):
        decode_snapshot(SAMPLE[:10] + bytes([SAMPLE[10] ^ 1]) + SAMPLE[11:])
    with pytest.raises(SnapshotError, match="body checksum mismatch"):
        decode_snapshot(SAMPLE[:40] + bytes([SAMPLE[40] ^ 1]) + SAMPLE[41:])
    with pytest.raises(SnapshotError, match="body checksum mismatch"):
        decode_snapshot(SAMPLE[:-1] + bytes([SAMPLE[-1] ^ 1]))
    with pytest.raises(SnapshotError, match="3 trailing bytes"):
        decode_snapshot(SAMPLE + b"abc")
    with pytest.raises(SnapshotError, match=f"truncated at byte {len(SAMPLE) - 1}"):
        decode_snapshot(SAMPLE[:-1])


def test_deterministic() -> None:
    entries = [(b"a", b"1"), (b"b", b"2")]
    assert encode_snapshot(1, entries) == encode_snapshot(1, iter(entries))
