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

_NO_LEASE = {"model": ErrorResponse, "description": "No trial with this id holds a lease."}


def _answers(conflict: str, invalid: str) -> dict[int | str, dict[str, object]]:
    return {
        404: _NO_LEASE,
        409: {"model": ErrorResponse, "description": conflict},
        422: {"model": ErrorResponse, "description": invalid},
    }


_TOKEN_CONFLICT = (
    "`lease_mismatch`: the token is not this trial's. `trial_reaped`: the lease expired "
    "(no heartbeat for `lease_timeout_s`) and the trial was failed, and maybe retried as a new "
    "trial; stop training it."
)
_HEARTBEAT = _answers(
    _TOKEN_CONFLICT,
    "`lease_token` missing or not a token (URL-safe characters), or `trial_id` not a 64-bit id.",
)
_REPORT = _answers(
    _TOKEN_CONFLICT,
    "`epoch` negative, `value` not a number, or `metrics` too many, too long, or holding "
    "NaN/Infinity (the field names the key).",
)
_COMPLETE = _answers(
    f"{_TOKEN_CONFLICT} `result_conflict`: the trial already finished with different "
    "values (a repeat of the same `complete` answers 200 again).",
    "`values` not one finite number per objective metric, or bad `metrics`.",
)
_FAIL = _answers(
    _TOKEN_CONFLICT + " A repeated `fail` answers the stored result again.",
    "`reason` missing or over 4000 characters.",
)


@router.post(
    "/leases",
    response_model=Lease,
    responses={
        204: {
            "description": "No trial to run within `wait_s`: every running study is at its "
            "concurrency limit or budget, or none is running. Ask again."
        },
        422: {"model": ErrorResponse, "description": "`worker_id` missing, `wait_s` over 60."},
    },
)
def lease(service: ServiceDep, body: LeaseRequest) -> Lease | Response:
    """Long-poll for a trial to train; WAITING trials (enqueued, retries) go first.

    A worker that asks again with the same `worker_id` while its trial still runs gets that
    trial back (a restarted worker resumes). Train `config`, heartbeat every
    `heartbeat_interval_s`, report each epoch, then `complete` or `fail`.
    """
    granted = service.lease(body.worker_id, body.wait_s, body.device)
    if granted is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    return granted


@router.post("/trials/{trial_id}/heartbeat", response_model=HeartbeatAnswer, responses=_HEARTBEAT)
def heartbeat(service: ServiceDep, trial_id: TrialId, body: LeaseToken) -> HeartbeatAnswer:
    """Keep the lease alive; send one every `heartbeat_interval_s` while training.

    A lease without a heartbeat for `lease_timeout_s` expires: the trial is failed and retried.
    `action: stop` means the study was stopped or cancelled: end the trial with `fail`.
    """
    return service.heartbeat(trial_id, body.lease_token)


@router.post("/trials/{trial_id}/report", response_model=ReportAnswer, responses=_REPORT)
def report(service: ServiceDep, trial_id: TrialId, body: ReportRequest) -> ReportAnswer:
    """Report one finished epoch: `value` is the lease's `report_metric` for the pruner,
    `metrics` anything worth keeping. Also counts as a heartbeat.

    `action`: `continue`; `prune` (the pruner stops this trial: send `fail` with
    `pruned: true`); `stop` (the study was cancelled: send `fail`). A repeat of an epoch
    already reported is not stored twice.
    """
    return service.report(trial_id, body.lease_token, body.epoch, body.value, body.metrics)


@router.post("/trials/{trial_id}/complete", response_model=CompleteAnswer, responses=_COMPLETE)
def complete(service: ServiceDep, trial_id: TrialId, body: CompleteRequest) -> CompleteAnswer:
    """Finish the trial: `values` holds one final value per name in the lease's
    `objective_metrics`, in that order. Idempotent: the same request again answers the same.
    """
    return service.complete(
        trial_id, body.lease_token, body.values, body.metrics, output_tail=body.output_tail
    )


@router.post("/trials/{trial_id}/fail", response_model=FailAnswer, responses=_FAIL)
def fail(service: ServiceDep, trial_id: TrialId, body: FailRequest) -> FailAnswer:
    """End the trial without a result: `pruned: true` after a `prune` answer (the trial ends
    PRUNED); `retryable: true` for a failure worth retrying with the same parameters (a
    preempted GPU, say), within the study's `max_retries`; `diverged: true` when the loss or the
    objective became non-finite (the trial completes infeasible, see `constraints`); otherwise it
    ends FAIL.
    """
    return service.fail(
        trial_id,
        body.lease_token,
        body.reason,
        body.retryable,
        body.pruned,
        body.diverged,
        output_tail=body.output_tail,
    )
