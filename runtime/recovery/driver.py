"""Driving real worker processes through faults: kill -9, rebalance storms, broker restarts.

A :class:`FaultDriver` runs ``python -m headrace.runtime.cli run MODULE:JOB`` processes (the same
command
users deploy) and injects faults while a :func:`produce_paced` task feeds the input at a
bounded rate. Every random choice comes from one seeded :class:`random.Random`, so a failing
run can be repeated with its seed (printed in :meth:`FaultDriver.summary`).

Workers run in *slots*: slot ``i`` always uses the state directory ``<workdir>/state/slot-i``,
so a worker restarted in the slot after a kill finds the RocksDB state its predecessor left
(as a Kubernetes pod with a persistent volume would) and can reuse it. Each process writes its
log to ``<workdir>/logs/slot-<i>-<n>.log``.

Faults:

* :meth:`FaultDriver.kill` / :meth:`FaultDriver.random_kills`: SIGKILL at random moments;
* :meth:`FaultDriver.crash_at_phase`: a worker started with ``HEADRACE_FAULT_PHASE`` kills
  itself inside a checkpoint (``after-changelog``, ``before-commit``, ``after-commit``) or a
  restore (``during-restore``), see :mod:`headrace.runtime.faults`;
* :meth:`FaultDriver.pause` / :meth:`FaultDriver.random_pauses`: SIGSTOP a worker for longer
  than its session timeout, then SIGCONT: it comes back as a *zombie* that still believes it
  owns its tasks (a GC or swap pause, a frozen VM). It must stop writing, drop its tasks and
  rejoin, never exit: :meth:`FaultDriver.zombies_that_died` lists those that did;
* :meth:`FaultDriver.rebalance_storm`: workers join, leave (SIGTERM) and die (SIGKILL);
* :meth:`FaultDriver.restart_broker`: stop and start a :class:`LocalBroker` while data flows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from headrace.runtime.localkafka import LocalBroker

__all__ = [
    "FaultDriver",
    "FaultEvent",
    "WorkerProcess",
]

FAULT_LINE = "fault injection: SIGKILL at phase"
#: events after which a worker's exit is the driver's doing
_DRIVER_ENDS = {"kill9", "sigterm", "stop", "phase-crash"}
#: logged by Worker.run, after the CLI installed its SIGTERM handler
STARTED_LINE = "starting job"


@dataclass
class FaultEvent:
    at: float  #: seconds since the driver started
    kind: str  #: start, kill9, sigterm, phase-crash, broker-restart, ...
    detail: str = ""


@dataclass
class WorkerProcess:
    """One ``headrace run`` process."""

    name: str
    slot: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str]
    started: float = field(default_factory=time.monotonic)
    _log_file: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def started_up(self) -> bool:
        """The worker installed its signal handlers (it logged that it is starting the job)."""
        return STARTED_LINE in self.log()

    async def wait_started(self, wait_s: float = 30.0) -> bool:
        """Wait until a SIGTERM would be handled gracefully (or the process is gone)."""
        deadline = time.monotonic() + wait_s
        while self.alive() and not self.started_up():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
                if sig == signal.SIGTERM:  # a paused worker handles it only once continued
                    self.proc.send_signal(signal.SIGCONT)

    async def wait(self, wait_s: float) -> int | None:
        """The exit code, or None if still running after ``wait_s`` seconds."""
        deadline = time.monotonic() + wait_s
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.05)
        self._close_log()
        return self.proc.returncode

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def reap(self) -> None:
        """Kill if still running and collect the exit status (no zombie, no ResourceWarning)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._close_log()


class FaultDriver:
    """Runs worker processes of one job and injects faults; always :meth:`close` it."""

    def __init__(
        self,
        job_spec: str,
        *,
        bootstrap_servers: str,
        workdir: Path,
        env: Mapping[str, str] | None = None,
        seed: int = 0,
        broker: LocalBroker | None = None,
        cwd: Path | None = None,
        python: str = sys.executable,
    ) -> None:
        self.job_spec = job_spec
        self.bootstrap_servers = bootstrap_servers
        self.workdir = Path(workdir)
        self.seed = seed
        self.rng = random.Random(seed)
        self.broker = broker
        self.cwd = cwd or Path.cwd()
        self.python = python
        self.base_env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap_servers,
            "HEADRACE_BOOTSTRAP_SERVERS": bootstrap_servers,
            **dict(env or {}),
        }
        for var in ("HEADRACE_FAULT_PHASE", "HEADRACE_FAULT_AFTER", "HEADRACE_FAULT_ACTION"):
            if var not in (env or {}):
                self.base_env.pop(var, None)
        self.workers: list[WorkerProcess] = []
        self.events: list[FaultEvent] = []
        self._t0 = time.monotonic()
        self._runs: dict[int, int] = {}
        self._paused: list[WorkerProcess] = []
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        (self.workdir / "state").mkdir(parents=True, exist_ok=True)

    # -- bookkeeping ---------------------------------------------------------------------------
    def _event(self, kind: str, detail: str = "") -> None:
        self.events.append(FaultEvent(round(time.monotonic() - self._t0, 2), kind, detail))

    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.alive()]

    def any_alive(self) -> bool:
        return bool(self.alive())

    def count(self, kind: str) -> int:
        return sum(1 for e in self.events if e.kind == kind)

    @property
    def faults(self) -> int:
        """Faults injected so far (kills, phase crashes, SIGTERMs, pauses, broker restarts)."""
        kinds = {"kill9", "phase-crash", "sigterm", "pause", "broker-restart"}
        return sum(1 for e in self.events if e.kind in kinds)

    def logs(self) -> str:
        return "\n".join(
            f"===== {w.name} (rc={w.returncode}) =====\n{w.log()}" for w in self.workers
        )

    def summary(self) -> str:
        lines = [f"fault driver seed={self.seed}: {self.faults} fault(s), events:"]
        lines += [f"  {e.at:7.2f}s {e.kind:14} {e.detail}" for e in self.events]
        return "\n".join(lines)

    def state_dir(self, slot: int) -> Path:
        return self.workdir / "state" / f"slot-{slot}"

    # -- processes -----------------------------------------------------------------------------
    def start_worker(
        self,
        *,
        slot: int | None = None,
        env: Mapping[str, str] | None = None,
        fault_phase: str | None = None,
        fault_after: int = 1,
    ) -> WorkerProcess:
        """Start a worker in ``slot`` (default: the lowest slot with no running worker)."""
        busy = {w.slot for w in self.alive()}
        if slot is None:
            slot = next(i for i in range(len(busy) + 1) if i not in busy)
        elif slot in busy:
            raise RuntimeError(f"slot {slot} already has a running worker")
        run = self._runs[slot] = self._runs.get(slot, 0) + 1
        name = f"slot-{slot}-{run}"
        proc_env = {**self.base_env, "HEADRACE_STATE_DIR": str(self.state_dir(slot))}
        proc_env.update(env or {})
        if fault_phase is not None:
            proc_env["HEADRACE_FAULT_PHASE"] = fault_phase
            proc_env["HEADRACE_FAULT_AFTER"] = str(fault_after)
        log_path = self.workdir / "logs" / f"{name}.log"
        log_file = log_path.open("wb")
        proc = subprocess.Popen(
            [self.python, "-m", "headrace.runtime.cli", "run", self.job_spec],
            env=proc_env,
            cwd=self.cwd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        worker = WorkerProcess(name, slot, proc, log_path, proc_env, _log_file=log_file)
        self.workers.append(worker)
        detail = name + (f" fault={fault_phase}@{fault_after}" if fault_phase else "")
        self._event("start", detail)
        return worker

    def pick(self) -> WorkerProcess:
        alive = self.alive()
        if not alive:
            raise RuntimeError("no running worker to pick")
        return self.rng.choice(alive)

    async def kill(self, worker: WorkerProcess | None = None) -> WorkerProcess:
        """SIGKILL ``worker`` (default: a random running one) and reap it."""
        w = worker or self.pick()
        w.signal(signal.SIGKILL)
        await w.wait(10)
        self._event("kill9", w.name)
        return w

    async def terminate(self, worker: WorkerProcess | None = None, wait_s: float = 60) -> int:
        """SIGTERM (graceful: final checkpoint, leave the group); returns the exit code."""
        w = worker or self.pick()
        await w.wait_started()
        w.signal(signal.SIGTERM)
        self._event("sigterm", w.name)
        rc = await w.wait(wait_s)
        if rc is None:
            w.reap()
            raise AssertionError(f"{w.name} did not exit within {wait_s}s of SIGTERM")
        return rc

    async def pause(
        self,
        worker: WorkerProcess | None = None,
        *,
        pause_s: float | tuple[float, float] = (9.0, 13.0),
    ) -> WorkerProcess:
        """SIGSTOP ``worker`` (default: a random running one) for ``pause_s`` seconds (or a
        random duration in that range), then SIGCONT.

        Longer than the workers' session timeout (``HEADRACE_SESSION_TIMEOUT_MS``), the group
        expels the worker while it is stopped and gives its tasks to others; when it resumes it
        is a zombie. Other faults may run concurrently (``asyncio.create_task(d.pause(...))``).
        """
        w = worker or self.pick()
        await w.wait_started()
        w.signal(signal.SIGSTOP)
        await self._hold_stopped(w, pause_s)
        return w

    async def resume_when_stopped(
        self,
        worker: WorkerProcess,
        *,
        pause_s: float | tuple[float, float] = (9.0, 13.0),
        wait_s: float = 180.0,
    ) -> None:
        """Wait until ``worker`` stopped itself at its fault phase (``HEADRACE_FAULT_ACTION=stop``,
        see :mod:`headrace.runtime.faults`), keep it stopped ``pause_s`` seconds, then SIGCONT.

        A pause at an exact point of the protocol rather than at a random moment. Raises if
        the worker did not stop within ``wait_s`` (the scenario would not test what it claims).
        """
        deadline = time.monotonic() + wait_s
        while not _stopped(worker.pid):
            if not worker.alive():
                raise AssertionError(f"{worker.name} exited ({worker.returncode}) before stopping")
            if time.monotonic() > deadline:
                raise AssertionError(f"{worker.name} did not reach its fault phase in {wait_s}s")
            await asyncio.sleep(0.05)
        await self._hold_stopped(worker, pause_s, note=" (at its fault phase)")

    async def _hold_stopped(
        self, worker: WorkerProcess, pause_s: float | tuple[float, float], note: str = ""
    ) -> None:
        """``worker`` is stopped: keep it so for ``pause_s`` seconds, then SIGCONT."""
        seconds = pause_s if isinstance(pause_s, int | float) else self.rng.uniform(*pause_s)
        self._paused.append(worker)
        self._event("pause", f"{worker.name} for {seconds:.1f}s{note}")
        try:
            await asyncio.sleep(seconds)
        finally:
            worker.signal(signal.SIGCONT)
            self._event("resume", worker.name)

    async def random_pauses(
        self,
        n: int,
        *,
        interval: tuple[float, float] = (1.0, 3.0),
        pause_s: tuple[float, float] = (9.0, 13.0),
    ) -> None:
        """``n`` pauses of random workers at random moments, one after the other."""
        for _ in range(n):
            await asyncio.sleep(self.rng.uniform(*interval))
            await self.pause(pause_s=pause_s)

    def zombies_that_died(self) -> list[str]:
        """Paused workers that exited on their own after resuming (not killed or stopped by
        the driver): a zombie must drop its tasks and rejoin, not exit."""
        ended_by_driver = {e.detail.split()[0] for e in self.events if e.kind in _DRIVER_ENDS}
        return [
            f"{w.name} (rc={w.returncode})"
            for w in self._paused
            if w.returncode not in (None, 0) and w.name not in ended_by_driver
        ]

    async def crash_at_phase(
        self,
        phase: str,
        *,
        after: int = 1,
        slot: int | None = None,
        env: Mapping[str, str] | None = None,
        wait_s: float = 180,
    ) -> WorkerProcess:
        """Start a worker that kills itself at the ``after``-th ``phase``; wait for it to die.

        A phase is reached only after the worker joined the groups and got partitions: ~10 s on
        an idle 2-core machine, much longer when other suites share the cores, hence the margin.

        Raises if it did not die by the injected SIGKILL within ``wait_s`` seconds (then the
        phase was never reached: the scenario does not test what it claims).
        """
        w = self.start_worker(slot=slot, env=env, fault_phase=phase, fault_after=after)
        rc = await w.wait(wait_s)
        if rc is None:
            w.reap()
            raise AssertionError(f"{w.name}: phase {phase!r} not reached {after}x in {wait_s}s")
        if rc != -signal.SIGKILL or FAULT_LINE not in w.log():
            raise AssertionError(f"{w.name} exited with {rc} instead of the injected SIGKILL")
        self._event("phase-crash", f"{w.name} {phase}@{after}")
        return w

    async def random_kills(
        self,
        n: int,
        *,
        interval: tuple[float, float] = (1.0, 3.0),
        respawn: bool = True,
    ) -> None:
        """``n`` kill -9 of random workers at random moments; each is restarted in its slot."""
        for _ in range(n):
            await asyncio.sleep(self.rng.uniform(*interval))
            w = await self.kill()
            if respawn:
                self.start_worker(slot=w.slot)

    async def rebalance_storm(
        self,
        changes: int,
        *,
        interval: tuple[float, float] = (0.5, 2.0),
        min_workers: int = 1,
        max_workers: int = 3,
    ) -> None:
        """``changes`` membership changes: joins, graceful leaves (SIGTERM) and kill -9."""
        shrinks = 0
        for _ in range(changes):
            await asyncio.sleep(self.rng.uniform(*interval))
            n = len(self.alive())
            grow = n < min_workers + 1 or (n < max_workers and self.rng.random() < 0.5)
            if grow:
                self.start_worker()
                continue
            shrinks += 1
            if shrinks % 2:  # leaves alternate: graceful SIGTERM, then kill -9
                w = self.pick()
                await w.wait_started()
                w.signal(signal.SIGTERM)  # leaves in the background while the storm goes on
                self._event("sigterm", w.name)
            else:
                await self.kill()

    async def restart_broker(self, down_s: float = 2.0, *, hard: bool = False) -> None:
        """Stop (or kill -9) the broker, keep it down ``down_s`` seconds, start it again."""
        if self.broker is None:
            raise RuntimeError("restart_broker needs the LocalBroker (the local_broker fixture)")
        broker = self.broker
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, broker.kill if hard else broker.stop)
        self._event("broker-restart", f"{'killed' if hard else 'stopped'}, down {down_s:.1f}s")
        await asyncio.sleep(down_s)
        await loop.run_in_executor(None, broker.start)
        self._event("broker-up")

    async def stop_all(self, wait_s: float = 60) -> dict[str, int | None]:
        """SIGTERM every running worker and wait; returns name -> exit code."""
        alive = self.alive()
        for w in alive:
            await w.wait_started()
            w.signal(signal.SIGTERM)
            self._event("stop", w.name)
        codes = {w.name: await w.wait(wait_s) for w in alive}
        return codes

    def close(self) -> None:
        """Kill whatever still runs and reap every process (safe to call twice)."""
        for w in self.workers:
            w.reap()


def _stopped(pid: int) -> bool:
    """The process is stopped by a signal (state ``T`` in ``/proc/<pid>/stat``; Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "T"
