"""The service's exception hierarchy. Domain code raises these; ``api/errors.py`` maps them to
HTTP status codes in one place.

    HPOError
    ├── InvalidSpec            a study spec or request that cannot be honoured (422)
    │   └── InvalidValue       a reported or final objective value that is NaN or infinite
    ├── NotFound               (404)
    │   ├── StudyNotFound
    │   ├── TrialNotFound
    │   ├── CheckpointNotFound no checkpoint to resume a retry from (the worker starts fresh)
    │   ├── TrialNumberNotFound
    │   └── ScheduleNotFound
    ├── Conflict               the request contradicts the current state (409)
    │   ├── StudyExists
    │   ├── LeaseMismatch      wrong lease token for the trial
    │   ├── TrialFinished      the trial already ended (``state``: complete, pruned, fail)
    │   │   └── TrialReaped    its lease expired and the reaper failed it (maybe retried)
    │   ├── ResultConflict     a different result for a trial that already completed
    │   ├── ReportConflict     a different value for an epoch already reported
    │   ├── StudyNotRunning    the study was stopped, cancelled or deleted
    │   ├── WrongLeaseKind     a result route that does not fit the lease's kind
    │   └── ScheduleExists
    ├── AuthError              missing or wrong credentials (401) / scope (403)
    │   └── LeaseRequired      a worker token alone cannot do this: it needs a lease (403)
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


class InvalidValue(InvalidSpec):
    """Raised when an objective value a worker sends (a report's ``value``, ``complete``'s
    ``values``) is NaN or infinite: the run diverged, which ``fail`` with ``diverged`` says."""

    code = "invalid_value"


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


class CheckpointNotFound(NotFound):
    """Raised when a retry asks for the checkpoint to resume from and there is none (never
    stored, deleted, or missing from the artifact store): the worker starts fresh."""

    code = "checkpoint_not_found"


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


class TrialFinished(Conflict):
    """Raised when a heartbeat, report, complete or fail arrives for a trial that already
    ended; ``state`` is how it ended (``complete``, ``pruned``, ``fail``), sent in the body."""

    code = "trial_finished"

    def __init__(self, message: str, state: str) -> None:
        super().__init__(message)
        self.state = state


class TrialReaped(TrialFinished):
    """Raised when a call arrives for a trial whose lease expired and that the reaper failed
    (a retry with the same parameters was queued if retries remained)."""

    code = "trial_reaped"

    def __init__(self, message: str) -> None:
        super().__init__(message, "fail")


class ResultConflict(Conflict):
    """Raised when a trial that already completed is sent different values."""

    code = "result_conflict"


class ReportConflict(Conflict):
    """Raised when an epoch already reported is reported again with a different value (the
    first value stands; the same value again is an idempotent repeat)."""

    code = "report_conflict"


class StudyNotRunning(Conflict):
    code = "study_not_running"


class WrongLeaseKind(Conflict):
    """Raised when a lease's result is sent to the route of another kind (an LR range test's
    curve to ``complete``, a trial's values to ``lr-range-test``)."""

    code = "wrong_lease_kind"


class AuthError(HPOError):
    code = "unauthorized"

    def __init__(self, message: str, *, forbidden: bool = False) -> None:
        super().__init__(message)
        self.forbidden = forbidden
        if forbidden:
            self.code = "forbidden"


class LeaseRequired(AuthError):
    """Raised when a worker token asks for something only the holder of a certain lease may
    have (a trial's best model: a live ``final_evaluation`` lease naming that trial)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, forbidden=True)
        self.code = "lease_required"


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
