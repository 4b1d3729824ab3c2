"""The LR range test probe (``hpo_service.lr_range``): handed out before a study's first trial,
and its result turned into the study's LR ranges.

The probe is a trial of the study created under the study lock, like any lease, with the user
attribute ``task = "lr_range_test"``: the lease, heartbeat, reaper and retry rules are the
trials' own (a dead worker's probe is failed and queued again, keeping its ``task``). Until it
has finished no trial of the study is sampled; a probe that fails for good keeps the default
ranges and the study says so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo_service import lr_range
from hpo_service.artifacts import artifact_id_for
from hpo_service.errors import WrongLeaseKind
from hpo_service.lr_range_plot import render_study_lr_range
from hpo_service.schemas import LRRangeTestAnswer, LRRangeTestResult
from hpo_service.search_space import resolve_config
from hpo_service.studies._checks import check_lease
from hpo_service.studies._core import LoadedStudy, StudyCore
from hpo_service.studies._diagnostics import Diagnostics
from hpo_service.studies._task_results import settle_task_result

log = logging.getLogger(__name__)

#: What a lease does with a study whose test is pending: wait (nothing to hand out), go on
#: sampling (the test is settled), or hand out this probe (trial id, number, config).
ProbeStep = Literal["wait", "settled"] | tuple[int, int, dict]


class ProbeLeasing:
    """Decides, under the study lock, whether a lease hands out the study's probe."""

    def __init__(self, core: StudyCore) -> None:
        self.core = core

    def step(
        self,
        study_id: int,
        loaded: LoadedStudy,
        trials: list[FrozenTrial],
        worker_id: str,
        kinds: Sequence[str],
    ) -> ProbeStep:
        core = self.core
        found = lr_range.probes(trials)
        pending = lr_range.pending_probe(trials)
        if pending is None and found:  # every probe finished
            attrs = core.storage.get_study_user_attrs(study_id)
            if lr_range.STUDY_ATTR not in attrs:  # failed for good: no result was sent
                reason = str(found[-1].user_attrs.get("fail_reason") or "the probe failed")
                why = f"the probe failed: {reason}"
                outcome = lr_range.outcome_attr(None, why, found[-1].number)
                core.storage.set_study_user_attr(study_id, lr_range.STUDY_ATTR, outcome)
                log.warning("LR range test of %s failed; default ranges kept", loaded.spec.name)
            return "settled"
        if pending is not None and pending.state == TrialState.RUNNING:
            return "wait"  # one probe at a time; the reaper retries it if its worker dies
        if lr_range.LR_RANGE_TEST not in kinds:
            return "wait"  # this worker cannot run the probe, and no trial may go first
        config = resolve_config(loaded.spec, {})  # the study's model, data and batch size
        attrs = {"worker_id": worker_id, "config": config}
        if pending is not None:  # a retry the reaper or a retryable fail queued
            if not core.cache.set_trial_state_values(pending._trial_id, TrialState.RUNNING):
                return "wait"
            for key, value in attrs.items():
                core.storage.set_trial_user_attr(pending._trial_id, key, value)
            return pending._trial_id, pending.number, config
        template = optuna.create_trial(
            state=TrialState.RUNNING,
            user_attrs={lr_range.TASK_ATTR: lr_range.LR_RANGE_TEST, **attrs},
        )
        trial_id = core.cache.create_new_trial(study_id, template_trial=template)
        return trial_id, core.cache.get_trial(trial_id).number, config


class ProbeResults:
    """``POST /v1/trials/{trial_id}/lr-range-test``: a probe's curve, once; its plot is drawn
    off the request and listed on the study (``lr_range.PLOT_FILENAME``) when the server has a
    store."""

    def __init__(self, core: StudyCore, diagnostics: Diagnostics) -> None:
        self.core = core
        self.diagnostics = diagnostics

    def lr_range_test(
        self, trial_id: int, token: str, result: LRRangeTestResult
    ) -> LRRangeTestAnswer:
        """Record a probe's curve and set the study's ranges from it (or keep the defaults and
        say why). The same result again gets the same answer; another result after the first
        raises ``ResultConflict``; a trial lease raises ``WrongLeaseKind``."""
        core = self.core
        with core.db.session() as session:
            row = check_lease(session, trial_id, token)
        trial = core.storage.get_trial(trial_id)
        if trial.user_attrs.get(lr_range.TASK_ATTR) != lr_range.LR_RANGE_TEST:
            raise WrongLeaseKind(
                f"trial {row.trial_number} is a trial, not an lr_range_test task: send its "
                "values to `complete`"
            )
        loaded = core.load(row.study_id)
        ranges = lr_range.ranges_from(result)
        outcome: dict[str, Any] = {}

        def write() -> LRRangeTestAnswer:
            outcome.update(lr_range.outcome_attr(result, ranges, row.trial_number))
            core.storage.set_study_user_attr(row.study_id, lr_range.STUDY_ATTR, outcome)
            core.forget_loaded(row.study_id)  # the next lease loads the space with the ranges
            return LRRangeTestAnswer(
                trial_id=trial_id,
                trial_number=row.trial_number,
                status=outcome["status"],
                ranges={} if isinstance(ranges, str) else ranges,
                reason=outcome.get("reason"),
            )

        answer = LRRangeTestAnswer.model_validate(
            settle_task_result(core, row, loaded, result, write)
        )
        if not outcome:  # a repeat: the stored answer, nothing new to log
            return answer
        log.info("LR range test of %s: %s", loaded.spec.name, lr_range.summary(outcome))
        self.diagnostics.draw_study_plot(
            row.study_id,
            artifact_id_for(row.study_id, trial_id, lr_range.PLOT_FILENAME),
            lr_range.PLOT_FILENAME,
            render_study_lr_range,
            loaded.spec.name,
            outcome,
        )
        return answer
