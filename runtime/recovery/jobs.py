"""Jobs the recovery suite runs as real worker processes (``headrace run MODULE:JOB``).

``json_wordcount``: word count over JSON-encoded lines (``"some words"``), so a record that is
not JSON fails deserialization: the bad-input tests drive the error policies with it. Names
come from the environment (``RECOVERY_JOB``, ``RECOVERY_SOURCE``, ``RECOVERY_SINK``) so each
test uses its own topics.
"""

from __future__ import annotations

import os

from headrace.operators.job import Job
from headrace.operators.serde import INT, JSON, STR


def _split(line: str) -> list[str]:
    return line.lower().split()


def build_json_wordcount(name: str, source: str, sink: str) -> Job:
    job = Job(name)
    (
        job.source(source, value_serde=JSON)
        .flat_map(_split)
        .key_by(lambda word: word, key_serde=STR, value_serde=STR)
        .count(name="counts")
        .sink(sink, key_serde=STR, value_serde=INT)
    )
    return job


def json_wordcount() -> Job:
    """Factory: ``headrace run headrace.runtime.recovery.jobs:json_wordcount()``."""
    return build_json_wordcount(
        os.environ.get("RECOVERY_JOB", "json-wordcount"),
        os.environ.get("RECOVERY_SOURCE", "json-lines"),
        os.environ.get("RECOVERY_SINK", "json-word-counts"),
    )
