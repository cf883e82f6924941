"""The word-count demo: ``python -m examples.wordcount`` (``make demo``).

1. Uses ``KAFKA_BOOTSTRAP_SERVERS`` if set, otherwise starts a local Kafka broker (KRaft) in a
   fresh directory and stops it at the end.
2. Creates ``lines`` and ``word-counts`` (4 partitions each; with an external broker the names get
   a run suffix so nothing existing is touched) and loads a corpus drawn with real English word
   frequencies.
3. Starts two workers (``headrace run examples.wordcount:job``) as separate processes.
4. Waits until the committed output has caught up, prints the top 20 words and the checkpoint
   log, and checks every count against a direct count of the corpus. Exit status 0 only if all
   counts are exact.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from examples.corpus import count_words, generate_lines


async def create_topics(bootstrap: str, topics: list[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, partitions, 1) for t in topics])
    finally:
        await admin.close()


async def produce_lines(bootstrap: str, topic: str, lines: list[str]) -> None:
    """Produce ``lines`` (unkeyed, utf-8) and wait until the broker acknowledged all of them."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=10, acks="all")
    await producer.start()
    try:
        batch = []
        for line in lines:
            batch.append(await producer.send(topic, line.encode()))
            if len(batch) >= 5000:
                await asyncio.gather(*batch)
                batch = []
        await asyncio.gather(*batch)
    finally:
        await producer.stop()


async def wait_for_counts(
    bootstrap: str,
    topic: str,
    expected: dict[str, int],
    wait_s: float,
    workers: list[subprocess.Popen[bytes]] | None = None,
    *,
    verbose: bool = False,
) -> dict[str, int]:
    """Follow the committed (word, INT count) output until it equals ``expected``.

    Stops early when time runs out or one of ``workers`` exited; returns the last counts.
    """
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        group_id=None,
    )
    await consumer.start()
    counts: dict[str, int] = {}
    deadline = time.monotonic() + wait_s
    last_report = 0.0
    try:
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500, max_records=50_000)).values():
                for r in records:
                    counts[r.key.decode()] = int.from_bytes(r.value, "big", signed=True)
            done = sum(counts.get(w, 0) for w in expected)
            total = sum(expected.values())
            if verbose and time.monotonic() - last_report > 2:
                last_report = time.monotonic()
                print(f"  counted {done:,} of {total:,} words ({100 * done / total:.0f}%)")
            if counts == expected:
                break
            dead = [w for w in workers or [] if w.poll() is not None]
            if dead:
                print(f"  worker(s) {[w.pid for w in dead]} exited; stopping the wait")
                break
    finally:
        await consumer.stop()
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=50_000, help="corpus size (default 50,000)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--guarantee", default="exactly_once", choices=["exactly_once", "at_least_once"]
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for the result"
    )
    args = parser.parse_args(argv)

    broker = None
    run_dir: Path | None = None
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    suffix = ""
    if bootstrap:
        suffix = "-" + uuid.uuid4().hex[:6]
        print(f"using the broker at {bootstrap} (topics get the suffix {suffix})")
    else:
        from headrace.runtime.localkafka import LocalBroker

        run_dir = Path(tempfile.mkdtemp(prefix="headrace-demo-"))
        print("starting a local Kafka broker (first run: Maven fetches the jars) ...")
        t0 = time.monotonic()
        broker = LocalBroker(run_dir)
        broker.start()
        bootstrap = broker.bootstrap_servers
        print(f"broker up at {bootstrap} in {time.monotonic() - t0:.1f}s")

    job_name, source, sink = f"wordcount{suffix}", f"lines{suffix}", f"word-counts{suffix}"
    env = dict(
        os.environ,
        KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        WORDCOUNT_JOB=job_name,
        WORDCOUNT_SOURCE=source,
        WORDCOUNT_SINK=sink,
        HEADRACE_PROCESSING_GUARANTEE=args.guarantee,
        HEADRACE_STATE_DIR=str((run_dir or Path(tempfile.mkdtemp())) / "state"),
    )
    workers: list[subprocess.Popen[bytes]] = []
    logs = Path(tempfile.mkdtemp(prefix="headrace-demo-logs-"))
    ok = False
    try:
        asyncio.run(create_topics(bootstrap, [source, sink], 4))
        print(f"generating {args.lines:,} lines of English text ...")
        lines = generate_lines(args.lines)
        expected = dict(count_words(lines))
        asyncio.run(produce_lines(bootstrap, source, lines))
        print(
            f"produced {len(lines):,} lines ({sum(expected.values()):,} words, "
            f"{len(expected):,} distinct) to {source!r}"
        )
        for i in range(args.workers):
            log_file = open(logs / f"worker-{i}.log", "wb")  # noqa: SIM115 - closed with the process
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "headrace.runtime.cli", "run", "examples.wordcount:job"],
                    env=env,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
            )
        print(f"started {args.workers} workers ({args.guarantee}); logs in {logs}")
        t0 = time.monotonic()
        counts = asyncio.run(
            wait_for_counts(bootstrap, sink, expected, args.timeout, workers, verbose=True)
        )
        elapsed = time.monotonic() - t0
        words = sum(expected.values())
        print(f"\ncaught up in {elapsed:.1f}s ({words / elapsed:,.0f} words/s end to end)\n")
        print(f"{'word':<12} {'count':>8}  {'expected':>8}")
        for word, n in sorted(expected.items(), key=lambda kv: -kv[1])[:20]:
            got = counts.get(word)
            mark = "ok" if got == n else "WRONG"
            print(f"{word:<12} {got if got is not None else '-':>8}  {n:>8}  {mark}")
        wrong = {w for w in expected if counts.get(w) != expected[w]} | (
            set(counts) - set(expected)
        )
        ok = not wrong
        show_checkpoints(env, job_name)
        print()
        if ok:
            print(f"all {len(expected):,} word counts are exact")
        else:
            print(
                f"{len(wrong)} word counts differ from the direct count, e.g. {sorted(wrong)[:5]}"
            )
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                code = w.wait(timeout=60)
                if code != 0:
                    print(f"worker {w.pid} exited with {code}; see {logs}")
                    ok = False
            except subprocess.TimeoutExpired:
                w.kill()
                ok = False
        if broker is not None:
            broker.stop()
            if run_dir is not None:
                shutil.rmtree(run_dir, ignore_errors=True)
    raise SystemExit(0 if ok else 1)


def show_checkpoints(env: dict[str, str], job_name: str) -> None:
    print(f"\nheadrace checkpoints examples.wordcount:job   (job {job_name!r}, newest first)")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "headrace.runtime.cli",
            "--log-level",
            "WARNING",
            "checkpoints",
            "examples.wordcount:job",
            "--limit",
            "5",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    print(out.stdout.rstrip() or out.stderr.rstrip())


if __name__ == "__main__":
    main()
