"""The start-up schema gate and ``hpo migrate``, on a real SQLite file and real PostgreSQL.

An old Optuna schema is made for real: a database set up at Optuna's head is downgraded with
Optuna's own Alembic history. The server must refuse it, naming the command, without touching
the schema; ``hpo migrate`` must then bring it back and keep the data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from helpers import TOKENS, spec
from optuna_schema import optuna_alembic
from sqlalchemy import create_engine, inspect, text

from hpo_service.app import create_app
from hpo_service.config import Settings
from hpo_service.db import MIGRATIONS, VERSION_TABLE, prepare_service_schema
from hpo_service.errors import SchemaMismatch
from hpo_service.migrate import migrate
from hpo_service.schemas import StudySpec
from hpo_service.storage import build_storage, optuna_schema_status

OLD_OPTUNA_REVISION = "v3.0.0.c"  # Optuna 3.0's schema: two migrations behind 5.0's head


def _settings(url: str) -> Settings:
    return Settings(database_url=url, tokens=TOKENS, run_reaper=False, db_connect_retries=0)  # type: ignore[arg-type]


def _optuna_revision(url: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()


def _make_study(settings: Settings, name: str = "kept") -> None:
    app = create_app(settings)
    try:
        app.state.service.create_study(StudySpec.model_validate(spec(name)))
    finally:
        app.state.service.storage.engine.dispose()


def _hpo(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HPO_DATABASE_URL": url, "HPO_DB_CONNECT_RETRIES": "0"}
    return subprocess.run(
        [sys.executable, "-m", "hpo_service", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_old_optuna_schema_is_refused_and_hpo_migrate_fixes_it(database_url: str) -> None:
    settings = _settings(database_url)
    # Built by Optuna's migrations (as a storage upgraded over the years would be), not by
    # create_all, whose index names differ and cannot be downgraded.
    command.upgrade(optuna_alembic(database_url), "head")
    _make_study(settings)
    head = _optuna_revision(database_url)
    command.downgrade(optuna_alembic(database_url), OLD_OPTUNA_REVISION)
    assert _optuna_revision(database_url) == OLD_OPTUNA_REVISION

    with pytest.raises(SchemaMismatch) as refused:
        create_app(settings)
    message = str(refused.value)
    assert "Optuna schema" in message and OLD_OPTUNA_REVISION in message and str(head) in message
    assert "hpo migrate" in message and "optuna storage upgrade --storage" in message

    served = _hpo("serve", "--port", "1", url=database_url)  # refuses before binding
    assert served.returncode == 2, served.stdout + served.stderr
    assert "optuna storage upgrade" in served.stdout
    assert _optuna_revision(database_url) == OLD_OPTUNA_REVISION  # nothing migrated silently

    migrated = _hpo("migrate", url=database_url)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert f"Optuna schema: {OLD_OPTUNA_REVISION} -> {head}" in migrated.stdout
    assert _optuna_revision(database_url) == head

    app = create_app(settings)
    try:
        assert app.state.service.get_study("kept").name == "kept"  # the data survived
    finally:
        app.state.service.storage.engine.dispose()
    again = _hpo("migrate", url=database_url)
    assert again.returncode == 0 and "up to date" in again.stdout


def _migrations_with_extra_revision(tmp_path: Path) -> Path:
    """Our migrations plus one newer revision: a database at our real head is then behind."""
    copy = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    config = Config()
    config.set_main_option("script_location", str(copy))
    head = ScriptDirectory.from_config(config).get_current_head()
    (copy / "versions" / "9999_test_extra.py").write_text(
        textwrap.dedent(
            f'''
            import sqlalchemy as sa
            from alembic import op

            revision = "9999"
            down_revision = "{head}"
            branch_labels = None
            depends_on = None


            def upgrade() -> None:
                op.add_column("hpo_studies", sa.Column("test_extra", sa.Integer(), nullable=True))


            def downgrade() -> None:
                op.drop_column("hpo_studies", "test_extra")
            '''
        )
    )
    return copy


def test_service_schema_behind_head_is_refused_until_migrated(
    database_url: str, tmp_path: Path
) -> None:
    settings = _settings(database_url)
    _make_study(settings)
    newer = _migrations_with_extra_revision(tmp_path)
    storage = build_storage(settings)
    try:
        with pytest.raises(SchemaMismatch) as refused:
            prepare_service_schema(storage.engine, newer)
        assert "service schema" in str(refused.value) and "needs 9999" in str(refused.value)
        assert "hpo migrate" in str(refused.value)
        columns = {c["name"] for c in inspect(storage.engine).get_columns("hpo_studies")}
        assert "test_extra" not in columns  # refused, not migrated

        (optuna_result, ours) = migrate(settings, newer)
        assert optuna_result[0].at_head and optuna_result[1].at_head
        assert ours[0].current != "9999" and ours[1].current == "9999"
        prepare_service_schema(storage.engine, newer)  # now accepted
        columns = {c["name"] for c in inspect(storage.engine).get_columns("hpo_studies")}
        assert "test_extra" in columns
    finally:
        storage.engine.dispose()


def test_a_schema_from_a_newer_release_is_refused_and_never_downgraded(
    database_url: str,
) -> None:
    settings = _settings(database_url)
    _make_study(settings)
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = 'from_the_future'"))
    engine.dispose()
    with pytest.raises(SchemaMismatch, match="newer release"):
        create_app(settings)
    with pytest.raises(SchemaMismatch, match="newer release"):
        migrate(settings)
    result = _hpo("migrate", url=database_url)
    assert result.returncode == 2 and "newer release" in result.stdout


def test_an_empty_database_is_set_up_at_start_up(database_url: str) -> None:
    """Creating the schemas on an empty database is not a migration: one command serves."""
    settings = _settings(database_url)
    app = create_app(settings)
    try:
        storage = app.state.service.storage
        status = optuna_schema_status(storage)
        assert status.at_head and status.current == status.head
        with storage.engine.connect() as connection:
            ours = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
        assert ours is not None
    finally:
        app.state.service.storage.engine.dispose()
