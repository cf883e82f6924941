"""Quix Streams under the benchmark's throughput scenarios (runs in bench/.venvs/quix). Until
SIGTERM. State: RocksDB (Quix's store) with its changelog topics; at-least-once (the default);
one output per unit of work, value = JSON count.

* ``--mode keyed`` (S1/S2): input key = word, value ignored; stateful apply counts per key;
  output key = word.
* ``--mode lines`` (S5): unkeyed lines, split into lower-case words (``expand=True``), then
  ``group_by`` the word (Quix's repartition topic) and count per word; output key = word.
* ``--mode user`` (S6): input key = user, value ``b"<category>|<padding>"``; per user the
  record count and the count per category in the user's state (the counterpart of headrace's
  ValueState and MapState); output ``"<user>:<category>"`` = that count.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from quixstreams import Application, State
from quixstreams.models.serializers.json import JSONSerializer

ap = argparse.ArgumentParser()
ap.add_argument("--bootstrap", required=True)
ap.add_argument("--input", required=True)
ap.add_argument("--output", required=True)
ap.add_argument("--group", required=True)
ap.add_argument("--state-dir", default="/tmp/quix-bench")
ap.add_argument("--mode", choices=["keyed", "lines", "user"], default="keyed")
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


def count(value: Any, state: State) -> int:
    n = state.get("n", 0) + 1
    state.set("n", n)
    return n


def user_stats(value: bytes, key: bytes, timestamp: int, headers: Any, state: State) -> Any:
    category = value.split(b"|", 1)[0].decode()
    state.set("total", state.get("total", 0) + 1)
    n = state.get("c:" + category, 0) + 1
    state.set("c:" + category, n)
    return {"k": f"{key.decode()}:{category}", "n": n}


sdf = app.dataframe(source)
if a.mode == "lines":
    sink = app.topic(a.output, key_serializer="str", value_serializer="json")
    sdf = sdf.apply(lambda line: line.decode().lower().split(), expand=True)
    sdf = sdf.group_by(
        lambda word: word, name="words", key_serializer="str", key_deserializer="str"
    )
    sdf = sdf.apply(count, stateful=True)
    sdf.to_topic(sink)
elif a.mode == "user":
    # the key comes from the value (to_topic's key=), and the value written is the count alone
    sink = app.topic(
        a.output,
        key_serializer="str",
        value_serializer=JSONSerializer(dumps=lambda out: json.dumps(out["n"])),
    )
    sdf = sdf.apply(user_stats, stateful=True, metadata=True)
    sdf.to_topic(sink, key=lambda out: out["k"])
else:
    sink = app.topic(a.output, key_serializer="bytes", value_serializer="json")
    sdf = sdf.apply(count, stateful=True)
    sdf.to_topic(sink)

if __name__ == "__main__":
    app.run()
