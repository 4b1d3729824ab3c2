"""A trial's own records (issue 14): its per-epoch history and resolved config (viewers), and
the reproducibility record its worker sends when it starts training."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from hpo_service.api.deps import Reader, ServiceDep, Worker
from hpo_service.api.routes.workers import TrialId
from hpo_service.schemas import ErrorResponse, RecordRequest, TrialConfig, TrialHistory

router = APIRouter(tags=["trials"])

TrialNumber = Annotated[
    int, Path(ge=0, le=2**31 - 1, description="The trial's number within its study (0-based).")
]
_NOT_FOUND: dict[int | str, dict[str, object]] = {
    404: {
        "model": ErrorResponse,
        "description": "No such study (`study_not_found`) or no trial of that number in it "
        "(`trial_not_found`).",
    },
    422: {"model": ErrorResponse, "description": "`number` is not a trial number (0 or more)."},
}


@router.get(
    "/studies/{name}/trials/{number}/history",
    response_model=TrialHistory,
    responses=_NOT_FOUND,
    dependencies=[Reader],
)
def trial_history(service: ServiceDep, name: str, number: TrialNumber) -> TrialHistory:
    """Every epoch the trial reported, oldest first: −ELBO, reconstruction, KL and KL per
    dimension, active units, β, LR, gradient norms, clip rate, … as the worker sent them.

    `plot` is the dashboard path of the trial's diagnostics PNG once one was drawn (every
    `HPO_DIAGNOSTICS_PLOT_EVERY` epochs while it runs, and when it finishes).
    """
    return service.trial_history(name, number)


@router.get(
    "/studies/{name}/trials/{number}/config",
    response_model=TrialConfig,
    responses=_NOT_FOUND,
    dependencies=[Reader],
)
def trial_config(service: ServiceDep, name: str, number: TrialNumber) -> TrialConfig:
    """The trial's full resolved training config, its seed, and the reproducibility record its
    worker sent (code version, libraries, device, precision): what
    `hpo-train run --from-trial STUDY NUMBER` reruns."""
    return service.trial_config(name, number)


@router.post(
    "/trials/{trial_id}/record",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={
        404: {"model": ErrorResponse, "description": "No trial with this id holds a lease."},
        409: {
            "model": ErrorResponse,
            "description": "`lease_mismatch`: the token is not this trial's. `trial_reaped`: "
            "the trial no longer runs.",
        },
        422: {
            "model": ErrorResponse,
            "description": "A record field is missing, too long, or not of its form (the "
            "field names it: `body.record.git_commit`).",
        },
    },
    dependencies=[Worker],
)
def record(service: ServiceDep, trial_id: TrialId, body: RecordRequest) -> Response:
    """Store how this trial is being trained (package version and git commit, Python, torch,
    Optuna, device and its name, precision, seed) as its `repro` user attribute. Send once,
    when training starts; a repeat replaces it."""
    service.record_repro(trial_id, body.lease_token, body.record)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
