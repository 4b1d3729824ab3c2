"""SQLite runs in WAL mode: a reader of the file (the dashboard, a notebook's
``optuna.load_study``) never blocks the server's writes, and ``HPO_SQLITE_SYNCHRONOUS`` holds."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import ADMIN, TOKENS, WORKER, spec
from sqlalchemy import text

from hpo_service.app import create_app
from hpo_service.config import Settings


def _settings(path: Path, synchronous: str = "normal") -> Settings:
    return Settings(
        database_url=f"sqlite:///{path}",
        tokens=TOKENS,  # type: ignore[arg-type]
        run_reaper=False,
        run_scheduler=False,
        db_connect_retries=0,
        sqlite_synchronous=synchronous,  # type: ignore[arg-type]
    )


def test_a_reader_holding_a_snapshot_does_not_block_reports(tmp_path: Path) -> None:
    path = tmp_path / "hpo.db"
    app = create_app(_settings(path))
    with TestClient(app) as client:
        assert client.post("/v1/studies", json=spec(), headers=ADMIN).status_code == 201
        lease = client.post("/v1/leases", json={"worker_id": "w"}, headers=WORKER).json()
        reader = sqlite3.connect(path, timeout=0.1, isolation_level=None)
        try:
            assert reader.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            reader.execute("BEGIN")
            before = reader.execute("SELECT count(*) FROM trial_intermediate_values").fetchone()
            # In the rollback-journal mode this reader's shared lock would stall the commit
            # until the 30 s busy timeout and the report would fail with 503.
            answer = client.post(
                f"/v1/trials/{lease['trial_id']}/report",
                json={"lease_token": lease["lease_token"], "epoch": 0, "value": 1.0},
                headers=WORKER,
            )
            assert answer.status_code == 200, answer.text
            # The reader still sees its snapshot; after it ends, the report.
            assert reader.execute("SELECT count(*) FROM trial_intermediate_values").fetchone() == (
                before
            )
            reader.execute("COMMIT")
            after = reader.execute("SELECT count(*) FROM trial_intermediate_values").fetchone()
            assert after == (before[0] + 1,)
        finally:
            reader.close()
    app.state.service.storage.engine.dispose()


@pytest.mark.parametrize(("setting", "level"), [("normal", 1), ("full", 2)])
def test_every_server_connection_has_the_configured_synchronous_level(
    tmp_path: Path, setting: str, level: int
) -> None:
    app = create_app(_settings(tmp_path / "hpo.db", setting))
    engine = app.state.service.storage.engine
    try:
        with engine.connect() as first, engine.connect() as second:  # two pooled connections
            for connection in (first, second):
                assert connection.execute(text("PRAGMA synchronous")).scalar() == level
                assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    finally:
        engine.dispose()
