"""The worker protocol: lease, heartbeat, report, complete, fail."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from hpo_service.api.deps import ServiceDep, Worker
from hpo_service.schemas import (
    CompleteAnswer,
    CompleteRequest,
    ErrorResponse,
    FailAnswer,
    FailRequest,
    HeartbeatAnswer,
    Lease,
    LeaseRequest,
    LeaseToken,
    ReportAnswer,
    ReportRequest,
)

router = APIRouter(tags=["workers"], dependencies=[Worker])

#: A trial id as the lease gave it; the databases store 64-bit ids, so anything larger is a 422
#: naming `path.trial_id` rather than an overflow deep in the driver.
TrialId = Annotated[int, Path(ge=0, le=2**63 - 1, description="`trial_id` from the lease.")]

_ERRORS: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorResponse, "description": "No lease for this trial"},
    409: {
        "model": ErrorResponse,
        "description": "Wrong token, the lease expired and the trial was reaped "
        "(`trial_reaped`), or a different result was already recorded (`result_conflict`)",
    },
    422: {"model": ErrorResponse, "description": "Non-finite values or a malformed body"},
}


@router.post(
    "/leases",
    response_model=Lease,
    responses={204: {"description": "No trial available within `wait_s`"}},
)
def lease(service: ServiceDep, body: LeaseRequest) -> Lease | Response:
    """Long-poll for a trial; WAITING trials (enqueued, retries) go first."""
    granted = service.lease(body.worker_id, body.wait_s)
    if granted is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    return granted


@router.post("/trials/{trial_id}/heartbeat", response_model=HeartbeatAnswer, responses=_ERRORS)
def heartbeat(service: ServiceDep, trial_id: TrialId, body: LeaseToken) -> HeartbeatAnswer:
    return service.heartbeat(trial_id, body.lease_token)


@router.post("/trials/{trial_id}/report", response_model=ReportAnswer, responses=_ERRORS)
def report(service: ServiceDep, trial_id: TrialId, body: ReportRequest) -> ReportAnswer:
    return service.report(trial_id, body.lease_token, body.epoch, body.value, body.metrics)


@router.post("/trials/{trial_id}/complete", response_model=CompleteAnswer, responses=_ERRORS)
def complete(service: ServiceDep, trial_id: TrialId, body: CompleteRequest) -> CompleteAnswer:
    return service.complete(trial_id, body.lease_token, body.values, body.metrics)


@router.post("/trials/{trial_id}/fail", response_model=FailAnswer, responses=_ERRORS)
def fail(service: ServiceDep, trial_id: TrialId, body: FailRequest) -> FailAnswer:
    return service.fail(trial_id, body.lease_token, body.reason, body.retryable, body.pruned)
