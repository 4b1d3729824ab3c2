"""A study's budget: what counts toward ``n_trials``, and when a running study is done."""

from __future__ import annotations

from collections.abc import Sequence

from optuna.trial import FrozenTrial, TrialState

from hpo_service.lr_range import is_task
from hpo_service.models import StudyRow
from hpo_service.schemas import StudySpec


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
