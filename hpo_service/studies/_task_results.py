"""A task lease's result (an LR range test's curve, a final evaluation's IS-NLLs), taken once.

Both task kinds end the same way: the result's fingerprint claims the lease's ``complete``
outcome (a repeat reads the stored answer, another result after it is a ``ResultConflict``);
under the study lock the task must still run, the caller's ``write`` stores what the task
produced, and the task trial ends FAIL — the one finished state no sampler learns from
(``hpo_service.lr_range``) — with ``task_outcome: complete``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from optuna.trial import TrialState
from pydantic import BaseModel

from hpo_service.lr_range import TASK_OUTCOME_ATTR
from hpo_service.models import LeaseRow
from hpo_service.studies._checks import not_running
from hpo_service.studies._core import LoadedStudy, StudyCore


def settle_task_result(
    core: StudyCore,
    row: LeaseRow,
    loaded: LoadedStudy,
    result: BaseModel,
    write: Callable[[], BaseModel],
) -> dict[str, Any]:
    """Take ``result`` for the task leased as ``row`` exactly once; returns the answer's JSON
    (the stored one for a repeat). ``write`` runs under the study lock while the task is
    RUNNING, stores the task's product and returns the answer."""
    from hpo_service.studies._finishing import Finishing, previous_answer

    fingerprint = hashlib.sha256(result.model_dump_json(exclude={"lease_token"}).encode())
    digest = fingerprint.hexdigest()
    finishing = Finishing(core)
    previous = previous_answer(row, "complete", digest)
    if previous is None:
        previous = finishing._claim(row, "complete", digest, same=digest)
    if previous is not None:
        return previous
    with core.study_lock(row.study_id):
        trial = core.storage.get_trial(row.trial_id)
        if trial.state != TrialState.RUNNING:
            finishing._release(row, "complete", digest)
            raise not_running(row, trial.state)
        answer = write()
        core.storage.set_trial_user_attr(row.trial_id, TASK_OUTCOME_ATTR, "complete")
        loaded.study.tell(row.trial_number, state=TrialState.FAIL)
        core.forget_running(row.trial_id)
    stored = answer.model_dump(mode="json")
    finishing._record_answer(row.trial_id, "complete", stored)
    return stored
