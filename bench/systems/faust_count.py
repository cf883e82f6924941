"""faust-streaming under the benchmark's throughput scenarios (runs in bench/.venvs/faust). Until
SIGTERM. Tables are changelog-backed (memory store by default, ``rocksdb://`` with --store); one
output record per unit of work, value = ASCII count; at-least-once (faust's default guarantee).

* ``--mode keyed`` (S1/S2): input key = word, value ignored; the table ``counts`` counts per
  key; output key = word.
* ``--mode lines`` (S5): unkeyed lines; one agent splits them into lower-case words sent to an
  internal topic keyed by word (faust's repartition), a second agent counts them as above.
* ``--mode user`` (S6): input key = user, value ``b"<category>|<padding>"``; tables ``totals``
  (per user) and ``per-category`` (per ``<user>:<category>``); output that key = its count.
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
ap.add_argument("--mode", choices=["keyed", "lines", "user"], default="keyed")
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


def raw_topic(name: str, **extra: object) -> faust.TopicT:
    return app.topic(
        name,
        key_type=bytes,
        value_type=bytes,
        value_serializer="raw",
        key_serializer="raw",
        partitions=4,
        **extra,
    )


if a.mode == "user":
    totals = app.Table("totals", default=int, partitions=4, key_type=bytes, value_type=int)
    per_category = app.Table(
        "per-category", default=int, partitions=4, key_type=bytes, value_type=int
    )

    @app.agent(source)
    async def user_stats(stream):  # type: ignore[no-untyped-def]
        async for event in stream.events():
            user = event.key
            category = event.value.split(b"|", 1)[0]
            totals[user] += 1
            key = user + b":" + category
            n = per_category[key] + 1
            per_category[key] = n
            await sink.send(key=key, value=str(n).encode())

else:
    counts = app.Table("counts", default=int, partitions=4, key_type=bytes, value_type=int)
    words = source
    if a.mode == "lines":
        words = raw_topic(f"{a.app}-words", internal=True)

        @app.agent(source)
        async def split(stream):  # type: ignore[no-untyped-def]
            async for line in stream:
                for word in line.decode().lower().split():
                    w = word.encode()
                    await words.send(key=w, value=w)

    @app.agent(words)
    async def count(stream):  # type: ignore[no-untyped-def]
        async for event in stream.events():
            key = event.key
            n = counts[key] + 1
            counts[key] = n
            await sink.send(key=key, value=str(n).encode())


if __name__ == "__main__":
    sys.argv = [sys.argv[0], "worker", "-l", "warn", "--without-web"]
    app.main()
