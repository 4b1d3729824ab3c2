"""Your own training code as a worker: lease a trial, train it your way, report, settle.

::

    from hpo_service import sdk

    for trial in sdk.trials("http://127.0.0.1:8000", token=WORKER_TOKEN):
        with trial:                                   # complete or fail on leaving the block
            model = MyVAE(trial.config["latent_dim"])
            for epoch in range(trial.config["epochs"]):
                val_neg_elbo = train_one_epoch(model, trial.config)
                trial.report(epoch, val_neg_elbo, val_kl=kl)   # raises TrialPruned / TrialStopped
            trial.complete(val_neg_elbo=val_neg_elbo)

``trial.config`` is the full resolved training config (``hpo_service.schemas.TrainConfig``'s
fields, LRs at the reference batch size), ``trial.params`` what the sampler chose. A background
thread heartbeats the lease while the block runs. Leaving the block:

* normally → ``complete`` with the values given to ``trial.complete`` or, when it was not
  called, the last reported value (single-objective studies);
* ``TrialPruned`` (the pruner said so at a report) → the trial is told PRUNED; suppressed;
* ``TrialStopped`` (the study was cancelled) → failed for good; suppressed;
* ``TrialLost`` (the lease expired or the trial was deleted) → nothing to send; suppressed;
* any other ``Exception`` → failed with its type, message and traceback tail; suppressed and
  logged, so the loop goes on to the next trial (``raise_errors=True`` re-raises instead);
* ``KeyboardInterrupt`` (Ctrl-C), ``SystemExit`` or ``WorkerShutdown`` (SIGTERM) → handed back
  with ``retryable`` so the server queues a retry with the same parameters at once, not after the
  lease timeout; re-raised, so the program stops.

Exceptions::

    TrialEnded          the server ended the trial: leave your training loop
    ├── TrialPruned     the study's pruner stopped it at a report
    ├── TrialStopped    the study was cancelled
    └── TrialLost       the lease is gone (expired and reaped, or the trial deleted)
    WorkerShutdown      (a BaseException) SIGTERM arrived while the loop ran

The server is retried with capped exponential backoff while it is unreachable; the lease is kept.
Started by ``hpo agent`` (``HPO_LEASE`` set), ``trials()`` yields just the agent's trial and
tells the agent (on ``HPO_METRICS_FD``) that it settles the trial itself.
This module needs only the base install (httpx, pydantic): no torch, no server.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import FrameType, TracebackType
from typing import Any, TypeVar

from hpo_service.client import (
    HPOClient,
    LeaseLost,
    NoWork,
    ServerUnavailable,
    make_http_client,
)
from hpo_service.schemas import Lease
from hpo_service.task_watch import TaskWatch

log = logging.getLogger("hpo.sdk")

T = TypeVar("T")

#: Most characters of a failure's traceback sent as its reason (the server keeps 2,000).
REASON_CHARS = 1900


class TrialEnded(Exception):
    """The server ended the trial; raised by ``Trial.report`` so the training loop ends."""


class TrialPruned(TrialEnded):
    """The study's pruner stopped the trial at this report (told PRUNED on leaving ``with``)."""


class TrialStopped(TrialEnded):
    """The study was cancelled: the trial fails for good on leaving ``with``."""


class TrialLost(TrialEnded):
    """The lease is gone (expired and reaped, or the trial deleted): nothing will be recorded."""


class WorkerShutdown(BaseException):
    """SIGTERM arrived: the current trial is handed back for a retry and the loop ends."""


def _retrying(what: str, call: Callable[[], T], backoff_max_s: float = 30.0) -> T:
    """Retry while the server is unreachable; the trial's lease is kept meanwhile."""
    delay = 0.5
    while True:
        try:
            return call()
        except ServerUnavailable as error:
            log.warning("%s: server unreachable (%s); retrying in %.1fs", what, error, delay)
            time.sleep(delay)
            delay = min(delay * 2, backoff_max_s)


def _number(name: str, value: Any) -> float | list[float]:
    """A metric as the wire takes it: a float or a list of floats (0-d tensors convert too)."""
    if isinstance(value, str | bytes) or value is None:
        raise TypeError(f"metric `{name}` must be a number or a list of numbers (got {value!r})")
    if isinstance(value, Sequence):
        return [float(v) for v in value]
    tolist = getattr(value, "tolist", None)  # numpy arrays and tensors with more than one value
    if callable(tolist) and getattr(value, "ndim", 0) > 0:
        return [float(v) for v in tolist()]
    return float(value)


class Trial:
    """One leased trial. Use it as a context manager; see the module docstring."""

    def __init__(
        self,
        client: HPOClient,
        lease: Lease,
        *,
        raise_errors: bool = False,
        agent_fd: int | None = None,
    ) -> None:
        self.client = client
        self._agent_fd = agent_fd  # under `hpo agent`: tell it that this trial settles itself
        self.lease = lease
        self.raise_errors = raise_errors
        self.outcome: str | None = None  # complete, pruned, failed, stopped, handed back, lost
        self._last_value: float | None = None
        self._last_metrics: dict[str, Any] = {}
        self._stop_reason: str | None = None
        self._lost_reason: str | None = None
        self._done = threading.Event()
        self._beat = threading.Thread(
            target=self._heartbeat_loop, daemon=True, name=f"heartbeat-{lease.trial_id}"
        )
        self._beat.start()

    # --- what the trial is ------------------------------------------------------------------

    @property
    def trial_id(self) -> int:
        return self.lease.trial_id

    @property
    def number(self) -> int:
        return self.lease.trial_number

    @property
    def study(self) -> str:
        return self.lease.study

    @property
    def config(self) -> dict[str, Any]:
        """The full resolved training config, by ``TrainConfig`` field name."""
        return self.lease.config

    @property
    def params(self) -> dict[str, Any]:
        """The sampled parameters only (``max_lr_factor`` rather than ``max_lr``, ...)."""
        return self.lease.params

    @property
    def objective_metrics(self) -> list[str]:
        return self.lease.objective_metrics

    @property
    def should_stop(self) -> bool:
        """True once a heartbeat learned that the study was cancelled or the lease lost."""
        return self._stop_reason is not None or self._lost_reason is not None

    # --- the calls a training loop makes ---------------------------------------------------

    def report(self, epoch: int, value: float | None = None, **metrics: Any) -> None:
        """Report epoch ``epoch`` (0-based): ``value`` of the study's report metric
        (``lease.report_metric``, e.g. ``val_neg_elbo`` in nats per example) and any metrics.

        Returns when training should go on. Raises ``TrialPruned`` (the pruner says stop),
        ``TrialStopped`` (the study was cancelled) or ``TrialLost`` (the lease is gone).
        """
        self._check_open()
        if value is not None:
            value = float(value)
        sent = value if value is not None and math.isfinite(value) else None
        wire = {name: _number(name, v) for name, v in metrics.items()}
        try:
            answer = _retrying(
                "report",
                lambda: self.client.report(
                    self.trial_id, self.lease.lease_token, epoch, sent, wire
                ),
            )
        except LeaseLost as error:
            self._lost_reason = str(error)
            raise TrialLost(str(error)) from error
        self._last_value = sent
        self._last_metrics = dict(wire)
        if self.lease.report_metric is not None and sent is not None:
            self._last_metrics[self.lease.report_metric] = sent
        if answer.action == "prune":
            raise TrialPruned(answer.reason or f"pruned at epoch {epoch}")
        if answer.action == "stop":
            self._stop_reason = answer.reason or "stopped by the server"
        if self._lost_reason is not None:
            raise TrialLost(self._lost_reason)
        if self._stop_reason is not None:
            raise TrialStopped(self._stop_reason)

    def complete(self, value: float | Sequence[float] | None = None, **metrics: Any) -> None:
        """Finish the trial. The objective values are ``value`` (one per objective) or, when not
        given, the study's objective metrics picked from ``metrics`` by name; all ``metrics``
        are stored with the trial. Raises ``ValueError`` naming a missing or non-finite
        objective, and ``TrialLost`` when the server refuses the result (lease gone).
        """
        self._check_open()
        final = {name: _number(name, v) for name, v in metrics.items()}
        values = self._objective_values(value, final)
        scalars = {k: v for k, v in final.items() if isinstance(v, float)}
        self._finish()
        try:
            _retrying(
                "complete",
                lambda: self.client.complete(
                    self.trial_id, self.lease.lease_token, values, scalars
                ),
            )
        except LeaseLost as error:
            self.outcome = "lost"
            raise TrialLost(str(error)) from error
        self.outcome = "complete"

    def fail(self, reason: str, *, retryable: bool = False) -> None:
        """Give the trial up; ``retryable`` queues a retry with the same parameters at once."""
        self._check_open()
        self._send_fail(reason, retryable=retryable)

    # --- settling ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.outcome is not None:
            raise RuntimeError(f"trial {self.number} is already settled ({self.outcome})")

    def _objective_values(
        self, value: float | Sequence[float] | None, metrics: Mapping[str, Any]
    ) -> list[float]:
        names = self.objective_metrics
        if value is None:
            missing = [n for n in names if not isinstance(metrics.get(n), float)]
            if missing:
                raise ValueError(
                    f"`complete` needs the objective metric(s) {missing} of study "
                    f"{self.study!r} (as `value` or by name)"
                )
            values = [float(metrics[n]) for n in names]
        else:
            values = [float(value)] if isinstance(value, int | float) else [float(v) for v in value]
        if len(values) != len(names):
            raise ValueError(f"`value`: study {self.study!r} has {len(names)} objective(s) {names}")
        bad = [n for n, v in zip(names, values, strict=True) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"objective {bad} is not finite: {values}")
        return values

    def _finish(self) -> None:
        """Stop heartbeating: the trial is being settled (and tell ``hpo agent`` so, first)."""
        if self._agent_fd is not None and not self._done.is_set():
            with contextlib.suppress(OSError):
                os.write(self._agent_fd, b'{"sdk_settled": "settling"}\n')
        self._done.set()
        if threading.current_thread() is not self._beat:
            self._beat.join(timeout=10)

    def _send_fail(self, reason: str, *, retryable: bool = False, pruned: bool = False) -> None:
        self._finish()
        try:
            _retrying(
                "fail",
                lambda: self.client.fail(
                    self.trial_id,
                    self.lease.lease_token,
                    reason[:REASON_CHARS],
                    retryable=retryable,
                    pruned=pruned,
                ),
            )
        except LeaseLost as error:
            log.warning("trial %d: could not settle: %s", self.number, error)
            self.outcome = "lost"
            return
        self.outcome = "pruned" if pruned else ("handed back" if retryable else "failed")

    def _settle_normal_exit(self) -> None:
        """The block ended without settling: complete with the last report, if it is one."""
        if self._lost_reason is not None:
            self._finish()
            self.outcome = "lost"
        elif self._stop_reason is not None:
            self._send_fail(self._stop_reason)
            self.outcome = "stopped"
        elif len(self.objective_metrics) == 1 and self._last_value is not None:
            metrics = {k: v for k, v in self._last_metrics.items() if k != "value"}
            self.complete(self._last_value, **metrics)
        else:
            self._send_fail(
                f"the training code returned without a result: call trial.complete(...) with "
                f"{self.objective_metrics}"
            )

    def __enter__(self) -> Trial:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> bool:
        if self.outcome is not None:  # settled inside the block
            self._finish()
            return kind is not None and issubclass(kind, TrialEnded)
        if error is None:
            self._settle_normal_exit()
            return False
        if isinstance(error, TrialPruned):
            self._send_fail(str(error) or "pruned by the study's pruner", pruned=True)
            return True
        if isinstance(error, TrialStopped):
            self._send_fail(str(error) or "stopped by the server")
            self.outcome = "stopped"
            return True
        if isinstance(error, TrialLost):
            self._finish()
            self.outcome = "lost"
            return True
        if isinstance(error, KeyboardInterrupt | SystemExit | WorkerShutdown):
            self._send_fail(
                f"{type(error).__name__}: worker interrupted; handed back for retry", retryable=True
            )
            return False
        if isinstance(error, Exception):
            text = "".join(traceback.format_exception(kind, error, trace))
            head = f"{type(error).__name__}: {error}\n"
            self._send_fail(head + text[-(REASON_CHARS - len(head)) :])
            log.error("trial %d failed", self.number, exc_info=error)
            return not self.raise_errors
        self._send_fail(f"{type(error).__name__}: {error}", retryable=True)
        return False

    def _heartbeat_loop(self) -> None:
        while not self._done.wait(self.lease.heartbeat_interval_s):
            try:
                answer = self.client.heartbeat(self.trial_id, self.lease.lease_token)
            except ServerUnavailable as error:
                log.warning("heartbeat: server unreachable (%s)", error)
                continue
            except LeaseLost as error:
                self._lost_reason = str(error)
                return
            if answer.action == "stop":
                self._stop_reason = answer.reason or "stopped by the server"


def _raise_shutdown(signum: int, frame: FrameType | None) -> None:
    raise WorkerShutdown(f"signal {signal.Signals(signum).name}")


def trials(
    server: str | None = None,
    *,
    token: str | None = None,
    worker_id: str | None = None,
    wait_s: float = 20.0,
    max_trials: int | None = None,
    idle_exit_s: float | None = None,
    exit_when_idle: bool = False,
    device: str | None = None,
    raise_errors: bool = False,
    handle_sigterm: bool = True,
    client: HPOClient | None = None,
) -> Iterator[Trial]:
    """Lease trials one after another and yield each; use each as ``with trial:``.

    ``server`` defaults to ``HPO_SERVER_URL`` (else ``http://127.0.0.1:8000``), ``token`` to
    ``HPO_WORKER_TOKEN`` (else ``HPO_TOKEN``), ``worker_id`` to ``HPO_WORKER_ID`` (else host and
    process id; a restarted worker with the same id gets its running trial back). Stops after
    ``max_trials`` trials, ``idle_exit_s`` seconds without work (None: never) or, with
    ``exit_when_idle``, once the server says no study can give work now. With
    ``handle_sigterm`` (main thread only) SIGTERM raises ``WorkerShutdown`` in the training code,
    so the trial is handed back like on Ctrl-C. A trial not used as a context manager is settled
    when the loop moves on (as a normal exit) or is closed (handed back).
    """
    if client is None:
        url = server or os.environ.get("HPO_SERVER_URL", "http://127.0.0.1:8000")
        token = token or os.environ.get("HPO_WORKER_TOKEN") or os.environ.get("HPO_TOKEN")
        client = HPOClient(make_http_client(url, token))
    inherited = os.environ.get("HPO_LEASE")
    if inherited:  # started by `hpo agent`: the one trial it leased, settled here
        fd = os.environ.get("HPO_METRICS_FD")
        yield from _agent_trial(client, Lease.model_validate_json(inherited), fd, raise_errors)
        return
    worker_id = worker_id or os.environ.get("HPO_WORKER_ID") or _default_worker_id()
    previous = None
    if handle_sigterm and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_shutdown)
    try:
        done = 0
        idle_since = time.monotonic()
        watch = TaskWatch(client)
        while max_trials is None or done < max_trials:
            lease = _retrying("lease", lambda: client.next_lease(worker_id, wait_s, device))
            if isinstance(lease, NoWork):
                watch.waited()  # a step only an hpo-worker runs may be what holds it back
                if lease.idle and exit_when_idle:
                    log.info("no study can give work now; leaving the loop")
                    return
                if idle_exit_s is not None and time.monotonic() - idle_since >= idle_exit_s:
                    log.info("no work for %.0fs; leaving the loop", idle_exit_s)
                    return
                continue
            trial = Trial(client, lease, raise_errors=raise_errors)
            log.info("trial %d of %s leased", trial.number, trial.study)
            try:
                yield trial
            except GeneratorExit:
                if trial.outcome is None:
                    trial._send_fail("the worker left its loop; handed back", retryable=True)
                raise
            if trial.outcome is None:
                trial._settle_normal_exit()
            done += 1
            idle_since = time.monotonic()
            watch.worked()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _agent_trial(
    client: HPOClient, lease: Lease, fd: str | None, raise_errors: bool
) -> Iterator[Trial]:
    trial = Trial(client, lease, raise_errors=raise_errors, agent_fd=int(fd) if fd else None)
    yield trial
    if trial.outcome is None:
        trial._settle_normal_exit()


def _default_worker_id() -> str:
    return f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
