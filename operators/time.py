"""Event time: how a source's watermark is made, and the timers operators register.

Every record has an *event time* (milliseconds since the epoch): the Kafka record timestamp, or
what a source's ``timestamp=`` extractor returns for its value. A *watermark* ``w`` is the
runtime's promise that records with an event time at or below ``w`` are not expected any more
(those that still come are *late*). Per source partition it is the highest event time seen minus
the source's bounded out-of-orderness; a task's watermark is the minimum over its inputs, and it
travels across a ``key_by`` in-band with the checkpoint barriers (see
``runtime/checkpoint/barrier.py``), where the downstream task takes the minimum over its upstream
channels. Timers fire when the watermark (event time) or the wall clock (processing time) passes
them.

Nothing here performs I/O: these are descriptions and the protocol operators program against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

#: The watermark before anything was seen: no event time is at or below it.
MIN_WATERMARK = -(2**63)


@dataclass(frozen=True, slots=True)
class Watermarks:
    """How a source's watermark follows its records (seconds, like every duration in the API).

    * ``out_of_orderness``: how far behind the highest event time seen a record may still
      arrive without being late (Flink's bounded out-of-orderness).
    * ``idle_timeout``: a source partition without records for this long stops holding the
      task's watermark back (None: never; a quiet partition then stalls every window).
    * ``advance_when_idle``: when every input of a task is idle, its watermark follows the wall
      clock (``now - idle_timeout - out_of_orderness``), so that the last windows close while
      the input is quiet. Only right when event time is close to the wall clock.
    """

    out_of_orderness: float = 0.0
    idle_timeout: float | None = None
    advance_when_idle: bool = False

    def __post_init__(self) -> None:
        if self.out_of_orderness < 0:
            raise ValueError(f"out_of_orderness must be >= 0 seconds, got {self.out_of_orderness}")
        if self.idle_timeout is not None and not self.idle_timeout > 0:
            raise ValueError(f"idle_timeout must be > 0 seconds, got {self.idle_timeout}")
        if self.advance_when_idle and self.idle_timeout is None:
            raise ValueError("advance_when_idle needs an idle_timeout")

    @property
    def out_of_orderness_ms(self) -> int:
        return int(self.out_of_orderness * 1000)

    @property
    def idle_timeout_ms(self) -> int | None:
        return None if self.idle_timeout is None else int(self.idle_timeout * 1000)


class TimerService(Protocol):
    """Per-key timers of one operator (``ctx.timers``), scoped to the key being processed.

    Timers are state: kept in the task's backend and changelog, checkpointed with everything
    else and restored with the task; under ``exactly_once`` each fires exactly once. Setting a
    timer that is already set does nothing; the timestamp is milliseconds.
    """

    def register_event_time(self, timestamp: int) -> None:
        """Call ``on_timer`` for this key once the watermark reaches ``timestamp``."""
        ...

    def delete_event_time(self, timestamp: int) -> None:
        """Forget an event-time timer of this key (no error if it is not set)."""
        ...

    def register_processing_time(self, timestamp: int) -> None:
        """Call ``on_timer`` for this key once the wall clock reaches ``timestamp``."""
        ...

    def delete_processing_time(self, timestamp: int) -> None:
        """Forget a processing-time timer of this key (no error if it is not set)."""
        ...
