"""Checkpoint traffic follows the data (issue 18 item 5), with the in-process driver.

An upstream task writes a barrier only to the repartition partitions it wrote data to since
its last barrier there, and one quiet barrier after that (checkpoint/alignment.py, "Quiet
channels"); a checkpoint with nothing to commit is not committed (host.commit_checkpoint). So a
job without input writes nothing at all after one round, and the counts stay exact across
crashes that restore downstream tasks whose channels are quiet.
"""

from __future__ import annotations

from collections import Counter

import pytest

from examples.wordcount import build
from headrace import INT, STR, Job
from headrace.runtime.checkpoint.barrier import BARRIER_HEADER, QUIET_HEADER
from headrace.runtime.checkpoint.metadata import CheckpointMetadata
from headrace.runtime.host import TaskIO, commit_checkpoint
from headrace.runtime.task.stage_task import DEFERRED_ROUND_PARTITIONS, first_round_delay
from headrace.runtime.testing import JobTester

PARTITIONS = 4


def barriers(tester: JobTester) -> set[tuple[int, int, int, bool]]:
    """(partition, offset, channel, quiet) of every barrier on the repartition topic so far."""
    topic = tester.job.stages[0].output.topic  # type: ignore[union-attr]
    found = set()
    for r in tester.records(topic):
        headers = dict(r.headers)
        if BARRIER_HEADER in headers:
            found.add((r.partition, r.offset, int(headers["hr.ch"]), QUIET_HEADER in headers))
    return found


def written(tester: JobTester) -> tuple[int, int]:
    """Records on the repartition topic, and checkpoint acks (one per committed checkpoint)."""
    topic = tester.job.stages[0].output.topic  # type: ignore[union-attr]
    return len(tester.records(topic)), len(tester.records(tester.job.checkpoint_topic))


def counts(tester: JobTester) -> dict[str, int]:
    return {k: v for (_, k), v in tester.state("counts").items()}


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_an_idle_job_writes_nothing_after_one_quiet_round(guarantee: str) -> None:
    with JobTester(build(), partitions=PARTITIONS, guarantee=guarantee) as tester:
        lines = ["a b c d e f g h", "i j k l m n o p"]
        for line in lines:
            tester.send("lines", line)
        tester.checkpoint()
        tester.checkpoint()  # the quiet round
        tester.checkpoint()  # downstream commits having read it
        assert counts(tester) == Counter(" ".join(lines).split())
        before = written(tester)
        for _ in range(5):
            tester.checkpoint()
        # no barrier, no checkpoint ack, no commit: nothing moved
        assert written(tester) == before
        # the source tasks still reach each checkpoint on the clock, and skip its commit
        # (downstream tasks reach none: no barrier comes)
        sources = [io for (stage, _), io in tester.tasks.items() if stage == "stage0"]
        assert all(io.task.counters.idle_checkpoints >= 5 for io in sources)


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_barriers_go_where_the_data_went_then_one_quiet_one(guarantee: str) -> None:
    with JobTester(build(), partitions=PARTITIONS, guarantee=guarantee) as tester:
        tester.send("lines", "warmup every partition gets words", partition=0)
        for _ in range(3):
            tester.checkpoint()
        before = barriers(tester)
        # a new job: every source task's first round goes to every partition, quiet where
        # it had no data (the downstream tasks wait for every channel's first barrier)
        assert {ch for _, _, ch, _ in before} == set(range(PARTITIONS))
        # one word, from source partition 1: one repartition partition gets data
        tester.send("lines", "solo", partition=1)
        tester.checkpoint()
        tester.checkpoint()
        tester.checkpoint()
        new = barriers(tester) - before
        # a barrier with the data, then a quiet one, to that partition only, from that channel
        assert sorted((ch, quiet) for _, _, ch, quiet in new) == [(1, False), (1, True)]
        assert len({p for p, _, _, _ in new}) == 1
        assert counts(tester)["solo"] == 1


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_a_restored_task_does_not_wait_for_quiet_channels(guarantee: str) -> None:
    """The quiet channels are part of the committed cut: a downstream task restored while
    every upstream is quiet (its stage's group lost it; the upstream tasks go on, and send
    no barrier to a partition they send no data) checkpoints as soon as one of them sends
    data again."""
    with JobTester(build(), partitions=PARTITIONS, guarantee=guarantee) as tester:
        tester.send("lines", "one two three four five six", partition=0)
        for _ in range(4):
            tester.checkpoint()
        tester.crash("stage1")
        tester.checkpoint()  # restore the downstream tasks
        tester.send("lines", "two", partition=3)
        tester.checkpoint()
        tester.checkpoint()
        tester.crash("stage1")  # only what was committed survives
        tester.checkpoint()
        assert counts(tester)["two"] == 2
        down = [io for (stage, _), io in tester.tasks.items() if stage == "stage1"]
        assert all(io.task.counters.unaligned_checkpoints == 0 for io in down)


def test_quiet_channels_round_trip_through_the_checkpoint_metadata() -> None:
    plain = CheckpointMetadata(7, quiet=dict.fromkeys(range(256)))
    text = plain.encode()
    assert len(text) < 120  # a bit mask: 256 quiet channels fit the offset metadata easily
    assert CheckpointMetadata.decode(text) == plain
    timed = CheckpointMetadata(7, watermark=90, quiet={0: 100, 3: None, 9: 120})
    assert CheckpointMetadata.decode(timed.encode()) == timed
    assert CheckpointMetadata.decode(CheckpointMetadata(7).encode()) == CheckpointMetadata(7)


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_a_new_owner_goes_on_from_the_committed_barrier_round(guarantee: str) -> None:
    """Under exactly-once the downstream has seen only committed barriers, and the checkpoint
    records which partitions got a barrier that was not quiet: a new owner goes on from there
    (a restart or a rebalance of 256 partitions would otherwise write 256 x 256 barriers).
    Under at-least-once a crashed owner may have written data after its last commit, so a new
    owner's first round goes to every partition."""
    with JobTester(build(), partitions=PARTITIONS, guarantee=guarantee) as tester:
        # every source task gets input: the record of its round is kept with its offsets (a
        # task that never had input has none, and its new owners send a full round)
        for p in range(PARTITIONS):
            tester.send("lines", "one two three four five six seven eight nine", partition=p)
        tester.checkpoint()  # data and barriers
        tester.crash()  # the last committed round was not quiet
        tester.checkpoint()
        tester.checkpoint()
        tester.checkpoint()
        before = barriers(tester)
        tester.crash("stage0")
        for _ in range(3):
            tester.checkpoint()
        new = barriers(tester) - before
        if guarantee == "exactly_once":
            assert new == set()
        else:  # a quiet barrier from every source task to every partition
            assert sorted((ch, quiet) for _, _, ch, quiet in new) == sorted(
                (ch, True) for ch in range(PARTITIONS) for _ in range(PARTITIONS)
            )
        tester.send("lines", "two", partition=1)
        tester.checkpoint()
        tester.checkpoint()
        assert counts(tester)["two"] == PARTITIONS + 1


def test_an_idle_checkpoint_that_must_commit_after_all_updates_the_local_store() -> None:
    """Under at-least-once an ownership's first commit makes the next checkpoint write the
    claim again (checkpoint/fencing.py): that one is committed even with nothing else to do,
    and the claim and the changelog offset reach the local store like any commit's."""
    job = Job("idle-claim")
    job.source("words", key_serde=STR, value_serde=STR).count(name="counts").sink(
        "out", key_serde=STR, value_serde=INT
    )
    with JobTester(job, partitions=1, guarantee="at_least_once") as tester:
        tester.send("words", "a", key="a")
        tester.checkpoint()  # the first commit
        io = tester.tasks[("stage0", 0)]
        assert io.reclaim
        tester.checkpoint()  # nothing new, but the claim goes out again
        assert not io.reclaim
        assert io.task.counters.checkpoints == 2 and io.task.counters.idle_checkpoints == 0
        store = io.task.stores["counts"]
        assert store.changelog_offset == io.changelog_last["counts"]
        tester.checkpoint()  # now idle: skipped
        assert io.task.counters.idle_checkpoints == 1


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_a_final_checkpoint_of_a_task_that_did_nothing_writes_nothing(guarantee: str) -> None:
    """A revocation or shutdown ends an ownership with a final checkpoint; when the task did
    nothing since its committed (or restored) cut it is idle like any other: no transaction,
    no barrier round, no ack (every eager rebalance ends every task's ownership, and at 256
    partitions each such round was a transaction with a barrier to every downstream partition).
    A task that did something still commits its final checkpoint, barriers included, and the
    counts stay exact across the suspended tasks' next ownership."""

    with JobTester(build(), partitions=PARTITIONS, guarantee=guarantee) as tester:
        for p in range(PARTITIONS):
            tester.send("lines", "one two three four", partition=p)
        for _ in range(4):
            tester.checkpoint()  # data, barriers, the quiet round, downstream commits
        busy = tester.tasks[("stage0", 1)]
        tester.send("lines", "five", partition=1)  # only task 1 has something new
        tester.run()

        def final(io: TaskIO) -> int:
            """Records its final checkpoint wrote (repartition topic and checkpoint log)."""
            before = written(tester)
            pending = io.task.final_checkpoint()
            tester._loop.run_until_complete(commit_checkpoint(io, tester._committer(io), pending))
            assert io.task.pending is None
            after = written(tester)
            return (after[0] - before[0]) + (after[1] - before[1])

        idle = [tester.tasks[("stage0", p)] for p in (0, 2, 3)]
        idle_before = [io.task.counters.idle_checkpoints for io in idle]
        assert [final(io) for io in idle] == [0, 0, 0]
        assert [io.task.counters.idle_checkpoints for io in idle] == [n + 1 for n in idle_before]
        assert final(busy) > 1  # the word, a barrier to its partition, quiet ones, the ack
        tester.crash("stage0")  # a new ownership of every source task
        for _ in range(4):
            tester.checkpoint()
        expected = Counter(["one", "two", "three", "four"] * PARTITIONS + ["five"])
        assert counts(tester) == expected


def acks(tester: JobTester, task: str) -> int:
    """Checkpoint acks ``task`` (``stage/partition``) wrote: one per committed checkpoint."""
    return sum(1 for r in tester.records(tester.job.checkpoint_topic) if r.key == task.encode())


def test_an_idle_new_ownership_defers_its_first_full_round() -> None:
    """A new ownership's first round goes to every downstream partition; under exactly-once
    that is a transaction with a barrier per partition, and right after an assignment the
    group has often not settled (a revocation waits for the round in flight). So a task with
    nothing to commit sends it only ``first_round_delay_s`` after its ownership began; a task
    with data sends it at once. Meanwhile the deferring tasks commit nothing (a task that read
    no input has no offset to commit) and the downstream tasks wait for their channels; after
    the delay the round goes out, and the counts are exact."""
    with JobTester(build(), partitions=PARTITIONS, first_round_delay_s=5.0) as tester:
        tester.send("lines", "alpha beta gamma delta epsilon", partition=0)
        tester.checkpoint()
        tester.checkpoint()
        first = barriers(tester)
        # the busy task's round went everywhere at once; the idle tasks sent none
        assert {ch for _, _, ch, _ in first} == {0}
        assert {p for p, _, _, _ in first} == set(range(PARTITIONS))
        assert [acks(tester, f"stage0/{p}") for p in range(PARTITIONS)] == [2, 0, 0, 0]
        assert counts(tester) == {}  # downstream: waiting for channels 1-3 (records held)
        for _ in range(4):
            tester.checkpoint()  # 6 s after the ownerships began
        later = barriers(tester) - first
        assert {(ch, quiet) for _, _, ch, quiet in later if ch != 0} == {
            (ch, True) for ch in range(1, PARTITIONS)
        }
        assert len([b for b in later if b[2] != 0]) == (PARTITIONS - 1) * PARTITIONS
        assert all(acks(tester, f"stage0/{p}") == 1 for p in range(1, PARTITIONS))
        tester.checkpoint()
        assert counts(tester) == Counter(["alpha", "beta", "gamma", "delta", "epsilon"])


def test_a_final_checkpoint_during_the_delay_sends_no_round() -> None:
    """A revocation right after an assignment (the group was not settled) ends the ownership
    of tasks that deferred their round: their final checkpoints write no barrier."""
    with JobTester(build(), partitions=PARTITIONS, first_round_delay_s=5.0) as tester:
        tester.checkpoint()
        tester.checkpoint()
        for p in range(PARTITIONS):
            io = tester.tasks[("stage0", p)]
            pending = io.task.final_checkpoint()
            assert pending.barriers == []
            tester._loop.run_until_complete(commit_checkpoint(io, tester._committer(io), pending))
        assert barriers(tester) == set()


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_a_resumed_task_goes_on_from_its_committed_round(guarantee: str) -> None:
    """A task suspended by a rebalance and given back to the same member resumes at its
    committed cut (StageRunner._resume_suspended). Under exactly-once the committed round is
    known (TaskIO.committed_loud), so it sends no full round again; every eager rebalance at
    256 partitions would otherwise cost 65,536 barriers. Under at-least-once the downstream
    may have seen barriers after the last commit, so the round goes to every partition."""
    with JobTester(build(), partitions=PARTITIONS, guarantee=guarantee) as tester:
        for p in range(PARTITIONS):
            tester.send("lines", "one two three four", partition=p)
        for _ in range(4):
            tester.checkpoint()  # data, barriers, the quiet round, downstream commits
        before = barriers(tester)
        for p in range(PARTITIONS):  # what the runner does to a task it gets back
            io = tester.tasks[("stage0", p)]
            io.task.rewind(io.committed, io.committed_skip, io.committed_quiet, io.committed_loud)
        tester.checkpoint()
        new = barriers(tester) - before
        if guarantee == "exactly_once":
            assert new == set()
        else:
            assert len(new) == PARTITIONS * PARTITIONS and all(q for *_, q in new)
        tester.send("lines", "five", partition=2)
        for _ in range(3):
            tester.checkpoint()
        assert counts(tester) == Counter(["one", "two", "three", "four"] * PARTITIONS + ["five"])


def test_a_worker_defers_only_large_exactly_once_rounds() -> None:
    """What a worker passes its tasks (StageRunner): two heartbeat intervals for a round to
    64 partitions or more under exactly-once; small rounds and at-least-once never wait."""
    assert first_round_delay(
        exactly_once=True, downstream_partitions=256, heartbeat_interval_ms=3000
    ) == pytest.approx(6.0)
    assert first_round_delay(
        exactly_once=True,
        downstream_partitions=DEFERRED_ROUND_PARTITIONS,
        heartbeat_interval_ms=1000,
    ) == pytest.approx(2.0)
    for eos, partitions in [(True, 4), (True, None), (False, 256)]:
        assert (
            first_round_delay(
                exactly_once=eos, downstream_partitions=partitions, heartbeat_interval_ms=3000
            )
            == 0.0
        )
