"""The worker protocol, one trial at a time: lease, heartbeat, report, complete, fail
(pydantic only). Metrics are bounded and must be finite; a 422 names the offending key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from ._fields import StrictNumber, WholeNumber

#: Most characters of a program's last output a worker may store with its trial.
OUTPUT_TAIL_CHARS = 4000
#: The header of an empty lease answer (204): ``idle`` (no study can give work now: a worker
#: may exit) or ``wait`` (a running study is at its caps or waits on its running trials).
WORK_HEADER = "HPO-Work"

#: What a lease asks a worker to do. ``trial``: train the config and report/complete it;
#: ``lr_range_test``: run the LR range test on the config and send its curve
#: (``POST /v1/trials/{trial_id}/lr-range-test``); ``final_evaluation``: re-evaluate the ended
#: study's winners (``task``) from their kept best models and send the IS-NLLs
#: (``POST /v1/trials/{trial_id}/final-evaluation``). A new kind is one more name here, one more
#: ``task`` shape and one more result route; every kind keeps the lease, heartbeat and reaping
#: rules of a trial.
LeaseKind = Literal["trial", "lr_range_test", "final_evaluation"]
#: Points of an LR range test curve a worker may send (``lr_range_test.num_iter`` ≤ 5000).
MAX_CURVE_POINTS = 5000


def _trials_only() -> list[LeaseKind]:
    return ["trial"]


class LeaseRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"worker_id": "gpu-box-1-cuda0", "wait_s": 20}]},
    )

    worker_id: str = Field(..., min_length=1, max_length=200)
    wait_s: StrictNumber = Field(0.0, ge=0, le=60, description="Long-poll up to this many seconds.")
    device: str | None = Field(None, max_length=100)
    kinds: list[LeaseKind] = Field(
        default_factory=_trials_only,
        min_length=1,
        description="The lease kinds this worker can run (default: trials only, so a worker "
        "that predates a kind never receives it).",
    )


class ResumeFrom(BaseModel):
    """The checkpoint a retry resumes from (issue 14): the latest one an earlier attempt of the
    same parameters stored. Fetch it with ``GET /v1/trials/{trial_id}/resume-checkpoint``."""

    trial_id: int = Field(..., description="The earlier attempt whose checkpoint this is.")
    trial_number: int
    epoch: int = Field(..., description="The checkpoint's epoch: train from `epoch + 1`.")
    bytes: int = Field(..., description="The checkpoint's size in bytes.")
    sha256: str = Field(..., description="SHA-256 (hex) of the checkpoint's bytes.")


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

    kind: LeaseKind = Field(
        "trial",
        description="`trial`: train `config`; `lr_range_test`: run the LR range test on "
        "`config` with the settings in `task` and send the curve to "
        "`/v1/trials/{trial_id}/lr-range-test`; `final_evaluation`: evaluate the winners "
        "listed in `task` and send the results to `/v1/trials/{trial_id}/final-evaluation` "
        "(heartbeat and `fail` as for a trial).",
    )
    task: dict[str, Any] | None = Field(
        None, description="The task's settings for kinds other than `trial` (else null)."
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
    # --- issue 14: checkpoints and resume
    checkpoint_every_epochs: int = Field(
        0,
        ge=0,
        description="Send a checkpoint (`PUT /v1/trials/{trial_id}/checkpoint`) every this many "
        "epochs; 0: do not checkpoint.",
    )
    resume_from: ResumeFrom | None = Field(
        None,
        description="A retry: the earlier attempt's checkpoint to resume from, then say how it "
        "went (`POST /v1/trials/{trial_id}/resumed`); null: start fresh.",
    )
    keep_best_model: bool = Field(
        False,
        description="Send the selected model's weights (`PUT /v1/trials/{trial_id}/best-model`) "
        "before `complete`: the study keeps them for its best trials.",
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
        ...,
        description="`stop`: the study was cancelled; stop training and send `fail` with "
        "`retryable: false` (the trial ends FAIL, no retry). A stopped study (`/stop`) lets "
        "running trials finish: they get `continue`.",
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
    epoch: WholeNumber = Field(
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
        description="`prune`: the trial has ended PRUNED with this answer; stop training "
        "(a `complete` is refused with 409 `trial_finished`; a `fail` with `pruned: true` "
        "answers 200 with the stored result). `stop`: the study was cancelled; stop "
        "training and send `fail` with `retryable: false`.",
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
    retryable: StrictBool = False
    pruned: StrictBool = False  # the worker stopped because the server said prune
    output_tail: str | None = Field(None, max_length=OUTPUT_TAIL_CHARS)  # as in CompleteRequest
    # The loss or the objective became non-finite: the server completes the trial as infeasible
    # (``constraints.finite``) instead of failing it.
    diverged: StrictBool = False


class FailAnswer(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"trial_id": 42, "state": "fail", "retry_trial_number": 12}]
        }
    )

    trial_id: int
    state: str
    retry_trial_number: int | None = None


CurvePoints = Annotated[list[StrictNumber], Field(min_length=0, max_length=MAX_CURVE_POINTS)]


class LRRangeTestResult(LeaseToken):
    """An ``lr_range_test`` lease's result: the curve and the suggestions in config units
    (LRs at the config's ``reference_batch_size``, ``trainers.lr_finder.reference_lrs``)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "lease_token": "TOKEN-FROM-THE-LEASE",
                    "lrs": [1e-6, 1e-5, 1e-4, 1e-3, 1e-2],
                    "losses": [210.0, 205.1, 160.3, 120.9, 400.2],
                    "suggested_base_lr": 4e-5,
                    "suggested_max_lr": 2e-3,
                    "stopped_on_divergence": True,
                    "lr_scale": 1.0,
                    "batch_size": 128,
                }
            ]
        },
    )
    lrs: CurvePoints = Field(..., description="Effective LR at each step of the ramp.")
    losses: CurvePoints = Field(..., description="Raw minibatch objective before each step.")
    smoothed: CurvePoints = Field(default_factory=list, description="Debiased EMA of `losses`.")
    suggested_base_lr: StrictNumber | None = Field(
        ..., description="Where the loss starts to fall, in config units; null: none."
    )
    suggested_max_lr: StrictNumber | None = Field(
        ..., description="Where it stops falling, in config units; null: none."
    )
    stopped_on_divergence: bool = False
    lr_scale: StrictNumber = Field(1.0, gt=0, description="Effective LR ÷ config LR.")
    batch_size: int = Field(..., ge=1)
    seconds: StrictNumber | None = Field(None, ge=0, description="How long the test ran.")

    @field_validator("lrs", "losses", "smoothed", mode="before")
    @classmethod
    def _finite_points(cls, value: Any) -> Any:
        if isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, float) and not math.isfinite(item):
                    raise ValueError(f"point {index} must be a finite number (got {item})")
        return value

    @model_validator(mode="after")
    def _shape(self) -> LRRangeTestResult:
        if len(self.losses) != len(self.lrs):
            raise ValueError(
                f"`losses` must have one point per LR (got {len(self.losses)} for "
                f"{len(self.lrs)} LRs)"
            )
        if self.smoothed and len(self.smoothed) != len(self.lrs):
            raise ValueError("`smoothed` must be empty or have one point per LR")
        base, peak = self.suggested_base_lr, self.suggested_max_lr
        for name, lr in (("suggested_base_lr", base), ("suggested_max_lr", peak)):
            if lr is not None and not (math.isfinite(lr) and lr > 0):
                raise ValueError(f"`{name}` must be a positive finite number (got {lr})")
        if base is not None and peak is not None and not base < peak:
            raise ValueError(
                f"`suggested_max_lr` must be greater than `suggested_base_lr` (got {peak:g} "
                f"<= {base:g})"
            )
        return self


class LRRangeTestAnswer(BaseModel):
    """What the server made of an LR range test: the ranges it set, or why it kept the
    defaults."""

    trial_id: int
    trial_number: int
    status: Literal["applied", "failed"]
    ranges: dict[str, list[float]] = Field(
        default_factory=dict, description="The ranges set, by parameter: [low, high]."
    )
    reason: str | None = None


# --- issue 14: checkpoints and resume ---------------------------------------------------------


class CheckpointAnswer(BaseModel):
    """What the server stored for ``PUT …/checkpoint`` or ``PUT …/best-model``."""

    trial_id: int
    kind: Literal["checkpoint", "best_model"]
    epoch: int
    bytes: int
    sha256: str


class ResumedRequest(LeaseToken):
    """How a retry started (after ``resume_from``): resumed at ``epoch``, or fresh (``epoch``
    null) with the ``reason`` (a missing, corrupt or unfitting checkpoint)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"lease_token": "TOKEN", "from_trial_number": 3, "epoch": 6, "reason": None},
                {
                    "lease_token": "TOKEN",
                    "from_trial_number": 3,
                    "epoch": None,
                    "reason": "SHA-256 mismatch",
                },
            ]
        },
    )
    from_trial_number: int = Field(..., ge=0, description="`resume_from.trial_number`.")
    epoch: int | None = Field(
        None, ge=1, description="The checkpoint's epoch it resumed at; null: started fresh."
    )
    reason: str | None = Field(None, max_length=2000)


class ResumedAnswer(BaseModel):
    trial_id: int
    resumed: bool
    intermediate_values: int = Field(
        ..., description="Intermediate values carried over from the earlier attempt."
    )
