"""Quix Streams' tumbling-window count (runs in bench/.venvs/quix), S7. Until SIGTERM.

Input: key = word, event time = the Kafka record timestamp. Count per key per 10 s tumbling
window with a 2 s grace (the out-of-orderness every system allows), final results only:
``.final(closing_strategy="partition")`` emits one per window when the partition's time (its
highest timestamp) passes the window's end plus the grace, like every other system here (Quix's
default closes a key's windows only when that key comes again). Output key = the word, value =
Quix's JSON ``{"start", "end", "value"}`` (the harness reads both shapes). at-least-once (the
default), RocksDB state with its changelog topics.
"""

from __future__ import annotations

import argparse
import logging

from quixstreams import Application

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
source = app.topic(a.input, key_deserializer="str", value_deserializer="bytes")
sink = app.topic(a.output, key_serializer="str", value_serializer="json")

sdf = app.dataframe(source)
# one {"start", "end", "value"} per window when it closes, keyed by the word
sdf = (
    sdf.tumbling_window(duration_ms=10_000, grace_ms=2_000)
    .count()
    .final(closing_strategy="partition")
)
sdf.to_topic(sink)

if __name__ == "__main__":
    app.run()
