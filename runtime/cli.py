"""The ``headrace`` command.

    headrace run MODULE:JOB            start a worker (run it again, anywhere, to scale out)
    headrace checkpoints MODULE:JOB    recent checkpoints and whether each is complete
    headrace state MODULE:JOB OP       read an operator's state from its changelog and print it
    headrace status MODULE:JOB         members, tasks, lag, last checkpoint, restores under way
    headrace kafka start|stop|status   a local single-node Kafka broker for development

Every ``run`` option can also come from the environment as ``HEADRACE_<OPTION>`` (for example
``HEADRACE_BOOTSTRAP_SERVERS``, ``HEADRACE_SASL_PASSWORD``); flags win over the environment.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from headrace.operators.job import Job
from headrace.runtime.config import Guarantee, Settings
from headrace.runtime.kafka.cli import kafka_cli

log = logging.getLogger("headrace")


def load_job(spec: str) -> Job:
    """``package.module:attribute`` -> the Job (or a zero-argument factory returning one)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise click.BadParameter(f"expected MODULE:JOB, got {spec!r}", param_hint="JOB")
    sys.path.insert(0, ".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(f"cannot import {module_name!r}: {exc}", param_hint="JOB") from exc
    obj = getattr(module, attr, None)
    if obj is None:
        raise click.BadParameter(f"{module_name!r} has no attribute {attr!r}", param_hint="JOB")
    job = obj() if callable(obj) and not isinstance(obj, Job) else obj
    if not isinstance(job, Job):
        raise click.BadParameter(f"{spec} is a {type(job).__name__}, not a headrace Job")
    return job


def _kafka_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--bootstrap-servers",
            help="Kafka bootstrap servers [HEADRACE_BOOTSTRAP_SERVERS or KAFKA_BOOTSTRAP_SERVERS].",
        ),
        click.option(
            "--security-protocol",
            type=click.Choice(["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]),
            help="Kafka security protocol.",
        ),
        click.option(
            "--sasl-mechanism", help="SASL mechanism, e.g. PLAIN, SCRAM-SHA-256, SCRAM-SHA-512."
        ),
        click.option("--sasl-username", help="SASL user name."),
        click.option("--ssl-cafile", help="CA bundle for SSL."),
        click.option("--ssl-certfile", help="Client certificate for SSL."),
        click.option("--ssl-keyfile", help="Client key for SSL."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    envvar="HEADRACE_LOG_LEVEL",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.option(
    "--log-format",
    default="text",
    show_default=True,
    envvar="HEADRACE_LOG_FORMAT",
    type=click.Choice(["text", "json"], case_sensitive=False),
    help="json: one JSON object per line (for log shippers).",
)
def cli(log_level: str, log_format: str) -> None:
    """headrace: stateful stream processing for Python on Apache Kafka.

    Operators declare typed state; every partition gets its own task and state backend;
    checkpoints flow in-band as barriers and land in compacted changelog topics; state follows
    partitions when Kafka rebalances them. Secrets (SASL password) are read from the
    environment only (HEADRACE_SASL_PASSWORD, HEADRACE_SSL_PASSWORD) and never logged.
    """
    from headrace.runtime.logs import setup_logging

    setup_logging(log_level, log_format.lower())


@cli.command()
@click.argument("job_spec", metavar="MODULE:JOB")
@_kafka_options
@click.option(
    "--guarantee",
    "processing_guarantee",
    type=click.Choice([g.value for g in Guarantee]),
    help="exactly_once (transactions, default) or at_least_once.",
)
@click.option("--checkpoint-interval-ms", type=int, help="Checkpoint interval (default 1000).")
@click.option(
    "--state-backend",
    type=click.Choice(["memory", "rocksdb"]),
    help="State backend (default memory).",
)
@click.option("--state-dir", help="Directory for RocksDB state (default .headrace/state).")
@click.option(
    "--error-policy",
    type=click.Choice(["fail", "skip", "dead_letter"]),
    help="Override the job's error policy.",
)
@click.option(
    "--alignment-timeout-s",
    type=float,
    help="Checkpoint unaligned after waiting this long (default 60).",
)
@click.option("--metrics-port", type=int, help="Serve Prometheus metrics and /health on this port.")
@click.option(
    "--metrics-host",
    help="Interface for --metrics-port (default 127.0.0.1; 0.0.0.0 for every interface, as a "
    "container needs).",
)
@click.option(
    "--session-timeout-ms",
    type=int,
    help="Consumer-group session timeout (default 10000): a worker silent this long loses its "
    "tasks, and stops writing for them (its write lease).",
)
@click.option(
    "--heartbeat-interval-ms",
    type=int,
    help="Consumer-group heartbeat interval (default 3000), well below the session timeout.",
)
def run(job_spec: str, **options: Any) -> None:
    """Start a worker for MODULE:JOB (e.g. examples.wordcount:job).

    SIGTERM or Ctrl-C takes a final checkpoint of every task, leaves the consumer group and
    exits 0. A record that fails under the 'fail' policy exits 1 naming its topic, partition
    and offset; nothing past it is committed.
    """
    from headrace.runtime.worker import Worker

    job = load_job(job_spec)
    settings = Settings.from_env(**options)
    worker = Worker(job, settings)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()

    try:
        asyncio.run(main())
    except Exception as exc:
        log.error("worker failed: %s", exc)
        raise SystemExit(1) from exc


@cli.command()
@click.argument("job_spec", metavar="MODULE:JOB")
@_kafka_options
@click.option("--limit", default=20, show_default=True, help="How many checkpoints to show.")
def checkpoints(job_spec: str, limit: int, **options: Any) -> None:
    """List recent checkpoints of a job and whether each is complete for the whole job.

    A checkpoint is complete when every task of every stage acknowledged it in
    <job>.checkpoints (exactly-once: inside its transaction).
    """
    from headrace.runtime.inspect import read_checkpoints

    job = load_job(job_spec)
    settings = Settings.from_env(**options)
    summaries = asyncio.run(read_checkpoints(job, settings))
    if not summaries:
        click.echo(f"no checkpoints recorded for job {job.name!r} yet")
        return
    click.echo(f"{'checkpoint':>14}  {'tasks':>9}  {'complete':8}  {'aligned':7}  {'max ms':>8}")
    for s in summaries[:limit]:
        click.echo(
            f"{s.checkpoint_id:>14}  {len(s.acked & s.expected):>4}/{len(s.expected):<4}  "
            f"{'yes' if s.complete else 'no':8}  {'yes' if s.aligned else 'no':7}  "
            f"{s.max_duration_ms:>8.1f}"
        )


@cli.command()
@click.argument("job_spec", metavar="MODULE:JOB")
@click.argument("operator_id", metavar="OPERATOR")
@_kafka_options
@click.option("--partition", type=int, help="Only this partition (task).")
@click.option("--key", "key", help="Only this key (as the stage's key serde renders it).")
@click.option("--limit", default=50, show_default=True, help="Maximum entries to print.")
@click.option(
    "--guarantee",
    "processing_guarantee",
    type=click.Choice([g.value for g in Guarantee]),
    help="Read committed state only (exactly_once, default) or everything written.",
)
def state(
    job_spec: str,
    operator_id: str,
    partition: int | None,
    key: str | None,
    limit: int,
    **options: Any,
) -> None:
    """Print an operator's state, read from its changelog topic (no worker needed)."""
    from headrace.runtime.inspect import read_state

    job = load_job(job_spec)
    settings = Settings.from_env(**options)
    shown = 0
    for entry in asyncio.run(read_state(job, operator_id, settings, partition=partition, key=key)):
        click.echo(entry)
        shown += 1
        if shown >= limit:
            click.echo(f"... (--limit {limit} reached)")
            break
    if shown == 0:
        click.echo("no state found")


@cli.command()
@click.argument("job_spec", metavar="MODULE:JOB")
@_kafka_options
@click.option(
    "--guarantee",
    "processing_guarantee",
    type=click.Choice([g.value for g in Guarantee]),
    help="Lag against committed data (exactly_once, default) or everything written.",
)
def status(job_spec: str, **options: Any) -> None:
    """Show a running job: group members, tasks per worker, lag per partition, the last
    complete checkpoint and restores under way (workers publish to <job>.status)."""
    from headrace.runtime.status import read_status, render

    job = load_job(job_spec)
    settings = Settings.from_env(**options)
    click.echo(render(asyncio.run(read_status(job, settings))))


cli.add_command(kafka_cli)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
