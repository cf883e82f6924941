"""Versioned, checksummed binary snapshot of a backend.

Layout (integers big-endian)::

    offset  size  field
    0       4     magic  b"HRSN"
    4       2     format version (1)
    6       2     flags (0; reserved)
    8       8     checkpoint id (unsigned)
    16      8     entry count
    24      8     body length in bytes
    32      4     header crc32 (of bytes 0..32)
    36      ...   body: entry_count x (u32 key length, key, u32 value length, value)
    36+len  4     body crc32 (of the body)

Why two checksums: the header crc makes the lengths trustworthy *before* they are used, so
every error names what is really wrong: a corrupted length field is reported as a header
checksum mismatch, not as a misleading "truncated" or "trailing bytes"; with lengths trusted,
a short input is exactly "truncated at byte N" and a long one exactly "trailing bytes".

Why crc32 (``zlib.crc32``): it is in the standard library, runs at memory speed, and detects
every burst error up to 32 bits, so every single-byte corruption is caught deterministically
(a test enumerates all of them). It is an integrity check against accidents, not an
authenticity check against an attacker.

Entries are written in key order so equal states produce byte-identical snapshots.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "SnapshotError",
    "decode_snapshot",
    "encode_snapshot",
]

MAGIC = b"HRSN"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">4sHHQQQ")
_U32 = struct.Struct(">I")
_HEADER_SIZE = _HEADER.size + 4  # header + its crc
_TRAILER_SIZE = 4


class SnapshotError(ValueError):
    """A snapshot that must not be restored; the message says exactly why."""


def encode_snapshot(checkpoint_id: int, entries: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Encode ``entries`` (in the order given; backends pass them sorted)."""
    body = bytearray()
    count = 0
    pack = _U32.pack
    for key, value in entries:
        body += pack(len(key))
        body += key
        body += pack(len(value))
        body += value
        count += 1
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, checkpoint_id, count, len(body))
    return b"".join((header, pack(zlib.crc32(header)), bytes(body), pack(zlib.crc32(body))))


def decode_snapshot(data: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    """Decode and fully validate a snapshot; raise :class:`SnapshotError` on any defect."""
    size = len(data)
    if size < 4:
        raise SnapshotError(f"snapshot truncated at byte {size}: shorter than the magic")
    if data[:4] != MAGIC:
        raise SnapshotError(f"bad magic {bytes(data[:4])!r}, expected {MAGIC!r}")
    if size < 6:
        raise SnapshotError(f"snapshot truncated at byte {size}: no format version")
    (version,) = struct.unpack_from(">H", data, 4)
    if version != FORMAT_VERSION:
        raise SnapshotError(
            f"unsupported snapshot format version {version} (this build reads {FORMAT_VERSION})"
        )
    if size < _HEADER_SIZE:
        raise SnapshotError(f"snapshot truncated at byte {size}: header needs {_HEADER_SIZE} bytes")
    _, _, flags, checkpoint_id, count, body_len = _HEADER.unpack_from(data, 0)
    (header_crc,) = _U32.unpack_from(data, _HEADER.size)
    if zlib.crc32(data[: _HEADER.size]) != header_crc:
        raise SnapshotError("header checksum mismatch: the snapshot header is corrupted")
    if flags != 0:
        raise SnapshotError(f"unsupported snapshot flags {flags:#06x}")
    expected = _HEADER_SIZE + body_len + _TRAILER_SIZE
    if size < expected:
        raise SnapshotError(f"snapshot truncated at byte {size}: header declares {expected} bytes")
    if size > expected:
        raise SnapshotError(
            f"{size - expected} trailing bytes after the end of the snapshot at byte {expected}"
        )
    body_end = _HEADER_SIZE + body_len
    (body_crc,) = _U32.unpack_from(data, body_end)
    view = memoryview(data)
    if zlib.crc32(view[_HEADER_SIZE:body_end]) != body_crc:
        raise SnapshotError("body checksum mismatch: the snapshot entries are corrupted")
    entries = _decode_body(view, _HEADER_SIZE, body_end, count)
    return checkpoint_id, entries


def _decode_body(view: memoryview, pos: int, end: int, count: int) -> list[tuple[bytes, bytes]]:
    # The body crc matched, so inconsistencies below mean a writer bug, not line noise; still
    # check every bound so a bad writer can never make us restore half a state.
    entries: list[tuple[bytes, bytes]] = []
    unpack = _U32.unpack_from
    for index in range(count):
        parts: list[bytes] = []
        for what in ("key", "value"):
            if pos + 4 > end:
                raise SnapshotError(f"entry {index}: {what} length runs past the body end")
            (length,) = unpack(view, pos)
            pos += 4
            if pos + length > end:
                raise SnapshotError(f"entry {index}: {what} runs past the body end")
            parts.append(bytes(view[pos : pos + length]))
            pos += length
        entries.append((parts[0], parts[1]))
    if pos != end:
        raise SnapshotError(f"body has {end - pos} bytes after the last of {count} entries")
    return entries
