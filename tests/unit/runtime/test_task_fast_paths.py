"""The task's fast paths behave exactly like the operators and serdes as written.

``headrace.runtime.task`` runs the built-in count/sum/reduce/aggregate as compiled steps over the
state
cache (and ``count()`` into a sink as one inlined loop), and tries narrower C-level variants of
the built-in serdes first. Each test runs the same records through a job as built (fast paths)
and through the same job whose built-in operators have a ``process`` of their own (so the task
runs them as written, through ``Record``, context and handles), and compares everything the
task produced: outputs (dead letters and their error headers included), the state changes it
would checkpoint, its counters, and ``fail``'s error message.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from headrace.operators.builtins import aggregate_operator, fold_operator
from headrace.operators.job import ErrorPolicy, Job, Stream
from headrace.operators.operator import Context, Operator
from headrace.operators.record import Record
from headrace.operators.serde import BYTES, FLOAT, INT, JSON, STR, Serde
from headrace.operators.state import AggregateFunction, ValueStateDescriptor, declared_state
from headrace.runtime.state.keys import StatePartitionKey
from headrace.runtime.state.memory import MemoryBackend
from headrace.runtime.state.store import OperatorStateStore
from headrace.runtime.task import RecordError, StageTask, builtin_handle, fast_serde_function
from headrace.runtime.testing import MemoryRecord

Build = Callable[[Stream, Callable[[Operator], Operator]], Stream]


def as_written(op: Operator) -> Operator:
    """The same operator with a ``process`` of its own: the task runs it as written."""
    base = type(op)

    def process(self: Operator, record: Record[Any, Any], ctx: Context) -> None:
        base.process(self, record, ctx)

    slow = copy.copy(op)
    slow.__class__ = type(f"AsWritten{base.__name__}", (base,), {"process": process})
    return slow


class Avg(AggregateFunction[int, list[int], float]):
    def create_accumulator(self) -> list[int]:
        return [0, 0]

    def add(self, value: int, accumulator: list[int]) -> list[int]:
        return [accumulator[0] + value, accumulator[1] + 1]

    def get_result(self, accumulator: list[int]) -> float:
        return accumulator[0] / accumulator[1]

    def merge(self, a: list[int], b: list[int]) -> list[int]:
        return [a[0] + b[0], a[1] + b[1]]


class Rekey(Operator):
    """Emits each value under the value's text as key (stateless)."""

    def process(self, record: Record[Any, Any], ctx: Context) -> None:
        ctx.emit(record.value, key=f"k{record.value}")


class SameKey(Operator):
    """Emits with the record's own key object passed explicitly."""

    def process(self, record: Record[Any, Any], ctx: Context) -> None:
        ctx.emit(record.value, key=record.key)


def _count() -> Operator:
    from headrace.operators.builtins import Count

    return Count()


def _sum() -> Operator:
    return fold_operator("Sum", lambda acc, v: acc + v, JSON, initial=0)


def _reduce_clearing() -> Operator:
    # None clears the state: the next value starts again
    return fold_operator("Reduce", lambda acc, v: None if v == 0 else max(acc, v), JSON)


JOBS: dict[str, tuple[Serde[Any], Serde[Any], Build]] = {
    # S1's shape: count() into a sink (the inlined loop)
    "count": (
        STR,
        BYTES,
        lambda s, w: s.process(w(_count()), name="n").sink("o", key_serde=STR, value_serde=INT),
    ),
    "count-str-values": (
        STR,
        STR,
        lambda s, w: s.process(w(_count()), name="n").sink("o", key_serde=STR, value_serde=INT),
    ),
    "count-json-keys": (
        JSON,
        JSON,
        lambda s, w: s.process(w(_count()), name="n").sink("o", key_serde=JSON, value_serde=INT),
    ),
    "count-other-key-serde": (
        STR,
        JSON,
        lambda s, w: s.process(w(_count()), name="n").sink("o", key_serde=JSON, value_serde=INT),
    ),
    "filter-map-count": (
        STR,
        JSON,
        lambda s, w: (
            s.filter(lambda v: v % 3 != 1)
            .map(lambda v: v * 2)
            .process(w(_count()), name="n")
            .sink("o", key_serde=STR, value_serde=INT)
        ),
    ),
    "sum": (
        STR,
        JSON,
        lambda s, w: s.process(w(_sum()), name="t").sink("o", key_serde=STR, value_serde=INT),
    ),
    "reduce": (
        STR,
        JSON,
        lambda s, w: s.process(w(_reduce_clearing()), name="r").sink(
            "o", key_serde=STR, value_serde=JSON
        ),
    ),
    "aggregate": (
        STR,
        JSON,
        lambda s, w: s.process(w(aggregate_operator(Avg(), JSON)), name="a").sink(
            "o", key_serde=STR, value_serde=JSON
        ),
    ),
    "rekey-then-count": (
        STR,
        JSON,
        lambda s, w: (
            s.process(Rekey(), name="rk")
            .process(w(_count()), name="n")
            .sink("o", key_serde=STR, value_serde=INT)
        ),
    ),
    "same-key-then-sum": (
        STR,
        JSON,
        lambda s, w: (
            s.process(SameKey(), name="sk")
            .process(w(_sum()), name="t")
            .sink("o", key_serde=STR, value_serde=INT)
        ),
    ),
    "count-sum-count": (
        STR,
        JSON,
        lambda s, w: (
            s.process(w(_sum()), name="t")
            .process(w(_count()), name="n")
            .process(w(_sum()), name="t2")
            .sink("o", key_serde=STR, value_serde=INT)
        ),
    ),
}


def build(name: str, slow: bool, policy: ErrorPolicy = ErrorPolicy.DEAD_LETTER) -> Job:
    kserde, vserde, chain = JOBS[name]
    job = Job("fp", error_policy=policy)
    chain(job.source("in", key_serde=kserde, value_serde=vserde), as_written if slow else _same)
    return job


def _same(op: Operator) -> Operator:
    return op


def make_task(job: Job) -> StageTask:
    stage = job.stages[0]
    stores = {
        s.operator_id: OperatorStateStore(MemoryBackend(), StatePartitionKey(s.operator_id, 0, 0))
        for s in stage.process_steps()
        if declared_state(type(s.prototype))
    }
    task = StageTask(job, stage, 0, stores, clock=lambda: 1_000.0)
    task.open()
    return task


def records(pairs: list[tuple[Any, Any]]) -> list[MemoryRecord]:
    return [MemoryRecord("in", 0, i, k, v, timestamp=1000 + i) for i, (k, v) in enumerate(pairs)]


def encode(kserde: Serde[Any], vserde: Serde[Any], n: int) -> list[tuple[Any, Any]]:
    """Good records: a few keys (one of them None), values 0..9."""
    keys: list[Any] = ["a", "b", "a", None, "c", "a", "b"]
    out = []
    for i in range(n):
        k = keys[i % len(keys)]
        v: Any = i % 10
        if vserde is BYTES:
            v = b"%d" % v
        elif vserde is STR:
            v = str(v)
        out.append((None if k is None else kserde.serialize(k), vserde.serialize(v)))
    return out


def run(job: Job, recs: list[MemoryRecord], batch: int = 7) -> dict[str, Any]:
    """Feed ``recs`` in batches; everything the task produced."""
    task = make_task(job)
    error: str | None = None
    try:
        for start in range(0, len(recs), batch):
            chunk = recs[start : start + batch]
            assert task.feed(chunk) == len(chunk)
    except RecordError as exc:
        error = str(exc)
    changes = {op: sorted(store.take_changes()) for op, store in task.stores.items()}
    c = task.counters
    return {
        "out": list(task.out),
        "changes": changes,
        "counters": (c.records_in, c.skipped, c.dead_lettered),
        "error": error,
        "positions": task.cut.positions,
    }


def same_as_written(
    name: str, recs: list[MemoryRecord], policy: ErrorPolicy = ErrorPolicy.DEAD_LETTER
) -> dict[str, Any]:
    fast_job, slow_job = build(name, False, policy), build(name, True, policy)
    fast_task, slow_task = make_task(fast_job), make_task(slow_job)
    for task, in_use in ((fast_task, True), (slow_task, False)):
        for op in task.operators:
            store = task.stores.get(op.operator_id)
            if store is not None:  # the fast path is in use for the built-ins as built
                assert (builtin_handle(op, store) is not None) is in_use
    fast, slow = run(fast_job, recs), run(slow_job, recs)
    assert fast == slow
    return fast


@pytest.mark.parametrize("name", sorted(JOBS))
def test_builtin_steps_match_the_operators_as_written(name: str) -> None:
    kserde, vserde, _ = JOBS[name]
    result = same_as_written(name, records(encode(kserde, vserde, 40)))
    assert len(result["out"]) > 10
    assert result["counters"] == (40, 0, 0)


def test_count_to_sink_is_one_inlined_loop_with_s1_results() -> None:
    task = make_task(build("count", False))
    assert task.run.__name__ == "run_count"
    assert make_task(build("count-other-key-serde", False)).run.__name__ == "run"
    result = run(build("count", False), records([(b"a", b"x"), (b"b", b""), (b"a", b"y")]))
    assert result["out"] == [
        # each output carries its input's timestamp (its event time)
        ("o", None, b"a", INT.serialize(1), [], 1000),
        ("o", None, b"b", INT.serialize(1), [], 1001),
        ("o", None, b"a", INT.serialize(2), [], 1002),
    ]


BAD = [
    (b"\xff\xfe", b"1"),  # key: not UTF-8 (nor JSON)
    (b"a", None),  # a tombstone: every value serde here fails on None
    (b"a", b"\xff"),  # value: not UTF-8 / JSON (BYTES takes it)
    (bytearray(b"b"), bytearray(b"2")),  # not bytes: the fast variants decline, serdes take it
    (b"null", b"3"),  # JSON: the key deserializes to None
]


@pytest.mark.parametrize("policy", [ErrorPolicy.SKIP, ErrorPolicy.DEAD_LETTER])
@pytest.mark.parametrize("name", sorted(JOBS))
def test_bad_records_take_the_same_error_path(name: str, policy: ErrorPolicy) -> None:
    kserde, vserde, _ = JOBS[name]
    good = encode(kserde, vserde, 6)
    recs = records(good[:3] + BAD + good[3:])
    result = same_as_written(name, recs, policy)
    failed = result["counters"][1] + result["counters"][2]
    assert failed >= 1
    if policy is ErrorPolicy.DEAD_LETTER:
        dlq = [o for o in result["out"] if o[0] == "fp.dlq"]
        assert len(dlq) == failed
        assert all(dict(o[4])["hr.error.offset"] for o in dlq)


@pytest.mark.parametrize("name", ["count", "count-str-values", "sum", "filter-map-count"])
def test_fail_policy_names_the_first_bad_record_the_same_way(name: str) -> None:
    kserde, vserde, _ = JOBS[name]
    recs = records([*encode(kserde, vserde, 5), (b"\xff", b"1"), *encode(kserde, vserde, 3)])
    result = same_as_written(name, recs, ErrorPolicy.FAIL)
    assert result["error"] is not None
    assert "topic 'in' partition 0 offset 5 key b'\\xff'" in result["error"]
    assert "deserialization failed" in result["error"]
    assert result["positions"] == {}  # the first batch (offsets 0-6) did not complete


@pytest.mark.parametrize("name", ["count", "sum", "aggregate"])
def test_undecodable_stored_state_is_a_processing_error_of_that_record(name: str) -> None:
    kserde, vserde, _ = JOBS[name]
    recs = records(encode(kserde, vserde, 9))
    results = []
    for slow in (False, True):
        job = build(name, slow)
        task = make_task(job)
        (store,) = task.stores.values()
        (handle,) = store.handles().values()
        store.backend.put(handle._skey(kserde.serialize("b")), b"\x01")  # not the state's serde
        task.feed(recs)
        results.append((task.out, task.counters.dead_lettered))
    assert results[0] == results[1]
    out, dead = results[0]
    assert dead == 3  # every record of key "b" (offsets 1, 6, 8)
    assert [dict(o[4])["hr.error.kind"] for o in out if o[0] == "fp.dlq"] == [b"processing"] * 3


def test_a_failing_output_serde_keeps_the_state_write_like_the_chain() -> None:
    def odd_only(n: int) -> bytes:
        if n % 2 == 0:
            raise ValueError(f"even: {n}")
        return INT.serialize(n)

    serde = Serde("odd-only", odd_only, INT.deserialize)
    results = []
    for slow in (False, True):
        job = Job("fp", error_policy=ErrorPolicy.SKIP)
        job.source("in", key_serde=STR, value_serde=BYTES).process(
            as_written(_count()) if slow else _count(), name="n"
        ).sink("o", key_serde=STR, value_serde=serde)
        task = make_task(job)
        assert (task.run.__name__ == "run_count") is not slow
        task.feed(records([(b"a", b"")] * 5))
        (store,) = task.stores.values()
        results.append((task.out, task.counters.skipped, store.take_changes()))
    assert results[0] == results[1]
    out, skipped, changes = results[0]
    assert [o[3] for o in out] == [INT.serialize(1), INT.serialize(3), INT.serialize(5)]
    assert skipped == 2
    assert changes[-1][1] == INT.serialize(5)


def test_ttl_state_runs_the_operator_as_written() -> None:
    from headrace.operators.builtins import Count

    class CountWithTtl(Count):
        count = ValueStateDescriptor[int](type=int, default=0, ttl=60)

    job = Job("fp")
    job.source("in", key_serde=STR, value_serde=BYTES).process(CountWithTtl(), name="n").sink(
        "o", key_serde=STR, value_serde=INT
    )
    task = make_task(job)
    (store,) = task.stores.values()
    assert builtin_handle(task.operators[0], store) is None
    assert task.run.__name__ == "run"
    task.feed(records([(b"a", b""), (b"a", b"")]))
    assert [o[3] for o in task.out] == [INT.serialize(1), INT.serialize(2)]


@pytest.mark.parametrize("name", sorted(JOBS))
def test_the_serdes_own_functions_decide_where_the_fast_variants_decline(name: str) -> None:
    """A bytearray value (not what aiokafka hands out, but what the serdes accept) makes the
    C-level variants raise: the record is still processed, by the serde."""
    kserde, vserde, _ = JOBS[name]
    task = make_task(build(name, False, ErrorPolicy.DEAD_LETTER))
    (k, v) = encode(kserde, vserde, 1)[0]
    task.feed(records([(k, bytearray(v))]))
    assert (task.counters.records_in, task.counters.dead_lettered) == (1, 0)
    assert task.out and task.out[0][0] == "o"


def test_a_bytearray_key_is_deserialized_and_written_by_the_serdes() -> None:
    job = Job("fp", error_policy=ErrorPolicy.DEAD_LETTER)
    job.source("in", key_serde=STR, value_serde=STR).map(str.upper).sink(
        "o", key_serde=STR, value_serde=STR
    )
    job2 = Job("fp", error_policy=ErrorPolicy.DEAD_LETTER)
    job2.source("in", key_serde=STR, value_serde=STR).process(Rekey(), name="rk").sink(
        "o", key_serde=STR, value_serde=STR
    )
    task, task2 = make_task(job), make_task(job2)
    task.feed(records([(bytearray(b"k"), b"v")]))
    task2.feed(records([(b"k", b"v")]))
    assert task.out == [("o", None, bytearray(b"k"), b"V", [], 1000)]  # key bytes as they came
    assert task2.out == [("o", None, b"kv", b"v", [], 1000)]  # a new key: serialized


def test_errors_are_the_serdes_own() -> None:
    task = make_task(build("count-str-values", False, ErrorPolicy.DEAD_LETTER))
    task.feed(records([(b"\xff", b"1"), (b"a", b"\xff")]))
    messages = [dict(o[4])["hr.error.message"].decode() for o in task.out]
    for data, message in zip([b"\xff", b"\xff"], messages, strict=True):
        with pytest.raises(UnicodeDecodeError) as raised:
            STR.deserialize(data)
        assert message == f"UnicodeDecodeError: {raised.value}"


SAMPLES: list[Any] = [
    b"abc",
    b"",
    b"\xff",
    b'{"a": 1}',
    b"null",
    bytearray(b"12345678"),
    memoryview(b"xy"),
    None,
    "text",
    "",
    0,
    -(2**63),
    2**63,
    1.5,
    True,
    {"a": [1, None]},
    [1, "x"],
    object(),
]


@pytest.mark.parametrize("serde", [STR, BYTES, INT, JSON, FLOAT], ids=lambda s: s.name)
@pytest.mark.parametrize("direction", ["serialize", "deserialize"])
def test_fast_serde_variants_agree_with_the_serde_wherever_they_return(
    serde: Serde[Any], direction: str
) -> None:
    fn = getattr(serde, direction)
    fast = fast_serde_function(fn)
    for sample in SAMPLES:
        try:
            got = fast(sample)
        except Exception:
            continue  # the serde's own function decides
        assert fn(sample) == got, sample
        assert type(fn(sample)) is type(got), sample


@pytest.mark.parametrize("name", ["count", "sum", "count-sum-count"])
def test_compiled_steps_see_state_restored_after_the_task_was_built(name: str) -> None:
    """The worker builds a task, then restores its stores; the compiled steps hold the
    handles' cache dicts, so a restore (and eviction) must keep using those same dicts."""
    kserde, vserde, _ = JOBS[name]
    recs = records(encode(kserde, vserde, 30))
    first, second = recs[:20], recs[20:]
    source = make_task(build(name, False))
    source.feed(first)
    changes = {op: store.take_changes() for op, store in source.stores.items()}
    reference = make_task(build(name, False))
    reference.feed(first)
    reference.out.clear()
    reference.feed(second)

    task = make_task(build(name, False))
    task.feed(records(encode(kserde, vserde, 11)))  # state that the restore must replace
    task.out.clear()
    for op, store in task.stores.items():
        store.restore(changes[op])
        store.cache_max_entries = 0
        store.apply_changes([])  # evicts every clean cache entry
    task.feed(second)
    assert task.out == reference.out


@pytest.mark.parametrize("hop_format", [1, 2])
def test_the_inlined_hop_sequence_is_barrier_sequence(hop_format: int) -> None:
    """The at-least-once hop writes its sequence inline (chain.repartition_sequenced): in
    ``hr.seq`` (hop format 1) or in the record's mark (format 2, kafka/hopformat.py), it must
    stay the number barrier.sequence gives, which is what readers of records already in a
    repartition topic compare against."""
    from headrace.runtime.checkpoint.barrier import SEQUENCE_HEADER, sequence
    from headrace.runtime.kafka import hopformat

    job = Job("seq")
    (
        job.source("in", key_serde=STR, value_serde=STR)
        .flat_map(lambda line: line.split())
        .key_by(lambda word: word, key_serde=STR)
        .count(name="counts")
        .sink("out", key_serde=STR, value_serde=INT)
    )
    stage = job.stages[0]
    task = StageTask(
        job,
        stage,
        3,
        {},
        clock=lambda: 1_000.0,
        downstream_partitions=4,
        sequence_outputs=True,
        hop_format=hop_format,
    )
    task.open()
    lines = records([(STR.serialize("k"), STR.serialize("a b c")), (None, STR.serialize("d"))])
    task.run(lines, 0, len(lines))
    want = [sequence(0, 0, 0), sequence(0, 1, 0), sequence(0, 2, 0), sequence(1, 0, 0)]
    if hop_format == 1:
        got = [dict(out[4])[SEQUENCE_HEADER] for out in task.out]  # type: ignore[arg-type]
        assert got == [b"%d" % s for s in want]
    else:
        marks = [out[4] for out in task.out]
        assert all(isinstance(m, int) for m in marks)
        assert [hopformat.mark_sequence(m) for m in marks] == want  # type: ignore[arg-type]
        assert {hopformat.mark_channel(m) for m in marks} == {3}  # type: ignore[arg-type]
