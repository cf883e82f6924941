"""Shared machinery of the benchmark scripts (project venv): broker, data, process metering,
output verification. Not a test; see bench/README.md.

Metering is the same for every system: the system runs as its own process; the harness polls
the end offsets of the system's output topic every 50 ms. The measured window starts at the
first poll that sees output (so group joins, topic creation and JIT-less start-up are excluded
for everybody alike) and ends when the output holds one record per input. Throughput is the
records produced in that window over its length; CPU is the process's user+system time
(``/proc/<pid>/stat``, children included) over the same window; peak RSS is ``VmHWM``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENVS = BENCH / ".venvs"
RUN_DIR = BENCH / ".run"
PROJECT_PY = sys.executable
CLK = os.sysconf("SC_CLK_TCK")
PARTITIONS = 4
VALUE_BYTES = 100

#: peer frameworks, pinned; each in its own venv because their pins may conflict
PEERS = {
    "faust": ["faust-streaming==0.15.3"],
    "quix": ["quixstreams==3.28.1"],
    "tools": ["matplotlib==3.11.2", "py-spy==0.4.3"],
}


def system_argv(python: str | Path, script: str, **flags: object) -> list[str]:
    """``python bench/systems/<script> --flag value ...`` (``state_dir=`` is ``--state-dir``)."""
    argv = [str(python), str(BENCH / "systems" / script)]
    for name, value in flags.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


def venv_python(name: str) -> Path:
    return VENVS / name / "bin" / "python"


def ensure_venv(name: str) -> Path:
    py = venv_python(name)
    marker = VENVS / name / ".bench-installed"
    want = " ".join(PEERS[name])
    if py.exists() and marker.exists() and marker.read_text() == want:
        return py
    print(f"[bench] installing {want} into {VENVS / name} ...", flush=True)
    VENVS.mkdir(parents=True, exist_ok=True)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENVS / name)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *PEERS[name]], check=True)
    marker.write_text(want)
    return py


# -- broker ----------------------------------------------------------------------------------
def fresh_local_broker(run_dir: Path) -> Any:
    """The bench's own broker, on an empty cluster unless it is already running.

    Every run leaves its topics behind, and the cluster's size is not neutral: with ~1,000
    idle partitions left by earlier runs (bench/scale.py creates 256 per topic), headrace's
    S5 at-least-once CPU per word went from 4.1 to 5.6 s per million while the plain floor's
    stayed at 3.4 (issue 18, 2026-12-04), which made one session's figures drift run after run.
    So a broker this harness starts starts empty; one already running (or --bootstrap) is used
    as it is.
    """
    from headrace.runtime.localkafka import LocalBroker

    broker = LocalBroker(run_dir)
    if not broker.is_running():
        shutil.rmtree(run_dir, ignore_errors=True)
        broker = LocalBroker(run_dir)
    return broker


class Broker:
    """Our own LocalBroker in bench/.run/broker (or an external one given by --bootstrap)."""

    def __init__(self, bootstrap: str | None) -> None:
        self.external = bootstrap
        self.local: Any = None
        self.bootstrap = bootstrap or ""
        self.data_dir: Path | None = None
        self.started_here = False

    def __enter__(self) -> Broker:
        if self.external:
            return self

        os.environ.setdefault("HEADRACE_KAFKA_JVM_OPTS", "-Xms512m -Xmx1g")
        self.local = fresh_local_broker(RUN_DIR / "broker")
        self.started_here = not self.local.is_running()
        self.local.start()
        self.bootstrap = self.local.bootstrap_servers
        self.data_dir = self.local.data_dir
        return self

    def __exit__(self, *exc: object) -> None:
        if self.local is not None and self.started_here:
            self.local.stop()

    def topic_bytes(self, topic: str) -> int | None:
        """Bytes of the topic's log segments on disk (what the broker stored), all partitions."""
        if self.data_dir is None:
            return None
        total = 0
        for d in self.data_dir.glob(f"{topic}-*"):
            if d.name.rsplit("-", 1)[0] != topic:
                continue
            total += sum(f.stat().st_size for f in d.glob("*.log"))
        return total


async def admin_call(bootstrap: str, fn: Any) -> Any:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return await fn(admin)
    finally:
        await admin.close()


async def create_topics(bootstrap: str, names: list[str], partitions: int = PARTITIONS) -> None:
    async def go(admin: AIOKafkaAdminClient) -> None:
        existing = set(await admin.list_topics())
        new = [NewTopic(n, partitions, 1) for n in names if n not in existing]
        if new:
            await admin.create_topics(new)

    await admin_call(bootstrap, go)
    await asyncio.sleep(0.3)


async def list_topics(bootstrap: str) -> list[str]:
    async def go(admin: AIOKafkaAdminClient) -> list[str]:
        return list(await admin.list_topics())

    result: list[str] = await admin_call(bootstrap, go)
    return result


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    if not names:
        return

    async def go(admin: AIOKafkaAdminClient) -> None:
        with contextlib.suppress(Exception):
            await admin.delete_topics(names)

    await admin_call(bootstrap, go)


async def end_offsets(consumer: AIOKafkaConsumer, topic: str) -> dict[int, int]:
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        await consumer._client.force_metadata_update()  # aiokafka has no public API for this
        parts = consumer.partitions_for_topic(topic) or set()
    ends = await consumer.end_offsets([TopicPartition(topic, p) for p in sorted(parts)])
    return {tp.partition: o for tp, o in ends.items()}


# -- data ------------------------------------------------------------------------------------
def pad_value(word: str, i: int) -> bytes:
    head = f"{word} #{i} ".encode()
    return head + b"x" * max(0, VALUE_BYTES - len(head))


def keys_low_cardinality(n: int, seed: int = 7, vocab: int = 5000) -> list[str]:
    from examples.corpus import vocabulary

    words, weights = vocabulary(vocab)
    return random.Random(seed).choices(words, weights=weights, k=n)


def keys_high_cardinality(n: int, seed: int = 7) -> list[str]:
    keys = [f"key-{i:07d}" for i in range(n)]
    random.Random(seed).shuffle(keys)
    return keys


def partition_of(key: bytes, n: int = PARTITIONS) -> int:
    from headrace.runtime.kafka.producer import default_partition

    return default_partition(key, n)


async def produce(
    bootstrap: str,
    topic: str,
    records: list[tuple[bytes | None, bytes]],
    partitions: int = PARTITIONS,
    timestamps: list[int] | None = None,
) -> None:
    """Write records fast (BatchBuilder per partition), keyed ones with Kafka's partitioner;
    ``timestamps``: each record's Kafka timestamp (ms; default: now)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=10, max_batch_size=1024 * 1024
    )
    await producer.start()
    try:
        groups: dict[int, list[tuple[bytes | None, bytes, int | None]]] = {
            p: [] for p in range(partitions)
        }
        for i, (k, v) in enumerate(records):
            p = i % partitions if k is None else partition_of(k, partitions)
            groups[p].append((k, v, None if timestamps is None else timestamps[i]))
        futs = []
        for p, recs in groups.items():
            batch = producer.create_batch()
            for k, v, ts in recs:
                if batch.append(key=k, value=v, timestamp=ts) is None:
                    futs.append(await producer.send_batch(batch, topic, partition=p))
                    batch = producer.create_batch()
                    batch.append(key=k, value=v, timestamp=ts)
            futs.append(await producer.send_batch(batch, topic, partition=p))
        for f in futs:
            await f
    finally:
        await producer.stop()


# -- running a system --------------------------------------------------------------------------
def proc_cpu(pid: int) -> float:
    """user+system CPU seconds of ``pid`` and its live children (waited children included)."""
    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15]) / CLK
    return total


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(d.name))
    return out


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class RunResult:
    system: str
    scenario: str
    run: int
    records: int = 0
    seconds: float = 0.0
    records_per_s: float = 0.0
    cpu_s_per_m: float = 0.0
    peak_rss_mb: float | None = None
    changelog_records: int | None = None
    changelog_bytes: int | None = None
    correct: bool | None = None
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


async def run_system(
    cmd: list[str],
    *,
    bootstrap: str,
    output: str,
    expected_outputs: int,
    limit_s: float,
    log_path: Path,
    env: dict[str, str] | None = None,
    profile: Path | None = None,
) -> tuple[dict[str, Any], subprocess.Popen[bytes]]:
    """Start ``cmd``, wait until ``output`` holds ``expected_outputs`` records, measure, SIGTERM."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as logf:
        proc = subprocess.Popen(  # noqa: ASYNC220 - spawning is quick
            cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})}
        )
    spy = None
    if profile is not None:
        profile.parent.mkdir(parents=True, exist_ok=True)
        spy = subprocess.Popen(  # noqa: ASYNC220
            [
                str(VENVS / "tools" / "bin" / "py-spy"),
                "record",
                "-p",
                str(proc.pid),
                "-o",
                str(profile),
                "-f",
                "raw",
                "-r",
                "250",
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    out: dict[str, Any] = {"complete": False}
    try:
        started = time.monotonic()
        t0 = cpu0 = None
        done = done0 = 0
        while True:
            now = time.monotonic()
            if proc.poll() is not None:
                out["error"] = f"exited with {proc.returncode} (see {log_path})"
                break
            if now - started > limit_s:
                out["error"] = f"timed out after {limit_s:.0f}s"
                if t0 is not None and cpu0 is not None and done > done0:
                    # a slow system: measured on the prefix it processed (verified as a prefix)
                    t1, cpu1 = time.monotonic(), proc_cpu(proc.pid)
                    n = done - done0
                    out.update(
                        partial=True,
                        records=n,
                        seconds=t1 - t0,
                        records_per_s=n / (t1 - t0),
                        cpu_s_per_m=(cpu1 - cpu0) / n * 1e6,
                        startup_s=t0 - started,
                    )
                break
            ends = await end_offsets(consumer, output)
            done = sum(ends.values())
            if t0 is None and done > 0:
                t0, cpu0, done0 = time.monotonic(), proc_cpu(proc.pid), done
            if t0 is not None and done >= expected_outputs:
                t1, cpu1 = time.monotonic(), proc_cpu(proc.pid)
                n = done - done0
                out.update(
                    complete=True,
                    records=n,
                    seconds=t1 - t0,
                    records_per_s=n / (t1 - t0),
                    cpu_s_per_m=(cpu1 - cpu0) / n * 1e6,
                    startup_s=t0 - started,
                )
                break
            if t0 is not None and now - t0 > 5 and done > done0:
                out["partial_rate"] = (done - done0) / (time.monotonic() - t0)
            await asyncio.sleep(0.05)
        out["peak_rss_mb"] = peak_rss_mb(proc.pid)
    finally:
        await consumer.stop()
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(30)
        stop_process(proc)
    return out, proc


def stop_process(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def read_topic(
    bootstrap: str, topic: str, *, isolation: str = "read_uncommitted"
) -> list[tuple[bytes | None, bytes | None]]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        isolation_level=isolation,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    try:
        ends = await end_offsets(consumer, topic)
        tps = [TopicPartition(topic, p) for p in ends]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[tuple[bytes | None, bytes | None]] = []
        remaining = {tp for tp in tps if ends[tp.partition] > 0}
        while remaining:
            batches = await consumer.getmany(*remaining, timeout_ms=500, max_records=50_000)
            for recs in batches.values():
                out.extend((r.key, r.value) for r in recs)
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp.partition]:
                    remaining.discard(tp)
        return out
    finally:
        await consumer.stop()


_I64 = struct.Struct(">q")


def decode_count(value: bytes | None, fmt: str) -> int:
    assert value is not None
    if fmt == "int64":
        return int(_I64.unpack(value)[0])
    return int(json.loads(value))


async def verify_counts(
    bootstrap: str, output: str, expected: Counter[str], fmt: str, *, isolation: str
) -> tuple[bool, str]:
    """One output per input, and every key's highest count equals its input count."""
    records = await read_topic(bootstrap, output, isolation=isolation)
    total = sum(expected.values())
    best: dict[bytes, int] = {}
    for k, v in records:
        if k is None:
            return False, "output record without a key"
        n = decode_count(v, fmt)
        if n > best.get(k, 0):
            best[k] = n
    got = {k.decode(): n for k, n in best.items()}
    if got != dict(expected):
        wrong = [w for w in set(got) | set(expected) if got.get(w) != expected.get(w)]
        sample = ", ".join(f"{w}: {got.get(w)} != {expected.get(w)}" for w in wrong[:5])
        return False, f"{len(wrong)} keys with wrong final counts ({sample})"
    if len(records) != total:
        return False, f"{len(records)} output records for {total} inputs"
    return True, ""


async def verify_windows(
    bootstrap: str, output: str, expected: Counter[str], fmt: str, *, isolation: str
) -> tuple[bool, str]:
    """S7: exactly one final result per (key, window) with the right count. ``fmt``: ``int64``
    (key ``<key>@<window start>``, int64 count) or ``json-window`` (key = the key, value =
    ``{"start", "end", "value"}``, Quix's shape)."""
    records = await read_topic(bootstrap, output, isolation=isolation)
    got: Counter[str] = Counter()
    counts: dict[str, int] = {}
    for k, v in records:
        if k is None or v is None:
            return False, "output record without a key or value"
        if fmt == "json-window":
            doc = json.loads(v)
            name, n = f"{k.decode()}@{doc['start']}", int(doc["value"])
        else:
            name, n = k.decode(), decode_count(v, fmt)
        got[name] += 1
        counts[name] = n
    repeated = [w for w, c in got.items() if c > 1]
    if repeated:
        return False, f"{len(repeated)} windows emitted more than once (e.g. {repeated[0]})"
    if counts != dict(expected):
        wrong = [w for w in set(counts) | set(expected) if counts.get(w) != expected.get(w)]
        sample = ", ".join(f"{w}: {counts.get(w)} != {expected.get(w)}" for w in wrong[:5])
        return False, f"{len(wrong)} windows with wrong counts ({sample})"
    return True, ""


def ensure_kstreams() -> Path:
    """The Kafka Streams peer's jar (bench/systems/kstreams), built with Maven when missing or
    older than its sources; its dependencies land in target/lib."""
    project = BENCH / "systems" / "kstreams"
    jar = project / "target" / "kstreams-bench.jar"
    sources = [project / "pom.xml", *project.rglob("*.java")]
    if not jar.exists() or jar.stat().st_mtime < max(p.stat().st_mtime for p in sources):
        print("[bench] building the Kafka Streams peer with Maven ...", flush=True)
        subprocess.run(["mvn", "-q", "-B", "package", "-DskipTests"], cwd=project, check=True)
    return jar


async def verify_prefix(
    bootstrap: str, output: str, expected: Counter[str], fmt: str, *, isolation: str
) -> tuple[bool, str]:
    """For a run stopped early: per key the counts seen are exactly 1..n, n <= the input count."""
    records = await read_topic(bootstrap, output, isolation=isolation)
    seen: dict[bytes, list[int]] = {}
    for k, v in records:
        if k is None:
            return False, "output record without a key"
        seen.setdefault(k, []).append(decode_count(v, fmt))
    for k, counts in seen.items():
        n = len(counts)
        if sorted(counts) != list(range(1, n + 1)) or n > expected.get(k.decode(), 0):
            return (
                False,
                f"key {k!r}: counts {sorted(counts)[:10]}... (input count "
                f"{expected.get(k.decode(), 0)})",
            )
    return True, f"partial: verified on the first {len(records):,} outputs"


# -- summaries --------------------------------------------------------------------------------
def summarize(values: list[float]) -> dict[str, float] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def machine_info(bootstrap: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bootstrap": bootstrap,
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["mem_gib"] = round(int(mem) / 1024 / 1024, 1)
    with contextlib.suppress(Exception):
        from headrace.runtime.localkafka import kafka_version

        info["kafka"] = kafka_version()
    with contextlib.suppress(Exception):
        import aiokafka

        info["aiokafka"] = aiokafka.__version__
    with contextlib.suppress(Exception):
        info["headrace_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip() + (
            " (dirty)"
            if subprocess.run(
                ["git", "status", "--porcelain", "runtime", "operators"],
                cwd=ROOT,
                capture_output=True,
                text=True,
            ).stdout.strip()
            else ""
        )
    info["load_avg_at_start"] = os.getloadavg()
    info["peers"] = PEERS
    return info


def save_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_default))
    tmp.replace(path)


def _default(o: Any) -> Any:
    if isinstance(o, RunResult):
        return asdict(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))
