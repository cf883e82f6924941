"""The local broker's configuration per Kafka line, without starting a JVM.

Starting real 3.9 and 4.x brokers is covered by tests/integration/test_broker.py and by .ci/run,
which runs tests/integration against a 4.x broker too; tests/packaging starts one from a wheel.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from headrace.runtime.localkafka import (
    DEFAULT_VERSION,
    BrokerStartError,
    JarsUnavailableError,
    LocalBroker,
    default_run_dir,
    ensure_jars,
    jars_home,
    kafka_version,
    rundir,
)
from headrace.runtime.localkafka.cli import kafka_cli
from headrace.runtime.localkafka.config import logging_config
from headrace.runtime.localkafka.jars import jars_present, render_pom

NS = {"m": "http://maven.apache.org/POM/4.0.0"}


def dependencies(pom: str) -> set[tuple[str, str, str]]:
    root = ET.fromstring(pom)
    return {
        (
            d.findtext("m:groupId", namespaces=NS) or "",
            d.findtext("m:artifactId", namespaces=NS) or "",
            d.findtext("m:version", namespaces=NS) or "",
        )
        for d in root.findall("m:dependencies/m:dependency", NS)
    }


@pytest.mark.parametrize(
    ("version", "binding", "config", "flag"),
    [
        ("3.9.2", "slf4j-reload4j", "log4j.properties", "-Dlog4j.configuration=file:"),
        ("4.1.1", "log4j-slf4j-impl", "log4j2.properties", "-Dlog4j2.configurationFile="),
    ],
)
def test_each_kafka_line_gets_its_logging_binding_and_configuration(
    version: str, binding: str, config: str, flag: str, tmp_path: Path
) -> None:
    deps = dependencies(render_pom(version))
    assert ("org.apache.kafka", "kafka_2.13", version) in deps
    assert binding in {artifact for _, artifact, _ in deps}
    name, text, jvm_flag = logging_config(version, tmp_path / "server.log")
    assert (name, jvm_flag) == (config, flag)
    assert str(tmp_path / "server.log") in text


def test_the_version_is_one_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HEADRACE_KAFKA_VERSION", raising=False)
    monkeypatch.setenv("HEADRACE_KAFKA_HOME", str(tmp_path))
    assert kafka_version() == DEFAULT_VERSION
    assert jars_home() == tmp_path / DEFAULT_VERSION
    monkeypatch.setenv("HEADRACE_KAFKA_VERSION", "4.1.1")
    assert kafka_version() == "4.1.1" and jars_home() == tmp_path / "4.1.1"
    assert kafka_version("3.9.1") == "3.9.1"
    with pytest.raises(JarsUnavailableError, match="HEADRACE_KAFKA_VERSION"):
        kafka_version("latest")


def test_a_run_dir_of_one_kafka_line_is_not_started_with_another(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "data" / "meta.properties").write_text("formatted\n")
    (run_dir / "broker.json").write_text(
        '{"host": "127.0.0.1", "port": 1, "controller_port": 2, "cluster_id": "x", '
        '"kafka_version": "3.9.2"}'
    )
    with pytest.raises(BrokerStartError, match=r"holds a Kafka 3\.9\.2 cluster"):
        LocalBroker(run_dir, version="4.1.1").start()
    # asked for nothing: the run dir's own version (a restart of a 4.x broker stays 4.x)
    assert LocalBroker(run_dir).version == "3.9.2"


def test_log4j2_keeps_logging_through_the_brokers_shutdown(tmp_path: Path) -> None:
    # log4j2's own shutdown hook would stop the file appender while Kafka still shuts down
    _, text, _ = logging_config("4.1.1", tmp_path / "server.log")
    assert "shutdownHook = disable" in text.splitlines()


def test_missing_maven_or_jdk_is_named_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HEADRACE_KAFKA_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    assert not jars_present("4.1.1")
    with pytest.raises(JarsUnavailableError, match=r"`mvn` is not on PATH; install Maven"):
        ensure_jars("4.1.1")
    (bin_dir / "mvn").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "mvn").chmod(0o755)
    with pytest.raises(JarsUnavailableError, match=r"without a JDK: `java` not found"):
        ensure_jars("4.1.1")


def test_outside_a_checkout_the_run_dir_is_in_the_working_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(rundir, "_CHECKOUT_KAFKA", tmp_path / "site-packages" / "deploy")
    monkeypatch.chdir(tmp_path)
    assert default_run_dir() == tmp_path / ".headrace" / "kafka"
    assert LocalBroker().run_dir == tmp_path / ".headrace" / "kafka"


@pytest.mark.parametrize("command", ["start", "stop", "status"])
def test_help_says_where_the_run_dir_and_the_jars_are(command: str) -> None:
    runner = CliRunner()
    group = runner.invoke(kafka_cli, ["--help"])
    assert group.exit_code == 0
    for text in ("HEADRACE_KAFKA_HOME", "~/.cache/headrace/kafka", "HEADRACE_KAFKA_VERSION"):
        assert text in group.output
    sub = runner.invoke(kafka_cli, [command, "--help"])
    assert sub.exit_code == 0
    assert ".headrace/kafka in the working directory" in " ".join(sub.output.split())
