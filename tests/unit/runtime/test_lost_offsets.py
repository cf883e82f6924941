"""A task whose group offsets were deleted must not start (checkpoint/fencing.py, "Proof that a
checkpoint committed"), and a task whose first checkpoint never committed must.

Run with the in-process driver over the production host; ``log.committed.clear()`` is what
``kafka-consumer-groups --delete`` (or the broker's offset expiry) does to the groups.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from examples.corpus import generate_lines
from examples.wordcount import build
from headrace import INT, STR, Job
from headrace.runtime.host import CheckpointMissingError
from headrace.runtime.testing import JobTester

LINES = generate_lines(120, seed=5)
GUARANTEES = ["exactly_once", "at_least_once"]
BACKENDS = ["memory", "rocksdb"]


def make_tester(guarantee: str, backend: str, tmp_path: Path, job: Job | None = None) -> JobTester:
    return JobTester(
        job or build(), partitions=2, guarantee=guarantee, backend=backend, state_dir=tmp_path
    )


def single() -> Job:
    """source (keyed) -> count -> sink: one stage, stateful at the source."""
    job = Job("single")
    job.source("in", key_serde=STR, value_serde=STR).count(name="n").sink(
        "out", key_serde=STR, value_serde=INT
    )
    return job


@pytest.mark.parametrize("guarantee", GUARANTEES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("later", ["first ownership", "after a restart"])
def test_deleted_offsets_are_refused_before_anything_is_consumed(
    guarantee: str, backend: str, later: str, tmp_path: Path
) -> None:
    """One checkpoint with state, then an idle one: the only proof an at-least-once first
    ownership leaves is its claim written again after its first commit."""
    with make_tester(guarantee, backend, tmp_path) as t:
        for line in LINES:
            t.send("lines", line)
        t.run()
        t.checkpoint()
        t.checkpoint()
        if later == "after a restart":
            t.crash()
            t.run()  # restored from the committed checkpoint: its claim proves the commit
            t.checkpoint()
        t.crash()
        t.log.committed.clear()
        with pytest.raises(CheckpointMissingError, match="the group's offsets were deleted"):
            t.run()


@pytest.mark.parametrize("guarantee", GUARANTEES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_first_checkpoint_that_never_committed_is_not_taken_for_lost_offsets(
    guarantee: str, backend: str, tmp_path: Path
) -> None:
    """Changelog written, offsets not (the crash between the two, in the job's very first
    checkpoint): no offset, and a changelog that is not state. The restart starts clean and
    counts exactly."""
    with make_tester(guarantee, backend, tmp_path, single()) as t:
        for _ in range(5):
            t.send("in", "x", key="a", partition=0)
        t.crash_during_next_checkpoint("after-changelog")
        t.checkpoint()  # the first one dies after its changelog write; every task crashes
        assert t.log.committed.get("single.stage0", {}) == {}
        assert any(t.log.topics["single.n.changelog"][0])
        t.run()
        t.checkpoint()
        assert t.state("n") == {("count", "a"): 5}


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_a_stateful_task_that_never_had_input_is_not_taken_for_lost_offsets(
    guarantee: str, tmp_path: Path
) -> None:
    """A source task with no input commits no offset: its checkpoints must leave no proof of
    a commit, or its next start would be refused (partition 1 here never gets a record)."""
    with make_tester(guarantee, "memory", tmp_path, single()) as t:
        t.send("in", "x", key="a", partition=0)
        t.run()
        for _ in range(3):
            t.checkpoint()
        t.crash()
        t.run()
        t.send("in", "x", key="a", partition=0)
        t.run()
        t.checkpoint()
        assert t.state("n") == {("count", "a"): 2}
