"""The worker's garbage-collector setting: a larger young-generation threshold while it runs.

Why: CPython starts a young collection every 700 allocations of container objects (the
default ``gc.get_threshold()[0]``). A worker allocates several per record (the record's
tuple, an output tuple, a header list) and keeps a poll's outputs alive until they are sent,
so with 2,000-record polls most young collections find those outputs alive, promote them,
and the promotions pay for full collections, which walk every long-lived object (the state
caches too). Measured on the two-stage word count at 1M words (bench/README.md, issue 18):
the at-least-once worker spent ~15 % of its CPU there; with a threshold of 20,000 about what
it spends with the collector off. The threshold only says how often the collector looks for
*cycles*; memory freed by reference counting (nearly everything a worker allocates) is freed
at once either way, and a young collection still runs every 20,000 allocations.

The threshold is process-wide, so the setting is applied while at least one worker runs in
the process and the previous thresholds are restored when the last one stops (tests and
embedding applications run several workers in one process). ``0`` leaves the collector alone.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_active = 0
_saved: tuple[int, int, int] | None = None


@contextmanager
def young_threshold(threshold: int) -> Iterator[None]:
    """Run with the collector's young-generation threshold at ``threshold`` (0: unchanged)."""
    global _active, _saved
    if threshold <= 0:
        yield
        return
    with _lock:
        if _active == 0:
            _saved = gc.get_threshold()
            gc.set_threshold(threshold, *_saved[1:])
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0 and _saved is not None:
                gc.set_threshold(*_saved)
                _saved = None
