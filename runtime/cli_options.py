"""What the ``headrace`` commands share: loading ``MODULE:JOB``, the setting options made from
:data:`headrace.runtime.config.SETTINGS`, and ``--map OLD=NEW``."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from headrace.operators.job import Job
from headrace.runtime.config import (
    SASL_MECHANISMS,
    SECURITY_PROTOCOLS,
    SETTING_BY_FIELD,
    Settings,
    SettingsError,
    env_warnings,
)

log = logging.getLogger("headrace")


#: the settings every command that talks to Kafka takes
KAFKA_FIELDS = (
    "bootstrap_servers",
    "security_protocol",
    "sasl_mechanism",
    "sasl_username",
    "ssl_cafile",
    "ssl_certfile",
    "ssl_keyfile",
)
_METAVARS = {
    "bootstrap_servers": "HOST:PORT[,...]",
    "processing_guarantee": "[exactly_once|at_least_once]",
    "state_backend": "[memory|rocksdb]",
    "error_policy": "[fail|skip|dead_letter]",
    "security_protocol": "[" + "|".join(SECURITY_PROTOCOLS) + "]",
    "sasl_mechanism": "[" + "|".join(SASL_MECHANISMS) + "]",
    "state_dir": "DIR",
    "ssl_cafile": "FILE",
    "ssl_certfile": "FILE",
    "ssl_keyfile": "FILE",
    "alignment_timeout_s": "SECONDS",
    "status_interval_s": "SECONDS",
    "metrics_host": "ADDRESS",
    "client_id": "TEXT",
    "sasl_username": "TEXT",
}


def load_job(spec: str) -> Job:
    """``MODULE:ATTR`` -> the Job object ``MODULE.ATTR``; ``MODULE:ATTR()`` calls ``ATTR``.

    A factory is called only when the spec asks for it with ``()``: loading a job must not run
    an arbitrary callable (``main``, say) with its side effects just to find out that it is not
    a Job. The working directory comes first on ``sys.path``, so the user's own modules win.
    """
    module_name, _, attr = spec.partition(":")
    call = attr.endswith("()")
    attr = attr.removesuffix("()")
    if not module_name or not attr.isidentifier():
        raise click.BadParameter(
            f"expected MODULE:JOB or MODULE:FACTORY(), got {spec!r}", param_hint="MODULE:JOB"
        )
    cwd = os.getcwd()
    if not sys.path or sys.path[0] not in ("", cwd):
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise click.BadParameter(
                f"no module named {module_name!r} (looked in {cwd} and on sys.path)",
                param_hint="MODULE:JOB",
            ) from exc
        raise
    obj = getattr(module, attr, None)
    if obj is None:
        raise click.BadParameter(
            f"module {module_name!r} ({getattr(module, '__file__', '?')}) has no attribute "
            f"{attr!r}",
            param_hint="MODULE:JOB",
        )
    if call:
        if not callable(obj):
            raise click.BadParameter(
                f"{module_name}:{attr} is an object of type {type(obj).__name__}, not callable: "
                "drop the ()",
                param_hint="MODULE:JOB",
            )
        obj = obj()
    if not isinstance(obj, Job):
        hint = (
            f"; to call it as a factory that returns a Job, write {module_name}:{attr}()"
            if callable(obj) and not call
            else ""
        )
        raise click.BadParameter(
            f"{spec} is an object of type {type(obj).__name__}, not a headrace Job{hint}",
            param_hint="MODULE:JOB",
        )
    return obj


def setting_options(names: tuple[str, ...]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Click options for these settings, each with its ``HEADRACE_*`` variable in ``--help``.

    Values are checked by :class:`Settings` (one validator for the CLI and for code), which
    names the flag and the variable in its error; see :func:`_settings`.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for name in reversed(names):
            info = SETTING_BY_FIELD[name]
            fn = click.option(
                info.option,
                info.field,
                envvar=info.envvar,
                show_envvar=True,
                metavar=_METAVARS.get(name, "NUMBER" if name.endswith("_s") else "INTEGER"),
                help=info.help,
            )(fn)
        return fn

    return decorate


def kafka_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    return setting_options(KAFKA_FIELDS)(fn)


def settings_from(options: dict[str, Any]) -> Settings:
    """Settings from flags and the environment, or a usage error (exit 2) naming the setting."""
    for warning in env_warnings():
        log.warning("%s", warning)
    try:
        return Settings.from_env(**options)
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None


def operator_mapping(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old or not new:
            raise click.BadParameter(f"expected OLD=NEW, got {pair!r}", param_hint="--map")
        out[old] = new
    return out


MAP_OPTION = click.option(
    "--map",
    "mapping",
    multiple=True,
    metavar="OLD=NEW",
    help="The savepoint's operator OLD is this job's operator NEW (repeatable).",
)


def migrations_of(pairs: tuple[str, ...]) -> dict[str, Callable[[Any], Any]]:
    """``--migrate OPERATOR.STATE=MODULE:FUNCTION`` -> {"operator.state": function}."""
    out: dict[str, Callable[[Any], Any]] = {}
    for pair in pairs:
        target, sep, spec = pair.partition("=")
        module_name, colon, attr = spec.partition(":")
        if not sep or "." not in target or not colon or not attr.isidentifier():
            raise click.BadParameter(
                f"expected OPERATOR.STATE=MODULE:FUNCTION, got {pair!r}", param_hint="--migrate"
            )
        cwd = os.getcwd()
        if not sys.path or sys.path[0] not in ("", cwd):
            sys.path.insert(0, cwd)
        fn = getattr(importlib.import_module(module_name), attr, None)
        if not callable(fn):
            raise click.BadParameter(f"{spec} is not a function", param_hint="--migrate")
        out[target] = fn
    return out


MIGRATE_OPTION = click.option(
    "--migrate",
    "migrate",
    multiple=True,
    metavar="OPERATOR.STATE=MODULE:FUNCTION",
    help="Load that state's values through FUNCTION(old value) -> new value, for a state "
    "whose serde or kind changed (names of this job; repeatable).",
)
