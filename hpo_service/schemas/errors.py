"""The error body every 4xx/5xx answer carries (pydantic only)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    code: str
    message: str
    details: list[dict[str, Any]] = Field(default_factory=list)
    state: str | None = Field(
        None,
        description="With `trial_finished` and `trial_reaped` only: how the trial ended "
        "(`complete`, `pruned` or `fail`).",
    )


class ErrorResponse(BaseModel):
    error: ErrorBody
