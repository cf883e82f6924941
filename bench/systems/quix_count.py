"""Quix Streams word count with stateful apply (runs in bench/.venvs/quix). Until SIGTERM.

Input: key = word (bytes), value ignored. State: RocksDB (Quix's store) with its changelog
topics; one output per input (key = word, value = JSON count). at-least-once (the default).
"""

from __future__ import annotations

import argparse
import logging

from quixstreams import Application, State

ap = argparse.ArgumentParser()
ap.add_argument("--bootstrap", required=True)
ap.add_argument("--input", required=True)
ap.add_argument("--output", required=True)
ap.add_argument("--group", required=True)
ap.add_argument("--state-dir", default="/tmp/quix-bench")
a = ap.parse_args()

app = Application(
    broker_address=a.bootstrap,
    consumer_group=a.group,
    auto_offset_reset="earliest",
    processing_guarantee="at-least-once",
    state_dir=a.state_dir,
    loglevel=logging.WARNING,
    auto_create_topics=True,
)
source = app.topic(a.input, key_deserializer="bytes", value_deserializer="bytes")
sink = app.topic(a.output, key_serializer="bytes", value_serializer="json")


def count(value: bytes, state: State) -> int:
    n = state.get("n", 0) + 1
    state.set("n", n)
    return n


sdf = app.dataframe(source)
sdf = sdf.apply(count, stateful=True)
sdf.to_topic(sink)

if __name__ == "__main__":
    app.run()
