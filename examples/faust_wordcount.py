"""Word count as a faust-streaming app, with headrace operators and state (the faust bridge).

    lines --SplitWords--> words (keyed by word) --WordCount--> word-counts

Both steps are headrace operators run by ``headrace.runtime.integrations.faust.headrace_agent``:
faust
runs the worker, the consumer group and the topics; headrace gives the operators their declared
state, changelog checkpoints and restore. ``WordCount`` keeps one ``ValueState`` per word.
``SplitWords`` is stateless, but its bridge still checkpoints where it is; ``words`` is a hop
between the two bridges (headrace's repartition hop: barriers, alignment and the ``hr.seq``
numbers that let the counting bridge drop what a replay sends again). Counts stay exact when a
worker is killed (see the guarantee in ``runtime/integrations/faust/__init__.py``).

    python -m examples.faust_wordcount worker -l info

Topic names, the broker and the state backend come from the environment, so tests can run the
module with their own topics: ``KAFKA_BOOTSTRAP_SERVERS`` (default ``localhost:9092``),
``FAUST_WC_APP``, ``FAUST_WC_SOURCE``, ``FAUST_WC_WORDS``, ``FAUST_WC_SINK``,
``FAUST_WC_BACKEND`` (``memory``/``rocksdb``), ``FAUST_WC_DATADIR`` and
``FAUST_WC_CHECKPOINT_S``. The topics must exist (``FAUST_WC_WORDS`` with as many partitions as
you want counting tasks); the bridges create their changelogs.
"""

from __future__ import annotations

import os
from typing import Any

import faust

from headrace.operators import INT, STR, Context, Operator, Record, ValueStateDescriptor
from headrace.runtime.integrations.faust import headrace_agent


class SplitWords(Operator):
    """Line -> one record per lower-case word, keyed by the word."""

    def process(self, record: Record[Any, str], ctx: Context) -> None:
        for word in record.value.lower().split():
            ctx.emit(word, key=word)


class WordCount(Operator):
    """Running count per word (the record key); emits the new count."""

    count = ValueStateDescriptor[int](type=int, default=0)

    def process(self, record: Record[str, str], ctx: Context) -> None:
        n = self.count.value() + 1
        self.count.update(n)
        ctx.emit(n)


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


APP_ID = _env("FAUST_WC_APP", "faust-wordcount")
BACKEND = _env("FAUST_WC_BACKEND", "memory")
CHECKPOINT_S = float(_env("FAUST_WC_CHECKPOINT_S", "1.0"))

app = faust.App(
    APP_ID,
    broker=f"kafka://{_env('KAFKA_BOOTSTRAP_SERVERS', 'localhost:9092')}",
    datadir=_env("FAUST_WC_DATADIR", f"{APP_ID}-data"),
    web_enabled=False,
    processing_guarantee="at_least_once",
    consumer_auto_offset_reset="earliest",
    # A restarted worker joins the group only once the killed one's session expired.
    broker_session_timeout=6.0,
    broker_heartbeat_interval=1.0,
)

lines = app.topic(
    _env("FAUST_WC_SOURCE", "lines"),
    key_type=bytes,
    value_type=bytes,
    key_serializer="raw",
    value_serializer="raw",
)
words = app.topic(
    _env("FAUST_WC_WORDS", "words"),
    key_type=bytes,
    value_type=bytes,
    key_serializer="raw",
    value_serializer="raw",
)
word_counts = app.topic(
    _env("FAUST_WC_SINK", "word-counts"),
    key_type=bytes,
    value_type=bytes,
    key_serializer="raw",
    value_serializer="raw",
)

split = headrace_agent(
    app,
    lines,
    SplitWords(),
    name="split",
    value_serde=STR,
    sink=words,
    sink_key_serde=STR,
    sink_value_serde=STR,
    checkpoint_interval=CHECKPOINT_S,
    state_backend=BACKEND,
)
counts = headrace_agent(
    app,
    words,
    WordCount(),
    name="counts",
    key_serde=STR,
    value_serde=STR,
    sink=word_counts,
    sink_key_serde=STR,
    sink_value_serde=INT,
    checkpoint_interval=CHECKPOINT_S,
    state_backend=BACKEND,
)

if __name__ == "__main__":
    app.main()
