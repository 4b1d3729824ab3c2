"""The final evaluation of a study's winners (issue 14.4): which trials, and what is recorded.

Once a study has ended — its budget spent and no trial of the search running — and
``final_evaluation.enabled``, its next lease to a worker that lists the kind is one
``final_evaluation`` task: a trial of the study (so the lease, heartbeat, reaper and retry
rules are the trials' own) with the user attribute ``task = "final_evaluation"``, like the LR
range test probe (``hpo_service.lr_range``). Its ``task`` names the winners: the best
``top_k`` feasible completed trials (by the first objective) that kept a best model
(``hpo:best_model``, ``HPO_BEST_MODELS_KEPT``), with their configs and ``k``. The worker fetches
each kept model (``GET /v1/trials/{id}/best-model``), estimates the test IS-NLL with ``k``
importance samples on the full test split (Burda et al. 2016, Eq. 8;
``trainers.metrics.importance_sampled_nll``) and sends the results.

Finished trials' attributes are frozen by Optuna, so the results live on the study's user
attribute ``final_evaluation``: ``{"status", "k", "task_trial", "evaluated_at", "results":
{number: {...}}}``, keyed by trial number (a string, as JSON keeps it). The task ends FAIL (no
sampler learns from it) and never counts toward the budget or the counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hpo_service.constraints import is_feasible
from hpo_service.lr_range import TASK_ATTR, is_task

#: The lease kind, the task trial's ``task`` user attribute and the study's user attribute.
FINAL_EVALUATION = "final_evaluation"
STUDY_ATTR = "final_evaluation"
#: The trial system attribute recording a kept best model (``studies._checkpoints.ATTRS``).
BEST_MODEL_ATTR = "hpo:best_model"


def tasks(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if t.user_attrs.get(TASK_ATTR) == FINAL_EVALUATION]


def winners(
    trials: Sequence[FrozenTrial], directions: Sequence[StudyDirection]
) -> list[FrozenTrial]:
    """The feasible completed trials of the search that recorded a best model, best first by
    the first objective (ties: the earlier trial); the caller keeps the first ``top_k`` whose
    file retention has not deleted."""
    sign = -1.0 if directions[0] == StudyDirection.MAXIMIZE else 1.0
    kept = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE
        and t.values
        and not is_task(t)
        and is_feasible(t)
        and BEST_MODEL_ATTR in t.system_attrs
    ]
    return sorted(kept, key=lambda t: (sign * t.values[0], t.number))


def task_settings(chosen: Sequence[FrozenTrial], k: int) -> dict[str, Any]:
    """The lease's ``task``: ``k`` and, per winner, what the worker needs to rebuild it."""
    return {
        "k": k,
        "winners": [
            {
                "trial_id": t._trial_id,
                "trial_number": t.number,
                "config": t.user_attrs.get("config") or {},
                "value": t.values[0],
            }
            for t in chosen
        ],
    }


def outcome_attr(
    results: Sequence[Mapping[str, Any]], k: int, task_number: int, evaluated_at: str
) -> dict[str, Any]:
    """The study's ``final_evaluation`` user attribute once the task's results arrived
    (``evaluated_at``: when they were stored, ISO 8601 UTC)."""
    return {
        "status": "complete",
        "k": k,
        "task_trial": task_number,
        "evaluated_at": evaluated_at,
        "results": {str(r["trial_number"]): dict(r) for r in results},
    }


def trial_result(attr: Mapping[str, Any] | None, number: int) -> dict[str, Any] | None:
    """Trial ``number``'s final evaluation (its ``WinnerEvaluation`` fields and the
    ``evaluated_at`` of the task), or None when it was not evaluated (not a winner, or the
    evaluation is off, pending, skipped or failed)."""
    if not attr or attr.get("status") != "complete":
        return None
    result = (attr.get("results") or {}).get(str(number))
    if result is None:
        return None
    return {**result, "evaluated_at": attr.get("evaluated_at")}


def summary_lines(attr: Mapping[str, Any] | None) -> list[str]:
    """One line per evaluated trial, best first, for ``hpo best`` and the report."""
    if not attr:
        return []
    if attr.get("status") != "complete":
        reason = attr.get("reason")
        return [f"{attr.get('status', 'pending')}" + (f": {reason}" if reason else "")]
    rows = sorted(attr["results"].values(), key=lambda r: r["test_is_nll"])
    return [
        f"trial {r['trial_number']}: test IS-NLL {r['test_is_nll']:.3f} nats "
        f"(k={r['k']}, {r['n_examples']} test examples, best epoch {r['best_epoch']})"
        for r in rows
    ]
