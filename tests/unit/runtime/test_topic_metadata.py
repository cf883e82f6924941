"""Waiting for freshly created topics (runtime/kafka/topics.py: await_topics): a topic counts
once every partition has a leader, so the worker's clients do not meet it leaderless (aiokafka
retries an offset lookup of a leaderless partition without a backoff: hundreds of metadata
requests and ERROR lines per second). The admin client is scripted with the metadata aiokafka
returns; the real path runs in every integration test that starts a job on a fresh topic."""

from __future__ import annotations

from typing import Any

import pytest

from headrace.runtime.kafka import topics
from headrace.runtime.kafka.topics import await_topics, topic_partitions


def _topic(name: str, leaders: list[int], error: int = 0) -> dict[str, Any]:
    return {
        "error_code": error,
        "topic": name,
        "partitions": [
            {"error_code": 0 if leader >= 0 else 5, "partition": i, "leader": leader}
            for i, leader in enumerate(leaders)
        ],
    }


class ScriptedAdmin:
    """Each look (list_topics, then describe_topics) sees the next metadata of a script; the
    last one repeats."""

    def __init__(self, script: list[list[dict[str, Any]]]) -> None:
        self.script = script
        self.looks = 0

    def _now(self) -> list[dict[str, Any]]:
        return self.script[min(self.looks - 1, len(self.script) - 1)]

    async def list_topics(self) -> list[str]:
        self.looks += 1
        return [t["topic"] for t in self._now()]

    async def describe_topics(self, names: list[str]) -> list[dict[str, Any]]:
        return [t for t in self._now() if t["topic"] in names]


async def test_a_topic_counts_once_every_partition_has_a_leader() -> None:
    admin = ScriptedAdmin([[_topic("a", [1, -1, 1]), _topic("b", [1])]])
    assert await topic_partitions(admin, ["a", "b"]) == {"a": 3, "b": 1}  # type: ignore[arg-type]
    assert await topic_partitions(admin, ["a", "b"], led=True) == {"b": 1}  # type: ignore[arg-type]


async def test_await_topics_polls_until_the_leaders_are_known(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(topics.asyncio, "sleep", sleep)
    admin = ScriptedAdmin(
        [
            [],  # not in the metadata yet
            [_topic("t", [-1, -1])],  # known, no leaders
            [_topic("t", [1, -1])],
            [_topic("t", [1, 1])],
        ]
    )
    assert await await_topics(admin, {"t": 2}) == {"t": 2}  # type: ignore[arg-type]
    assert admin.looks == 4
    assert slept == [0.2, 0.2, 0.2]


async def test_await_topics_gives_up_after_its_deadline_with_what_exists() -> None:
    admin = ScriptedAdmin([[_topic("t", [-1, 1])]])
    assert await await_topics(admin, {"t": 2}, wait_s=0.0) == {"t": 2}  # type: ignore[arg-type]


async def test_a_worker_that_finds_the_topics_made_still_waits_for_their_leaders(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another worker created them a moment ago: this one creates nothing, but its clients must
    not meet them leaderless either (NotLeaderForPartition retries on `.status` and `.control`
    from the workers that did not create them, seen in bench/scale.py's logs)."""

    async def sleep(seconds: float) -> None:
        pass

    monkeypatch.setattr(topics.asyncio, "sleep", sleep)
    admin = ScriptedAdmin(
        [
            [_topic("job.status", [-1]), _topic("job.changelog", [1, -1, 1])],  # what exists
            [_topic("job.status", [-1]), _topic("job.changelog", [1, -1, 1])],
            [_topic("job.status", [1]), _topic("job.changelog", [1, 1, 1])],
        ]
    )
    created: list[Any] = []

    async def create_topics(new: list[Any]) -> None:
        created.extend(new)

    admin.create_topics = create_topics  # type: ignore[attr-defined]
    wanted = [
        topics.InternalTopic("job.status", 1, compact=True),
        # an existing topic with the wrong count is awaited with its own, and reported
        topics.InternalTopic("job.changelog", 4, compact=True),
    ]
    found = await topics.create_and_await_topics(admin, wanted, 1)  # type: ignore[arg-type]
    assert found == {"job.status": 1, "job.changelog": 3}
    assert created == []
    assert admin.looks == 3
