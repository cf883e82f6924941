"""The chain of a stage, compiled once per task into closures: the per-record path.

Per record: deserialize key and value with the stage's serde, point the state stores at the raw
key bytes, and call a chain of closures (map, flat_map, filter, operators, then the output).
Outputs are appended to the task's list as ready-to-send byte tuples; state is never
serialized here — the stores do that once per dirty key at a checkpoint.

What keeps that path short (it is most of a worker's own CPU; see ``bench/task_micro.py``):

- the loop over a batch is one closure per task (:func:`compile_feed`) with what it touches in
  locals; ``try`` costs nothing until something raises (Python 3.11+);
- the fast paths of :mod:`headrace.runtime.task.fusion`: narrower serde functions, built-in
  aggregations as direct cache steps, and a stage that is only ``count()`` into a sink as one
  inlined loop (:func:`compile_count_to_sink`);
- user operators get a ``Record`` per record; nothing else is kept per record (steps pass the
  raw record and the key bytes along, see :data:`~headrace.runtime.task.records.Step`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from headrace.operators.job import (
    FilterStep,
    FlatMapStep,
    MapStep,
    ProcessStep,
    RepartitionSpec,
    SinkSpec,
)
from headrace.operators.operator import Operator
from headrace.operators.record import Record, describe_key
from headrace.runtime.checkpoint.barrier import (
    SEQ_INDEX_BITS,
    SEQ_TOPIC_BITS,
    SEQUENCE_HEADER,
    TIME_HEADER,
    channel_headers,
)
from headrace.runtime.state.encoding import fast_serde_function
from headrace.runtime.state.handles import ABSENT, MISS
from headrace.runtime.task.fusion import builtin_handle, builtin_step, never_none
from headrace.runtime.task.records import (
    FAILED,
    KEY_CHANGED,
    NO_HEADERS,
    RECORD_OVERHEAD,
    RawRecord,
    RecordTooLargeError,
    StateTooLargeError,
    Step,
    TaskContext,
)

if TYPE_CHECKING:
    from headrace.operators.job import Job, Stage
    from headrace.runtime.kafka.producer import OutRecord
    from headrace.runtime.state.store import OperatorStateStore
    from headrace.runtime.task.errors import RecordErrors
    from headrace.runtime.task.timers import TaskTime

#: the compiled loop over ``records[start:end]``
Feed = Callable[[Sequence[RawRecord], int, int], None]


class ChainOwner(Protocol):
    """What the compiled chain reads of its task (a StageTask); a protocol, so that the chain
    does not import the task that imports it."""

    job: Job
    stage: Stage
    partition: int
    stores: dict[str, OperatorStateStore]
    out: list[OutRecord]
    #: record keys whose state is checked after each of their records (see compile_feed)
    watched: set[bytes]
    downstream_partitions: int | None
    errors: RecordErrors
    key_deserialize: Callable[[Any], Any]
    value_deserialize: Callable[[Any], Any]
    sequence_outputs: bool
    hop_format: int
    topic_index: dict[str, int]
    #: index of the next output of the record being processed (at-least-once sequences)
    out_index: int
    compiled: list[tuple[Operator, TaskContext]]
    #: event time: watermark and timers (None: the job does not use event time)
    time: TaskTime | None

    def record_limit(self, topic: str) -> int: ...

    def side_output(
        self, topic: str | None, headers: list[tuple[str, bytes]], raw: Any, late: bool
    ) -> None: ...


def compile_chain(task: ChainOwner) -> tuple[Step, list[tuple[Operator, TaskContext]]]:
    """The head step of the stage's chain and its operators with their contexts, in order."""
    nxt = compile_output(task)
    compiled: list[tuple[Operator, TaskContext]] = []
    for step in reversed(task.stage.steps):
        nxt = compile_step(task, step, nxt, compiled)
    compiled.reverse()
    return nxt, compiled


def compile_step(
    task: ChainOwner,
    step: Any,
    nxt: Step,
    compiled: list[tuple[Operator, TaskContext]],
) -> Step:
    if isinstance(step, MapStep):
        fn = step.fn

        def map_step(r: Any, kb: Any, k: Any, v: Any) -> None:
            nxt(r, kb, k, fn(v))

        return map_step
    if isinstance(step, FlatMapStep):
        ffn = step.fn

        def flat_map_step(r: Any, kb: Any, k: Any, v: Any) -> None:
            for x in ffn(v):
                nxt(r, kb, k, x)

        return flat_map_step
    if isinstance(step, FilterStep):
        pred = step.fn

        def filter_step(r: Any, kb: Any, k: Any, v: Any) -> None:
            if pred(v):
                nxt(r, kb, k, v)

        return filter_step
    if isinstance(step, ProcessStep):
        op = step.instantiate()
        store = task.stores.get(step.operator_id)
        if store is not None:
            store.bind_operator(op)
        ctx = TaskContext(step.operator_id, task.partition, nxt)
        ctx._side = task.side_output
        if task.time is not None:
            ctx.time = task.time
            if store is not None and type(op).on_timer is not Operator.on_timer:
                task.time.add_operator(op, ctx, store)
        compiled.append((op, ctx))
        if store is not None:
            builtin = builtin_step(op, store, nxt)
            if builtin is not None:
                return builtin
        process = op.process

        def process_step(r: Any, kb: Any, k: Any, v: Any) -> None:
            ctx.key = k
            ctx._kb = kb
            ctx._raw = r
            h = r.headers
            process(
                Record(
                    k,
                    v,
                    r.topic,
                    r.partition,
                    r.offset,
                    r.timestamp,
                    # a fetched record's headers are the list aiokafka's reader decoded
                    # (runtime/kafka/fetch.py): the operator gets its own tuple
                    tuple(h) if h else (),
                ),
                ctx,
            )

        return process_step
    raise TypeError(f"unknown step {step!r}")


def compile_output(task: ChainOwner) -> Step:
    out_append = task.out.append
    output = task.stage.output
    if isinstance(output, SinkSpec):
        topic = output.topic
        kser, vser = output.key_serde.serialize, output.value_serde.serialize
        kfast, vfast = fast_serde_function(kser), fast_serde_function(vser)

        # While the key is still the record's (``kb`` is not KEY_CHANGED), the sink writes
        # the record's key bytes, if the sink's key serde is the source's.
        reuse = output.key_serde == task.stage.source.key_serde

        limit = task.record_limit(topic)
        room = limit - RECORD_OVERHEAD

        def sink(r: Any, kb: Any, k: Any, v: Any) -> None:
            try:
                vb = vfast(v)
            except Exception:
                if vfast is vser:
                    raise
                vb = vser(v)  # the serde's own function decides (and names the error)
            if k is None:
                kb = None
            elif kb is KEY_CHANGED or not reuse:
                try:
                    kb = kfast(k)
                except Exception:
                    if kfast is kser:
                        raise
                    kb = kser(k)
            # One comparison per output: a record the broker would refuse fails here, at
            # the input record that made it, under the error policy (not at the checkpoint's
            # send, where it used to stop the worker with a bare MessageSizeTooLargeError).
            if len(vb) > room or (kb is not None and len(vb) + len(kb) > room):
                raise RecordTooLargeError(topic, len(vb) + len(kb or b""), limit)
            # the output's Kafka timestamp is its event time: the input's, or what emit() set
            out_append((topic, None, kb, vb, NO_HEADERS, r.timestamp))

        return sink
    if isinstance(output, RepartitionSpec):
        n = task.downstream_partitions
        if not n:
            raise ValueError(f"{task.stage.name} repartitions: downstream_partitions needed")
        rtopic, key_fn = output.topic, output.key_fn
        rkser, rvser = output.key_serde.serialize, output.value_serde.serialize
        timed = task.time is not None
        headers = channel_headers(task.partition)
        # Hop format 2 (kafka/hopformat.py): a record carries a *mark* (one int: channel and
        # sequence number) and the sender writes them once per batch. Event-time jobs write
        # format 1: their records carry their own time (hr.ts) anyway.
        marks = task.hop_format >= 2 and not timed
        own = task.partition
        plain: Any = own if marks else headers
        crc32 = zlib.crc32
        rlimit = task.record_limit(rtopic)
        rroom = rlimit - RECORD_OVERHEAD

        # Internal topics are partitioned with crc32 (C speed); only headrace reads them.
        def repartition(r: Any, kb: Any, k: Any, v: Any) -> None:
            kb = rkser(key_fn(v))
            vb = rvser(v)
            if len(vb) > rroom - len(kb):
                raise RecordTooLargeError(rtopic, len(vb) + len(kb), rlimit)
            out_append((rtopic, crc32(kb) % n, kb, vb, plain, None))

        channel = headers[0]
        if not task.sequence_outputs and not timed:
            return repartition
        topic_index = task.topic_index
        sequenced = task.sequence_outputs
        index_bits, topic_bits = SEQ_INDEX_BITS, SEQ_TOPIC_BITS

        # Event time crosses the hop in a header (hr.ts), not as the Kafka timestamp: a
        # repartition topic deletes by retention, and old event times (a backfill) would make
        # the broker delete records nobody has read yet.
        def repartition_sequenced(r: Any, kb: Any, k: Any, v: Any) -> None:
            kb = rkser(key_fn(v))
            vb = rvser(v)
            if len(vb) > rroom - len(kb):
                raise RecordTooLargeError(rtopic, len(vb) + len(kb), rlimit)
            # a timer fired between batches (offset -1) has no input position to derive a
            # sequence from: its outputs are not deduplicated (they may repeat under
            # at-least-once, like sink outputs)
            offset = r.offset
            if sequenced and offset >= 0:
                index = task.out_index
                task.out_index = index + 1
                # barrier.sequence(offset, index, topic), inlined: once per output record
                seq = (((offset << index_bits) | index) << topic_bits) | topic_index[r.topic]
                if marks:
                    h: Any = ((seq + 1) << 32) | own  # hopformat.mark, inlined
                elif timed:
                    ts = b"%d" % r.timestamp
                    h = [channel, (SEQUENCE_HEADER, b"%d" % seq), (TIME_HEADER, ts)]
                else:
                    h = [channel, (SEQUENCE_HEADER, b"%d" % seq)]
            else:
                h = [channel, (TIME_HEADER, b"%d" % r.timestamp)] if timed else plain
            out_append((rtopic, crc32(kb) % n, kb, vb, h, None))

        return repartition_sequenced

    def discard(r: Any, kb: Any, k: Any, v: Any) -> None:
        return None

    return discard


def compile_feed(task: ChainOwner, head: Step) -> Feed:
    """The per-record loop over ``records[start:end]``: deserialize, scope the state stores,
    run the chain; a failing record goes to the error policy and the loop goes on.

    One closure per task with everything it touches in locals: per record it costs the
    serde calls, one store attribute write per stateful operator and the chain's calls.
    ``try`` is free on Python 3.11+ until something raises.

    Event time (runtime/task/timers.py) adds two steps, each a test of a local that is None
    for jobs without it: the source's ``timestamp=`` extractor before the chain (its result
    becomes the record's timestamp, so operators, sinks and the hop see it), and, in a source
    stage, the watermark update after the record ran, which fires the event-time timers it
    passes right there: what is late depends only on the order of the input.
    """
    time = task.time
    extract = task.stage.source.timestamp if time is not None else None
    observe = time.observe if time is not None and not task.stage.source.internal else None
    if time is None:
        fused = compile_count_to_sink(task, [op for op, _ in task.compiled])
        if fused is not None:
            return fused
    out = task.out
    stores = tuple(task.stores.values())
    single = stores[0] if len(stores) == 1 else None
    kdes, vdes = task.key_deserialize, task.value_deserialize
    kfast, vfast = fast_serde_function(kdes), fast_serde_function(vdes)
    deserialize_failed = task.errors.deserialize_failed
    on_error = task.errors.on_error
    sequenced = task.sequence_outputs and isinstance(task.stage.output, RepartitionSpec)
    watched = task.watched
    guarded = _state_guard(task, head)

    def run(records: Sequence[RawRecord], start: int, end: int) -> None:
        for i in range(start, end):
            r = records[i]
            kb = r.key
            try:
                key = None if kb is None else kfast(kb)
            except Exception as exc:
                key = deserialize_failed(r, exc, kfast, kdes, kb)
                if key is FAILED:
                    continue
            v = r.value
            try:
                value = vfast(v)
            except Exception as exc:
                value = deserialize_failed(r, exc, vfast, vdes, v)
                if value is FAILED:
                    continue
            if extract is not None:
                try:
                    r.timestamp = int(extract(value))  # type: ignore[misc]
                except Exception as exc:
                    on_error(r, "timestamp extraction", exc)
                    continue
            sk = b"" if kb is None else kb
            if single is not None:
                single.current_key = sk
            else:
                for store in stores:
                    store.current_key = sk
            if sequenced:
                task.out_index = 0
            mark = len(out)
            try:
                if watched and sk in watched:  # an empty set: one truth test per record
                    guarded(r, kb, key, value, sk)
                else:
                    head(r, kb, key, value)
            except Exception as exc:
                # Outputs of a half-processed record are discarded; its state writes cannot
                # be taken back and stay (as in Flink/Kafka Streams with skip-style handlers).
                del out[mark:]
                on_error(r, "processing", exc)
            if observe is not None:
                observe(r, r.timestamp)

    return run


def _state_guard(task: ChainOwner, head: Step) -> Callable[..., None]:
    """Run a record of a watched key (its state is near its changelog's record limit, see
    ``StageTask._check_fits``) and take its state writes back if one would not fit: the
    record then fails like any other, under the error policy, before anything of it is
    kept. Costs a copy and a serialization of the key's values, for those records only."""
    stores = [
        (op_id, store, task.job.changelog_topic(op_id)) for op_id, store in task.stores.items()
    ]

    def guarded(r: Any, kb: Any, key: Any, value: Any, sk: bytes) -> None:
        images = [(store, store.key_image(sk)) for _, store, _ in stores]
        head(r, kb, key, value)
        for op_id, store, topic in stores:
            state, size = store.largest_write(sk)
            limit = task.record_limit(topic)
            if size > limit - RECORD_OVERHEAD:
                for st, image in images:
                    st.restore_key_image(sk, image)
                raise StateTooLargeError(
                    op_id, state, describe_key(sk), size, limit, topic, at_record=True
                )

    return guarded


def compile_count_to_sink(task: ChainOwner, operators: list[Operator]) -> Feed | None:
    """The per-record loop of a stage that is only a built-in ``count()`` into a sink that
    writes the record's key (S1, and the counting stage of a word count), with the step
    and the sink inlined: the chain's records, calls and store scoping are skipped.

    Same observable behaviour as the chain: key and value are deserialized (only to check
    them: count uses neither, the sink writes the key bytes as they came, or no key if the
    key deserialized to None); the state is read and written as ``Count.process`` does;
    a failure after the state write (the output serde) keeps the write, like the chain.
    """
    steps, output = task.stage.steps, task.stage.output
    if len(steps) != 1 or not isinstance(steps[0], ProcessStep):
        return None
    if not isinstance(output, SinkSpec) or output.key_serde != task.stage.source.key_serde:
        return None
    store = task.stores.get(steps[0].operator_id)
    if store is None:
        return None
    found = builtin_handle(operators[0], store)
    if found is None or found[0] != "count":
        return None
    port = found[1].cache_port()
    cache, load, default = port.cache, port.load, port.default
    get, dirty_add = cache.get, port.dirty_add
    out_append = task.out.append
    topic = output.topic
    oser = output.value_serde.serialize
    ofast = fast_serde_function(oser)
    kdes, vdes = task.key_deserialize, task.value_deserialize
    kfast, vfast = fast_serde_function(kdes), fast_serde_function(vdes)
    key_may_be_none = not never_none(kdes)
    deserialize_failed = task.errors.deserialize_failed
    on_error = task.errors.on_error

    def run_count(records: Sequence[RawRecord], start: int, end: int) -> None:
        for i in range(start, end):
            r = records[i]
            kb = r.key
            sk = b"" if kb is None else kb
            if kb is not None:
                try:
                    key = kfast(kb)
                except Exception as exc:
                    key = deserialize_failed(r, exc, kfast, kdes, kb)
                    if key is FAILED:
                        continue
                if key is None and key_may_be_none:
                    kb = None  # the sink writes no key for a None key
            v = r.value
            try:
                vfast(v)
            except Exception as exc:
                if deserialize_failed(r, exc, vfast, vdes, v) is FAILED:
                    continue
            try:
                n = get(sk, MISS)
                if n is MISS:
                    n = load(sk)
                if n is ABSENT:
                    n = default()
                n = n + 1
                cache[sk] = ABSENT if n is None else n
                dirty_add(sk)
                try:
                    vb = ofast(n)
                except Exception:
                    if ofast is oser:
                        raise
                    vb = oser(n)
            except Exception as exc:
                on_error(r, "processing", exc)
                continue
            out_append((topic, None, kb, vb, NO_HEADERS, r.timestamp))
        if end > start:
            store.current_key = sk

    return run_count
