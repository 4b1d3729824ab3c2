"""The worker protocol: lease, heartbeat, report, complete, fail."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from hpo_service.api.deps import ServiceDep, Worker
from hpo_service.schemas import (
    MAX_TRIAL_ID,
    WORK_HEADER,
    CompleteAnswer,
    CompleteRequest,
    ErrorResponse,
    FailAnswer,
    FailRequest,
    HeartbeatAnswer,
    Lease,
    LeaseRequest,
    LeaseToken,
    LRRangeTestAnswer,
    LRRangeTestResult,
    ReportAnswer,
    ReportRequest,
)

router = APIRouter(tags=["workers"], dependencies=[Worker])

#: A trial id as the lease gave it; the databases store 64-bit ids, so anything larger is a 422
#: naming `path.trial_id` rather than an overflow deep in the driver (bound: ``MAX_TRIAL_ID``).
TrialId = Annotated[int, Path(ge=0, le=MAX_TRIAL_ID, description="`trial_id` from the lease.")]

_NO_LEASE = {"model": ErrorResponse, "description": "No trial with this id holds a lease."}


def _answers(conflict: str, invalid: str) -> dict[int | str, dict[str, object]]:
    return {
        404: _NO_LEASE,
        409: {"model": ErrorResponse, "description": conflict},
        422: {"model": ErrorResponse, "description": invalid},
    }


_TOKEN_CONFLICT = (
    "`lease_mismatch`: the token is not this trial's. `trial_finished`: the trial already "
    "ended; the body's `state` says how (`complete`, `pruned` after a `prune` answer, `fail`): "
    "stop training it. `trial_reaped` (`state: fail`): the lease expired (no heartbeat for "
    "`lease_timeout_s`) and the trial was failed, and maybe retried as a new trial; stop "
    "training it."
)
_HEARTBEAT = _answers(
    _TOKEN_CONFLICT,
    "`lease_token` missing or not a token (URL-safe characters), or `trial_id` not a 64-bit id.",
)
_REPORT = _answers(
    f"{_TOKEN_CONFLICT} `report_conflict`: this epoch was already reported with a different "
    "`value`; the first stands (the same value again answers 200).",
    "`epoch` negative, `value` not a number (`invalid_value`: NaN or Infinity; a run that "
    "diverged sends `fail` with `diverged: true`), or `metrics` too many, too long, or holding "
    "NaN/Infinity (the field names the key).",
)
_COMPLETE = _answers(
    f"{_TOKEN_CONFLICT} `result_conflict`: the trial already completed with different "
    "values (a repeat of the same `complete` answers 200 again).",
    "`values` not one number per objective metric (`invalid_value`: NaN or Infinity), or bad "
    "`metrics`.",
)
_FAIL = _answers(
    f"{_TOKEN_CONFLICT} A repeated `fail` answers the stored result again, whichever flags it "
    "carries (a `fail` after a `prune` answer: `state: pruned`).",
    "`reason` missing or over 4000 characters.",
)


@router.post(
    "/leases",
    response_model=Lease,
    responses={
        204: {
            "description": f"No trial to run within `wait_s`. The `{WORK_HEADER}` header says "
            "whether to ask again: `wait` (a running study is at its concurrency limit, or "
            "waits on running trials that may fail and be retried) or `idle` (no study can "
            "give work now: every study is stopped, cancelled, completed or failed, or there is "
            "none; a worker may exit, as `hpo-worker --exit-when-idle` does).",
            "headers": {
                WORK_HEADER: {
                    "description": "`idle` or `wait`.",
                    "schema": {"type": "string", "enum": ["idle", "wait"]},
                }
            },
        },
        422: {"model": ErrorResponse, "description": "`worker_id` missing, `wait_s` over 60."},
    },
)
def lease(service: ServiceDep, body: LeaseRequest) -> Lease | Response:
    """Long-poll for a trial to train; WAITING trials (enqueued, retries) go first.

    A worker that asks again with the same `worker_id` while its trial still runs gets that
    trial back (a restarted worker resumes). Train `config`, heartbeat every
    `heartbeat_interval_s`, report each epoch, then `complete` or `fail`. Every call about the
    trial after it ended answers 409 `trial_finished` with its `state`.

    `kind` says what to run: `trial` (the above), or `lr_range_test` (only to a worker that
    lists it in `kinds`): the study's LR range test, before its first trial; heartbeat as for a
    trial and send the curve to `/v1/trials/{trial_id}/lr-range-test` (or `fail`); or
    `final_evaluation` (likewise): once the study has ended, evaluate the winners in `task`
    and send the results to `/v1/trials/{trial_id}/final-evaluation`.
    """
    granted = service.lease(body.worker_id, body.wait_s, body.kinds, body.device)
    if granted is None:
        work = "wait" if service.work_may_come(body.kinds) else "idle"
        return Response(status_code=status.HTTP_204_NO_CONTENT, headers={WORK_HEADER: work})
    return granted


@router.post("/trials/{trial_id}/heartbeat", response_model=HeartbeatAnswer, responses=_HEARTBEAT)
def heartbeat(service: ServiceDep, trial_id: TrialId, body: LeaseToken) -> HeartbeatAnswer:
    """Keep the lease alive; send one every `heartbeat_interval_s` while training.

    A lease without a heartbeat for `lease_timeout_s` expires: the trial is failed and retried.
    `action: stop` means the study was cancelled: stop training and send `fail` with
    `retryable: false` and the answer's `reason` (the trial ends FAIL; no retry is queued for
    a cancelled study). A study that was deleted answers 404: drop the trial.
    """
    return service.heartbeat(trial_id, body.lease_token)


@router.post("/trials/{trial_id}/report", response_model=ReportAnswer, responses=_REPORT)
def report(service: ServiceDep, trial_id: TrialId, body: ReportRequest) -> ReportAnswer:
    """Report one finished epoch: `value` is the lease's `report_metric` for the pruner,
    `metrics` anything worth keeping. Also counts as a heartbeat.

    `action`: `continue`; `prune` (the pruner stopped this trial, and the answer ended it
    PRUNED: stop training; a `fail` with `pruned: true` is answered from the stored result, a
    `complete` is refused with 409 `trial_finished`); `stop` (the study was cancelled: stop
    and send `fail` with `retryable: false`). A repeat of an epoch already reported with the
    same `value` answers 200 and is not stored twice; another value is 409 `report_conflict`.
    A NaN or infinite `value` is 422 `invalid_value`.
    """
    return service.report(trial_id, body.lease_token, body.epoch, body.value, body.metrics)


@router.post("/trials/{trial_id}/complete", response_model=CompleteAnswer, responses=_COMPLETE)
def complete(service: ServiceDep, trial_id: TrialId, body: CompleteRequest) -> CompleteAnswer:
    """Finish the trial: `values` holds one final value per name in the lease's
    `objective_metrics`, in that order. Idempotent: the same request again answers the same.
    After a `prune` answer or a `fail` the trial has ended: 409 `trial_finished` with its
    `state`.
    """
    return service.complete(
        trial_id, body.lease_token, body.values, body.metrics, output_tail=body.output_tail
    )


@router.post(
    "/trials/{trial_id}/lr-range-test",
    response_model=LRRangeTestAnswer,
    responses=_answers(
        _TOKEN_CONFLICT + " `wrong_lease_kind`: the lease is a trial's, not an LR range test's."
        " The same result again answers the same.",
        "A curve whose lists differ in length, a non-finite point, or a suggested `max_lr` "
        "not above `base_lr`.",
    ),
)
def lr_range_test(
    service: ServiceDep, trial_id: TrialId, body: LRRangeTestResult
) -> LRRangeTestAnswer:
    """Finish an `lr_range_test` lease with its curve and suggestions (config units): the
    study's `base_lr` and `max_lr_factor` ranges are set from them before its first trial, or,
    when the curve gave no range, the defaults are kept and the answer says why."""
    return service.lr_range_test(trial_id, body.lease_token, body)


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
