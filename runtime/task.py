"""A task: one stage instance for one input partition. No I/O.

The task owns the operator instances of its stage, their bound state stores, and the input
cut bookkeeping (clock barriers for a source stage, :class:`BarrierAligner` for a stage fed by a
repartition topic). The worker (Kafka) and the test driver (lists in memory) feed it records and
carry out the checkpoints it prepares, so both run exactly this code.

Per-record path: deserialize key and value with the stage's serde, point the state stores at
the raw key bytes, and call a chain of closures compiled once per task (map, flat_map, filter,
operators, then the output). Outputs are appended to a list as ready-to-send byte tuples; state
is never serialized here — the stores do that once per dirty key at a checkpoint.

What keeps that path short (it is most of a worker's own CPU; see ``bench/task_micro.py``):

- the loop over a batch is one closure per task (:meth:`StageTask._compile_feed`) with what it
  touches in locals; ``try`` costs nothing until something raises (Python 3.11+);
- the built-in serdes' functions are replaced by narrower C-level variants that fall back to
  the serde's own function whenever they raise (:data:`_FAST_SERDE`);
- the built-in ``count``/``sum``/``reduce``/``aggregate`` operators run as steps that read and
  write their handle's cache directly (:func:`builtin_step`): no ``Record``, context or handle
  calls; a stage that is only ``count()`` into a sink runs as one inlined loop
  (:meth:`StageTask._compile_count_to_sink`);
- user operators get a ``Record`` per record, as before; nothing else is kept per record
  (steps pass the raw record and the key bytes along, see :data:`Step`).
"""

from __future__ import annotations

import logging
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from headrace.operators.builtins import Count, _Aggregate, _Fold
from headrace.operators.job import (
    ErrorPolicy,
    FilterStep,
    FlatMapStep,
    Job,
    MapStep,
    ProcessStep,
    RepartitionSpec,
    SinkSpec,
    Stage,
)
from headrace.operators.operator import SAME_KEY, Operator
from headrace.operators.record import Record, describe_key
from headrace.operators.serde import BYTES, FLOAT, INT, JSON, STR
from headrace.runtime.checkpoint.alignment import BarrierAligner
from headrace.runtime.checkpoint.barrier import (
    BARRIER_HEADER,
    SEQUENCE_HEADER,
    barrier_headers,
    barrier_id,
    channel_headers,
    dedupe_slot,
    sequence,
)
from headrace.runtime.checkpoint.pending import PendingCheckpoint
from headrace.runtime.kafka.producer import Headers, OutRecord
from headrace.runtime.logs import mask
from headrace.runtime.state.handles import ABSENT, MISS, AggregatingHandle, ValueHandle
from headrace.runtime.state.store import OperatorStateStore

log = logging.getLogger(__name__)

_NO_HEADERS: Headers = []  # shared, never mutated

#: A compiled step of a stage's chain: ``step(raw, key_bytes, key, value)``. ``raw`` is the
#: input record being processed (operators' ``Record``s, error reports and sequence numbers
#: come from it); ``key_bytes`` is the record's key bytes while ``key`` is still the record's
#: key (so a sink with the source's key serde writes them as they came), else _KEY_CHANGED.
Step = Callable[[Any, Any, Any, Any], None]


class _Marker:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


_KEY_CHANGED: Any = _Marker("<key changed>")
_FAILED: Any = _Marker("<failed>")

#: Narrower C-level variants of the built-in serdes' functions, tried first on the per-record
#: path. Wherever a variant returns, its result equals the serde function's; where it raises
#: (another input type such as a bytearray, or a genuinely bad value) the serde's own function
#: runs and decides, so results and reported errors are the serde's.
_FAST_SERDE: dict[Any, Callable[[Any], Any]] = {
    STR.deserialize: bytes.decode,  # bytes(data).decode("utf-8")
    STR.serialize: str.encode,  # value.encode("utf-8"); (a str subclass overriding encode()
    # is encoded as the str it is)
    BYTES.deserialize: bytes.__bytes__,  # bytes(data): BYTES.serialize is the same function
    INT.serialize: struct.Struct(">q").pack,
    FLOAT.serialize: struct.Struct(">d").pack,
    JSON.deserialize: orjson.loads,
    JSON.serialize: orjson.dumps,
}


#: Deserializers that never return None (a None key is written as no key by a sink).
_NEVER_NONE = frozenset({STR.deserialize, BYTES.deserialize, INT.deserialize, FLOAT.deserialize})


def fast_serde_function(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The faster variant of a built-in serde function (see _FAST_SERDE), else ``fn``."""
    try:
        return _FAST_SERDE.get(fn, fn)
    except TypeError:  # an unhashable callable object
        return fn


def _never_none(fn: Callable[[Any], Any]) -> bool:
    try:
        return fn in _NEVER_NONE
    except TypeError:  # an unhashable callable object
        return False


def builtin_handle(op: Operator, store: OperatorStateStore) -> tuple[str, Any] | None:
    """``("count" | "fold" | "aggregate", handle)`` for a built-in ``count``, ``sum``/``reduce``
    or ``aggregate`` operator whose own ``process`` runs over a handle without TTL bound to
    ``store``; None for anything else (a user operator, a subclass overriding ``process``, TTL
    state), which then runs as written."""
    process = type(op).process
    namespace = vars(op)
    if process is Count.process:
        kind, handle = "count", namespace.get("count")
    elif process is _Fold.process:
        kind, handle = "fold", namespace.get("acc")
    elif process is _Aggregate.process:
        kind, handle = "aggregate", namespace.get("state")
    else:
        return None
    if kind == "aggregate":
        if type(handle) is not AggregatingHandle or handle._ttl is not None:
            return None
    elif type(handle) is not ValueHandle:  # (TTL value state has its own handle class)
        return None
    if handle._store is not store:
        return None
    return kind, handle


def builtin_step(op: Operator, store: OperatorStateStore, nxt: Step) -> Step | None:
    """The compiled step of a built-in ``count``/``sum``/``reduce``/``aggregate`` (see
    :func:`builtin_handle`), or None.

    It does what the operator's ``process`` does with its handle (``value()`` + ``update()``,
    or ``add()`` + ``get()``) on the handle's cache dict and dirty set directly (see
    :data:`headrace.runtime.state.handles.MISS`), without a ``Record``, a context or handle method
    calls, and emits with the record's key as the operator does.
    """
    found = builtin_handle(op, store)
    if found is None:
        return None
    kind, handle = found
    cache = handle._cache
    get = cache.get
    dirty_add = handle._dirty.add
    load = handle._load

    if kind == "count":
        default = handle._default

        def count_step(r: Any, kb: Any, k: Any, v: Any) -> None:
            sk = store.current_key
            n = get(sk, MISS)
            if n is MISS:
                n = load(sk)
            if n is ABSENT:
                n = default()
            n = n + 1
            cache[sk] = ABSENT if n is None else n
            dirty_add(sk)
            nxt(r, kb, k, n)

        return count_step

    if kind == "fold":
        default = handle._default
        fn = op.fn  # type: ignore[attr-defined]
        first_is_value = op.initial is None  # type: ignore[attr-defined]

        def fold_step(r: Any, kb: Any, k: Any, v: Any) -> None:
            sk = store.current_key
            cur = get(sk, MISS)
            if cur is MISS:
                cur = load(sk)
            if cur is ABSENT:
                cur = default()
            new = v if cur is None and first_is_value else fn(cur, v)
            cache[sk] = ABSENT if new is None else new
            dirty_add(sk)
            nxt(r, kb, k, new)

        return fold_step

    function = handle._fn
    create, add, result = function.create_accumulator, function.add, function.get_result

    def aggregate_step(r: Any, kb: Any, k: Any, v: Any) -> None:
        sk = store.current_key
        acc = get(sk, MISS)
        if acc is MISS:
            acc = load(sk)
        if acc is ABSENT:
            acc = create()
        acc = add(v, acc)
        cache[sk] = acc
        dirty_add(sk)
        nxt(r, kb, k, result(acc))

    return aggregate_step


class RawRecord(Protocol):
    """What the task reads: aiokafka's ConsumerRecord has this shape, so does the test driver's."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


class RecordError(Exception):
    """A record failed under the ``fail`` policy; names where it is and what went wrong."""

    def __init__(self, record: RawRecord, kind: str, cause: BaseException) -> None:
        self.topic, self.partition, self.offset = record.topic, record.partition, record.offset
        self.kind = kind
        super().__init__(
            f"{kind} failed for the record at topic {record.topic!r} partition "
            f"{record.partition} offset {record.offset} key {describe_key(record.key)}: "
            f"{type(cause).__name__}: {cause}"
        )


@dataclass(slots=True)
class TaskCounters:
    """Per-task counters, read by the worker's metrics at scrape time."""

    records_in: int = 0
    records_out: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    checkpoints: int = 0
    unaligned_checkpoints: int = 0
    #: at-least-once: repartition records dropped as replays of records seen before
    deduplicated: int = 0


class TaskContext:
    """The :class:`headrace.operators.operator.Context` given to one operator of one task.

    Besides the record key it carries the raw input record and the key's bytes (see
    :data:`Step`), so that ``emit`` passes them on without the task keeping per-record state.
    """

    __slots__ = ("_kb", "_next", "_raw", "key", "operator_id", "partition")

    def __init__(self, operator_id: str, partition: int, nxt: Step):
        self.operator_id = operator_id
        self.partition = partition
        self.key: Any = None
        self._kb: Any = None
        self._raw: Any = None
        self._next = nxt

    def emit(self, value: Any, key: Any = SAME_KEY) -> None:
        if key is SAME_KEY or key is self.key:
            self._next(self._raw, self._kb, self.key, value)
        else:
            self._next(self._raw, _KEY_CHANGED, key, value)


class StageTask:
    """One stage for one partition: operators, state stores and the input cut."""

    def __init__(
        self,
        job: Job,
        stage: Stage,
        partition: int,
        stores: dict[str, OperatorStateStore],
        *,
        upstream_partitions: int | None = None,
        downstream_partitions: int | None = None,
        checkpoint_interval_ms: int = 1000,
        alignment_timeout: float = 60.0,
        clock: Callable[[], float],
        error_policy: ErrorPolicy | None = None,
        sequence_outputs: bool = False,
    ) -> None:
        self.job = job
        self.stage = stage
        self.partition = partition
        self.stores = stores
        self.clock = clock
        self.checkpoint_interval_ms = checkpoint_interval_ms
        self.error_policy = error_policy or job.error_policy
        self.counters = TaskCounters()
        self.out: list[OutRecord] = []
        self.pending: PendingCheckpoint | None = None
        self.last_checkpoint = 0
        self.downstream_partitions = downstream_partitions
        self._store_list = list(stores.values())
        # A tombstone (None value) reaches the serde and fails there: the error policy decides.
        self._key_deserialize: Callable[[Any], Any] = stage.source.key_serde.deserialize
        self._value_deserialize: Callable[[Any], Any] = stage.source.value_serde.deserialize
        self._positions: dict[tuple[str, int], int] = {}
        self.aligner: BarrierAligner | None = None
        self._upstream_partitions = upstream_partitions
        self._alignment_timeout = alignment_timeout
        # at-least-once dedupe across the repartition hop (see headrace.runtime.checkpoint.barrier)
        self._sequence_outputs = sequence_outputs and not stage.source.internal
        self._out_index = 0
        self._topic_index = {t: i for i, t in enumerate(stage.source.topics)}
        self.seen: dict[int, int] = {}
        if stage.source.internal and not upstream_partitions:
            raise ValueError(f"{stage.name} reads a repartition topic: upstream_partitions needed")
        self.operators: list[Operator] = []
        self._contexts: list[TaskContext] = []
        self._head = self._compile()
        self._run = self._compile_feed()

    # -- chain compilation -------------------------------------------------------------------
    def _compile(self) -> Step:
        nxt = self._compile_output()
        compiled: list[tuple[Operator, TaskContext]] = []
        for step in reversed(self.stage.steps):
            nxt = self._compile_step(step, nxt, compiled)
        compiled.reverse()
        self.operators = [op for op, _ in compiled]
        self._contexts = [ctx for _, ctx in compiled]
        return nxt

    def _compile_step(
        self,
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
            store = self.stores.get(step.operator_id)
            if store is not None:
                store.bind_operator(op)
            ctx = TaskContext(step.operator_id, self.partition, nxt)
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
                        h if h.__class__ is tuple else tuple(h),
                    ),
                    ctx,
                )

            return process_step
        raise TypeError(f"unknown step {step!r}")

    def _compile_output(self) -> Step:
        out_append = self.out.append
        output = self.stage.output
        task = self
        if isinstance(output, SinkSpec):
            topic = output.topic
            kser, vser = output.key_serde.serialize, output.value_serde.serialize
            kfast, vfast = fast_serde_function(kser), fast_serde_function(vser)

            # While the key is still the record's (``kb`` is not _KEY_CHANGED), the sink writes
            # the record's key bytes, if the sink's key serde is the source's.
            reuse = output.key_serde == self.stage.source.key_serde

            def sink(r: Any, kb: Any, k: Any, v: Any) -> None:
                try:
                    vb = vfast(v)
                except Exception:
                    if vfast is vser:
                        raise
                    vb = vser(v)  # the serde's own function decides (and names the error)
                if k is None:
                    kb = None
                elif kb is _KEY_CHANGED or not reuse:
                    try:
                        kb = kfast(k)
                    except Exception:
                        if kfast is kser:
                            raise
                        kb = kser(k)
                out_append((topic, None, kb, vb, _NO_HEADERS))

            return sink
        if isinstance(output, RepartitionSpec):
            n = self.downstream_partitions
            if not n:
                raise ValueError(f"{self.stage.name} repartitions: downstream_partitions needed")
            rtopic, key_fn = output.topic, output.key_fn
            rkser, rvser = output.key_serde.serialize, output.value_serde.serialize
            headers = channel_headers(self.partition)
            crc32 = zlib.crc32

            # Internal topics are partitioned with crc32 (C speed); only headrace reads them.
            def repartition(r: Any, kb: Any, k: Any, v: Any) -> None:
                kb = rkser(key_fn(v))
                out_append((rtopic, crc32(kb) % n, kb, rvser(v), headers))

            if not self._sequence_outputs:
                return repartition
            channel = headers[0]
            topic_index = self._topic_index

            def repartition_sequenced(r: Any, kb: Any, k: Any, v: Any) -> None:
                seq = sequence(r.offset, task._out_index, topic_index[r.topic])
                task._out_index += 1
                kb = rkser(key_fn(v))
                seq_header = (SEQUENCE_HEADER, b"%d" % seq)
                out_append((rtopic, crc32(kb) % n, kb, rvser(v), [channel, seq_header]))

            return repartition_sequenced

        def discard(r: Any, kb: Any, k: Any, v: Any) -> None:
            return None

        return discard

    def _compile_feed(self) -> Callable[[Sequence[RawRecord], int, int], None]:
        """The per-record loop over ``records[start:end]``: deserialize, scope the state stores,
        run the chain; a failing record goes to the error policy and the loop goes on.

        One closure per task with everything it touches in locals: per record it costs the
        serde calls, one store attribute write per stateful operator and the chain's calls.
        ``try`` is free on Python 3.11+ until something raises.
        """
        fused = self._compile_count_to_sink()
        if fused is not None:
            return fused
        head = self._head
        out = self.out
        stores = tuple(self._store_list)
        single = stores[0] if len(stores) == 1 else None
        kdes, vdes = self._key_deserialize, self._value_deserialize
        kfast, vfast = fast_serde_function(kdes), fast_serde_function(vdes)
        deserialize_failed = self._deserialize_failed
        on_error = self._on_error
        sequenced = self._sequence_outputs and isinstance(self.stage.output, RepartitionSpec)
        task = self

        def run(records: Sequence[RawRecord], start: int, end: int) -> None:
            for i in range(start, end):
                r = records[i]
                kb = r.key
                try:
                    key = None if kb is None else kfast(kb)
                except Exception as exc:
                    key = deserialize_failed(r, exc, kfast, kdes, kb)
                    if key is _FAILED:
                        continue
                v = r.value
                try:
                    value = vfast(v)
                except Exception as exc:
                    value = deserialize_failed(r, exc, vfast, vdes, v)
                    if value is _FAILED:
                        continue
                sk = b"" if kb is None else kb
                if single is not None:
                    single.current_key = sk
                else:
                    for store in stores:
                        store.current_key = sk
                if sequenced:
                    task._out_index = 0
                mark = len(out)
                try:
                    head(r, kb, key, value)
                except Exception as exc:
                    # Outputs of a half-processed record are discarded; its state writes cannot
                    # be taken back and stay (as in Flink/Kafka Streams with skip-style handlers).
                    del out[mark:]
                    on_error(r, "processing", exc)

        return run

    def _compile_count_to_sink(self) -> Callable[[Sequence[RawRecord], int, int], None] | None:
        """The per-record loop of a stage that is only a built-in ``count()`` into a sink that
        writes the record's key (S1, and the counting stage of a word count), with the step
        and the sink inlined: the chain's records, calls and store scoping are skipped.

        Same observable behaviour as the chain: key and value are deserialized (only to check
        them: count uses neither, the sink writes the key bytes as they came, or no key if the
        key deserialized to None); the state is read and written as ``Count.process`` does;
        a failure after the state write (the output serde) keeps the write, like the chain.
        """
        steps, output = self.stage.steps, self.stage.output
        if len(steps) != 1 or not isinstance(steps[0], ProcessStep):
            return None
        if not isinstance(output, SinkSpec) or output.key_serde != self.stage.source.key_serde:
            return None
        store = self.stores.get(steps[0].operator_id)
        if store is None:
            return None
        found = builtin_handle(self.operators[0], store)
        if found is None or found[0] != "count":
            return None
        handle = found[1]
        cache, load, default = handle._cache, handle._load, handle._default
        get, dirty_add = cache.get, handle._dirty.add
        out_append = self.out.append
        topic = output.topic
        oser = output.value_serde.serialize
        ofast = fast_serde_function(oser)
        kdes, vdes = self._key_deserialize, self._value_deserialize
        kfast, vfast = fast_serde_function(kdes), fast_serde_function(vdes)
        key_may_be_none = not _never_none(kdes)
        deserialize_failed = self._deserialize_failed
        on_error = self._on_error

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
                        if key is _FAILED:
                            continue
                    if key is None and key_may_be_none:
                        kb = None  # the sink writes no key for a None key
                v = r.value
                try:
                    vfast(v)
                except Exception as exc:
                    if deserialize_failed(r, exc, vfast, vdes, v) is _FAILED:
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
                out_append((topic, None, kb, vb, _NO_HEADERS))
            if end > start:
                store.current_key = sk

        return run_count

    # -- lifecycle ---------------------------------------------------------------------------
    def open(
        self,
        *,
        last_checkpoint: int = 0,
        positions: dict[tuple[str, int], int] | None = None,
        skip: dict[int, int] | None = None,
        seen: dict[int, int] | None = None,
    ) -> None:
        """Start after restore: ``positions`` are the committed offsets per input partition."""
        self.last_checkpoint = last_checkpoint
        self.seen = dict(seen or {})
        self._positions = dict(positions or {})
        if self.stage.source.internal:
            assert self._upstream_partitions
            topic = self.stage.source.topics[0]
            self.aligner = BarrierAligner(
                self._upstream_partitions,
                last_checkpoint=last_checkpoint,
                position=self._positions.get((topic, self.partition), 0),
                skip=skip,
                timeout=self._alignment_timeout,
                clock=self.clock,
            )
        for op, ctx in zip(self.operators, self._contexts, strict=True):
            op.open(ctx)

    def position(self, topic: str) -> int:
        """Next offset to read from this task's partition of ``topic``."""
        if self.aligner is not None:
            return self.aligner.position
        return self._positions.get((topic, self.partition), 0)

    def close(self) -> None:
        for op in self.operators:
            op.close()

    # -- records -----------------------------------------------------------------------------
    def feed(self, records: Sequence[RawRecord], start: int = 0) -> int:
        """Process ``records[start:]``; stop early when a checkpoint becomes due.

        Returns the index of the first record not consumed. The caller commits
        :attr:`pending`, calls :meth:`checkpoint_committed`, and feeds the rest.
        """
        if self.pending is not None:
            return start
        if start < len(records):
            start = self._skip_consumed(records, start)
        if self.aligner is None:
            n = len(records)
            if n > start:
                self._run(records, start, n)
                last = records[-1]
                self._positions[(last.topic, last.partition)] = last.offset + 1
                self.counters.records_in += n - start
            return n
        return self._feed_aligned(records, start)

    def _skip_consumed(self, records: Sequence[RawRecord], start: int) -> int:
        """Skip records below the task's position: a batch fetched before a seek.

        aiokafka may hand out a batch fetched before a rebalance after the task was resumed or
        restored and its input seeked back to the committed offset; those records come again
        from the seek, so processing the early copy too would count them twice.
        """
        position = self.position(records[start].topic)
        while start < len(records) and records[start].offset < position:
            start += 1
        return start

    def rewind(self, positions: dict[tuple[str, int], int], skip: dict[int, int]) -> None:
        """Reset the input cut to the last committed checkpoint (a suspended task resumes).

        The state is the committed state (a final checkpoint releases nothing), so reading again
        from the committed offsets, skipping per channel what the cut already includes, is exact.
        """
        self._positions = dict(positions)
        if self.aligner is not None:
            assert self._upstream_partitions
            topic = self.stage.source.topics[0]
            self.aligner = BarrierAligner(
                self._upstream_partitions,
                last_checkpoint=self.last_checkpoint,
                position=self._positions.get((topic, self.partition), 0),
                skip=skip,
                timeout=self._alignment_timeout,
                clock=self.clock,
            )

    def _feed_aligned(self, records: Sequence[RawRecord], start: int) -> int:
        aligner = self.aligner
        assert aligner is not None
        process = self._process_sequenced
        n = len(records)
        i = start
        while i < n:
            r = records[i]
            i += 1
            headers = r.headers
            channel = int(headers[0][1])
            if not aligner.admit(channel, r.offset):
                continue
            if len(headers) > 1 and headers[1][0] == BARRIER_HEADER:
                aligner.on_barrier(channel, r.offset, int(headers[1][1]))
                if aligner.ready:
                    self._prepare(force=False, final=False)
                    break
            elif aligner.on_record(channel, r.offset, r):
                process(r, channel)
        if n:
            self._positions[(records[0].topic, self.partition)] = aligner.position
        return i

    def _process_sequenced(self, r: RawRecord, channel: int) -> None:
        """A repartition record: drop it if an upstream replay already delivered it."""
        self.counters.records_in += 1
        headers = r.headers
        if len(headers) > 1:
            seq = int(headers[1][1])
            slot = dedupe_slot(channel, seq)
            if seq <= self.seen.get(slot, -1):
                self.counters.deduplicated += 1
                return
            self.seen[slot] = seq
        self._process(r)

    def _process(self, r: RawRecord) -> None:
        self._run((r,), 0, 1)

    def _deserialize_failed(
        self,
        r: RawRecord,
        exc: Exception,
        fast: Callable[[Any], Any],
        serde_fn: Callable[[Any], Any],
        data: Any,
    ) -> Any:
        """A deserializer raised on the per-record path: the value, or _FAILED once the error
        policy has dealt with the record. If it was a faster variant of the serde's function,
        the serde's own function decides (it accepts more input types, and its error is the
        one reported); a user's serde is never called twice."""
        if fast is not serde_fn:
            try:
                return serde_fn(data)
            except Exception as real:
                exc = real
        self._on_error(r, "deserialization", exc)
        return _FAILED

    def _on_error(self, r: RawRecord, kind: str, exc: Exception) -> None:
        policy = self.error_policy
        if policy is ErrorPolicy.FAIL:
            raise RecordError(r, kind, exc) from exc
        where = f"topic {r.topic!r} partition {r.partition} offset {r.offset}"
        if policy is ErrorPolicy.SKIP:
            self.counters.skipped += 1
            log.warning("skipped record at %s after %s error: %r", where, kind, exc)
            return
        self.counters.dead_lettered += 1
        headers = [
            ("hr.error.kind", kind.encode()),
            ("hr.error.topic", r.topic.encode()),
            ("hr.error.partition", b"%d" % r.partition),
            ("hr.error.offset", b"%d" % r.offset),
            # masked: an error message can quote a secret, and this header leaves the process
            ("hr.error.message", mask(f"{type(exc).__name__}: {exc}")[:1000].encode()),
        ]
        self.out.append((self.job.dead_letter_topic, None, r.key, r.value, headers))
        log.warning("dead-lettered record at %s after %s error: %r", where, kind, exc)

    # -- checkpoints ---------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Clock-driven work between batches: source barriers and alignment timeouts."""
        if self.pending is not None:
            return
        if self.aligner is None:
            n = barrier_id(now, self.checkpoint_interval_ms)
            if n > self.last_checkpoint:
                self._prepare(force=False, final=False, checkpoint_id=n)
        elif self.aligner.timed_out():
            log.warning(
                "task %s/%d: alignment timed out after %.1fs; checkpointing unaligned",
                self.stage.name,
                self.partition,
                self.aligner.alignment_seconds(),
            )
            self._prepare(force=True, final=False)

    def final_checkpoint(self) -> PendingCheckpoint:
        """Checkpoint now (revocation or shutdown), aligned or not."""
        if self.pending is None:
            n = None
            if self.aligner is None:
                n = max(self.last_checkpoint, barrier_id(self.clock(), self.checkpoint_interval_ms))
            self._prepare(force=True, final=True, checkpoint_id=n)
        assert self.pending is not None
        return self.pending

    def _prepare(self, *, force: bool, final: bool, checkpoint_id: int | None = None) -> None:
        aligner = self.aligner
        skip: dict[int, int] = {}
        aligned = True
        seconds = 0.0
        offsets = dict(self._positions)
        if aligner is not None:
            seconds = aligner.alignment_seconds()
            cut = aligner.cut(force=force)
            checkpoint_id, skip, aligned = cut.checkpoint_id, cut.skip, cut.aligned
            offsets[(self.stage.source.topics[0], self.partition)] = cut.offset
        assert checkpoint_id is not None
        for op in self.operators:
            op.on_checkpoint(checkpoint_id)
        changes = {op_id: store.take_changes() for op_id, store in self.stores.items()}
        outputs = self.out[:]
        self.out.clear()
        barriers: list[OutRecord] = []
        output = self.stage.output
        if isinstance(output, RepartitionSpec) and self.downstream_partitions:
            headers = barrier_headers(self.partition, checkpoint_id)
            barriers = [
                (output.topic, p, None, b"", headers) for p in range(self.downstream_partitions)
            ]
        self.pending = PendingCheckpoint(
            checkpoint_id,
            offsets,
            skip,
            aligned,
            final,
            changes,
            dict(self.seen),
            outputs,
            barriers,
            seconds,
        )

    def checkpoint_committed(self, changelog_offsets: dict[str, int | None]) -> None:
        """The pending checkpoint is durable: update local stores, release held records."""
        pending = self.pending
        assert pending is not None
        for op_id, store in self.stores.items():
            store.apply_changes(
                pending.changes.get(op_id, []), changelog_offset=changelog_offsets.get(op_id)
            )
        self.pending = None
        self.last_checkpoint = max(self.last_checkpoint, pending.checkpoint_id)
        self.counters.checkpoints += 1
        if not pending.aligned:
            self.counters.unaligned_checkpoints += 1
        if self.aligner is not None and not pending.final:
            # After a final checkpoint the task stops (or is suspended and later rewound to
            # this cut): held records stay unprocessed so the state is exactly the committed one.
            for r in self.aligner.complete(pending.checkpoint_id):
                self._process_sequenced(r, int(r.headers[0][1]))
            if self.aligner.ready:
                self._prepare(force=False, final=False)
