"""The study registry: create a study from its spec, read, list, stop, cancel, delete, enqueue."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import select

from hpo_service import final_eval, lr_range
from hpo_service.artifacts import ARTIFACT_ATTR_PREFIX
from hpo_service.constraints import feasibility_of
from hpo_service.curated_starts import SOURCE_ATTR, curated_starts
from hpo_service.errors import InvalidSpec, StudyExists, StudyNotRunning
from hpo_service.grid import fit_budget_to_grid, study_grid
from hpo_service.history import EpochHistory
from hpo_service.models import LeaseRow, StudyRow
from hpo_service.optimizers import build_pruner, build_sampler, describe, pruning_primary
from hpo_service.schemas import (
    StudyInfo,
    StudySpec,
    StudyState,
    TrialCounts,
    TrialPage,
    TrialSummary,
)
from hpo_service.search_space import Param, check_spec, resolve_config
from hpo_service.studies._budget import effective_state
from hpo_service.studies._core import SPEC_ATTR, LoadedStudy, StudyCore, aware

log = logging.getLogger(__name__)


def check_param_sets(
    spec: StudySpec, space: Sequence[Param], param_sets: Sequence[Mapping[str, Any]]
) -> None:
    """Each set names only parameters of the space, inside it, and makes a valid config.

    Raises ``InvalidSpec`` naming ``params[i].<name>``.
    """
    by_name = {p.name: p for p in space}
    for index, params in enumerate(param_sets):
        for key, value in params.items():
            param = by_name.get(key)
            if param is None:
                raise InvalidSpec(f"params[{index}].{key}", "not a parameter of this study")
            if not param.contains(value):
                raise InvalidSpec(f"params[{index}].{key}", f"{value!r} is outside the space")
        try:
            resolve_config(spec, params)
        except InvalidSpec as error:
            raise InvalidSpec(f"params[{index}].{error.field}", error.reason) from error


def _best(study: optuna.Study) -> list[FrozenTrial]:
    try:
        if len(study.directions) == 1:
            return [study.best_trial]
        return list(study.best_trials)
    except ValueError:  # no completed trial yet
        return []


def summary(trial: FrozenTrial, worker_id: str | None = None) -> TrialSummary:
    duration = trial.duration.total_seconds() if trial.duration is not None else None
    history = trial.system_attrs.get("retry_history") or []
    return TrialSummary(
        number=trial.number,
        trial_id=trial._trial_id,
        state=trial.state.name.lower(),
        params=trial.params,
        values=trial.values,
        intermediate_values=trial.intermediate_values,
        metrics=trial.user_attrs.get("metrics", {}),
        worker_id=worker_id or trial.user_attrs.get("worker_id"),
        retry_of=history[-1] if history else None,
        feasible=feasibility_of(trial),  # issue 10
        datetime_start=trial.datetime_start.isoformat() if trial.datetime_start else None,
        datetime_complete=(
            trial.datetime_complete.isoformat() if trial.datetime_complete else None
        ),
        duration_s=duration,
        # issue 14: where a retry resumed (or why it could not)
        resumed_from=trial.user_attrs.get("resumed_from"),
        resume_fallback=trial.user_attrs.get("resume_fallback"),
    )


class StudyRegistry:
    """Study CRUD and listing over one ``StudyCore``."""

    def __init__(self, core: StudyCore) -> None:
        self.core = core

    def create_study(
        self,
        spec: StudySpec,
        *,
        enqueue: Sequence[Mapping[str, Any]] = (),
        user_attrs: Mapping[str, Any] | None = None,
    ) -> StudyInfo:
        """Validate everything first, then write; a failure half-way deletes what was written.

        ``enqueue``: parameter sets queued before any worker can see the study (a scheduled
        run's warm start), checked like ``enqueue()``. ``user_attrs``: extra study attributes.
        Raises ``InvalidSpec`` (field and reason) or ``StudyExists``.
        """
        core = self.core
        space = check_spec(spec)
        spec = fit_budget_to_grid(spec, space)  # a grid study ends with its grid
        check_param_sets(spec, space, enqueue)
        sampler = build_sampler(spec.sampler, study_grid(spec, space))
        pruner = build_pruner(spec.pruner, spec.epochs, pruning_primary(spec))
        with core.db.session() as session:
            if session.scalar(select(StudyRow).where(StudyRow.name == spec.name)) is not None:
                raise StudyExists(spec.name)
        try:
            study = optuna.create_study(
                study_name=spec.name,
                storage=core.cache,
                sampler=sampler,
                pruner=pruner,
                directions=spec.directions,
            )
        except optuna.exceptions.DuplicatedStudyError as error:
            raise StudyExists(spec.name) from error
        study_id = study._study_id
        try:
            study.set_user_attr(SPEC_ATTR, spec.model_dump(mode="json"))
            study.set_user_attr("sampler", describe(sampler))
            study.set_user_attr("pruner", describe(pruner))
            study.set_user_attr("search_space", [p.name for p in space])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                study.set_metric_names(spec.metric_names)
            for key, value in (user_attrs or {}).items():
                study.set_user_attr(key, value)
            # --- issue 10: curated known-good configurations first, when the spec asks
            for source, start in curated_starts(spec, space) if spec.curated_starts else []:
                study.enqueue_trial(start, user_attrs={"enqueued": True, SOURCE_ATTR: source})
            # --- end issue 10
            for params in enqueue:  # before the row below makes the study visible to workers
                study.enqueue_trial(dict(params), user_attrs={"enqueued": True})
            with core.db.session() as session:
                session.add(
                    StudyRow(
                        study_id=study_id,
                        name=spec.name,
                        state="running",
                        n_trials=spec.budget.n_trials,
                        max_concurrent=spec.budget.max_concurrent,
                    )
                )
        except BaseException:
            core.cache.delete_study(study_id)
            raise
        core.remember_loaded(study_id, LoadedStudy(study=study, spec=spec, space=space))
        log.info("created study %s (id %d)", spec.name, study_id)
        return self.get_study(spec.name)

    def list_studies(self, state: StudyState | None = None) -> list[StudyInfo]:
        with self.core.db.session() as session:
            names = list(session.scalars(select(StudyRow.name).order_by(StudyRow.study_id)))
        infos = [self.get_study(name) for name in names]
        return [info for info in infos if state is None or info.state == state]

    def get_study(self, name: str) -> StudyInfo:
        core = self.core
        with core.db.session() as session:
            row = core.row(session, name)
        loaded = core.load(row.study_id)
        trials = core.cache.get_all_trials(row.study_id, deepcopy=False)
        searched = [t for t in trials if not lr_range.is_task(t)]  # an LR range test probe is not
        counts = TrialCounts(
            **{
                state.name.lower(): sum(1 for t in searched if t.state == state)
                for state in (
                    TrialState.WAITING,
                    TrialState.RUNNING,
                    TrialState.COMPLETE,
                    TrialState.PRUNED,
                    TrialState.FAIL,
                )
            }
        )
        return StudyInfo(
            name=row.name,
            study_id=row.study_id,
            state=effective_state(row, trials, loaded.spec),
            directions=loaded.spec.directions,
            metric_names=loaded.spec.metric_names,
            counts=counts,
            best_trials=[summary(t) for t in _best(loaded.study)],
            spec=loaded.spec,
            created_at=aware(row.created_at).isoformat(),
            lr_range_test=self._lr_range_test(row.study_id, loaded),
            final_evaluation=self._final_evaluation(row.study_id, loaded),
        )

    def _final_evaluation(self, study_id: int, loaded: LoadedStudy) -> dict[str, Any] | None:
        """The study's ``final_evaluation`` attribute (``hpo_service.final_eval``); None when
        off, ``pending`` until the task has stored its results."""
        if not loaded.spec.final_evaluation.enabled:
            return None
        attr = self.core.storage.get_study_user_attrs(study_id).get(final_eval.STUDY_ATTR)
        return dict(attr) if attr else {"status": "pending"}

    def _lr_range_test(self, study_id: int, loaded: LoadedStudy) -> dict[str, Any] | None:
        """The LR range test's outcome without its curve (``lr_range``); None when off."""
        if not loaded.spec.lr_range_test.enabled:
            return None
        attr = loaded.lr_range_test
        if attr is None:  # pending as of loading: read it afresh
            attr = self.core.storage.get_study_user_attrs(study_id).get(lr_range.STUDY_ATTR)
        if attr is None:
            return {"status": "pending"}
        shown = {key: value for key, value in attr.items() if key != "curve"}
        shown["curve_points"] = len(attr.get("curve", {}).get("lrs", []))
        plot = self._study_plot(study_id, lr_range.PLOT_FILENAME)
        if plot is not None:
            shown["plot"] = plot
        return shown

    def _study_plot(self, study_id: int, filename: str) -> str | None:
        """Where the dashboard serves a plot listed on the study (``artifacts.attach_to_study``),
        or None while it is not drawn."""
        for key, value in self.core.storage.get_study_system_attrs(study_id).items():
            if key.startswith(ARTIFACT_ATTR_PREFIX) and json.loads(value)["filename"] == filename:
                return f"/artifacts/{study_id}/{key.removeprefix(ARTIFACT_ATTR_PREFIX)}"
        return None

    def list_trials(self, name: str, offset: int = 0, limit: int = 100) -> TrialPage:
        core = self.core
        with core.db.session() as session:
            row = core.row(session, name)
            workers = {
                trial_id: worker_id
                for trial_id, worker_id in session.execute(
                    select(LeaseRow.trial_id, LeaseRow.worker_id).where(
                        LeaseRow.study_id == row.study_id
                    )
                )
            }
        trials = core.cache.get_all_trials(row.study_id, deepcopy=False)  # sorted by number
        page = trials[offset : offset + limit]
        return TrialPage(
            study=name,
            total=len(trials),
            offset=offset,
            limit=limit,
            trials=[summary(t, workers.get(t._trial_id)) for t in page],
        )

    def set_state(self, name: str, state: StudyState) -> StudyInfo:
        """stop: no new trials, running ones finish. cancel: running ones are told to stop."""
        with self.core.db.session() as session:
            row = self.core.row(session, name)
            if row.state in ("running", "stopped") or (
                row.state == state and state in ("stopped", "cancelled")
            ):
                row.state = state
            elif row.state != state:
                raise StudyNotRunning(f"study {name!r} is {row.state}; it cannot be {state}")
        return self.get_study(name)

    def delete_study(self, name: str) -> None:
        core = self.core
        with core.db.session() as session:
            row = core.row(session, name)
            study_id = row.study_id
            session.delete(row)
            session.query(LeaseRow).filter(LeaseRow.study_id == study_id).delete()
            EpochHistory.delete_study(session, study_id)  # issue 14
        core.forget_loaded(study_id)
        core.cache.delete_study(study_id)  # through the cache, which forgets the study's trials

    def enqueue(self, name: str, param_sets: list[dict[str, Any]]) -> int:
        """Queue known configurations; each is checked against the study's space first.

        Raises ``InvalidSpec`` naming ``params[i].<name>``; nothing is queued if any set is bad.
        """
        core = self.core
        with core.db.session() as session:
            row = core.row(session, name)
        loaded = core.load(row.study_id)
        check_param_sets(loaded.spec, loaded.space, param_sets)
        with core.study_lock(row.study_id):
            for params in param_sets:
                loaded.study.enqueue_trial(params, user_attrs={"enqueued": True})
        return len(param_sets)
