"""Builds the one Optuna ``RDBStorage`` the service uses; engine options live here only.

The storage's engine is shared with the service's own tables, so there is one connection pool.
Heartbeats are enabled so ``optuna.storages.fail_stale_trials`` can reap expired leases; the
service records every heartbeat itself because Optuna's own heartbeat thread only runs inside
``Study.optimize``, never for ask/tell trials (see OPTUNA5_NOTES.md).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial
from sqlalchemy.exc import OperationalError

from hpo_service.config import Settings

log = logging.getLogger(__name__)

StaleCallback = Callable[[optuna.Study, FrozenTrial], None]


def engine_options(settings: Settings) -> dict[str, Any]:
    if settings.is_sqlite:
        # One writer process; wait for a lock instead of failing fast.
        return {"connect_args": {"timeout": 30, "check_same_thread": False}}
    return {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        "pool_pre_ping": True,  # drop connections a database restart left dead
    }


def build_storage(
    settings: Settings, on_stale: StaleCallback | None = None
) -> optuna.storages.RDBStorage:
    """Connect, retrying while the database comes up (``RDBStorage()`` has no retry of its own).

    Raises the last ``OperationalError`` after ``db_connect_retries`` attempts.
    """
    attempts = settings.db_connect_retries + 1
    for attempt in range(1, attempts + 1):
        try:
            with warnings.catch_warnings():
                # heartbeat_interval is flagged experimental; we rely on documented behaviour.
                warnings.simplefilter("ignore", ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    settings.database_url,
                    engine_kwargs=engine_options(settings),
                    heartbeat_interval=max(1, math.ceil(settings.heartbeat_interval_s)),
                    grace_period=max(1, math.ceil(settings.lease_timeout_s)),
                    heartbeat_stale_trial_callback=on_stale,
                )
        except OperationalError:
            if attempt == attempts:
                raise
            delay = min(2.0 ** (attempt - 1), 10.0)
            log.warning(
                "database not reachable (attempt %d/%d); retrying in %.0fs",
                attempt,
                attempts,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")
