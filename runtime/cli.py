"""The ``headrace`` command.

    headrace run MODULE:JOB            start a worker (run it again, anywhere, to scale out)
    headrace checkpoints MODULE:JOB    recent checkpoints and whether each is complete
    headrace state MODULE:JOB OP       read an operator's state from its changelog and print it
    headrace status MODULE:JOB         members, tasks, lag, last checkpoint, restores under way
    headrace reset MODULE:JOB --yes    start a job over: delete its state, topics and offsets
    headrace kafka start|stop|status   a local single-node Kafka broker for development

Every option can also come from the environment as ``HEADRACE_<OPTION>`` (for example
``--checkpoint-interval-ms`` is ``HEADRACE_CHECKPOINT_INTERVAL_MS``; ``--help`` shows each);
flags win over the environment. Secrets come from the environment only
(``HEADRACE_SASL_PASSWORD``, ``HEADRACE_SSL_PASSWORD``). The names are made in one place,
:data:`headrace.runtime.config.SETTINGS`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

import click

from headrace.operators.job import JobDefinitionError
from headrace.runtime.cli_options import (
    KAFKA_FIELDS,
    MAP_OPTION,
    MIGRATE_OPTION,
    kafka_options,
    load_job,
    migrations_of,
    operator_mapping,
    setting_options,
    settings_from,
)
from headrace.runtime.config import SETTING_BY_FIELD, SETTINGS, Guarantee
from headrace.runtime.localkafka.cli import kafka_cli
from headrace.runtime.savepoint.commands import load_once, savepoint

log = logging.getLogger("headrace")

__all__ = ["cli", "load_job", "main"]


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
@kafka_options
@setting_options(tuple(s.field for s in SETTINGS if not s.env_only and s.field not in KAFKA_FIELDS))
@click.option(
    "--from-savepoint",
    "from_savepoint",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Load this savepoint into the job first (once: a job that was already loaded from "
    "it just runs). The job must have no state. Start one worker with it, the others after.",
)
@MAP_OPTION
@MIGRATE_OPTION
def run(
    job_spec: str,
    from_savepoint: Path | None,
    mapping: tuple[str, ...],
    migrate: tuple[str, ...],
    **options: Any,
) -> None:
    """Start a worker for MODULE:JOB (e.g. examples.wordcount:job).

    MODULE:JOB names a Job object; MODULE:FACTORY() calls a zero-argument function that
    returns one (only with the parentheses). The working directory is searched first.

    SIGTERM or Ctrl-C takes a final checkpoint of every task, leaves the consumer group and
    exits 0. A record that fails under the 'fail' policy exits 1 naming its topic, partition
    and offset; nothing past it is committed.
    """
    from aiokafka.errors import InvalidSessionTimeoutError

    from headrace.runtime.host import CheckpointMissingError
    from headrace.runtime.kafka.clients import KafkaSetupError
    from headrace.runtime.kafka.topics import TopicConfigError
    from headrace.runtime.worker import Worker

    settings = settings_from(options)
    job = load_job(job_spec)
    if from_savepoint is not None:
        load_once(settings, job, from_savepoint, operator_mapping(mapping), migrations_of(migrate))
    elif mapping or migrate:
        raise click.UsageError("--map and --migrate apply to --from-savepoint only")
    worker = Worker(job, settings)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()

    try:
        asyncio.run(main())
    except (
        KafkaSetupError,
        TopicConfigError,
        JobDefinitionError,
        CheckpointMissingError,
        InvalidSessionTimeoutError,
    ) as exc:
        # the set-up, not a bug: the message says what to check (traceback at debug)
        if isinstance(exc, InvalidSessionTimeoutError):
            exc = KafkaSetupError(
                f"the broker rejected the session timeout of {settings.session_timeout_ms} ms "
                f"({SETTING_BY_FIELD['session_timeout_ms'].names()}): it must lie between the "
                "broker's group.min.session.timeout.ms and group.max.session.timeout.ms "
                "(6000 and 1800000 by default)"
            )
        log.error("worker cannot start: %s", exc)
        log.debug("traceback", exc_info=exc)
        raise SystemExit(1) from exc
    except Exception as exc:
        # the traceback (with the user's frame, through the exception chain) goes to the log, in
        # text as lines after the message, in JSON as the "exception" field
        log.error("worker failed: %s", exc, exc_info=exc)
        raise SystemExit(1) from exc


@cli.command()
@click.argument("job_spec", metavar="MODULE:JOB")
@kafka_options
@click.option("--limit", default=20, show_default=True, help="How many checkpoints to show.")
def checkpoints(job_spec: str, limit: int, **options: Any) -> None:
    """List recent checkpoints of a job and whether each is complete for the whole job.

    A task acknowledges a checkpoint in <job>.checkpoints when it commits it (exactly-once:
    inside its transaction); a task with nothing new since its last one skips it. A checkpoint
    is complete when every task of every stage acknowledged it or a later one: the job's
    committed state then includes everything before it. "tasks" counts the tasks that
    acknowledged it themselves.
    """
    from headrace.runtime.inspect import read_checkpoints

    job = load_job(job_spec)
    settings = settings_from(options)
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
@kafka_options
@click.option("--partition", type=int, help="Only this partition (task).")
@click.option("--key", "key", help="Only this key (as the stage's key serde renders it).")
@click.option("--limit", default=50, show_default=True, help="Maximum entries to print.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text: one escaped line per entry. json: JSON Lines, one object per entry with "
    "partition, state, key, map_key and value; bytes (a key the key serde cannot decode, "
    'a bytes value) always as {"base64": ...}, objects JSON cannot hold as their repr. '
    "Notes (no state, --limit reached) go to stderr in json.",
)
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
    fmt: str,
    **options: Any,
) -> None:
    """Print an operator's state, read from its changelog topic (no worker needed).

    Keys and values are printed escaped: a control character or an escape sequence shows as
    \\x1b and the like and never reaches the terminal as it is; a key that needed escaping
    (or holds a backslash) is shown as its quoted Python repr, any other key as it is.
    OPERATOR is a stateful operator's name; an unknown one is refused with the list.
    """
    from headrace.runtime.inspect import (
        InspectError,
        check_stateful_operator,
        read_state,
        render_json,
        render_text,
    )

    job = load_job(job_spec)
    try:
        check_stateful_operator(job, operator_id)
    except JobDefinitionError as exc:
        raise click.BadParameter(str(exc), param_hint="OPERATOR") from None
    settings = settings_from(options)
    render = render_json if fmt == "json" else render_text
    try:
        entries = asyncio.run(read_state(job, operator_id, settings, partition=partition, key=key))
    except InspectError as exc:
        raise click.ClickException(str(exc)) from None
    for entry in entries[:limit]:
        click.echo(render(entry))
    # in json, stdout holds only the documents
    if len(entries) > limit:
        click.echo(f"... ({len(entries) - limit} more; --limit {limit} reached)", err=fmt == "json")
    if not entries:
        click.echo("no state found", err=fmt == "json")


@cli.command()
@click.argument("job_spec", metavar="MODULE:JOB")
@kafka_options
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
    settings = settings_from(options)
    click.echo(render(asyncio.run(read_status(job, settings))))


@cli.command()
@click.argument("job_spec", metavar="MODULE:JOB")
@kafka_options
@click.option(
    "--to",
    default="earliest",
    show_default=True,
    metavar="earliest|latest|TIME",
    help="Where the job's source starts again: its first records, its end (only new "
    "records), or the first record at or after an ISO 8601 time with a zone "
    "(2026-12-03T09:00:00+00:00).",
)
@click.option(
    "--delete-dead-letters", is_flag=True, help="Delete <job>.dlq as well (kept by default)."
)
@click.option("--yes", is_flag=True, help="Do it. Without --yes the reset is only shown.")
@setting_options(("state_dir",))
def reset(job_spec: str, to: str, delete_dead_letters: bool, yes: bool, **options: Any) -> None:
    """Start MODULE:JOB over from scratch: delete its state, internal topics and offsets.

    What a job knows lives in several places that only make sense together: changelog topics,
    committed offsets with checkpoint metadata, repartition topics, its identity record. Reset
    them with Kafka's own tools one by one and a worker refuses to start (state no offset
    explains); this command removes all of them at once, like Kafka Streams' reset tool.

    Refused while any worker of the job runs (members in its consumer groups). Deletes the
    job's consumer groups, its internal topics (changelogs, repartition, checkpoints, identity,
    status; not the dead letters unless asked), commits the chosen source offsets and deletes
    the job's local state directory on this machine. Without --yes it prints the plan and
    changes nothing (exit 0).
    """
    from headrace.runtime.kafka import clients
    from headrace.runtime.kafka.reset import ResetError, carry_out, plan_reset

    job = load_job(job_spec)
    settings = settings_from(options)

    async def main() -> str:
        admin = clients.admin_client(settings, client_id="headrace-reset")
        await admin.start()
        try:
            plan = await plan_reset(
                admin, settings, job, to=to, delete_dead_letters=delete_dead_letters
            )
            if yes:
                await carry_out(admin, settings, plan)
            return plan.describe()
        finally:
            await admin.close()

    try:
        described = asyncio.run(main())
    except ResetError as exc:
        raise click.ClickException(f"reset of job {job.name!r} refused: {exc}") from exc
    click.echo(described)
    click.echo("done" if yes else "nothing changed: add --yes to reset the job")


cli.add_command(kafka_cli)
cli.add_command(savepoint)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
