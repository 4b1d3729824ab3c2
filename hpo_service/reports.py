"""The morning report of a schedule: what each run found, how it moved, and what got worse.

One row per run that created a study (oldest first): the best value of the template's first
objective, trials complete/pruned/failed/running, the best parameters and their drift from the
previous run's best, parameter importances, and a regression flag when the run's best is worse
than the best of the earlier runs in the window by more than the schedule's threshold
(relative, direction-aware). ``render_png`` draws best value per run with regressions marked.

Reads Optuna's storage through its API only; never imports the web framework.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import optuna
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import select

from hpo_service.constraints import is_feasible
from hpo_service.errors import StudyNotFound
from hpo_service.models import FiringRow
from hpo_service.schedules import firing_info, get_schedule
from hpo_service.schemas import (
    Direction,
    NightReport,
    ParamDrift,
    ScheduleReport,
    StudyTemplate,
    TrialCounts,
)
from hpo_service.studies import StudyService

#: Below this many complete trials importances are noise (PED-ANOVA compares the top 10 %).
MIN_TRIALS_FOR_IMPORTANCE = 10


def build_report(studies: StudyService, ref: str, nights: int = 30) -> ScheduleReport:
    """The report over the schedule's latest ``nights`` runs. Raises ``ScheduleNotFound``."""
    with studies.db.session() as session:
        schedule = get_schedule(session, ref)
        template = StudyTemplate.model_validate(schedule.template)
        runs = list(
            session.scalars(
                select(FiringRow)
                .where(FiringRow.schedule_id == schedule.id, FiringRow.status == "created")
                .order_by(FiringRow.scheduled_for.desc(), FiringRow.id.desc())
                .limit(nights)
            )
        )[::-1]
        skipped_query = select(FiringRow).where(
            FiringRow.schedule_id == schedule.id, FiringRow.status == "skipped"
        )
        if runs:
            skipped_query = skipped_query.where(FiringRow.scheduled_for >= runs[0].scheduled_for)
        skipped = [
            firing_info(row, schedule.name)
            for row in session.scalars(skipped_query.order_by(FiringRow.scheduled_for).limit(500))
        ]
        name, zone, threshold = schedule.name, schedule.timezone, schedule.regression_threshold
    metric, direction = template.metric_names[0], template.directions[0]
    note = None
    if len(template.objectives) > 1:
        note = (
            f"the template has {len(template.objectives)} objectives; this report follows the "
            f"first, {metric} ({direction})"
        )

    reports: list[NightReport] = []
    best_so_far: float | None = None
    best_study: str | None = None
    previous_params: dict[str, Any] | None = None
    for run in runs:
        night = _night(studies, run, metric, direction)
        if night.best_value is not None:
            if best_so_far is not None:
                night.change_vs_best = _relative_worsening(night.best_value, best_so_far, direction)
                night.regression = night.change_vs_best > threshold
            if previous_params is not None:
                night.drift = _drift(previous_params, night.best_params)
            previous_params = night.best_params
            if best_so_far is None or _better(night.best_value, best_so_far, direction):
                best_so_far, best_study = night.best_value, night.study
        reports.append(night)
    return ScheduleReport(
        schedule=name,
        timezone=zone,
        metric=metric,
        direction=direction,
        note=note,
        regression_threshold=threshold,
        nights=reports,
        regressions=[night.study for night in reports if night.regression],
        best_study=best_study,
        best_value=best_so_far,
        skipped=skipped,
    )


def _night(studies: StudyService, run: FiringRow, metric: str, direction: Direction) -> NightReport:
    assert run.study_name is not None
    night = NightReport(
        date=run.local_time[:10],
        local_time=run.local_time,
        study=run.study_name,
        kind=run.kind,
        state="deleted",
        best_value=None,
        best_params={},
        trials=TrialCounts(),
        drift=[],
        importances={},
        importance_note=None,
        change_vs_best=None,
        regression=False,
        warm_started=run.warm_started,
        seed=run.seed,
    )
    try:
        info = studies.get_study(run.study_name)
    except StudyNotFound:
        night.note = "the study was deleted"
        return night
    night.state, night.trials = info.state, info.counts
    night.lr_range_test = info.lr_range_test
    night.final_evaluation = info.final_evaluation
    if info.metric_names[0] != metric or info.directions[0] != direction:
        night.note = (
            f"this run optimised {info.metric_names[0]} ({info.directions[0]}), not {metric}"
        )
        return night
    # The service's shared cache: a past night's trials are finished, so they are read once
    # per process, not once per report request.
    storage = studies.cache
    complete = [
        t
        for t in storage.get_all_trials(
            info.study_id, deepcopy=False, states=(TrialState.COMPLETE,)
        )
        if t.values
    ]
    # Collapsed or diverged trials (hpo_service.constraints) never make a night's best.
    feasible = [t for t in complete if is_feasible(t)]
    if not feasible:
        night.note = "no feasible complete trial" if complete else "no complete trial"
        return night
    best = min(feasible, key=lambda t: -t.values[0] if direction == "maximize" else t.values[0])
    night.best_value, night.best_params = best.values[0], dict(best.params)
    night.importances, night.importance_note = _importances(studies, run.study_name, complete)
    return night


def _importances(
    studies: StudyService, study_name: str, complete: list[FrozenTrial]
) -> tuple[dict[str, float], str | None]:
    """Optuna's default importance evaluator on the first objective; empty with a note when
    there are too few trials or the evaluator refuses."""
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return {}, (
            f"{len(complete)} complete trial(s); importances need {MIN_TRIALS_FOR_IMPORTANCE}"
        )
    study = optuna.load_study(
        study_name=study_name, storage=studies.cache, sampler=optuna.samplers.RandomSampler()
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            importances = optuna.importance.get_param_importances(
                study, target=lambda trial: trial.values[0]
            )
        except (ValueError, RuntimeError) as error:
            return {}, f"importances unavailable: {error}"
    note = "; ".join(sorted({str(w.message) for w in caught})) or None
    return {key: float(value) for key, value in importances.items()}, note


def _better(value: float, than: float, direction: Direction) -> bool:
    return value > than if direction == "maximize" else value < than


def _relative_worsening(value: float, best: float, direction: Direction) -> float:
    """How much worse ``value`` is than ``best``, as a fraction of |best| (negative: better)."""
    worse = best - value if direction == "maximize" else value - best
    return worse / max(abs(best), 1e-12)


def _drift(previous: dict[str, Any], current: dict[str, Any]) -> list[ParamDrift]:
    drift = []
    for name in sorted(previous.keys() | current.keys()):
        before, after = previous.get(name), current.get(name)
        relative = None
        if (
            isinstance(before, int | float)
            and isinstance(after, int | float)
            and not isinstance(before, bool)
            and not isinstance(after, bool)
            and before != 0
            and math.isfinite(before)
        ):
            relative = (after - before) / abs(before)
        drift.append(
            ParamDrift(
                name=name,
                previous=before,
                current=after,
                relative_change=relative,
                changed=before != after,
            )
        )
    return drift


def render_png(report: ScheduleReport) -> bytes:
    """Best value per run, the running best, and regressions marked in red (PNG bytes)."""
    figure = Figure(figsize=(9, 4.5), dpi=100, layout="constrained")
    axes = figure.subplots()
    points = [(i, n.best_value, n.regression) for i, n in enumerate(report.nights)]
    valued = [(i, value, flag) for i, value, flag in points if value is not None]
    labels = [n.date if n.kind != "manual" else f"{n.date} (manual)" for n in report.nights]
    if valued:
        xs = [i for i, _, _ in valued]
        ys = [value for _, value, _ in valued]
        axes.plot(xs, ys, marker="o", label=f"best {report.metric}")
        running: list[float] = []
        for value in ys:
            if not running or _better(value, running[-1], report.direction):
                running.append(value)
            else:
                running.append(running[-1])
        axes.step(xs, running, where="post", linestyle="--", color="grey", label="best so far")
        flagged = [(i, value) for i, value, flag in valued if flag]
        if flagged:
            axes.scatter(
                [i for i, _ in flagged],
                [value for _, value in flagged],
                s=120,
                marker="x",
                color="red",
                zorder=3,
                label=f"regression (> {report.regression_threshold:.0%} worse)",
            )
        axes.legend(loc="best")
    else:
        axes.text(0.5, 0.5, "no run with a complete trial yet", ha="center", va="center")
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    axes.set_ylabel(f"best {report.metric} ({report.direction})")
    axes.set_title(f"{report.schedule}: best value per run ({report.timezone})")
    axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()
