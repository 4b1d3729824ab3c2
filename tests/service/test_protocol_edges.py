"""The worker protocol's less-travelled paths, through ``StudyService`` in one process (issue 17).

Written against the survivors of ``scripts/mutation service``: what a lease carries, a study's
timeout, task-only workers, slots, the retry history a retry keeps, what ``complete`` and
``fail`` store, a heartbeat for a deleted study, the reaper's lease-less trials. A lease is aged
by moving its last beat back in the database (the reaper reads only that clock), so no test
waits for a timeout.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import spec
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import TrialState
from sqlalchemy import delete, event, select, update

from hpo_service.artifacts import artifact_id_for, read_artifact
from hpo_service.config import Settings
from hpo_service.errors import (
    InvalidSpec,
    InvalidValue,
    LeaseMismatch,
    ReportConflict,
    ResultConflict,
    TrialFinished,
    TrialReaped,
)
from hpo_service.models import LeaseRow, StudyRow
from hpo_service.schemas import StudySpec
from hpo_service.studies import StudyService
from hpo_service.studies._finishing import TrialFailure, TrialResult
from hpo_service.studies._reporting import EpochReport, finite_metrics

MEDIAN = {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0, "phase_aware": False}


@pytest.fixture
def service(settings: Settings) -> Iterator[StudyService]:
    # Settings unlike their defaults, so a lease that carried a default instead would differ.
    studies = StudyService(
        settings.model_copy(update={"checkpoint_every_epochs": 3, "best_models_kept": 0})
    )
    yield studies
    studies.storage.engine.dispose()


def create(service: StudyService, name: str, **overrides: Any) -> int:
    info = service.create_study(StudySpec.model_validate(spec(name, **overrides)))
    return info.study_id


def events(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


def age_leases(service: StudyService, seconds: float = 3600.0) -> None:
    """Every lease's last beat ``seconds`` earlier: expired for the next reap pass."""
    with service.db.session() as session:
        session.execute(update(LeaseRow).values(beat_at_s=LeaseRow.beat_at_s - seconds))


def test_a_lease_carries_the_server_s_settings_the_study_s_metrics_and_the_device(
    service: StudyService, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    study_id = create(service, "carry", budget={"n_trials": 4, "max_concurrent": 3})
    with caplog.at_level(logging.INFO, logger="hpo_service.studies"):
        lease = service.lease("gpu-7", device="cuda:1")
    assert lease is not None
    [granted] = events(caplog, "lease_granted")
    assert granted.getMessage() == "leased trial 0 of carry to gpu-7"
    assert (granted.study, granted.study_id, granted.trial_id, granted.trial_number) == (  # type: ignore[attr-defined]
        "carry",
        study_id,
        lease.trial_id,
        0,
    )
    assert granted.worker_id == "gpu-7"  # type: ignore[attr-defined]
    assert (lease.kind, lease.study, lease.worker_id) == ("trial", "carry", "gpu-7")
    assert lease.task is None
    assert lease.heartbeat_interval_s == service.settings.heartbeat_interval_s == 0.2
    assert lease.lease_timeout_s == service.settings.lease_timeout_s == 1
    assert lease.checkpoint_every_epochs == 3
    assert lease.keep_best_model is False  # best_models_kept = 0
    assert lease.objective_metrics == ["val_neg_elbo"] and lease.report_metric == "val_neg_elbo"
    assert lease.resume_from is None
    trial = service.storage.get_trial(lease.trial_id)
    assert (trial.number, trial.state) == (lease.trial_number, TrialState.RUNNING)
    assert lease.params == trial.params and lease.params  # the sampled values, as stored
    assert lease.config == trial.user_attrs["config"]
    assert trial.user_attrs["worker_id"] == "gpu-7"
    assert trial.user_attrs["worker_device"] == "cuda:1"
    # The same worker asking again gets the same trial, as it was granted.
    again = service.lease("gpu-7")
    assert again is not None
    assert again.model_dump(exclude={"lease_token"}) == lease.model_dump(exclude={"lease_token"})
    assert again.lease_token == lease.lease_token
    other = service.lease("cpu-0")
    assert other is not None and other.trial_id != lease.trial_id
    assert "worker_device" not in service.storage.get_trial(other.trial_id).user_attrs
    # A server that keeps best models (the default, 5 per study) asks for them.
    keeping = StudyService(settings)
    try:
        kept = keeping.lease("cpu-1")
        assert kept is not None and kept.keep_best_model is True
    finally:
        keeping.storage.engine.dispose()


def test_a_batch_fills_the_study_served_longest_ago_first_then_the_next(
    service: StudyService,
) -> None:
    create(service, "first", budget={"n_trials": 3, "max_concurrent": 3})
    create(service, "second", budget={"n_trials": 3, "max_concurrent": 3})
    leases = service.lease_many("w", 4)
    assert [(lease.study, lease.trial_number) for lease in leases] == [
        ("first", 0),
        ("first", 1),
        ("first", 2),
        ("second", 0),
    ]
    for lease in leases:  # each number and id is the one the database holds
        study_id = service.get_study(lease.study).study_id
        trial = service.storage.get_trial(lease.trial_id)
        assert trial.number == lease.trial_number
        assert (
            service.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            == lease.trial_id
        )
    # "first" was served longest ago but is full (budget and cap): the next comes from "second"
    nxt = service.lease("x")
    assert nxt is not None and (nxt.study, nxt.trial_number) == ("second", 1)


def test_a_study_past_its_timeout_stops_and_hands_out_nothing(
    service: StudyService, caplog: pytest.LogCaptureFixture
) -> None:
    study_id = create(service, "late", budget={"n_trials": 5, "max_concurrent": 5, "timeout_s": 60})
    create(service, "in-time", budget={"n_trials": 5, "max_concurrent": 5, "timeout_s": 3600})
    early = service.lease("early")  # within its minute
    assert early is not None and early.study == "late"
    with service.db.session() as session:  # created two minutes ago
        row = session.get(StudyRow, study_id)
        assert row is not None
        row.created_at = row.created_at - datetime.timedelta(seconds=120)
    with caplog.at_level(logging.INFO, logger="hpo_service.studies"):
        leases = service.lease_many("w", 6)  # "in-time" fills 5, then "late" is asked
    assert "study late reached its timeout; no new trials" in caplog.messages
    assert [lease.study for lease in leases] == ["in-time"] * 5
    assert service.get_study("late").state == "stopped"
    assert service.get_study("in-time").state == "running"


def test_a_worker_that_runs_only_tasks_gets_no_trial(service: StudyService) -> None:
    # long-polling with no study at all: waits, then answers nothing
    assert service.lease("early", wait_s=0.12) is None
    create(service, "tasks")
    assert service.lease("evaluator", kinds=("final_evaluation",)) is None
    assert service.get_study("tasks").counts.running == 0
    assert service.lease("trainer", kinds=("trial", "final_evaluation")) is not None


def test_a_cancelled_study_gives_a_returning_worker_nothing_back(service: StudyService) -> None:
    create(service, "gone")
    assert service.lease("w") is not None
    service.set_state("gone", "cancelled")
    assert service.lease("w") is None


def test_slots_hold_one_lease_each_and_a_free_slot_is_refilled(service: StudyService) -> None:
    create(service, "pop", budget={"n_trials": 6, "max_concurrent": 3})
    first = service.lease_many("pop-worker", 3, slots=["a", "b", "c"])
    assert [lease.worker_id for lease in first] == ["a", "b", "c"]
    assert len({lease.trial_id for lease in first}) == 3
    b = first[1]
    service.complete(b.trial_id, b.lease_token, [1.0], {})
    again = service.lease_many("pop-worker", 3, slots=["a", "b", "c"])
    by_slot = {lease.worker_id: lease for lease in again}
    assert set(by_slot) == {"a", "b", "c"}
    assert by_slot["a"].trial_id == first[0].trial_id  # still training: its own trial back
    assert by_slot["c"].lease_token == first[2].lease_token
    assert by_slot["b"].trial_id not in {lease.trial_id for lease in first}  # refilled
    assert service.get_study("pop").counts.running == 3


def test_a_retry_keeps_the_parameters_and_its_history_within_max_retries(
    service: StudyService, caplog: pytest.LogCaptureFixture
) -> None:
    create(service, "retry", max_retries=2, budget={"n_trials": 1, "max_concurrent": 1})
    service.enqueue("retry", [{"base_lr": 0.0005, "batch_size": 64}])
    numbers: list[int] = []
    for attempt in range(3):
        lease = service.lease(f"w{attempt}")
        assert lease is not None
        numbers.append(lease.trial_number)
        trial = service.storage.get_trial(lease.trial_id)
        assert trial.params["base_lr"] == 0.0005 and trial.params["batch_size"] == 64
        assert trial.user_attrs["enqueued"] is True  # kept through each retry
        if attempt:
            assert trial.user_attrs["retry_history"] == numbers[:-1]
            assert trial.system_attrs["failed_trial"] == numbers[0]
            assert trial.system_attrs["retry_history"] == numbers[:-1]
        with caplog.at_level(logging.INFO, logger="hpo_service.studies"):
            answer = service.fail(lease.trial_id, lease.lease_token, "x" * 3000, retryable=True)
        assert answer.state == "fail"
        failed = service.storage.get_trial(lease.trial_id)
        assert failed.state == TrialState.FAIL
        assert failed.user_attrs["fail_reason"] == "x" * 2000  # bounded
        if attempt < 2:
            assert answer.retry_trial_number == lease.trial_number + 1
        else:  # two retries spent: the third failure is final
            assert answer.retry_trial_number is None
    queued = events(caplog, "retry_queued")
    assert [r.getMessage() for r in queued] == [
        "trial 0 of retry queued again as trial 1",
        "trial 1 of retry queued again as trial 2",
    ]
    assert [r.trial_number for r in queued] == [0, 1]  # type: ignore[attr-defined]
    assert "trial 2 of retry failed for good after 2 retries" in caplog.messages
    info = service.get_study("retry")
    assert (info.counts.fail, info.counts.waiting, info.counts.running) == (3, 0, 0)
    assert service.lease("w") is None


def test_a_fail_that_is_not_retryable_or_in_a_stopped_study_queues_nothing(
    service: StudyService,
) -> None:
    create(service, "final", budget={"n_trials": 4, "max_concurrent": 2})
    first, second = service.lease("a"), service.lease("b")
    assert first is not None and second is not None
    assert service.fail(first.trial_id, first.lease_token, "bug", False).retry_trial_number is None
    service.set_state("final", "stopped")
    stopped = service.fail(second.trial_id, second.lease_token, "OOM", True)
    assert stopped.retry_trial_number is None and stopped.state == "fail"
    assert service.get_study("final").counts.waiting == 0


def test_complete_stores_finite_metrics_and_the_output_tail_and_checks_the_values(
    service: StudyService,
) -> None:
    create(service, "done", budget={"n_trials": 2, "max_concurrent": 2})
    lease = service.lease("w")
    assert lease is not None
    with pytest.raises(InvalidSpec) as wrong:
        service.complete(lease.trial_id, lease.lease_token, [1.0, 2.0], {})
    assert wrong.value.field == "values" and "1 objective(s)" in wrong.value.reason
    with pytest.raises(InvalidValue) as infinite:
        service.complete(lease.trial_id, lease.lease_token, [float("inf")], {})
    assert infinite.value.field == "values"
    metrics = {"kl": float("inf"), "curve": [1.0, float("nan")], "n": 3}
    answer = service.complete(lease.trial_id, lease.lease_token, [5.0], metrics, output_tail="ok")
    assert (answer.state, answer.values, answer.trial_number) == ("complete", [5.0], 0)
    trial = service.storage.get_trial(lease.trial_id)
    assert trial.values == [5.0]
    assert trial.user_attrs["metrics"] == {"kl": None, "curve": [1.0, None], "n": 3}
    assert trial.user_attrs["output_tail"] == "ok"
    assert service.core.known_running(lease.trial_id) is None  # only running trials are held
    with pytest.raises(ResultConflict, match="with a different result; the first result stands"):
        service.complete(lease.trial_id, lease.lease_token, [4.0], {})
    other = service.lease("v")
    assert other is not None
    service.complete(other.trial_id, other.lease_token, [6.0], {})
    assert "output_tail" not in service.storage.get_trial(other.trial_id).user_attrs


def test_fail_stores_the_output_tail_and_a_pruned_fail_is_told_pruned(
    service: StudyService, caplog: pytest.LogCaptureFixture
) -> None:
    study_id = create(service, "tails", budget={"n_trials": 2, "max_concurrent": 2})
    failed, pruned = service.lease("a"), service.lease("b")
    assert failed is not None and pruned is not None
    with caplog.at_level(logging.INFO, logger="hpo_service.studies"):
        service.fail(failed.trial_id, failed.lease_token, "boom", False, output_tail="Traceback")
        service.fail(pruned.trial_id, pruned.lease_token, "at epoch 3", False, pruned=True)
    [told_failed] = events(caplog, "trial_failed")
    [told_pruned] = events(caplog, "trial_pruned")
    assert told_failed.getMessage() == "trial 0 of tails failed: boom"
    assert told_pruned.getMessage() == "trial 1 of tails pruned: at epoch 3"
    for record, lease in ((told_failed, failed), (told_pruned, pruned)):
        assert record.study_id == study_id  # type: ignore[attr-defined]
        assert record.trial_id == lease.trial_id  # type: ignore[attr-defined]
    assert service.storage.get_trial(failed.trial_id).user_attrs["output_tail"] == "Traceback"
    assert service.core.known_running(failed.trial_id) is None  # only running trials are held
    answer = service.fail(pruned.trial_id, pruned.lease_token, "again", False, pruned=True)
    assert (answer.state, answer.retry_trial_number) == ("pruned", None)
    trial = service.storage.get_trial(pruned.trial_id)
    assert trial.state == TrialState.PRUNED and "fail_reason" not in trial.user_attrs
    # A repeated fail reads the first answer, whatever it asks for now.
    again = service.fail(pruned.trial_id, pruned.lease_token, "other", True)
    assert again == answer
    with pytest.raises(TrialFinished) as late:
        service.complete(pruned.trial_id, pruned.lease_token, [1.0], {})
    assert late.value.state == "pruned"


def test_finite_metrics_clears_non_finite_floats_at_any_depth_of_a_list() -> None:
    cleaned = finite_metrics({"a": float("-inf"), "b": [float("nan"), 2.5], "c": "text", "d": 4})
    assert cleaned == {"a": None, "b": [None, 2.5], "c": "text", "d": 4}


def test_reports_store_metrics_and_values_and_prune_only_on_a_value(
    service: StudyService,
) -> None:
    create(service, "rep", budget={"n_trials": 3, "max_concurrent": 1}, pruner=MEDIAN)
    good = service.lease("w")
    assert good is not None
    for epoch in (1, 2):
        answer = service.report(good.trial_id, good.lease_token, epoch, 100.0 - epoch, {"kl": 1.0})
        assert answer.action == "continue"
    trial = service.storage.get_trial(good.trial_id)
    assert trial.intermediate_values == {1: 99.0, 2: 98.0}
    assert trial.user_attrs["metrics"] == {"epoch": 2, "kl": 1.0}
    with pytest.raises(ReportConflict, match="epoch 2 of trial 0 was already reported"):
        service.report(good.trial_id, good.lease_token, 2, 50.0, {})
    service.complete(good.trial_id, good.lease_token, [98.0], {})
    bad = service.lease("w")
    assert bad is not None
    # No value: nothing to prune on, metrics still stored.
    none = service.report(bad.trial_id, bad.lease_token, 1, None, {"kl": float("nan")})
    assert (none.action, none.reason) == ("continue", None)
    trial = service.storage.get_trial(bad.trial_id)
    assert trial.intermediate_values == {}
    assert trial.user_attrs["metrics"] == {"epoch": 1, "kl": None}
    pruned = service.report(bad.trial_id, bad.lease_token, 2, 500.0, {})
    assert (pruned.action, pruned.reason) == ("prune", "pruned at epoch 2")
    assert service.storage.get_trial(bad.trial_id).state == TrialState.PRUNED


def test_reports_in_a_new_process_read_the_trial_and_follow_on(
    service: StudyService, settings: Settings
) -> None:
    """A second service (another replica, or this one restarted) has not seen the trial: its
    first report re-reads it, and a report that skips an epoch re-reads it too."""
    create(service, "replica", pruner=MEDIAN)
    lease = service.lease("w")
    assert lease is not None
    service.report(lease.trial_id, lease.lease_token, 1, 10.0, {})
    other = StudyService(settings)
    try:
        assert other.heartbeat(lease.trial_id, lease.lease_token).action == "continue"
        assert other.report(lease.trial_id, lease.lease_token, 2, 9.0, {}).action == "continue"
        with pytest.raises(ReportConflict):  # epoch 1 as the first process stored it
            other.report(lease.trial_id, lease.lease_token, 1, 11.0, {})
        # the first process skips to epoch 4: it re-reads and sees epoch 2 from the other one
        service.report(lease.trial_id, lease.lease_token, 4, 8.0, {})
        with pytest.raises(ReportConflict):
            service.report(lease.trial_id, lease.lease_token, 2, 1.0, {})
        trial = service.storage.get_trial(lease.trial_id)
        assert trial.intermediate_values == {1: 10.0, 2: 9.0, 4: 8.0}
        third = StudyService(settings)  # has never seen the trial: tells it through Optuna
        try:
            assert third.complete(lease.trial_id, lease.lease_token, [8.0], {}).values == [8.0]
        finally:
            third.storage.engine.dispose()
        assert service.storage.get_trial(lease.trial_id).values == [8.0]
        with pytest.raises(TrialFinished) as late:
            other.report(lease.trial_id, lease.lease_token, 5, 7.0, {})
        assert late.value.state == "complete"
    finally:
        other.storage.engine.dispose()


def test_a_report_or_heartbeat_of_a_deleted_or_cancelled_study_says_stop(
    service: StudyService,
) -> None:
    create(service, "cancel")
    create(service, "delete")
    cancelled, deleted = service.lease("a"), service.lease("b")  # one of each (fairness)
    assert cancelled is not None and deleted is not None
    assert (cancelled.study, deleted.study) == ("cancel", "delete")
    beats = service.heartbeat_many(
        [(cancelled.trial_id, cancelled.lease_token), (deleted.trial_id, deleted.lease_token)]
    )
    assert [getattr(b, "action", None) for b in beats] == ["continue", "continue"]
    service.set_state("cancel", "cancelled")
    with service.db.session() as session:  # the study row gone, its lease kept
        session.execute(delete(StudyRow).where(StudyRow.name == "delete"))
    beats = service.heartbeat_many(
        [(cancelled.trial_id, cancelled.lease_token), (deleted.trial_id, deleted.lease_token)]
    )
    assert [(b.action, b.reason) for b in beats] == [  # type: ignore[union-attr]
        ("stop", "study cancelled"),
        ("stop", "study deleted"),
    ]
    report = service.report(cancelled.trial_id, cancelled.lease_token, 1, 5.0, {})
    assert (report.action, report.reason) == ("stop", "study cancelled")


def test_a_batch_naming_one_trial_twice_handles_its_reports_in_order(
    service: StudyService,
) -> None:
    create(service, "twice")
    lease = service.lease("w")
    assert lease is not None
    answers = service.report_many(
        [
            EpochReport(lease.trial_id, lease.lease_token, 1, 3.0, {}),
            EpochReport(lease.trial_id, lease.lease_token, 1, 4.0, {}),
            EpochReport(lease.trial_id, lease.lease_token, 2, 2.0, {}),
        ]
    )
    assert getattr(answers[0], "action", None) == "continue"
    assert isinstance(answers[1], ReportConflict)
    assert getattr(answers[2], "action", None) == "continue"
    assert service.storage.get_trial(lease.trial_id).intermediate_values == {1: 3.0, 2: 2.0}


def test_batched_finishing_answers_each_item_alone(service: StudyService) -> None:
    create(service, "batched", budget={"n_trials": 4, "max_concurrent": 4}, max_retries=1)
    a, b, c = service.lease_many("w", 3)
    completes = service.complete_many(
        [
            TrialResult(a.trial_id, a.lease_token, [1.0], {}, output_tail="tail-a"),
            TrialResult(b.trial_id, "forged", [2.0], {}),
        ]
    )
    assert getattr(completes[0], "values", None) == [1.0]
    assert isinstance(completes[1], LeaseMismatch)
    assert service.storage.get_trial(a.trial_id).user_attrs["output_tail"] == "tail-a"
    fails = service.fail_many(
        [
            TrialFailure(b.trial_id, b.lease_token, "OOM", retryable=True, output_tail="tail-b"),
            TrialFailure(c.trial_id, c.lease_token, "pruned", pruned=True),
            TrialFailure(a.trial_id, a.lease_token, "late"),
        ]
    )
    assert getattr(fails[0], "retry_trial_number", None) is not None
    assert getattr(fails[1], "state", None) == "pruned"
    assert isinstance(fails[2], TrialFinished) and fails[2].state == "complete"
    assert service.storage.get_trial(b.trial_id).user_attrs["output_tail"] == "tail-b"


def test_the_reaper_fails_expired_and_lease_less_trials_and_retries_only_a_running_study(
    service: StudyService, caplog: pytest.LogCaptureFixture
) -> None:
    create(service, "live", budget={"n_trials": 4, "max_concurrent": 4}, max_retries=1)
    create(service, "halted", budget={"n_trials": 4, "max_concurrent": 4}, max_retries=1)
    granted = [service.lease("a"), service.lease("b"), service.lease("orphan")]
    assert all(lease is not None for lease in granted)
    live_lease, halted_lease, orphan = granted  # one study each, then the first again
    assert live_lease and halted_lease and orphan
    assert (live_lease.study, halted_lease.study, orphan.study) == ("live", "halted", "live")
    leases = {"live": live_lease, "halted": halted_lease}
    with service.db.session() as session:  # a crash between a trial's write and its lease's
        session.execute(delete(LeaseRow).where(LeaseRow.trial_id == orphan.trial_id))
    done = service.lease("done")
    assert done is not None and done.study == "halted"
    finished = service.complete(done.trial_id, done.lease_token, [7.0], {})
    service.set_state("halted", "stopped")
    with caplog.at_level(logging.WARNING, logger="hpo_service.studies"):
        assert service.reap() == 2  # both studies checked; nothing expired yet
    assert [r.getMessage() for r in caplog.records if "trial" in r.getMessage()] == [
        "trial 1 of live: running without a lease; trial failed"
    ]
    caplog.clear()
    assert service.storage.get_trial(leases["live"].trial_id).state == TrialState.RUNNING
    assert service.storage.get_trial(orphan.trial_id).state == TrialState.FAIL
    assert service.reaped_leases == 1
    age_leases(service)
    with caplog.at_level(logging.WARNING, logger="hpo_service.studies"):
        service.reap()
    assert service.reaped_leases == 3
    for lease in leases.values():
        assert service.storage.get_trial(lease.trial_id).state == TrialState.FAIL
    live, halted = service.get_study("live").counts, service.get_study("halted").counts
    assert (live.fail, live.waiting, live.running) == (2, 2, 0)  # both retried
    assert (halted.fail, halted.waiting, halted.running) == (1, 0, 0)  # stopped: no retry
    reaped = events(caplog, "lease_reaped")
    assert sorted(r.getMessage() for r in reaped) == [
        "trial 0 of halted: lease expired; trial failed",
        "trial 0 of live: lease expired; trial failed",
    ]
    ids = {
        "live": service.get_study("live").study_id,
        "halted": service.get_study("halted").study_id,
    }
    assert {(r.study, r.study_id) for r in reaped} == set(ids.items())  # type: ignore[attr-defined]
    # a lease that finished long ago is not the reaper's: its answer stands
    assert service.complete(done.trial_id, done.lease_token, [7.0], {}) == finished
    with pytest.raises(TrialReaped):
        service.complete(leases["live"].trial_id, leases["live"].lease_token, [1.0], {})
    with pytest.raises(TrialReaped):
        service.heartbeat(leases["halted"].trial_id, leases["halted"].lease_token)
    assert service.reap() == 2  # a later pass changes nothing
    assert service.get_study("live").counts.waiting == 2


@pytest.mark.parametrize("finish", ["complete", "pruned"])
def test_a_claim_the_reaper_caught_mid_finish_keeps_its_answer(
    service: StudyService, finish: str
) -> None:
    """A finish whose answer was not recorded (the process died after the tell) leaves its
    claim; the reaper marks the expired lease, sees the trial finished as claimed, and records
    the answer the claim would have, so the worker's retry reads it."""
    create(service, "settle")
    lease = service.lease("w")
    assert lease is not None

    def finish_it() -> Any:
        if finish == "complete":
            return service.complete(lease.trial_id, lease.lease_token, [3.0], {})
        return service.fail(lease.trial_id, lease.lease_token, "pruned", False, pruned=True)

    real = service.finishing._record_answer
    service.finishing._record_answer = lambda *args: None  # type: ignore[method-assign]
    try:
        finish_it()
    finally:
        service.finishing._record_answer = real  # type: ignore[method-assign]
    age_leases(service)
    service.reap()
    assert service.reaped_leases == 0  # finished after all: not counted as reaped
    expected: dict[str, Any] = {"trial_id": lease.trial_id}
    if finish == "complete":
        expected |= {"trial_number": lease.trial_number, "state": "complete", "values": [3.0]}
    else:
        expected |= {"state": "pruned", "retry_trial_number": None}
    with service.db.session() as session:
        row = session.get(LeaseRow, lease.trial_id)
        assert row is not None
        assert (row.outcome, row.answer) == (
            "complete" if finish == "complete" else "fail",
            expected,
        )
    assert finish_it().model_dump(mode="json") == expected
    assert service.get_study("settle").counts.waiting == 0  # no retry of a finished trial


def test_a_claim_left_by_a_dead_process_is_taken_over_only_by_the_same_result(
    service: StudyService,
) -> None:
    """The claimant told Optuna and died before recording its answer: once the claim is older
    than the lease timeout the same result takes it over and gets the answer; another result
    is a conflict and takes nothing over."""
    create(service, "takeover")
    lease = service.lease("w")
    assert lease is not None
    real = service.finishing._record_answer
    service.finishing._record_answer = lambda *args: None  # type: ignore[method-assign]
    try:
        service.complete(lease.trial_id, lease.lease_token, [3.0], {})
    finally:
        service.finishing._record_answer = real  # type: ignore[method-assign]
    age_leases(service)
    with pytest.raises(ResultConflict):
        service.complete(lease.trial_id, lease.lease_token, [4.0], {})
    age_leases(service)
    answer = service.complete(lease.trial_id, lease.lease_token, [3.0], {})
    assert (answer.values, answer.state) == ([3.0], "complete")
    with service.db.session() as session:
        row = session.get(LeaseRow, lease.trial_id)
        assert row is not None and row.outcome == "complete"
    assert service.storage.get_trial(lease.trial_id).values == [3.0]


@pytest.mark.parametrize("finish", ["complete", "fail"])
def test_a_trial_failed_behind_the_service_s_back_is_reaped_for_every_later_call(
    service: StudyService, finish: str
) -> None:
    """The trial ended FAIL in Optuna while its lease was open: the finish releases its claim
    and says reaped, and so does the next try (not a wait on a claim nobody holds)."""
    create(service, "behind")
    lease = service.lease("w")
    assert lease is not None
    service.storage.set_trial_state_values(lease.trial_id, TrialState.FAIL)
    for _ in range(2):
        with pytest.raises(TrialReaped):
            if finish == "complete":
                service.complete(lease.trial_id, lease.lease_token, [1.0], {})
            else:
                service.fail(lease.trial_id, lease.lease_token, "OOM", True)
        with service.db.session() as session:
            row = session.get(LeaseRow, lease.trial_id)
            assert row is not None and (row.outcome, row.fingerprint) == (None, None)


def test_a_sampled_config_the_trainer_refuses_fails_that_trial_and_leases_the_next(
    service: StudyService, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every range end is probed at creation, but a combination can still be refused."""
    import hpo_service.studies._leasing as leasing

    create(service, "refused", budget={"n_trials": 5, "max_concurrent": 3})
    real = leasing.resolve_config
    refusals = iter([True])

    def refuse_first(spec: Any, params: Any) -> Any:
        if next(refusals, False):
            raise InvalidSpec("max_lr", "must be greater than base_lr")
        return real(spec, params)

    monkeypatch.setattr(leasing, "resolve_config", refuse_first)
    with caplog.at_level(logging.WARNING, logger="hpo_service.studies"):
        leases = service.lease_many("w", 2)
    # the refused sample used up one of the two asked for (a batch is "up to" its count)
    assert [lease.trial_number for lease in leases] == [1]
    again = service.lease("w2")
    assert again is not None and again.trial_number == 2
    trials = service.storage.get_all_trials(service.get_study("refused").study_id)
    assert trials[0].state == TrialState.FAIL
    reason = trials[0].user_attrs["fail_reason"]
    assert reason.startswith("invalid config: ") and "must be greater than base_lr" in reason
    assert f"trial 0 of refused has an {reason}" in caplog.messages
    assert service.get_study("refused").counts.running == 2
    # a queued trial the trainer refuses fails the same way
    service.enqueue("refused", [{"base_lr": 0.0005, "batch_size": 64}])
    refusals = iter([True])
    assert service.lease("w3") is None  # its turn went to the refused one
    queued = service.storage.get_all_trials(service.get_study("refused").study_id)[-1]
    assert queued.state == TrialState.FAIL and queued.params["base_lr"] == 0.0005
    assert queued.user_attrs["fail_reason"].startswith("invalid config: ")


def test_a_batch_pops_the_queued_trial_then_samples_the_rest(service: StudyService) -> None:
    create(service, "queue", budget={"n_trials": 4, "max_concurrent": 4})
    service.enqueue("queue", [{"base_lr": 0.0005, "batch_size": 64}])
    first, second = service.lease_many("w", 2)
    assert first.trial_number == 0 and first.config["base_lr"] == 0.0005
    assert second.trial_number == 1 and second.trial_id != first.trial_id
    assert service.get_study("queue").counts.running == 2
    popped = service.storage.get_trial(first.trial_id)  # the lease's attributes on the queued one
    assert (popped.user_attrs["worker_id"], popped.user_attrs["config"]) == ("w", first.config)


@pytest.mark.parametrize("ending", ["reaped", "retryable fail", "final fail"])
def test_a_retry_resumes_from_the_checkpoint_and_a_final_failure_deletes_it(
    service: StudyService, ending: str
) -> None:
    create(service, "line", max_retries=1)
    lease = service.lease("w")
    assert lease is not None
    service.checkpoints.store(lease.trial_id, lease.lease_token, "checkpoint", 2, b"state", None)
    if ending == "reaped":
        age_leases(service)
        service.reap()
    else:
        service.fail(lease.trial_id, lease.lease_token, "OOM", ending == "retryable fail")
    retry = service.lease("w2")
    assert retry is not None
    stored = artifact_id_for(service.get_study("line").study_id, lease.trial_id, "checkpoint")
    if ending == "final fail":  # nothing will resume from it: the file is gone
        assert retry.resume_from is None
        with pytest.raises(ArtifactNotFound):
            read_artifact(service.core.artifacts, stored)
        return
    assert read_artifact(service.core.artifacts, stored) == b"state"
    assert retry.resume_from is not None
    assert (retry.resume_from.trial_id, retry.resume_from.epoch) == (lease.trial_id, 2)
    content, source = service.checkpoints.fetch(retry.trial_id, retry.lease_token)
    assert content == b"state" and source == retry.resume_from


def test_a_beat_that_lands_between_the_reaper_s_read_and_its_mark_keeps_the_lease(
    service: StudyService,
) -> None:
    """The reaper marks the leases it read as expired with a compare-and-set that re-checks
    the age: a heartbeat committed in between wins, and the trial keeps running."""
    create(service, "late-beat")
    lease = service.lease("w")
    assert lease is not None
    age_leases(service)
    beaten: list[str] = []

    def beat_first(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not beaten and statement.lstrip().upper().startswith("UPDATE HPO_LEASES SET OUTCOME"):
            beaten.append(statement)
            service.heartbeat(lease.trial_id, lease.lease_token)  # on another connection

    event.listen(service.storage.engine, "before_cursor_execute", beat_first)
    try:
        service.reap()
    finally:
        event.remove(service.storage.engine, "before_cursor_execute", beat_first)
    assert beaten, "the reaper never marked a lease: the lease was not found expired"
    assert service.storage.get_trial(lease.trial_id).state == TrialState.RUNNING
    assert service.reaped_leases == 0
    assert service.heartbeat(lease.trial_id, lease.lease_token).action == "continue"


def test_an_ended_study_hands_its_final_evaluation_to_a_worker_that_runs_it(
    settings: Settings,
) -> None:
    service = StudyService(settings)  # keeps best models (the fixture's service keeps none)
    try:
        _final_evaluation_is_leased(service)
    finally:
        service.storage.engine.dispose()


def _final_evaluation_is_leased(service: StudyService) -> None:
    create(
        service,
        "ended",
        budget={"n_trials": 2, "max_concurrent": 2},
        final_evaluation={"enabled": True, "top_k": 2, "k": 8},
    )
    leases = service.lease_many("w", 2)
    for lease, value in zip(leases, [5.0, 4.0], strict=True):
        service.checkpoints.store(lease.trial_id, lease.lease_token, "best_model", 3, b"m", None)
        service.complete(lease.trial_id, lease.lease_token, [value], {})
    assert service.lease("trainer") is None  # trials only: nothing left
    task = service.lease("evaluator", kinds=("trial", "final_evaluation"))
    assert task is not None
    assert (task.kind, task.trial_number, task.worker_id) == ("final_evaluation", 2, "evaluator")
    assert task.task is not None and task.config == {} and task.params == {}
    winners = [int(w["trial_id"]) for w in task.task["winners"]]
    assert winners == [leases[1].trial_id, leases[0].trial_id]  # the better first
    again = service.lease("evaluator", kinds=("trial", "final_evaluation"))
    # its own task back (its config, unused by the task, is then the study's base config)
    assert again is not None
    assert again.model_dump(exclude={"config"}) == task.model_dump(exclude={"config"})
    assert service.lease("other", kinds=("final_evaluation",)) is None  # one task per study


def test_a_report_writes_a_beat_only_after_half_a_heartbeat_interval(
    settings: Settings,
) -> None:
    """A report counts as a beat, written when this process last wrote one over half an
    interval ago. The last write is moved back instead of waited for; the interval is long
    (100 s) so the test's own time never crosses a threshold."""
    service = StudyService(
        settings.model_copy(update={"heartbeat_interval_s": 100.0, "lease_timeout_s": 200.0})
    )
    try:
        create(service, "beats")
        lease = service.lease("w")
        assert lease is not None

        def beat_written(epoch: int, written_ago_s: float) -> bool:
            known = service.core.known_running(lease.trial_id)
            assert known is not None
            known.beat_at = time.monotonic() - written_ago_s
            age_leases(service, 1000.0)
            service.report(lease.trial_id, lease.lease_token, epoch, 100.0 - epoch, {})
            with service.db.session() as session:
                row = session.get(LeaseRow, lease.trial_id)
                assert row is not None and row.beat_at_s is not None
                aged = session.scalar(select(service.core.database_clock_s())) - row.beat_at_s
            return bool(aged < 500.0)  # rewritten now, not left 1000 s back

        assert not beat_written(1, 40.0)  # 40 s < 50 s
        assert beat_written(2, 60.0)
        # a report that skips an epoch re-reads the trial and keeps when the beat was written
        assert not beat_written(4, 40.0)
        assert beat_written(5, 55.0)
    finally:
        service.storage.engine.dispose()


def test_a_diverged_fail_completes_infeasible_alone_and_in_a_batch(service: StudyService) -> None:
    """``constraints.finite`` (on by default): the worst value seen, not a silent failure."""
    create(service, "diverging", budget={"n_trials": 4, "max_concurrent": 3})
    done, alone, batched = service.lease_many("w", 3)
    service.complete(done.trial_id, done.lease_token, [100.0], {})
    for lease, last in ((alone, 120.0), (batched, 90.0)):
        service.report(lease.trial_id, lease.lease_token, 1, last, {})
    answer = service.fail(alone.trial_id, alone.lease_token, "loss is nan", False, diverged=True)
    [item] = service.fail_many(
        [TrialFailure(batched.trial_id, batched.lease_token, "inf grad", diverged=True)]
    )
    assert (answer.state, getattr(item, "state", None)) == ("complete", "complete")
    # the worst of the completed trials and its own last report: 120 for both
    for lease, worst, reason in ((alone, 120.0, "loss is nan"), (batched, 120.0, "inf grad")):
        trial = service.storage.get_trial(lease.trial_id)
        assert trial.state == TrialState.COMPLETE and trial.values == [worst]
        assert trial.user_attrs["fail_reason"] == reason


def test_a_fail_claim_left_by_a_dead_process_is_taken_over_by_any_fail(
    service: StudyService,
) -> None:
    """A fail's claim matches any fail (its state is not a result to conflict with): once it
    is older than the lease timeout the next fail takes it over, finds the trial already told,
    and says how it ended."""
    create(service, "fail-takeover")
    lease = service.lease("w")
    assert lease is not None
    real = service.finishing._record_answer
    service.finishing._record_answer = lambda *args: None  # type: ignore[method-assign]
    try:
        service.fail(lease.trial_id, lease.lease_token, "pruned", False, pruned=True)
    finally:
        service.finishing._record_answer = real  # type: ignore[method-assign]
    age_leases(service)
    with pytest.raises(TrialFinished) as told:
        service.fail(lease.trial_id, lease.lease_token, "OOM", True)
    assert told.value.state == "pruned"
    assert service.get_study("fail-takeover").counts.waiting == 0  # no retry queued
