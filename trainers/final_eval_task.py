"""A ``final_evaluation`` lease (issue 14.4, ``hpo_service.final_eval``): re-evaluate an ended
study's winners precisely from their kept best models and send the results, under the same
heartbeat and failure rules as a trial.

Per winner: fetch its best model (``GET /v1/trials/{id}/best-model`` with this task's lease: only
its holder may), rebuild the VAE from the winner's config, load the weights and estimate
−log p(x) with ``k`` importance samples on the full test split (Burda et al. 2016, Eq. 8;
``trainers.metrics.importance_sampled_nll``), with the evaluation generator's fixed seed
(``trainers.evaluation.eval_generator``). A missing or unreadable best model, or a bad config,
fails the task for good (retrying cannot bring it back); any other exception fails it as
retryable; a lease lost meanwhile is dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from hpo_service.client import APIError, HPOClient
from hpo_service.schemas import Lease
from trainers.checkpoints import load_best_model
from trainers.data import load_dataset
from trainers.errors import CheckpointError
from trainers.evaluation import eval_generator
from trainers.metrics import importance_sampled_nll
from trainers.models import build_vae
from trainers.run_setup import parse_config, resolve_device
from trainers.task_settle import end_task, send_task_result

if TYPE_CHECKING:
    from trainers.worker import Worker

log = logging.getLogger("hpo.worker")


class _ForGood(Exception):
    """A failure retrying cannot fix (the model is gone or does not fit its config)."""


def evaluate_winner(
    client: HPOClient, lease: Lease, winner: Mapping[str, Any], k: int, device: str | None
) -> dict[str, Any]:
    """One winner's ``WinnerEvaluation`` fields; the task's ``lease`` entitles the worker to
    the winner's best model."""
    started = time.monotonic()
    config = dict(winner["config"])
    if device is not None:
        config["device"] = device
    try:
        content, sha256 = client.best_model(
            int(winner["trial_id"]), lease.trial_id, lease.lease_token
        )
        state, best_epoch = load_best_model(content, sha256 or None)
    except (APIError, CheckpointError) as error:
        raise _ForGood(f"trial {winner['trial_number']}: best model: {error}") from error
    cfg = parse_config(config)
    torch_device = resolve_device(cfg.device)
    data = load_dataset(cfg, torch_device)
    vae = build_vae(cfg, data.image_shape).to(torch_device)
    try:
        vae.load_state_dict(state)
    except (RuntimeError, KeyError) as error:
        raise _ForGood(
            f"trial {winner['trial_number']}: the model does not fit: {error}"
        ) from error
    vae.eval()
    nll = importance_sampled_nll(
        vae,
        data.test,
        k=k,
        likelihood=cfg.likelihood,
        gaussian_std=cfg.gaussian_std,
        generator=eval_generator(cfg, torch_device),
    )
    return {
        "trial_number": int(winner["trial_number"]),
        "test_is_nll": nll.mean().item(),
        "k": k,
        "n_examples": len(data.test),
        "best_epoch": best_epoch,
        "seconds": time.monotonic() - started,
    }


def run_final_evaluation(worker: Worker, lease: Lease) -> str:
    """Evaluate the lease's winners and settle the task. Returns the outcome's name."""
    active = worker.start_trial(lease)
    task = dict(lease.task or {})
    k = int(task.get("k", 1))
    device = worker.options.device
    results: list[dict[str, Any]] = []
    outcome: Exception | None = None
    try:
        with torch.no_grad():
            for winner in task.get("winners", []):
                if active.state.stop.is_set():
                    break  # the lease was lost: stop spending compute on it
                results.append(evaluate_winner(worker.client, lease, winner, k, device))
    except Exception as error:
        outcome = error
    if outcome is None and not results:
        outcome = _ForGood("the task named no winner")
    ended = end_task(worker, active, "final evaluation", outcome, for_good=(_ForGood,))
    if ended is not None:
        return ended
    answer = send_task_result(
        worker,
        active,
        "final-evaluation",
        lambda: worker.client.final_evaluation(lease.trial_id, lease.lease_token, results),
    )
    if answer is None:
        return "lost"
    log.info(
        "final evaluation of %s: stored for trials %s (k=%d)",
        lease.study,
        answer.stored,
        k,
        extra=worker.log_fields(lease, "final_evaluation_finished"),
    )
    return "complete"
