"""State-layer micro-benchmark (a script, not a test): ``python bench/state_micro.py``.

Reports
1. ns per ValueState read-modify-write through the write-back cache (what an operator does per
   record: the runtime sets ``store.current_key``, the operator calls ``value()`` and
   ``update()``) next to a plain ``dict`` increment of the same keys. Target: within 5x.
2. the checkpoint cost: ns per dirty key for ``take_changes`` + ``apply_changes``.
3. bytes per key of each backend for N small keys (default 1M) written through a store:
   memory (logical key+value bytes and real Python heap measured with tracemalloc) and RocksDB
   (on-disk bytes after flush + compaction).
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from headrace.operators.state import ValueStateDescriptor
from headrace.runtime.state import OperatorStateStore, StateBackend, StatePartitionKey
from headrace.runtime.state.memory import MemoryBackend
from headrace.runtime.state.rocksdb import RocksDBBackend

PK = StatePartitionKey("bench", 0, 0)


class Counter:
    count = ValueStateDescriptor(type=int, default=0)


def best_of(runs: int, fn: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter_ns()
        fn()
        best = min(best, time.perf_counter_ns() - start)
    return best


def bench_hot_path(ops: int, distinct: int) -> None:
    rng = random.Random(7)
    keys = [f"user-{i:08d}".encode() for i in range(distinct)]
    sequence = [keys[rng.randrange(distinct)] for _ in range(ops)]

    store = OperatorStateStore(MemoryBackend(), PK)
    op = Counter()
    store.bind_operator(op)
    count = op.count

    def through_cache() -> None:
        st = store
        c = count
        for key in sequence:
            st.current_key = key
            c.update(c.value() + 1)

    st_key = store

    def through_cache_key_preset() -> None:
        c = count
        st_key.current_key = sequence[0]
        for _ in sequence:
            c.update(c.value() + 1)

    plain: dict[bytes, int] = {}

    def plain_dict() -> None:
        d = plain
        for key in sequence:
            d[key] = d.get(key, 0) + 1

    through_cache()  # warm: every key cached (misses cost one backend read each)
    plain_dict()
    t_cache = best_of(5, through_cache) / ops
    t_nokey = best_of(5, through_cache_key_preset) / ops
    t_dict = best_of(5, plain_dict) / ops
    print(f"ValueState read-modify-write ({ops:,} ops over {distinct:,} keys, best of 5)")
    print(f"  through the cache, incl. setting current_key : {t_cache:7.1f} ns/op")
    print(f"  through the cache, current_key already set    : {t_nokey:7.1f} ns/op")
    print(f"  plain dict  d[k] = d.get(k, 0) + 1            : {t_dict:7.1f} ns/op")
    verdict = "OK" if t_cache <= 5 * t_dict else "ABOVE TARGET"
    print(f"  ratio: {t_cache / t_dict:.2f}x  (target <= 5x: {verdict})")

    changes = store.take_changes()  # flush the warm-up's dirty keys
    store.apply_changes(changes)
    through_cache()
    dirty = store.stats().dirty_entries
    start = time.perf_counter_ns()
    changes = store.take_changes()
    mid = time.perf_counter_ns()
    store.apply_changes(changes, changelog_offset=1)
    end = time.perf_counter_ns()
    print(f"checkpoint of {dirty:,} dirty keys (memory backend)")
    print(f"  take_changes  : {(mid - start) / dirty:7.1f} ns/key (serialise once per key)")
    print(f"  apply_changes : {(end - mid) / dirty:7.1f} ns/key (one write batch)")


def bench_bytes_per_key(count: int) -> None:
    print(f"bytes per key, {count:,} keys (user key 13 bytes, int64 value) written via a store")
    sample = OperatorStateStore(MemoryBackend(), PK)
    op = Counter()
    sample.bind_operator(op)
    sample.current_key = b"user-00000000"
    op.count.update(1)
    key, value = sample.take_changes()[-1]
    assert value is not None
    print(f"  storage key {len(key)} bytes + value {len(value)} bytes per entry")

    gc.collect()
    tracemalloc.start()
    backend = MemoryBackend()
    _fill_backend(backend, count)
    list(backend.range_scan(b"\x02"))  # build the sorted index, as the first scan would
    gc.collect()
    heap = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(
        f"  memory : {backend.size_bytes() / count:6.1f} logical, "
        f"{heap / count:6.1f} Python heap (dict + bytes objects + sorted index)"
    )
    del backend
    gc.collect()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "task"
        rocks = RocksDBBackend(path)
        _fill_backend(rocks, count)
        rocks.flush()
        rocks.compact()
        disk = sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".sst")
        total = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        print(
            f"  rocksdb: {disk / count:6.1f} on disk (SST files, after flush + compaction), "
            f"{total / count:.1f} incl. WAL/manifest/options; "
            f"size_bytes() {rocks.size_bytes() / count:.1f}"
        )
        rocks.close()


def _fill_backend(backend: StateBackend, count: int, chunk: int = 100_000) -> None:
    store = OperatorStateStore(backend, PK, cache_max_entries=0)
    op = Counter()
    store.bind_operator(op)
    handle = op.count
    for base in range(0, count, chunk):
        for i in range(base, min(base + chunk, count)):
            store.current_key = f"user-{i:08d}".encode()
            handle.update(i)
        store.apply_changes(store.take_changes(), changelog_offset=base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=1_000_000, help="hot-path operations")
    parser.add_argument("--distinct", type=int, default=10_000, help="distinct keys (hot path)")
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys for bytes-per-key")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}")
    bench_hot_path(args.ops, args.distinct)
    bench_bytes_per_key(args.keys)


if __name__ == "__main__":
    main()
