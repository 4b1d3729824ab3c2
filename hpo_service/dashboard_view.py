"""A read-only view of the service's Optuna storage, shaped for the optuna-dashboard.

The dashboard is given this view instead of the storage itself. It delegates every read to the
server's one ``RDBStorage`` (same engine, same connection pool: no second writer of a SQLite file)
and refuses every write with ``ReadOnly``, behind the HTTP guard in ``hpo_service.dashboard``.

It also changes how two nested attributes *look*, never what is stored:

* a study's ``spec`` (search space, budget, objectives, …) is shown as one attribute per top-level
  key, ``spec.budget``, ``spec.search_space``, …;
* a trial's ``metrics`` (the latest epoch's KL, active units, β, LR, grad norms …; the final
  metrics once complete) is shown as ``metrics.val_kl``, ``metrics.beta``, …, and its
  reproducibility record as ``repro.git_commit``, ``repro.precision``, … (issue 14).

The dashboard renders a nested attribute as one JSON string cut at 1,024 characters and cannot
sort or plot it; one number per attribute becomes a sortable column. Flattening here rather than
writing flat copies keeps the report path at one attribute write per epoch (each Optuna attribute
write is its own committed transaction, ~12 ms; ~17 metrics per epoch would add ~200 ms).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Container, Sequence
from typing import Any, NoReturn, ParamSpec, TypeVar

from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState

from hpo_service.errors import ReadOnly
from hpo_service.storage import STORAGE_ERRORS

#: Nested attributes shown one key per attribute, as ``{name}.{key}``.
STUDY_ATTRS_FLATTENED = ("spec",)
TRIAL_ATTRS_FLATTENED = ("metrics", "repro")  # repro: issue 14


class StorageOutage(BaseException):
    """A storage failure on the way out of the dashboard; ``__cause__`` is the original error.

    A ``BaseException`` on purpose: the dashboard's JSON views catch every ``Exception`` and
    answer their own 500, so a database outage would never reach the service's 503 handler.
    ``DashboardGate`` turns it back into ``StorageUnavailable``.
    """


_P = ParamSpec("_P")
_T = TypeVar("_T")


def _outage_passes_through(read: Callable[_P, _T]) -> Callable[_P, _T]:
    @functools.wraps(read)
    def guarded(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return read(*args, **kwargs)
        except STORAGE_ERRORS as error:
            raise StorageOutage() from error

    return guarded


def flatten_attrs(attrs: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """``attrs`` with each dict-valued attribute in ``names`` spread into ``name.key`` entries.

    Other attributes, and a named attribute that is not a dict, are kept as they are.
    """
    shown: dict[str, Any] = {}
    for key, value in attrs.items():
        if key in names and isinstance(value, dict):
            shown.update({f"{key}.{inner}": item for inner, item in value.items()})
        else:
            shown[key] = value
    return shown


def _shown_trial(trial: FrozenTrial) -> FrozenTrial:
    if not any(isinstance(trial.user_attrs.get(n), dict) for n in TRIAL_ATTRS_FLATTENED):
        return trial
    shown = copy.copy(trial)  # never modify what the storage returned: it may be cached
    shown.user_attrs = flatten_attrs(trial.user_attrs, TRIAL_ATTRS_FLATTENED)
    return shown


def _shown_study(study: FrozenStudy) -> FrozenStudy:
    shown = copy.copy(study)
    shown.user_attrs = flatten_attrs(study.user_attrs, STUDY_ATTRS_FLATTENED)
    return shown


class ReadOnlyView(BaseStorage):
    """Reads go to ``storage``; every write raises ``ReadOnly`` and touches nothing."""

    def __init__(self, storage: BaseStorage) -> None:
        self._storage = storage

    def _refuse(self, what: str) -> NoReturn:
        raise ReadOnly(f"the dashboard is read-only through the service: cannot {what}")

    # --- writes: refused ---------------------------------------------------------------------

    def create_new_study(
        self, directions: Sequence[StudyDirection], study_name: str | None = None
    ) -> int:
        self._refuse("create a study")

    def delete_study(self, study_id: int) -> None:
        self._refuse("delete a study")

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._refuse("set a study attribute")

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._refuse("set a study attribute")

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        self._refuse("create a trial")

    def set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: BaseDistribution,
    ) -> None:
        self._refuse("set a trial parameter")

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        self._refuse("tell a trial")

    def set_trial_intermediate_value(
        self, trial_id: int, step: int, intermediate_value: float
    ) -> None:
        self._refuse("report an intermediate value")

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._refuse("set a trial attribute")

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._refuse("set a trial attribute")

    # --- reads: delegated, nested attributes spread out ----------------------------------------

    @_outage_passes_through
    def get_study_id_from_name(self, study_name: str) -> int:
        return self._storage.get_study_id_from_name(study_name)

    @_outage_passes_through
    def get_study_name_from_id(self, study_id: int) -> str:
        return self._storage.get_study_name_from_id(study_id)

    @_outage_passes_through
    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._storage.get_study_directions(study_id)

    @_outage_passes_through
    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        attrs = self._storage.get_study_user_attrs(study_id)
        return flatten_attrs(attrs, STUDY_ATTRS_FLATTENED)

    @_outage_passes_through
    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._storage.get_study_system_attrs(study_id)

    @_outage_passes_through
    def get_all_studies(self) -> list[FrozenStudy]:
        # Sorted by id: the dashboard sorts only an RDBStorage itself, and this is not one.
        studies = sorted(self._storage.get_all_studies(), key=lambda s: s._study_id)
        return [_shown_study(study) for study in studies]

    @_outage_passes_through
    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._storage.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    @_outage_passes_through
    def get_trial(self, trial_id: int) -> FrozenTrial:
        return _shown_trial(self._storage.get_trial(trial_id))

    @_outage_passes_through
    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        trials = self._storage.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        return [_shown_trial(trial) for trial in trials]

    @_outage_passes_through
    def get_n_trials(
        self, study_id: int, state: tuple[TrialState, ...] | TrialState | None = None
    ) -> int:
        return self._storage.get_n_trials(study_id, state)

    @_outage_passes_through
    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return _shown_trial(self._storage.get_best_trial(study_id))
