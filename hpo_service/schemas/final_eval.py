"""The ``final_evaluation`` task's result and answer (issue 14.4, ``hpo_service.final_eval``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ._fields import StrictNumber
from .worker import LeaseToken


class WinnerEvaluation(BaseModel):
    """One winner's precise test IS-NLL (Burda et al. 2016, Eq. 8), nats per example."""

    model_config = ConfigDict(extra="forbid")

    trial_number: int = Field(..., ge=0, description="The evaluated trial's number.")
    test_is_nll: StrictNumber = Field(
        ..., allow_inf_nan=False, description="Mean −log p(x) over the test split."
    )
    k: int = Field(..., ge=1, description="Importance samples per example.")
    n_examples: int = Field(..., ge=1, description="Test examples evaluated (the full split).")
    best_epoch: int = Field(..., ge=1, description="The epoch of the kept best model.")
    seconds: StrictNumber | None = Field(None, ge=0)


class FinalEvaluationResult(LeaseToken):
    """A ``final_evaluation`` lease's result: one evaluation per winner of the lease's task."""

    model_config = ConfigDict(extra="forbid")

    results: list[WinnerEvaluation] = Field(..., min_length=1, max_length=20)


class FinalEvaluationAnswer(BaseModel):
    trial_id: int
    trial_number: int
    stored: list[int] = Field(..., description="The trial numbers whose results were stored.")
