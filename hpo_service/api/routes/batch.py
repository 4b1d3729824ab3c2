"""The batched worker protocol: many trials per request, an answer or an error per trial.

A population worker trains K trials at once and reports them every epoch; one request for all
K saves K - 1 HTTP round trips, authentications and lease queries. Each trial keeps the
single-trial routes' rules (idempotent ``complete``, the first result stands, a reaped lease is
refused): a trial's refusal is its item's ``error`` (the code the single route would answer
with), not the request's. A storage failure fails the whole request (503), which the worker
retries whole; every route here is safe to repeat.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from fastapi import APIRouter

from hpo_service.api.deps import ServiceDep, Worker
from hpo_service.errors import HPOError, InvalidSpec, TrialFinished
from hpo_service.schemas import (
    BatchCompleteAnswer,
    BatchCompleteRequest,
    BatchFailAnswer,
    BatchFailRequest,
    BatchHeartbeatAnswer,
    BatchHeartbeatRequest,
    BatchLeaseRequest,
    BatchLeases,
    BatchReportAnswer,
    BatchReportRequest,
    CompleteItem,
    FailItem,
    HeartbeatItem,
    ItemError,
    ReportItem,
)
from hpo_service.studies import EpochReport, TrialFailure, TrialResult

router = APIRouter(prefix="/batch", tags=["workers (batched)"], dependencies=[Worker])


def _error(error: HPOError) -> ItemError:
    field = error.field if isinstance(error, InvalidSpec) else None
    state = error.state if isinstance(error, TrialFinished) else None
    return ItemError(code=error.code, message=error.message, field=field, state=state)


T = TypeVar("T")


def _items(item: Callable[..., T], requests: Sequence[Any], answers: Sequence[Any]) -> list[T]:
    """One answer item per request item, in order: its answer, or the error refusing it."""
    return [
        item(trial_id=request.trial_id, error=_error(answer))
        if isinstance(answer, HPOError)
        else item(trial_id=request.trial_id, answer=answer)
        for request, answer in zip(requests, answers, strict=True)
    ]


@router.post("/leases", response_model=BatchLeases)
def lease_many(service: ServiceDep, body: BatchLeaseRequest) -> BatchLeases:
    """Up to `count` trials, long-polling up to `wait_s` for the first; an empty list if none.
    Budget and concurrency caps hold exactly; the batch is sampled with Optuna's constant
    liar, so its parameter sets differ. With `slots`, each lease is held by one slot. With
    `kinds` listing a task kind (`lr_range_test`, `final_evaluation`), the answer may instead
    be one task, alone, held by the first slot: a population worker then needs no separate
    `POST /v1/leases` for a study's tasks. Without `kinds`: trials only. With no lease, `idle`
    tells "no study can give work now" (`true`: a worker may exit) from "wait and ask again"
    (`false`), for a worker of `kinds`."""
    leases = service.lease_many(
        body.worker_id, body.count, body.wait_s, body.slots, device=body.device, kinds=body.kinds
    )
    return BatchLeases(leases=leases, idle=not leases and not service.work_may_come(body.kinds))


@router.post("/heartbeat", response_model=BatchHeartbeatAnswer)
def heartbeat_many(service: ServiceDep, body: BatchHeartbeatRequest) -> BatchHeartbeatAnswer:
    answers = service.heartbeat_many([(item.trial_id, item.lease_token) for item in body.leases])
    return BatchHeartbeatAnswer(items=_items(HeartbeatItem, body.leases, answers))


@router.post("/report", response_model=BatchReportAnswer)
def report_many(service: ServiceDep, body: BatchReportRequest) -> BatchReportAnswer:
    """Many trials' epochs: per report `continue`, `prune` or `stop`, or its error."""
    reports = [
        EpochReport(item.trial_id, item.lease_token, item.epoch, item.value, item.metrics)
        for item in body.reports
    ]
    answers = service.report_many(reports)
    return BatchReportAnswer(items=_items(ReportItem, body.reports, answers))


@router.post("/complete", response_model=BatchCompleteAnswer)
def complete_many(service: ServiceDep, body: BatchCompleteRequest) -> BatchCompleteAnswer:
    results = [
        TrialResult(item.trial_id, item.lease_token, item.values, item.metrics, item.output_tail)
        for item in body.results
    ]
    answers = service.complete_many(results)
    return BatchCompleteAnswer(items=_items(CompleteItem, body.results, answers))


@router.post("/fail", response_model=BatchFailAnswer)
def fail_many(service: ServiceDep, body: BatchFailRequest) -> BatchFailAnswer:
    failures = [
        TrialFailure(
            item.trial_id,
            item.lease_token,
            item.reason,
            item.retryable,
            item.pruned,
            item.diverged,
            item.output_tail,
        )
        for item in body.failures
    ]
    answers = service.fail_many(failures)
    return BatchFailAnswer(items=_items(FailItem, body.failures, answers))
