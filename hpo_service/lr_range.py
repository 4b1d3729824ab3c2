"""The LR range test as a study step: what the probe's curve does to the study's LR ranges.

Smith 2017 ("Cyclical Learning Rates for Training Neural Networks", §3.3): run the model for a
short ramp of increasing LRs; ``base_lr`` is where the loss starts to fall, ``max_lr`` where it
stops falling, before it diverges (``trainers.lr_finder.smith_range`` reads both off the
curve; the worker sends them in config units, at the reference batch size).

What the service sets from a suggested range ``[lo, hi]`` (``ranges_from``):

* ``base_lr`` ∈ [max(lo, hi / 100), max(hi / 10, √(lo·hi))], log-scaled. ``base_lr`` is the
  whole LR of a constant-LR trial and the floor of a peaked one. ``hi`` is where the loss
  stopped falling during a ramp of ~100 steps: an LR that survives one step at each rung, not a
  whole run at it, so the top of the range sits an order of magnitude below it (fastai's rule:
  an LR about 10× below the point where the loss is lowest; Howard & Gugger 2020, ch. 5), and
  never below the range's geometric middle, so a narrow curve still leaves a range. ``lo`` is
  where the loss *started* to fall in that ramp: an LR that barely trains in 100 steps, far
  too slow for a whole run, so the range spans at most two decades below ``hi`` (Smith 2017
  §3.3 puts a cyclical base at 1/3–1/4 of the max; two decades leave room for constant-LR
  trials). Measured (``benchmarks/search_quality.py``, mnist5k, 20 epochs; docs/benchmarks.md,
  "Search quality"): with ``[lo, hi]`` itself (session 6) the probe suggested [2.3e-4, 0.107]
  and 7 of the service arm's 16 trials drew ``base_lr`` > 0.02, all pruned or ≥ 19 nats worse
  than the best (117.2 at 6.1e-3); with ``[lo, max(hi / 10, √(lo·hi))]`` (session 6) the arm's
  best test IS-NLL on seeds 0–2 was 109.96 / 109.67 / 108.06 nats, with this rule (session 7)
  106.44 / 110.66 / 106.81 (better on 2 of 3 seeds, by 1.3 nats on average: weak evidence,
  and the principle above).
* ``max_lr_factor`` ∈ [2, F] with F = clamp(hi / lo, 2.5, 10): the peak ``max_lr =
  base_lr × factor`` of a cyclical or one-cycle policy then reaches ≈ hi from a base near the
  range's top (Smith's max/base ≈ 3–4 lies inside whenever hi/lo ≥ 4), and F never exceeds
  the default space's 10. A peak above hi is left to the divergence constraint
  (``hpo_service.constraints``), which teaches the sampler that region, rather than cut out
  of the box.

The probe is a trial of the study (so the lease, heartbeat, reaper and retry rules are the
trials' own) marked with the user attribute ``task = "lr_range_test"``. It never counts toward
the budget and ends in state FAIL — the one finished state no sampler learns from: a COMPLETE
trial without parameters would empty multivariate TPE's intersection search space — with
``task_outcome`` saying what happened. The study records the outcome under the user attribute
``lr_range_test`` (``status``: ``applied`` or ``failed``, the ranges, the curve).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from hpo_service.schemas import LRRangeTestResult, ParamSpec, StudySpec
from hpo_service.search_space import build_space

#: Trial user attribute naming a lease kind other than ``trial``.
TASK_ATTR = "task"
LR_RANGE_TEST = "lr_range_test"
#: Trial user attribute: ``complete`` (its result was applied or judged) once a task finished.
TASK_OUTCOME_ATTR = "task_outcome"
#: Study user attribute holding the test's outcome, ranges and curve.
STUDY_ATTR = "lr_range_test"
#: The file name of the test's plot among the study's artifacts (``lr_range_plot``).
PLOT_FILENAME = "lr_range_test.png"
#: The peak factor's bounds (the default space's ``max_lr_factor`` is [2, 10]).
MIN_FACTOR, MIN_TOP_FACTOR, MAX_FACTOR = 2.0, 2.5, 10.0
#: ``base_lr``'s top lies this many times below the curve's ``hi``, its bottom at most
#: ``BASE_SPAN_BELOW_MAX`` times below it (module docstring).
BASE_BELOW_MAX = 10.0
BASE_SPAN_BELOW_MAX = 100.0


def is_task(trial: FrozenTrial) -> bool:
    """Whether ``trial`` is a task (an LR range test probe), not a trial of the search."""
    return TASK_ATTR in trial.user_attrs


def probes(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if t.user_attrs.get(TASK_ATTR) == LR_RANGE_TEST]


def pending_probe(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The probe a lease should hand out or wait on: the last one, while it is WAITING or
    RUNNING; None when there is none or it has finished."""
    found = probes(trials)
    if found and found[-1].state in (TrialState.WAITING, TrialState.RUNNING):
        return found[-1]
    return None


def ranges_from(result: LRRangeTestResult) -> dict[str, list[float]] | str:
    """The ranges a probe's suggestions set (module docstring), or why none can be set."""
    lo, hi = result.suggested_base_lr, result.suggested_max_lr
    if lo is None or hi is None:
        return "the curve gave no range (the loss never fell, or the scan diverged at once)"
    if not lo < hi:
        return f"the suggested range is empty ({lo:g} >= {hi:g})"
    top = min(MAX_FACTOR, max(MIN_TOP_FACTOR, hi / lo))
    base_top = max(hi / BASE_BELOW_MAX, math.sqrt(lo * hi))
    base_bottom = max(lo, hi / BASE_SPAN_BELOW_MAX)
    return {"base_lr": [base_bottom, base_top], "max_lr_factor": [MIN_FACTOR, top]}


def outcome_attr(
    result: LRRangeTestResult | None, ranges: Mapping[str, list[float]] | str, trial_number: int
) -> dict[str, Any]:
    """The study's ``lr_range_test`` user attribute for a finished probe."""
    attr: dict[str, Any] = {"probe_trial": trial_number}
    if isinstance(ranges, str):
        attr.update(status="failed", reason=f"{ranges}; the default ranges are kept")
    else:
        attr.update(status="applied", ranges=dict(ranges))
    if result is not None:
        attr["suggested"] = {
            "base_lr": result.suggested_base_lr,
            "max_lr": result.suggested_max_lr,
        }
        attr["curve"] = {"lrs": result.lrs, "losses": result.losses, "smoothed": result.smoothed}
        attr.update(
            stopped_on_divergence=result.stopped_on_divergence,
            batch_size=result.batch_size,
            lr_scale=result.lr_scale,
            seconds=result.seconds,
        )
    return attr


def with_ranges(spec: StudySpec, attr: Mapping[str, Any] | None) -> StudySpec:
    """``spec`` with the ranges of an applied test as search-space overrides (log-scaled);
    unchanged when the test is off, pending or failed."""
    if not spec.lr_range_test.enabled or not attr or attr.get("status") != "applied":
        return spec
    searched = {param.name for param in build_space(spec)}
    overrides = dict(spec.search_space)
    for name, (low, high) in attr["ranges"].items():
        # only dimensions the space has: no peak factor where `lr_policy` is fixed constant
        if name in searched and math.isfinite(low) and math.isfinite(high) and 0 < low < high:
            overrides[name] = ParamSpec(low=low, high=high, log=True)
    return spec.model_copy(update={"search_space": overrides})


def summary(attr: Mapping[str, Any] | None) -> str:
    """One line for ``hpo studies`` and the report."""
    if not attr or attr.get("status") == "pending":
        return "pending"
    if attr.get("status") == "applied":
        parts = [f"{name} {low:.3g}–{high:.3g}" for name, (low, high) in attr["ranges"].items()]
        return "applied: " + ", ".join(parts)
    return f"failed: {attr.get('reason', '')}"
