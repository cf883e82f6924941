"""``headrace savepoint create|inspect|load`` and what ``headrace run --from-savepoint`` does."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from headrace.operators.job import Job
from headrace.runtime.cli_options import (
    MAP_OPTION,
    MIGRATE_OPTION,
    kafka_options,
    load_job,
    migrations_of,
    operator_mapping,
    setting_options,
    settings_from,
)
from headrace.runtime.config import Settings

log = logging.getLogger("headrace")


def load_once(
    settings: Settings,
    job: Job,
    path: Path,
    mapping: dict[str, str],
    migrations: dict[str, Callable[[Any], Any]] | None = None,
) -> None:
    """``run --from-savepoint``: load unless the job's identity says it was loaded from it."""
    from headrace.runtime.kafka.identity import recorded_identity
    from headrace.runtime.savepoint import SavepointError, load_savepoint, read_header

    try:
        header = read_header(path)
        recorded = asyncio.run(recorded_identity(settings, job))
        if recorded is not None and recorded.get("savepoint") == header["id"]:
            log.info("job %r was loaded from savepoint %s: running", job.name, header["id"])
            return
        report = asyncio.run(load_savepoint(settings, job, path, mapping, migrations))
    except SavepointError as exc:
        log.error("worker cannot start: %s", exc)
        raise SystemExit(1) from exc
    log.info("savepoint %s loaded into job %r: %s", report.savepoint, job.name, report.entries)


@click.group()
def savepoint() -> None:
    """Savepoints: a stopped job's whole state in one file, loaded into a job with other
    partition counts behind its key_by, another name or renamed operators.

    \b
      headrace savepoint create MODULE:JOB FILE   from the stopped, drained job
      headrace savepoint inspect FILE [--key K]   what it holds (every checksum is checked)
      headrace savepoint load MODULE:JOB FILE     into a job without state
      headrace run MODULE:JOB --from-savepoint FILE   load (once), then run
    """


@savepoint.command("create")
@click.argument("job_spec", metavar="MODULE:JOB")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--stop",
    is_flag=True,
    help="The job runs: ask its workers (through <job>.control) to stop reading input, "
    "process what is in flight and stop; then take the savepoint (stop-with-savepoint).",
)
@click.option(
    "--wait-s", default=600.0, show_default=True, help="How long --stop waits for the workers."
)
@kafka_options
@setting_options(("processing_guarantee",))
def savepoint_create(job_spec: str, path: Path, stop: bool, wait_s: float, **options: Any) -> None:
    """Write the state of MODULE:JOB to FILE. The job must be stopped and drained (nothing
    left between stages), or --stop does both: every worker stops reading input, processes
    what is in flight, takes a final checkpoint and exits 0; the savepoint follows. Without
    --stop: stop the producers, let `headrace status` show no lag, stop the workers (SIGTERM)."""
    from headrace.runtime.savepoint import SavepointError, create_savepoint

    job = load_job(job_spec)
    settings = settings_from(options)
    try:
        header = asyncio.run(create_savepoint(settings, job, path, stop=stop, wait_s=wait_s))
    except SavepointError as exc:
        raise click.ClickException(str(exc)) from exc
    total = sum(sum(d["entries"]) for d in header["operators"].values())
    click.echo(f"savepoint {header['id']} of job {job.name!r}: {total:,} entries in {path}")


@savepoint.command("inspect")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--key", help="Print this record key's entries (its UTF-8 bytes).")
def savepoint_inspect(path: Path, key: str | None) -> None:
    """What FILE holds: job, offsets, operators, states, entry counts (all checksums checked)."""
    from headrace.runtime.savepoint import SavepointError, summarize

    try:
        click.echo(summarize(path, key))
    except SavepointError as exc:
        raise click.ClickException(str(exc)) from exc


@savepoint.command("load")
@click.argument("job_spec", metavar="MODULE:JOB")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
@MAP_OPTION
@MIGRATE_OPTION
@kafka_options
def savepoint_load(
    job_spec: str, path: Path, mapping: tuple[str, ...], migrate: tuple[str, ...], **options: Any
) -> None:
    """Load FILE into MODULE:JOB, a job without state (a new name, or after `headrace reset`),
    for the job's current layout: a stage behind a key_by may have another partition count
    (key_by(partitions=N)). Then start its workers with `headrace run`."""
    from headrace.runtime.savepoint import SavepointError, load_savepoint

    job = load_job(job_spec)
    settings = settings_from(options)
    try:
        report = asyncio.run(
            load_savepoint(settings, job, path, operator_mapping(mapping), migrations_of(migrate))
        )
    except SavepointError as exc:
        raise click.ClickException(str(exc)) from exc
    for op, n in report.entries.items():
        click.echo(f"operator {op!r}: {n:,} entries over {report.partitions[op]} partitions")
    click.echo(f"savepoint {report.savepoint} loaded into job {job.name!r}")
