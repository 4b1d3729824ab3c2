"""Optuna's grid sampler over a study's search space, ended by the study's budget.

The grid is every combination of the searched values: a categorical's choices, an integer
range's integers (every ``step``-th), a float range's multiples of its ``step``. A float range
without a step, or a conditional parameter whose parent is searched too (it would multiply the
grid with points that differ only in a value that is never used), has no grid and is refused
naming the parameter. The study's ``n_trials`` is capped at the grid's size, so the study
completes when the last point is done.

Two changes to ``optuna.samplers.GridSampler`` for ask/tell in a service:

* ``after_trial`` does not call ``study.stop()``: outside ``Study.optimize`` that raises
  ``RuntimeError`` on the last point's ``tell`` (Optuna's docstring says so); the budget ends
  the study instead.
* A retry (a WAITING copy of a failed trial, ``retry_history`` set) runs the failed trial's
  point, and says so: it inherits that trial's ``grid_id``, so the point is counted as visited
  by the run that actually evaluated it, and no other point is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from optuna.samplers import GridSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from hpo_service.errors import InvalidSpec
from hpo_service.schemas import ParamValue, StudySpec, TrainConfig
from hpo_service.search_space import Param, base_config

#: The budget's own ceiling (``Budget.n_trials``): a larger grid could never finish.
MAX_GRID_POINTS = 100_000


def _values(param: Param) -> list[ParamValue]:
    where = f"search_space.{param.name}"
    if param.choices is not None:
        return list(param.choices)
    assert param.low is not None and param.high is not None
    if param.kind == "int":
        step = 1 if param.step is None else int(param.step)
        return list(range(int(param.low), int(param.high) + 1, step))
    if param.step is None:
        raise InvalidSpec(
            where, "the grid sampler needs `choices` or a `step` (or put it in `fixed`/`drop`)"
        )
    count = math.floor((param.high - param.low) / param.step + 1e-9) + 1
    return [round(param.low + k * param.step, 12) for k in range(count)]


def _active_without_search(param: Param, base: Mapping[str, Any]) -> bool:
    assert param.parent is not None
    value = base.get(param.parent, TrainConfig.model_fields[param.parent].default)
    return value in param.when


def study_grid(spec: StudySpec, space: Sequence[Param]) -> dict[str, list[ParamValue]] | None:
    """The grid of a ``grid`` study (None for any other sampler). Raises ``InvalidSpec``
    naming the parameter that has no finite grid, or ``sampler.name`` for a grid too large."""
    if spec.sampler.name != "grid":
        return None
    base, searched = base_config(spec), {p.name for p in space}
    grid: dict[str, list[ParamValue]] = {}
    for param in space:
        if param.parent is not None:
            if param.parent in searched:
                raise InvalidSpec(
                    f"search_space.{param.name}",
                    f"the grid sampler cannot search a conditional parameter (used only when "
                    f"`{param.parent}` is one of {list(param.when)}): fix `{param.parent}` "
                    f"or drop `{param.name}`",
                )
            if not _active_without_search(param, base):
                continue  # never sampled under this spec: not a dimension of the grid
        grid[param.name] = _values(param)
    size = math.prod(len(values) for values in grid.values())
    if size > MAX_GRID_POINTS:
        raise InvalidSpec("sampler.name", f"the grid has {size} points; at most {MAX_GRID_POINTS}")
    return grid


def fit_budget_to_grid(spec: StudySpec, space: Sequence[Param]) -> StudySpec:
    """``spec`` with ``budget.n_trials`` capped at the grid's size (unchanged if not a grid)."""
    grid = study_grid(spec, space)
    if grid is None:
        return spec
    size = math.prod(len(values) for values in grid.values())
    if spec.budget.n_trials <= size:
        return spec
    budget = spec.budget.model_copy(update={"n_trials": size})
    return spec.model_copy(update={"budget": budget})


class StudyGridSampler(GridSampler):
    """``GridSampler`` for the service's ask/tell: see the module docstring."""

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        history = trial.system_attrs.get("retry_history")
        if history and "grid_id" not in trial.system_attrs:
            failed = _trial_by_number(study, history[-1])
            if failed is not None and "grid_id" in failed.system_attrs:
                study._storage.set_trial_system_attr(
                    trial._trial_id, "search_space", failed.system_attrs["search_space"]
                )
                study._storage.set_trial_system_attr(
                    trial._trial_id, "grid_id", failed.system_attrs["grid_id"]
                )
                return
        super().before_trial(study, trial)

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        """Nothing: the study's budget (capped at the grid's size) ends the study."""


def _trial_by_number(study: Study, number: int) -> FrozenTrial | None:
    for trial in study._storage.get_all_trials(study._study_id, deepcopy=False):
        if trial.number == number:
            return trial
    return None
