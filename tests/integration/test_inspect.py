"""``headrace state`` against a real changelog written by a real worker.

Words holding an ANSI escape sequence and a bidi override are counted; ``headrace state``
prints them escaped (text) or as JSON Lines that decode back to the exact stored words, and an
operator the job has no state for is refused naming the ones it has.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from headrace.runtime.pytest_plugin import TopicFactory
from headrace.runtime.recovery import read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]
REPO = Path(__file__).resolve().parents[2]
EVIL = "\x1b[31mred\u202eevil"
LINES = [f"plain {EVIL} plain", f"{EVIL} again"]


async def cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    """Exit code and stdout + stderr."""
    code, out, err = await cli_streams(env, *args)
    return code, out + err


async def cli_streams(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "headrace.runtime.cli",
        "--log-level",
        "WARNING",
        *args,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_state_prints_hostile_keys_escaped_and_as_json_lines(
    kafka_bootstrap_servers: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    source = await topic_factory("insp-in", partitions=2)
    sink = await topic_factory("insp-out", partitions=2)
    name = f"insp-{uuid.uuid4().hex[:8]}"
    env = dict(
        os.environ,
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap_servers,
        WORDCOUNT_JOB=name,
        WORDCOUNT_SOURCE=source,
        WORDCOUNT_SINK=sink,
        HEADRACE_CHECKPOINT_INTERVAL_MS="200",
        HEADRACE_STATE_DIR=str(tmp_path / "state"),
    )
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap_servers)
    await producer.start()
    try:
        for line in LINES:
            await producer.send_and_wait(source, line.encode())
    finally:
        await producer.stop()
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "headrace.runtime.cli",
        "run",
        "examples.wordcount:job",
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        for _ in range(120):  # until both counts of EVIL are in the output (committed)
            outputs = await read_topic(kafka_bootstrap_servers, sink)
            if any(
                k == EVIL.lower().encode() and v == (2).to_bytes(8, "big")
                for _, _, k, v, _ in outputs
            ):
                break
            await asyncio.sleep(0.5)
        else:
            pytest.fail("the word count did not finish")
    finally:
        worker.send_signal(signal.SIGTERM)
        await asyncio.wait_for(worker.wait(), 60)

    code, text = await cli(env, "state", "examples.wordcount:job", "counts", "--key", EVIL.lower())
    assert code == 0, text
    assert "\x1b" not in text and "\u202e" not in text, ascii(text)
    assert "key='\\x1b[31mred\\u202eevil' value=2" in text, text
    code, text = await cli(env, "state", "examples.wordcount:job", "counts", "--key", "plain")
    assert code == 0 and "state=count key=plain value=2" in text, text

    code, out, err = await cli_streams(
        env, "state", "examples.wordcount:job", "counts", "--format", "json"
    )
    assert code == 0, out + err
    assert "\x1b" not in out and "\u202e" not in out, ascii(out)
    docs = [json.loads(line) for line in out.splitlines()]
    assert {d["key"]: d["value"] for d in docs} == {"plain": 2, EVIL.lower(): 2, "again": 1}
    assert {d["state"] for d in docs} == {"count"} and all(d["map_key"] is None for d in docs)
    # notes go to stderr, so stdout stays JSON Lines
    code, out, err = await cli_streams(
        env, "state", "examples.wordcount:job", "counts", "--format", "json", "--limit", "1"
    )
    assert code == 0 and len(out.splitlines()) == 1 and json.loads(out)["value"] in (1, 2)
    assert "(2 more; --limit 1 reached)" in err, err

    code, text = await cli(env, "state", "examples.wordcount:job", "counts", "--partition", "7")
    assert code == 1 and "has partitions 0..1; there is no partition 7" in text, text
    assert "Traceback" not in text
    never_ran = dict(env, WORDCOUNT_JOB=f"{name}-never-ran")
    code, text = await cli(never_ran, "state", "examples.wordcount:job", "counts")
    assert code == 1 and f"changelog topic '{name}-never-ran.counts.changelog'" in text, text
    assert "does not exist" in text and "Traceback" not in text

    code, text = await cli(env, "state", "examples.wordcount:job", "count")
    assert (
        code == 2 and "has no stateful operator 'count'; its stateful operators: 'counts'" in text
    )
