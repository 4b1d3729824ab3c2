"""What the REST API answers about studies and trials, and the enqueue request (pydantic only)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ._fields import Direction, ParamValue
from .spec import StudySpec

StudyState = Literal["running", "stopped", "cancelled", "completed", "failed"]


class TrialCounts(BaseModel):
    waiting: int = 0
    running: int = 0
    complete: int = 0
    pruned: int = 0
    fail: int = 0


class TrialSummary(BaseModel):
    number: int
    trial_id: int
    state: str
    params: dict[str, Any]
    values: list[float] | None
    intermediate_values: dict[int, float]
    metrics: dict[str, Any]
    worker_id: str | None
    retry_of: int | None
    # Collapse/divergence constraints (hpo_service.constraints); None: none recorded.
    feasible: bool | None = None
    datetime_start: str | None
    datetime_complete: str | None
    duration_s: float | None
    # --- issue 14: a retry that resumed from an earlier attempt's checkpoint
    resumed_from: dict[str, int] | None = Field(
        None, description='`{"trial": number, "epoch": E}`: resumed after epoch E of that trial.'
    )
    resume_fallback: dict[str, Any] | None = Field(
        None, description='`{"trial": number, "reason": …}`: could not resume; started fresh.'
    )


class StudyInfo(BaseModel):
    name: str
    study_id: int
    state: StudyState
    directions: list[Direction]
    metric_names: list[str]
    counts: TrialCounts
    best_trials: list[TrialSummary]
    spec: StudySpec
    created_at: str
    links: dict[str, str] = Field(default_factory=dict)
    lr_range_test: dict[str, Any] | None = Field(
        None,
        description="The LR range test step (`spec.lr_range_test`): `status` pending, applied "
        "(with the `ranges` set and the `suggested` LRs) or failed (with the `reason`); the "
        "curve is in the study's `lr_range_test` user attribute, and drawn: `plot` is where the "
        "dashboard serves the PNG (listed on the study's page) once drawn. Null when the test is "
        "off.",
    )
    final_evaluation: dict[str, Any] | None = Field(
        None,
        description="The final evaluation of the winners (`spec.final_evaluation`): `status` "
        "pending, complete (with `k`, `evaluated_at` and the `results` by trial number: "
        "`test_is_nll`, `n_examples`, `best_epoch`), skipped or failed (with the `reason`). "
        "Null when off.",
    )


class TrialPage(BaseModel):
    study: str
    total: int
    offset: int
    limit: int
    trials: list[TrialSummary]


class EnqueueRequest(BaseModel):
    """Known configurations to try first (for example the untuned default)."""

    model_config = ConfigDict(extra="forbid")

    params: list[dict[str, ParamValue]] = Field(..., min_length=1, max_length=1000)


class EnqueueResponse(BaseModel):
    enqueued: int
