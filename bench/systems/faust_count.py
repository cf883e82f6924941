"""faust-streaming word count with a Table (runs in bench/.venvs/faust). Until SIGTERM.

Input: key = word (raw bytes), value ignored. The table ``counts`` (changelog-backed, memory
store by default, ``rocksdb://`` with --store) counts per key; one output record
(key = word, value = ASCII count) per input. at-least-once (faust's default guarantee).
"""

from __future__ import annotations

import argparse
import sys

import faust

ap = argparse.ArgumentParser()
ap.add_argument("--bootstrap", required=True)
ap.add_argument("--input", required=True)
ap.add_argument("--output", required=True)
ap.add_argument("--app", required=True)
ap.add_argument("--store", default="memory://")
ap.add_argument("--data-dir", default="/tmp/faust-bench")
a = ap.parse_args()

app = faust.App(
    a.app,
    broker=f"kafka://{a.bootstrap}",
    store=a.store,
    datadir=a.data_dir,
    topic_partitions=4,
    web_enabled=False,
    processing_guarantee="at_least_once",
    producer_linger_ms=5,
    producer_max_batch_size=512 * 1024,
    stream_buffer_maxsize=8192,
    broker_commit_every=10_000,
    consumer_auto_offset_reset="earliest",
)
source = app.topic(
    a.input,
    key_type=bytes,
    value_type=bytes,
    value_serializer="raw",
    key_serializer="raw",
    partitions=4,
)
sink = app.topic(
    a.output,
    key_type=bytes,
    value_type=bytes,
    value_serializer="raw",
    key_serializer="raw",
    partitions=4,
)
counts = app.Table("counts", default=int, partitions=4, key_type=bytes, value_type=int)


@app.agent(source)
async def count(stream):  # type: ignore[no-untyped-def]
    async for event in stream.events():
        key = event.key
        n = counts[key] + 1
        counts[key] = n
        await sink.send(key=key, value=str(n).encode())


if __name__ == "__main__":
    sys.argv = [sys.argv[0], "worker", "-l", "warn", "--without-web"]
    app.main()
