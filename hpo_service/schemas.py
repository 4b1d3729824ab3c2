"""The wire contract: training settings, study specs, and the worker protocol (pydantic only).

``TrainConfig`` is the contract between the service (which samples parameters by these exact
field names) and the trainer. Everything here imports nothing else from the project and no torch,
so both sides, and any client, can validate against it.

Units: every ``*_epochs`` field is measured in epochs (floats allowed) and converted to optimizer
steps by the trainer once the dataset, and so the number of steps per epoch, is known. Learning
rates are given **at the reference batch size** and scaled to ``batch_size`` by exactly one
function (``trainers.schedules.lr_scale_factor``) — the effective LR is what gets reported.

Raises ``pydantic.ValidationError`` (a ``ValueError``) naming the field and the reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

DatasetName = Literal["mnist5k", "digits", "mnist", "fashion-mnist", "synthetic"]
ModelKind = Literal["mlp", "conv", "vaegan"]
Likelihood = Literal["bernoulli", "gaussian"]
Activation = Literal["relu", "gelu", "elu", "silu", "tanh", "leaky_relu"]
LRPolicy = Literal[
    "constant",
    "step",
    "exponential",
    "triangular",
    "triangular2",
    "exp_range",
    "cosine",
    "one_cycle",
]
KLScheduleName = Literal["constant", "linear", "cosine", "sigmoid", "cyclical"]
KLRamp = Literal["linear", "cosine", "sigmoid"]
FreeBitsMode = Literal["batch_mean_per_group", "per_example_per_group", "global"]
OptimizerName = Literal["adamw", "radam", "adam"]
LRScaling = Literal["linear", "sqrt", "none"]

#: LR policies that move between ``base_lr`` and ``max_lr`` and therefore need ``max_lr``.
CYCLICAL_LR_POLICIES: frozenset[str] = frozenset(
    {"triangular", "triangular2", "exp_range", "cosine", "one_cycle"}
)


class TrainConfig(BaseModel):
    """Every knob of one VAE training run. Unknown fields are rejected by name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- data -----------------------------------------------------------------------------
    dataset: DatasetName = "mnist5k"
    data_dir: str | None = None  # local folder for torchvision MNIST / Fashion-MNIST
    download: bool = False  # torchvision may download only when the user asks
    binarize: bool = False  # dynamic binarization: resample x ~ Bernoulli(pixels) each batch
    synthetic_size: int = Field(512, ge=16)  # examples in the tiny `synthetic` set (tests)

    # --- model ----------------------------------------------------------------------------
    model: ModelKind = "mlp"
    hidden_sizes: tuple[int, ...] = (512, 256)  # MLP encoder; the decoder mirrors it
    conv_channels: tuple[int, ...] = (32, 64)  # conv encoder for 28×28 images
    latent_dim: int = Field(16, ge=1, le=1024)
    activation: Activation = "relu"
    likelihood: Likelihood = "bernoulli"
    gaussian_std: float = Field(0.1, gt=0)  # fixed observation σ of the Gaussian likelihood

    # --- run ------------------------------------------------------------------------------
    epochs: int = Field(20, ge=1, le=100_000)
    seed: int = 0
    device: str = "auto"  # "auto" → cuda if available, else cpu; or "cpu", "cuda:0", ...

    # --- batch size and the LR scaling rule (Goyal et al. 2017) ---------------------------
    batch_size: int = Field(128, ge=1)
    reference_batch_size: int = Field(128, ge=1)  # LRs below are given at this batch size
    lr_scaling: LRScaling = "linear"  # sqrt: Malladi et al. 2022 (SDE view of adaptive methods)

    # --- learning-rate policy (Smith 2017; Smith & Topin 2017) -----------------------------
    base_lr: float = Field(1e-3, gt=0, le=10)
    max_lr: float | None = Field(None, gt=0, le=100)  # peak LR of cyclical / one-cycle policies
    lr_policy: LRPolicy = "constant"
    lr_half_cycle_epochs: float = Field(4.0, gt=0)  # Smith's `step_size`, in epochs
    lr_exp_range_gamma: float = Field(0.9999, gt=0, le=1)  # exp_range: scale γ^iteration
    lr_cosine_cycles: int = Field(1, ge=1)  # cosine: number of restarts over the run
    lr_step_epochs: float = Field(10.0, gt=0)  # step decay: epochs between drops
    lr_decay_gamma: float = Field(0.5, gt=0, le=1)  # step: factor per drop; exponential: per epoch
    one_cycle_pct_start: float = Field(0.3, gt=0, lt=1)
    one_cycle_div_factor: float = Field(25.0, gt=1)
    one_cycle_final_div_factor: float = Field(1e4, gt=0)
    one_cycle_three_phase: bool = False
    cycle_beta1: bool = False  # cycle Adam's β1 inversely to the LR (off keeps β1 fixed)
    beta1_min: float = Field(0.85, gt=0, lt=1)
    beta1_max: float = Field(0.95, gt=0, lt=1)
    lr_warmup_epochs: float = Field(0.0, ge=0)  # linear warm-up (Goyal et al.); composes

    # --- KL annealing (Bowman 2016; Sønderby 2016; Fu et al. 2019) -------------------------
    kl_schedule: KLScheduleName = "linear"
    # linear / cosine / sigmoid warm-up length; when not given: min(5, epochs / 2)
    kl_warmup_epochs: float = Field(5.0, ge=0)
    kl_cycles: int = Field(4, ge=1)  # cyclical: M
    kl_ratio: float = Field(0.5, gt=0, le=1)  # cyclical: R, the rising fraction of a cycle
    kl_ramp: KLRamp = "linear"  # cyclical: shape f of the rise
    beta_target: float = Field(1.0, ge=0, le=1000)  # β-VAE when ≠ 1
    beta_min: float = Field(0.0, ge=0)

    # --- free bits (Kingma et al. 2016, IAF appendix) --------------------------------------
    free_bits: float = Field(0.0, ge=0, le=100)  # λ in nats per group; 0 disables
    free_bits_mode: FreeBitsMode = "batch_mean_per_group"

    # --- optimizer (Loshchilov & Hutter 2019; Liu et al. 2020) -----------------------------
    optimizer: OptimizerName = "adamw"
    weight_decay: float = Field(0.0, ge=0, le=10)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)

    # --- gradient clipping ----------------------------------------------------------------
    grad_clip_norm: float = Field(0.0, ge=0)  # global L2 norm; 0 disables
    grad_clip_value: float = Field(0.0, ge=0)  # elementwise; 0 disables

    # --- monitoring -----------------------------------------------------------------------
    active_unit_threshold: float = Field(0.01, gt=0)  # Burda et al. 2016
    active_unit_examples: int = Field(500, ge=2)
    collapse_kl_threshold: float = Field(0.1, ge=0)  # nats/example; below → collapse flag
    final_is_samples: int = Field(100, ge=0)  # k of the final IS-NLL; 5000 for final numbers
    final_is_examples: int = Field(1000, ge=0)  # test examples used for the IS-NLL; 0 = all

    # --- speed ----------------------------------------------------------------------------
    # bf16 autocast. auto: on where the device multiplies bf16 natively (CUDA; CPUs with
    # AVX512-BF16 or AMX), off elsewhere.
    amp: Literal["auto", "bf16", "off"] = "auto"
    compile: bool = False  # torch.compile the model

    # --- VAE-GAN (Larsen et al. 2016) -------------------------------------------------------
    gan_gamma: float = Field(1e-2, ge=0)  # γ: feature-wise reconstruction vs GAN for the decoder
    disc_lr: float | None = Field(None, gt=0)  # discriminator LR at the reference batch size
    decoder_lr: float | None = Field(None, gt=0)  # decoder LR; default: base_lr
    gan_equilibrium: float = Field(0.68, gt=0)  # ≈ ln 2, BCE at chance (official code)
    gan_margin: float = Field(0.35, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _default_warmup(cls, data: Any) -> Any:
        """The default KL warm-up fits any run length: 5 epochs, or half of a shorter run."""
        if isinstance(data, Mapping) and "kl_warmup_epochs" not in data:
            epochs = data.get("epochs", 20)
            if isinstance(epochs, int | float) and not isinstance(epochs, bool) and epochs > 0:
                data = {**data, "kl_warmup_epochs": min(5.0, epochs / 2)}
        return data

    @field_validator(
        "base_lr",
        "max_lr",
        "weight_decay",
        "free_bits",
        "eps",
        "gaussian_std",
        "disc_lr",
        "decoder_lr",
        "kl_warmup_epochs",
        "lr_warmup_epochs",
        "lr_half_cycle_epochs",
    )
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML 1.1 reads a bare ``off`` as false: ``amp: off`` in a config file means "off"."""
        return "off" if value is False else value

    @field_validator("hidden_sizes", "conv_channels")
    @classmethod
    def _positive_sizes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(size < 1 for size in value):
            raise ValueError("must be a non-empty list of positive layer sizes")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.lr_policy in CYCLICAL_LR_POLICIES:
            if self.max_lr is None:
                raise ValueError(f"`max_lr` is required by lr_policy={self.lr_policy!r}")
            if self.max_lr <= self.base_lr:
                raise ValueError(
                    f"`max_lr` must be greater than `base_lr` "
                    f"(got {self.max_lr:g} <= {self.base_lr:g})"
                )
        if self.kl_schedule in {"linear", "cosine", "sigmoid"} and (
            self.kl_warmup_epochs > self.epochs
        ):
            raise ValueError(
                f"`kl_warmup_epochs` ({self.kl_warmup_epochs:g}) is longer than the run "
                f"(`epochs` = {self.epochs})"
            )
        if self.lr_warmup_epochs >= self.epochs:
            raise ValueError(
                f"`lr_warmup_epochs` ({self.lr_warmup_epochs:g}) must be shorter than the run "
                f"(`epochs` = {self.epochs})"
            )
        if self.beta_min > self.beta_target:
            raise ValueError(
                f"`beta_min` ({self.beta_min:g}) must not exceed `beta_target` "
                f"({self.beta_target:g})"
            )
        if self.beta1_min >= self.beta1_max:
            raise ValueError("`beta1_min` must be smaller than `beta1_max`")
        if self.model == "conv" and self.dataset == "digits":
            raise ValueError("`model` 'conv' needs 28×28 images; dataset 'digits' is 8×8")
        return self

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from a trial's resolved parameters (lists become tuples)."""
        return cls.model_validate(dict(values))


#: Field names of ``TrainConfig``: the only names a search space or ``fixed`` may use.
TRAIN_CONFIG_FIELDS: frozenset[str] = frozenset(TrainConfig.model_fields)

#: Reparameterised search dimensions that are not config fields themselves.
#: ``max_lr_factor`` is sampled so that ``max_lr = base_lr * max_lr_factor`` is always larger.
DERIVED_PARAMETERS: frozenset[str] = frozenset({"max_lr_factor"})

#: Metrics a trial reports at its end that a study may optimise, with their natural direction.
OBJECTIVE_METRICS: dict[str, Literal["minimize", "maximize"]] = {
    "val_neg_elbo": "minimize",
    "test_neg_elbo": "minimize",
    "test_is_nll": "minimize",
    "val_recon": "minimize",
    "val_kl": "maximize",
    "active_units": "maximize",
}

SamplerName = Literal["tpe", "gp", "cmaes", "random", "qmc", "nsga2", "grid"]
PrunerName = Literal["none", "median", "percentile", "successive_halving", "hyperband", "wilcoxon"]
Direction = Literal["minimize", "maximize"]
StudyState = Literal["running", "stopped", "cancelled", "completed", "failed"]
JSONScalar = str | int | float | bool | None
ParamValue = str | int | float | bool


def _finite_number(value: float | None, field: str) -> None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"`{field}` must be a finite number (got {value})")


class ParamSpec(BaseModel):
    """One search dimension: a float/int range, or a categorical set of choices.

    Used both for the built-in defaults and for a user's overrides; an override replaces only the
    keys it sets (``{"high": 1e-2}`` keeps the default's ``low`` and ``log``).
    """

    model_config = ConfigDict(extra="forbid")

    type: Literal["float", "int", "categorical"] | None = None
    low: float | None = None
    high: float | None = None
    log: bool | None = None
    step: float | None = None
    choices: list[ParamValue] | None = None

    @model_validator(mode="after")
    def _shape(self) -> ParamSpec:
        for name in ("low", "high", "step"):
            _finite_number(getattr(self, name), name)
        if self.choices is not None:
            if not self.choices:
                raise ValueError("`choices` must not be empty")
            for choice in self.choices:
                if isinstance(choice, float):
                    _finite_number(choice, "choices")
            if self.low is not None or self.high is not None:
                raise ValueError("give either `choices` or `low`/`high`, not both")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"`step` must be positive (got {self.step:g})")
        return self


class Budget(BaseModel):
    """How much a study may spend. Absurd budgets are refused rather than queued forever."""

    model_config = ConfigDict(extra="forbid")

    n_trials: int = Field(20, ge=1, le=100_000, description="Trials to finish in total.")
    timeout_s: float | None = Field(
        None, gt=0, le=30 * 24 * 3600, description="No new trials after this many seconds."
    )
    max_concurrent: int = Field(4, ge=1, le=1024, description="Trials running at once.")
    max_failed: int = Field(
        10, ge=1, le=100_000, description="Stop the study after this many final failures."
    )

    @field_validator("timeout_s")
    @classmethod
    def _finite_timeout(cls, value: float | None) -> float | None:
        _finite_number(value, "timeout_s")
        return value


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: str = "val_neg_elbo"
    direction: Direction | None = None  # default: the metric's natural direction

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value not in OBJECTIVE_METRICS:
            raise ValueError(
                f"unknown objective metric {value!r}; choose one of {sorted(OBJECTIVE_METRICS)}"
            )
        return value

    @property
    def resolved_direction(self) -> Direction:
        return self.direction or OBJECTIVE_METRICS[self.metric]


class SamplerSpec(BaseModel):
    """Optuna sampler and its settings; recorded with the study so its behaviour is reproducible."""

    model_config = ConfigDict(extra="forbid")

    name: SamplerName = "tpe"
    seed: int | None = 0
    n_startup_trials: int = Field(10, ge=0, le=10_000)
    multivariate: bool = True  # Optuna 5's TPE default, pinned explicitly
    constant_liar: bool = True  # keeps concurrent workers from sampling the same point
    population_size: int = Field(20, ge=2, le=10_000)  # nsga2
    # grid: every combination of the searched values (choices, or ranges with a `step`); the
    # study's `n_trials` is capped at the number of combinations, so it ends with the grid.


class PrunerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: PrunerName = "median"
    n_startup_trials: int = Field(5, ge=0, le=10_000)
    n_warmup_steps: int = Field(2, ge=0, le=100_000, description="Epochs before pruning.")
    percentile: float = Field(25.0, gt=0, lt=100)
    min_resource: int = Field(1, ge=1)
    reduction_factor: int = Field(3, ge=2)
    patience: int | None = Field(None, ge=0, description="Wrap in PatientPruner when set.")
    min_delta: float = Field(0.0, ge=0)
    phase_aware: bool = Field(
        True,
        description="Decide only at epochs where the trial's KL weight is at its target and its "
        "LR warm-up is over, against other trials at such epochs (hpo_service.phase_pruning).",
    )
    metric: str | None = Field(
        None,
        description="Multi-objective studies: the objective metric reported each epoch and "
        "pruned on (default: none, no pruning). Single-objective studies prune on their metric.",
    )


class ConstraintSpec(BaseModel):
    """Posterior collapse and divergence as Optuna constraints (``hpo_service.constraints``).

    A trial that violates one completes as *infeasible*: samplers that read constraints (TPE,
    NSGA-II/III, GP) learn to avoid its region, and ``best``, the morning report and warm starts
    never pick it. Each constraint can be switched off; all are on by default.
    """

    model_config = ConfigDict(extra="forbid")

    active_units: bool = Field(True, description="Require at least `min_active_units` units.")
    min_active_units: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Active units (Burda et al. 2016) a feasible trial needs; default: "
        "`min_active_fraction` of the latent size, rounded up, at least 1.",
    )
    min_active_fraction: float = Field(0.1, gt=0, le=1)
    kl: bool = Field(True, description="Require the validation KL to reach `min_kl`.")
    min_kl: float = Field(
        0.1, gt=0, le=1e6, description="Nats per example; below it the posterior collapsed."
    )
    finite: bool = Field(
        True,
        description="A diverged trial (non-finite loss) completes as infeasible with the worst "
        "value seen in the study, instead of failing unseen by the sampler.",
    )


class StudySpec(BaseModel):
    """What a user submits: the data and model, the budget, the objective, and the search."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "mnist5k-vae",
                    "dataset": "mnist5k",
                    "model": "mlp",
                    "epochs": 10,
                    "budget": {"n_trials": 40, "max_concurrent": 2},
                    "sampler": {"name": "tpe", "seed": 0},
                    "pruner": {"name": "median", "n_warmup_steps": 3},
                    "search_space": {"base_lr": {"low": 1e-4, "high": 3e-3, "log": True}},
                    "fixed": {"latent_dim": 16},
                    "drop": ["grad_clip_norm"],
                }
            ]
        },
    )

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,119}$")
    dataset: DatasetName = "mnist5k"
    model: ModelKind = "mlp"
    epochs: int = Field(10, ge=1, le=10_000, description="Epochs per trial.")
    budget: Budget = Field(default_factory=Budget)
    objectives: list[Objective] = Field(
        default_factory=lambda: [Objective()], min_length=1, max_length=3
    )
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    search_space: dict[str, ParamSpec] = Field(
        default_factory=dict, description="Overrides of the default VAE space, or new params."
    )
    fixed: dict[str, Any] = Field(default_factory=dict, description="Config values not searched.")
    drop: list[str] = Field(default_factory=list, description="Default params not to search.")
    max_retries: int = Field(2, ge=0, le=100, description="Retries of a trial whose lease expired.")
    constraints: ConstraintSpec = Field(
        default_factory=ConstraintSpec, description="Collapse and divergence constraints."
    )
    curated_starts: bool = Field(
        False,
        description="Enqueue known-good VAE configurations first (hpo_service.curated_starts), "
        "adapted to the study's epochs and space.",
    )

    @model_validator(mode="after")
    def _names_and_objectives(self) -> StudySpec:
        known = TRAIN_CONFIG_FIELDS | DERIVED_PARAMETERS
        for where, names in (("search_space", self.search_space), ("drop", self.drop)):
            for name in names:
                if name not in known:
                    raise ValueError(f"`{where}.{name}`: unknown parameter")
        for name in self.fixed:
            if name not in TRAIN_CONFIG_FIELDS:
                raise ValueError(f"`fixed.{name}`: unknown training setting")
        for name in ("dataset", "model", "epochs"):
            if name in self.fixed or name in self.search_space:
                raise ValueError(f"`{name}` is set at the top level of the spec, not searched")
        metrics = [objective.metric for objective in self.objectives]
        if len(set(metrics)) != len(metrics):
            raise ValueError("`objectives` must name distinct metrics")
        if self.pruner.metric is not None and self.pruner.metric not in metrics:
            raise ValueError(
                f"`pruner.metric` {self.pruner.metric!r} is not one of the objectives {metrics}"
            )
        if len(self.objectives) > 1 and self.sampler.name in {"gp", "cmaes"}:
            raise ValueError(
                f"`sampler.name` {self.sampler.name!r} supports one objective; "
                "use tpe, nsga2, random or qmc for several"
            )
        return self

    @property
    def directions(self) -> list[Direction]:
        return [objective.resolved_direction for objective in self.objectives]

    @property
    def metric_names(self) -> list[str]:
        return [objective.metric for objective in self.objectives]

    @property
    def pruning_metric(self) -> str | None:
        """The metric reported each epoch and pruned on: the objective of a single-objective
        study, ``pruner.metric`` of a multi-objective one (None: no pruning)."""
        if len(self.objectives) == 1:
            return self.objectives[0].metric
        return self.pruner.metric


# --- REST resources --------------------------------------------------------------------------


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


# --- the worker protocol ---------------------------------------------------------------------


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
#: A number only: the string "1.0" and booleans are refused, ints are taken as floats.
StrictNumber = Annotated[float, Strict()]
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


# --- the batched worker protocol (a population worker drives many trials at once) --------------

#: The most trials one batched request may carry.
MAX_BATCH = 256


class BatchLeaseRequest(LeaseRequest):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"worker_id": "gpu-box-1-pop", "count": 16, "wait_s": 5}]},
    )

    count: int = Field(..., ge=1, le=MAX_BATCH, description="Lease up to this many trials.")


class BatchLeases(BaseModel):
    """Up to ``count`` leases (fewer when the budget, the concurrency caps or the queue run
    out; none after ``wait_s``). A worker's own running trials come back first."""

    leases: list[Lease]


class TrialLease(LeaseToken):
    model_config = ConfigDict(extra="forbid")

    trial_id: int


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

    trial_id: int


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

    trial_id: int


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

    trial_id: int


class BatchFailRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    failures: list[TrialFail] = Field(..., min_length=1, max_length=MAX_BATCH)


class ItemError(BaseModel):
    """Why one trial of a batch was refused: the ``code`` and ``message`` the single-trial route
    would have answered with (``trial_reaped``, ``result_conflict``, ``lease_mismatch``,
    ``trial_not_found``, ``invalid_spec`` with its ``field``)."""

    code: str
    message: str
    field: str | None = None


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


class ErrorBody(BaseModel):
    code: str
    message: str
    details: list[dict[str, Any]] = Field(default_factory=list)


class ErrorResponse(BaseModel):
    error: ErrorBody


# --- recurring sweeps: schedules, firings and the morning report -----------------------------

#: ``per_night`` (default): seed + n, where n counts the schedule's earlier runs, so each night
#: explores new configurations, reproducibly. ``fixed``: every night uses the template's seed —
#: with a seeded sampler that re-samples the same start-up configurations night after night.
SeedPolicy = Literal["fixed", "per_night"]
FiringKind = Literal["scheduled", "catch_up", "manual"]
FiringStatus = Literal["claimed", "created", "skipped", "failed"]


class StudyTemplate(StudySpec):
    """A study spec without ``name``: each run of a schedule names its own study."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "dataset": "mnist5k",
                    "epochs": 10,
                    "budget": {"n_trials": 40, "max_concurrent": 4},
                    "sampler": {"name": "tpe", "seed": 0},
                }
            ]
        },
    )

    # Hidden from the schema and from dumps: every run sets its own name.
    name: SkipJsonSchema[str] = Field("template", exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _no_name(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "name" in data:
            raise ValueError(
                "`name`: a schedule names its studies `{schedule}-{YYYY-MM-DD}`; leave it out"
            )
        return data


class ScheduleSpec(BaseModel):
    """A nightly (or any cron) sweep: when it fires and the study it creates each time."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "nightly-mnist",
                    "cron": "30 2 * * *",
                    "timezone": "Europe/Berlin",
                    "template": {
                        "dataset": "mnist5k",
                        "epochs": 10,
                        "budget": {"n_trials": 40, "max_concurrent": 4},
                    },
                    "warm_start_top_k": 5,
                }
            ]
        },
    )

    name: str = Field(
        ...,
        pattern=r"^[A-Za-z][A-Za-z0-9_.\-]{0,79}$",
        description="Starts with a letter (so a number in a URL is always an id).",
    )
    cron: str = Field(
        ...,
        min_length=1,
        max_length=100,
        description="Five-field cron (minute hour day-of-month month day-of-week) read on the "
        "wall clock of `timezone`.",
    )
    timezone: str = Field("UTC", min_length=1, max_length=64, description="IANA zone name.")
    template: StudyTemplate
    warm_start_top_k: int = Field(
        5, ge=0, le=1000, description="Enqueue the previous run's best k parameter sets first."
    )
    seed_policy: SeedPolicy = "per_night"
    enabled: bool = True
    catchup_grace_s: float | None = Field(
        None,
        ge=60,
        le=7 * 24 * 3600,
        description="Run one missed fire time if it is at most this late; default: the server's "
        "HPO_SCHEDULE_CATCHUP_GRACE_S.",
    )
    regression_threshold: float = Field(
        0.05,
        ge=0,
        le=100,
        description="Flag a run whose best is worse than the best earlier run by more than this "
        "fraction (0.05 = 5 %).",
    )


class ScheduleUpdate(BaseModel):
    """A partial update; fields left out keep their value. A schedule cannot be renamed."""

    model_config = ConfigDict(extra="forbid")

    cron: str | None = Field(None, min_length=1, max_length=100)
    timezone: str | None = Field(None, min_length=1, max_length=64)
    template: StudyTemplate | None = None
    warm_start_top_k: int | None = Field(None, ge=0, le=1000)
    seed_policy: SeedPolicy | None = None
    enabled: bool | None = None
    catchup_grace_s: float | None = Field(None, ge=60, le=7 * 24 * 3600)  # null: the default
    regression_threshold: float | None = Field(None, ge=0, le=100)


class FiringInfo(BaseModel):
    """One fire time of a schedule and what became of it."""

    id: int
    schedule: str
    fire_key: str
    kind: FiringKind
    status: FiringStatus
    scheduled_for: str  # the fire instant, ISO 8601 UTC
    local_time: str  # the wall-clock fire time in the schedule's zone
    study: str | None
    seed: int | None
    warm_started: int  # parameter sets enqueued from the previous run
    detail: str | None
    claimed_at: str | None
    finished_at: str | None


class ScheduleInfo(BaseModel):
    id: int
    name: str
    cron: str
    timezone: str
    template: StudyTemplate
    warm_start_top_k: int
    seed_policy: SeedPolicy
    enabled: bool
    catchup_grace_s: float  # the effective grace period
    regression_threshold: float
    active_since: str
    created_at: str
    updated_at: str
    next_fire_local: str | None  # wall-clock time in `timezone`; None when paused
    next_fire_at: str | None  # the same instant in UTC
    last_firing: FiringInfo | None
    links: dict[str, str] = Field(default_factory=dict)


class ParamDrift(BaseModel):
    """How one parameter of the best trial moved since the previous run's best."""

    name: str
    previous: JSONScalar
    current: JSONScalar
    relative_change: float | None  # (current − previous) / |previous| for numbers, else None
    changed: bool


class NightReport(BaseModel):
    """One run of a schedule: its study's outcome on the report's objective."""

    date: str  # local date of the fire time
    local_time: str
    study: str
    kind: FiringKind
    state: str  # the study's state, or "deleted"
    best_value: float | None
    best_params: dict[str, Any]
    trials: TrialCounts
    drift: list[ParamDrift]
    importances: dict[str, float]  # Optuna's default evaluator (PED-ANOVA in Optuna 5)
    importance_note: str | None
    change_vs_best: float | None  # relative change against the best earlier run, signed so > 0
    # means worse
    regression: bool
    warm_started: int
    seed: int | None
    note: str | None = None  # why a value is missing (no complete trial, study deleted, ...)


class ScheduleReport(BaseModel):
    schedule: str
    timezone: str
    metric: str  # the first objective of the template
    direction: Direction
    note: str | None
    regression_threshold: float
    nights: list[NightReport]  # oldest first
    regressions: list[str]  # studies flagged as regressions
    best_study: str | None
    best_value: float | None
    skipped: list[FiringInfo]  # missed fire times recorded but not run, in the window
