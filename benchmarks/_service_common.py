"""Shared plumbing of the service benchmarks: machine facts, databases, `hpo serve` processes.

Not a benchmark itself. Each benchmark prints ``machine_header()`` first so every figure carries
its date, machine, versions and load.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN_URL = os.environ.get(
    "HPO_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
TOKENS = "admin:bench-admin,worker:bench-worker"
ADMIN_TOKEN, WORKER_TOKEN = "bench-admin", "bench-worker"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> str:
    with contextlib.suppress(OSError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    return "n/a"


def postgres_version() -> str:
    try:
        engine = create_engine(POSTGRES_ADMIN_URL)
        with engine.connect() as connection:
            return str(connection.execute(text("SHOW server_version")).scalar())
    except Exception as error:  # the header must print even without PostgreSQL
        return f"unreachable ({type(error).__name__})"


def machine_header(title: str) -> str:
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
    names = ("optuna", "sqlalchemy", "fastapi", "uvicorn", "httpx", "psycopg")
    packages = ", ".join(f"{name} {version(name)}" for name in names)
    return "\n".join(
        [
            title,
            f"date:     {now}",
            f"machine:  {os.cpu_count()} CPUs (nproc), {cpu_model()}, {platform.system()}",
            f"python:   {platform.python_version()}; {packages}",
            f"postgres: {postgres_version()}",
            f"load avg: {load_average()} (1/5/15 min, at start)",
        ]
    )


@contextlib.contextmanager
def database(backend: str) -> Iterator[str]:
    """A fresh, empty database URL: a SQLite file, or a new PostgreSQL database (dropped after)."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="hpo-bench-") as folder:
            yield f"sqlite:///{folder}/bench.db"
        return
    name = f"hpo_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def hpo_serve(database_url: str, **settings: Any) -> Iterator[str]:
    """A real ``hpo serve`` process on 127.0.0.1; yields its base URL, terminates it after.

    ``settings`` become ``HPO_*`` environment variables (e.g. ``log_level="warning"``).
    """
    with hpo_serve_process(database_url, **settings) as (url, _pid):
        yield url


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a live process has used, from ``/proc/<pid>/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def hpo_serve_process(database_url: str, **settings: Any) -> Iterator[tuple[str, int]]:
    """``hpo_serve`` that also yields the server's process id (to read its CPU time)."""
    port = free_port()
    env = {
        **os.environ,
        "HPO_DATABASE_URL": database_url,
        "HPO_TOKENS": TOKENS,
        "HPO_PORT": str(port),
        "HPO_LOG_LEVEL": "warning",  # no per-request access log
        **{f"HPO_{key.upper()}": str(value) for key, value in settings.items()},
    }
    log = tempfile.NamedTemporaryFile(prefix="hpo-serve-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "hpo_service", "serve"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # generous: a loaded machine imports slowly
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"hpo serve exited: {Path(log.name).read_text()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("hpo serve did not become healthy in 300 s")
            time.sleep(0.2)
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        errors = [
            line
            for line in Path(log.name).read_text(errors="replace").splitlines()
            if "ERROR" in line or "Traceback" in line
        ]
        if errors:
            print(f"server log ({log.name}) has {len(errors)} error line(s): {errors[0][:200]}")
        else:
            Path(log.name).unlink()


def http_client(url: str, token: str, timeout_s: float = 120.0) -> httpx.Client:
    return httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout_s
    )
