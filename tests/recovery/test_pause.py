"""Workers paused past their session timeout come back as zombies; state stays exact.

A pause (SIGSTOP, then SIGCONT) longer than the consumer session timeout is what a long GC or
swap pause, a frozen VM or a stalled network does to a worker: the group expels it and gives its
tasks to others while it still believes it owns them. When it resumes it must not write for
them (write lease, producer guard), its stale changelog records must never become state (writer
epochs), and it must rejoin the group rather than exit. Before these existed, the resumed worker
wrote its stale counts in a "final checkpoint" that the next restore applied (state lost under
at-least-once), its buffered outputs landed after newer ones, and it exited with code 1.

The workers run with a 6 s session timeout and a 1 s heartbeat, and every pause lasts 1.7-2.3x
that: one while input flows, one right after a kill -9 (during the rebalance it causes), and one
right after a worker joins, with two workers paused at the same time in between.
"""

from __future__ import annotations

import asyncio

import pytest
from scenario import PARTITIONS, MakeRun, WordcountRun

from headrace.runtime.recovery.driver import WorkerProcess

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]

#: short sessions so that a pause of ~10 s makes a zombie (and the test stays short)
#: (6 s is the broker's default group.min.session.timeout.ms)
ZOMBIE_ENV = {"HEADRACE_SESSION_TIMEOUT_MS": "6000", "HEADRACE_HEARTBEAT_INTERVAL_MS": "1000"}
PAUSE_S = (10.0, 14.0)


async def pause_storm(run: WordcountRun, *, lines: int, rate: float, rounds: int = 1) -> None:
    """Three workers; per round at least 3 pauses, a kill -9 and a join, overlapping."""
    d = run.driver
    producer = run.produce(lines, rate=rate)
    workers = [d.start_worker() for _ in range(3)]
    for w in workers:
        await w.wait_started()
    await asyncio.sleep(4.0)  # tasks assigned, restored and counting: a pause hits live tasks
    for _ in range(rounds):
        await asyncio.sleep(d.rng.uniform(0.5, 2.0))
        first = asyncio.create_task(d.pause(pause_s=PAUSE_S))  # while input flows
        await asyncio.sleep(d.rng.uniform(1.0, 2.0))
        killed = await d.kill()  # a rebalance: the killed worker's tasks move...
        d.start_worker(slot=killed.slot)
        await asyncio.sleep(0.5)
        # ...and another worker is paused while that rebalance is under way (two zombies)
        second = asyncio.create_task(d.pause(pause_s=PAUSE_S))
        await asyncio.gather(first, second)
        d.start_worker()  # a join...
        await asyncio.sleep(0.5)
        await d.pause(pause_s=PAUSE_S)  # ...and a pause during the rebalance it causes
    await producer
    assert d.count("pause") >= 3 * rounds and d.count("kill9") >= rounds, d.summary()


@pytest.mark.parametrize(
    ("guarantee", "backend"),
    [
        ("at_least_once", "rocksdb"),
        ("exactly_once", "memory"),
        # the other two combinations run in CI's extended pass (the default suite has a time
        # budget; each guarantee and each backend meets the pauses in it)
        pytest.param("at_least_once", "memory", marks=pytest.mark.extended),
        pytest.param("exactly_once", "rocksdb", marks=pytest.mark.extended),
    ],
)
async def test_paused_workers_come_back_as_zombies_and_state_stays_exact(
    wordcount_run: MakeRun, guarantee: str, backend: str
) -> None:
    """at_least_once: final state = replay (and the last output per key is the final count);
    exactly_once: per word the output is exactly 1..count. Every resumed worker rejoins and
    ends with exit code 0."""
    run = await wordcount_run(guarantee, backend, seed=41, env=ZOMBIE_ENV)
    await pause_storm(run, lines=3000, rate=150)
    await asyncio.sleep(2.0)  # let the resumed workers notice and rejoin
    zombies_died = run.driver.zombies_that_died()
    report = await run.finish_and_verify(workers=3)
    run.assert_ok(report)
    assert not zombies_died, (
        f"resumed (zombie) workers exited instead of rejoining: {zombies_died}\n{run.diagnostics()}"
    )
    logs = run.driver.logs()
    if guarantee == "at_least_once":
        assert "claimed writer epoch" in logs, run.diagnostics()
    assert "rejoining the group" in logs, run.diagnostics()


async def wait_for_lines(
    worker: WorkerProcess, text: str, count: int, wait_s: float = 90.0
) -> None:
    deadline = asyncio.get_running_loop().time() + wait_s
    while worker.log().count(text) < count:
        assert worker.alive(), f"{worker.name} exited:\n{worker.log()[-3000:]}"
        assert asyncio.get_running_loop().time() < deadline, (
            f"{worker.name} did not log {text!r} {count}x in {wait_s}s:\n{worker.log()[-3000:]}"
        )
        await asyncio.sleep(0.1)


@pytest.mark.parametrize(
    "backend",
    # the RocksDB variant runs in CI's extended pass (the default suite has a time budget)
    ["memory", pytest.param("rocksdb", marks=pytest.mark.extended)],
)
async def test_a_worker_stopped_while_it_takes_back_its_tasks_drops_them_and_rejoins(
    wordcount_run: MakeRun, backend: str
) -> None:
    """At-least-once. A join makes the group revoke every task and hand some straight back:
    the first worker suspends its tasks and, taking one back, is stopped (SIGSTOP, at the fault
    phase ``before-claim``) for longer than its session timeout. When it continues, its claim
    meets the expired lease inside the rebalance callback. aiokafka logs and swallows what a
    rebalance listener raises and keeps the assignment, so that failure used to leave the
    worker holding paused partitions with half-taken-over tasks (an open RocksDB store that the
    next restore of the task cannot open). It must drop them and rejoin, and state stays exact.
    """
    run = await wordcount_run("at_least_once", backend, seed=43, env=ZOMBIE_ENV)
    d = run.driver
    producer = run.produce(4500, rate=150)  # ~30 s: input flows on after the worker continues
    # Alone, the first worker claims all PARTITIONS stage-1 tasks; its next claim is for a
    # task it takes back when the second worker joins.
    first = d.start_worker(
        fault_phase="before-claim",
        fault_after=PARTITIONS + 1,
        env={"HEADRACE_FAULT_ACTION": "stop"},
    )
    await wait_for_lines(first, "claimed writer epoch", PARTITIONS)
    d.start_worker()
    await d.resume_when_stopped(first, pause_s=PAUSE_S)
    await producer
    await asyncio.sleep(2.0)  # let the resumed worker notice and rejoin
    log = first.log()
    assert "LeaseExpired" in log and "the writer-epoch claim of task" in log, (
        f"the resumed worker never met its expired lease at the claim:\n{log[-4000:]}"
    )
    # aiokafka's words for a listener that raised: the failure escaped to where nobody acts
    assert "failed on partition assignment" not in log, log[-6000:]
    assert "exception was never retrieved" not in log, log[-6000:]
    zombies_died = d.zombies_that_died()
    report = await run.finish_and_verify(workers=2)
    run.assert_ok(report)
    assert not zombies_died, f"the resumed worker exited: {zombies_died}\n{run.diagnostics()}"
