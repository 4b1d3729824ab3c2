"""The worker's side of checkpoints (issue 14): resume a retry, send checkpoints and the best
model to the server over HTTP (``trainers.checkpoints`` holds the format).

* A lease with ``resume_from`` (a retry whose earlier attempt stored a checkpoint): fetch it,
  verify and load it, and train from the epoch after it; the server is told where the run
  resumed before its first report, so the earlier attempt's curve and this one's are one. A
  missing, corrupt or unfitting checkpoint starts the run fresh, and says so (a warning in the
  worker's log and ``resume_fallback`` on the trial).
* Every ``checkpoint_every_epochs`` the run's state is sent (``PUT …/checkpoint``), after the
  epoch's report was answered "continue"; and at the epoch a worker shutting down (SIGTERM)
  stops at, so the trial it hands back loses no epoch.
* With ``keep_best_model``, the selected model's weights are sent before ``complete``.

A checkpoint that cannot be sent (server unreachable, too large) is skipped with a warning: the
trial goes on, and a retry resumes from an older one or starts fresh.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from hpo_service.client import APIError, ClientError, HPOClient
from hpo_service.schemas import Lease
from trainers.checkpoints import TrainState, best_model_bytes, digest, from_bytes, to_bytes
from trainers.errors import CheckpointError
from trainers.train import EpochMetrics, TrainResult

log = logging.getLogger("hpo.worker")

T = TypeVar("T")
Retrying = Callable[[str, Callable[[], T]], T]
#: The worker's per-epoch callback ("continue" / "stop"), as ``train``'s ``on_epoch``.
OnEpoch = Callable[[EpochMetrics], str | None]


def train_resumable(
    train_fn: Callable[..., TrainResult],
    config: Mapping[str, Any],
    on_epoch: OnEpoch,
    client: HPOClient,
    lease: Lease,
    retrying: Retrying[Any],
    handing_back: Callable[[], bool] = lambda: False,
) -> TrainResult:
    """Run ``train_fn`` for ``lease``: resumed from its checkpoint when it names one (fresh when
    that fails), sending checkpoints every ``checkpoint_every_epochs`` and when
    ``handing_back()`` at a stop (the worker shuts down). ``retrying`` wraps the
    calls that must reach the server (the worker's backoff)."""
    resume = fetch_resume(client, lease, retrying)
    if resume is None and lease.checkpoint_every_epochs == 0:
        return train_fn(config, on_epoch)
    if resume is not None:
        try:
            sending = _sending(on_epoch, client, lease, resume, retrying, handing_back)
            return train_fn(config, sending, resume=resume)
        except CheckpointError as error:  # it loaded but does not fit this run's model
            fell_back(client, lease, retrying, str(error))
    return train_fn(config, _sending(on_epoch, client, lease, None, retrying, handing_back))


def send_best_model(client: HPOClient, lease: Lease, result: TrainResult) -> None:
    """Send the selected model's weights before ``complete`` when the lease asks for them."""
    if not lease.keep_best_model or result.best_state is None:
        return
    content = best_model_bytes(result.best_state, result.best_epoch)
    epoch = max(result.best_epoch, 1)
    try:
        client.upload_checkpoint(
            lease.trial_id, lease.lease_token, epoch, content, digest(content), best_model=True
        )
    except ClientError as error:
        log.warning("trial %d: best model not stored: %s", lease.trial_number, error)


def fetch_resume(client: HPOClient, lease: Lease, retrying: Retrying[Any]) -> TrainState | None:
    """The checkpoint ``lease`` resumes from, verified; None when it names none, or (and the
    server is told why) when it is unusable."""
    source = lease.resume_from
    if source is None:
        return None
    try:
        fetched = retrying(
            "resume-checkpoint",
            lambda: client.resume_checkpoint(lease.trial_id, lease.lease_token),
        )
        if fetched is None:
            raise CheckpointError(
                f"the checkpoint of trial {source.trial_number} is missing on the server"
            )
        content, sha256 = fetched
        return from_bytes(content, sha256 or source.sha256)
    except CheckpointError as error:
        fell_back(client, lease, retrying, str(error))
        return None
    except APIError as error:  # the lease was lost meanwhile: the first report will say so
        log.warning("trial %d: resume not possible: %s", lease.trial_number, error)
        return None


def fell_back(client: HPOClient, lease: Lease, retrying: Retrying[Any], reason: str) -> None:
    """Say (log, and ``resumed`` with no epoch) that the retry starts fresh, and why."""
    assert lease.resume_from is not None
    source = lease.resume_from.trial_number
    log.warning(
        "trial %d: cannot resume from trial %d's checkpoint (%s); starting fresh",
        lease.trial_number,
        source,
        reason,
        extra={"event": "resume_fallback", "trial_id": lease.trial_id, "study": lease.study},
    )
    try:
        retrying(
            "resumed",
            lambda: client.resumed(lease.trial_id, lease.lease_token, source, None, reason),
        )
    except APIError as error:
        log.warning("trial %d: could not record the fallback: %s", lease.trial_number, error)


def _sending(
    on_epoch: OnEpoch,
    client: HPOClient,
    lease: Lease,
    resumed: TrainState | None,
    retrying: Retrying[Any],
    handing_back: Callable[[], bool],
) -> OnEpoch:
    """``on_epoch`` that first tells the server where a resumed run started (before its first
    report) and after every ``checkpoint_every_epochs``-th epoch answered "continue" sends the
    run's state."""
    pending = resumed

    def wrapped(epoch: EpochMetrics) -> str | None:
        nonlocal pending
        if pending is not None:
            say_resumed(client, lease, pending.epoch, retrying)
            pending = None
        decision = on_epoch(epoch)
        if epoch.checkpoint is not None and checkpoint_due(
            lease, epoch.epoch, decision, handing_back
        ):
            send_checkpoint(client, lease, epoch.epoch, epoch.checkpoint)
        return decision

    return wrapped


def checkpoint_due(
    lease: Lease, epoch: int, decision: str | None, handing_back: Callable[[], bool]
) -> bool:
    """Whether the state at the end of ``epoch`` (answered ``decision``) is sent: every
    ``checkpoint_every_epochs``-th epoch that goes on, and the epoch a trial handed back stops
    at; never the last epoch (nothing is left to resume)."""
    every = lease.checkpoint_every_epochs
    if every == 0 or epoch == int(lease.config.get("epochs", 0)):
        return False
    if decision == "stop":
        return handing_back()
    return epoch % every == 0


def say_resumed(client: HPOClient, lease: Lease, epoch: int, retrying: Retrying[Any]) -> None:
    """Tell the server the retry resumed at ``epoch`` (before its first report)."""
    assert lease.resume_from is not None
    source = lease.resume_from.trial_number
    log.info(
        "trial %d: resumed from trial %d at epoch %d",
        lease.trial_number,
        source,
        epoch,
        extra={"event": "trial_resumed", "trial_id": lease.trial_id, "study": lease.study},
    )
    try:
        retrying(
            "resumed", lambda: client.resumed(lease.trial_id, lease.lease_token, source, epoch)
        )
    except APIError as error:
        log.warning("trial %d: could not record the resume: %s", lease.trial_number, error)


def send_checkpoint(
    client: HPOClient, lease: Lease, epoch: int, state: Callable[[], TrainState]
) -> None:
    """Serialize ``state()`` and store it as the trial's checkpoint of ``epoch``; a failure is
    logged and skipped (a retry resumes from an older one or starts fresh)."""
    started = time.perf_counter()
    content = to_bytes(state())
    serialized = time.perf_counter()
    try:
        client.upload_checkpoint(lease.trial_id, lease.lease_token, epoch, content, digest(content))
    except ClientError as error:
        log.warning(
            "trial %d: checkpoint of epoch %d not stored: %s", lease.trial_number, epoch, error
        )
        return
    done = time.perf_counter()
    log.info(
        "trial %d: checkpoint of epoch %d stored (%.1f MB; serialize %.2fs, send %.2fs)",
        lease.trial_number,
        epoch,
        len(content) / 1e6,
        serialized - started,
        done - serialized,
        extra={
            "event": "checkpoint_stored",
            "trial_id": lease.trial_id,
            "study": lease.study,
            "epoch": epoch,
            "checkpoint_bytes": len(content),
            "checkpoint_seconds": done - started,
        },
    )
