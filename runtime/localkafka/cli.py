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
from headrace.runtime.localkafka.broker import JVM_OPTS_ENV
from headrace.runtime.localkafka.jars import KAFKA_HOME_ENV, VERSION_ENV, jars_present

#: Env var telling the pytest plugin where an already-running local broker lives, so tests
#: that stop/restart the broker can control the one CI started.
BROKER_DIR_ENV = "HEADRACE_LOCAL_BROKER_DIR"

_run_dir_option = click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The broker's directory: config, data, logs/server.log, PID, broker.json (its ports, "
    "cluster id and Kafka version). Default: .headrace/kafka in the working directory "
    "(deploy/kafka/run in a headrace checkout); never inside the installed package.",
)
_version_option = click.option(
    "--kafka-version",
    "version",
    envvar=VERSION_ENV,
    show_envvar=True,
    default=None,
    help=f"Kafka release (default {DEFAULT_VERSION}; the 3.9 and 4.x lines work, e.g. 4.1.1). "
    "A run dir keeps the version it was created with unless asked for another.",
)


def _info(msg: str) -> None:
    click.echo(msg, err=True)


_KAFKA_HELP = f"""Run a real single-node Apache Kafka broker (KRaft) locally, without Docker.

For development and tests; production runs against your own cluster. Needs a JDK 17 and
Maven 3.8+. The first start of a Kafka version renders a Maven project for it and fetches the
broker's jars from Maven Central (a minute or two; seconds when ~/.m2 has them) into
CACHE/VERSION, where CACHE is ${KAFKA_HOME_ENV}, else $XDG_CACHE_HOME/headrace/kafka, else
~/.cache/headrace/kafka (`headrace kafka home` prints it).

The broker lives in a run dir (--run-dir): .headrace/kafka in the working directory by default
(deploy/kafka/run in a headrace checkout). It runs Kafka {DEFAULT_VERSION} unless --kafka-version
or ${VERSION_ENV} asks for another (the 4.x line works too). Extra JVM flags: ${JVM_OPTS_ENV}.

\b
  eval "$(headrace kafka start)"    # start, and export KAFKA_BOOTSTRAP_SERVERS
  headrace kafka status             # where it runs; exit 3 when it does not
  headrace kafka stop               # data is kept: start brings the same cluster back
"""


@click.group(
    name="kafka", help=_KAFKA_HELP, short_help="A local Kafka broker for development and tests."
)
def kafka_cli() -> None:
    """``headrace kafka``: the help text is :data:`_KAFKA_HELP` (it names the defaults)."""


@kafka_cli.command(short_help="Fetch a Kafka version's jars with Maven.")
@_version_option
@click.option(
    "--offline", is_flag=True, help="Run Maven offline (-o): only what ~/.m2 already holds."
)
def jars(version: str | None, offline: bool) -> None:
    """Fetch a Kafka version's broker jars with Maven and print their directory.

    A no-op when they are there already. `start` does this itself; run it ahead to fetch
    while online, or to warm a CI cache. Maven's output goes to maven.log next to the jars and
    is shown only when the fetch fails.
    """
    try:
        version = kafka_version(version)
        _fetch_jars(version, offline=offline)
    except LocalBrokerError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(str(jars_home(version) / "lib"))


def _fetch_jars(version: str, *, offline: bool = False) -> None:
    """``ensure_jars`` with a word on stderr before and after a Maven run (it takes a while)."""
    if jars_present(version):
        return
    _info(f"fetching the Kafka {version} jars with Maven into {jars_home(version)} ...")
    started = time.monotonic()
    ensure_jars(version, offline=offline)
    _info(f"fetched Kafka {version} jars with Maven in {time.monotonic() - started:.1f}s")


@kafka_cli.command(short_help="Start the broker; print export lines for it.")
@_run_dir_option
@_version_option
@click.option(
    "--port",
    type=int,
    default=None,
    help="Client (PLAINTEXT) port on 127.0.0.1. Default: the run dir's previous port, else a "
    "free one.",
)
@click.option(
    "--controller-port",
    type=int,
    default=None,
    help="KRaft controller port. Default: the previous one, else a free one.",
)
@click.option(
    "--timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds to wait for the broker to answer a Metadata request (jar fetch not counted).",
)
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
    cluster: same ports, same data. When the broker does not come up, the error quotes the
    end of its logs/server.log.
    """
    try:
        broker = LocalBroker(run_dir, port=port, controller_port=controller_port, version=version)
        was_running = broker.is_running()
        if not was_running:
            _fetch_jars(broker.version)
        startup = broker.start(timeout=timeout)
    except LocalBrokerError as exc:
        raise click.ClickException(str(exc)) from exc
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


@kafka_cli.command(short_help="Stop the broker (SIGTERM; data is kept).")
@_run_dir_option
@click.option(
    "--timeout", type=float, default=30.0, show_default=True, help="Seconds before SIGKILL."
)
@click.option("--kill", "hard", is_flag=True, help="SIGKILL at once (simulate a crash).")
def stop(run_dir: Path | None, timeout: float, hard: bool) -> None:
    """Stop the broker of this run dir: SIGTERM (a controlled shutdown), SIGKILL after
    --timeout. Its data is kept: `start` brings the same cluster back on the same port."""
    broker = LocalBroker(run_dir)
    try:
        stopped = broker.kill() if hard else broker.stop(timeout=timeout)
    except LocalBrokerError as exc:
        raise click.ClickException(str(exc)) from exc
    _info(f"broker {'stopped' if stopped else 'was not running'} ({broker.run_dir})")


@kafka_cli.command(short_help="Whether the broker runs, where, which Kafka, its log file.")
@_run_dir_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(run_dir: Path | None, as_json: bool) -> None:
    """Show whether the broker of this run dir runs, its address, Kafka version and log
    file; exit 3 when it does not run (like LSB init scripts)."""
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


@kafka_cli.command(short_help="Print where a Kafka version's jars are cached.")
@_version_option
def home(version: str | None) -> None:
    """Print the directory of a Kafka version's jars (pom.xml, lib/, maven.log) on stdout,
    and the default run dir on stderr. Delete that directory to make the next start fetch
    again."""
    try:
        click.echo(str(jars_home(version)))
    except LocalBrokerError as exc:
        raise click.ClickException(str(exc)) from exc
    _info(f"default run dir: {default_run_dir()} (jars cache root: ${KAFKA_HOME_ENV})")


if __name__ == "__main__":
    kafka_cli()
