"""A trial's own records (issue 14): its per-epoch history, its resolved config, and the
reproducibility record a worker sends when it starts training it (pydantic only)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .worker import LeaseToken

#: What ``trainers.precision`` chose: fp32, or bf16 autocast around the forward pass.
Precision = Literal["fp32", "bf16 autocast"]


class ReproRecord(BaseModel):
    """What a rerun needs to know beyond the config: code, libraries, device, precision, seed."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "package_version": "0.1.0",
                    "git_commit": "fd77aa53a7ce735c2dc0370b4bbd0be535f874d7",
                    "git_dirty": False,
                    "python": "3.12.3",
                    "torch": "2.13.0",
                    "optuna": "5.0.0",
                    "platform": "Linux-6.8-x86_64",
                    "device": "cuda:0",
                    "device_name": "NVIDIA H200",
                    "precision": "bf16 autocast",
                    "seed": 0,
                }
            ]
        },
    )

    package_version: str | None = Field(None, max_length=100, description="vae-hpo's version.")
    git_commit: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{40}$",
        description="`git rev-parse HEAD` of the checkout the trainer runs from; null when it "
        "was installed from a wheel.",
    )
    git_dirty: bool | None = Field(None, description="The checkout had uncommitted changes.")
    python: str = Field(..., max_length=50)
    torch: str | None = Field(None, max_length=50)
    optuna: str | None = Field(None, max_length=50, description="null when not installed.")
    platform: str | None = Field(None, max_length=200)
    device: str = Field(..., max_length=100, description="The torch device trained on.")
    device_name: str = Field(..., max_length=200, description="GPU name or CPU model.")
    precision: Precision = Field(..., description="The precision the run actually used.")
    # ±2**53: a JSON Schema bound is a double, and every integer up to 2**53 is one exactly (a
    # bound of 2**63 - 1 reads as 2**63, so clients saw 2**63 as valid and got a 422).
    seed: int = Field(..., ge=-(2**53), le=2**53)


class RecordRequest(LeaseToken):
    model_config = ConfigDict(extra="forbid")

    record: ReproRecord


class TrialHistory(BaseModel):
    """Every epoch a trial reported, oldest first (``hpo_service.history`` says how compact)."""

    study: str
    trial_number: int
    trial_id: int
    state: str
    max_record_bytes: int = Field(..., description="Largest record kept per epoch (JSON bytes).")
    max_epochs: int = Field(..., description="Most epochs kept per trial.")
    epochs: list[dict[str, Any]] = Field(
        ...,
        description="One record per epoch: `epoch` and the report's `metrics` (numbers to 6 "
        "significant digits; `_dropped` lists what a record over the bound shed).",
    )
    plot: str | None = Field(
        None, description="Path of the diagnostics PNG the dashboard serves, once drawn."
    )


class TrialConfig(BaseModel):
    """A trial's resolved training config and how it ran: enough to rerun it exactly."""

    study: str
    trial_number: int
    trial_id: int
    state: str
    config: dict[str, Any] = Field(..., description="The full resolved `TrainConfig`.")
    params: dict[str, Any]
    seed: int | None
    repro: ReproRecord | None = Field(None, description="Sent by the worker that trained it.")
    worker_device: str | None = Field(None, description="The device its worker asked for.")
