"""The job identity check without a broker: what counts as the same job, a safe change, or a
change that would lose or mix state (runtime/kafka/identity.py), and stable operator ids."""

from __future__ import annotations

from typing import Any

import pytest

from headrace import JSON, STR, Job
from headrace.operators.job import JobDefinitionError
from headrace.operators.operator import Context, Operator
from headrace.operators.record import Record
from headrace.operators.state import ListStateDescriptor, ValueStateDescriptor
from headrace.runtime.kafka.identity import compare, current_identity, describe


class Visits(Operator):
    n = ValueStateDescriptor[int](type=int, default=0)

    def process(self, record: Record[Any, Any], ctx: Context) -> None:
        ctx.emit(record.value)


class VisitsJson(Visits):
    n = ValueStateDescriptor[int](serde=JSON, default=0)


class VisitsAndPages(Visits):
    pages = ListStateDescriptor[str](type=str)


def job(
    *,
    source: str = "clicks",
    op: Operator | None = None,
    name: str = "visits",
    extra_map: bool = False,
    key_serde: Any = STR,
) -> dict[str, Any]:
    j = Job("site")
    stream = j.source(source, key_serde=key_serde, value_serde=JSON)
    if extra_map:
        stream = stream.map(lambda v: v)
    stream.process(op or Visits(), name=name).sink("out")
    return describe(j)


def test_the_same_job_has_the_same_fingerprint_and_no_difference() -> None:
    assert job()["fingerprint"] == job()["fingerprint"]
    assert compare(job(), job()).refused == compare(job(), job()).safe == []


def test_stateless_steps_and_new_states_are_safe_changes() -> None:
    diff = compare(job(), job(extra_map=True, op=VisitsAndPages()))
    assert diff.refused == []
    assert "state 'pages' of 'visits' added (starts empty)" in diff.safe
    assert any("steps changed" in line for line in diff.safe)


@pytest.mark.parametrize(
    ("changed", "expected"),
    [
        (job(op=VisitsJson()), "state 'n' of 'visits' changed serde int64 -> json"),
        (job(name="visitors"), "operator 'visits' removed or renamed"),
        (job(source="views"), "sources changed: ['clicks'] -> ['views']"),
        (job(key_serde=JSON), "key serde of stage stage0 changed str -> json"),
    ],
)
def test_changes_that_would_lose_or_mix_state_are_refused(
    changed: dict[str, Any], expected: str
) -> None:
    diff = compare(job(), changed)
    assert any(expected in line for line in diff.refused), diff


def test_a_removed_operator_without_state_left_is_a_safe_change() -> None:
    diff = compare(job(), job(name="visitors"), has_state=set())
    assert diff.refused == []
    assert "operator 'visits' removed (its changelog topic is gone)" in diff.safe


def test_a_new_operator_under_an_old_name_with_state_left_is_refused() -> None:
    before = job()
    before["operators"] = {}
    diff = compare(before, job(), has_state={"visits"})
    assert any("already holds state of an earlier operator" in line for line in diff.refused)


def test_concurrent_writers_agree_on_the_first_record_and_later_safe_changes() -> None:
    a, b, a_safe = job(), job(source="views"), job(extra_map=True)
    # b raced a for a fresh name; then a's next deployment made a safe change
    assert current_identity([a, b, a_safe]) is a_safe
    assert current_identity([b, a]) is b  # whoever is first in the log wins, for everyone
    assert current_identity([]) is None


def test_unnamed_stateful_operators_are_named_after_their_kind_and_never_shift() -> None:
    j = Job("wc")
    stream = j.source("lines", key_serde=STR, value_serde=STR).map(str.upper)
    stream.count()
    assert [s.operator_id for s in j.stages[0].process_steps()] == ["count"]
    with pytest.raises(JobDefinitionError, match="both be called 'count'"):
        stream.count()
    stream.count(name="second")
    stream.process(Visits())
    assert [s.operator_id for s in j.stages[0].process_steps()] == ["count", "second", "visits"]


def window_job(windows: Any, lateness: float = 0.0, emit: str = "final") -> dict[str, Any]:
    j = Job("site")
    j.source("clicks", key_serde=STR, value_serde=JSON).window(
        windows, allowed_lateness=lateness, emit=emit
    ).count(name="per-minute").sink("out")
    return describe(j)


def test_a_window_that_changes_size_or_lateness_is_refused_and_emit_mode_is_safe() -> None:
    from headrace import Hopping, Tumbling

    before = window_job(Tumbling(60))
    assert compare(before, window_job(Tumbling(60), emit="update")).refused == []
    for changed in (
        window_job(Tumbling(30)),
        window_job(Tumbling(60), lateness=5),
        window_job(Hopping(60, 30)),
    ):
        refused = compare(before, changed).refused
        assert any("lays its state out differently" in line for line in refused), refused
    # timers are a state of their own: adding on_timer to an operator is a safe change
    assert "_hr_timers" in before["operators"]["per-minute"]["states"]
