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
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


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
    assert "key=\\x1b[31mred\\u202eevil value=2" in text, text

    code, text = await cli(env, "state", "examples.wordcount:job", "counts", "--format", "json")
    assert code == 0, text
    assert text.isascii() or "\u202e" not in text
    docs = [json.loads(line) for line in text.splitlines()]
    assert {d["key"]: d["value"] for d in docs} == {"plain": 2, EVIL.lower(): 2, "again": 1}

    code, text = await cli(env, "state", "examples.wordcount:job", "count")
    assert (
        code == 2 and "has no stateful operator 'count'; its stateful operators: 'counts'" in text
    )
