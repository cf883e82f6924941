"""A faust app with one stateful headrace bridge reading its source directly (no hop), for the
upgrade test in ``test_faust_bridge.py``: ``words`` (keyed by word) --WordCount--> counts.

Run as a script (``python tests/integration/faust_count_app.py worker``); the topics, the
changelog and the broker come from ``FAUST_CT_*`` and ``KAFKA_BOOTSTRAP_SERVERS``.
"""

from __future__ import annotations

import os

import faust

from headrace.operators import INT, STR, Context, Operator, Record, ValueStateDescriptor
from headrace.runtime.integrations.faust import headrace_agent


class WordCount(Operator):
    count = ValueStateDescriptor[int](type=int, default=0)

    def process(self, record: Record[str, str], ctx: Context) -> None:
        n = self.count.value() + 1
        self.count.update(n)
        ctx.emit(n)


app = faust.App(
    os.environ["FAUST_CT_APP"],
    broker=f"kafka://{os.environ['KAFKA_BOOTSTRAP_SERVERS']}",
    datadir=os.environ["FAUST_CT_DATADIR"],
    web_enabled=False,
    processing_guarantee="at_least_once",
    consumer_auto_offset_reset="earliest",
    broker_session_timeout=6.0,
    broker_heartbeat_interval=1.0,
)

counts = headrace_agent(
    app,
    os.environ["FAUST_CT_SOURCE"],
    WordCount(),
    name="counts",
    key_serde=STR,
    value_serde=STR,
    sink=os.environ["FAUST_CT_SINK"],
    sink_key_serde=STR,
    sink_value_serde=INT,
    changelog_topic=os.environ["FAUST_CT_CHANGELOG"],
    checkpoint_interval=0.5,
)

if __name__ == "__main__":
    app.main()
