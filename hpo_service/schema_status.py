"""Where a database's two schema histories stand, and the start-up gate built on that.

One database holds two Alembic histories: Optuna's (table ``alembic_version``, read through
``RDBStorage``'s public version API) and the service's own ``hpo_*`` tables (table
``hpo_alembic_version``). The server refuses to start unless both are at the head this
installation ships; it never migrates an existing database by itself. ``hpo migrate`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpo_service.errors import SchemaMismatch

MIGRATE_HINT = "run `hpo migrate` against this database (with the server stopped), then start again"


@dataclass(frozen=True)
class SchemaStatus:
    """One schema history: the revision the database is at and the one the code needs."""

    schema: str  # "Optuna" or "service"
    current: str | None  # None: the database has no tables of this history yet
    head: str
    known: tuple[str, ...]  # every revision this installation knows, newest first

    @property
    def at_head(self) -> bool:
        return self.current == self.head

    @property
    def newer_than_code(self) -> bool:
        """Stamped by a newer release: no migration we ship can reach it."""
        return self.current is not None and self.current not in self.known

    def describe(self) -> str:
        if self.at_head:
            return f"{self.schema} schema at {self.head}"
        return f"{self.schema} schema at {self.current or 'no revision'}, needs {self.head}"


def require_head(status: SchemaStatus, upgrade_hint: str = MIGRATE_HINT) -> None:
    """Raise ``SchemaMismatch`` unless ``status`` is at head, naming the command that fixes it."""
    if status.at_head:
        return
    if status.newer_than_code:
        remedy = (
            f"revision {status.current} comes from a newer release; install the release that "
            "migrated this database (downgrading a schema is not supported)"
        )
    else:
        remedy = upgrade_hint
    raise SchemaMismatch(status.schema, status.current, status.head, remedy)
