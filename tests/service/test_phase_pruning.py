"""Phase-aware pruning on constructed trials (``hpo_service.phase_pruning``): in memory, since
only the pruner's decisions are under test."""

from __future__ import annotations

from typing import Any

import optuna
import pytest
from optuna.study import StudyDirection
from optuna.trial import TrialState
from pydantic import ValidationError

from hpo_service.optimizers import build_pruner, pruning_primary
from hpo_service.phase_pruning import (
    PhaseAwarePruner,
    PrimaryMetricPruner,
    comparable,
    comparable_only,
)
from hpo_service.schemas import StudySpec

EPOCHS = 10
LINEAR = {"epochs": EPOCHS, "kl_schedule": "linear", "kl_warmup_epochs": 2.0}
# Fu et al. 2019: M = 2 cycles of P = 5 epochs, rising for R = 0.5 of each.
CYCLICAL = {"epochs": EPOCHS, "kl_schedule": "cyclical", "kl_cycles": 2, "kl_ratio": 0.5}
# Validation −ELBO per epoch (1-based): linear warm-up trials improve smoothly; the cyclical
# trial is worse while β rises (epochs 1–2 and 6–7) and ends best.
LINEAR_CURVES = [
    [150, 130, 122, 118, 116, 115, 114, 113.5, 113, 112.5],
    [152, 133, 125, 121, 119, 118, 117, 116.5, 116, 115.5],
    [149, 129, 121, 117, 115, 114, 113, 112.5, 112, 111.5],
    [155, 135, 127, 123, 121, 120, 119, 118.5, 118, 117.5],
]
CYCLICAL_CURVE = [175, 160, 118, 113, 111, 135, 128, 108, 106, 105]


@pytest.mark.parametrize(
    ("config", "epoch", "expected"),
    [
        ({"kl_schedule": "constant"}, 1, True),
        (LINEAR, 1, False),
        (LINEAR, 2, True),  # warm-up over at the end of epoch 2
        ({**LINEAR, "kl_warmup_epochs": 2.5}, 2, False),
        ({**LINEAR, "kl_warmup_epochs": 2.5}, 3, True),
        (CYCLICAL, 1, False),  # position 0.2 < R
        (CYCLICAL, 2, False),  # 0.4
        (CYCLICAL, 3, True),  # 0.6: β at 1 for the rest of the cycle
        (CYCLICAL, 5, True),  # the end of cycle 1
        (CYCLICAL, 6, False),  # cycle 2 rising again
        (CYCLICAL, 10, True),
        ({**CYCLICAL, "kl_ratio": 1.0}, 3, False),  # always rising: only cycle ends count
        ({**CYCLICAL, "kl_ratio": 1.0}, 5, True),
        ({"kl_schedule": "constant", "lr_warmup_epochs": 2.0}, 1, False),
        ({"kl_schedule": "constant", "lr_warmup_epochs": 2.0}, 2, True),
        ({**LINEAR, "lr_warmup_epochs": 3.0}, 2, False),  # β done, LR warm-up not
        (None, 1, True),  # no recorded config: nothing to hold back for
    ],
)
def test_comparable_epochs(config: dict[str, Any] | None, epoch: int, expected: bool) -> None:
    assert comparable(config, epoch) is expected


def _finished(curve: list[float], config: dict[str, Any]) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        value=curve[-1],
        state=TrialState.COMPLETE,
        intermediate_values={epoch: v for epoch, v in enumerate(curve, start=1)},
        user_attrs={"config": config},
    )


def _run_cyclical(pruner: optuna.pruners.BasePruner) -> tuple[int | None, optuna.Study]:
    """Add the linear trials as finished, then train the cyclical one epoch by epoch; returns
    the epoch at which the pruner stopped it (None: it ran to the end) and the study."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(pruner=pruner)
    for curve in LINEAR_CURVES:
        study.add_trial(_finished(curve, LINEAR))
    trial = study.ask()
    trial.set_user_attr("config", CYCLICAL)
    for epoch, value in enumerate(CYCLICAL_CURVE, start=1):
        trial.report(value, epoch)
        if trial.should_prune():
            study.tell(trial, state=TrialState.PRUNED)
            return epoch, study
    study.tell(trial, CYCLICAL_CURVE[-1])
    return None, study


def test_median_pruner_kills_the_cyclical_trial_mid_ramp() -> None:
    pruned_at, _ = _run_cyclical(optuna.pruners.MedianPruner(n_startup_trials=2))
    assert pruned_at is not None
    assert not comparable(CYCLICAL, pruned_at)  # it was killed while β was still rising


def test_phase_aware_pruning_keeps_it_and_it_ends_best() -> None:
    pruner = PhaseAwarePruner(optuna.pruners.MedianPruner(n_startup_trials=2))
    pruned_at, study = _run_cyclical(pruner)
    assert pruned_at is None
    assert study.best_trial.user_attrs["config"] == CYCLICAL
    assert study.best_value == CYCLICAL_CURVE[-1]


def test_phase_aware_pruning_still_prunes_a_bad_trial_at_a_comparable_epoch() -> None:
    """Not a pruner that never prunes: a linear trial far behind is stopped right after its
    warm-up, at the first comparable epoch."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        pruner=PhaseAwarePruner(optuna.pruners.MedianPruner(n_startup_trials=2))
    )
    for curve in LINEAR_CURVES:
        study.add_trial(_finished(curve, LINEAR))
    trial = study.ask()
    trial.set_user_attr("config", LINEAR)
    trial.report(400.0, 1)
    assert not trial.should_prune()  # inside the KL warm-up
    trial.report(390.0, 2)
    assert trial.should_prune()


def test_others_are_compared_only_at_their_comparable_epochs() -> None:
    shown = comparable_only(_finished(CYCLICAL_CURVE, CYCLICAL))
    assert sorted(shown.intermediate_values) == [3, 4, 5, 8, 9, 10]
    assert sorted(comparable_only(_finished(LINEAR_CURVES[0], LINEAR)).intermediate_values) == [
        *range(2, EPOCHS + 1)
    ]
    constant = _finished(LINEAR_CURVES[0], {"kl_schedule": "constant"})
    assert comparable_only(constant) is constant  # nothing to drop: the same trial


def test_multi_objective_study_prunes_on_the_primary_metric() -> None:
    """Optuna's pruners refuse multi-objective studies; wrapped, they decide on objective 0."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = PhaseAwarePruner(
        optuna.pruners.MedianPruner(n_startup_trials=2), primary=(0, StudyDirection.MINIMIZE)
    )
    study = optuna.create_study(directions=["minimize", "maximize"], pruner=pruner)
    for curve in LINEAR_CURVES:
        study.add_trial(
            optuna.trial.create_trial(
                values=[curve[-1], 10.0],
                state=TrialState.COMPLETE,
                intermediate_values={e: v for e, v in enumerate(curve, start=1)},
                user_attrs={"config": LINEAR},
            )
        )
    frozen = optuna.trial.create_trial(
        state=TrialState.RUNNING,
        intermediate_values={1: 400.0, 2: 390.0},
        user_attrs={"config": LINEAR},
    )
    assert pruner.prune(study, frozen)
    with pytest.raises(ValueError, match="primary metric"):
        PhaseAwarePruner(optuna.pruners.MedianPruner()).prune(study, frozen)


class _AlwaysPrune(optuna.pruners.BasePruner):
    """Records the epochs it was asked at and always says prune."""

    def __init__(self) -> None:
        self.asked: list[int | None] = []

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        self.asked.append(trial.last_step)
        return True


def test_the_inner_pruner_is_asked_only_at_comparable_epochs() -> None:
    inner = _AlwaysPrune()
    pruner = PhaseAwarePruner(inner)
    study = optuna.create_study()
    decisions = {}
    for epoch in range(1, EPOCHS + 1):
        frozen = optuna.trial.create_trial(
            state=TrialState.RUNNING,
            intermediate_values={e: 100.0 for e in range(1, epoch + 1)},
            user_attrs={"config": CYCLICAL},
        )
        decisions[epoch] = pruner.prune(study, frozen)
    assert inner.asked == [3, 4, 5, 8, 9, 10]
    assert [e for e, prune in decisions.items() if prune] == [3, 4, 5, 8, 9, 10]


def test_a_mid_ramp_value_of_another_trial_never_decides() -> None:
    """Others' values from epochs where their β was still rising are not compared with: here
    they happen to be low (as a β-weighted loss is while β < 1) and would prune a healthy trial."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    low_mid_ramp = [175, 160, 118, 113, 111, 90, 92, 108, 106, 105]  # epochs 6–7: β rising
    inner = optuna.pruners.MedianPruner(n_startup_trials=2)
    study = optuna.create_study(pruner=PhaseAwarePruner(inner))
    for _ in range(3):
        study.add_trial(_finished(low_mid_ramp, CYCLICAL))
    frozen = optuna.trial.create_trial(
        state=TrialState.RUNNING,
        intermediate_values={e: v for e, v in enumerate(LINEAR_CURVES[0][:6], start=1)},
        user_attrs={"config": LINEAR},
    )
    assert inner.prune(study, frozen)  # the plain median compares with the 90s at epoch 6
    assert not study.pruner.prune(study, frozen)


def test_study_pruners_are_phase_aware_by_default_and_can_opt_out() -> None:
    default = StudySpec(name="s")
    built = build_pruner(default.pruner, default.epochs, pruning_primary(default))
    assert isinstance(built, PhaseAwarePruner) and built.phases
    assert isinstance(built.inner, optuna.pruners.MedianPruner)
    plain = StudySpec(name="s", pruner={"phase_aware": False})
    assert isinstance(build_pruner(plain.pruner, plain.epochs), optuna.pruners.MedianPruner)
    none = StudySpec(name="s", pruner={"name": "none"})
    assert isinstance(build_pruner(none.pruner, none.epochs), optuna.pruners.NopPruner)

    multi = StudySpec(
        name="m",
        objectives=[{"metric": "val_neg_elbo"}, {"metric": "active_units"}],
        pruner={"metric": "active_units", "phase_aware": False},
    )
    assert multi.pruning_metric == "active_units"
    assert pruning_primary(multi) == (1, StudyDirection.MAXIMIZE)
    assert isinstance(
        build_pruner(multi.pruner, multi.epochs, pruning_primary(multi)), PrimaryMetricPruner
    )
    with pytest.raises(ValidationError, match=r"pruner\.metric"):
        StudySpec(name="m", pruner={"metric": "test_is_nll"})
