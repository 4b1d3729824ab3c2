"""No trial stays RUNNING without a live lease: whatever instant the database dies at during a
lease, and however many leases die at once (issue 13, items 1 and 7)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import optuna
import optuna.storages._rdb.storage as optuna_rdb
import pytest
from helpers import spec
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

from hpo_service.config import Settings
from hpo_service.errors import StorageUnavailable
from hpo_service.schemas import StudySpec
from hpo_service.studies import StudyService

#: Generous: a dead lease is failed within lease timeout (``LEASE_TIMEOUT_S``) + one reap pass.
SETTLE_BOUND_S = 30.0
#: Shorter than the shared fixture's 1 s (and still above its 0.2 s heartbeat interval, which
#: Settings requires): every cut point waits for its lease to expire, so this wait is most of
#: these tests' time. Leases are aged by the database clock, to the millisecond on both backends.
LEASE_TIMEOUT_S = 0.3
WRITES = ("INSERT", "UPDATE", "DELETE")


@pytest.fixture
def service(settings: Settings) -> Iterator[StudyService]:
    studies = StudyService(settings.model_copy(update={"lease_timeout_s": LEASE_TIMEOUT_S}))
    yield studies
    studies.storage.engine.dispose()


def _writes_of(service: StudyService, call: Any) -> list[str]:
    """The write statements ``call()`` sends, in order."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith(WRITES):
            seen.append(statement.split("(")[0].strip())

    event.listen(service.storage.engine, "before_cursor_execute", record)
    try:
        call()
    finally:
        event.remove(service.storage.engine, "before_cursor_execute", record)
    return seen


class _TimeWithoutBackoff:
    """``time`` as Optuna's RDB storage module sees it, less the sleep before a retry."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(_seconds: float) -> None:
        pass


@contextmanager
def _no_optuna_backoff() -> Iterator[None]:
    """Optuna retries a trial creation that raised (``_create_new_trial``, up to five times) after
    a random 0-2 s sleep, meant to spread out deadlocked writers. Most cut points fall inside
    it, so that sleep was a third of these tests' time; the retry itself still runs, at once.
    Nothing else in that module uses ``time``."""
    real = optuna_rdb.time
    optuna_rdb.time = _TimeWithoutBackoff()  # type: ignore[assignment]
    try:
        yield
    finally:
        optuna_rdb.time = real


def _cut_at(service: StudyService, index: int, call: Any) -> None:
    """Run ``call()`` with the database "dying" at its ``index``-th write statement: that
    statement raises as a dropped connection does; what committed before it stays."""
    count = 0

    def die(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        nonlocal count
        if statement.lstrip().upper().startswith(WRITES):
            count += 1
            if count == index + 1:
                raise OperationalError(statement, {}, Exception("server closed the connection"))

    event.listen(service.storage.engine, "before_cursor_execute", die)
    try:
        with _no_optuna_backoff():
            call()
    except (StorageUnavailable, optuna.exceptions.StorageInternalError, OperationalError):
        pass  # what a worker sees as a 503; it moves on
    finally:
        event.remove(service.storage.engine, "before_cursor_execute", die)


def _running(service: StudyService, name: str) -> int:
    return service.get_study(name).counts.running


def _settle(service: StudyService, name: str) -> bool:
    """Reap (as the server's reaper does) until no trial of ``name`` runs, within the bound."""
    deadline = time.monotonic() + SETTLE_BOUND_S
    while time.monotonic() < deadline:
        service.reap()
        if _running(service, name) == 0:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("source", ["sampled", "enqueued"])
def test_a_lease_cut_off_at_any_write_leaves_no_trial_running(
    service: StudyService, source: str
) -> None:
    def study(name: str) -> StudySpec:
        body = spec(name, budget={"n_trials": 3, "max_concurrent": 3}, max_retries=1)
        created = StudySpec.model_validate(body)
        if source == "enqueued":  # the lease pops a WAITING trial instead of sampling one
            service.create_study(created, enqueue=[{}])
        else:
            service.create_study(created)
        return created

    study("probe")
    writes = _writes_of(service, lambda: service.lease("probe-worker"))
    assert any("trials" in w for w in writes), writes
    assert len(writes) >= 3, writes
    service.set_state("probe", "stopped")  # leases now come from the study under test
    for index in range(len(writes)):
        name = f"cut-{index}"
        study(name)
        _cut_at(service, index, lambda i=index: service.lease(f"dying-{i}"))
        assert _settle(service, name), (
            f"a trial of {name} is still RUNNING {SETTLE_BOUND_S:.0f} s after the database died "
            f"at write {index} of the lease ({writes[index]})"
        )
        service.delete_study(name)


def test_one_reap_pass_fails_fifty_dead_leases_with_a_fixed_number_of_lease_queries(
    service: StudyService, caplog: pytest.LogCaptureFixture
) -> None:
    body = spec("mass", budget={"n_trials": 50, "max_concurrent": 50}, max_retries=1)
    body["sampler"] = {"name": "random", "seed": 3}
    service.create_study(StudySpec.model_validate(body))
    leases = [service.lease(f"killed-{i}") for i in range(50)]
    assert all(lease is not None for lease in leases)
    # Past the lease timeout by the database clock; no beat ever came.
    time.sleep(service.settings.lease_timeout_s + 1.5)
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(service.storage.engine, "before_cursor_execute", record)
    try:
        service.reap()  # one pass
    finally:
        event.remove(service.storage.engine, "before_cursor_execute", record)
    counts = service.get_study("mass").counts
    assert (counts.running, counts.fail, counts.waiting) == (0, 50, 50)
    ours = [s for s in statements if "hpo_leases" in s or "hpo_studies" in s]
    # The stale set in one query and its marking in one statement, not a round trip per lease
    # (two per lease before: 100+ for 50).
    assert len(ours) <= 8, ours
    assert service.reaped_leases == 50
    # each is logged as what it was, an expired lease with its worker (not "without a lease")
    reaped = [r for r in caplog.records if getattr(r, "event", None) == "lease_reaped"]
    assert len(reaped) == 50
    assert all("lease expired" in r.getMessage() for r in reaped)
    assert {getattr(r, "worker_id", None) for r in reaped} == {f"killed-{i}" for i in range(50)}


def test_a_reap_pass_cut_off_at_any_write_leaves_no_trial_running(service: StudyService) -> None:
    """The pass marks expired leases reaped in one commit, then fails their trials under each
    study's lock: a pass that dies in between left a RUNNING trial whose lease was already
    marked, which no later pass picked up (neither expired nor lease-less)."""

    def expired_lease(name: str) -> None:
        service.create_study(StudySpec.model_validate(spec(name, max_retries=1)))
        assert service.lease(f"{name}-worker") is not None
        time.sleep(service.settings.lease_timeout_s + 0.2)  # past the lease timeout: a bound

    expired_lease("probe")
    writes = _writes_of(service, service.reap)
    assert _running(service, "probe") == 0 and len(writes) >= 2, writes
    service.delete_study("probe")
    for index in range(len(writes)):
        name = f"reap-cut-{index}"
        expired_lease(name)
        _cut_at(service, index, service.reap)
        assert _settle(service, name), (
            f"a trial of {name} is still RUNNING {SETTLE_BOUND_S:.0f} s after the database died "
            f"at write {index} of a reap pass ({writes[index]})"
        )
        info = service.get_study(name)
        assert info.counts.fail == 1 and info.counts.waiting == 1, info.counts  # one retry
        service.delete_study(name)
