"""StudyView against Optuna's own ask/tell on a real storage, on SQLite and PostgreSQL: the
trial a lease writes in one transaction is the trial Optuna's define-by-run ask would have
written, and the pruner decides the same from the view as from ``Trial.should_prune``."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from hpo_service.study_view import PENDING_TRIAL_ID, StudyView


def _objective_space(trial: optuna.Trial) -> None:
    trial.suggest_float("lr", 1e-5, 1e-1, log=True)
    trial.suggest_int("layers", 1, 4)
    if trial.suggest_categorical("schedule", ["constant", "cyclical"]) == "cyclical":
        trial.suggest_int("cycles", 1, 8)


def _history(study: optuna.Study, count: int) -> None:
    for index in range(count):
        trial = study.ask()
        _objective_space(trial)
        for step in range(3):
            trial.report(float(index + step), step)
        study.tell(trial, float(index))


def test_a_pending_trial_is_written_whole_as_optuna_would_sample_it(database_url: str) -> None:
    storage = optuna.storages.get_storage(database_url)
    # TPE past its start-up trials: multivariate, constant liar, relative params as attributes.
    sampler = optuna.samplers.TPESampler(
        seed=1, n_startup_trials=4, multivariate=True, constant_liar=True
    )
    study = optuna.create_study(study_name="view", storage=storage, sampler=sampler)
    _history(study, 6)
    running = study.ask()  # a running trial the sampler must see (constant liar)
    _objective_space(running)

    trials = storage.get_all_trials(study._study_id, deepcopy=False)
    view = StudyView(storage, study._study_id, "view", study.directions, trials)
    trial = view.study(sampler, study.pruner).ask()
    _objective_space(trial)
    pending = view.pending
    assert pending is not None and trial._trial_id == PENDING_TRIAL_ID
    assert len(storage.get_all_trials(study._study_id)) == 7  # nothing written while sampling

    trial_id = storage.create_new_trial(study._study_id, template_trial=pending)
    written = storage.get_trial(trial_id)
    assert written.state == TrialState.RUNNING
    assert written.number == pending.number == 7
    assert written.params == pending.params and set(written.params) >= {"lr", "layers"}
    assert written.distributions == pending.distributions
    relative = {k for k in written.system_attrs if k.startswith("tpe:relative_params")}
    assert relative and relative == {k for k in pending.system_attrs if k.startswith("tpe:")}
    study.tell(written.number, 1.0)  # and Optuna tells it like any other trial
    assert storage.get_trial(trial_id).state == TrialState.COMPLETE


def test_the_pruner_decides_the_same_from_the_view(database_url: str) -> None:
    storage = optuna.storages.get_storage(database_url)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    study = optuna.create_study(study_name="prune", storage=storage, pruner=pruner)
    _history(study, 5)  # intermediate values 0..6 at steps 0..2
    decisions = []
    for value in (0.5, 100.0):
        trial = study.ask()
        _objective_space(trial)
        trial.report(value, 1)
        current = storage.get_trial(trial._trial_id)
        trials = storage.get_all_trials(study._study_id, deepcopy=False)
        view = StudyView(
            storage, study._study_id, "prune", study.directions, trials, current=current
        ).study(study.sampler, pruner)
        decisions.append((pruner.prune(view, current), trial.should_prune()))
        study.tell(trial, state=TrialState.PRUNED)
    assert decisions == [(False, False), (True, True)]
