"""User operators: plain Python classes with declared state.

Following Flink, state is *declared* (descriptors as class attributes) and *obtained* from the
runtime: when a task starts, the runtime makes one instance of the operator for that task (a
copy of the prototype the job was built with) and binds every declared state descriptor to the
task's own backend. Operator code never constructs a backend and never does I/O for state.

    class Deduplicate(Operator):
        seen = ValueStateDescriptor(type=bool, default=False)

        def process(self, record, ctx):
            if not self.seen.value():
                self.seen.update(True)
                ctx.emit(record.value)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Protocol

from headrace.operators.record import Record
from headrace.operators.time import TimerService

#: Marker meaning "keep the current record's key" in :meth:`Context.emit`.
SAME_KEY: Any = object()


class Context(Protocol):
    """What an operator may do while processing a record."""

    @property
    def partition(self) -> int:
        """The task's partition (== subtask index with one task per partition)."""
        ...

    @property
    def operator_id(self) -> str: ...

    @property
    def timestamp(self) -> int:
        """Event time (ms) of the record being processed, or the time of the firing timer."""
        ...

    @property
    def watermark(self) -> int:
        """The task's current watermark (ms; ``MIN_WATERMARK`` before the first)."""
        ...

    @property
    def timers(self) -> TimerService:
        """Timers of the current key; only on operators that define ``on_timer``."""
        ...

    def processing_time(self) -> int:
        """The wall clock (ms) as the task sees it (``JobTester`` moves it by hand)."""
        ...

    def emit(self, value: Any, key: Any = SAME_KEY, timestamp: int | None = None) -> None:
        """Pass ``value`` downstream, keyed by ``key`` (default: the input record's key).

        Within a stage the key only affects the key written by the sink; keyed state is always
        scoped by the key the stage was partitioned on (the ``key_by`` before it). The output
        carries ``timestamp`` as its event time (default: the current one, :attr:`timestamp`).
        """
        ...

    def side_output(self, topic: str, headers: list[tuple[str, bytes]]) -> None:
        """Write the input record as it arrived (its key and value bytes) to ``topic`` with
        ``headers``, in the same checkpoint as everything else (late data, rejects)."""
        ...


class Operator(ABC):
    """Base class of user operators.

    Declare state as class attributes (``count = ValueStateDescriptor(type=int, default=0)``);
    the runtime binds them before :meth:`open`. ``process`` is called once per record, with the
    scoped state handles already pointing at the record's key.
    """

    #: Stable id of this operator within its job: names its state namespace and changelog
    #: topic. Set by the job builder (``process(op, name=...)``) — keep it stable across
    #: deployments, or the state will not be found.
    operator_id: str = ""

    #: the state that keeps an operator's timers, added to every class defining ``on_timer``
    TIMER_STATE: ClassVar[str] = "hr.timers"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.on_timer is not Operator.on_timer and "_hr_timers" not in vars(cls):
            # Timers are state (a set of (domain, time, key)): declared like any other state,
            # so they are restored, changelogged, checked by the job identity and savepointed
            # with the rest, and make the operator stateful (it needs a stable name).
            from headrace.operators.serde import BYTES
            from headrace.operators.state import KeyedStateDescriptor

            # key: domain byte + 8-byte time + the record key's bytes (runtime/task/timers.py)
            desc = KeyedStateDescriptor[bytes, int](Operator.TIMER_STATE, key_serde=BYTES, type=int)
            desc.__set_name__(cls, "_hr_timers")
            cls._hr_timers = desc  # type: ignore[attr-defined]

    def open(self, ctx: Context) -> None:  # noqa: B027 - optional hook
        """Called once per task after the state is bound and restored."""

    @abstractmethod
    def process(self, record: Record[Any, Any], ctx: Context) -> None:
        """Handle one record; emit results with ``ctx.emit``."""

    def on_timer(self, key: Any, timestamp: int, ctx: Context) -> None:  # noqa: B027
        """A timer of ``key`` registered through ``ctx.timers`` fired at ``timestamp`` (ms).

        Scoped state handles point at ``key``; ``ctx.emit`` sends downstream with the timer's
        time as event time. Defining this method gives the operator timer state.
        """

    def on_checkpoint(self, checkpoint_id: int) -> None:  # noqa: B027 - optional hook
        """Called when a checkpoint barrier passes this operator, before its state is saved."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Called when the task stops (revoked, shutdown or crash recovery)."""
