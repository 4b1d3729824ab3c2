"""Real ``hpo serve`` and protocol-worker processes for the chaos tests, and bounded waits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from helpers import TOKENS

HERE = Path(__file__).parent
T = TypeVar("T")

#: Short lease settings so a dead worker's trial is reaped in seconds.
HEARTBEAT_S = 0.5
LEASE_TIMEOUT_S = 2.0
REAP_INTERVAL_S = 0.5
#: lease timeout + one heartbeat interval + one reap pass: how late a dead worker's trial may
#: be failed (plus the second the database clock rounds heartbeats to on SQLite).
STALE_BOUND_S = LEASE_TIMEOUT_S + HEARTBEAT_S + REAP_INTERVAL_S + 1.0


def wait_for(condition: Callable[[], T], timeout_s: float, what: str) -> T:
    """Poll ``condition`` until it returns something truthy; fail after a generous bound."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.1)


class Server:
    """``python -m hpo_service serve`` on a port, restartable on the same port and database."""

    def __init__(self, database_url: str, port: int, folder: Path, **env: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.folder = folder
        self.env = {
            **os.environ,
            "HPO_DATABASE_URL": database_url,
            "HPO_TOKENS": TOKENS,
            "HPO_PORT": str(port),
            "HPO_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
            "HPO_LEASE_TIMEOUT_S": str(LEASE_TIMEOUT_S),
            "HPO_REAP_INTERVAL_S": str(REAP_INTERVAL_S),
            "HPO_RUN_SCHEDULER": "false",
            "HPO_LOG_LEVEL": "warning",
            "HPO_DB_CONNECT_RETRIES": "30",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Server:
        self.starts += 1
        log = (self.folder / f"server-{self.starts}.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hpo_service", "serve"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._healthy, 120, "the server to answer /healthz")
        return self

    def _healthy(self) -> bool:
        assert self.process is not None
        assert self.process.poll() is None, self.log()
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def log(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.folder.glob("server-*.log")))

    def kill(self) -> None:
        """SIGKILL the server; its own children (the diagnostics drawing process) must end
        by themselves, not linger as orphans."""
        assert self.process is not None
        children = _descendants(self.process.pid)
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        wait_for(
            lambda: not [pid for pid in children if _alive(pid)],
            120,
            f"the killed server's children {children} to exit",
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


class ProtocolWorker:
    """One ``protocol_worker.py`` process; its JSON lines are read back from its log file."""

    def __init__(self, url: str, worker_id: str, folder: Path, *args: str) -> None:
        self.worker_id = worker_id
        self.path = folder / f"worker-{worker_id}.jsonl"
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "protocol_worker.py"), url, "worker-token", worker_id,
             *args],
            stdout=self.path.open("wb"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    def records(self) -> list[dict[str, Any]]:
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                records.append({"event": "output", "text": line})
        return records

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def finish(self, timeout_s: float = 120) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
            raise


def trials(url: str, study: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{url}/v1/studies/{study}/trials",
        params={"limit": 1000},
        headers={"Authorization": "Bearer viewer-token"},
        timeout=30,
    )
    response.raise_for_status()
    found: list[dict[str, Any]] = response.json()["trials"]
    return found


def study_info(url: str, study: str) -> dict[str, Any]:
    response = httpx.get(
        f"{url}/v1/studies/{study}", headers={"Authorization": "Bearer viewer-token"}, timeout=30
    )
    response.raise_for_status()
    info: dict[str, Any] = response.json()
    return info


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; none where /proc has no children files)."""
    found: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in children.read_text().split():
            found += [int(child), *_descendants(int(child))]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing
