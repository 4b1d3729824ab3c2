"""Posterior collapse and divergence as Optuna constraints the sampler learns from.

Optuna 5 treats a trial as *feasible* when every constraint value is ≤ 0. TPE ranks infeasible
trials after every feasible one (by their summed violation) when it splits good from bad;
NSGA-II/III use constrained domination; GP models each constraint and multiplies its expected
improvement by the probability of feasibility; ``Study.best_trial(s)`` skips infeasible trials.
Random, QMC and CMA-ES ignore constraints (CMA-ES warns; the service silences that warning).

Each trial records, in order and only for the constraints the spec enables:

* ``active_units`` — ``(m − AU) / m`` with AU the trial's active units (Burda et al. 2016,
  Var_x E_q[z_u] > 0.01) and ``m`` the minimum (default 10 % of the latent size, at least 1);
* ``kl`` — ``(κ − KL) / κ`` with KL the validation KL in nats per example and κ the floor;
* ``finite`` — 0 for a run whose loss stayed finite, 1 for a diverged one.

Each violation is normalised to at most 1, so the sum TPE ranks by weighs the constraints alike,
and a diverged trial — every constraint set to 1, since nothing of it could be measured — ranks
below every collapsed one. Negative values (how far inside the feasible side) are kept: GP's
constraint models learn from the margin.

A diverged trial completes with the **worst value of any completed trial of the study** (and no
better than its own last finite report): GP fits its objective model on every completed trial,
infeasible ones included, so the value must say "bad" without being an outlier that swamps the
model's standardisation; TPE and NSGA rank it by violation alone. With no value seen anywhere
yet (the study's first trial diverged before its first report) there is nothing honest to tell,
so it is told PRUNED with its constraints set: TPE still sees it as infeasible.

Storage: the values go into the trial's system attribute ``constraints`` as a list — the format
optuna-dashboard 0.21 reads (its history, timeline and parallel-coordinate plots grey out
infeasible trials) and that Optuna reads as constraints ``"0"``, ``"1"``…; Optuna's newer
per-key format (``Trial.set_constraint``) is invisible to that dashboard. The names and a
readable verdict go into the user attribute ``feasibility``, shown on the dashboard's trial page.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hpo_service.errors import InvalidSpec
from hpo_service.schemas import ConstraintSpec, StudySpec, TrainConfig

#: Optuna's system attribute for constraint values (the list format; see the module docstring).
CONSTRAINTS_ATTR = "constraints"
#: User attribute with the constraints' names, values and the verdict.
FEASIBILITY_ATTR = "feasibility"
#: A violation at its worst: what an unmeasurable constraint of a diverged trial gets.
WORST_VIOLATION = 1.0


@dataclass(frozen=True)
class TrialConstraints:
    """One trial's constraint values, in the spec's order (``names``)."""

    names: tuple[str, ...]
    values: tuple[float, ...]
    unmeasured: tuple[str, ...] = ()  # enabled, but the trial did not report the metric
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return all(value <= 0 for value in self.values)

    def system_attrs(self) -> dict[str, Any]:
        return {CONSTRAINTS_ATTR: list(self.values)} if self.names else {}

    def user_attrs(self) -> dict[str, Any]:
        if not self.names:
            return {}
        verdict = {
            "feasible": self.feasible,
            "violated": [n for n, v in zip(self.names, self.values, strict=True) if v > 0],
            "values": dict(zip(self.names, self.values, strict=True)),
            **self.detail,
        }
        if self.unmeasured:
            verdict["unmeasured"] = list(self.unmeasured)
        return {FEASIBILITY_ATTR: verdict}


def enabled(spec: ConstraintSpec) -> tuple[str, ...]:
    """The constraints a study records, in their fixed order."""
    flags = (("active_units", spec.active_units), ("kl", spec.kl), ("finite", spec.finite))
    return tuple(name for name, on in flags if on)


def min_active_units(spec: ConstraintSpec, latent_dim: int) -> int:
    """The spec's minimum, or ``min_active_fraction`` of the latent size rounded up (≥ 1)."""
    if spec.min_active_units is not None:
        return spec.min_active_units
    return max(1, math.ceil(spec.min_active_fraction * latent_dim))


def _latent_dim(config: Mapping[str, Any]) -> int:
    value = config.get("latent_dim", TrainConfig.model_fields["latent_dim"].default)
    return int(value)


def _metric(metrics: Mapping[str, Any], name: str) -> float | None:
    value = metrics.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def measure(
    spec: ConstraintSpec, config: Mapping[str, Any], metrics: Mapping[str, Any]
) -> TrialConstraints:
    """Constraint values of a trial that trained to the end with finite values.

    ``config``: the trial's resolved training config; ``metrics``: its final metrics
    (``active_units``, ``val_kl`` in nats per example). A metric the trial did not report
    cannot be said to be violated: its constraint is recorded as 0 and listed as unmeasured.
    """
    names, values, unmeasured = [], [], []
    detail: dict[str, Any] = {}
    for name in enabled(spec):
        names.append(name)
        if name == "finite":
            values.append(0.0)
            continue
        if name == "active_units":
            minimum: float = min_active_units(spec, _latent_dim(config))
            measured = _metric(metrics, "active_units")
            detail["min_active_units"] = minimum
        else:
            minimum, measured = spec.min_kl, _metric(metrics, "val_kl")
            detail["min_kl"] = minimum
        if measured is None:
            unmeasured.append(name)
            values.append(0.0)
        else:
            values.append((minimum - measured) / minimum)
    return TrialConstraints(tuple(names), tuple(values), tuple(unmeasured), detail)


def diverged(spec: ConstraintSpec) -> TrialConstraints:
    """A diverged trial: every enabled constraint at its worst (nothing could be measured)."""
    names = enabled(spec)
    return TrialConstraints(names, tuple(WORST_VIOLATION for _ in names), detail={"diverged": True})


def penalty_values(
    directions: Sequence[StudyDirection],
    completed: Sequence[FrozenTrial],
    last_reported: float | None,
) -> list[float] | None:
    """The values a diverged trial completes with: per objective, the worst of every completed
    trial's value (and of the trial's own last finite report, for the first objective). None
    when nothing has been seen yet (see the module docstring)."""
    penalty: list[float] = []
    for index, direction in enumerate(directions):
        seen = [
            t.values[index]
            for t in completed
            if t.values is not None and math.isfinite(t.values[index])
        ]
        if index == 0 and last_reported is not None and math.isfinite(last_reported):
            seen.append(last_reported)
        if not seen:
            return None
        penalty.append(max(seen) if direction == StudyDirection.MINIMIZE else min(seen))
    return penalty


def is_feasible(trial: FrozenTrial) -> bool:
    """Whether a finished trial satisfies every constraint it recorded (none: feasible)."""
    return all(value <= 0 for value in trial.constraints.values())


def check_constraints(spec: StudySpec, latent_dims: Sequence[int]) -> None:
    """Refuse a minimum of active units that no trial of the space could reach.

    ``latent_dims``: the latent sizes the study can train (fixed, or the searched range's ends).
    Raises ``InvalidSpec`` naming ``constraints.min_active_units``.
    """
    minimum = spec.constraints.min_active_units
    if not spec.constraints.active_units or minimum is None or not latent_dims:
        return
    largest = max(latent_dims)
    if minimum > largest:
        raise InvalidSpec(
            "constraints.min_active_units",
            f"{minimum} active units cannot be reached with at most {largest} latent dimensions",
        )


# --- recording: called from the service's completion and failure paths ------------------------


def record_completed(
    storage: BaseStorage, trial_id: int, spec: StudySpec, metrics: Mapping[str, Any]
) -> TrialConstraints:
    """Write a completing trial's constraint values (before it is told COMPLETE)."""
    config = storage.get_trial_user_attrs(trial_id).get("config") or {}
    constraints = measure(spec.constraints, config, metrics)
    _write(storage, trial_id, constraints)
    return constraints


def settle_diverged(
    study: optuna.Study, trial: FrozenTrial, spec: StudySpec, reason: str
) -> str | None:
    """Tell a diverged RUNNING trial as infeasible: COMPLETE with ``penalty_values``, or PRUNED
    when no value was seen yet (module docstring). Returns the state told ("complete" or
    "pruned"), or None when ``constraints.finite`` is off and the caller fails it as before."""
    if not spec.constraints.finite:
        return None
    constraints = diverged(spec.constraints)
    _write(study._storage, trial._trial_id, constraints)
    study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason[:2000])
    finite_reports = [v for _, v in sorted(trial.intermediate_values.items()) if math.isfinite(v)]
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    values = penalty_values(
        study.directions, completed, finite_reports[-1] if finite_reports else None
    )
    if values is None:
        study.tell(trial.number, state=TrialState.PRUNED)
        return "pruned"
    study.tell(trial.number, values)
    return "complete"


def feasibility_of(trial: FrozenTrial) -> bool | None:
    """A finished trial's verdict for the API: None when it recorded no constraints."""
    return is_feasible(trial) if trial.constraints else None


def _write(storage: BaseStorage, trial_id: int, constraints: TrialConstraints) -> None:
    for key, value in constraints.system_attrs().items():
        storage.set_trial_system_attr(trial_id, key, value)
    for key, value in constraints.user_attrs().items():
        storage.set_trial_user_attr(trial_id, key, value)
