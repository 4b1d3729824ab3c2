"""The process around the training loop: lease → train → report every epoch → complete.

A heartbeat thread keeps the lease alive while an epoch runs. Failure mapping:

* the server says *prune* at a report → the run stops; that answer ended the trial PRUNED and
  the worker's ``fail`` with ``pruned`` reads the stored answer;
* the study is cancelled (heartbeat/report says *stop*) → the run stops and the worker sends
  ``fail`` (not retryable): the trial fails for good;
* SIGTERM / ``request_shutdown()`` → the run stops at the end of the epoch and the trial is handed
  back for a retry with the same parameters;
* ``ConfigError`` / ``NonFiniteLossError`` → the trial fails for good (the configuration, not the
  worker, is at fault); any other exception → fails as retryable;
* the server is unreachable → calls are retried with capped exponential backoff and the worker
  keeps its trial; a lease that was lost meanwhile (409/404) is dropped with a log line.

The worker talks only HTTP and never needs database credentials.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from hpo_service.client import (
    APIError,
    HPOClient,
    LeaseLost,
    NoWork,
    ServerUnavailable,
)
from hpo_service.schemas import Lease, ReportAnswer
from trainers.checkpoint_sync import send_best_model, train_resumable
from trainers.errors import ConfigError, NonFiniteLossError
from trainers.repro import reproducibility_record
from trainers.train import EpochMetrics, TrainResult, train
from trainers.trial_state import (
    ActiveTrial,
    Settlement,
    TrialFlags,
    epoch_report,
    objective_values,
    pick,
    trial_timings,
)

log = logging.getLogger("hpo.worker")

__all__ = ["TASK_KINDS", "ActiveTrial", "Settlement", "Worker", "WorkerOptions", "epoch_report"]

T = TypeVar("T")
#: The lease kinds that are tasks, not trials: run alone, never counted as trials.
TASK_KINDS = ("lr_range_test", "final_evaluation")
TrainFn = Callable[..., TrainResult]


@dataclass
class WorkerOptions:
    worker_id: str
    device: str | None = None  # overrides the config's device ("cuda:0", "cpu")
    wait_s: float = 20.0  # long-poll length of each lease request
    max_trials: int | None = None  # exit after this many trials
    idle_exit_s: float | None = None  # exit after this long without work (None: never)
    exit_when_idle: bool = False  # exit once the server says no study can give work now
    backoff_max_s: float = 30.0
    # Trials trained at once on the device (trainers.population_worker); "auto" measures it.
    population: int | Literal["auto"] = 1
    # End a trial once its validation −ELBO has not improved for this many epochs (train()'s
    # `patience`); None runs every trial's epochs.
    patience: int | None = None


class Worker:
    def __init__(
        self, client: HPOClient, options: WorkerOptions, train_fn: TrainFn = train
    ) -> None:
        self.client = client
        self.options = options
        self.train_fn = train_fn
        self._shutdown = threading.Event()
        self.trials_done = 0
        # The last empty lease answer said no study can give work now (``exit_when_idle``).
        self.last_idle = False
        self.auto_population: int | None = None  # K measured by --population auto, once

    @property
    def shutting_down(self) -> bool:
        return self._shutdown.is_set()

    def lease_identity(self, slot: int = 0) -> str:
        """The id a lease is asked under: the worker's, or one per population slot (the server
        hands an id its own running trial back, so K trials need K ids)."""
        if self.options.population == 1:
            return self.options.worker_id
        return f"{self.options.worker_id}/{slot}"

    def request_shutdown(self) -> None:
        """Finish the current epoch, hand the trial back for retry, and exit."""
        self._shutdown.set()

    # --- server calls with backoff ------------------------------------------------------------

    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        """Retry while the server is unreachable; the worker keeps its trial meanwhile."""
        delay = 0.5
        while True:
            try:
                return call()
            except ServerUnavailable as error:
                log.warning("%s: server unreachable (%s); retrying in %.1fs", what, error, delay)
                time.sleep(delay)
                delay = min(delay * 2, self.options.backoff_max_s)

    # --- the loop -----------------------------------------------------------------------------

    def run(self) -> int:
        """Lease and train until shutdown, ``max_trials``, ``idle_exit_s`` or, with
        ``exit_when_idle``, until the server says no study can give work. Returns trials."""
        idle_since = time.monotonic()
        while not self._shutdown.is_set():
            if self.options.max_trials is not None and self.trials_done >= self.options.max_trials:
                break
            if self.options.population != 1:
                leases = self._population_round()
            else:
                lease = self._retrying(
                    "lease",
                    lambda: self.client.next_lease(
                        self.lease_identity(),
                        self.options.wait_s,
                        self.options.device,
                        kinds=("trial", *TASK_KINDS),
                    ),
                )
                leases = []
                if isinstance(lease, NoWork):
                    self.last_idle = lease.idle
                else:
                    leases = [lease]
                    self._run_lease(lease)
            if not leases:
                if self.last_idle and self.options.exit_when_idle:
                    log.info("no study can give work now; exiting")
                    break
                idle = time.monotonic() - idle_since
                if self.options.idle_exit_s is not None and idle >= self.options.idle_exit_s:
                    log.info("no work for %.0fs; exiting", idle)
                    break
                continue
            idle_since = time.monotonic()
        return self.trials_done

    def _run_lease(self, lease: Lease) -> None:
        """Run one lease of any kind: a trial (counted) or a task."""
        if lease.kind == "lr_range_test":  # a study's first step, not a trial
            from trainers.lr_task import run_lr_range_test  # it imports this module

            run_lr_range_test(self, lease)
        elif lease.kind == "final_evaluation":  # an ended study's winners (14.4)
            from trainers.final_eval_task import run_final_evaluation  # imports this

            run_final_evaluation(self, lease)
        else:
            self.run_trial(lease)
            self.trials_done += 1

    def _population_round(self) -> list[Lease]:
        """One round of ``--population K``: one batched lease listing the task kinds too (a
        population worker is often a study's only worker, so the LR range test and the final
        evaluation must not wait for another kind of worker). A task comes alone and is run
        alone; else the population's trials train. Returns what was leased."""
        # Imported here: trainers.population_worker imports this module.
        from trainers.population_worker import lease_population, run_population

        leases = lease_population(self)  # the batched routes, one identity per slot
        # The server sends a task alone, but a restarted worker's slots get back what they
        # held, which may be a task beside trials: the task runs first, as it would alone.
        for task in [lease for lease in leases if lease.kind != "trial"]:
            self._run_lease(task)
        trials = [lease for lease in leases if lease.kind == "trial"]
        if trials:
            self.trials_done += run_population(self, trials)
        return leases

    def retrying(self, what: str, call: Callable[[], T]) -> T:
        """Call ``call``, retrying while the server is unreachable (``_retrying``)."""
        return self._retrying(what, call)

    def log_fields(self, lease: Lease, event: str) -> dict[str, object]:
        return self._fields(lease, event)

    def send_fail(self, lease: Lease, reason: str, retryable: bool) -> str:
        """Fail a lease (retryable: handed back for a retry). Returns the outcome's name."""
        try:
            self._retrying(
                "fail",
                lambda: self.client.fail(
                    lease.trial_id, lease.lease_token, reason, retryable=retryable
                ),
            )
        except LeaseLost as error:
            log.warning("trial %d: could not settle: %s", lease.trial_number, error)
            return "lost"
        return "handed back" if retryable else "failed"

    def _fields(self, lease: Lease, event: str) -> dict[str, object]:
        """``extra=`` for a trial's log line: the ids the server's logs use too."""
        return {
            "event": event,
            "study": lease.study,
            "trial_id": lease.trial_id,
            "trial_number": lease.trial_number,
            "worker_id": self.options.worker_id,
        }

    def run_trial(self, lease: Lease) -> str:
        """Train one leased trial and settle it with the server. Returns the outcome."""
        return self.train_started(self.start_trial(lease))

    def train_started(self, active: ActiveTrial) -> str:
        """Train a trial ``start_trial`` began, alone, and settle it."""
        try:
            # issue 14: a retry resumes from its checkpoint; checkpoints every N epochs
            patience = self.options.patience
            train_fn = (
                self.train_fn
                if patience is None
                else functools.partial(self.train_fn, patience=patience)
            )
            outcome: TrainResult | Exception = train_resumable(
                train_fn,
                active.config,
                self._on_epoch(active.lease, active.state),
                self.client,
                active.lease,
                self._retrying,
                self._shutdown.is_set,  # a trial handed back keeps its last epoch
            )
        except Exception as error:
            outcome = error
        return self.finish_trial(active, outcome)

    def start_trial(self, lease: Lease, beat: bool = True) -> ActiveTrial:
        """Log the lease, resolve the config's device and start the trial's heartbeat thread
        (``beat=False``: the caller heartbeats it, as the population worker does)."""
        state = TrialFlags()
        log.info(
            "trial %d of %s: leased, training on %s",
            lease.trial_number,
            lease.study,
            self.options.device or lease.config.get("device", "auto"),
            extra=self._fields(lease, "trial_started"),
        )
        config = dict(lease.config)
        if self.options.device is not None:
            config["device"] = self.options.device
        thread = None
        if beat:
            thread = threading.Thread(
                target=self._heartbeat_loop,
                args=(lease, state),
                daemon=True,
                name=f"heartbeat-{lease.trial_id}",
            )
            thread.start()
        self._send_record(lease, config)  # issue 14: how this trial is trained
        return ActiveTrial(lease, config, state, thread, time.monotonic())

    def _send_record(self, lease: Lease, config: dict[str, Any]) -> None:
        """Send the trial's reproducibility record (``trainers.repro``). Never fails the trial:
        a config the trainer refuses fails in ``train`` itself, naming the field."""
        try:
            record = reproducibility_record(config)
        except ConfigError:
            return
        try:
            self._retrying(
                "record", lambda: self.client.record(lease.trial_id, lease.lease_token, record)
            )
        except APIError as error:  # a lost lease shows at the next report too
            log.warning("trial %d: record not stored: %s", lease.trial_number, error)

    def finish_trial(self, active: ActiveTrial, outcome: TrainResult | Exception) -> str:
        """Stop the heartbeat and settle the trial: complete, pruned, failed or handed back.

        ``ConfigError`` fails it for good; ``NonFiniteLossError`` fails it for good as diverged
        (the server completes it infeasible, issue 10); any other exception fails it as
        retryable. Returns the outcome's name.
        """
        settlement = self.settlement(active, outcome)
        trained = time.monotonic()
        settled = self.send_settlement(settlement)
        self.log_finished(settlement, settled, trained)
        return settled

    def settlement(self, active: ActiveTrial, outcome: TrainResult | Exception) -> Settlement:
        """Stop the trial's heartbeat and decide how it is settled (see ``finish_trial``);
        nothing is sent yet (``send_settlement`` or a population's batched call does)."""
        lease, state = active.lease, active.state
        state.stop.set()
        if active.beat is not None:
            active.beat.join(timeout=5)
        reason = f"{type(outcome).__name__}: {outcome}"
        if isinstance(outcome, ConfigError):
            return Settlement(active, outcome, reason=reason, lost=state.lost)
        if isinstance(outcome, NonFiniteLossError):  # issue 10: reported as diverged
            return Settlement(active, outcome, reason=reason, diverged=True, lost=state.lost)
        if isinstance(outcome, Exception):
            log.error("trial %d crashed", lease.trial_number, exc_info=outcome)
            return Settlement(active, outcome, reason=reason, retryable=True, lost=state.lost)
        # The prune answer already ended the trial PRUNED, so a heartbeat after it was refused
        # (`trial_finished`) and marked the lease lost: pruned comes first, and the fail it
        # sends reads the stored answer.
        if state.pruned:
            return Settlement(active, outcome, reason="pruned by the study's pruner", pruned=True)
        if state.lost:
            log.warning(
                "trial %d: lease lost (%s); result dropped", lease.trial_number, state.stop_reason
            )
            return Settlement(active, outcome, lost=True)
        if state.stop_reason is not None:
            return Settlement(active, outcome, reason=state.stop_reason)
        if outcome.stopped_early and self._shutdown.is_set():
            reason = "worker shut down; handed back for retry"
            return Settlement(active, outcome, reason=reason, retryable=True)
        values = objective_values(outcome.metrics, lease.objective_metrics)
        if values is None:
            return Settlement(
                active,
                outcome,
                reason=f"objective not finite: {pick(outcome.metrics, lease.objective_metrics)}",
                diverged=True,  # issue 10: a non-finite result is a divergence too
            )
        final = {k: v for k, v in outcome.metrics.items() if isinstance(v, int | float)}
        return Settlement(active, outcome, values=values, final=final)

    def send_settlement(self, settlement: Settlement) -> str:
        """Settle one trial through the single-trial routes; returns the outcome's name."""
        if settlement.lost:
            return "lost"
        lease = settlement.active.lease
        try:
            if settlement.values is not None:
                values, final = settlement.values, settlement.final or {}
                if isinstance(settlement.outcome, TrainResult):  # issue 14: kept for the best
                    send_best_model(self.client, lease, settlement.outcome)
                self._retrying(
                    "complete",
                    lambda: self.client.complete(lease.trial_id, lease.lease_token, values, final),
                )
                return "complete"
            answer = self._retrying(
                "fail",
                lambda: self.client.fail(
                    lease.trial_id,
                    lease.lease_token,
                    settlement.reason,
                    retryable=settlement.retryable,
                    pruned=settlement.pruned,
                    diverged=settlement.diverged,
                ),
            )
        except LeaseLost as error:
            return settlement.refused(str(error))
        return settlement.settled(answer.state)

    def log_finished(self, settlement: Settlement, settled: str, trained: float) -> None:
        """The ``trial_finished`` line of a trained trial (``trained``: monotonic time at the
        end of its training, before settling)."""
        result, active = settlement.outcome, settlement.active
        if not isinstance(result, TrainResult):
            return
        lease = active.lease
        timings = trial_timings(result, trained - active.started, time.monotonic() - trained)
        log.info(
            "trial %d of %s: %s after %d epochs in %.1fs (train %.1fs, final eval %.1fs, "
            "%.0f samples/s; %s)",
            lease.trial_number,
            lease.study,
            settled,
            result.epochs_run,
            timings["wall_s"],
            timings["train_s"],
            timings["eval_s"],
            timings["samples_per_sec"],
            ", ".join(
                f"{m}={result.metrics.get(m, float('nan')):.4g}" for m in lease.objective_metrics
            ),
            extra={**self._fields(lease, "trial_finished"), "outcome": settled, **timings},
        )

    def _on_epoch(self, lease: Lease, state: TrialFlags) -> Callable[[EpochMetrics], str]:
        def on_epoch(epoch: EpochMetrics) -> str:
            report = epoch_report(lease, epoch)
            try:
                answer = self._retrying(
                    "report",
                    lambda: self.client.report(
                        lease.trial_id, lease.lease_token, epoch.epoch, report.value, report.metrics
                    ),
                )
            except LeaseLost as error:
                state.lost, state.stop_reason = True, str(error)
                return "stop"
            return self.epoch_answered(lease, state, epoch, answer)

        return on_epoch

    def epoch_answered(
        self, lease: Lease, state: TrialFlags, epoch: EpochMetrics, answer: ReportAnswer
    ) -> str:
        """Log a reported epoch and act on the server's answer: ``"stop"`` or ``"continue"``."""
        log.info(
            "trial %d epoch %d: -ELBO %.2f KL %.2f AU %d beta %.3g lr %.3g, %.0f samples/s",
            lease.trial_number,
            epoch.epoch,
            epoch.values.get("val_neg_elbo", math.nan),
            epoch.values.get("val_kl", math.nan),
            int(epoch.values.get("active_units", 0)),
            epoch.values.get("beta", math.nan),
            epoch.values.get("lr", math.nan),
            epoch.values.get("samples_per_sec", math.nan),
            extra={
                **self._fields(lease, "epoch_reported"),
                "epoch": epoch.epoch,
                "samples_per_sec": epoch.values.get("samples_per_sec"),
                "epoch_seconds": epoch.values.get("epoch_seconds"),
            },
        )
        if answer.action == "prune":
            state.pruned = True
            return "stop"
        if answer.action == "stop":
            state.stop_reason = answer.reason or "stopped by the server"
            return "stop"
        if state.stop_reason is not None or state.lost or self._shutdown.is_set():
            return "stop"
        return "continue"

    def _heartbeat_loop(self, lease: Lease, state: TrialFlags) -> None:
        while not state.stop.wait(lease.heartbeat_interval_s):
            try:
                answer = self.client.heartbeat(lease.trial_id, lease.lease_token)
            except ServerUnavailable as error:
                log.warning("heartbeat: server unreachable (%s)", error)
                continue
            except LeaseLost as error:
                state.lost, state.stop_reason = True, str(error)
                return
            if answer.action == "stop":
                state.stop_reason = answer.reason or "stopped by the server"
