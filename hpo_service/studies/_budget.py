"""A study's budget: what counts toward ``n_trials``, when a running study is done, and
whether any study can still give a worker work."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import select

from hpo_service.final_eval import FINAL_EVALUATION, STUDY_ATTR
from hpo_service.lr_range import is_task
from hpo_service.models import StudyRow
from hpo_service.schemas import StudySpec

if TYPE_CHECKING:
    from hpo_service.studies._core import StudyCore


def _history(trial: FrozenTrial) -> list[int]:
    """The numbers of the failed trials ``trial`` retries (``_reaping``: set at its creation)."""
    return list(trial.system_attrs.get("retry_history") or [])


@dataclass
class TallyMemo:
    """What ``tally`` learned from a study's leading finished trials (numbers ``0 … length - 1``),
    kept between calls so that only the trials from the first unfinished one on are read again.

    Sound across replicas: Optuna refuses every write to a finished trial
    (``UpdateFinishedTrialError``), so a finished trial's state and ``retry_history`` never
    change, whoever wrote it; another replica's new trials have higher numbers, after the
    prefix; and a retry (which names earlier failures) is a new trial too, so a failure the
    prefix counts as final is taken back when a later trial names it. A list whose trial at
    ``length - 1`` is not the one remembered (another study, a shorter list) is tallied from
    scratch and the memo starts again from it.

    The lists must come in the order they were read, each no older than the last: an older
    list would get the prefix's newer states. The lease path tallies only lists it read
    under the study lock (``_leasing``), which orders them; callers without the lock
    (``effective_state``) tally without a memo.
    """

    length: int = 0
    last_trial_id: int | None = None
    done: int = 0  # COMPLETE or PRUNED, tasks left out
    unretried: set[int] = field(default_factory=set)  # FAIL numbers no prefix trial retried
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _fits(self, trials: Sequence[FrozenTrial]) -> bool:
        if self.length == 0:
            return True
        if len(trials) < self.length:
            return False
        last = trials[self.length - 1]
        return last._trial_id == self.last_trial_id and last.number == self.length - 1

    def _extend(self, trials: Sequence[FrozenTrial]) -> int:
        """Fold the finished trials right after the prefix into it; returns its new length."""
        if not self._fits(trials):
            self.length, self.last_trial_id, self.done = 0, None, 0
            self.unretried = set()
        while self.length < len(trials):
            trial = trials[self.length]
            if trial.number != self.length or not trial.state.is_finished():
                break
            # A retry comes after the trials it retries (it is a new trial), so a failure is
            # never named before it is seen: taking back those named here is enough.
            self.unretried.difference_update(_history(trial))
            if not is_task(trial):
                if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
                    self.done += 1
                elif trial.state == TrialState.FAIL:
                    self.unretried.add(trial.number)
            self.length += 1
            self.last_trial_id = trial._trial_id
        return self.length


def _count(trials: Sequence[FrozenTrial], retried: set[int]) -> tuple[int, int, int, int]:
    """(COMPLETE or PRUNED, RUNNING, WAITING, FAIL not in ``retried``) among ``trials``, tasks
    left out."""
    done = running = waiting = final_failures = 0
    for trial in trials:
        if is_task(trial):
            continue
        if trial.state == TrialState.RUNNING:
            running += 1
        elif trial.state == TrialState.WAITING:
            waiting += 1
        elif trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            done += 1
        elif trial.state == TrialState.FAIL and trial.number not in retried:
            final_failures += 1
    return done, running, waiting, final_failures


def tally(
    trials: Sequence[FrozenTrial], memo: TallyMemo | None = None
) -> tuple[int, int, int, int]:
    """(finished-or-running toward the budget, running, waiting, final failures).

    A failed trial that was retried does not count: its retry stands in for it. Tasks (an LR
    range test probe, ``hpo_service.lr_range``) are not trials of the search: never counted.
    ``memo`` (the study's, ``LoadedStudy.tally``; see ``TallyMemo`` for the lists it takes):
    the leading finished trials are counted once and remembered; without it every trial is
    read (9.6 ms at 5,000 trials, issue 12's session 6).
    """
    if memo is None:
        retried = {n for t in trials for n in _history(t)}
        done, running, waiting, failures = _count(trials, retried)
    else:
        with memo.lock:
            tail = trials[memo._extend(trials) :]
            retried = {n for t in tail for n in _history(t)}
            # Only a later trial retries a failure, so no prefix trial names one of the tail.
            done, running, waiting, failures = _count(tail, retried)
            done += memo.done
            # The prefix's final failures, less those a later trial retried.
            failures += len(memo.unretried - retried) if retried else len(memo.unretried)
    return done + running + failures, running, waiting, failures


def effective_state(row: StudyRow, trials: Sequence[FrozenTrial], spec: StudySpec) -> str:
    """The study's state as users see it: a running study whose budget is spent is
    ``completed``, one with too many final failures ``failed``."""
    if row.state != "running":
        return row.state
    counted, running, _waiting, failures = tally(trials)
    if failures >= spec.budget.max_failed:
        return "failed"
    if counted >= spec.budget.n_trials and running == 0:
        return "completed"
    return "running"


def _evaluated(core: StudyCore, study_id: int) -> bool:
    """Whether the study's final evaluation has settled: stored, skipped or failed."""
    return STUDY_ATTR in core.storage.get_study_user_attrs(study_id)


def work_may_come(core: StudyCore, kinds: Sequence[str] = ("trial",)) -> bool:
    """Whether some study could still hand out a trial: a ``running`` study that is neither
    spent nor failed (``effective_state``). One at its concurrency cap, or whose running
    trials may fail and be retried, counts: work may come. False (*idle*) when every study
    is stopped, cancelled, completed or failed, or there is none; a study submitted, resumed
    or fired by a schedule later makes work again. For a worker that lists
    ``final_evaluation`` in ``kinds``, a completed study whose final evaluation has not
    settled (``hpo_service.final_eval``) still counts.
    """
    with core.db.session() as session:
        rows = list(session.scalars(select(StudyRow).where(StudyRow.state == "running")))
    for row in rows:
        trials = core.cache.get_all_trials(row.study_id, deepcopy=False)
        spec = core.load(row.study_id).spec
        state = effective_state(row, trials, spec)
        if state == "running":
            return True
        evaluates = spec.final_evaluation.enabled and FINAL_EVALUATION in kinds
        # issue 14.4: a completed study's winners' evaluation may be to come
        if evaluates and state == "completed" and not _evaluated(core, row.study_id):
            return True
    return False
