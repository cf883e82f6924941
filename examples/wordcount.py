"""Word count: the flagship headrace job, and a demo that runs it end to end.

The job reads text lines from ``lines``, splits them into lower-case words, re-keys by word
(``key_by``: a hop through ``wordcount.stage1.repartition``), counts per word in keyed state and
writes ``(word, count)`` to ``word-counts`` on every change.

    headrace run examples.wordcount:job          # one worker; run it again to scale out

``python -m examples.wordcount`` is the demo: it starts a local Kafka broker unless
KAFKA_BOOTSTRAP_SERVERS is set, creates the topics, loads a corpus drawn with real English word
frequencies, runs two workers, waits until they have caught up, prints the top 20 words and
checks every count against a direct count of the corpus.
"""

from __future__ import annotations

import os

from headrace.operators.job import Job
from headrace.operators.serde import INT, STR


def split_words(line: str) -> list[str]:
    return line.lower().split()


def build(name: str = "wordcount", source: str = "lines", sink: str = "word-counts") -> Job:
    job = Job(name)
    (
        job.source(source, value_serde=STR)
        .flat_map(split_words)
        .key_by(lambda word: word, key_serde=STR, value_serde=STR)
        .count(name="counts")
        .sink(sink, key_serde=STR, value_serde=INT)
    )
    return job


# The demo and the tests run the same module with their own topic names (environment variables),
# so that a shared broker's existing topics are never touched.
job = build(
    os.environ.get("WORDCOUNT_JOB", "wordcount"),
    os.environ.get("WORDCOUNT_SOURCE", "lines"),
    os.environ.get("WORDCOUNT_SINK", "word-counts"),
)

if __name__ == "__main__":
    from examples.demo import main

    main()
