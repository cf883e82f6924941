"""Savepoints: a job's whole state in one file, and a job started from it with other partition
counts, another name or renamed operators (offline, the way Flink rescales).

A **savepoint** is taken from a *stopped, drained* job (``headrace savepoint create``): every
worker stopped with SIGTERM (a final checkpoint each), and nothing left in flight between stages
(every repartition topic consumed to its end; barrier records do not count). Then the group's
committed offsets and the changelogs are one consistent cut of the whole job, and the file
holds it: the source offsets, and every stateful operator's entries per partition, restored
with the production restore code (:func:`headrace.runtime.checkpoint.restore.restore`) at the
committed checkpoint (at-least-once: up to ``cl``).

**Loading** it (``headrace savepoint load``, or ``headrace run --from-savepoint``) writes that
state into the changelogs of a job that has none yet, **for the job's current layout**: an
operator behind a ``key_by`` gets each key in the partition the upstream stage will send that
key to (``crc32(key bytes) % partitions``, the repartitioner's own rule), so the partition
count of a stage behind a ``key_by`` can change (``key_by(partitions=N)``); then it commits the
source offsets and, per task, checkpoint metadata that makes the written changelog the
committed state. Operator renames are mapped explicitly (``--map old=new``); any other
difference between the savepoint's job and this one is judged by the identity rules
(:func:`headrace.runtime.kafka.identity.compare`) and refused with the difference.

The file (all integers big-endian)::

    b"HRSP" u16 version
    frames: u8 type, u32 length, payload, u32 crc32(type byte + payload)
      1 header   JSON: savepoint id, job description, guarantee, checkpoint id, source offsets,
                 partition counts, operators
      2 section  JSON: operator, partition (the entries that follow belong to it)
      3 entries  msgpack list of [state key without its partition part, stored value bytes]
                 (runtime/state/keys.py: state name, user key, map key, each length-prefixed)
      9 footer   JSON: entry count, sha256 of every byte before the footer frame

It is written and read as a stream (one partition's state in memory at a time), to
``FILE.partial`` first and renamed when complete, so a kill during creation never leaves a file
that looks complete; a file without its footer, with a bad checksum or of another version is
refused before anything is written to Kafka. A load marks the job ``loading`` in its identity
topic first and clears the mark last: a load killed half-way is found by the next one, which
deletes what it wrote and starts over.

Not yet: a savepoint of a *running* job (at its next aligned checkpoint, Flink's "stop with
savepoint"), moving it through Kafka, and per-state migration functions.
"""

from headrace.runtime.savepoint.fileformat import SavepointError, read_header, summarize, verify
from headrace.runtime.savepoint.load import LoadReport, load_savepoint
from headrace.runtime.savepoint.take import create_savepoint

__all__ = [
    "LoadReport",
    "SavepointError",
    "create_savepoint",
    "load_savepoint",
    "read_header",
    "summarize",
    "verify",
]
