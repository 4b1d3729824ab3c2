"""Readiness: the database answers and both schema histories are at this release's heads."""

from __future__ import annotations

import logging

import optuna
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from hpo_service.db import service_schema_status
from hpo_service.storage import optuna_schema_status

log = logging.getLogger(__name__)


def readiness(storage: optuna.storages.RDBStorage) -> tuple[bool, dict[str, str]]:
    """(ready, a reason per check). Never raises; an unreachable database is a reason.

    Reasons name no host or credentials: ``/readyz`` is unauthenticated (load balancers).
    """
    try:
        with storage.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        statuses = (optuna_schema_status(storage), service_schema_status(storage.engine))
    except SQLAlchemyError as error:
        log.warning("readiness: database check failed: %s", error)
        return False, {"database": f"unreachable ({type(error).__name__})"}
    checks = {"database": "ok"}
    for status in statuses:
        checks[f"{status.schema.lower()}_schema"] = "ok" if status.at_head else status.describe()
    return all(status.at_head for status in statuses), checks
