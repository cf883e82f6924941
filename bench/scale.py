"""Issue 18's scale scenario: what a job costs as its partition count grows (a script, not a test).

    python bench/scale.py [--partitions 4,64,256] [--workers 1,4] [--guarantee exactly_once]
                          [--idle-s 15] [--bootstrap HOST:PORT] [--out FILE]

For every partition count P and worker count W, the word count (``examples.wordcount``: a source
stage and a counting stage behind a ``key_by``, both with P partitions) runs as W real worker
processes (``headrace run``), memory backend, and this measures:

* **start**: seconds from starting W workers until every task of both stages runs (the workers'
  ``headrace_tasks{state="running"}`` add up to P per stage and every worker's ``/ready`` is 200);
* **warm-up**: a few lines into every input partition (so that every task has input and state,
  as in production); ``warm_quiet_s``: seconds until the job's internal topics stop growing;
* **join**: the same after one more worker joins (a rebalance of both groups), and
  ``join_quiet_s``: seconds until the internal topics stop growing after it;
* **idle** (no input for ``--idle-s`` seconds, once the join has settled): CPU of every worker
  and of the broker in % of one core, and the control records the job writes per second (the
  growth of the end offsets of its internal topics: barriers on the repartition topic,
  transaction markers, checkpoint acks, changelog claims);
* **peak RSS** per worker (``VmHWM``);
* **checkpoint duration** p50/p99 of every task checkpoint of the run (``<job>.checkpoints``).

Targets (issue 18): every task running within 10 s at 256 partitions; idle control traffic
linear in the partition count; idle CPU below 5 % of a core per worker. Results are printed and
written as JSON (``bench/results/scale-<timestamp>.json`` unless ``--out``); nothing is judged
here: the numbers are reported whether the targets are met or not.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import harness as h
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

START_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Worker:
    """One ``headrace run examples.wordcount:job`` process with its ops port."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.log = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "headrace.runtime.cli", "run", "examples.wordcount:job"],
            env={**env, "HEADRACE_METRICS_PORT": str(self.port)},
            cwd=h.ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode(errors="replace")
        except OSError:
            return 0, ""

    def running_tasks(self) -> dict[str, int]:
        """Running tasks per stage (``headrace_tasks{state="running"}``)."""
        status, text = self.get("/metrics")
        out: dict[str, int] = {}
        if status != 200:
            return out
        for line in text.splitlines():
            if line.startswith("headrace_tasks{") and 'state="running"' in line:
                labels, value = line.rsplit(" ", 1)
                stage = labels.split('stage="', 1)[1].split('"', 1)[0]
                out[stage] = out.get(stage, 0) + int(float(value))
        return out

    def not_ready(self) -> str:
        """Why the worker's /ready is not 200 ("" when it is)."""
        status, body = self.get("/ready")
        return "" if status == 200 else (body.strip() or f"HTTP {status}")

    def stop(self) -> None:
        h.stop_process(self.proc)
        self._log.close()


async def all_running(
    workers: list[Worker], partitions: int, stages: int, trace: list[str]
) -> float:
    """Seconds until every task of every stage runs and every worker is ready; ``trace`` gets
    a line each time what the workers report changes (running tasks per stage, why a worker
    is not ready), so that a slow start says what it waited on."""
    started = time.monotonic()
    last = ""
    while True:
        totals: dict[str, int] = {}
        for w in workers:
            for stage, n in (await asyncio.to_thread(w.running_tasks)).items():
                totals[stage] = totals.get(stage, 0) + n
        reasons = await asyncio.gather(*(asyncio.to_thread(w.not_ready) for w in workers))
        state = f"running {dict(sorted(totals.items()))}; " + "; ".join(
            f"w{i}: {r}" for i, r in enumerate(reasons) if r
        )
        if state != last:
            trace.append(f"{time.monotonic() - started:6.1f}s {state}")
            last = state
        complete = len(totals) == stages and all(n == partitions for n in totals.values())
        if complete and not any(reasons):
            return time.monotonic() - started
        if time.monotonic() - started > START_TIMEOUT_S:
            raise TimeoutError(f"tasks running after {START_TIMEOUT_S:.0f}s: {totals}")
        for w in workers:
            if w.proc.poll() is not None:
                raise RuntimeError(f"a worker exited ({w.proc.returncode}); see {w.log}")
        await asyncio.sleep(0.2)


async def internal_end_offsets(bootstrap: str, topics: list[str]) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        total = 0
        for t in topics:
            total += sum((await h.end_offsets(consumer, t)).values())
        return total
    finally:
        await consumer.stop()


async def quiet_after(bootstrap: str, topics: list[str], still_s: float = 3.0) -> float:
    """Seconds until the job's internal topics stop growing (unchanged for ``still_s``; at
    most 120 s): how long the traffic of the last change lasts."""
    started = last_change = time.monotonic()
    last = await internal_end_offsets(bootstrap, topics)
    while time.monotonic() - last_change < still_s and time.monotonic() - started < 120:
        await asyncio.sleep(0.5)
        now = await internal_end_offsets(bootstrap, topics)
        if now != last:
            last, last_change = now, time.monotonic()
    return round(last_change - started, 1)


def broker_pid() -> int | None:
    run_dir = os.environ.get("HEADRACE_LOCAL_BROKER_DIR")
    from headrace.runtime.localkafka import LocalBroker

    broker = LocalBroker(Path(run_dir) if run_dir else h.RUN_DIR / "broker")
    return broker.pid


async def one(
    bootstrap: str, partitions: int, workers: int, args: argparse.Namespace
) -> dict[str, Any]:
    tag = f"scale-p{partitions}-w{workers}-{secrets.token_hex(3)}"
    source, sink = f"{tag}.lines", f"{tag}.counts"
    await h.create_topics(bootstrap, [source, sink], partitions=partitions)
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "HEADRACE_BOOTSTRAP_SERVERS": bootstrap,
        "WORDCOUNT_JOB": tag,
        "WORDCOUNT_SOURCE": source,
        "WORDCOUNT_SINK": sink,
        "HEADRACE_GUARANTEE": args.guarantee,
        "HEADRACE_STATE_BACKEND": "memory",
        "HEADRACE_CHECKPOINT_INTERVAL_MS": str(args.interval_ms),
        "HEADRACE_LOG_LEVEL": args.log_level,
    }
    logs = h.RUN_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"partitions": partitions, "workers": workers}
    procs: list[Worker] = []
    try:
        procs = [Worker(env, logs / f"{tag}-w{i}.log") for i in range(workers)]
        res["start_trace"] = []
        res["start_s"] = await all_running(procs, partitions, 2, res["start_trace"])
        internal = [f"{tag}.stage1.repartition", f"{tag}.counts.changelog", f"{tag}.checkpoints"]
        # a few lines into every partition: every task has input and state, as in production
        lines: list[tuple[bytes | None, bytes]] = [
            (None, f"warm up w{i % 50} w{i % 7}".encode()) for i in range(4 * partitions)
        ]
        await h.produce(bootstrap, source, lines, partitions=partitions)
        res["warm_quiet_s"] = await quiet_after(bootstrap, internal)
        procs.append(Worker(env, logs / f"{tag}-w{workers}.log"))
        res["join_trace"] = []
        res["join_s"] = await all_running(procs, partitions, 2, res["join_trace"])
        # until the rebalance's checkpoints, claims and barrier rounds have settled
        res["join_quiet_s"] = await quiet_after(bootstrap, internal)
        bpid = broker_pid()
        cpu0 = [h.proc_cpu(w.proc.pid) for w in procs]
        bcpu0 = h.proc_cpu(bpid) if bpid else None
        end0 = await internal_end_offsets(bootstrap, internal)
        t0 = time.monotonic()
        await asyncio.sleep(args.idle_s)
        seconds = time.monotonic() - t0
        end1 = await internal_end_offsets(bootstrap, internal)
        cpu1 = [h.proc_cpu(w.proc.pid) for w in procs]
        res["idle_worker_cpu_pct"] = [
            round(100 * (b - a) / seconds, 1) for a, b in zip(cpu0, cpu1, strict=True)
        ]
        if bpid and bcpu0 is not None:
            res["idle_broker_cpu_pct"] = round(100 * (h.proc_cpu(bpid) - bcpu0) / seconds, 1)
        res["idle_control_records_per_s"] = round((end1 - end0) / seconds, 1)
        res["peak_rss_mb"] = [h.peak_rss_mb(w.proc.pid) for w in procs]
        acks = [
            orjson.loads(v) for _, v in await h.read_topic(bootstrap, f"{tag}.checkpoints") if v
        ]
        durations = [float(a["duration_ms"]) for a in acks if "duration_ms" in a]
        if len(durations) >= 2:
            q = statistics.quantiles(durations, n=100)
            res["checkpoint_ms_p50"], res["checkpoint_ms_p99"] = q[49], q[98]
        res["task_checkpoints"] = len(durations)
    except (TimeoutError, RuntimeError) as exc:
        res["error"] = str(exc)
    finally:
        for w in procs:
            w.stop()
        topics = [t for t in await h.list_topics(bootstrap) if t.startswith(f"{tag}.")]
        await h.delete_topics(bootstrap, topics)
    print(f"[scale] { ({k: v for k, v in res.items() if not k.endswith('_trace')}) }", flush=True)
    for phase in ("start", "join"):
        for line in res.get(f"{phase}_trace", []):
            print(f"[scale]   {phase} {line}", flush=True)
    return res


async def warm_coordinators(bootstrap: str) -> None:
    """A fresh cluster creates ``__consumer_offsets`` (50 partitions) at its first consumer
    group and ``__transaction_state`` at its first transactional producer, which takes seconds
    on two cores; a production cluster has both. Made here, before anything is timed, so that
    the first measured start does not pay for them and the later ones do not run warm."""
    topic = "scale.warm-up"
    await h.create_topics(bootstrap, [topic], partitions=1)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id="scale-warm-up")
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.commit({tp: 0})
    finally:
        await consumer.stop()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id="scale-warm-up")
    await producer.start()
    await producer.stop()


async def amain(args: argparse.Namespace) -> Path:
    with h.Broker(args.bootstrap) as broker:
        await warm_coordinators(broker.bootstrap)
        results: dict[str, Any] = {
            "mode": "scale",
            "machine": h.machine_info(broker.bootstrap),
            "config": vars(args),
            "runs": [],
        }
        path = Path(
            args.out or h.BENCH / "results" / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
        )
        for p in args.partitions:
            for w in args.workers:
                results["runs"].append(await one(broker.bootstrap, p, w, args))
                h.save_json(path, results)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--partitions", default="4,64,256")
    ap.add_argument("--workers", default="1,4")
    ap.add_argument("--guarantee", default="exactly_once")
    ap.add_argument("--interval-ms", type=int, default=1000, help="checkpoint interval")
    ap.add_argument("--idle-s", type=float, default=15.0)
    ap.add_argument("--bootstrap", help="use this broker instead of bench/.run/broker")
    ap.add_argument("--out", help="result JSON path")
    ap.add_argument("--log-level", default="WARNING", help="the workers' (logs: bench/.run/logs)")
    args = ap.parse_args()
    args.partitions = [int(x) for x in args.partitions.split(",")]
    args.workers = [int(x) for x in args.workers.split(",")]
    path = asyncio.run(amain(args))
    print(f"[scale] results: {path}", flush=True)


if __name__ == "__main__":
    main()
