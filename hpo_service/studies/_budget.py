"""A study's budget: what counts toward ``n_trials``, when a running study is done, and
whether any study can still give a worker work."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import select

from hpo_service.final_eval import FINAL_EVALUATION, STUDY_ATTR
from hpo_service.lr_range import is_task
from hpo_service.models import StudyRow
from hpo_service.schemas import StudySpec

if TYPE_CHECKING:
    from hpo_service.studies._core import StudyCore


def tally(trials: Sequence[FrozenTrial]) -> tuple[int, int, int, int]:
    """(finished-or-running toward the budget, running, waiting, final failures).

    A failed trial that was retried does not count: its retry stands in for it. Tasks (an LR
    range test probe, ``hpo_service.lr_range``) are not trials of the search: never counted.
    """
    retried = {n for t in trials for n in (t.system_attrs.get("retry_history") or [])}
    running = waiting = done = final_failures = 0
    for trial in trials:
        if is_task(trial):
            continue
        if trial.state == TrialState.RUNNING:
            running += 1
        elif trial.state == TrialState.WAITING:
            waiting += 1
        elif trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            done += 1
        elif trial.state == TrialState.FAIL and trial.number not in retried:
            final_failures += 1
    return done + running + final_failures, running, waiting, final_failures


def effective_state(row: StudyRow, trials: Sequence[FrozenTrial], spec: StudySpec) -> str:
    """The study's state as users see it: a running study whose budget is spent is
    ``completed``, one with too many final failures ``failed``."""
    if row.state != "running":
        return row.state
    counted, running, _waiting, failures = tally(trials)
    if failures >= spec.budget.max_failed:
        return "failed"
    if counted >= spec.budget.n_trials and running == 0:
        return "completed"
    return "running"


def _evaluated(core: StudyCore, study_id: int) -> bool:
    """Whether the study's final evaluation has settled: stored, skipped or failed."""
    return STUDY_ATTR in core.storage.get_study_user_attrs(study_id)


def work_may_come(core: StudyCore, kinds: Sequence[str] = ("trial",)) -> bool:
    """Whether some study could still hand out a trial: a ``running`` study that is neither
    spent nor failed (``effective_state``). One at its concurrency cap, or whose running
    trials may fail and be retried, counts: work may come. False (*idle*) when every study
    is stopped, cancelled, completed or failed, or there is none; a study submitted, resumed
    or fired by a schedule later makes work again. For a worker that lists
    ``final_evaluation`` in ``kinds``, a completed study whose final evaluation has not
    settled (``hpo_service.final_eval``) still counts.
    """
    with core.db.session() as session:
        rows = list(session.scalars(select(StudyRow).where(StudyRow.state == "running")))
    for row in rows:
        trials = core.cache.get_all_trials(row.study_id, deepcopy=False)
        spec = core.load(row.study_id).spec
        state = effective_state(row, trials, spec)
        if state == "running":
            return True
        evaluates = spec.final_evaluation.enabled and FINAL_EVALUATION in kinds
        # issue 14.4: a completed study's winners' evaluation may be to come
        if evaluates and state == "completed" and not _evaluated(core, row.study_id):
            return True
    return False
