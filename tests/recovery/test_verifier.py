"""The verifier itself: it must catch every gap, repeat and over-count (no Kafka needed), and
the harness's wait for committed changelog content (on the broker)."""

from __future__ import annotations

import pytest
from scenario import MakeRun

from headrace.runtime.recovery import (
    check_at_least_once,
    check_exactly_once,
    check_state,
    skewed_partitioner,
    wait_changelog_committed,
    wordcount_replay,
)


def test_wordcount_replay_is_the_per_word_sequence_one_to_count() -> None:
    assert wordcount_replay(["The cat", "the dog", b"THE"]) == {
        "the": [1, 2, 3],
        "cat": [1],
        "dog": [1],
    }


def test_exactly_once_check_flags_gaps_repeats_and_extra_values() -> None:
    want = {"a": [1, 2, 3]}
    assert check_exactly_once(want, {"a": [1, 2, 3]}) == []
    assert "missing" in check_exactly_once(want, {"a": [1, 3]})[0]
    assert "repeated" in check_exactly_once(want, {"a": [1, 2, 2, 3]})[0]
    assert "never produces" in check_exactly_once(want, {"a": [1, 2, 3, 4]})[0]
    assert check_exactly_once(want, {"a": [1, 2, 3], "b": [1]})
    assert check_exactly_once(want, {})


def test_at_least_once_check_allows_repeats_but_not_skips_or_overcounts() -> None:
    want = {"a": [1, 2, 3]}
    assert check_at_least_once(want, {"a": [1, 2, 2, 3, 2, 3]}) == []
    assert any("skipped" in p for p in check_at_least_once(want, {"a": [1, 3]}))
    assert any("never produces" in p for p in check_at_least_once(want, {"a": [1, 2, 3, 4]}))
    assert any("last output" in p for p in check_at_least_once(want, {"a": [1, 2, 3, 2]}))


def test_state_check_compares_final_values_per_key() -> None:
    assert check_state({"a": 3}, {"a": 3}) == []
    assert check_state({"a": 3}, {"a": 4})
    assert check_state({"a": 3}, {})


def test_skewed_partitioner_never_uses_the_idle_partition() -> None:
    choose = skewed_partitioner(4, seed=1, hot=0, hot_share=0.8, idle=[3])
    picks = [choose(i) for i in range(2000)]
    assert 3 not in picks
    assert picks.count(0) > 1400


@pytest.mark.kafka
@pytest.mark.timeout(120)
async def test_wait_changelog_committed_waits_for_every_task_to_commit(
    wordcount_run: MakeRun,
) -> None:
    """The during-restore crash waits on this: it must not return while some task has
    committed nothing (its new owner would restore zero records and never reach the phase),
    and must return once every task's committed checkpoint covers the offset."""
    run = await wordcount_run("exactly_once", "memory", seed=5)
    with pytest.raises(AssertionError, match="does not exist"):
        await wait_changelog_committed(run.job, "counts", run.bootstrap, min_offset=1, wait_s=0)
    run.driver.start_worker()
    await run.produce(300, rate=1000)
    covered = await wait_changelog_committed(
        run.job, "counts", run.bootstrap, min_offset=10, wait_s=60
    )
    assert sorted(covered) == [0, 1, 2, 3] and min(covered.values()) >= 10
    with pytest.raises(AssertionError, match=r"partitions \[0, 1, 2, 3\] cover offsets"):
        await wait_changelog_committed(run.job, "counts", run.bootstrap, min_offset=10**9, wait_s=0)
    report = await run.finish_and_verify(workers=1)
    run.assert_ok(report)
