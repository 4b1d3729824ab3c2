"""Optuna samplers and pruners built from a study spec, with their settings pinned.

Optuna 5 changed defaults (TPE is multivariate with constant liar), so every setting a sampler
depends on is passed explicitly and recorded with the study: an upgrade cannot silently change
how an old study samples.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hpo_service.errors import InvalidSpec
from hpo_service.grid import StudyGridSampler
from hpo_service.phase_pruning import PhaseAwarePruner, PrimaryMetricPruner
from hpo_service.schemas import ParamValue, PrunerSpec, SamplerSpec, StudySpec


def build_sampler(
    spec: SamplerSpec, grid: Mapping[str, Sequence[ParamValue]] | None = None
) -> BaseSampler:
    """Raises ``InvalidSpec`` naming ``sampler.name`` when the sampler cannot be built here.

    ``grid``: the grid sampler's points per parameter (``hpo_service.grid.study_grid``).
    """
    if spec.name == "grid":
        if grid is None:
            raise InvalidSpec("sampler.name", "the grid sampler needs the study's search space")
        return StudyGridSampler(grid, seed=spec.seed)
    with warnings.catch_warnings():
        # QMC, GP and Wilcoxon are flagged experimental; the spec pins their settings.
        warnings.simplefilter("ignore", ExperimentalWarning)
        return _build_sampler(spec)


def _build_sampler(spec: SamplerSpec) -> BaseSampler:
    if spec.name == "tpe":
        return optuna.samplers.TPESampler(
            seed=spec.seed,
            n_startup_trials=spec.n_startup_trials,
            multivariate=spec.multivariate,
            constant_liar=spec.constant_liar,
        )
    if spec.name == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if spec.name == "qmc":
        return optuna.samplers.QMCSampler(
            seed=spec.seed, warn_independent_sampling=False, warn_asynchronous_seeding=False
        )
    if spec.name == "cmaes":
        return ConstraintBlindCmaEsSampler(
            seed=spec.seed, n_startup_trials=spec.n_startup_trials, warn_independent_sampling=False
        )
    if spec.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=spec.seed, population_size=spec.population_size)
    if spec.name == "gp":
        try:
            return optuna.samplers.GPSampler(
                seed=spec.seed,
                n_startup_trials=spec.n_startup_trials,
                warn_independent_sampling=False,
            )
        except ImportError as error:  # GPSampler needs torch, which the server image lacks
            raise InvalidSpec(
                "sampler.name", f"the 'gp' sampler is not available on this server: {error}"
            ) from error
    raise InvalidSpec("sampler.name", f"unknown sampler {spec.name!r}")


class ConstraintBlindCmaEsSampler(optuna.samplers.CmaEsSampler):
    """CMA-ES, which cannot use constraints, without its warning on every trial that has them:
    the service records collapse and divergence constraints on every trial (for ``best``, the
    reports and the dashboard), so the warning would fire on each ``tell``."""

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="Constraints have been set", category=UserWarning
            )
            super().after_trial(study, trial, state, values)


def build_pruner(
    spec: PrunerSpec, epochs: int, primary: tuple[int, StudyDirection] | None = None
) -> BasePruner:
    """The spec's pruner, wrapped to decide only at comparable schedule points unless
    ``phase_aware`` is off. ``primary``: the objective index and direction a multi-objective
    study prunes on (``StudySpec.pruning_primary``); None for one objective."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        pruner = _build_pruner(spec, epochs)
    if isinstance(pruner, optuna.pruners.NopPruner) or not (spec.phase_aware or primary):
        return pruner
    if not spec.phase_aware:  # a multi-objective study still needs its primary metric
        return PrimaryMetricPruner(pruner, primary)
    return PhaseAwarePruner(pruner, primary)


def pruning_primary(spec: StudySpec) -> tuple[int, StudyDirection] | None:
    """The objective a multi-objective study prunes on, as (index, direction); None otherwise."""
    metric = spec.pruning_metric
    if len(spec.objectives) == 1 or metric is None:
        return None
    index = spec.metric_names.index(metric)
    return index, StudyDirection[spec.directions[index].upper()]


def _build_pruner(spec: PrunerSpec, epochs: int) -> BasePruner:
    pruner: BasePruner
    if spec.name == "none":
        return optuna.pruners.NopPruner()
    if spec.name == "median":
        pruner = optuna.pruners.MedianPruner(
            n_startup_trials=spec.n_startup_trials, n_warmup_steps=spec.n_warmup_steps
        )
    elif spec.name == "percentile":
        pruner = optuna.pruners.PercentilePruner(
            spec.percentile,
            n_startup_trials=spec.n_startup_trials,
            n_warmup_steps=spec.n_warmup_steps,
        )
    elif spec.name == "successive_halving":
        pruner = optuna.pruners.SuccessiveHalvingPruner(
            min_resource=spec.min_resource, reduction_factor=spec.reduction_factor
        )
    elif spec.name == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(
            min_resource=spec.min_resource,
            max_resource=max(epochs, spec.min_resource),
            reduction_factor=spec.reduction_factor,
        )
    elif spec.name == "wilcoxon":
        pruner = optuna.pruners.WilcoxonPruner(n_startup_steps=spec.n_warmup_steps)
    else:
        raise InvalidSpec("pruner.name", f"unknown pruner {spec.name!r}")
    if spec.patience is not None:
        pruner = optuna.pruners.PatientPruner(pruner, spec.patience, min_delta=spec.min_delta)
    return pruner


def describe(obj: Any) -> dict[str, Any]:
    """What a sampler or pruner was built with, for the study's attributes."""
    settings = {
        key.lstrip("_"): value
        for key, value in vars(obj).items()
        if isinstance(value, int | float | str | bool | type(None))
    }
    described: dict[str, Any] = {"class": type(obj).__name__, "settings": settings}
    inner = getattr(obj, "inner", None)  # a wrapper (phase-aware pruning): what it wraps
    if inner is not None:
        described["inner"] = describe(inner)
    return described
