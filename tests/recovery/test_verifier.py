"""The verifier itself: it must catch every gap, repeat and over-count (no Kafka needed)."""

from __future__ import annotations

from runtime.recovery import (
    check_at_least_once,
    check_exactly_once,
    check_state,
    skewed_partitioner,
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
