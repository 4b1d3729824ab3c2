"""A private PostgreSQL cluster in a temporary folder, on its own port, for tests that stop,
kill and restart the database. Never the shared server: stopping that would break every other
test running on the machine.

``initdb`` refuses to run as root, so as root the cluster is created and run as the
``postgres`` system user (``runuser``); its folder is outside pytest's root-only tmp tree.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import psycopg

BIN = Path(os.environ.get("HPO_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def available() -> str | None:
    """None if a private cluster can be made here, else why not (for a skip message)."""
    if not (BIN / "initdb").exists():
        return f"no PostgreSQL binaries in {BIN} (set HPO_TEST_PG_BIN)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a `postgres` user to run initdb as"
        if shutil.which("runuser") is None:
            return "running as root without `runuser`"
    return None


def free_port_on_loopback() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateCluster:
    """``with PrivateCluster() as pg:`` — a running cluster with an empty database ``hpo``."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="hpo-private-pg-"))
        self.data = self.root / "data"
        self.port = free_port_on_loopback()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/hpo"
        self._as_postgres: list[str] = []
        if os.geteuid() == 0:
            self._as_postgres = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self._as_postgres, *args], check=check, capture_output=True, text=True, timeout=120
        )

    def __enter__(self) -> PrivateCluster:
        self._run(str(BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N")
        self.start()
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as connection:
            connection.execute("CREATE DATABASE hpo")
        return self

    def dsn(self, database: str = "hpo") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database}"

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
            "-c fsync=off -c max_connections=100 -c shared_buffers=16MB"
        )
        self._run(
            str(BIN / "pg_ctl"), "-D", str(self.data), "-o", options, "-l",
            str(self.root / "log"), "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str) -> None:
        """Stop with ``mode`` (fast: disconnect clients; immediate: crash, recovery at start)."""
        self.stop(mode)
        self.start()

    def wait_accepting(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._run(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)
