"""headrace side-by-side benchmarks (issue 6): ``python bench/run.py [--quick]``.

Starts (or reuses) its own Kafka broker in bench/.run/broker, installs the peer frameworks into
bench/.venvs/ on first use, and runs the scenarios of bench/README.md with every system on the
same broker, alternating systems run by run (A B C A B C ...). Results go to
bench/results/<mode>-<timestamp>.json and bench/results/latest-<mode>.json; bench/render.py
turns them into the README table and PNG charts.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness as h
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

SYSTEMS = [
    "plain",
    "headrace-alo-mem",
    "headrace-eos-mem",
    "headrace-alo-rocks",
    "headrace-eos-rocks",
    "faust",
    "quix",
    "kstreams-alo-mem",
    "kstreams-eos-mem",
    "kstreams-alo-rocks",
    "kstreams-eos-rocks",
]
SCENARIOS = ["s1", "s2", "s3", "s4", "s5", "s6", "s7"]
#: the script of the floor (system "plain") per throughput scenario
FLOORS = {
    "s1": "plain.py",
    "s2": "plain.py",
    "s5": "plain_twohop.py",
    "s6": "plain_user.py",
    "s7": "plain_window.py",
}
#: headrace_count.py --mode per throughput scenario
HEADRACE_MODES = {"s1": "keyed", "s2": "keyed", "s5": "lines", "s6": "user", "s7": "window"}
#: scenarios each peer has a program for (the others are skipped for it, and said so)
PEER_SCENARIOS = {
    "faust": {"s1", "s2", "s5", "s6"},
    "quix": {"s1", "s2", "s5", "s6", "s7"},
    "kstreams": {"s1", "s2", "s5", "s6", "s7"},
}
#: Kafka Streams' topology per scenario (bench/systems/kstreams)
KSTREAMS_TOPOLOGY = {"s1": "count", "s2": "count", "s5": "lines", "s6": "user", "s7": "window"}
LOGS = h.RUN_DIR / "logs"
STATE = h.RUN_DIR / "state"


class Unsupported(Exception):
    """This system has no program for this scenario."""


def system_cmd(
    system: str, bootstrap: str, inp: str, out: str, tag: str, scenario: str = "s1"
) -> tuple[list[str], str, str]:
    """(command, output value format, isolation level the verifier reads with)."""
    io = {"bootstrap": bootstrap, "input": inp, "output": out}
    if system == "plain":
        argv = h.system_argv(h.PROJECT_PY, FLOORS[scenario], **io, group=tag)
        return argv, "int64", "read_uncommitted"
    if scenario not in PEER_SCENARIOS.get(system.split("-")[0], set(HEADRACE_MODES)):
        raise Unsupported(f"{system} has no program for {scenario}")
    state_dir = STATE / tag
    if system.startswith("headrace-"):
        # headrace-<alo|eos>-<mem|rocks>[-hop1]: -hop1 writes the hop in format 1 (a header
        # per record, runtime/kafka/hopformat.py), to compare both in one run
        _, g, b, *variant = system.split("-")
        guarantee = {"alo": "at_least_once", "eos": "exactly_once"}[g]
        backend = {"mem": "memory", "rocks": "rocksdb"}[b]
        argv = h.system_argv(
            h.PROJECT_PY,
            "headrace_count.py",
            **io,
            job=tag,
            guarantee=guarantee,
            backend=backend,
            state_dir=state_dir,
            mode=HEADRACE_MODES[scenario],
            hop_format={(): 2, ("hop1",): 1}[tuple(variant)],
        )
        return argv, "int64", ("read_committed" if g == "eos" else "read_uncommitted")
    if system == "faust":
        py = h.ensure_venv("faust")
        argv = h.system_argv(
            py, "faust_count.py", **io, app=tag, data_dir=state_dir, mode=HEADRACE_MODES[scenario]
        )
        return argv, "json", "read_uncommitted"
    if system == "quix":
        py = h.ensure_venv("quix")
        if scenario == "s7":
            argv = h.system_argv(py, "quix_window.py", **io, group=tag, state_dir=state_dir)
        else:
            mode = HEADRACE_MODES[scenario]  # keyed, lines or user: the same workloads
            argv = h.system_argv(
                py, "quix_count.py", **io, group=tag, state_dir=state_dir, mode=mode
            )
        return argv, "json-window" if scenario == "s7" else "json", "read_uncommitted"
    if system.startswith("kstreams-"):
        _, g, b = system.split("-")
        jar = h.ensure_kstreams()
        classpath = f"{jar}:{jar.parent / 'lib'}/*"
        argv = ["java", "-cp", classpath, "headrace.bench.KStreamsBench"]
        flags = {
            **io,
            "app": tag,
            "state-dir": state_dir,
            "scenario": KSTREAMS_TOPOLOGY[scenario],
            "guarantee": {"alo": "at_least_once", "eos": "exactly_once"}[g],
            "backend": {"mem": "memory", "rocks": "rocksdb"}[b],
        }
        for name, value in flags.items():
            argv += ["--" + name, str(value)]
        return argv, "int64", ("read_committed" if g == "eos" else "read_uncommitted")
    raise ValueError(system)


async def changelog_stats(broker: h.Broker, tag: str) -> tuple[list[str], int, int | None]:
    topics = [t for t in await h.list_topics(broker.bootstrap) if tag in t and "changelog" in t]
    records = 0
    if not topics:
        return topics, 0, 0
    c = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap)
    await c.start()
    await asyncio.sleep(0)  # aiokafka: stop() right after start() raises CancelledError
    try:
        for t in topics:
            records += sum((await h.end_offsets(c, t)).values())
    finally:
        await c.stop()
    sizes = [broker.topic_bytes(t) for t in topics]
    return topics, records, None if any(s is None for s in sizes) else sum(s or 0 for s in sizes)


# -- workloads -------------------------------------------------------------------------------------
@dataclass
class Workload:
    """Input records of a throughput scenario and the final count per output key they imply
    (one output record per unit of work: per input record, or per word in S5)."""

    records: list[tuple[bytes | None, bytes]]
    expected: Counter[str]
    #: Kafka timestamps of the records (None: now)
    timestamps: list[int] | None = None
    #: one output per (key, window) of ``expected`` (S7), not one per unit of work
    windowed: bool = False


def keyed_workload(keys: list[str]) -> Workload:
    """S1 / S2: one record per key occurrence, ~100-byte values; output: the count per key."""
    records = [(k.encode(), h.pad_value(k, i)) for i, k in enumerate(keys)]
    return Workload(records, Counter(keys))


def lines_workload(words: int) -> Workload:
    """S5: unkeyed lines of 4..14 words (real English frequencies) adding up to ~``words``."""
    from examples.corpus import count_words, generate_lines

    lines = generate_lines(max(1, words // 9))
    return Workload([(None, line.encode()) for line in lines], count_words(lines))


def user_workload(n: int, *, categories: int = 20, seed: int = 7) -> Workload:
    """S6: ``n`` records of ``n // 10`` users (100k for 1M), value ``b"<category>|<padding>"``;
    output key ``"<user>:<category>"``, its count."""
    rng = random.Random(seed)
    users = [f"u{i:06d}" for i in range(max(1000, n // 10))]
    cats = [f"cat{i:02d}" for i in range(categories)]
    records: list[tuple[bytes | None, bytes]] = []
    expected: Counter[str] = Counter()
    for i in range(n):
        user, cat = rng.choice(users), rng.choice(cats)
        head = f"{cat}|{i} ".encode()
        records.append((user.encode(), head + b"x" * max(0, h.VALUE_BYTES - len(head))))
        expected[f"{user}:{cat}"] += 1
    return Workload(records, expected)


def window_workload(n: int, *, seed: int = 7, vocab: int = 1000) -> Workload:
    """S7: ``n`` records of ``vocab`` keys whose Kafka timestamps advance 1 ms per record (1M
    records: 1,000 s, 100 windows of 10 s), each up to 1.5 s early (out of order, within the
    2 s every system allows); then one record per partition 60 s later, which closes every
    window before it (its own never closes). Output: per (key, window) its count."""
    rng = random.Random(seed)
    keys = h.keys_low_cardinality(n, seed=seed, vocab=vocab)
    base = int(time.time() * 1000) - n - 600_000
    base -= base % 10_000
    records: list[tuple[bytes | None, bytes]] = []
    stamps: list[int] = []
    expected: Counter[str] = Counter()
    for i, k in enumerate(keys):
        ts = base + i - rng.randint(0, 1_500)
        records.append((k.encode(), h.pad_value(k, i)))
        stamps.append(ts)
        expected[f"{k}@{ts - ts % 10_000}"] += 1
    flush_at = base + n + 60_000
    flushed: set[int] = set()
    j = 0
    while len(flushed) < h.PARTITIONS:
        key = b"~flush-%d" % j
        j += 1
        if h.partition_of(key) not in flushed:
            flushed.add(h.partition_of(key))
            records.append((key, b"flush"))
            stamps.append(flush_at)
    return Workload(records, expected, stamps, windowed=True)


# -- S1 / S2 / S5 / S6 (and S3 after S2) -----------------------------------------------------------
async def throughput_scenario(
    broker: h.Broker,
    args: argparse.Namespace,
    scenario: str,
    workload: Workload,
    results: dict[str, Any],
) -> None:
    bootstrap = broker.bootstrap
    nonce = secrets.token_hex(3)
    inp = f"bench.{scenario}.input.{nonce}"
    await h.create_topics(bootstrap, [inp])
    print(f"[{scenario}] producing {len(workload.records):,} records to {inp}", flush=True)
    await h.produce(bootstrap, inp, workload.records, timestamps=workload.timestamps)
    expected = workload.expected
    outputs = len(expected) if workload.windowed else sum(expected.values())
    verify = h.verify_windows if workload.windowed else h.verify_counts
    systems = []
    for system in args.systems:
        try:
            system_cmd(system, bootstrap, inp, "-", "-", scenario)
        except Unsupported as exc:
            print(f"[{scenario}] skipped: {exc}", flush=True)
            continue
        systems.append(system)
    runs: dict[str, list[h.RunResult]] = {s: [] for s in systems}
    restores: list[dict[str, Any]] = []
    for run in range(args.runs):
        for system in systems:
            tag = f"{scenario}-{system}-r{run}-{nonce}"
            out = f"{tag}.out"
            await h.create_topics(bootstrap, [out])
            cmd, fmt, isolation = system_cmd(system, bootstrap, inp, out, tag, scenario)
            profile = None
            if args.profile and system.startswith("headrace"):
                profile = h.RUN_DIR / "profiles" / f"{tag}.collapsed.txt"
            m, _ = await h.run_system(
                cmd,
                bootstrap=bootstrap,
                output=out,
                expected_outputs=outputs,
                limit_s=args.timeouts.get(f"{system}:{scenario}", args.timeout),
                log_path=LOGS / f"{tag}.log",
                profile=profile,
            )
            r = h.RunResult(system, scenario, run)
            if m.get("complete"):
                r.records, r.seconds = m["records"], m["seconds"]
                r.records_per_s, r.cpu_s_per_m = m["records_per_s"], m["cpu_s_per_m"]
                r.extra["startup_s"] = m["startup_s"]
                r.correct, r.error = await verify(
                    bootstrap, out, expected, fmt, isolation=isolation
                )
            elif m.get("partial") and not workload.windowed:
                r.records, r.seconds = m["records"], m["seconds"]
                r.records_per_s, r.cpu_s_per_m = m["records_per_s"], m["cpu_s_per_m"]
                r.extra.update(startup_s=m["startup_s"], partial=True)
                r.correct, r.error = await h.verify_prefix(
                    bootstrap, out, expected, fmt, isolation=isolation
                )
            else:
                r.correct, r.error = False, m.get("error", "incomplete")
            r.peak_rss_mb = m.get("peak_rss_mb")
            topics, r.changelog_records, r.changelog_bytes = await changelog_stats(broker, tag)
            print(
                f"[{scenario}] run {run} {system:20s} {r.records_per_s:10,.0f} rec/s "
                f"{r.cpu_s_per_m:6.1f} cpu-s/M rss {r.peak_rss_mb or 0:6.0f} MB "
                f"changelog {r.changelog_records or 0:,} rec "
                f"{(r.changelog_bytes or 0) / 1e6:.1f} MB correct={r.correct} {r.error}",
                flush=True,
            )
            runs[system].append(r)
            if (
                scenario == "s2"
                and "s3" in args.scenarios
                and system in ("headrace-alo-mem", "headrace-alo-rocks")
                and r.correct
            ):
                restores.append(
                    await restore_scenario(
                        broker, system, tag, inp, out, topics, r.changelog_bytes, run
                    )
                )
            await h.delete_topics(bootstrap, [out, *topics])
            shutil.rmtree(STATE / tag, ignore_errors=True)
    await h.delete_topics(bootstrap, [inp])
    results[scenario] = summarize_runs(runs)
    if restores:
        results["s3"] = summarize_restores(restores)


async def restore_scenario(
    broker: h.Broker,
    system: str,
    tag: str,
    inp: str,
    out: str,
    topics: list[str],
    changelog_bytes: int | None,
    run: int,
) -> dict[str, Any]:
    """S3: raw read of the changelog (floor), cold restore, warm restart (RocksDB)."""
    bootstrap = broker.bootstrap
    raw_records, raw_s = 0, 0.0
    for t in topics:
        p = subprocess.run(  # noqa: ASYNC221 - nothing else runs meanwhile
            h.system_argv(h.PROJECT_PY, "raw_read.py", bootstrap=bootstrap, topic=t),
            capture_output=True,
            text=True,
            timeout=600,
        )
        raw = next(x for x in p.stdout.splitlines() if x.startswith("RAW")).split()
        raw_records += int(raw[1])
        raw_s += float(raw[3])
    res: dict[str, Any] = {
        "system": system,
        "run": run,
        "changelog_records": raw_records,
        "changelog_bytes": changelog_bytes,
        "raw_s": raw_s,
    }
    cmd, _, _ = system_cmd(system, bootstrap, inp, out, tag)
    modes = [("cold", STATE / f"{tag}-cold")]
    if system.endswith("rocks"):
        modes.append(("warm", STATE / tag))
    for mode, state_dir in modes:
        i = cmd.index("--state-dir")
        c = [*cmd[: i + 1], str(state_dir), *cmd[i + 2 :], "--restore-only"]
        log = LOGS / f"{tag}-restore-{mode}.log"
        with log.open("wb") as f:
            p = subprocess.run(  # noqa: ASYNC221 - nothing else runs meanwhile
                c, stdout=subprocess.PIPE, stderr=f, cwd=h.ROOT, timeout=600
            )
        line = [x for x in p.stdout.decode().splitlines() if x.startswith("RESTORED")]
        if not line:
            res[f"{mode}_error"] = f"no RESTORED line (see {log})"
            continue
        seconds = float(line[0].split()[1])
        res[f"{mode}_s"] = seconds
        res[f"{mode}_worker_start_to_ready_s"] = float(line[0].split()[2])
        shutil.rmtree(STATE / f"{tag}-cold", ignore_errors=True)
    mb = (changelog_bytes or 0) / 1e6
    if not raw_records:
        res["raw_error"] = "the raw read found no records (topic metadata not ready)"
        raw_s = 0.0
    res["raw_records_per_s"] = raw_records / raw_s if raw_s else None
    res["raw_mb_per_s"] = mb / raw_s if raw_s else None
    if "cold_s" in res and raw_s:
        res["cold_records_per_s"] = raw_records / res["cold_s"]
        res["cold_mb_per_s"] = mb / res["cold_s"]
        res["cold_ratio_to_raw"] = raw_s / res["cold_s"]
    print(f"[s3] {system} run {run}: {res}", flush=True)
    return res


def summarize_runs(runs: dict[str, list[h.RunResult]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for system, rs in runs.items():
        good = [r for r in rs if r.correct]
        out[system] = {
            "runs": rs,
            "correct": all(r.correct for r in rs) and bool(rs),
            "errors": [r.error for r in rs if r.error],
            "records_per_s": h.summarize([r.records_per_s for r in good]),
            "cpu_s_per_m": h.summarize([r.cpu_s_per_m for r in good]),
            "peak_rss_mb": h.summarize([r.peak_rss_mb for r in good if r.peak_rss_mb]),
            "changelog_records": h.summarize([r.changelog_records for r in good]),
            "changelog_bytes": h.summarize([r.changelog_bytes for r in good]),
        }
    floor = (out.get("plain") or {}).get("records_per_s")
    floor_cpu = (out.get("plain") or {}).get("cpu_s_per_m")
    for v in out.values():
        if floor and v["records_per_s"]:
            v["throughput_ratio_to_plain"] = v["records_per_s"]["median"] / floor["median"]
        if floor_cpu and v["cpu_s_per_m"]:
            v["cpu_ratio_to_plain"] = v["cpu_s_per_m"]["median"] / floor_cpu["median"]
    return out


def summarize_restores(restores: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for system in sorted({r["system"] for r in restores}):
        rs = [r for r in restores if r["system"] == system]
        out[system] = {"runs": rs}
        for k in (
            "raw_records_per_s",
            "raw_mb_per_s",
            "cold_s",
            "cold_records_per_s",
            "cold_mb_per_s",
            "cold_ratio_to_raw",
            "warm_s",
            "changelog_records",
            "changelog_bytes",
        ):
            out[system][k] = h.summarize([r[k] for r in rs if r.get(k) is not None])
    return out


# -- S4: checkpoint cost and latency -------------------------------------------------------------
async def s4_checkpoint_cost(
    broker: h.Broker, args: argparse.Namespace, total: int, backend: str
) -> dict[str, Any]:
    bootstrap = broker.bootstrap
    nonce = secrets.token_hex(3)
    tag = f"s4-{backend}-{total}-{nonce}"
    inp, out = f"{tag}.in", f"{tag}.out"
    await h.create_topics(bootstrap, [inp, out])
    keys = [f"key-{i:07d}" for i in range(total)]
    await h.produce(bootstrap, inp, [(k.encode(), h.pad_value(k, 0)) for k in keys])
    system = f"headrace-alo-{'mem' if backend == 'memory' else 'rocks'}"
    cmd, _, _ = system_cmd(system, bootstrap, inp, out, tag)
    proc = subprocess.Popen(  # noqa: ASYNC220 - spawning is quick
        cmd, stdout=(LOGS / f"{tag}.log").open("wb"), stderr=subprocess.STDOUT, cwd=h.ROOT
    )
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await c.start()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    rng = random.Random(1)
    try:
        deadline = time.monotonic() + args.timeout
        while sum((await h.end_offsets(c, out)).values()) < total:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"S4 preload did not finish (see {LOGS / f'{tag}.log'})")
            await asyncio.sleep(0.2)
        await asyncio.sleep(2.5)  # let the preload's checkpoints finish
        changelog = f"{tag}.counts.changelog"
        bytes0 = broker.topic_bytes(changelog)
        start_ms = int(time.time() * 1000)
        for _ in range(args.s4_seconds):
            sec = time.monotonic()
            batch = rng.sample(keys, 1000)
            for j in range(10):
                for k in batch[j * 100 : (j + 1) * 100]:
                    await producer.send(inp, h.pad_value(k, 1), key=k.encode())
                await asyncio.sleep(max(0.0, sec + (j + 1) * 0.1 - time.monotonic()))
        end_ms = int(time.time() * 1000)
        await asyncio.sleep(1.5)
        bytes1 = broker.topic_bytes(changelog)
    finally:
        await producer.stop()
        await c.stop()
        h.stop_process(proc)
    acks = [orjson.loads(v) for _, v in await h.read_topic(bootstrap, f"{tag}.checkpoints") if v]
    window = [a for a in acks if start_ms + 1000 <= a["timestamp_ms"] <= end_ms and not a["final"]]
    durations = [a["duration_ms"] for a in window]
    ids = {a["checkpoint_id"] for a in window}
    changed = Counter()
    for a in window:
        changed[a["checkpoint_id"]] += a["changed_keys"]
    cl_bytes = None if bytes0 is None or bytes1 is None else bytes1 - bytes0
    res = {
        "total_keys": total,
        "backend": backend,
        "task_checkpoints": len(window),
        "job_checkpoints": len(ids),
        "duration_ms": h.summarize(durations),
        "duration_ms_p90": statistics.quantiles(durations, n=10)[-1]
        if len(durations) > 2
        else None,
        "changed_keys_per_checkpoint": h.summarize(list(changed.values())),
        "changelog_bytes_per_checkpoint": cl_bytes / len(ids) if cl_bytes and ids else None,
    }
    print(f"[s4] checkpoint cost {backend} total={total:,}: {res}", flush=True)
    await h.delete_topics(bootstrap, [inp, out, changelog, f"{tag}.checkpoints"])
    shutil.rmtree(STATE / tag, ignore_errors=True)
    return res


async def s4_latency(
    broker: h.Broker, args: argparse.Namespace, guarantee: str, interval_ms: int
) -> dict[str, Any]:
    bootstrap = broker.bootstrap
    nonce = secrets.token_hex(3)
    tag = f"s4lat-{guarantee}-{interval_ms}-{nonce}"
    inp, out = f"{tag}.in", f"{tag}.out"
    await h.create_topics(bootstrap, [inp, out])
    system = f"headrace-{guarantee}-mem"
    cmd, _, isolation = system_cmd(system, bootstrap, inp, out, tag)
    cmd += ["--interval-ms", str(interval_ms)]
    proc = subprocess.Popen(  # noqa: ASYNC220 - spawning is quick
        cmd, stdout=(LOGS / f"{tag}.log").open("wb"), stderr=subprocess.STDOUT, cwd=h.ROOT
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    consumer = AIOKafkaConsumer(
        out,
        bootstrap_servers=bootstrap,
        group_id=None,
        isolation_level=isolation,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,
    )
    await consumer.start()
    sent: dict[bytes, float] = {}
    lat: list[float] = []
    rate, seconds = args.s4_rate, args.s4_seconds

    async def collect() -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=50)
            now = time.monotonic()
            for recs in batches.values():
                for r in recs:
                    t = sent.get(r.key)
                    if t is not None:
                        lat.append((now - t) * 1000)

    collector = asyncio.create_task(collect())
    try:
        # wait until the worker processes records (group joined, tasks restored)
        deadline = time.monotonic() + 120
        got_warm = 0
        while got_warm == 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"latency worker not ready (see {LOGS / f'{tag}.log'})")
            for p in range(h.PARTITIONS):
                await producer.send(inp, b"w", key=f"warm-{p}".encode(), partition=p)
            await asyncio.sleep(1.0)
            ends = await h.end_offsets(consumer, out)
            got_warm = sum(ends.values())
        await asyncio.sleep(max(2.0, 2 * interval_ms / 1000))
        started = time.monotonic()
        i = 0
        tick = 0.01
        while time.monotonic() - started < seconds:
            due = int((time.monotonic() - started) * rate)
            while i < due:
                k = f"lat-{i}".encode()
                sent[k] = time.monotonic()
                await producer.send(inp, b"v", key=k)
                i += 1
            await asyncio.sleep(tick)
        await asyncio.sleep(interval_ms / 1000 * 2 + 2)
    finally:
        collector.cancel()
        await producer.stop()
        await consumer.stop()
        h.stop_process(proc)
    lat.sort()
    q = statistics.quantiles(lat, n=100) if len(lat) > 100 else None
    res = {
        "guarantee": guarantee,
        "interval_ms": interval_ms,
        "rate": rate,
        "sent": i,
        "received": len(lat),
        "p50_ms": q[49] if q else None,
        "p99_ms": q[98] if q else None,
        "max_ms": lat[-1] if lat else None,
    }
    print(f"[s4] latency {guarantee} interval={interval_ms}ms: {res}", flush=True)
    await h.delete_topics(bootstrap, [inp, out])
    return res


# -- main ------------------------------------------------------------------------------------
async def amain(args: argparse.Namespace) -> Path:
    LOGS.mkdir(parents=True, exist_ok=True)
    with h.Broker(args.bootstrap) as broker:
        results: dict[str, Any] = {
            "mode": args.mode,
            "machine": h.machine_info(broker.bootstrap),
            "config": {k: v for k, v in vars(args).items() if k != "func"},
        }
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(args.out or h.BENCH / "results" / f"{args.mode}-{stamp}.json")

        def checkpoint() -> None:
            h.save_json(path, results)

        steps: list[tuple[str, Callable[[], Any]]] = []
        if "s1" in args.scenarios:
            steps.append(
                (
                    "s1",
                    lambda: throughput_scenario(
                        broker,
                        args,
                        "s1",
                        keyed_workload(h.keys_low_cardinality(args.records)),
                        results,
                    ),
                )
            )
        if "s2" in args.scenarios:
            steps.append(
                (
                    "s2",
                    lambda: throughput_scenario(
                        broker,
                        args,
                        "s2",
                        keyed_workload(h.keys_high_cardinality(args.records)),
                        results,
                    ),
                )
            )
        if "s5" in args.scenarios:
            steps.append(
                (
                    "s5",
                    lambda: throughput_scenario(
                        broker, args, "s5", lines_workload(args.records), results
                    ),
                )
            )
        if "s6" in args.scenarios:
            steps.append(
                (
                    "s6",
                    lambda: throughput_scenario(
                        broker, args, "s6", user_workload(args.records), results
                    ),
                )
            )
        if "s7" in args.scenarios:
            steps.append(
                (
                    "s7",
                    lambda: throughput_scenario(
                        broker, args, "s7", window_workload(args.records), results
                    ),
                )
            )
        if "s4" in args.scenarios:

            async def s4() -> None:
                cost = []
                for _ in range(args.s4_runs):
                    for backend in ("memory", "rocksdb"):
                        for total in args.s4_totals:
                            cost.append(await s4_checkpoint_cost(broker, args, total, backend))
                lats = []
                for _ in range(args.s4_runs):
                    for g in ("alo", "eos"):
                        for iv in (100, 1000, 5000):
                            lats.append(await s4_latency(broker, args, g, iv))
                results["s4"] = {"checkpoint_cost": cost, "latency": lats}

            steps.append(("s4", s4))
        for name, step in steps:
            t = time.monotonic()
            await step()
            results.setdefault("elapsed_s", {})[name] = time.monotonic() - t
            checkpoint()
        latest = h.BENCH / "results" / f"latest-{args.mode}.json"
        shutil.copyfile(path, latest)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100k records, 1 run each (~minutes)")
    ap.add_argument("--runs", type=int, help="runs per system (default 3; quick 1)")
    ap.add_argument("--records", type=int, help="input records (default 1,000,000; quick 100k)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--bootstrap", help="use this broker instead of bench/.run/broker")
    ap.add_argument(
        "--timeout",
        type=float,
        default=150,
        help="seconds per system run; a slower system is measured on its prefix",
    )
    ap.add_argument(
        "--timeout-for",
        default="",
        metavar="SYSTEM:SCENARIO=SECONDS,...",
        help="another limit for one system on one scenario, e.g. faust:s5=480 (faust's "
        "two-stage job writes its first output after minutes)",
    )
    ap.add_argument("--profile", action="store_true", help="py-spy the headrace runs")
    ap.add_argument("--s4-runs", type=int, help="S4 repetitions (default 3; quick 1)")
    ap.add_argument("--no-render", action="store_true")
    ap.add_argument("--out", help="result JSON path")
    args = ap.parse_args()
    args.mode = "quick" if args.quick else "full"
    args.runs = args.runs or (1 if args.quick else 3)
    args.records = args.records or (100_000 if args.quick else 1_000_000)
    args.scenarios = args.scenarios.split(",")
    args.systems = args.systems.split(",")
    args.timeouts = {
        key.strip(): float(secs)
        for key, _, secs in (item.partition("=") for item in args.timeout_for.split(",") if item)
    }
    args.s4_totals = [10_000, 100_000] if args.quick else [10_000, 1_000_000]
    args.s4_runs = args.s4_runs or (1 if args.quick else 3)
    args.s4_seconds = 6 if args.quick else 12
    args.s4_rate = 2000
    if args.profile:
        h.ensure_venv("tools")
    path = asyncio.run(amain(args))
    print(f"[bench] results: {path}", flush=True)
    if not args.no_render:
        py = h.ensure_venv("tools")
        subprocess.run([str(py), str(h.BENCH / "render.py"), str(path)], check=False)


if __name__ == "__main__":
    sys.exit(main())
