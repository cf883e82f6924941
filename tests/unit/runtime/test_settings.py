"""Settings and the CLI's handling of them: one name per setting, validated at start-up.

A bad value must stop the worker before it connects anywhere, with exit code 2 and a message
naming the flag, the environment variable, the value and what is allowed. These run the real
``headrace`` click command in-process (no broker: every case fails before connecting).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from headrace.runtime.cli import cli, load_job
from headrace.runtime.config import (
    SETTINGS,
    Guarantee,
    Settings,
    SettingsError,
    env_warnings,
)


def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Invoke ``headrace`` in-process; its output (stdout and the log on stderr) as text.

    The CLI sets up root logging on the runner's stream: the root logger is restored after, so
    no later test logs into a closed stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return result.exit_code, result.output


# -- names -----------------------------------------------------------------------------------


def test_every_setting_has_a_flag_and_the_variable_named_after_it() -> None:
    fields = {f for f in Settings.__dataclass_fields__}
    assert {s.field for s in SETTINGS} == fields
    for info in SETTINGS:
        assert info.envvar == "HEADRACE_" + info.flag.upper().replace("-", "_")


def test_run_help_shows_every_flag_with_its_environment_variable() -> None:
    code, text = run_cli("run", "--help")
    assert code == 0
    flat = re.sub(r"\s+", " ", text)
    for info in SETTINGS:
        if info.env_only:
            continue
        assert info.option in flat, info.option
        assert f"env var: {info.envvar}" in flat, info.envvar
    assert "MODULE:FACTORY()" in flat


def test_guarantee_variable_is_the_flags_name_and_the_old_one_still_works() -> None:
    assert Settings.from_env({"HEADRACE_GUARANTEE": "at_least_once"}).processing_guarantee is (
        Guarantee.AT_LEAST_ONCE
    )
    old = {"HEADRACE_PROCESSING_GUARANTEE": "at_least_once"}
    assert Settings.from_env(old).processing_guarantee is Guarantee.AT_LEAST_ONCE
    assert env_warnings(old) == [
        "HEADRACE_PROCESSING_GUARANTEE is deprecated: use HEADRACE_GUARANTEE"
    ]


def test_unknown_headrace_variables_are_warned_about_with_a_suggestion() -> None:
    env = {"HEADRACE_GUARANTE": "at_least_once", "HEADRACE_STATE_DIR": "/x", "PATH": "/bin"}
    assert env_warnings(env) == [
        "unknown environment variable HEADRACE_GUARANTE is ignored "
        "(did you mean HEADRACE_GUARANTEE?)"
    ]


def test_cli_warns_about_an_unknown_variable_at_start_up() -> None:
    # the unknown name is warned about, then the bad value stops the start (no broker needed)
    code, text = run_cli(
        "run",
        "examples.wordcount:job",
        env={"HEADRACE_CHEKPOINT_INTERVAL_MS": "5", "HEADRACE_CHECKPOINT_INTERVAL_MS": "-1"},
    )
    assert code == 2
    assert "unknown environment variable HEADRACE_CHEKPOINT_INTERVAL_MS" in text


# -- values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "names", "allowed"),
    [
        (
            {"HEADRACE_CHECKPOINT_INTERVAL_MS": "abc"},
            "--checkpoint-interval-ms / HEADRACE_CHECKPOINT_INTERVAL_MS",
            "an integer >= 1",
        ),
        (
            {"HEADRACE_CHECKPOINT_INTERVAL_MS": "0"},
            "--checkpoint-interval-ms / HEADRACE_CHECKPOINT_INTERVAL_MS",
            "an integer >= 1",
        ),
        (
            {"HEADRACE_GUARANTEE": "exactly-once"},
            "--guarantee / HEADRACE_GUARANTEE",
            "one of exactly_once, at_least_once",
        ),
        (
            {"HEADRACE_PROCESSING_GUARANTEE": "exactly-once"},
            "HEADRACE_PROCESSING_GUARANTEE",
            "one of exactly_once, at_least_once",
        ),
        (
            {"HEADRACE_STATE_BACKEND": "redis"},
            "--state-backend / HEADRACE_STATE_BACKEND",
            "one of memory, rocksdb",
        ),
        (
            {"HEADRACE_ALIGNMENT_TIMEOUT_S": "nan"},
            "--alignment-timeout-s / HEADRACE_ALIGNMENT_TIMEOUT_S",
            "a number > 0",
        ),
        (
            {"HEADRACE_METRICS_PORT": "70000"},
            "--metrics-port / HEADRACE_METRICS_PORT",
            "an integer from 0 to 65535",
        ),
        (
            {"HEADRACE_BOOTSTRAP_SERVERS": "localhost"},
            "--bootstrap-servers / HEADRACE_BOOTSTRAP_SERVERS",
            "host:port",
        ),
        (
            {"HEADRACE_HEARTBEAT_INTERVAL_MS": "20000"},
            "--heartbeat-interval-ms / HEADRACE_HEARTBEAT_INTERVAL_MS",
            "less than the session timeout",
        ),
        (
            {"HEADRACE_SSL_CAFILE": "/nonexistent/ca.pem"},
            "--ssl-cafile / HEADRACE_SSL_CAFILE",
            "an existing file",
        ),
        (
            {"HEADRACE_SECURITY_PROTOCOL": "SASL_SSL", "HEADRACE_SASL_MECHANISM": "PLAIN"},
            "--sasl-username / HEADRACE_SASL_USERNAME",
            "required with security protocol SASL_SSL",
        ),
        (
            {
                "HEADRACE_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "HEADRACE_SASL_MECHANISM": "PLAIN",
                "HEADRACE_SASL_USERNAME": "bob",
            },
            "HEADRACE_SASL_PASSWORD",
            "required with security protocol SASL_PLAINTEXT",
        ),
    ],
)
def test_a_bad_value_exits_2_naming_the_setting_the_value_and_what_is_allowed(
    env: dict[str, str], names: str, allowed: str
) -> None:
    code, text = run_cli("run", "examples.wordcount:job", env=env)
    flat = re.sub(r"\s+", " ", text)
    assert code == 2, text
    assert names in flat and allowed in flat, text
    assert "Traceback" not in text


def test_a_flag_is_validated_like_its_variable() -> None:
    code, text = run_cli("run", "examples.wordcount:job", "--checkpoint-interval-ms", "0")
    assert code == 2 and "--checkpoint-interval-ms / HEADRACE_CHECKPOINT_INTERVAL_MS" in text


def test_a_secret_is_never_echoed_in_a_settings_error() -> None:
    with pytest.raises(SettingsError) as err:
        Settings(
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="PLAIN",
            sasl_password="hunter2-secret",
        )
    assert "hunter2" not in str(err.value)
    assert "hunter2" not in repr(
        Settings(
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="PLAIN",
            sasl_username="bob",
            sasl_password="hunter2-secret",
        )
    )


def test_settings_from_code_are_validated_too() -> None:
    with pytest.raises(SettingsError, match="checkpoint-interval-ms"):
        Settings(checkpoint_interval_ms=0)
    assert Settings(checkpoint_interval_ms="250").checkpoint_interval_ms == 250  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, 3, "two"])
def test_a_hop_format_other_than_1_or_2_is_refused(value: object) -> None:
    with pytest.raises(SettingsError, match=r"--hop-format / HEADRACE_HOP_FORMAT.*from 1 to 2"):
        Settings(hop_format=value)  # type: ignore[arg-type]
    assert Settings().hop_format == 2
    assert Settings(hop_format="1").hop_format == 1  # type: ignore[arg-type]


# -- MODULE:JOB --------------------------------------------------------------------------------


@pytest.fixture
def user_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project with its own ``operators.py`` (the natural name for a file of operators)."""
    (tmp_path / "operators.py").write_text(
        "from headrace import Job\n"
        "CALLS = []\n"
        "def build():\n"
        "    job = Job('user-job')\n"
        "    job.source('in').sink('out')\n"
        "    return job\n"
        "job = build()\n"
        "def main():\n"
        "    CALLS.append('main')\n"
        "    return 42\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "operators", raising=False)
    return tmp_path


def test_load_job_takes_the_users_own_operators_module(user_project: Path) -> None:
    job = load_job("operators:job")
    assert job.name == "user-job"


def test_a_factory_is_called_only_when_asked_with_parentheses(user_project: Path) -> None:
    import click

    assert load_job("operators:build()").name == "user-job"
    with pytest.raises(click.BadParameter, match=r"write operators:main\(\)") as err:
        load_job("operators:main")
    import operators  # the user's module, as loaded above

    assert operators.CALLS == [], "main() was called without being asked to"
    assert "type function, not a headrace Job" in err.value.format_message()
    with pytest.raises(click.BadParameter, match="of type int, not a headrace Job"):
        load_job("operators:main()")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("operators", "expected MODULE:JOB"),
        ("nosuchmodule_xyz:job", "no module named 'nosuchmodule_xyz'"),
        ("operators:nosuch", "has no attribute 'nosuch'"),
        ("operators:job()", "not callable: drop the ()"),
    ],
)
def test_a_bad_job_spec_says_what_is_wrong(user_project: Path, spec: str, message: str) -> None:
    code, text = run_cli("checkpoints", spec)
    assert code == 2 and message in text, text
