"""An ``lr_range_test`` lease: run the LR range test (``trainers.lr_finder``, Smith 2017 §3.3) on
the study's config and send the curve, under the same heartbeat and failure rules as a trial.

``ConfigError`` fails the task for good (the study's config is at fault, retrying cannot help);
any other exception fails it as retryable; a lease lost meanwhile (reaped, 409/404) is dropped.
The server falls back to the default LR ranges once the task has failed for good.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from hpo_service.schemas import Lease
from trainers.lr_finder import LRFinderResult, find_lr
from trainers.task_settle import end_task, send_task_result

if TYPE_CHECKING:
    from trainers.worker import Worker

log = logging.getLogger("hpo.worker")


def result_body(result: LRFinderResult, seconds: float) -> dict[str, Any]:
    """The ``LRRangeTestResult`` fields of a range test: suggestions in config units."""
    reference = result.reference_lrs()
    return {
        "lrs": result.lrs,
        "losses": result.losses,
        "smoothed": result.smoothed,
        "suggested_base_lr": reference["base_lr"],
        "suggested_max_lr": reference["max_lr"],
        "stopped_on_divergence": result.stopped_on_divergence,
        "lr_scale": result.lr_scale,
        "batch_size": result.batch_size,
        "seconds": seconds,
    }


def run_lr_range_test(worker: Worker, lease: Lease) -> str:
    """Run the lease's range test and settle it. Returns the outcome's name."""
    active = worker.start_trial(lease)
    settings = dict(lease.task or {})
    try:
        outcome: LRFinderResult | Exception = find_lr(active.config, **settings)
    except Exception as error:
        outcome = error
    failure = outcome if isinstance(outcome, Exception) else None
    ended = end_task(worker, active, "LR range test", failure)
    if ended is not None:
        return ended
    assert isinstance(outcome, LRFinderResult)
    body = result_body(outcome, time.monotonic() - active.started)
    answer = send_task_result(
        worker,
        active,
        "lr-range-test",
        lambda: worker.client.lr_range_test(lease.trial_id, lease.lease_token, body),
    )
    if answer is None:
        return "lost"
    log.info(
        "LR range test of %s: %s %s%s",
        lease.study,
        answer.status,
        answer.ranges,
        f" ({answer.reason})" if answer.reason else "",
        extra={**worker.log_fields(lease, "lr_range_test_finished"), "seconds": body["seconds"]},
    )
    return answer.status
