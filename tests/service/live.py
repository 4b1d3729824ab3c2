"""Real servers on 127.0.0.1 for end-to-end tests: uvicorn in a background thread
(``LiveServer``), or a real ``hpo serve`` process (``serve_process``).

Readiness waits are generous (``READY_TIMEOUT_S``): on a busy two-core machine a cold start
(imports, migrations, the first connection) has taken well over a minute, and a slow machine is no
failure. A server that exits early fails at once, with its log; one that never answers is stopped
before the error is raised, so a failed setup leaves no process behind.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import httpx
import uvicorn

from hpo_service.app import create_app
from hpo_service.config import Settings

#: Seconds a server may take to answer /healthz ($HPO_TEST_READY_TIMEOUT_S to change it).
READY_TIMEOUT_S = float(os.environ.get("HPO_TEST_READY_TIMEOUT_S", "300"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    def __init__(self, settings: Settings) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings.model_copy(update={"port": self.port}))
        self._server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self._thread.start()
        try:
            wait_until_healthy(self.url, alive=self._thread.is_alive, what="uvicorn")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self.app.state.service.storage.engine.dispose()


def wait_until_healthy(
    url: str, alive: Callable[[], bool], what: str, log: Path | None = None
) -> None:
    """Poll ``url``/healthz until it answers 200; raise at once when ``alive()`` turns false
    (with ``log``'s text), or after ``READY_TIMEOUT_S``."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if not alive():
            text = log.read_text(errors="replace") if log is not None else ""
            raise RuntimeError(f"{what} exited before answering /healthz\n{text}")
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not answer {url}/healthz within {READY_TIMEOUT_S:.0f} s")


@contextmanager
def serve_process(
    env: Mapping[str, str], log: Path
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A real ``hpo serve`` on a free port (``HPO_PORT`` is set here), output to ``log``; yields
    the process and its base URL once healthy; stopped on exit, and when it never became ready."""
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "hpo_service", "serve"],
            env={**env, "HPO_PORT": str(port)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, lambda: process.poll() is None, f"hpo serve on port {port}", log)
        yield process, url
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes], grace_s: float = 30) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; always reaps the process."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()
