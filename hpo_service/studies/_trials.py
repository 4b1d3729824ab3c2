"""A trial's own records (issue 14): its per-epoch history, its resolved config, and the
reproducibility record its worker sends (stored as the trial's ``repro`` user attribute)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial

from hpo_service.artifacts import ARTIFACT_ATTR_PREFIX, artifact_id_for
from hpo_service.errors import TrialNumberNotFound
from hpo_service.history import MAX_HISTORY_EPOCHS, MAX_RECORD_BYTES
from hpo_service.schemas import ReproRecord, TrialConfig, TrialHistory
from hpo_service.search_space import resolve_config
from hpo_service.studies._checks import check_lease, finished_meanwhile, not_running
from hpo_service.studies._core import StudyCore
from hpo_service.studies._diagnostics import PLOT_KIND, Diagnostics

#: The trial user attribute that holds the worker's reproducibility record.
REPRO_ATTR = "repro"


def find_trial(core: StudyCore, name: str, number: int) -> tuple[int, FrozenTrial]:
    """The study's id and its trial ``number``. Raises ``StudyNotFound`` /
    ``TrialNumberNotFound``."""
    with core.db.session() as session:
        study_id = core.row(session, name).study_id
    try:
        trial_id = core.storage.get_trial_id_from_study_id_trial_number(study_id, number)
    except KeyError:
        raise TrialNumberNotFound(name, number) from None
    return study_id, core.storage.get_trial(trial_id)


def trial_history(
    core: StudyCore, diagnostics: Diagnostics, name: str, number: int
) -> TrialHistory:
    """Every epoch trial ``number`` of study ``name`` reported, and where its plot is."""
    study_id, trial = find_trial(core, name, number)
    plot_id = artifact_id_for(study_id, trial._trial_id, PLOT_KIND)
    listed = ARTIFACT_ATTR_PREFIX + plot_id in trial.system_attrs
    return TrialHistory(
        study=name,
        trial_number=trial.number,
        trial_id=trial._trial_id,
        state=trial.state.name.lower(),
        max_record_bytes=MAX_RECORD_BYTES,
        max_epochs=MAX_HISTORY_EPOCHS,
        epochs=diagnostics.history.records(trial._trial_id),
        plot=f"/artifacts/{study_id}/{trial._trial_id}/{plot_id}" if listed else None,
    )


def trial_config(core: StudyCore, name: str, number: int) -> TrialConfig:
    """Trial ``number``'s resolved config, seed and reproducibility record, to rerun it."""
    study_id, trial = find_trial(core, name, number)
    config: dict[str, Any] | None = trial.user_attrs.get("config")
    if config is None:  # a WAITING trial (enqueued, or a queued retry): resolve its params
        config = resolve_config(core.load(study_id).spec, trial.params)
    repro = trial.user_attrs.get(REPRO_ATTR)
    seed = config.get("seed")
    return TrialConfig(
        study=name,
        trial_number=trial.number,
        trial_id=trial._trial_id,
        state=trial.state.name.lower(),
        config=config,
        params=trial.params,
        seed=seed if isinstance(seed, int) else None,
        repro=ReproRecord.model_validate(repro) if isinstance(repro, Mapping) else None,
        worker_device=trial.user_attrs.get("worker_device"),
    )


def record_repro(core: StudyCore, trial_id: int, token: str, record: ReproRecord) -> None:
    """Store the worker's record on its running trial. Raises ``TrialNotFound``,
    ``LeaseMismatch`` or ``TrialReaped`` (the trial no longer runs)."""
    with core.db.session() as session:
        row = check_lease(session, trial_id, token)
    if row.outcome is not None:
        raise not_running(row, row.outcome)
    try:
        core.storage.set_trial_user_attr(trial_id, REPRO_ATTR, record.model_dump(mode="json"))
    except UpdateFinishedTrialError as error:
        raise finished_meanwhile(core, row, error) from error
