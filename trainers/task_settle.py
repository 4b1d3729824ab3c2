"""How a non-trial task (an LR range test, a final evaluation) ends, under a trial's rules.

Both task kinds run under a lease with a heartbeat like a trial: once the work is done (or
raised), the heartbeat stops; a lease lost meanwhile drops the result; a failure is sent as
``fail`` (for good when ``for_good`` says so: the study's config is at fault, retrying cannot
help); a result is sent with the lease's retry rules, and a refusal drops it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from hpo_service.client import LeaseLost
from trainers.errors import ConfigError

if TYPE_CHECKING:
    from trainers.worker import ActiveTrial, Worker

log = logging.getLogger("hpo.worker")
T = TypeVar("T")


def end_task(
    worker: Worker,
    active: ActiveTrial,
    what: str,
    error: Exception | None,
    for_good: tuple[type[Exception], ...] = (),
) -> str | None:
    """Stop the task's heartbeat; the outcome's name when the task ends here (its lease lost,
    or ``error`` sent as ``fail``), else None: the caller sends its result."""
    active.state.stop.set()
    if active.beat is not None:
        active.beat.join(timeout=5)
    if active.state.lost:
        log.warning("%s of %s: lease lost; result dropped", what, active.lease.study)
        return "lost"
    if error is None:
        return None
    reason = f"{type(error).__name__}: {error}"
    retryable = not isinstance(error, (ConfigError, ValueError, *for_good))
    log.error("%s of %s failed: %s", what, active.lease.study, reason)
    return worker.send_fail(active.lease, reason, retryable)


def send_task_result(
    worker: Worker, active: ActiveTrial, what: str, call: Callable[[], T]
) -> T | None:
    """``call`` (the task's result route) with the worker's retries; None if it was refused."""
    try:
        return worker.retrying(what, call)
    except LeaseLost as error:
        log.warning("%s of %s: result refused: %s", what, active.lease.study, error)
        return None
