from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import TOKENS

from hpo_service.app import create_app
from hpo_service.config import Settings


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        artifact_dir=tmp_path / "artifacts",
        tokens=TOKENS,  # type: ignore[arg-type]
        heartbeat_interval_s=0.2,
        lease_timeout_s=1,
        run_reaper=False,  # tests reap explicitly, so timing never decides an assertion
        run_scheduler=False,  # likewise, schedule tests tick a simulated clock themselves
        long_poll_step_s=0.05,
        db_connect_retries=0,
        # No diagnostics plots: each app would spawn a drawing process (a matplotlib import at
        # nice 19) on its first report, and its shutdown waits for the drawing under way, which
        # made teardowns of 4 s alone and up to 40 s on a loaded box. The plots are tested where
        # they are the point (test_history.py sets diagnostics_plot_every itself), and the real
        # servers of the end-to-end tests keep the default.
        diagnostics_plot_every=0,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings)
    with TestClient(app) as test_client:
        yield test_client
    app.state.service.storage.engine.dispose()
