"""The word count on a real broker with real worker processes (issue: runtime).

Each test produces a seeded corpus drawn with real English frequencies, runs ``headrace run
examples.wordcount:job`` workers, and checks the result against a deterministic replay of the
input (headrace.runtime.recovery.verify): exact final state, and under exactly-once each word's
output
is exactly 1, 2, ..., count in order.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import pytest

from examples.corpus import generate_lines
from examples.demo import produce_lines
from examples.wordcount import build
from headrace.operators.job import Job
from headrace.runtime.recovery.verify import wait_complete_checkpoint

pytestmark = pytest.mark.kafka


async def wordcount_topics(topic_factory: Any) -> tuple[Job, dict[str, str]]:
    source = await topic_factory("lines", partitions=4)
    sink = await topic_factory("word-counts", partitions=4)
    name = "wc-" + source.rsplit("-", 1)[-1]
    env = {"WORDCOUNT_JOB": name, "WORDCOUNT_SOURCE": source, "WORDCOUNT_SINK": sink}
    return build(name, source, sink), env


async def assert_exact(
    verifier: Any, driver: Any, job: Job, env: dict[str, str], guarantee: str
) -> None:
    """Wait until the output caught up with a replay of the input, then check it and the state."""
    source, sink = env["WORDCOUNT_SOURCE"], env["WORDCOUNT_SINK"]
    expected = await verifier.expected(source)
    observed = await verifier.wait_caught_up(expected, sink, wait_s=180, alive=driver.any_alive)
    report = await verifier.verify(
        input_topic=source,
        output_topic=sink,
        guarantee=guarantee,
        job=job,
        operator_id="counts",
        expected=expected,
        observed=observed,
    )
    assert report.ok, report.summary() + "\n" + driver.logs()[-3000:]


@pytest.mark.parametrize("backend", ["memory", "rocksdb"])
@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
async def test_wordcount_with_two_workers_is_exact(
    guarantee: str,
    backend: str,
    kafka_bootstrap_servers: str,
    topic_factory: Any,
    fault_driver: Callable[..., Any],
    wordcount_verifier: Any,
) -> None:
    job, env = await wordcount_topics(topic_factory)
    await produce_lines(
        kafka_bootstrap_servers, env["WORDCOUNT_SOURCE"], generate_lines(50_000, seed=11)
    )
    driver = fault_driver(
        "examples.wordcount:job",
        env={
            **env,
            "HEADRACE_PROCESSING_GUARANTEE": guarantee,
            "HEADRACE_STATE_BACKEND": backend,
            "HEADRACE_CHECKPOINT_INTERVAL_MS": "500",
        },
    )
    workers = [driver.start_worker(), driver.start_worker()]
    await assert_exact(wordcount_verifier, driver, job, env, guarantee)

    # `headrace checkpoints`: a checkpoint complete for the whole job — both stages, every
    # partition — and every downstream task acknowledged aligned checkpoints, so barriers
    # crossed the repartition topic and were aligned. (Not one checkpoint that all eight
    # acknowledged themselves: a source task that finished its input skips its acks,
    # ARCHITECTURE.md 5.8, while the downstream tasks are still counting.)
    complete, summaries = await wait_complete_checkpoint(job, kafka_bootstrap_servers)
    assert len(complete.expected) == 8 and complete.expected <= (complete.covered or set())
    aligned_downstream = {t for s in summaries if s.aligned for t in s.acked if "stage1/" in t}
    assert aligned_downstream == {f"stage1/{p}" for p in range(4)}, summaries[:5]

    for w in workers:
        assert await driver.terminate(w) == 0, driver.logs()[-3000:]


async def test_state_moves_with_partitions_when_a_worker_joins_and_leaves(
    kafka_bootstrap_servers: str,
    topic_factory: Any,
    fault_driver: Callable[..., Any],
    wordcount_verifier: Any,
) -> None:
    """A second worker joins mid-run (takes half the tasks, restoring their state from the
    changelog), the first one leaves later (the second restores the rest): counts stay exact
    and every word's committed output is exactly 1..count."""
    job, env = await wordcount_topics(topic_factory)
    source, sink = env["WORDCOUNT_SOURCE"], env["WORDCOUNT_SINK"]
    lines = generate_lines(30_000, seed=5)
    driver = fault_driver(
        "examples.wordcount:job", env={**env, "HEADRACE_CHECKPOINT_INTERVAL_MS": "500"}
    )
    first = driver.start_worker()
    await produce_lines(kafka_bootstrap_servers, source, lines[:10_000])
    await wordcount_verifier.wait_caught_up(
        wordcount_verifier.replay(lines[:10_000]), sink, wait_s=120, alive=driver.any_alive
    )
    second = driver.start_worker()
    await second.wait_started()
    await produce_lines(kafka_bootstrap_servers, source, lines[10_000:20_000])
    await asyncio.sleep(4)  # the rebalance happens while data flows
    assert await driver.terminate(first) == 0, first.log()[-3000:]
    await produce_lines(kafka_bootstrap_servers, source, lines[20_000:])
    await assert_exact(wordcount_verifier, driver, job, env, "exactly_once")
    # The joining worker rebuilt state from the changelog, not from nothing.
    restored = [
        int(n) for n in re.findall(r"restoring \S+counts\.changelog\[\d\]: (\d+)/", second.log())
    ]
    assert restored and max(restored) > 0, second.log()[-3000:]
    assert await driver.terminate(second) == 0
