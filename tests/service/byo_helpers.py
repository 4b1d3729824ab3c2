"""Shared by the bring-your-own-code tests (SDK, agent, W&B sweeps): a live server on a SQLite
file, polling on a condition, and the trials of a study as Optuna stores them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from helpers import TOKENS
from live import LiveServer

from hpo_service.client import HPOClient, make_http_client
from hpo_service.config import Settings


def wait_for(predicate: Any, timeout_s: float, what: str) -> Any:
    """Poll ``predicate`` until it is truthy; a generous bound, never a fixed sleep."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def live_server(folder: Path, **overrides: Any) -> Iterator[LiveServer]:
    settings = Settings(
        database_url=f"sqlite:///{folder / 'hpo.db'}",
        tokens=TOKENS,  # type: ignore[arg-type]
        heartbeat_interval_s=0.2,
        lease_timeout_s=120,  # no lease expires in these tests: every retry is the fail route's
        run_reaper=False,
        run_scheduler=False,
        long_poll_step_s=0.05,
        db_connect_retries=0,
        **overrides,
    )
    with LiveServer(settings) as live:
        yield live


def admin(server: LiveServer) -> HPOClient:
    return HPOClient(make_http_client(server.url, "admin-token"))


def study_trials(server: LiveServer, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = server.app.state.service.storage
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
