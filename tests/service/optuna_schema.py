"""Optuna's own migration history, for tests that need a database at an older Optuna schema."""

from __future__ import annotations

from pathlib import Path

import optuna
from alembic.config import Config


def optuna_alembic(url: str) -> Config:
    """Optuna's Alembic history, configured the way ``RDBStorage`` configures it."""
    package = Path(optuna.storages.__file__).parent / "_rdb"
    config = Config(str(package / "alembic.ini"))
    config.set_main_option("script_location", str(package / "alembic"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config
