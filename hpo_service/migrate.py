"""``hpo migrate``: bring both schema histories of a database to this release's heads.

The server refuses to start on an old schema (see ``schema_status``); this is the one step that
changes an existing schema, run on purpose (the compose ``migrate`` service, or by hand with the
servers stopped). Optuna's tables are upgraded through Optuna's own API, exactly what
``optuna storage upgrade`` does; ours through our Alembic history in ``hpo_alembic_version``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hpo_service.config import Settings
from hpo_service.db import MIGRATIONS, service_schema_status, upgrade_schema
from hpo_service.schema_status import SchemaStatus, require_head
from hpo_service.storage import build_storage, optuna_schema_status

log = logging.getLogger(__name__)


def migrate(
    settings: Settings, migrations: Path = MIGRATIONS
) -> list[tuple[SchemaStatus, SchemaStatus]]:
    """Upgrade Optuna's schema, then ours. Returns (before, after) for each history.

    Raises ``SchemaMismatch`` if a schema is newer than this release (never downgraded), and
    ``OperationalError`` if the database stays unreachable through the start-up retries.
    """
    storage = build_storage(settings, check_schema=False)
    try:
        optuna_before = optuna_schema_status(storage)
        if optuna_before.newer_than_code:
            require_head(optuna_before)  # raises, naming the newer release
        if not optuna_before.at_head:
            log.info(
                "upgrading Optuna's schema %s -> %s", optuna_before.current, optuna_before.head
            )
            storage.upgrade()
        optuna_after = optuna_schema_status(storage)

        ours_before = service_schema_status(storage.engine, migrations)
        if ours_before.newer_than_code:
            require_head(ours_before)
        if not ours_before.at_head:
            log.info("upgrading the service schema %s -> %s", ours_before.current, ours_before.head)
            upgrade_schema(storage.engine, migrations)
        ours_after = service_schema_status(storage.engine, migrations)
    finally:
        storage.engine.dispose()
    return [(optuna_before, optuna_after), (ours_before, ours_after)]
