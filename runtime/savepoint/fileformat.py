"""The savepoint file: framed, checksummed, written and read as a stream (see the package
docstring for the layout), and what ``headrace savepoint inspect`` prints of it."""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import msgpack
import orjson

from headrace.runtime.state.keys import split_state_suffix

log = logging.getLogger(__name__)

MAGIC = b"HRSP"
VERSION = 1
_FRAME = struct.Struct(">BI")
_U32 = struct.Struct(">I")
HEADER, SECTION, ENTRIES, FOOTER = 1, 2, 3, 9
_BATCH = 2_000  #: entries per frame


class SavepointError(RuntimeError):
    """A savepoint cannot be taken, read or loaded; the message says why and what to do."""


# -- the file -------------------------------------------------------------------------------------


class Writer:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        self.fh: BinaryIO = open(self.partial, "wb")  # noqa: SIM115 - closed in finish/abort
        self.digest = hashlib.sha256()
        self.entries = 0
        self._raw(MAGIC + struct.pack(">H", VERSION))

    def _raw(self, data: bytes) -> None:
        self.fh.write(data)
        self.digest.update(data)

    def frame(self, kind: int, payload: bytes) -> None:
        head = _FRAME.pack(kind, len(payload))
        crc = zlib.crc32(payload, zlib.crc32(head[:1]))
        self._raw(head + payload + _U32.pack(crc))

    def finish(self) -> None:
        footer = orjson.dumps({"entries": self.entries, "sha256": self.digest.hexdigest()})
        self.frame(FOOTER, footer)
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        self.fh.close()
        self.partial.unlink(missing_ok=True)


def _frames(path: Path) -> Iterator[tuple[int, bytes]]:
    """Every frame of a savepoint, checked; the footer's checksum is checked last."""
    digest = hashlib.sha256()
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise SavepointError(f"cannot open savepoint {path}: {exc}") from exc
    with fh:
        start = fh.read(6)
        if len(start) < 6 or start[:4] != MAGIC:
            raise SavepointError(f"{path} is not a headrace savepoint (no {MAGIC!r} magic)")
        (version,) = struct.unpack(">H", start[4:])
        if version != VERSION:
            raise SavepointError(
                f"{path}: savepoint format {version}, this headrace reads {VERSION}"
            )
        digest.update(start)
        at = 6
        while True:
            head = fh.read(_FRAME.size)
            if not head:
                raise SavepointError(f"{path} is incomplete: it ends at byte {at} without a footer")
            if len(head) < _FRAME.size:
                raise SavepointError(f"{path} is truncated at byte {at + len(head)}")
            kind, length = _FRAME.unpack(head)
            payload = fh.read(length)
            crc = fh.read(4)
            if len(payload) < length or len(crc) < 4:
                raise SavepointError(f"{path} is truncated in the frame at byte {at}")
            if zlib.crc32(payload, zlib.crc32(head[:1])) != _U32.unpack(crc)[0]:
                raise SavepointError(
                    f"{path} is corrupted: checksum mismatch in the frame at byte {at}"
                )
            if kind == FOOTER:
                footer = orjson.loads(payload)
                if footer.get("sha256") != digest.hexdigest():
                    raise SavepointError(f"{path} is corrupted: its digest does not match")
                if fh.read(1):
                    raise SavepointError(f"{path} has bytes after its footer")
                yield kind, payload
                return
            digest.update(head + payload + crc)
            at += _FRAME.size + length + 4
            yield kind, payload


def verify(path: Path) -> dict[str, Any]:
    """Read the whole file once and check every checksum; the header."""
    header: dict[str, Any] | None = None
    entries = 0
    for kind, payload in _frames(path):
        if kind == HEADER:
            header = orjson.loads(payload)
        elif kind == ENTRIES:
            entries += len(msgpack.unpackb(payload))
        elif kind == FOOTER and orjson.loads(payload)["entries"] != entries:
            raise SavepointError(f"{path}: the footer counts another number of entries")
    if header is None:
        raise SavepointError(f"{path} has no header")
    return header


def read_header(path: Path) -> dict[str, Any]:
    return verify(path)


def sections(path: Path) -> Iterator[tuple[str, int, list[list[Any]]]]:
    """(operator, partition, entries) per frame of entries, in file order."""
    current: tuple[str, int] | None = None
    for kind, payload in _frames(path):
        if kind == SECTION:
            doc = orjson.loads(payload)
            current = (doc["operator"], int(doc["partition"]))
        elif kind == ENTRIES:
            assert current is not None
            yield current[0], current[1], msgpack.unpackb(payload)


# -- inspect --------------------------------------------------------------------------------------


def summarize(path: Path, key: str | None = None, limit: int = 20) -> str:
    """What a savepoint holds (checked in full); with ``key``, that key's entries."""
    header = verify(path)
    lines = [
        f"savepoint {header['id']} of job {header['job']['job']!r}, created {header['created']}",
        f"  guarantee {header['guarantee']}, checkpoint {header['checkpoint']}",
        f"  partitions per stage: {header['stages']}",
        f"  source offsets: {header['sources']}",
    ]
    # per operator and state: entries and bytes (key + value), from one pass over the file
    sizes: dict[tuple[str, str], list[int]] = {}
    wanted = None if key is None else key.encode()
    found: list[str] = []
    for op, p, entries in sections(path):
        for suffix, raw in entries:
            state, user_key, map_key = split_state_suffix(suffix)
            counted = sizes.setdefault((op, state), [0, 0])
            counted[0] += 1
            counted[1] += len(suffix) + len(raw)
            if user_key == wanted and len(found) < limit:
                mk = "" if map_key is None else f" [{map_key!r}]"
                found.append(f"  {op}/{p} {state}{mk}: {len(raw)} bytes {bytes(raw)[:60]!r}")
    for op, doc in header["operators"].items():
        states = header["job"]["operators"][op]["states"]
        described = ", ".join(
            f"{n} ({s['kind']}, {s['serde']}: {sizes.get((op, n), [0, 0])[0]:,} entries, "
            f"{sizes.get((op, n), [0, 0])[1]:,} bytes)"
            for n, s in states.items()
        )
        lines.append(
            f"  operator {op!r} ({doc['stage']}): {sum(doc['entries']):,} entries over "
            f"{len(doc['entries'])} partitions; states {described}"
        )
    if wanted is not None:
        lines.extend(found or [f"  no entries for key {key!r}"])
    return "\n".join(lines)
