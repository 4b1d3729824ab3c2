"""A leased trial as the worker holds it, and how it ends: its shared flags, the
``ActiveTrial``, the ``Settlement`` it is settled with, and the pure helpers the single-trial
and the population workers share to turn an epoch or a result into what they send
(``epoch_report``, the objective values, the timings). Split from ``trainers.worker`` (which
re-exports these names) to keep that module to the loop and its server calls.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hpo_service.client import finite_metrics
from hpo_service.schemas import Lease, TrialReport
from trainers.train import EpochMetrics, TrainResult

log = logging.getLogger("hpo.worker")


@dataclass
class TrialFlags:
    """Flags the heartbeat thread and ``on_epoch`` share with the trial's main thread."""

    stop: threading.Event = field(default_factory=threading.Event)
    stop_reason: str | None = None
    pruned: bool = False
    lost: bool = False


@dataclass
class ActiveTrial:
    """A leased trial being trained: its lease, resolved config, shared flags, heartbeat."""

    lease: Lease
    config: dict[str, Any]
    state: TrialFlags
    beat: threading.Thread | None  # None: the population beats all its trials in one request
    started: float  # time.monotonic() at lease


@dataclass(frozen=True)
class Settlement:
    """How a trial that ended is settled with the server: ``complete`` with ``values`` (and
    ``final`` metrics), else ``fail`` with ``reason`` and its flags — or nothing when the lease
    was already lost (``lost``)."""

    active: ActiveTrial
    outcome: TrainResult | Exception
    values: list[float] | None = None
    final: dict[str, float] | None = None
    reason: str = ""
    retryable: bool = False
    pruned: bool = False
    diverged: bool = False
    lost: bool = False

    def settled(self, state: str) -> str:
        """The outcome's name once the server answered with the trial's ``state``."""
        if self.values is not None:
            return "complete"
        if state == "complete":  # issue 10: diverged, completed as infeasible
            return "infeasible"
        return "pruned" if self.pruned else ("handed back" if self.retryable else "failed")

    def refused(self, why: str) -> str:
        """The server refused the settlement (the lease is gone): logged, named ``lost``."""
        what = "result refused" if self.values is not None else "could not settle"
        log.warning("trial %d: %s: %s", self.active.lease.trial_number, what, why)
        return "lost"


def epoch_report(lease: Lease, epoch: EpochMetrics) -> TrialReport:
    """What a worker reports of an epoch: the pruning metric's value (None when it has none or
    it is not finite) and every metric, with the KL per latent dimension."""
    metrics: dict[str, Any] = {**epoch.values, "kl_per_dim": epoch.kl_per_dim}
    value = epoch.values.get(lease.report_metric) if lease.report_metric else None
    if value is not None and not math.isfinite(value):
        value = None
    return TrialReport(
        trial_id=lease.trial_id,
        lease_token=lease.lease_token,
        epoch=epoch.epoch,
        value=value,
        metrics=finite_metrics(metrics),
    )


def trial_timings(result: TrainResult, train_s: float, settle_s: float) -> dict[str, float]:
    """A trial's timings in seconds and its mean training throughput (samples per second,
    the mean of the epochs' ``samples_per_sec``; NaN when no epoch ran). ``train_s`` is the
    training function's wall time; its final evaluation (``final_eval_seconds``) is reported
    apart as ``eval_s`` and not counted as training."""
    rates = [e.values["samples_per_sec"] for e in result.history if "samples_per_sec" in e.values]
    # --- issue 10: the final test evaluation (IS-NLL) is not training time
    eval_s = float(result.metrics.get("final_eval_seconds", 0.0))
    return {
        "wall_s": train_s + settle_s,
        "train_s": train_s - eval_s,
        "eval_s": eval_s,
        "settle_s": settle_s,
        "samples_per_sec": sum(rates) / len(rates) if rates else math.nan,
    }


def pick(metrics: Mapping[str, float], names: list[str]) -> dict[str, float | None]:
    return {name: metrics.get(name) for name in names}


def objective_values(metrics: Mapping[str, float], names: list[str]) -> list[float] | None:
    values = [metrics.get(name) for name in names]
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    return [float(v) for v in values if v is not None]
