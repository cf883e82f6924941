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
from typing import Any, Protocol

from headrace.operators.record import Record

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

    def emit(self, value: Any, key: Any = SAME_KEY) -> None:
        """Pass ``value`` downstream, keyed by ``key`` (default: the input record's key).

        Within a stage the key only affects the key written by the sink; keyed state is always
        scoped by the key the stage was partitioned on (the ``key_by`` before it).
        """
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

    def open(self, ctx: Context) -> None:  # noqa: B027 - optional hook
        """Called once per task after the state is bound and restored."""

    @abstractmethod
    def process(self, record: Record[Any, Any], ctx: Context) -> None:
        """Handle one record; emit results with ``ctx.emit``."""

    def on_checkpoint(self, checkpoint_id: int) -> None:  # noqa: B027 - optional hook
        """Called when a checkpoint barrier passes this operator, before its state is saved."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Called when the task stops (revoked, shutdown or crash recovery)."""
