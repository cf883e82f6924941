"""Savepoints and rescaling behind a key_by (issue 16), against the real broker: a word count
stopped, saved, loaded with 8 and then 3 partitions behind its key_by (under a new job name
each time, and once with a renamed operator), and run on; per word the output across all runs
is exactly 1..count under exactly-once, and the final counts equal a replay of the input under
both guarantees. Workers run in this process."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from headrace import JSON, STR, Job
from headrace.operators.operator import Context, Operator
from headrace.operators.record import Record
from headrace.operators.state import ValueStateDescriptor
from headrace.runtime.config import Settings
from headrace.runtime.pytest_plugin import TopicFactory
from headrace.runtime.recovery import read_topic
from headrace.runtime.recovery.inprocess import run_worker_until
from headrace.runtime.savepoint import (
    SavepointError,
    create_savepoint,
    load_savepoint,
    summarize,
)
from headrace.runtime.worker import Worker

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]

WORDS = [f"w{i}" for i in range(40)]


def wordcount(name: str, source: str, sink: str, partitions: int, op: str = "counts") -> Job:
    job = Job(name)
    job.source(source, value_serde=STR).flat_map(str.split).key_by(
        lambda w: w, key_serde=STR, value_serde=STR, partitions=partitions
    ).count(name=op).sink(sink, key_serde=STR, value_serde=JSON)
    return job


async def produce_lines(bootstrap: str, topic: str, lines: list[str]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for i, line in enumerate(lines):
            await producer.send(topic, line.encode(), partition=i % 2)
        await producer.flush()
    finally:
        await producer.stop()


async def outputs(bootstrap: str, sink: str) -> dict[str, list[int]]:
    per_word: dict[str, list[int]] = defaultdict(list)
    for _, _, key, value, _ in await read_topic(bootstrap, sink, key_serde=STR, value_serde=JSON):
        per_word[key].append(value)
    return per_word


async def run_until_counted(job: Job, s: Settings, sink: str, expected: Counter[str]) -> None:
    async def counted() -> bool:
        seen = await outputs(s.bootstrap_servers, sink)
        return {w: v[-1] for w, v in seen.items()} == dict(expected)

    await run_worker_until(job, s, counted)


async def feed(bootstrap: str, source: str, lines: list[str]) -> None:
    """``lines`` over ~6 s, 20 at a time."""
    for i in range(0, len(lines), 20):
        await produce_lines(bootstrap, source, lines[i : i + 20])
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
async def test_a_word_count_saved_and_rescaled_4_8_3_behind_its_key_by_stays_exact(
    kafka_bootstrap_servers: str, topic_factory: TopicFactory, tmp_path: Path, guarantee: str
) -> None:
    bootstrap = kafka_bootstrap_servers
    s = Settings(
        bootstrap_servers=bootstrap, processing_guarantee=guarantee, checkpoint_interval_ms=200
    )
    source = await topic_factory("sp-lines", partitions=2)
    sink = await topic_factory("sp-counts", partitions=2)
    rng = random.Random(16)
    base = f"sp-{uuid.uuid4().hex[:6]}"
    expected: Counter[str] = Counter()
    saved = produced = 0
    names = [f"{base}-a", f"{base}-b", f"{base}-c"]
    layouts = [(4, "counts"), (8, "counts"), (3, "totals")]
    for round_, (name, (partitions, op)) in enumerate(zip(names, layouts, strict=True)):
        lines = [" ".join(rng.choices(WORDS, k=5)) for _ in range(600)]
        expected.update(w for line in lines for w in line.split())
        job = wordcount(name, source, sink, partitions, op)
        if round_:
            mapping = {"counts": "totals"} if op == "totals" else {}
            report = await load_savepoint(s, job, tmp_path / f"sp{round_ - 1}.hrsp", mapping)
            assert report.partitions == {op: partitions}
            assert report.entries[op] == saved  # every saved word, once
        if round_ == len(names) - 1:
            await produce_lines(bootstrap, source, lines)
            await run_until_counted(job, s, sink, expected)
            header = await create_savepoint(s, job, tmp_path / f"sp{round_}.hrsp")
            break
        # while data flows: stop-with-savepoint half-way through this round's input (the rest
        # is counted by the next round, from the savepoint's offsets)
        worker = Worker(job, s)
        running = asyncio.create_task(worker.run())
        feeding = asyncio.create_task(feed(bootstrap, source, lines))
        await asyncio.sleep(2.5)
        header = await create_savepoint(
            s, job, tmp_path / f"sp{round_}.hrsp", stop=True, wait_s=120
        )
        await asyncio.wait_for(running, 60)
        await feeding
        produced += len(lines)
        assert sum(header["sources"].values()) < produced, "the savepoint came after the input"
        assert len(header["operators"][op]["entries"]) == partitions
        saved = sum(header["operators"][op]["entries"])

    final = await outputs(bootstrap, sink)
    assert {w: v[-1] for w, v in final.items()} == dict(expected)
    if guarantee == "exactly_once":
        assert all(v == list(range(1, expected[w] + 1)) for w, v in final.items()), {
            w: v for w, v in final.items() if v != list(range(1, expected[w] + 1))
        }
    summary = summarize(tmp_path / "sp2.hrsp", key="w1")
    assert "operator 'totals' (stage1)" in summary and "3 partitions" in summary
    assert "entries, " in summary and " bytes)" in summary  # per state: entries and bytes
    assert "totals/" in summary  # the key's entry is printed


async def test_a_savepoint_of_a_job_that_keeps_running_is_a_consistent_cut(
    kafka_bootstrap_servers: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    """``savepoint create`` on a running word count while input arrives: the workers pause
    their input, the savepoint is taken at a complete aligned checkpoint cut after the pause
    with nothing in flight, and the job goes on (its counts stay exact). The savepoint, loaded
    into another job (8 partitions, its own sink), counts the rest of the input exactly.
    Loading it into a job with state, or without mapping a renamed operator, is refused."""
    bootstrap = kafka_bootstrap_servers
    s = Settings(bootstrap_servers=bootstrap, checkpoint_interval_ms=200)
    source = await topic_factory("sp-lines", partitions=2)
    sink = await topic_factory("sp-counts", partitions=2)
    other_sink = await topic_factory("sp-counts-b", partitions=2)
    job = wordcount(f"sp-{uuid.uuid4().hex[:6]}", source, sink, 2)
    rng = random.Random(5)
    lines = [" ".join(rng.choices(WORDS, k=4)) for _ in range(1000)]
    expected = Counter(w for line in lines for w in line.split())

    async def feed() -> None:  # ~10 s of input: the savepoint lands in the middle
        for i in range(0, len(lines), 20):
            await produce_lines(bootstrap, source, lines[i : i + 20])
            await asyncio.sleep(0.2)

    async def counted(out: str) -> bool:
        seen = await outputs(bootstrap, out)
        return {w: v[-1] for w, v in seen.items()} == dict(expected)

    worker = Worker(job, s)
    running = asyncio.create_task(worker.run())
    feeding = asyncio.create_task(feed())
    try:
        await asyncio.sleep(3)
        header = await create_savepoint(s, job, tmp_path / "sp.hrsp", wait_s=120)
        assert not running.done() and not feeding.done(), "the savepoint came too late"
        await feeding
        for _ in range(240):
            await asyncio.sleep(0.5)
            assert not running.done(), running.result()
            if await counted(sink):
                break
    finally:
        worker.stop()
        await running
    final = await outputs(bootstrap, sink)
    assert all(v == list(range(1, expected[w] + 1)) for w, v in final.items()), final
    saved = sum(sum(d["entries"]) for d in header["operators"].values())
    assert 0 < saved <= len(expected)

    with pytest.raises(SavepointError, match="already has state"):
        await load_savepoint(s, job, tmp_path / "sp.hrsp")
    renamed = wordcount(f"{job.name}-x", source, other_sink, 8, "renamed")
    with pytest.raises(SavepointError, match=r"(?s)operator 'counts' removed or renamed.*--map"):
        await load_savepoint(s, renamed, tmp_path / "sp.hrsp")
    other = wordcount(f"{job.name}-y", source, other_sink, 8)
    await load_savepoint(s, other, tmp_path / "sp.hrsp")
    await run_until_counted(other, s, other_sink, expected)
    # the loaded job's outputs continue the saved counts: each word's last value is exact,
    # and its first output is one more than the savepoint's count of it
    final_b = await outputs(bootstrap, other_sink)
    assert {w: v[-1] for w, v in final_b.items()} == dict(expected)
    assert all(v == list(range(v[0], expected[w] + 1)) for w, v in final_b.items()), final_b


def test_a_truncated_or_corrupted_savepoint_is_refused(tmp_path: Path) -> None:
    from headrace.runtime.savepoint.fileformat import Writer, verify

    path = tmp_path / "sp.hrsp"
    writer = Writer(path)
    writer.frame(1, b'{"id": "x"}')
    writer.frame(3, b"\x91\x94\xa1n\xa1k\xc0\xa1v")
    writer.entries = 1
    writer.finish()
    assert verify(path)["id"] == "x"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(SavepointError, match=r"truncated|incomplete"):
        verify(path)
    corrupt = bytearray(data)
    corrupt[20] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    with pytest.raises(SavepointError, match="corrupted"):
        verify(path)
    path.write_bytes(data[:30])
    with pytest.raises(SavepointError):
        verify(path)
    assert not (tmp_path / "sp.hrsp.partial").exists()


JOB_MODULE = """
import os

from headrace import JSON, STR, Job

job = Job(os.environ["T_JOB"])
job.source(os.environ["T_SOURCE"], value_serde=STR).flat_map(str.split).key_by(
    lambda w: w, key_serde=STR, value_serde=STR, partitions=int(os.environ["T_PARTITIONS"])
).count(name="totals").sink(os.environ["T_SINK"], key_serde=STR, value_serde=JSON)
"""


async def test_run_from_savepoint_loads_once_and_a_restart_just_runs(
    kafka_bootstrap_servers: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    """``headrace run --from-savepoint FILE --map counts=totals``, as a user runs it: the
    first start loads the savepoint; a restart with the same command line does not load it
    again (the job's identity names the savepoint it came from) and goes on exactly."""
    bootstrap = kafka_bootstrap_servers
    s = Settings(bootstrap_servers=bootstrap, checkpoint_interval_ms=200)
    source = await topic_factory("sp-lines", partitions=2)
    sink = await topic_factory("sp-counts", partitions=2)
    base = f"sp-{uuid.uuid4().hex[:6]}"
    expected: Counter[str] = Counter()
    lines = ["a b c", "b c", "c"]
    expected.update(w for line in lines for w in line.split())
    await produce_lines(bootstrap, source, lines)
    await run_until_counted(wordcount(f"{base}-a", source, sink, 2), s, sink, expected)
    await create_savepoint(s, wordcount(f"{base}-a", source, sink, 2), tmp_path / "sp.hrsp")

    (tmp_path / "userjob.py").write_text(JOB_MODULE)
    env = dict(
        os.environ,
        KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        HEADRACE_CHECKPOINT_INTERVAL_MS="200",
        T_JOB=f"{base}-b",
        T_SOURCE=source,
        T_SINK=sink,
        T_PARTITIONS="5",
    )
    args = ["run", "userjob:job", "--from-savepoint", str(tmp_path / "sp.hrsp")]
    for more in (["c d"], ["d"]):
        await produce_lines(bootstrap, source, more)
        expected.update(w for line in more for w in line.split())
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "headrace.runtime.cli",
            *args,
            "--map",
            "counts=totals",
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            for _ in range(120):
                await asyncio.sleep(0.5)
                assert proc.returncode is None, (await proc.communicate())[1].decode()
                seen = await outputs(bootstrap, sink)
                if {w: v[-1] for w, v in seen.items()} == dict(expected):
                    break
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        loaded = "loaded into job" in err.decode()
        assert loaded == (more == ["c d"]), err.decode()[-2000:]
    final = await outputs(bootstrap, sink)
    assert {w: v[-1] for w, v in final.items()} == dict(expected)
    assert all(v == list(range(1, expected[w] + 1)) for w, v in final.items()), final


async def test_kill9_while_a_savepoint_is_written_or_loaded_leaves_nothing_half_done(
    kafka_bootstrap_servers: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    """kill -9 of ``headrace savepoint create`` half-way leaves no file that looks like a
    savepoint (only FILE.partial, never read); kill -9 of ``headrace savepoint load`` half-way
    leaves the job marked as loading, and ``headrace run --from-savepoint`` then deletes the
    half-written state, loads again and goes on exactly."""
    bootstrap = kafka_bootstrap_servers
    s = Settings(bootstrap_servers=bootstrap, checkpoint_interval_ms=200)
    source = await topic_factory("sp-lines", partitions=2)
    sink = await topic_factory("sp-counts", partitions=2)
    base = f"sp-{uuid.uuid4().hex[:6]}"
    rng = random.Random(9)
    lines = [" ".join(rng.choices(WORDS, k=4)) for _ in range(200)]
    expected = Counter(w for line in lines for w in line.split())
    await produce_lines(bootstrap, source, lines)
    await run_until_counted(wordcount(f"{base}-a", source, sink, 4, "totals"), s, sink, expected)

    (tmp_path / "userjob.py").write_text(JOB_MODULE)
    env = dict(
        os.environ,
        KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        HEADRACE_CHECKPOINT_INTERVAL_MS="200",
        T_SOURCE=source,
        T_SINK=sink,
        T_PARTITIONS="4",
    )
    file = tmp_path / "sp.hrsp"

    async def headrace(*args: str, job: str, fault: str | None = None) -> tuple[int, str]:
        proc_env = dict(env, T_JOB=job)
        if fault is not None:
            proc_env.update(HEADRACE_FAULT_PHASE=fault, HEADRACE_FAULT_AFTER="3")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "headrace.runtime.cli",
            *args,
            cwd=tmp_path,
            env=proc_env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        return proc.returncode or 0, out.decode()

    rc, out = await headrace(
        "savepoint", "create", "userjob:job", str(file), job=f"{base}-a", fault="savepoint-write"
    )
    assert rc == -signal.SIGKILL, out
    assert not file.exists() and (tmp_path / "sp.hrsp.partial").exists()
    rc, out = await headrace("savepoint", "create", "userjob:job", str(file), job=f"{base}-a")
    assert rc == 0 and file.exists(), out

    rc, out = await headrace(
        "savepoint", "load", "userjob:job", str(file), job=f"{base}-b", fault="savepoint-load"
    )
    assert rc == -signal.SIGKILL, out
    more = ["w1 w2", "w3"]
    expected.update(w for line in more for w in line.split())
    await produce_lines(bootstrap, source, more)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "headrace.runtime.cli",
        "run",
        "userjob:job",
        "--from-savepoint",
        str(file),
        cwd=tmp_path,
        env=dict(env, T_JOB=f"{base}-b"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        for _ in range(120):
            await asyncio.sleep(0.5)
            assert proc.returncode is None, (await proc.communicate())[1].decode()
            seen = await outputs(bootstrap, sink)
            if {w: v[-1] for w, v in seen.items()} == dict(expected):
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await proc.communicate()
    assert "was interrupted" in err.decode(), err.decode()[-3000:]
    final = await outputs(bootstrap, sink)
    assert all(v == list(range(1, expected[w] + 1)) for w, v in final.items()), final


class Tally(Operator):
    """Counts per key in an int64 ValueState."""

    n = ValueStateDescriptor[int](type=int, default=0)

    def process(self, record: Record[Any, Any], ctx: Context) -> None:
        n = self.n.value() + 1
        self.n.update(n)
        ctx.emit(n)


class TallyDoc(Operator):
    """The next version: the count lives in a JSON document with room for more fields."""

    n = ValueStateDescriptor[dict[str, int]](serde=JSON, default=dict)

    def process(self, record: Record[Any, Any], ctx: Context) -> None:
        doc = dict(self.n.value())
        doc["count"] = doc.get("count", 0) + 1
        self.n.update(doc)
        ctx.emit(doc["count"])


async def test_a_savepoint_loads_into_a_renamed_operator_whose_state_changed_type(
    kafka_bootstrap_servers: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    """``--map tally=visits`` and ``--migrate visits.n=...``: an int64 count becomes a JSON
    document under a new operator name and job name; the counts go on from the saved ones.
    Without the migration the load is refused, naming the serde change."""
    bootstrap = kafka_bootstrap_servers
    s = Settings(bootstrap_servers=bootstrap, checkpoint_interval_ms=200)
    source = await topic_factory("sp-visits")
    sink = await topic_factory("sp-visit-counts")
    base = f"sp-{uuid.uuid4().hex[:6]}"

    def job(name: str, op: Operator, op_name: str) -> Job:
        j = Job(name)
        j.source(source, key_serde=STR, value_serde=STR).process(op, name=op_name).sink(
            sink, key_serde=STR, value_serde=JSON
        )
        return j

    async def keyed(keys: list[str]) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for k in keys:
                await producer.send(source, b"visit", key=k.encode(), partition=0)
            await producer.flush()
        finally:
            await producer.stop()

    expected = Counter(["ann"] * 3 + ["bob"] * 2)
    await keyed(list(expected.elements()))
    old = job(f"{base}-a", Tally(), "tally")
    await run_until_counted(old, s, sink, expected)
    await create_savepoint(s, old, tmp_path / "sp.hrsp")

    new = job(f"{base}-b", TallyDoc(), "visits")
    with pytest.raises(SavepointError, match="state 'n' of 'visits' changed serde int64 -> json"):
        await load_savepoint(s, new, tmp_path / "sp.hrsp", {"tally": "visits"})
    await load_savepoint(
        s, new, tmp_path / "sp.hrsp", {"tally": "visits"}, {"visits.n": lambda n: {"count": n}}
    )
    await keyed(["ann", "cid"])
    expected.update(["ann", "cid"])
    await run_until_counted(new, s, sink, expected)
    final = await outputs(bootstrap, sink)
    assert final["ann"] == [1, 2, 3, 4] and final["cid"] == [1]


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
async def test_stop_with_savepoint_while_data_flows_then_rescale_is_exact(
    kafka_bootstrap_servers: str, topic_factory: TopicFactory, tmp_path: Path, guarantee: str
) -> None:
    """``savepoint create --stop`` on a running word count (two worker processes, input
    still arriving): every worker stops reading input, drains what is in flight and exits 0;
    the savepoint is taken and loaded with 8 partitions behind the key_by; the input that
    arrived meanwhile is counted after the load, and every count is exact (under exactly-once
    per word 1..count across both jobs)."""
    bootstrap = kafka_bootstrap_servers
    eos = guarantee == "exactly_once"
    s = Settings(
        bootstrap_servers=bootstrap, processing_guarantee=guarantee, checkpoint_interval_ms=200
    )
    source = await topic_factory("sp-lines", partitions=2)
    sink = await topic_factory("sp-counts", partitions=2)
    base = f"sp-{uuid.uuid4().hex[:6]}"
    rng = random.Random(3)
    lines = [" ".join(rng.choices(WORDS, k=4)) for _ in range(1500)]
    expected = Counter(w for line in lines for w in line.split())

    async def feed() -> None:
        for i in range(0, len(lines), 50):
            await produce_lines(bootstrap, source, lines[i : i + 50])
            await asyncio.sleep(0.1)

    (tmp_path / "userjob.py").write_text(JOB_MODULE)
    env = dict(
        os.environ,
        KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        HEADRACE_CHECKPOINT_INTERVAL_MS="200",
        HEADRACE_GUARANTEE=guarantee,
        T_JOB=f"{base}-a",
        T_SOURCE=source,
        T_SINK=sink,
        T_PARTITIONS="4",
    )
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "headrace.runtime.cli",
            "run",
            "userjob:job",
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    feeding = asyncio.create_task(feed())
    try:
        await asyncio.sleep(6)  # both running, counts flowing
        header = await create_savepoint(
            s,
            wordcount(f"{base}-a", source, sink, 4, "totals"),
            tmp_path / "sp.hrsp",
            stop=True,
            wait_s=120,
        )
        for w in workers:
            _, err = await asyncio.wait_for(w.communicate(), 60)
            assert w.returncode == 0, err.decode()[-3000:]
            assert "stop-with-savepoint: stopping" in err.decode()
    finally:
        for w in workers:
            if w.returncode is None:
                w.kill()
                await w.wait()
        await feeding
    assert sum(header["operators"]["totals"]["entries"]) > 0

    rescaled = wordcount(f"{base}-b", source, sink, 8, "totals")
    await load_savepoint(s, rescaled, tmp_path / "sp.hrsp")
    await run_until_counted(rescaled, s, sink, expected)
    final = await outputs(bootstrap, sink)
    assert {w: v[-1] for w, v in final.items()} == dict(expected)
    if eos:
        assert all(v == list(range(1, expected[w] + 1)) for w, v in final.items()), final


def user_windows(name: str, source: str, sink: str, partitions: int) -> Job:
    from headrace import Tumbling

    job = Job(name)
    job.source(source, value_serde=JSON, timestamp=lambda v: v["ts"]).key_by(
        lambda v: v["user"], key_serde=STR, value_serde=JSON, partitions=partitions
    ).window(Tumbling(10.0)).count(name="per-window").sink(sink, key_serde=STR, value_serde=JSON)
    return job


async def test_windows_and_their_timers_move_with_their_keys_when_rescaled(
    kafka_bootstrap_servers: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    """A windowed count behind a key_by, saved with windows still open (their state and the
    timers that will close them) and loaded with 3 partitions instead of 4: each timer must
    land in the task that now holds its key's window, or that window never closes."""
    bootstrap = kafka_bootstrap_servers
    s = Settings(
        bootstrap_servers=bootstrap, processing_guarantee="exactly_once", checkpoint_interval_ms=200
    )
    source = await topic_factory("spw-views", partitions=2)
    sink = await topic_factory("spw-windows", partitions=2)
    base = f"spw-{uuid.uuid4().hex[:6]}"
    views = [{"user": f"u{i % 20}", "ts": 1_000_000 + i * 100} for i in range(400)]
    flush = [{"user": "flush", "ts": 2_000_000}] * 2  # one per source partition: closes all
    expected = Counter((v["user"], v["ts"] - v["ts"] % 10_000) for v in views)

    async def emitted() -> Counter[tuple[str, int, int]]:
        rows = await read_topic(bootstrap, sink, key_serde=STR, value_serde=JSON)
        return Counter((k, v["start"], v["value"]) for _, _, k, v, _ in rows)

    async def produce(batch: list[dict[str, Any]]) -> None:
        await produce_lines(bootstrap, source, [JSON.serialize(v).decode() for v in batch])

    first = user_windows(f"{base}-a", source, sink, 4)
    await produce(views)  # four windows per user; the last, [1,030,000, 1,040,000), stays open

    async def three_windows_out() -> bool:
        return sum((await emitted()).values()) == 60

    await run_worker_until(first, s, three_windows_out)
    header = await create_savepoint(s, first, tmp_path / "windows.hrsp")
    assert sum(header["operators"]["per-window"]["entries"]) > 0
    second = user_windows(f"{base}-b", source, sink, 3)
    await load_savepoint(s, second, tmp_path / "windows.hrsp", {})
    # no more views of these users: only each window's own timer can close it
    await produce(flush)

    async def all_out() -> bool:
        return sum((await emitted()).values()) >= len(expected)

    await run_worker_until(second, s, all_out, settle_s=1.0)
    got = await emitted()
    assert got == Counter({(u, start, n): 1 for (u, start), n in expected.items()})
