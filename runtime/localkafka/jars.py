"""The broker's jars: which Kafka, rendered into a Maven project, fetched into a cache.

Why Maven: CI and many developer machines have a JDK and Maven but no Docker daemon, and Maven
Central holds every Kafka release as jars. The Maven project is *rendered from code*
(:func:`render_pom`), so an installed wheel needs nothing from the source checkout: ``headrace
kafka start`` works in any project. The Kafka version is one setting: :data:`DEFAULT_VERSION`,
overridden by ``HEADRACE_KAFKA_VERSION`` or ``--kafka-version``.

The jars of one version live in ``<cache>/<version>/lib`` where ``<cache>`` is
``$HEADRACE_KAFKA_HOME``, else ``$XDG_CACHE_HOME/headrace/kafka``, else
``~/.cache/headrace/kafka``. Maven itself caches downloads in ``~/.m2``, so a second version or
a wiped cache costs seconds, not minutes.

What changes with the major version is the logging binding: Kafka 3.x logs through slf4j 1.7
bound to reload4j (log4j 1 syntax); 4.x through log4j2 (log4j-core comes with the broker, the
slf4j 1.7 binding ``log4j-slf4j-impl`` is added here).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from headrace.runtime.localkafka.errors import JarsUnavailableError, LocalBrokerError
from headrace.runtime.localkafka.process import java

__all__ = [
    "DEFAULT_VERSION",
    "KAFKA_HOME_ENV",
    "VERSION_ENV",
    "JarsUnavailableError",
    "LocalBrokerError",
    "ensure_jars",
    "jars_home",
    "jars_present",
    "kafka_version",
    "render_pom",
]

#: The Kafka version the local broker runs unless told otherwise: the one knob to turn.
DEFAULT_VERSION = "3.9.2"
VERSION_ENV = "HEADRACE_KAFKA_VERSION"
#: Root of the per-version jar directories (default: the user's cache directory).
KAFKA_HOME_ENV = "HEADRACE_KAFKA_HOME"

_SLF4J_RELOAD4J = ("org.slf4j", "slf4j-reload4j", "1.7.36")
_LOG4J2_SLF4J = ("org.apache.logging.log4j", "log4j-slf4j-impl", "2.24.3")
_DEPENDENCY_PLUGIN = "3.8.1"


def kafka_version(version: str | None = None) -> str:
    """``version``, else ``$HEADRACE_KAFKA_VERSION``, else :data:`DEFAULT_VERSION`; checked."""
    chosen = (version or os.environ.get(VERSION_ENV) or DEFAULT_VERSION).strip()
    if not re.fullmatch(r"\d+\.\d+\.\d+", chosen):
        raise JarsUnavailableError(
            f"Kafka version {chosen!r} (--kafka-version / {VERSION_ENV}) is not a release "
            "number such as 3.9.2 or 4.1.1"
        )
    return chosen


def major(version: str) -> int:
    return int(version.split(".", 1)[0])


def cache_root() -> Path:
    env = os.environ.get(KAFKA_HOME_ENV)
    if env:
        return Path(env).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser().resolve() / "headrace" / "kafka"


def jars_home(version: str | None = None) -> Path:
    """The directory of one Kafka version: ``pom.xml``, ``lib/`` and ``maven.log``."""
    return cache_root() / kafka_version(version)


def render_pom(version: str) -> str:
    """A Maven project whose ``package`` copies the broker's runtime jars into ``lib/``."""
    group, artifact, binding_version = _SLF4J_RELOAD4J if major(version) < 4 else _LOG4J2_SLF4J
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- Rendered by headrace (runtime/localkafka/jars.py); edit the code, not this file. -->
<project xmlns="http://maven.apache.org/POM/4.0.0"
         xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
         xsi:schemaLocation="http://maven.apache.org/POM/4.0.0 https://maven.apache.org/xsd/maven-4.0.0.xsd">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.headrace</groupId>
  <artifactId>headrace-local-kafka</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <properties>
    <project.build.sourceEncoding>UTF-8</project.build.sourceEncoding>
  </properties>
  <dependencies>
    <!-- the broker and controller (kafka.Kafka) and the storage tool -->
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{version}</version>
    </dependency>
    <!-- without a binding slf4j drops every log line: server.log feeds failure reports -->
    <dependency>
      <groupId>{group}</groupId>
      <artifactId>{artifact}</artifactId>
      <version>{binding_version}</version>
    </dependency>
  </dependencies>
  <build>
    <directory>${{project.basedir}}/target</directory>
    <plugins>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-dependency-plugin</artifactId>
        <version>{_DEPENDENCY_PLUGIN}</version>
        <executions>
          <execution>
            <id>copy-broker-jars</id>
            <phase>package</phase>
            <goals><goal>copy-dependencies</goal></goals>
            <configuration>
              <outputDirectory>${{project.basedir}}/lib</outputDirectory>
              <includeScope>runtime</includeScope>
            </configuration>
          </execution>
        </executions>
      </plugin>
    </plugins>
  </build>
</project>
"""


def _jars_present(lib: Path, version: str) -> bool:
    return (lib / f"kafka_2.13-{version}.jar").is_file()


def jars_present(version: str | None = None) -> bool:
    """Whether :func:`ensure_jars` would return at once (no Maven run) for ``version``."""
    version = kafka_version(version)
    return _jars_present(jars_home(version) / "lib", version)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise Maven runs: `make`, CI and parallel pytest sessions may all ask at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_jars(version: str | None = None, *, offline: bool = False) -> Path:
    """The directory of the broker jars of ``version``, running Maven first if they are missing.

    Maven's output goes to ``maven.log`` and is shown only on failure: a quiet success is what
    every test run wants.
    """
    version = kafka_version(version)
    home = jars_home(version)
    lib = home / "lib"
    if _jars_present(lib, version):
        return lib
    with _file_lock(home / ".jars.lock"):
        if _jars_present(lib, version):  # another process fetched them meanwhile
            return lib
        mvn = shutil.which("mvn")
        if mvn is None:
            raise JarsUnavailableError(
                f"Kafka {version} jars are missing from {lib} and `mvn` is not on PATH; "
                "install Maven 3.8+ and a JDK 17, or copy a lib/ directory fetched elsewhere "
                f"there ({KAFKA_HOME_ENV} moves the cache)"
            )
        try:
            java()  # Maven runs on the JDK too; say so before it fails with its own words
        except LocalBrokerError as exc:
            raise JarsUnavailableError(
                f"Kafka {version} jars are missing from {lib} and Maven cannot fetch them "
                f"without a JDK: {exc}"
            ) from exc
        if lib.exists():
            shutil.rmtree(lib)
        pom = home / "pom.xml"
        pom.write_text(render_pom(version))
        cmd = [mvn, "-B", "-q", "-f", str(pom), "package"]
        if offline:
            cmd.insert(1, "-o")
        log_path = home / "maven.log"
        started = time.monotonic()
        with log_path.open("w") as log:
            rc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False
            ).returncode
        if rc != 0 or not _jars_present(lib, version):
            raise JarsUnavailableError(
                f"fetching the Kafka {version} jars failed: `{' '.join(cmd)}` exited {rc} after "
                f"{time.monotonic() - started:.1f}s (is Maven Central reachable? is {version} a "
                f"Kafka release?); last lines of {log_path}:\n{tail(log_path, 30)}"
            )
    return lib


def tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a (log) file, indented, for error messages."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return f"  ({path} does not exist)"
    return "\n".join("  " + line for line in data.splitlines()[-lines:])
