"""The final evaluation of an ended study's winners (``hpo_service.final_eval``): handing out
its one task, serving the winners' kept best models, and storing the results.

The task is a trial of the study created under the study lock, like the LR range test probe
(``_probes``): the lease, heartbeat, reaper and retry rules are the trials' own (a dead
worker's task is failed and queued again, keeping its ``task``), and a task that fails for good
is recorded as such on the study.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime

import optuna
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial, TrialState

from hpo_service import final_eval
from hpo_service.artifacts import artifact_id_for, read_artifact
from hpo_service.errors import (
    CheckpointNotFound,
    InvalidSpec,
    LeaseRequired,
    TrialNotFound,
    WrongLeaseKind,
)
from hpo_service.lr_range import TASK_ATTR
from hpo_service.models import LeaseRow
from hpo_service.schemas import FinalEvaluationAnswer, FinalEvaluationResult
from hpo_service.studies._checks import check_lease, running_trial
from hpo_service.studies._core import LoadedStudy, StudyCore
from hpo_service.studies._task_results import settle_task_result

log = logging.getLogger(__name__)

#: User attribute of the task trial holding its ``task`` (the winners), kept across retries.
SETTINGS_ATTR = "task_settings"


def task_step(
    core: StudyCore,
    study_id: int,
    loaded: LoadedStudy,
    trials: list[FrozenTrial],
    worker_id: str,
    kinds: Sequence[str],
) -> tuple[int, int, dict] | None:
    """Under the study lock, once the study has ended: the task to hand out (trial id,
    number, ``task``), or None (off, not this worker's kind, running, done, or no winner)."""
    spec = loaded.spec.final_evaluation
    if not spec.enabled or final_eval.FINAL_EVALUATION not in kinds:
        return None
    found = final_eval.tasks(trials)
    attrs = {"worker_id": worker_id}
    if found:
        last = found[-1]
        if last.state != TrialState.WAITING:  # running, or finished (stored or failed)
            if last.state == TrialState.FAIL:
                _record_failed_for_good(core, study_id, last)
            return None
        # a retry the reaper or a retryable fail queued: the same winners
        settings = dict(found[0].user_attrs.get(SETTINGS_ATTR) or {})
        if not core.cache.set_trial_state_values(last._trial_id, TrialState.RUNNING):
            return None
        core.storage.set_trial_user_attr(last._trial_id, SETTINGS_ATTR, settings)
        for key, value in attrs.items():
            core.storage.set_trial_user_attr(last._trial_id, key, value)
        return last._trial_id, last.number, settings
    chosen = _kept(core, study_id, final_eval.winners(trials, loaded.study.directions), spec.top_k)
    if not chosen:
        if final_eval.STUDY_ATTR not in core.storage.get_study_user_attrs(study_id):
            why = "no completed trial kept a best model (HPO_BEST_MODELS_KEPT)"
            core.storage.set_study_user_attr(
                study_id, final_eval.STUDY_ATTR, {"status": "skipped", "reason": why}
            )
        return None
    settings = final_eval.task_settings(chosen, spec.k)
    template = optuna.create_trial(
        state=TrialState.RUNNING,
        user_attrs={TASK_ATTR: final_eval.FINAL_EVALUATION, SETTINGS_ATTR: settings, **attrs},
    )
    trial_id = core.cache.create_new_trial(study_id, template_trial=template)
    return trial_id, core.cache.get_trial(trial_id).number, settings


def _kept(
    core: StudyCore, study_id: int, ranked: Sequence[FrozenTrial], top_k: int
) -> list[FrozenTrial]:
    """The first ``top_k`` of ``ranked`` whose best model is still in the artifact store:
    retention deletes the file but cannot drop a finished trial's ``hpo:best_model`` record."""
    kept: list[FrozenTrial] = []
    for trial in ranked:
        if len(kept) == top_k:
            break
        try:
            with core.artifacts.open_reader(
                artifact_id_for(study_id, trial._trial_id, "best_model")
            ):
                kept.append(trial)
        except ArtifactNotFound:
            continue
    return kept


def _check_task_names(core: StudyCore, task_row: LeaseRow, trial_id: int) -> None:
    """The task lease ``task_row`` is a running ``final_evaluation`` naming ``trial_id``."""
    task = running_trial(core, task_row)
    if task.user_attrs.get(TASK_ATTR) != final_eval.FINAL_EVALUATION:
        raise WrongLeaseKind(
            f"trial {task_row.trial_number}'s lease is not a final_evaluation task's: only "
            "a final evaluation may fetch a best model"
        )
    winners = (task.user_attrs.get(SETTINGS_ATTR) or {}).get("winners", [])
    if trial_id not in {int(w["trial_id"]) for w in winners}:
        raise LeaseRequired(
            f"the final_evaluation task (trial {task_row.trial_number}) does not name trial "
            f"id {trial_id} among its winners"
        )


def _record_failed_for_good(core: StudyCore, study_id: int, task: FrozenTrial) -> None:
    attrs = core.storage.get_study_user_attrs(study_id)
    if final_eval.STUDY_ATTR in attrs:
        return
    reason = str(task.user_attrs.get("fail_reason") or "the task failed")
    outcome = {"status": "failed", "reason": reason, "task_trial": task.number}
    core.storage.set_study_user_attr(study_id, final_eval.STUDY_ATTR, outcome)


class FinalEvaluations:
    """The winners' best models and ``POST /v1/trials/{trial_id}/final-evaluation``."""

    def __init__(self, core: StudyCore) -> None:
        self.core = core

    def best_model(self, trial_id: int, task: tuple[int, str] | None) -> tuple[bytes, dict]:
        """A finished trial's kept best model and its record (epoch, bytes, SHA-256).

        ``task`` is the (trial id, lease token) of the caller's ``final_evaluation`` lease,
        which must be live and name ``trial_id`` among its winners; None only for an admin
        (the route decides). A model holds what a user trained on their data, so a worker
        token alone is not enough. Raises ``LeaseRequired`` (403: no lease, or it does not
        name this trial), ``LeaseMismatch``, ``TrialFinished``/``TrialReaped`` and
        ``WrongLeaseKind`` (409: the lease is not live, or is not a final evaluation's),
        ``TrialNotFound`` or ``CheckpointNotFound`` (never kept, or deleted by retention).
        """
        core = self.core
        with core.db.session() as session:  # every trial that kept a model was leased
            lease = session.get(LeaseRow, trial_id)
            study_id = None if lease is None else lease.study_id
            task_row = None if task is None else check_lease(session, task[0], task[1])
        if task_row is not None:
            _check_task_names(core, task_row, trial_id)
        if study_id is None:
            raise TrialNotFound(trial_id)
        trial = core.storage.get_trial(trial_id)
        meta = trial.system_attrs.get(final_eval.BEST_MODEL_ATTR)
        if meta is None:
            raise CheckpointNotFound(f"trial {trial.number} kept no best model")
        try:
            content = read_artifact(
                core.artifacts, artifact_id_for(study_id, trial_id, "best_model")
            )
        except ArtifactNotFound as error:
            raise CheckpointNotFound(
                f"the best model of trial {trial.number} was deleted (not among the study's "
                "best kept)"
            ) from error
        return content, dict(meta)

    def store(
        self, trial_id: int, token: str, result: FinalEvaluationResult
    ) -> FinalEvaluationAnswer:
        """Store the winners' results on the study and end the task (FAIL: no sampler learns
        from it). The same result again gets the same answer; a trial's lease raises
        ``WrongLeaseKind``; a result for a trial the task did not name raises ``InvalidSpec``."""
        core = self.core
        with core.db.session() as session:
            row = check_lease(session, trial_id, token)
        trial = core.storage.get_trial(trial_id)
        if trial.user_attrs.get(TASK_ATTR) != final_eval.FINAL_EVALUATION:
            raise WrongLeaseKind(
                f"trial {row.trial_number} is not a final_evaluation task: send its result to "
                "its own route"
            )
        settings = trial.user_attrs.get(SETTINGS_ATTR) or {}
        named = {w["trial_number"] for w in settings.get("winners", [])}
        for index, item in enumerate(result.results):
            if item.trial_number not in named:
                raise InvalidSpec(
                    f"results.{index}.trial_number",
                    f"trial {item.trial_number} is not one of the task's winners {sorted(named)}",
                )
        loaded = core.load(row.study_id)
        results = [item.model_dump(mode="json") for item in result.results]
        wrote: list[bool] = []

        def write() -> FinalEvaluationAnswer:
            evaluated_at = datetime.now(UTC).isoformat(timespec="seconds")
            outcome = final_eval.outcome_attr(
                results, int(settings.get("k", 0)), row.trial_number, evaluated_at
            )
            core.storage.set_study_user_attr(row.study_id, final_eval.STUDY_ATTR, outcome)
            wrote.append(True)
            return FinalEvaluationAnswer(
                trial_id=trial_id,
                trial_number=row.trial_number,
                stored=sorted(item.trial_number for item in result.results),
            )

        answer = FinalEvaluationAnswer.model_validate(
            settle_task_result(core, row, loaded, result, write)
        )
        if not wrote:  # a repeat: the stored answer, nothing new to log
            return answer
        log.info("final evaluation of %s stored for trials %s", loaded.spec.name, answer.stored)
        return answer
