"""The budget's ``tally`` remembers a study's leading finished trials (``_budget.TallyMemo``,
issue 12): it must count exactly what a full count does, whatever another replica wrote in
between, for lists read at any time — and two replicas on one database must each see the
budget the other spent.
"""

from __future__ import annotations

import random
from typing import Any

import optuna
import pytest
from helpers import spec
from optuna.trial import FrozenTrial, TrialState

from hpo_service.config import Settings
from hpo_service.lr_range import LR_RANGE_TEST, TASK_ATTR
from hpo_service.schemas import Lease, StudySpec
from hpo_service.studies import StudyService
from hpo_service.studies._budget import TallyMemo, tally

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def frozen(number: int, state: TrialState, history: list[int], task: bool) -> FrozenTrial:
    trial = optuna.trial.create_trial(
        state=state,
        value=1.0 if state == TrialState.COMPLETE else None,
        user_attrs={TASK_ATTR: LR_RANGE_TEST} if task else {},
        system_attrs={"retry_history": history} if history else {},
    )
    trial.number, trial._trial_id = number, 1000 + number
    return trial


class Study:
    """A study's trials as Optuna's storage would list them, evolving as the service (and
    other replicas) lease, finish, fail and retry: finished trials never change."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.trials: list[FrozenTrial] = []

    def add(self, state: TrialState, history: list[int] | None = None, task: bool = False) -> None:
        self.trials.append(frozen(len(self.trials), state, history or [], task))

    def step(self) -> None:
        rng, trials = self.rng, self.trials
        live = [t for t in trials if not t.state.is_finished()]
        move = rng.random()
        if live and move < 0.5:  # a running or waiting trial ends (or a waiting one starts)
            old = rng.choice(live)
            state = rng.choice([*FINISHED, TrialState.RUNNING])
            trials[old.number] = frozen(old.number, state, _history(old), old.user_attrs != {})
            failed = state == TrialState.FAIL
            if failed and rng.random() < 0.6:  # retried: a WAITING copy naming it
                self.add(TrialState.WAITING, [*_history(old), old.number], old.user_attrs != {})
        else:
            task = rng.random() < 0.05
            self.add(rng.choice([TrialState.RUNNING, TrialState.WAITING, *FINISHED]), task=task)


def _history(trial: FrozenTrial) -> list[int]:
    return list(trial.system_attrs.get("retry_history") or [])


@pytest.mark.parametrize("seed", range(20))
def test_the_memo_counts_what_a_full_tally_counts(seed: int) -> None:
    study = Study(seed)
    memo, other = TallyMemo(), TallyMemo()
    snapshots: list[list[FrozenTrial]] = []
    for _ in range(300):
        study.step()
        trials = list(study.trials)
        snapshots.append(trials)
        assert tally(trials, memo) == tally(trials), len(trials)
        # Another replica's memo, reading now and then (many changes between its reads):
        # still exact.
        if study.rng.random() < 0.1:
            assert tally(trials, other) == tally(trials), len(trials)
    assert memo.length > 0 and other.length > 0  # they did remember a prefix
    # A shorter list than the prefix (the trials as they were long ago) is tallied whole.
    assert tally(snapshots[10], memo) == tally(snapshots[10])


def test_a_list_of_another_study_is_tallied_from_scratch() -> None:
    mine, theirs = Study(1), Study(2)
    for _ in range(100):
        mine.step()
        theirs.step()
    memo = TallyMemo()
    tally(mine.trials, memo)
    for trial in theirs.trials:
        trial._trial_id += 10_000  # another study's trials have other ids
    assert tally(theirs.trials, memo) == tally(theirs.trials)


def test_a_failure_retried_after_the_prefix_took_it_no_longer_counts() -> None:
    study = Study(0)
    study.add(TrialState.COMPLETE)
    study.add(TrialState.FAIL)
    memo = TallyMemo()
    assert tally(study.trials, memo) == (2, 0, 0, 1)
    assert memo.length == 2 and memo.unretried == {1}
    study.add(TrialState.WAITING, [1])  # its retry, queued later (another replica's reaper)
    assert tally(study.trials, memo) == (1, 0, 1, 0)
    study.trials[2] = frozen(2, TrialState.COMPLETE, [1], False)  # the retry completes
    assert tally(study.trials, memo) == (2, 0, 0, 0)
    assert memo.length == 3 and memo.unretried == set()


def make(name: str, **overrides: Any) -> StudySpec:
    return StudySpec.model_validate(spec(name, **overrides))


def lease(service: StudyService, worker: str) -> Lease:
    """A new lease (``worker`` holds none yet: one that does gets its own trial back)."""
    granted = service.lease(worker)
    assert granted is not None
    return granted


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_replicas_each_see_the_budget_the_other_spent(database_url: str) -> None:
    """Two services on one PostgreSQL database share nothing but it (own caches, own memos):
    trials finished, failed for good and retried by one count in the other's budget."""
    settings = Settings(database_url=database_url, lease_timeout_s=600, run_reaper=False)
    a, b = StudyService(settings), StudyService(settings)
    budget = {"n_trials": 6, "max_concurrent": 6, "max_failed": 5}
    a.create_study(make("shared", budget=budget, max_retries=1, pruner={"name": "none"}))
    try:
        first = [lease(a, f"a{i}") for i in range(2)]
        a.complete(first[0].trial_id, first[0].lease_token, [1.0], {})
        assert a.get_study("shared").counts.complete == 1  # a's memo now holds a prefix
        done, retried, lost = (lease(b, f"b{i}") for i in range(3))
        b.complete(done.trial_id, done.lease_token, [2.0], {})
        b.fail(retried.trial_id, retried.lease_token, "oom", retryable=True)
        b.fail(lost.trial_id, lost.lease_token, "bad", retryable=False)
        a.complete(first[1].trial_id, first[1].lease_token, [3.0], {})
        # Counted: 3 complete + 1 final failure = 4 of 6, and b's retry waits: a gets it, then
        # one new trial, then nothing (the retry and the new one make 6).
        again, new = lease(a, "a2"), lease(a, "a3")
        assert a.lease("a4") is None
        assert again.params == retried.params and new.params != retried.params
        assert b.lease("b3") is None  # b counts a's two leases too
        for granted in (again, new):
            a.complete(granted.trial_id, granted.lease_token, [4.0], {})
        seen = [service.get_study("shared") for service in (a, b)]
        assert [info.state for info in seen] == ["completed", "completed"]
        assert seen[0].counts == seen[1].counts
        assert (seen[0].counts.complete, seen[0].counts.fail) == (5, 2), seen[0].counts
    finally:
        for service in (a, b):
            service.storage.engine.dispose()
