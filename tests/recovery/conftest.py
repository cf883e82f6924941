"""Fixtures of the recovery suite (helpers live in scenario.py)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from scenario import PARTITIONS, REPO, MakeRun, WordcountRun

from examples.wordcount import build
from headrace.runtime.pytest_plugin import TopicFactory
from headrace.runtime.recovery import FaultDriver, Verifier


@pytest.fixture
async def wordcount_run(
    topic_factory: TopicFactory,
    fault_driver: Callable[..., FaultDriver],
    wordcount_verifier: Verifier,
    kafka_bootstrap_servers: str,
) -> MakeRun:
    """``await wordcount_run(guarantee, backend, seed=..)`` -> a WordcountRun (nothing started)."""

    async def make(
        guarantee: str,
        backend: str = "memory",
        *,
        seed: int = 1,
        interval_ms: int = 500,
        env: dict[str, str] | None = None,
    ) -> WordcountRun:
        uid = uuid.uuid4().hex[:8]
        source = await topic_factory("lines", partitions=PARTITIONS)
        sink = await topic_factory("counts", partitions=PARTITIONS)
        job_name = f"wc-{uid}"
        run_env: dict[str, Any] = {
            "WORDCOUNT_JOB": job_name,
            "WORDCOUNT_SOURCE": source,
            "WORDCOUNT_SINK": sink,
            "HEADRACE_PROCESSING_GUARANTEE": guarantee,
            "HEADRACE_STATE_BACKEND": backend,
            "HEADRACE_CHECKPOINT_INTERVAL_MS": str(interval_ms),
            "HEADRACE_ALIGNMENT_TIMEOUT_S": "10",
            **(env or {}),
        }
        driver = fault_driver("examples.wordcount:job", env=run_env, seed=seed, cwd=REPO)
        return WordcountRun(
            build(job_name, source, sink),
            source,
            sink,
            guarantee,
            backend,
            driver,
            wordcount_verifier,
            kafka_bootstrap_servers,
            seed,
        )

    return make
