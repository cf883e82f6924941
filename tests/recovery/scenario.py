"""Shared set-up of the recovery suite: a word-count job on its own topics, run by real workers.

Every scenario follows the same shape: create unique topics, start a paced producer of the
seeded corpus (skewed: most records to partition 0, none to the last partition, which stays
idle), run worker processes through faults with :class:`headrace.runtime.recovery.FaultDriver`,
then let
stable workers catch up, stop them gracefully and check output and state against the replay.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from examples.corpus import generate_lines
from headrace.operators.job import Job
from headrace.runtime.recovery import (
    FaultDriver,
    Report,
    Verifier,
    produce_paced,
    read_final_state,
    skewed_partitioner,
    wait_changelog_committed,
)

REPO = Path(__file__).resolve().parents[2]
PARTITIONS = 4
IDLE_PARTITION = PARTITIONS - 1


@dataclass
class WordcountRun:
    """One word-count job with unique topics, its fault driver and verifier."""

    job: Job
    source: str
    sink: str
    guarantee: str
    backend: str
    driver: FaultDriver
    verifier: Verifier
    bootstrap: str
    seed: int
    lines: list[str] = field(default_factory=list)

    def produce(
        self, count: int, *, rate: float, hot_share: float = 0.7, seed_offset: int = 0
    ) -> asyncio.Task[int]:
        """Produce ``count`` corpus lines in the background: skewed, one partition idle."""
        lines = generate_lines(count, seed=self.seed + seed_offset)
        self.lines += lines
        return asyncio.create_task(
            produce_paced(
                self.bootstrap,
                self.source,
                [line.encode() for line in lines],
                rate=rate,
                partition_of=skewed_partitioner(
                    PARTITIONS, seed=self.seed, hot=0, hot_share=hot_share, idle=[IDLE_PARTITION]
                ),
            )
        )

    async def crash_during_restore(self, *, slot: int = 9, min_offset: int = 40) -> None:
        """A fresh slot (no local state) takes over tasks, restores them from the changelog
        in batches of 5 and is killed in the middle of it.

        First waits until every task's committed checkpoint covers ``min_offset`` changelog
        offsets: after a storm, a task whose owners all died before committing has an empty
        changelog, and a worker that takes over only such tasks would restore nothing and never
        reach the phase (the cause of this scenario's old "exactly-once stall").
        """
        await wait_changelog_committed(
            self.job, "counts", self.bootstrap, min_offset=min_offset, alive=self.driver.any_alive
        )
        await self.driver.crash_at_phase(
            "during-restore", slot=slot, env={"HEADRACE_RESTORE_BATCH_SIZE": "5"}
        )

    async def finish_and_verify(
        self, *, workers: int = 2, catch_up_s: float = 90.0, check_state: bool = True
    ) -> Report:
        """Make sure ``workers`` run, wait for the output to catch up, stop them gracefully
        (every one must exit 0) and verify output and final state."""
        while len(self.driver.alive()) < workers:
            self.driver.start_worker()
        expected = await self.verifier.expected(self.source)
        await self.verifier.wait_caught_up(
            expected, self.sink, wait_s=catch_up_s, alive=self.driver.any_alive
        )
        if check_state:
            await self._wait_state_caught_up(expected, catch_up_s)
        codes = await self.driver.stop_all()
        bad = {n: c for n, c in codes.items() if c != 0}
        assert not bad, f"workers did not stop cleanly: {bad}\n{self.diagnostics()}"
        report = await self.verifier.verify(
            input_topic=self.source,
            output_topic=self.sink,
            guarantee=self.guarantee,
            job=self.job if check_state else None,
            operator_id="counts",
            expected=expected,
        )
        return report

    async def _wait_state_caught_up(self, expected: dict[Any, list[Any]], wait_s: float) -> None:
        """Wait until the *committed* state covers all input before stopping the workers.

        Under at-least-once the output runs ahead of the committed state: a worker that dies
        after sending outputs but before its checkpoint leaves the committed state behind, and
        the new owner catches up later. Stopping the workers the moment the output looks
        complete can then stop a task that has restored but not yet re-processed, which is
        correct (state = committed offsets) but not a completed run.
        """
        final = {k: seq[-1] for k, seq in expected.items() if seq}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while loop.time() < deadline and self.driver.any_alive():
            state = await read_final_state(
                self.job, "counts", self.bootstrap, committed=self.guarantee == "exactly_once"
            )
            if state == final:
                return
            await asyncio.sleep(1.0)

    def diagnostics(self, tail: int = 40) -> str:
        parts = [self.driver.summary()]
        for w in self.driver.workers:
            lines = w.log().splitlines()
            parts.append(f"----- {w.name} rc={w.returncode} (last {tail} lines)")
            parts += lines[-tail:]
        return "\n".join(parts)

    def assert_ok(self, report: Report) -> None:
        assert report.ok, f"{report.summary()}\n{self.diagnostics()}"


MakeRun = Callable[..., Awaitable[WordcountRun]]


def soak_scale() -> int:
    """Multiplier for soak runs (``HEADRACE_SOAK_SCALE``, default 1)."""
    return max(1, int(os.environ.get("HEADRACE_SOAK_SCALE", "1")))
