"""Recovery testing for headrace jobs: a fault driver and a replay-based verifier.

Used by headrace's own ``tests/recovery`` and, through the pytest plugin (``fault_driver``,
``recovery_verifier``/``wordcount_verifier`` fixtures), by users testing their jobs.
"""

from headrace.runtime.recovery.driver import FaultDriver, FaultEvent, WorkerProcess
from headrace.runtime.recovery.produce import produce_paced, skewed_partitioner
from headrace.runtime.recovery.verify import (
    Report,
    VerificationError,
    Verifier,
    check_at_least_once,
    check_exactly_once,
    check_state,
    read_final_state,
    read_topic,
    wait_changelog_committed,
    wordcount_replay,
    wordcount_verifier,
)

__all__ = [
    "FaultDriver",
    "FaultEvent",
    "Report",
    "VerificationError",
    "Verifier",
    "WorkerProcess",
    "check_at_least_once",
    "check_exactly_once",
    "check_state",
    "produce_paced",
    "read_final_state",
    "read_topic",
    "skewed_partitioner",
    "wait_changelog_committed",
    "wordcount_replay",
    "wordcount_verifier",
]
