"""Process and network helpers of the local broker: ports, the JVM, PIDs, readiness probes."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import os
import shutil
import socket
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from headrace.runtime.localkafka.errors import LocalBrokerError

_T = TypeVar("_T")


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def random_cluster_id() -> str:
    """Same shape as ``kafka-storage random-uuid``: 16 random bytes, base64url, no padding.

    Kafka refuses ids starting with '-' (they look like command-line flags).
    """
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise LocalBrokerError("`java` not found (set JAVA_HOME or put a JDK 17 on PATH)")
    return java


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def run_coroutine_sync(factory: Callable[[], Awaitable[_T]]) -> _T:
    """Run a coroutine to completion from sync code, even if an event loop is running.

    ``start()`` is called from sync pytest fixtures but also from async tests (restarts);
    ``asyncio.run`` refuses to nest, so in that case a helper thread gets its own loop.
    """

    async def _main() -> _T:
        return await factory()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_main())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, _main()).result()


async def metadata_ok(bootstrap: str, wait_s: float) -> bool:
    """True when the broker answers a Metadata request listing at least one broker.

    An open port is not enough: a KRaft broker accepts connections before it has caught up
    with the controller and been unfenced, and clients would see transient errors.
    """
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=max(1000, int(wait_s * 1000)),
        client_id="headrace-local-broker-probe",
    )
    try:
        async with asyncio.timeout(wait_s):
            await admin.start()
            cluster: dict[str, Any] = await admin.describe_cluster()
        return bool(cluster.get("brokers"))
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) process; reaps it if it is our exited child."""
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmdline(pid: int) -> str | None:
    """The process's command line (Linux), or None when it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode("utf-8", "replace")
