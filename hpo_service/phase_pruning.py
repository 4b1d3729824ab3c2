"""Phase-aware pruning: compare VAE trials only where their schedules make them comparable.

A VAE's validation −ELBO is not comparable across schedule phases. During a KL warm-up or the
rising part of a KL cycle, β < 1: the encoder spends KL freely and the true (β = 1) −ELBO is
worse than it will be once β is back at its target (Bowman et al. 2016; Fu et al. 2019, whose
cyclical schedule recovers at the end of each cycle). Inside an LR warm-up (Goyal et al. 2017)
the run has barely started. A median pruner that compares such a trial at epoch 2 against trials
already at β = 1 kills exactly the schedules the search is meant to try.

``PhaseAwarePruner`` wraps any Optuna pruner:

1. the trial being decided is never pruned at an epoch that is not *comparable* for its own
   schedule (see ``comparable``);
2. the other trials the inner pruner compares against are shown with only their comparable
   epochs, so a mid-ramp value never sets the median either;
3. for a multi-objective study it prunes on one named primary metric: the inner pruner sees a
   single-objective study in that metric's direction.

Epoch ``e`` (1-based, as workers report it) is the model after ``e`` epochs of training. It is
comparable when the last optimizer step of that epoch ran

- after the LR warm-up (``e ≥ lr_warmup_epochs``), and
- with β at its target: always for ``constant``; ``e ≥ kl_warmup_epochs`` for the monotone
  warm-ups; for ``cyclical`` (cycle length P = epochs / kl_cycles, rising fraction R =
  ``kl_ratio``), when the position in the cycle ``(e mod P) / P`` is at least R, or ``e`` ends a
  cycle exactly.

Positions are computed in epochs; the trainer rounds lengths to whole optimizer steps, so a
boundary can be off by one step (a fraction of an epoch), never by an epoch. A trial without a
recorded config (not made by this service) is treated as comparable everywhere.

Hyperband runs its brackets on studies of its own, so with it only rule 1 applies.
"""

from __future__ import annotations

import copy
from collections.abc import Container, Mapping, Sequence
from typing import Any

import optuna
from optuna.pruners import BasePruner
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

#: The user attribute holding a trial's resolved training config (written at lease time).
CONFIG_ATTR = "config"
_MONOTONE_KL = ("linear", "cosine", "sigmoid")
#: Slack for float positions (epochs are small numbers; 1e-9 is far below one step).
_EPS = 1e-9


def _field(config: Mapping[str, Any], name: str, default: float) -> float:
    value = config.get(name, default)
    return float(value) if isinstance(value, int | float) else default


def comparable(config: Mapping[str, Any] | None, epoch: int) -> bool:
    """Whether the model after ``epoch`` epochs of ``config``'s schedule is past its LR warm-up
    and at its target β (see the module docstring). ``config`` None: always comparable."""
    if config is None:
        return True
    if epoch < _field(config, "lr_warmup_epochs", 0.0) - _EPS:
        return False
    schedule = config.get("kl_schedule", "linear")
    if schedule == "constant":
        return True
    if schedule in _MONOTONE_KL:
        # TrainConfig's default warm-up is min(5, epochs / 2); resolved configs carry it.
        epochs = _field(config, "epochs", 20.0)
        return epoch >= _field(config, "kl_warmup_epochs", min(5.0, epochs / 2)) - _EPS
    if schedule == "cyclical":
        cycle = _field(config, "epochs", 20.0) / max(1.0, _field(config, "kl_cycles", 4.0))
        position = (epoch % cycle) / cycle
        ends_a_cycle = epoch > 0 and (position < _EPS or position > 1 - _EPS)
        return ends_a_cycle or position >= _field(config, "kl_ratio", 0.5) - _EPS
    return True  # an unknown schedule: nothing to hold the trial back for


def _config(trial: FrozenTrial) -> Mapping[str, Any] | None:
    config = trial.user_attrs.get(CONFIG_ATTR)
    return config if isinstance(config, Mapping) else None


def comparable_only(trial: FrozenTrial) -> FrozenTrial:
    """A copy of ``trial`` holding only its comparable intermediate values."""
    config = _config(trial)
    kept = {step: v for step, v in trial.intermediate_values.items() if comparable(config, step)}
    if len(kept) == len(trial.intermediate_values):
        return trial
    shown = copy.copy(trial)
    shown.intermediate_values = kept
    return shown


class _SingleObjectiveStudy:
    """The study as the inner pruner sees it: one direction (the primary metric's); everything
    else is the real study."""

    def __init__(self, study: optuna.Study, direction: StudyDirection) -> None:
        self._study = study
        self._direction = direction

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    @property
    def direction(self) -> StudyDirection:
        return self._direction

    @property
    def directions(self) -> list[StudyDirection]:
        return [self._direction]

    def _is_multi_objective(self) -> bool:
        return False

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        return self._study.get_trials(deepcopy=deepcopy, states=states)

    def _get_trials(
        self,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
        use_cache: bool = False,
    ) -> list[FrozenTrial]:
        return self.get_trials(deepcopy=deepcopy, states=states)

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()

    @property
    def best_trial(self) -> FrozenTrial:
        if len(self._study.directions) == 1:
            return self._study.best_trial
        raise ValueError("a multi-objective study has no single best trial to compare with")


class PhaseAwarePruner(BasePruner):
    """Wrap ``inner`` so it decides only at comparable epochs (module docstring).

    ``primary``: for a multi-objective study, the index of the objective whose per-epoch values
    are reported and the direction to prune in; None for a single-objective study.
    ``phases`` False keeps only the primary-metric view (``PrimaryMetricPruner``).
    """

    def __init__(
        self,
        inner: BasePruner,
        primary: tuple[int, StudyDirection] | None = None,
        phases: bool = True,
    ) -> None:
        self.inner = inner
        self.primary_index = primary[0] if primary else None
        self.primary_direction = primary[1] if primary else None
        self.phases = phases

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        direction = self.primary_direction or _single_direction(study.directions)
        if not self.phases:
            single: Any = _SingleObjectiveStudy(study, direction)
            return self.inner.prune(single, trial)
        if not comparable(_config(trial), step):
            return False
        view: Any = _ComparableStudy(study, direction)
        return self.inner.prune(view, comparable_only(trial))


class PrimaryMetricPruner(PhaseAwarePruner):
    """Only the primary-metric view of a multi-objective study (phase-aware pruning off)."""

    def __init__(self, inner: BasePruner, primary: tuple[int, StudyDirection] | None) -> None:
        super().__init__(inner, primary, phases=False)


class _ComparableStudy(_SingleObjectiveStudy):
    """The single-objective view with every trial shown at its comparable epochs only."""

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        trials = self._study.get_trials(deepcopy=deepcopy, states=states)
        return [comparable_only(t) for t in trials]


def _single_direction(directions: Sequence[StudyDirection]) -> StudyDirection:
    if len(directions) != 1:
        raise ValueError("a multi-objective study needs a primary metric to prune on")
    return directions[0]
