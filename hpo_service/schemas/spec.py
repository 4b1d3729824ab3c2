"""What a user submits to create a study: the spec, its budget, objectives, sampler, pruner,
constraints, and the overrides of the default search space (pydantic only).

Raises ``pydantic.ValidationError`` (a ``ValueError``) naming the field and the reason.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from ._fields import Direction, ParamValue, SpecNumber, WholeNumber, finite_number, refuse_bool
from .train_config import TRAIN_CONFIG_FIELDS, DatasetName, ModelKind

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


class ParamSpec(BaseModel):
    """One search dimension: a float/int range, or a categorical set of choices.

    Used both for the built-in defaults and for a user's overrides; an override replaces only the
    keys it sets (``{"high": 1e-2}`` keeps the default's ``low`` and ``log``).
    """

    model_config = ConfigDict(extra="forbid")

    type: Literal["float", "int", "categorical"] | None = None
    low: float | None = None
    high: float | None = None
    log: StrictBool | None = None
    step: float | None = None
    choices: list[ParamValue] | None = None

    _bounds_not_bool = field_validator("low", "high", "step", mode="before")(refuse_bool)

    @model_validator(mode="after")
    def _shape(self) -> ParamSpec:
        for name in ("low", "high", "step"):
            finite_number(getattr(self, name), name)
        if self.choices is not None:
            if not self.choices:
                raise ValueError("`choices` must not be empty")
            for choice in self.choices:
                if isinstance(choice, float):
                    finite_number(choice, "choices")
            if self.low is not None or self.high is not None:
                raise ValueError("give either `choices` or `low`/`high`, not both")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"`step` must be positive (got {self.step:g})")
        return self


class Budget(BaseModel):
    """How much a study may spend. Absurd budgets are refused rather than queued forever."""

    model_config = ConfigDict(extra="forbid")

    n_trials: WholeNumber = Field(20, ge=1, le=100_000, description="Trials to finish in total.")
    timeout_s: float | None = Field(
        None, gt=0, le=30 * 24 * 3600, description="No new trials after this many seconds."
    )
    max_concurrent: WholeNumber = Field(4, ge=1, le=1024, description="Trials running at once.")
    max_failed: WholeNumber = Field(
        10, ge=1, le=100_000, description="Stop the study after this many final failures."
    )

    _timeout_not_bool = field_validator("timeout_s", mode="before")(refuse_bool)

    @field_validator("timeout_s")
    @classmethod
    def _finite_timeout(cls, value: float | None) -> float | None:
        finite_number(value, "timeout_s")
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
    # An optional integer refuses JSON booleans too (WholeNumber cannot carry bounds in a union).
    _seed_not_bool = field_validator("seed", mode="before")(refuse_bool)
    # Random trials before TPE/GP/CMA-ES model the space. 4, not Optuna's 10: at 16–32 trials
    # TPE with 4 beat TPE with 10 on 7 of 9 seeds (benchmarks/sampler_defaults.py, digits,
    # docs/benchmarks.md "Sampler defaults"); with 10 of 16 trials random, TPE chose only 6.
    n_startup_trials: WholeNumber = Field(4, ge=0, le=10_000)
    multivariate: StrictBool = True  # Optuna 5's TPE default, pinned explicitly
    constant_liar: StrictBool = True  # keeps concurrent workers from sampling the same point
    population_size: WholeNumber = Field(20, ge=2, le=10_000)  # nsga2
    # grid: every combination of the searched values (choices, or ranges with a `step`); the
    # study's `n_trials` is capped at the number of combinations, so it ends with the grid.


class PrunerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: PrunerName = "median"
    n_startup_trials: WholeNumber = Field(5, ge=0, le=10_000)
    n_warmup_steps: WholeNumber = Field(2, ge=0, le=100_000, description="Epochs before pruning.")
    percentile: SpecNumber = Field(25.0, gt=0, lt=100)
    min_resource: WholeNumber = Field(1, ge=1)
    reduction_factor: WholeNumber = Field(3, ge=2)
    patience: int | None = Field(None, ge=0, description="Wrap in PatientPruner when set.")
    _patience_not_bool = field_validator("patience", mode="before")(refuse_bool)
    min_delta: SpecNumber = Field(0.0, ge=0)
    phase_aware: StrictBool = Field(
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

    active_units: StrictBool = Field(True, description="Require at least `min_active_units` units.")
    min_active_units: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Active units (Burda et al. 2016) a feasible trial needs; default: "
        "`min_active_fraction` of the latent size, rounded up, at least 1.",
    )
    _units_not_bool = field_validator("min_active_units", mode="before")(refuse_bool)
    min_active_fraction: SpecNumber = Field(0.1, gt=0, le=1)
    kl: StrictBool = Field(True, description="Require the validation KL to reach `min_kl`.")
    min_kl: SpecNumber = Field(
        0.1, gt=0, le=1e6, description="Nats per example; below it the posterior collapsed."
    )
    finite: StrictBool = Field(
        True,
        description="A diverged trial (non-finite loss) completes as infeasible with the worst "
        "value seen in the study, instead of failing unseen by the sampler.",
    )


class LRRangeTestSpec(BaseModel):
    """The LR range test as a study step (Smith 2017, §3.3; ``trainers.lr_finder``).

    Enabled, the study's first lease is an ``lr_range_test`` task on the study's model, data
    and batch size; its curve sets the ``base_lr`` and ``max_lr_factor`` ranges before the first
    trial is sampled (``hpo_service.lr_range``). Off by default: it costs one probe's time up
    front and holds every trial back until a worker that runs the task (``hpo-worker``) has run
    it; a failed probe keeps the default ranges and says so.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: StrictBool = False
    start_lr: SpecNumber = Field(1e-6, gt=0, le=10.0, description="First LR scanned (effective).")
    end_lr: SpecNumber = Field(1.0, gt=0, le=100.0, description="Last LR scanned (effective).")
    num_iter: WholeNumber = Field(100, ge=10, le=5000, description="Steps of the exponential ramp.")
    smooth: SpecNumber = Field(0.98, ge=0, lt=1, description="β of fastai's debiased EMA.")
    diverge_threshold: SpecNumber = Field(
        4.0, gt=1, le=1000, description="Stop once the smoothed loss exceeds this × its best."
    )

    @model_validator(mode="after")
    def _ramp(self) -> LRRangeTestSpec:
        for name in ("start_lr", "end_lr", "smooth", "diverge_threshold"):
            finite_number(getattr(self, name), name)
        if self.end_lr <= self.start_lr:
            raise ValueError(
                f"`end_lr` must be greater than `start_lr` (got {self.end_lr:g} <= "
                f"{self.start_lr:g})"
            )
        return self


class FinalEvaluationSpec(BaseModel):
    """The final evaluation of a study's winners (issue 14.4, ``hpo_service.final_eval``).

    Enabled, once the study has ended (budget spent, no trial running) one
    ``final_evaluation`` task re-evaluates its best ``top_k`` completed trials from their kept
    best models: IS-NLL with ``k`` importance samples (Burda et al. 2016, Eq. 8) on the full
    test split. Off by default: at k = 5000 it decodes 5000 samples per test example per
    winner, minutes of CPU per winner on MNIST-sized data, which a short study should not pay
    unasked. Only trials that kept a best model (``HPO_BEST_MODELS_KEPT``) can be evaluated.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: StrictBool = False
    top_k: WholeNumber = Field(
        3, ge=1, le=20, description="How many of the best trials to evaluate."
    )
    k: WholeNumber = Field(
        5000, ge=1, le=100_000, description="Importance samples per test example."
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
    epochs: WholeNumber = Field(10, ge=1, le=10_000, description="Epochs per trial.")
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
    max_retries: WholeNumber = Field(
        2, ge=0, le=100, description="Retries of a trial whose lease expired."
    )
    constraints: ConstraintSpec = Field(
        default_factory=ConstraintSpec, description="Collapse and divergence constraints."
    )
    curated_starts: StrictBool = Field(
        False,
        description="Enqueue known-good VAE configurations first (hpo_service.curated_starts), "
        "adapted to the study's epochs and space.",
    )
    lr_range_test: LRRangeTestSpec = Field(
        default_factory=LRRangeTestSpec,
        description="Run the LR range test first and set the `base_lr`/`max_lr_factor` ranges "
        "from its curve (off by default).",
    )
    final_evaluation: FinalEvaluationSpec = Field(
        default_factory=FinalEvaluationSpec,
        description="Re-evaluate the best trials once the study ends: IS-NLL with `k` samples "
        "on the full test split (off by default).",
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
        if self.lr_range_test.enabled:
            self._check_lr_range_test()
        if len(self.objectives) > 1 and self.sampler.name in {"gp", "cmaes"}:
            raise ValueError(
                f"`sampler.name` {self.sampler.name!r} supports one objective; "
                "use tpe, nsga2, random or qmc for several"
            )
        return self

    def _check_lr_range_test(self) -> None:
        """The test sets the ``base_lr`` range, so ``base_lr`` must be searched on the default
        range: a fixed, dropped or user-ranged ``base_lr`` would be silently overridden."""
        where = "`lr_range_test.enabled`"
        if "base_lr" in self.fixed or "base_lr" in self.drop:
            raise ValueError(
                f"{where}: the test sets the `base_lr` range, but `base_lr` is not searched"
            )
        for name in ("base_lr", "max_lr_factor", "max_lr"):
            if name in self.search_space:
                raise ValueError(
                    f"{where}: the test sets the `base_lr`/`max_lr_factor` ranges; drop "
                    f"`search_space.{name}` or switch the test off"
                )

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
