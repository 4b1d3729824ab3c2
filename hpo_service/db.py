"""Sessions and migrations for the service's own tables.

SQLAlchemy work happens inside ``session_scope``, which commits, or rolls back and re-raises a
database error as ``StorageUnavailable`` — the one place database errors are translated.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from hpo_service.errors import StorageUnavailable
from hpo_service.schema_status import SchemaStatus, require_head

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "hpo_alembic_version"  # Optuna's history lives in `alembic_version`
_MIGRATION_LOCK = 0x6870_6F00  # pg advisory lock key: two replicas never migrate at once


def _alembic_config(migrations: Path) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations))
    return config


def service_schema_status(engine: Engine, migrations: Path = MIGRATIONS) -> SchemaStatus:
    """Where the ``hpo_*`` tables stand. Raises ``OperationalError`` if the DB is unreachable."""
    script = ScriptDirectory.from_config(_alembic_config(migrations))
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        current = context.get_current_revision()
    head = script.get_current_head()
    assert head is not None, "the service's migrations have exactly one head"
    known = tuple(revision.revision for revision in script.walk_revisions())
    return SchemaStatus("service", current, head, known)


def upgrade_schema(engine: Engine, migrations: Path = MIGRATIONS) -> None:
    """Bring the ``hpo_*`` tables to the newest revision (idempotent). ``hpo migrate`` runs it."""
    config = _alembic_config(migrations)
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Replicas started together on an empty database: one creates, the others then
            # find the tables at head and do nothing.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def prepare_service_schema(engine: Engine, migrations: Path = MIGRATIONS) -> None:
    """At start-up: create the ``hpo_*`` tables on a database that has none (that is not a
    migration), accept them at head, and otherwise refuse.

    Raises ``SchemaMismatch`` naming ``hpo migrate`` when the tables are behind this release,
    or naming the newer release when they are ahead of it.
    """
    status = service_schema_status(engine, migrations)
    if status.current is None:
        upgrade_schema(engine, migrations)
        log.info("created the service's tables at revision %s", status.head)
        return
    require_head(status)


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
