"""Changelog-restore micro-benchmark (a script, not a test): ``python bench/restore_micro.py``.

What benchmark S3 measures, without a broker: after S2 the ``counts`` changelog holds one
record per distinct key (1M keys over 4 partitions). A fresh worker restores it by handing
the records that ``getmany`` returns to :meth:`RestoreTarget.apply` and calling
:meth:`RestoreTarget.finish`, and the S3 floor is a plain aiokafka read of the same records.
This script builds the records the way aiokafka delivers them (real ``ConsumerRecord`` objects
with the real storage-key layout of ``runtime/state/keys.py`` and INT-serde values, plus each
partition's state-metadata record at offset 0), cuts them into ``getmany``-sized chunks (one
partition per chunk, round robin, as aiokafka's ``fetched_records`` hands them out), and
reports CPU nanoseconds per record (``time.process_time``, all threads, so RocksDB's background
threads count; best and median of ``--runs``) for

* ``iterate``: ``for r in chunk: pass``, the least per-record Python work possible;
* ``raw_read loop``: what ``bench/systems/raw_read.py`` (the S3 floor) does per record on top of
  aiokafka: ``size += len(r.value or b"") + len(r.key or b"")``;
* ``restore <backend>``: ``RestoreTarget.apply`` for every chunk and ``finish`` for every
  target, into a real :class:`OperatorStateStore` bound to the ``Count`` operator, as
  at-least-once with ``valid_until`` = the partition's last offset (what S3 restores);
* ``aiokafka decode`` (``--decode``): the same records encoded into Kafka record batches
  (aiokafka's own ``DefaultRecordBatchBuilder``, ~5,000 records per batch as the changelog
  producer writes them) and decoded by aiokafka's fetcher code (``PartitionRecords``, CRC
  checks on), i.e. the per-record Python work both the floor and the restore pay before a
  record reaches the loop. It excludes network, broker and event-loop time.

The restore rate relative to the floor is then roughly
``(decode + raw_read loop) / (decode + restore)`` per record, before fixed costs.

The records are built once and frozen out of the garbage collector's reach (``gc.freeze``), as
in the worker, where the fetched records of one batch die before the next one is fetched. For the
same reason each chunk is *warmed* (every record, key and value touched, untimed) right before
it is timed: in the worker aiokafka has just created them, so they are in the CPU cache, while
here they were built long ago, and cache misses on 1M scattered records would otherwise dominate
the C-level passes. ``--cold`` skips the warming (an upper bound).
"""

from __future__ import annotations

import argparse
import gc
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

from aiokafka.consumer.fetcher import READ_UNCOMMITTED, PartitionRecords
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import ConsumerRecord, TopicPartition

from headrace.operators.builtins import Count
from headrace.operators.serde import INT
from headrace.runtime.checkpoint.restore import RestoreTarget
from headrace.runtime.state import OperatorStateStore, StatePartitionKey
from headrace.runtime.state.backend import open_backend
from headrace.runtime.state.keys import encode_storage_key

TOPIC = "bench.counts.changelog"
OPERATOR = "counts"


def build_records(n: int, partitions: int) -> dict[int, list[ConsumerRecord[bytes, bytes]]]:
    """Per partition: its state-metadata record, then one record per distinct key."""
    out: dict[int, list[ConsumerRecord[bytes, bytes]]] = {}
    for p in range(partitions):
        pk = StatePartitionKey(OPERATOR, p, p)
        store = OperatorStateStore(open_backend("memory"), pk)
        store.bind_operator(Count())
        meta = store.take_changes()  # the state metadata record the first checkpoint writes
        recs = [
            ConsumerRecord(TOPIC, p, off, 0, 0, k, v, None, len(k), len(v or b""), ())
            for off, (k, v) in enumerate(meta)
        ]
        out[p] = recs
    # S2's input keys are "key-%07d" in a shuffled order (bench/harness.py), STR-serialised;
    # the order matters to RocksDB (random inserts into its memtable skiplist)
    order = list(range(n))
    random.Random(7).shuffle(order)
    for i in order:
        p = i % partitions
        key = encode_storage_key(StatePartitionKey(OPERATOR, p, p), "count", b"key-%07d" % i)
        recs = out[p]
        value = INT.serialize(1)  # S2 counts every key once; a distinct object per record
        recs.append(ConsumerRecord(TOPIC, p, len(recs), 0, 0, key, value, None, len(key), 8, ()))
    return out


def chunked(
    by_partition: dict[int, list[ConsumerRecord[bytes, bytes]]], chunk: int
) -> list[tuple[int, list[ConsumerRecord[bytes, bytes]]]]:
    """getmany results in arrival order: ``chunk`` records of one partition at a time."""
    iters = {p: iter(recs) for p, recs in by_partition.items()}
    out: list[tuple[int, list[ConsumerRecord[bytes, bytes]]]] = []
    while iters:
        for p in list(iters):
            part = list(islice(iters[p], chunk))
            if part:
                out.append((p, part))
            else:
                del iters[p]
    return out


def warm(recs: list[ConsumerRecord[bytes, bytes]]) -> None:
    """Touch every record, key and value, as aiokafka's decoding just did in the worker: there
    the records of a batch are fresh in the CPU cache, whereas these were built long ago."""
    for r in recs:
        len(r.key or b"")
        len(r.value or b"")


def no_warm(recs: list[ConsumerRecord[bytes, bytes]]) -> None:
    pass


Records = list[ConsumerRecord[bytes, bytes]]
Chunks = list[tuple[int, Records]]


def per_chunk_ns(
    chunks: Chunks, fn: Callable[[Records], Any], warm_up: Callable[[Records], None]
) -> int:
    """CPU time of ``fn`` over every chunk, each chunk warmed first (not timed)."""
    gc.collect()
    spent = 0
    clock = time.process_time_ns
    for _, recs in chunks:
        warm_up(recs)
        start = clock()
        fn(recs)
        spent += clock() - start
    return spent


def report(name: str, samples: list[int], n: int) -> None:
    best = min(samples) / n
    med = statistics.median(samples) / n
    print(f"{name:<24} {best:8.0f} ns/record best  {med:8.0f} median  ({len(samples)} runs)")


def bench_restore(
    backend: str,
    chunks: Chunks,
    ends: dict[int, int],
    batch_size: int,
    tmp: Path,
    warm_up: Callable[[Records], None],
) -> int:
    targets: dict[int, RestoreTarget] = {}
    for p in ends:
        path = tmp / f"{backend}-{p}"
        shutil.rmtree(path, ignore_errors=True)
        store = OperatorStateStore(
            open_backend(backend, path if backend == "rocksdb" else None),
            StatePartitionKey(OPERATOR, p, p),
        )
        store.bind_operator(Count())
        targets[p] = RestoreTarget(store, TOPIC, p, valid_until=ends[p] - 1)
    gc.collect()
    spent = 0
    clock = time.process_time_ns
    for p, recs in chunks:
        warm_up(recs)
        start = clock()
        targets[p].apply(recs, batch_size)
        spent += clock() - start
    start = clock()
    for t in targets.values():
        t.finish()
    spent += clock() - start
    for p, t in targets.items():
        assert t.store.backend.get(t.store._offset_key) is not None  # finish() recorded it
        assert t.last_applied == ends[p] - 1, (t.last_applied, ends[p])
        t.store.backend.close()
    return spent


def encode_batches(recs: list[ConsumerRecord[bytes, bytes]], per_batch: int) -> bytes:
    out = bytearray()
    for i in range(0, len(recs), per_batch):
        part = recs[i : i + per_batch]
        b = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 30)
        for j, r in enumerate(part):
            b.append(j, 0, r.key, r.value, [])
        buf = b.build()
        # base offset (first 8 bytes) = the first record's offset
        buf[0:8] = part[0].offset.to_bytes(8, "big")
        out += buf
    return bytes(out)


def bench_decode(encoded: dict[int, bytes], chunk: int) -> int:
    gc.collect()
    start = time.process_time_ns()
    n = 0
    for p, data in encoded.items():
        pr = PartitionRecords(
            TopicPartition(TOPIC, p),
            MemoryRecords(data),
            [],
            0,
            None,
            None,
            True,
            READ_UNCOMMITTED,
        )
        records = (r for r in pr)  # PartitionRecords cannot be iterated past its end
        while part := list(islice(records, chunk)):
            n += len(part)
    spent = time.process_time_ns() - start
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000, help="distinct keys (changelog)")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=10_000, help="records per getmany result")
    ap.add_argument("--batch-size", type=int, default=10_000, help="restore write batch")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--backends", default="memory,rocksdb")
    ap.add_argument("--decode", action="store_true", help="also time aiokafka's decoding")
    ap.add_argument("--cold", action="store_true", help="do not warm each chunk before timing")
    a = ap.parse_args()
    warm_up = no_warm if a.cold else warm

    by_partition = build_records(a.records, a.partitions)
    n = sum(len(r) for r in by_partition.values())
    ends = {p: len(r) for p, r in by_partition.items()}
    chunks = chunked(by_partition, a.chunk)
    encoded: dict[int, bytes] = {}
    if a.decode:
        encoded = {p: encode_batches(r, 5_000) for p, r in by_partition.items()}
    gc.collect()
    gc.freeze()  # the records are long-lived here; in the worker they die batch by batch
    print(
        f"{n:,} changelog records, {a.partitions} partitions, chunks of {a.chunk:,}, "
        f"write batches of {a.batch_size:,}"
    )

    def iterate(recs: list[ConsumerRecord[bytes, bytes]]) -> None:
        for _r in recs:
            pass

    def raw_loop(recs: list[ConsumerRecord[bytes, bytes]]) -> None:
        size = 0
        for r in recs:
            size += len(r.value or b"") + len(r.key or b"")

    results: dict[str, list[int]] = {"iterate": [], "raw_read loop": []}
    backends = [b for b in a.backends.split(",") if b]
    for b in backends:
        results[f"restore {b}"] = []
    if a.decode:
        results["aiokafka decode"] = []
    with tempfile.TemporaryDirectory(prefix="restore-micro-") as tmp:
        for _ in range(a.runs):  # interleaved, so drift in machine load spreads over all
            results["iterate"].append(per_chunk_ns(chunks, iterate, warm_up))
            results["raw_read loop"].append(per_chunk_ns(chunks, raw_loop, warm_up))
            for b in backends:
                results[f"restore {b}"].append(
                    bench_restore(b, chunks, ends, a.batch_size, Path(tmp), warm_up)
                )
            if a.decode:
                results["aiokafka decode"].append(bench_decode(encoded, a.chunk))
    for name, samples in results.items():
        report(name, samples, n)
    if a.decode:
        dec = statistics.median(results["aiokafka decode"]) / n
        floor = dec + statistics.median(results["raw_read loop"]) / n
        for b in backends:
            r = statistics.median(results[f"restore {b}"]) / n
            print(f"estimated restore/floor rate, {b}: {floor / (dec + r):.0%} (CPU only)")


if __name__ == "__main__":
    main()
