"""The final evaluation of an ended study's winners (issue 14.4, ``hpo_service.final_eval``): a
worker fetches each winner's kept best model and sends the IS-NLLs its task asked for.
Authenticated like every worker route (a worker token); a best model also by the lease of the
task that names its trial (``X-Lease-Trial`` and ``X-Lease-Token``; an admin token needs none),
the result by the task's lease.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response

from hpo_service.api.deps import ServiceDep, Worker
from hpo_service.api.routes.workers import TrialId, _answers
from hpo_service.config import Scope
from hpo_service.errors import LeaseRequired
from hpo_service.schemas import (
    MAX_TRIAL_ID,
    ErrorResponse,
    FinalEvaluationAnswer,
    FinalEvaluationResult,
)

router = APIRouter(tags=["workers"], dependencies=[Worker])


@router.get(
    "/trials/{trial_id}/best-model",
    response_class=Response,
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "description": "The kept best model's bytes (`trainers.checkpoints."
            "load_best_model`); `X-Checkpoint-SHA256` and `X-Checkpoint-Epoch` describe them.",
        },
        403: {
            "model": ErrorResponse,
            "description": "`lease_required`: a worker token without a live `final_evaluation` "
            "lease (`X-Lease-Trial`, `X-Lease-Token`) whose task names this trial.",
        },
        404: {
            "model": ErrorResponse,
            "description": "`checkpoint_not_found`: the trial kept no best model, or retention "
            "deleted it (not among the study's best `HPO_BEST_MODELS_KEPT`); `trial_not_found`.",
        },
        409: {
            "model": ErrorResponse,
            "description": "`lease_mismatch`, `trial_reaped`, `trial_finished` or "
            "`wrong_lease_kind`: the lease named is not a live final evaluation's.",
        },
    },
)
def best_model(
    service: ServiceDep,
    trial_id: TrialId,
    scope: Annotated[Scope, Worker],
    x_lease_trial: Annotated[
        int | None,
        Header(ge=0, le=MAX_TRIAL_ID, description="The trial id of the `final_evaluation` lease."),
    ] = None,
    x_lease_token: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=128,
            pattern=r"^[A-Za-z0-9_\-]+$",
            description="The `lease_token` of that lease.",
        ),
    ] = None,
) -> Response:
    """A finished trial's kept best model (the selected epoch's weights), for the final
    evaluation task that names it (or an admin)."""
    if x_lease_trial is None or x_lease_token is None:
        if scope != "admin":
            raise LeaseRequired(
                "a best model is served only to the holder of a live final_evaluation lease "
                "naming its trial: send `X-Lease-Trial` and `X-Lease-Token` (or an admin token)"
            )
        task = None
    else:  # an admin naming a lease is checked like a worker
        task = (x_lease_trial, x_lease_token)
    content, meta = service.final_evaluations.best_model(trial_id, task)
    return Response(
        content,
        media_type="application/octet-stream",
        headers={
            "X-Checkpoint-SHA256": str(meta.get("sha256", "")),
            "X-Checkpoint-Epoch": str(meta.get("epoch", "")),
        },
    )


@router.post(
    "/trials/{trial_id}/final-evaluation",
    response_model=FinalEvaluationAnswer,
    responses=_answers(
        "`lease_mismatch`, `trial_reaped`, `result_conflict` (another result was stored), "
        "`wrong_lease_kind`: the lease is not a final evaluation's. The same result again "
        "answers the same.",
        "A non-finite IS-NLL, an empty list, or a trial the task did not name.",
    ),
)
def final_evaluation(
    service: ServiceDep, trial_id: TrialId, body: FinalEvaluationResult
) -> FinalEvaluationAnswer:
    """Finish a `final_evaluation` lease with each winner's test IS-NLL: stored on the study
    (`final_evaluation`), shown by `hpo best` and the morning report."""
    return service.final_evaluations.store(trial_id, body.lease_token, body)
