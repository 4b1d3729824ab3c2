"""The batched worker protocol: a population worker leases, heartbeats, reports, completes and
fails many trials in one request; each item is answered or refused on its own (pydantic only).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ._fields import TrialIdField, WholeNumber
from .worker import (
    CompleteAnswer,
    CompleteRequest,
    FailAnswer,
    FailRequest,
    HeartbeatAnswer,
    Lease,
    LeaseKind,
    LeaseRequest,
    LeaseToken,
    ReportAnswer,
    ReportRequest,
    _trials_only,
)

#: The most trials one batched request may carry.
MAX_BATCH = 256
SlotId = Annotated[str, Field(min_length=1, max_length=200)]


class BatchLeaseRequest(LeaseRequest):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"worker_id": "gpu-box-1-pop", "count": 16, "wait_s": 5},
                {
                    "worker_id": "gpu-box-1-pop",
                    "count": 2,
                    "slots": ["gpu-box-1-pop/0", "gpu-box-1-pop/1"],
                    "kinds": ["trial", "lr_range_test", "final_evaluation"],
                },
            ]
        },
    )

    kinds: list[LeaseKind] = Field(
        default_factory=_trials_only,
        min_length=1,
        description="The lease kinds this worker can run (default: trials only, as the single "
        "lease). A task (`lr_range_test`, `final_evaluation`) comes alone: the answer is then "
        "that one lease, held by the first slot (or `worker_id`), with no trial beside it.",
    )
    count: WholeNumber = Field(..., ge=1, le=MAX_BATCH, description="Lease up to this many trials.")
    slots: list[SlotId] | None = Field(
        None,
        max_length=MAX_BATCH,
        description="One lease identity per lease wanted (`count` of them, distinct), e.g. a "
        "population worker's `box/0` … `box/15`: each lease is held by one slot (its "
        "`worker_id`), and a slot's own running trial comes back first. Without it every "
        "lease is held by `worker_id`.",
    )

    @model_validator(mode="after")
    def _one_slot_per_lease(self) -> BatchLeaseRequest:
        if self.slots is not None:
            if len(self.slots) != self.count:
                raise ValueError(
                    f"`slots` must hold `count` ids (got {len(self.slots)} for count {self.count})"
                )
            if len(set(self.slots)) != len(self.slots):
                raise ValueError("`slots` must be distinct (one lease identity per slot)")
        return self


class BatchLeases(BaseModel):
    """Up to ``count`` leases (fewer when the budget, the concurrency caps or the queue run
    out; none after ``wait_s``). A worker's own running trials come back first."""

    leases: list[Lease]
    idle: bool = Field(
        False,
        description="With an empty `leases` only. `true`: no study can give work now (every "
        "study is stopped, cancelled, completed or failed, or there is none), so a worker may "
        "exit. `false`: some running study is at its concurrency cap or waits on its running "
        "trials (which may fail and be retried); ask again.",
    )


class TrialLease(LeaseToken):
    model_config = ConfigDict(extra="forbid")

    trial_id: TrialIdField


class BatchHeartbeatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    leases: list[TrialLease] = Field(..., min_length=1, max_length=MAX_BATCH)


class TrialReport(ReportRequest):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"trial_id": 17, "lease_token": "TOKEN", "epoch": 3, "value": 142.7, "metrics": {}}
            ]
        },
    )

    trial_id: TrialIdField


class BatchReportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reports: list[TrialReport] = Field(..., min_length=1, max_length=MAX_BATCH)


class TrialComplete(CompleteRequest):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"trial_id": 17, "lease_token": "TOKEN", "values": [139.4], "metrics": {}}]
        },
    )

    trial_id: TrialIdField


class BatchCompleteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    results: list[TrialComplete] = Field(..., min_length=1, max_length=MAX_BATCH)


class TrialFail(FailRequest):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"trial_id": 17, "lease_token": "TOKEN", "reason": "CUDA OOM", "retryable": True}
            ]
        },
    )

    trial_id: TrialIdField


class BatchFailRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    failures: list[TrialFail] = Field(..., min_length=1, max_length=MAX_BATCH)


class ItemError(BaseModel):
    """Why one trial of a batch was refused: the ``code`` and ``message`` the single-trial route
    would have answered with (``trial_finished`` and ``trial_reaped`` with the trial's
    ``state``, ``result_conflict``, ``report_conflict``, ``lease_mismatch``, ``trial_not_found``,
    ``invalid_spec`` or ``invalid_value`` with its ``field``)."""

    code: str
    message: str
    field: str | None = None
    state: str | None = None  # trial_finished / trial_reaped: how the trial ended


class HeartbeatItem(BaseModel):
    trial_id: int
    answer: HeartbeatAnswer | None = None
    error: ItemError | None = None


class ReportItem(BaseModel):
    trial_id: int
    answer: ReportAnswer | None = None
    error: ItemError | None = None


class CompleteItem(BaseModel):
    trial_id: int
    answer: CompleteAnswer | None = None
    error: ItemError | None = None


class FailItem(BaseModel):
    trial_id: int
    answer: FailAnswer | None = None
    error: ItemError | None = None


class BatchHeartbeatAnswer(BaseModel):
    """One item per request item, in order: an ``answer`` or an ``error``."""

    items: list[HeartbeatItem]


class BatchReportAnswer(BaseModel):
    """One item per report, in order: ``continue``/``prune``/``stop``, or an ``error``."""

    items: list[ReportItem]


class BatchCompleteAnswer(BaseModel):
    items: list[CompleteItem]


class BatchFailAnswer(BaseModel):
    items: list[FailItem]
