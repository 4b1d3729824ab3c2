"""Settings from files (compose secrets) and the start-up retry while PostgreSQL comes up."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from live import free_port
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from hpo_service.config import Settings
from hpo_service.storage import build_storage


def test_a_setting_is_read_from_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = tmp_path / "hpo_tokens"
    tokens.write_text("admin:from-a-file,worker:w\n")  # the newline `echo` adds is dropped
    monkeypatch.setenv("HPO_TOKENS_FILE", str(tokens))
    monkeypatch.delenv("HPO_TOKENS", raising=False)
    assert Settings().token_scopes() == {"from-a-file": "admin", "w": "worker"}
    monkeypatch.setenv("HPO_TOKENS", "admin:from-the-env")  # a plain variable wins
    assert Settings().token_scopes() == {"from-the-env": "admin"}


def test_an_unreadable_secret_file_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HPO_TOKENS_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"HPO_TOKENS_FILE=.*missing: cannot read it"):
        Settings()


def test_the_database_password_joins_the_url_and_stays_out_of_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    password = tmp_path / "postgres_password"
    password.write_text("p@ss:w/rd\n")
    monkeypatch.setenv("HPO_DATABASE_URL", "postgresql+psycopg://hpo@db:5432/hpo")
    monkeypatch.setenv("HPO_DATABASE_PASSWORD_FILE", str(password))
    settings = Settings()
    assert make_url(settings.database_url).password == "p@ss:w/rd"  # escaped in the URL
    assert "p@ss" not in settings.database_url_redacted
    assert settings.database_url_redacted == "postgresql+psycopg://hpo:***@db:5432/hpo"


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_start_up_waits_for_a_database_that_comes_up_late(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """RDBStorage() has no retry: ours keeps trying while the database is not there yet."""
    url = make_url(database_url)
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE "{url.database}"'))  # not there at start-up
    created = threading.Event()

    def create_later() -> None:
        time.sleep(1.5)  # after the first attempt has failed
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{url.database}"'))
        created.set()

    creator = threading.Thread(target=create_later)
    creator.start()
    try:
        with caplog.at_level(logging.WARNING, logger="hpo_service.storage"):
            storage = build_storage(Settings(database_url=database_url, db_connect_retries=6))
        try:
            assert created.is_set()
            assert storage.get_current_version() == storage.get_head_version()
        finally:
            storage.engine.dispose()
        assert any("database not reachable (attempt 1/7)" in r.message for r in caplog.records)
    finally:
        creator.join()
        admin.dispose()


def test_start_up_gives_up_after_its_retries(caplog: pytest.LogCaptureFixture) -> None:
    from sqlalchemy.exc import OperationalError

    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing"  # nobody listens
    with (
        caplog.at_level(logging.WARNING, logger="hpo_service.storage"),
        pytest.raises(OperationalError),
    ):
        build_storage(Settings(database_url=url, db_connect_retries=1))
    assert [r.message for r in caplog.records if "not reachable" in r.message] == [
        "database not reachable (attempt 1/2); retrying in 1s"
    ]
