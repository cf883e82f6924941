"""Fault injection for recovery tests: kill or stop this process at a named phase.

Enabled only by environment variables, read once at import, so production code pays one
dictionary lookup per phase per checkpoint and nothing per record:

* ``HEADRACE_FAULT_PHASE``: the phase name, e.g. ``after-changelog`` (changelog written, commit
  not yet done), ``after-commit`` (committed, local store not yet updated), ``during-restore``,
  ``before-claim`` (an at-least-once task about to claim its writer epoch),
  ``savepoint-write`` (a savepoint file with a partition's state written, not complete) and
  ``savepoint-load`` (a partition's state sent to the changelogs, the load not complete);
* ``HEADRACE_FAULT_AFTER``: act at the N-th time the phase is reached (default 1);
* ``HEADRACE_FAULT_ACTION``: ``kill`` (SIGKILL, the default) or ``stop`` (SIGSTOP, once: the
  test resumes the process with SIGCONT, which makes a zombie at an exact point of the
  protocol when the stop outlasts the session timeout).
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

PHASES = (
    "after-changelog",
    "before-commit",
    "after-commit",
    "during-restore",
    "before-claim",
    "savepoint-write",
    "savepoint-load",
)
ACTIONS = ("kill", "stop")

_PHASE = os.environ.get("HEADRACE_FAULT_PHASE")
_AFTER = int(os.environ.get("HEADRACE_FAULT_AFTER", "1"))
_ACTION = os.environ.get("HEADRACE_FAULT_ACTION", "kill")
_seen: dict[str, int] = {}


def maybe_crash(phase: str) -> None:
    if phase != _PHASE:
        return
    _seen[phase] = n = _seen.get(phase, 0) + 1
    if _ACTION == "stop":
        if n == _AFTER:
            log.error("fault injection: SIGSTOP at phase %s (occurrence %d)", phase, n)
            os.kill(os.getpid(), signal.SIGSTOP)
        return
    if n >= _AFTER:
        log.error("fault injection: SIGKILL at phase %s (occurrence %d)", phase, n)
        os.kill(os.getpid(), signal.SIGKILL)
