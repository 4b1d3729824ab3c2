"""The worker protocol, one trial at a time: lease, heartbeat, report, complete, fail
(pydantic only). Metrics are bounded and must be finite; a 422 names the offending key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ._fields import StrictNumber

#: Most characters of a program's last output a worker may store with its trial.
OUTPUT_TAIL_CHARS = 4000


class LeaseRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"worker_id": "gpu-box-1-cuda0", "wait_s": 20}]},
    )

    worker_id: str = Field(..., min_length=1, max_length=200)
    wait_s: StrictNumber = Field(0.0, ge=0, le=60, description="Long-poll up to this many seconds.")
    device: str | None = Field(None, max_length=100)


class Lease(BaseModel):
    """A trial to train, and how to talk about it (the answer of ``POST /v1/leases``)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "trial_id": 42,
                    "trial_number": 7,
                    "study": "mnist5k-vae",
                    "lease_token": "q1Wc3vXb0nT9r8Lk2JmP4sYd6FhG5aZe",
                    "config": {"dataset": "mnist5k", "epochs": 10, "base_lr": 0.0012},
                    "objective_metrics": ["val_neg_elbo"],
                    "report_metric": "val_neg_elbo",
                    "heartbeat_interval_s": 10.0,
                    "lease_timeout_s": 60.0,
                }
            ]
        }
    )

    trial_id: int = Field(..., description="Put it in the trial URLs (`/v1/trials/{trial_id}/…`).")
    trial_number: int = Field(..., description="The trial's number within its study (0-based).")
    study: str
    lease_token: str = Field(..., description="Send it with every call about this trial.")
    config: dict[str, Any] = Field(
        ..., description="The full resolved training settings (`TrainConfig`), by field name."
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="What the sampler chose, by parameter name (a subset of what `config` "
        "resolves, except reparameterised ones such as `max_lr_factor`).",
    )
    objective_metrics: list[str] = Field(
        ...,
        description="The metrics whose final values complete the trial: `complete`'s `values` "
        "hold one number per name, in this order.",
    )
    report_metric: str | None = Field(
        ...,
        description="The metric to send as `value` in each epoch's `report`, which the pruner "
        "compares across trials; for a multi-objective study, the pruner's primary metric "
        "(`pruner.metric`) or null when it has none (no pruning: report `metrics` only).",
    )
    heartbeat_interval_s: float = Field(..., description="Send a heartbeat this often.")
    worker_id: str | None = Field(
        None,
        description="The lease identity holding it: the request's `worker_id`, or one of the "
        "batched request's `slots`.",
    )
    lease_timeout_s: float = Field(
        ..., description="Without a heartbeat or report for this long the trial is failed."
    )


class LeaseToken(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lease_token: str = Field(
        ...,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_\-]+$",
        description="The `lease_token` of the lease (URL-safe base64 characters).",
    )


# --- bounds on what a report or completion may store (issue 13.4) ---------------------------
#: Metrics per report or completion; a trainer sends ~20.
MAX_METRICS = 256
#: Values in one list-valued metric (``kl_per_dim`` has one per latent dimension, ≤ 1024).
MAX_METRIC_LIST = 4096
MAX_METRIC_NAME = 100
MetricName = Annotated[str, Field(min_length=1, max_length=MAX_METRIC_NAME)]
MetricValue = StrictNumber | Annotated[list[StrictNumber], Field(max_length=MAX_METRIC_LIST)] | None
MetricsField = Annotated[
    dict[MetricName, MetricValue],
    Field(
        max_length=MAX_METRICS,
        description=f"Named numbers (or lists of numbers), at most {MAX_METRICS} names of at "
        f"most {MAX_METRIC_NAME} characters and {MAX_METRIC_LIST} values per list. Every "
        "number must be finite (NaN/Infinity → 422 naming the key); send `null` for a value "
        "that could not be computed.",
    ),
]


def _finite_metrics(metrics: Any) -> Any:
    """Refuse NaN/±Infinity inside ``metrics``, naming the key (JSON bodies may carry them)."""
    if not isinstance(metrics, Mapping):
        return metrics
    for key, value in metrics.items():
        items = value if isinstance(value, list) else [value]
        for index, item in enumerate(items):
            if isinstance(item, float) and not math.isfinite(item):
                where = f"{key}.{index}" if isinstance(value, list) else key
                raise ValueError(
                    f"`{where}`: must be a finite number (got {item}); send null for a value "
                    "that could not be computed"
                )
    return metrics


class HeartbeatAnswer(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"action": "continue", "reason": None},
                {"action": "stop", "reason": "the study was cancelled"},
            ]
        }
    )

    action: Literal["continue", "stop"] = Field(
        ..., description="`stop`: the study was stopped or cancelled; end the trial with `fail`."
    )
    reason: str | None = None


class ReportRequest(LeaseToken):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "lease_token": "TOKEN-FROM-THE-LEASE",
                    "epoch": 3,
                    "value": 142.7,
                    "metrics": {"val_kl": 12.1, "active_units": 14, "beta": 0.6, "lr": 1e-3},
                }
            ]
        },
    )
    epoch: int = Field(
        ...,
        ge=0,
        le=1_000_000,
        description="The epoch just finished, counted from 1 as `hpo-worker` sends it (0 is "
        "accepted). Stored as the step of Optuna's intermediate value; the pruner's "
        "`n_warmup_steps` counts these.",
    )
    value: StrictNumber | None = None  # the report_metric's value this epoch
    metrics: MetricsField = Field(default_factory=dict)

    _metrics_finite = field_validator("metrics", mode="before")(_finite_metrics)


class ReportAnswer(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"action": "continue", "reason": None},
                {"action": "prune", "reason": "pruned at epoch 4"},
            ]
        }
    )

    action: Literal["continue", "prune", "stop"] = Field(
        ...,
        description="`prune`: stop training and send `fail` with `pruned: true`; `stop`: the "
        "study was cancelled, send `fail`.",
    )
    reason: str | None = None


class CompleteRequest(LeaseToken):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "lease_token": "TOKEN-FROM-THE-LEASE",
                    "values": [139.4],
                    "metrics": {"test_neg_elbo": 141.2, "test_is_nll": 136.9},
                }
            ]
        },
    )
    values: list[StrictNumber] = Field(
        ...,
        min_length=1,
        max_length=3,
        description="One finite number per name in the lease's `objective_metrics`, in that "
        'order (numbers only: the string "1.0" is refused).',
    )
    metrics: MetricsField = Field(default_factory=dict)

    _metrics_finite = field_validator("metrics", mode="before")(_finite_metrics)
    # the last lines a program printed (`hpo agent`), kept as the trial's `output_tail`
    output_tail: str | None = Field(None, max_length=OUTPUT_TAIL_CHARS)


class CompleteAnswer(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"trial_id": 42, "trial_number": 7, "state": "complete", "values": [139.4]}
            ]
        }
    )

    trial_id: int
    trial_number: int
    state: Literal["complete"]
    values: list[float]


class FailRequest(LeaseToken):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"lease_token": "TOKEN", "reason": "CUDA out of memory", "retryable": True}
            ]
        },
    )
    reason: str = Field(..., max_length=4000)
    retryable: bool = False
    pruned: bool = False  # the worker stopped because the server said prune
    output_tail: str | None = Field(None, max_length=OUTPUT_TAIL_CHARS)  # as in CompleteRequest
    # The loss or the objective became non-finite: the server completes the trial as infeasible
    # (``constraints.finite``) instead of failing it.
    diverged: bool = False


class FailAnswer(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"trial_id": 42, "state": "fail", "retry_trial_number": 12}]
        }
    )

    trial_id: int
    state: str
    retry_trial_number: int | None = None
