"""Sessions and migrations for the service's own tables.

SQLAlchemy work happens inside ``session_scope``, which commits, or rolls back and re-raises a
database error as ``StorageUnavailable`` — the one place database errors are translated.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from hpo_service.errors import StorageUnavailable

MIGRATIONS = Path(__file__).parent / "migrations"


def upgrade_schema(engine: Engine) -> None:
    """Bring the ``hpo_*`` tables to the newest revision (idempotent)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class Database:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on any error."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except OperationalError as error:
            session.rollback()
            raise StorageUnavailable(f"database error: {error.orig}") from error
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()
