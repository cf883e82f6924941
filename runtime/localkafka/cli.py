"""``headrace kafka start|stop|status|jars``: drive the local KRaft broker from a shell.

Mounted by runtime/cli.py as ``headrace kafka``; also runnable as
``python -m headrace.runtime.localkafka.cli`` (what .ci/run and the Makefile use).

``start`` prints human-readable progress on stderr and only ``export ...`` lines on stdout,
so both of these work::

    headrace kafka start                      # read the hint, copy the export line
    eval "$(headrace kafka start)"            # scripts: sets the env vars directly
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import click

from headrace.runtime.localkafka import (
    DEFAULT_VERSION,
    LocalBroker,
    LocalBrokerError,
    default_run_dir,
    ensure_jars,
    jars_home,
    kafka_version,
)
from headrace.runtime.localkafka.jars import KAFKA_HOME_ENV, VERSION_ENV

#: Env var telling the pytest plugin where an already-running local broker lives, so tests
#: that stop/restart the broker can control the one CI started.
BROKER_DIR_ENV = "HEADRACE_LOCAL_BROKER_DIR"

_run_dir_option = click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Broker state directory (config, data, logs, PID). Default: deploy/kafka/run in a "
    "headrace checkout, else .headrace/kafka in the working directory.",
)
_version_option = click.option(
    "--kafka-version",
    "version",
    envvar=VERSION_ENV,
    show_envvar=True,
    default=None,
    help=f"Kafka release to run (default {DEFAULT_VERSION}; the 3.9 and 4.x lines work).",
)


def _info(msg: str) -> None:
    click.echo(msg, err=True)


@click.group(name="kafka")
def kafka_cli() -> None:
    """Run a real single-node Apache Kafka broker (KRaft) locally, without Docker.

    Needs a JDK 17 and Maven: the broker's jars come from Maven Central into a per-version
    cache (HEADRACE_KAFKA_HOME, default ~/.cache/headrace/kafka) the first time. For
    development and tests; production runs against your own cluster.

    \b
      eval "$(headrace kafka start)"    # start, and export KAFKA_BOOTSTRAP_SERVERS
      headrace kafka status
      headrace kafka stop
    """


@kafka_cli.command()
@_version_option
@click.option("--offline", is_flag=True, help="Run Maven offline (-o).")
def jars(version: str | None, offline: bool) -> None:
    """Fetch the broker jars with Maven (no-op when present) and print their directory."""
    started = time.monotonic()
    try:
        lib = ensure_jars(version, offline=offline)
        version = kafka_version(version)
    except LocalBrokerError as exc:
        raise click.ClickException(str(exc)) from exc
    took = time.monotonic() - started
    if took > 1.0:  # only worth saying when Maven actually ran
        _info(f"fetched Kafka {version} jars with Maven in {took:.1f}s")
    click.echo(str(lib))


@kafka_cli.command()
@_run_dir_option
@_version_option
@click.option("--port", type=int, default=None, help="Client port (default: previous or free).")
@click.option("--controller-port", type=int, default=None, help="KRaft controller port.")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds.")
@click.option(
    "--foreground",
    is_flag=True,
    help="Stay attached; stop the broker on Ctrl-C / SIGTERM.",
)
def start(
    run_dir: Path | None,
    version: str | None,
    port: int | None,
    controller_port: int | None,
    timeout: float,
    foreground: bool,
) -> None:
    """Start the broker (or confirm it is running) and print export lines for it.

    Progress goes to stderr, only `export` lines to stdout, so `eval "$(headrace kafka
    start)"` sets KAFKA_BOOTSTRAP_SERVERS (and HEADRACE_LOCAL_BROKER_DIR, which lets the test
    plugin stop and restart this broker). Starting an existing run dir restarts the same
    cluster: same ports, same data.
    """
    try:
        broker = LocalBroker(run_dir, port=port, controller_port=controller_port, version=version)
        was_running = broker.is_running()
        jar_started = time.monotonic()
        if not was_running:
            ensure_jars(broker.version)
        jar_seconds = time.monotonic() - jar_started
        startup = broker.start(timeout=timeout)
    except LocalBrokerError as exc:
        raise click.ClickException(str(exc)) from exc
    if jar_seconds > 1.0:
        _info(f"fetched Kafka jars with Maven in {jar_seconds:.1f}s")
    verb = "already running" if was_running else f"started in {startup:.1f}s"
    _info(
        f"Kafka {broker.version} broker {verb}: {broker.bootstrap_servers} "
        f"(pid {broker.pid}, run dir {broker.run_dir}, log {broker.log_file})"
    )
    click.echo(f"export KAFKA_BOOTSTRAP_SERVERS={shlex.quote(broker.bootstrap_servers)}")
    click.echo(f"export {BROKER_DIR_ENV}={shlex.quote(str(broker.run_dir))}")
    if foreground:
        _wait_for_signal()
        _info("stopping broker ...")
        broker.stop()


def _wait_for_signal() -> None:
    done = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    while not done.wait(1.0):
        pass


@kafka_cli.command()
@_run_dir_option
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Before SIGKILL.")
@click.option("--kill", "hard", is_flag=True, help="SIGKILL at once (simulate a crash).")
def stop(run_dir: Path | None, timeout: float, hard: bool) -> None:
    """Stop the broker started from this run dir (data is kept)."""
    broker = LocalBroker(run_dir)
    try:
        stopped = broker.kill() if hard else broker.stop(timeout=timeout)
    except LocalBrokerError as exc:
        raise click.ClickException(str(exc)) from exc
    _info(f"broker {'stopped' if stopped else 'was not running'} ({broker.run_dir})")


@kafka_cli.command()
@_run_dir_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(run_dir: Path | None, as_json: bool) -> None:
    """Show whether the broker runs; exit 3 when it does not (like LSB init scripts)."""
    broker = LocalBroker(run_dir)
    info = broker.status()
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        state = "running" if info["running"] else "stopped"
        click.echo(f"{state}: {info['bootstrap_servers'] or '-'} pid={info['pid'] or '-'}")
        for key in ("accepting_connections", "formatted", "cluster_id", "kafka_version"):
            click.echo(f"  {key}: {info[key]}")
        click.echo(f"  run_dir: {info['run_dir']}")
        click.echo(f"  log_file: {info['log_file']}")
    if not info["running"]:
        sys.exit(3)


@kafka_cli.command()
@_version_option
def home(version: str | None) -> None:
    """Print the directory of a version's jars (pom.xml, lib/, maven.log) and the default
    run dir."""
    try:
        click.echo(str(jars_home(version)))
    except LocalBrokerError as exc:
        raise click.ClickException(str(exc)) from exc
    _info(f"default run dir: {default_run_dir()} (jars cache root: ${KAFKA_HOME_ENV})")


if __name__ == "__main__":
    kafka_cli()
