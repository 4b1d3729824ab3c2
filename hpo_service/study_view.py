"""A study as the sampler and the pruner see it, read from a snapshot the service already holds.

Optuna's ask/tell path does one database round trip per step: every ``suggest_*`` commits its
parameter on its own, ``should_prune`` and ``tell`` re-read the trial, and every sampler or
pruner call re-reads the study's trials. The service already holds those trials (read once,
under the study's lock, for the budget) and the running trial (it just wrote its values), so it
hands Optuna a ``StudyView``: an Optuna storage whose *reads* come from that snapshot and whose
*writes* go to the real storage — except those to the one *pending* trial of a lease, which
collect in memory until the service writes the whole trial (parameters, attributes) in one
transaction with ``RDBStorage.create_new_trial(template_trial=...)``.

Everything goes through Optuna's storage API; nothing here reads or writes a table itself.
The view lives for one request; it is not shared between threads.
"""

from __future__ import annotations

import copy
from collections.abc import Container, Sequence
from datetime import datetime
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy  # the type BaseStorage.get_all_studies returns
from optuna.trial import FrozenTrial, TrialState

#: The id the pending trial carries until it is written; real trial ids are positive.
PENDING_TRIAL_ID = -1


class StudyView(BaseStorage):
    """One study's trials from a snapshot, plus at most one pending and one current trial.

    ``trials`` is the study's trial list as last read (finished trials never change in Optuna,
    so only running trials can be stale in it). ``current``, if given, replaces the trial with
    the same number: the running trial as the service knows it right now.
    """

    def __init__(
        self,
        backend: BaseStorage,
        study_id: int,
        study_name: str,
        directions: Sequence[StudyDirection],
        trials: Sequence[FrozenTrial],
        current: FrozenTrial | None = None,
    ) -> None:
        self._backend = backend
        self._study_id = study_id
        self._study_name = study_name
        self._directions = list(directions)
        self._trials = list(trials)
        self.current = current
        if current is not None:
            self._trials = [t for t in self._trials if t.number != current.number]
            self._trials.append(current)
            self._trials.sort(key=lambda t: t.number)
        self.pending: FrozenTrial | None = None

    def study(
        self, sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner
    ) -> optuna.Study:
        """An ``optuna.Study`` over this view (no database access to build it)."""
        return optuna.load_study(
            study_name=self._study_name, storage=self, sampler=sampler, pruner=pruner
        )

    # --- the trials this view answers from memory ------------------------------------------

    def _own(self, trial_id: int) -> FrozenTrial | None:
        if self.pending is not None and trial_id == PENDING_TRIAL_ID:
            return self.pending
        if self.current is not None and trial_id == self.current._trial_id:
            return self.current
        return None

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        """Start the pending trial in memory (``Study.ask`` calls this); nothing is written."""
        if study_id != self._study_id or template_trial is not None or self.pending is not None:
            raise RuntimeError("a StudyView holds one pending trial of its own study")
        self.pending = FrozenTrial(
            number=len(self._trials),
            state=TrialState.RUNNING,
            value=None,
            values=None,
            datetime_start=datetime.now(),
            datetime_complete=None,
            params={},
            distributions={},
            user_attrs={},
            system_attrs={},
            intermediate_values={},
            trial_id=PENDING_TRIAL_ID,
        )
        return PENDING_TRIAL_ID

    def get_trial(self, trial_id: int) -> FrozenTrial:
        own = self._own(trial_id)
        if own is not None:
            return copy.deepcopy(own)
        return self._backend.get_trial(trial_id)

    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        if study_id != self._study_id:
            return self._backend.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        trials = self._trials + ([self.pending] if self.pending is not None else [])
        if states is not None:
            trials = [t for t in trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        if self.pending is not None and trial_number == self.pending.number:
            return PENDING_TRIAL_ID
        if self.current is not None and trial_number == self.current.number:
            return self.current._trial_id
        return self._backend.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: BaseDistribution,
    ) -> None:
        own = self._own(trial_id)
        if own is None or own is self.current:
            self._backend.set_trial_param(trial_id, param_name, param_value_internal, distribution)
        if own is not None:
            own.params[param_name] = distribution.to_external_repr(param_value_internal)
            own.distributions[param_name] = distribution

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        own = self._own(trial_id)
        if own is None or own is self.current:
            self._backend.set_trial_user_attr(trial_id, key, value)
        if own is not None:
            own.user_attrs[key] = value

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        own = self._own(trial_id)
        if own is None or own is self.current:
            self._backend.set_trial_system_attr(trial_id, key, value)
        if own is not None:
            own.system_attrs[key] = value

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        if trial_id == PENDING_TRIAL_ID:
            raise RuntimeError("the pending trial is written whole, not told")
        return self._backend.set_trial_state_values(trial_id, state, values)

    def set_trial_intermediate_value(
        self, trial_id: int, step: int, intermediate_value: float
    ) -> None:
        if trial_id == PENDING_TRIAL_ID:
            raise RuntimeError("the pending trial has no intermediate values")
        self._backend.set_trial_intermediate_value(trial_id, step, intermediate_value)
        own = self._own(trial_id)
        if own is not None:
            own.intermediate_values[step] = intermediate_value

    # --- the study itself: answered from what the service knows, or delegated ----------------

    def get_study_id_from_name(self, study_name: str) -> int:
        if study_name == self._study_name:
            return self._study_id
        return self._backend.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        if study_id == self._study_id:
            return self._study_name
        return self._backend.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        if study_id == self._study_id:
            return list(self._directions)
        return self._backend.get_study_directions(study_id)

    def create_new_study(
        self, directions: Sequence[StudyDirection], study_name: str | None = None
    ) -> int:
        return self._backend.create_new_study(directions, study_name)

    def delete_study(self, study_id: int) -> None:
        self._backend.delete_study(study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._backend.set_study_user_attr(study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._backend.set_study_system_attr(study_id, key, value)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._backend.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._backend.get_study_system_attrs(study_id)

    def get_all_studies(self) -> list[FrozenStudy]:
        return self._backend.get_all_studies()
