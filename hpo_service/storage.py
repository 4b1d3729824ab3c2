"""Builds the one Optuna ``RDBStorage`` the service uses; engine options live here only.

The storage's engine is shared with the service's own tables, so there is one connection pool.
Lease liveness is the service's own (``hpo_leases.beat_at_s`` by the database clock, reaped in
one pass by ``hpo_service.studies``); Optuna's heartbeat settings stay configured for tools that
drive ``Study.optimize`` on the same storage, but the service no longer writes Optuna's heartbeat
table (its heartbeats never covered ask/tell trials, see OPTUNA5_NOTES.md).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import sqlite3
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial
from sqlalchemy import exc as sa_exc
from sqlalchemy.exc import OperationalError

from hpo_service.config import Settings
from hpo_service.errors import StorageUnavailable
from hpo_service.schema_status import MIGRATE_HINT, SchemaStatus, require_head

log = logging.getLogger(__name__)

#: Exceptions that mean "the database did not do it", whatever the backend said: the API
#: answers them 503 (``api/errors.py``). Integrity and data errors are not here: they are bugs
#: or bad input, not an outage.
STORAGE_ERRORS: tuple[type[Exception], ...] = (
    StorageUnavailable,
    optuna.exceptions.StorageInternalError,
    sa_exc.OperationalError,  # connection refused or lost, disk full, read-only, locked
    sa_exc.InterfaceError,  # a connection closed under the driver
    sa_exc.InternalError,  # e.g. "current transaction is aborted" after a lost connection
    sa_exc.PendingRollbackError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,  # the connection pool stayed exhausted
    sqlite3.OperationalError,
)

StaleCallback = Callable[[optuna.Study, FrozenTrial], None]


def engine_options(settings: Settings) -> dict[str, Any]:
    if settings.is_sqlite:
        # One writer process; wait for a lock instead of failing fast.
        return {"connect_args": {"timeout": 30, "check_same_thread": False}}
    return {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        "pool_pre_ping": True,  # drop connections a database restart left dead
        # Fail a connection attempt to an unreachable host in seconds, not the OS's minutes,
        # so start-up retries and /readyz answer promptly.
        "connect_args": {"connect_timeout": 10},
    }


def use_wal(engine: sqlalchemy.Engine, synchronous: str) -> None:
    """Put a SQLite engine's connections in WAL mode with ``synchronous`` (normal|full).

    In the default rollback-journal mode every commit creates, syncs and deletes a journal file
    (0.8 ms here, two to three per report) and a reader blocks the writer; in WAL mode a
    commit appends to the log (0.01 ms with ``normal``, 0.27 ms with ``full``) and readers —
    the dashboard, a user's ``optuna.load_study`` — read beside it. WAL needs the file on a
    local disk (not NFS), as SQLite's locking already does. Connections opened before this
    call are dropped so every later one gets the pragmas.
    """
    if engine.dialect.name != "sqlite":
        return

    def pragmas(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # persistent in the file; a no-op after once
        cursor.execute(f"PRAGMA synchronous={synchronous.upper()}")
        cursor.close()

    sqlalchemy.event.listen(engine, "connect", pragmas)
    engine.dispose()


def optuna_schema_status(storage: optuna.storages.RDBStorage) -> SchemaStatus:
    """Where Optuna's tables stand, through ``RDBStorage``'s public version API."""
    return SchemaStatus(
        "Optuna",
        storage.get_current_version(),
        storage.get_head_version(),
        tuple(storage.get_all_versions()),
    )


def _has_optuna_tables(settings: Settings) -> bool:
    """Whether Optuna has set this database up before (its ``version_info`` table exists)."""
    engine = sqlalchemy.create_engine(settings.database_url, **engine_options(settings))
    try:
        return sqlalchemy.inspect(engine).has_table("version_info")
    finally:
        engine.dispose()


def _connect(
    settings: Settings, on_stale: StaleCallback | None, check_schema: bool
) -> optuna.storages.RDBStorage:
    existing = _has_optuna_tables(settings)
    with warnings.catch_warnings():
        # heartbeat_interval is flagged experimental; we rely on documented behaviour.
        warnings.simplefilter("ignore", ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            settings.database_url,
            engine_kwargs=engine_options(settings),
            # We check the schema ourselves (below) to name our own command. On an existing
            # database Optuna must not create tables either: a table created ahead of its
            # migration makes the later `optuna storage upgrade` fail.
            skip_compatibility_check=True,
            skip_table_creation=existing,
            heartbeat_interval=max(1, math.ceil(settings.heartbeat_interval_s)),
            grace_period=max(1, math.ceil(settings.lease_timeout_s)),
            heartbeat_stale_trial_callback=on_stale,
        )
    use_wal(storage.engine, settings.sqlite_synchronous)
    if check_schema:
        hint = (
            f"{MIGRATE_HINT} (for Optuna's tables alone: `optuna storage upgrade "
            f"--storage {settings.database_url_redacted}`)"
        )
        try:
            require_head(optuna_schema_status(storage), hint)
        except BaseException:
            storage.engine.dispose()
            raise
    return storage


def build_storage(
    settings: Settings, on_stale: StaleCallback | None = None, *, check_schema: bool = True
) -> optuna.storages.RDBStorage:
    """Connect, retrying while the database comes up (``RDBStorage()`` has no retry of its own).

    An empty database gets Optuna's tables; an existing one must already be at Optuna's head
    schema unless ``check_schema`` is off (``hpo migrate`` turns it off to upgrade).
    Raises the last ``OperationalError`` after ``db_connect_retries`` attempts, and
    ``SchemaMismatch`` naming the upgrade command for an old schema.
    """
    attempts = settings.db_connect_retries + 1
    for attempt in range(1, attempts + 1):
        try:
            return _connect(settings, on_stale, check_schema)
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


#: Bytes the readiness probe writes (and removes) beside a SQLite file: a few pages' worth, so
#: a disk too full for the next commit reads as not ready.
WRITE_PROBE_BYTES = 64 * 1024


def write_refusal(storage: optuna.storages.RDBStorage) -> str | None:
    """Why the database would refuse a write now, or None if it would take one.

    Writes no row, so a probe a second costs the database nothing. SQLite: the file and its
    folder must be writable and the folder's filesystem must take ``WRITE_PROBE_BYTES`` (a file
    written, synced and removed: catches a full disk and a read-only mount, which SQLite itself
    reports only at the next commit). PostgreSQL: the server must not be a read-only standby
    or in a read-only transaction mode (a full disk there shows only as failed writes, 503).
    Raises ``SQLAlchemyError`` if the database cannot be reached at all.
    """
    url = storage.engine.url
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            return None
        return _sqlite_file_refusal(Path(url.database))
    with storage.engine.connect() as connection:
        in_recovery, read_only = connection.execute(
            sqlalchemy.text("SELECT pg_is_in_recovery(), current_setting('transaction_read_only')")
        ).one()
    if in_recovery:
        return "read-only (a standby in recovery)"
    if read_only == "on":
        return "read-only (default_transaction_read_only)"
    return None


def _sqlite_file_refusal(path: Path) -> str | None:
    try:
        # Open for writing without changing a byte: EROFS / EACCES if it cannot be written.
        os.close(os.open(path, os.O_WRONLY))
        fd, probe = tempfile.mkstemp(prefix=".hpo-write-probe-", dir=path.parent)
        try:
            os.write(fd, b"\0" * WRITE_PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as error:
        log.warning("readiness: the SQLite file refuses writes: %s", error)
        reason = {
            errno.ENOSPC: "disk full",
            errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only filesystem",
            errno.EACCES: "not writable",
            errno.EPERM: "not writable",
        }.get(error.errno or 0, type(error).__name__)
        return reason
    return None
