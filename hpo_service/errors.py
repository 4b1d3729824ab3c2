"""The service's exception hierarchy. Domain code raises these; ``api/errors.py`` maps them to
HTTP status codes in one place.

    HPOError
    ├── InvalidSpec            a study spec or request that cannot be honoured (422)
    ├── NotFound               (404)
    │   ├── StudyNotFound
    │   ├── TrialNotFound
    │   ├── TrialNumberNotFound
    │   └── ScheduleNotFound
    ├── Conflict               the request contradicts the current state (409)
    │   ├── StudyExists
    │   ├── LeaseMismatch      wrong lease token for the trial
    │   ├── TrialReaped        the lease expired and the trial was failed (and maybe retried)
    │   ├── ResultConflict     a different result for a trial that already finished
    │   ├── StudyNotRunning    the study was stopped, cancelled or deleted
    │   └── ScheduleExists
    ├── AuthError              missing or wrong credentials (401) / scope (403)
    ├── ReadOnly               a write through a read-only view, e.g. the dashboard (405)
    ├── StorageUnavailable     the database could not be reached (503)
    └── SchemaMismatch         the database schema is not the one this version needs
                               (raised at start-up; `hpo migrate` upgrades it)
"""

from __future__ import annotations


class HPOError(Exception):
    """Root of every error the service raises on purpose."""

    code = "hpo_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidSpec(HPOError):
    """Raised when a spec or request names a field with a value the service cannot use."""

    code = "invalid_spec"

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"`{field}`: {reason}")
        self.field = field
        self.reason = reason


class NotFound(HPOError):
    code = "not_found"


class StudyNotFound(NotFound):
    code = "study_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"no study named {name!r}")


class TrialNotFound(NotFound):
    code = "trial_not_found"

    def __init__(self, trial_id: int) -> None:
        super().__init__(f"no leased trial with id {trial_id}")


class TrialNumberNotFound(NotFound):
    code = "trial_not_found"

    def __init__(self, study: str, number: int) -> None:
        super().__init__(f"study {study!r} has no trial number {number}")


class Conflict(HPOError):
    code = "conflict"


class StudyExists(Conflict):
    code = "study_exists"

    def __init__(self, name: str) -> None:
        super().__init__(f"a study named {name!r} already exists")


class LeaseMismatch(Conflict):
    code = "lease_mismatch"


class TrialReaped(Conflict):
    """Raised when a result arrives for a trial whose lease expired and that was failed."""

    code = "trial_reaped"


class ResultConflict(Conflict):
    """Raised when a trial that already finished is sent a different result."""

    code = "result_conflict"


class StudyNotRunning(Conflict):
    code = "study_not_running"


class AuthError(HPOError):
    code = "unauthorized"

    def __init__(self, message: str, *, forbidden: bool = False) -> None:
        super().__init__(message)
        self.forbidden = forbidden
        if forbidden:
            self.code = "forbidden"


class ReadOnly(HPOError):
    """Raised when something tries to write through a read-only view (the mounted dashboard)."""

    code = "read_only"


class StorageUnavailable(HPOError):
    code = "storage_unavailable"


class ScheduleNotFound(NotFound):
    code = "schedule_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"no schedule named {name!r}")


class ScheduleExists(Conflict):
    code = "schedule_exists"

    def __init__(self, name: str) -> None:
        super().__init__(f"a schedule named {name!r} already exists")


class SchemaMismatch(HPOError):
    """Raised at start-up when Optuna's or the service's schema is not at the installed head.

    The server never migrates an existing database by itself: the message names the command
    that does (``hpo migrate`` or ``optuna storage upgrade``).
    """

    code = "schema_mismatch"

    def __init__(self, schema: str, current: str | None, head: str, remedy: str) -> None:
        super().__init__(
            f"the {schema} schema of this database is at {current or 'no revision'}, but this "
            f"version needs {head}: {remedy}"
        )
        self.schema = schema
        self.current = current
        self.head = head
