"""The final evaluation of an ended study's winners (issue 14.4, ``hpo_service.final_eval``): a
worker fetches each winner's kept best model and sends the IS-NLLs its task asked for.
Authenticated like every worker route (a worker token); the result also by the task's lease.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from hpo_service.api.deps import ServiceDep, Worker
from hpo_service.api.routes.workers import TrialId, _answers
from hpo_service.schemas import ErrorResponse, FinalEvaluationAnswer, FinalEvaluationResult

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
        404: {
            "model": ErrorResponse,
            "description": "`checkpoint_not_found`: the trial kept no best model, or retention "
            "deleted it (not among the study's best `HPO_BEST_MODELS_KEPT`); `trial_not_found`.",
        },
    },
)
def best_model(service: ServiceDep, trial_id: TrialId) -> Response:
    """A finished trial's kept best model (the selected epoch's weights)."""
    content, meta = service.final_evaluations.best_model(trial_id)
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
