"""Constraint values of a trial (``hpo_service.constraints``): pure, no database."""

from __future__ import annotations

import optuna
import pytest
from optuna.study import StudyDirection
from optuna.trial import TrialState

from hpo_service.constraints import (
    CONSTRAINTS_ATTR,
    diverged,
    is_feasible,
    measure,
    min_active_units,
    penalty_values,
)
from hpo_service.schemas import ConstraintSpec

HEALTHY = {"active_units": 12.0, "val_kl": 25.0}
COLLAPSED = {"active_units": 0.0, "val_kl": 0.02}


@pytest.mark.parametrize(("latent", "expected"), [(1, 1), (4, 1), (16, 2), (32, 4), (64, 7)])
def test_default_minimum_is_ten_percent_of_the_latent_size_rounded_up(
    latent: int, expected: int
) -> None:
    assert min_active_units(ConstraintSpec(), latent) == expected
    assert min_active_units(ConstraintSpec(min_active_units=3), latent) == 3


def test_a_healthy_trial_is_feasible_and_a_collapsed_one_violates_both() -> None:
    spec = ConstraintSpec()
    healthy = measure(spec, {"latent_dim": 16}, HEALTHY)
    assert healthy.names == ("active_units", "kl", "finite")
    assert healthy.feasible and all(v <= 0 for v in healthy.values)
    collapsed = measure(spec, {"latent_dim": 16}, COLLAPSED)
    assert not collapsed.feasible
    assert collapsed.values[0] == pytest.approx(1.0)  # (2 - 0) / 2
    assert collapsed.values[1] == pytest.approx((0.1 - 0.02) / 0.1)
    assert collapsed.values[2] == 0.0
    assert collapsed.user_attrs()["feasibility"]["violated"] == ["active_units", "kl"]


def test_one_active_unit_short_of_the_minimum_is_infeasible() -> None:
    spec = ConstraintSpec(kl=False)
    assert not measure(spec, {"latent_dim": 32}, {"active_units": 3}).feasible
    assert measure(spec, {"latent_dim": 32}, {"active_units": 4}).feasible


def test_the_latent_size_comes_from_the_trials_config() -> None:
    """Two units are enough for latent 16 but not for latent 64 (minimum 7)."""
    spec = ConstraintSpec(kl=False)
    assert measure(spec, {"latent_dim": 16}, {"active_units": 2}).feasible
    assert not measure(spec, {"latent_dim": 64}, {"active_units": 2}).feasible


def test_each_constraint_can_be_switched_off() -> None:
    off = ConstraintSpec(active_units=False, kl=False, finite=False)
    result = measure(off, {"latent_dim": 16}, COLLAPSED)
    assert result.names == () and result.feasible
    assert result.system_attrs() == {} and result.user_attrs() == {}
    only_kl = measure(ConstraintSpec(active_units=False, finite=False), {}, COLLAPSED)
    assert only_kl.names == ("kl",) and not only_kl.feasible


def test_an_unreported_metric_is_unmeasured_not_violated() -> None:
    result = measure(ConstraintSpec(), {"latent_dim": 16}, {"val_kl": 30.0})
    assert result.feasible
    assert result.unmeasured == ("active_units",)
    assert result.user_attrs()["feasibility"]["unmeasured"] == ["active_units"]


def test_a_diverged_trial_ranks_below_every_collapsed_one() -> None:
    """TPE orders infeasible trials by summed violation: divergence must weigh the most."""
    spec = ConstraintSpec()
    worst_collapse = measure(spec, {"latent_dim": 16}, {"active_units": 0, "val_kl": 0.0})
    gone = diverged(spec)
    assert not gone.feasible
    assert sum(v for v in gone.values if v > 0) > sum(v for v in worst_collapse.values if v > 0)


def test_penalty_is_the_worst_value_seen_in_each_direction() -> None:
    done = [
        optuna.trial.create_trial(values=[100.0, 3.0], state=TrialState.COMPLETE),
        optuna.trial.create_trial(values=[140.0, 9.0], state=TrialState.COMPLETE),
    ]
    directions = [StudyDirection.MINIMIZE, StudyDirection.MAXIMIZE]
    assert penalty_values(directions, done, None) == [140.0, 3.0]
    # The trial's own last report counts when it is worse than anything completed.
    assert penalty_values(directions, done, 180.0) == [180.0, 3.0]
    assert penalty_values(directions[:1], [], 155.0) == [155.0]
    assert penalty_values(directions[:1], [], None) is None


def test_optuna_reads_the_list_format_as_constraints() -> None:
    """The list format (what optuna-dashboard 0.21 reads) is what Optuna's samplers and
    ``best_trial`` read too."""
    attrs = measure(ConstraintSpec(), {"latent_dim": 16}, COLLAPSED).system_attrs()
    trial = optuna.trial.create_trial(value=1.0, system_attrs=attrs)
    assert list(attrs) == [CONSTRAINTS_ATTR]
    assert len(trial.constraints) == 3
    assert not is_feasible(trial)
    study = optuna.create_study()
    study.add_trial(trial)
    study.add_trial(optuna.trial.create_trial(value=5.0))
    assert study.best_trial.value == 5.0  # the infeasible 1.0 is never best
