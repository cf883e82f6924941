"""The invariant of ARCHITECTURE.md section 6, checked with the in-process driver.

The driver runs the production task, commit and restore code over an in-memory log with
transactions. Random interleavings of input, checkpoints and crashes must leave: the state
equal to a replay of the input; under exactly-once each word's output exactly 1..count; under
at-least-once outputs that may repeat but never skip.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from examples.corpus import count_words, generate_lines
from examples.wordcount import build
from headrace.operators.job import ErrorPolicy, Job
from headrace.operators.serde import INT, JSON, STR
from headrace.runtime.task import RecordError
from headrace.runtime.testing import JobTester

LINES = generate_lines(600, seed=3)

steps = st.lists(
    st.tuples(
        st.integers(1, 120),
        st.sampled_from(
            ["run", "checkpoint", "crash", "crash-after-changelog", "crash-after-commit"]
        ),
    ),
    min_size=1,
    max_size=12,
)


def drive(
    tester: JobTester,
    schedule: list[tuple[int, str]],
    inputs: list[str] = LINES,
    send: Callable[[JobTester, str], None] = lambda t, line: t.send("lines", line),
) -> None:
    """Feed ``inputs`` in the chunks of ``schedule``, acting after each; then everything else."""
    i = 0
    for n, action in schedule:
        for item in inputs[i : i + n]:
            send(tester, item)
        i += n
        tester.run()
        if action == "checkpoint":
            tester.checkpoint()
        elif action == "crash":
            tester.crash()
        elif action.startswith("crash-"):
            tester.crash_during_next_checkpoint(action.removeprefix("crash-"))
            tester.checkpoint()
    for item in inputs[i:]:
        send(tester, item)
    # A crash armed by the last step fires at the next checkpoint that commits something (an
    # idle one commits nothing), which may be the first of these: the second then restarts the
    # tasks and commits the first batch, the third everything.
    tester.checkpoint()
    tester.checkpoint()
    tester.checkpoint()


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
@pytest.mark.parametrize("backend", ["memory", "rocksdb"])
@settings(max_examples=25, deadline=None)
@given(schedule=steps)
# a replay of source input after a crash re-sends repartition records (at-least-once dedupe)
@example(schedule=[(1, "run"), (1, "crash")])
# changelog written, offsets not: restore must not apply, and must overwrite, the stale writes
@example(schedule=[(40, "run"), (40, "crash-after-changelog"), (40, "checkpoint")])
@example(schedule=[(40, "crash-after-commit"), (40, "run")])
def test_crashes_at_any_point_leave_state_equal_to_replay(
    guarantee: str,
    backend: str,
    schedule: list[tuple[int, str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    tester = JobTester(
        build("wc", "lines", "word-counts"),
        partitions=3,
        guarantee=guarantee,
        backend=backend,
        state_dir=tmp_path_factory.mktemp("state"),
        batch_size=29,
    )
    try:
        drive(tester, schedule)
        expected = count_words(LINES)
        state = {key: v for (_, key), v in tester.state("counts").items()}
        assert state == dict(expected)
        assert tester.latest("word-counts") == dict(expected)
        sequences: dict[str, list[int]] = defaultdict(list)
        for word, n in tester.output("word-counts"):
            sequences[word].append(n)
        for word, count in expected.items():
            if guarantee == "exactly_once":
                assert sequences[word] == list(range(1, count + 1)), word
            else:
                assert set(sequences[word]) == set(range(1, count + 1)), word  # repeats, no gaps
    finally:
        tester.close()


def _strict_job(policy: ErrorPolicy) -> Job:
    job = Job("strict", error_policy=policy)
    job.source("numbers", key_serde=STR, value_serde=JSON).map(lambda v: v["n"]).sum(
        name="total"
    ).sink("totals", key_serde=STR, value_serde=INT)
    return job


def test_fail_policy_names_topic_partition_offset_and_key() -> None:
    with JobTester(_strict_job(ErrorPolicy.FAIL), partitions=1) as tester:
        tester.send("numbers", {"n": 1}, key="a")
        tester.send_raw("numbers", b"not json", b"a", 0)
        with pytest.raises(RecordError, match=r"topic 'numbers' partition 0 offset 1 key b'a'"):
            tester.run()


def test_skip_policy_counts_and_goes_on() -> None:
    with JobTester(_strict_job(ErrorPolicy.SKIP), partitions=1) as tester:
        tester.send("numbers", {"n": 1}, key="a")
        tester.send_raw("numbers", b"not json", b"a", 0)
        tester.send("numbers", {"n": 2}, key="a")
        tester.checkpoint()
        assert tester.latest("totals") == {"a": 3}
        assert tester.tasks[("stage0", 0)].task.counters.skipped == 1


def test_dead_letter_policy_writes_the_record_with_error_headers() -> None:
    with JobTester(_strict_job(ErrorPolicy.DEAD_LETTER), partitions=1) as tester:
        tester.send("numbers", {"n": 1}, key="a")
        tester.send_raw("numbers", b"not json", b"a", 0)
        tester.send("numbers", {"x": 5}, key="b")  # fails in the map: a processing error
        tester.checkpoint()
        assert tester.latest("totals") == {"a": 1}
        dlq = tester.log.read("strict.dlq", 0, 0, committed_only=True)
        assert [r.value for r in dlq] == [b"not json", b'{"x":5}']
        headers = dict(dlq[0].headers)
        assert headers["hr.error.offset"] == b"1"
        assert headers["hr.error.kind"] == b"deserialization"
        assert dict(dlq[1].headers)["hr.error.kind"] == b"processing"


def _keyed_count_job() -> Job:
    """A single-stage job: state in a *source* task, whose checkpoint cuts follow the clock."""
    job = Job("kc")
    job.source("words", key_serde=STR, value_serde=STR).count(name="counts").sink(
        "counts-out", key_serde=STR, value_serde=INT
    )
    return job


WORDS = [w for line in LINES for w in line.lower().split()][:2500]


@pytest.mark.parametrize("backend", ["memory", "rocksdb"])
@settings(max_examples=25, deadline=None)
@given(schedule=steps)
# The restarted task checkpoints after fewer records than the attempt whose changelog writes
# never committed: keys only the lost attempt touched must be rewritten with committed values.
@example(schedule=[(300, "crash-after-changelog"), (5, "run"), (5, "crash")])
def test_at_least_once_source_state_survives_uncommitted_changelog_writes(
    backend: str, schedule: list[tuple[int, str]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    with JobTester(
        _keyed_count_job(),
        partitions=2,
        guarantee="at_least_once",
        backend=backend,
        state_dir=tmp_path_factory.mktemp("state"),
        batch_size=23,
    ) as tester:
        drive(tester, schedule, WORDS, lambda t, w: t.send("words", w, key=w))
        tester.crash()  # the final state must also survive a restore from the changelog
        tester.checkpoint()
        expected = {}
        for w in WORDS:
            expected[w] = expected.get(w, 0) + 1
        assert {k: v for (_, k), v in tester.state("counts").items()} == expected


def test_a_batch_fetched_before_a_seek_is_not_counted_twice() -> None:
    """aiokafka can return records fetched before a rebalance after the task was rewound and
    its input seeked back: the copies that come again from the seek must be dropped."""
    with JobTester(_keyed_count_job(), partitions=1) as tester:
        for w in ["a", "b", "a", "c", "a"]:
            tester.send("words", w, key=w)
        tester.checkpoint()
        io = tester.tasks[("stage0", 0)]
        records = tester.log.read("words", 0, 0, committed_only=True)
        assert io.task.feed(records) == len(records)  # the same batch again: all below position
        tester.checkpoint()
        assert tester.latest("counts-out") == {"a": 3, "b": 1, "c": 1}
        assert {k: v for (_, k), v in tester.state("counts").items()} == {"a": 3, "b": 1, "c": 1}
