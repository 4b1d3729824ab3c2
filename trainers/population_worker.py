"""``hpo-worker --population K``: lease up to K trials and train the compatible ones fused.

Everything per trial stays as in the single-trial worker (``trainers.worker``): each trial has
its own lease, heartbeat thread, reports, prune/stop answers and settlement (the same
``Worker`` methods), so a killed population worker leaves K ordinary leases that the server
reaps and retries one by one. Only the training is shared: ``train_population``.

Lease identities: the server hands a worker id its own running trial back (so a restarted
worker resumes), so each of the K slots leases under its own id, ``<worker-id>/<slot>``.

The flow: one long-polled lease, then up to K − 1 more without waiting; trials that cannot be
fused (``unfusable_reason``: conv, VAE-GAN, compiled) are kept leased and trained alone, one by
one, once the population has finished — and no further trials are leased while one waits. A
member that leaves (completed, pruned, cancelled, failed) is settled at once and its slot is
leased again at the end of the next group epoch. Trials of another group (e.g. another batch
size) train as a second stack beside the first, within the same K.

K = ``auto`` (``auto_population``): the largest power of two that fits in half the free device
memory and still raised the measured samples/s by at least 10 % over half as many members.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Hashable
from typing import Any

import torch

from hpo_service.schemas import Lease
from trainers.config import TrainConfig
from trainers.data import load_dataset
from trainers.errors import ConfigError
from trainers.models import build_vae
from trainers.population import Outcome, train_population
from trainers.population_stack import MemberStack, stacked_vae_step, unfusable_reason
from trainers.train import (
    Decision,
    EpochMetrics,
    amp_context,
    build_optimizer,
    parse_config,
    resolve_device,
)
from trainers.worker import ActiveTrial, Worker

log = logging.getLogger("hpo.worker")

#: Members ``auto`` ever picks, and the gain in samples/s a doubling must bring to be kept.
AUTO_MAX = 64
AUTO_MIN_GAIN = 1.10


def run_population(worker: Worker, first: Lease) -> int:
    """Train ``first`` and the trials leased beside it; returns how many trials were settled."""
    capacity = _capacity(worker, first)
    slots: dict[Hashable, ActiveTrial] = {}  # slot number → its trial
    alone: list[ActiveTrial] = []
    settled = 0

    def remaining() -> int | None:
        cap = worker.options.max_trials
        return None if cap is None else cap - worker.trials_done - settled - len(slots) - len(alone)

    def admit(slot: Hashable, lease: Lease) -> tuple[Hashable, dict[str, Any]] | None:
        active = worker.start_trial(lease)
        try:
            reason = unfusable_reason(parse_config(active.config))
        except ConfigError:
            reason = None  # the population reports the error as this member's outcome
        if reason is not None:
            log.info("trial %d: %s; trained after the population", lease.trial_number, reason)
            alone.append(active)
            return None
        slots[slot] = active
        return slot, active.config

    def lease_slot(wait_s: float) -> tuple[Hashable, dict[str, Any]] | None:
        if worker.shutting_down or alone or remaining() == 0:
            return None
        slot = min(set(range(capacity)) - set(slots))
        identity = worker.lease_identity(slot)
        lease = worker._retrying(
            "lease", lambda: worker.client.lease(identity, wait_s, worker.options.device)
        )
        return None if lease is None else admit(slot, lease)

    def on_epoch(slot: Hashable, metrics: EpochMetrics) -> Decision:
        active = slots[slot]
        answer = worker._on_epoch(active.lease, active.state)(metrics)
        return "stop" if answer == "stop" else "continue"

    def should_leave(slot: Hashable) -> bool:
        state = slots[slot].state
        return state.lost or state.stop_reason is not None

    def on_done(slot: Hashable, outcome: Outcome) -> None:
        nonlocal settled
        worker.finish_trial(slots.pop(slot), outcome)
        settled += 1

    members = []
    first_member = admit(0, first)  # Worker.run leased it under slot 0's identity
    if first_member is not None:
        members.append(first_member)
    while len(slots) < capacity and (member := lease_slot(0.0)) is not None:
        members.append(member)
    if members:
        log.info("population of %d trials (capacity %d)", len(members), capacity)
        try:
            train_population(
                members, on_epoch, capacity=capacity, refill=lambda: lease_slot(0.0),
                should_leave=should_leave, on_done=on_done,
            )  # fmt: skip
        except Exception as error:  # the fused step itself failed: every member, retryable
            log.exception("population crashed")
            for slot in list(slots):
                worker.finish_trial(slots.pop(slot), error)
                settled += 1
    for active in alone:
        worker.train_started(active)
        settled += 1
    return settled


def _capacity(worker: Worker, first: Lease) -> int:
    population = worker.options.population
    if population != "auto":
        return int(population)
    if worker.auto_population is None:
        config = dict(first.config)
        if worker.options.device is not None:
            config["device"] = worker.options.device
        try:
            worker.auto_population = auto_population(parse_config(config))
        except ConfigError:
            worker.auto_population = 1
        log.info("--population auto: %d members", worker.auto_population)
    return worker.auto_population


def auto_population(cfg: TrainConfig, steps: int = 5) -> int:
    """K for ``cfg``'s group: free memory bounds it, the measured step time picks it.

    Per member: weights, gradient and two Adam moments (4 × 4 bytes per parameter) plus about
    three copies of every layer's activations for a batch. Then fused steps of K = 1, 2, 4, …
    are timed (``steps`` each, after one warm-up step) and doubling stops once samples/s rises
    by less than ``AUTO_MIN_GAIN``. Unfusable configs get 1.
    """
    if unfusable_reason(cfg) is not None:
        return 1
    device = resolve_device(cfg.device)
    data = load_dataset(cfg, device)
    vae = build_vae(cfg, data.image_shape)
    n_params = sum(p.numel() for p in vae.parameters())
    widths = sum(m.out_features for m in vae.modules() if isinstance(m, torch.nn.Linear))
    per_member = 16 * n_params + 12 * cfg.batch_size * widths
    fits = max(1, int(0.5 * _free_bytes(device) // per_member))
    best_k, best_rate = 1, 0.0
    k = 1
    while k <= min(fits, AUTO_MAX):
        rate = _fused_rate(cfg, device, data.train, k, steps)
        if rate < best_rate * AUTO_MIN_GAIN:
            break
        best_k, best_rate = k, rate
        k *= 2
    return best_k


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _fused_rate(
    cfg: TrainConfig, device: torch.device, train_x: torch.Tensor, k: int, steps: int
) -> float:
    """Samples/s of ``k`` fused members of ``cfg`` (random batches of the real training set)."""
    vaes = [build_vae(cfg, (1, 1, train_x.shape[1])).to(device) for _ in range(k)]
    optimizers = [build_optimizer(v, cfg, device) for v in vaes]
    stack = MemberStack(vaes)
    bs = cfg.batch_size
    idx = torch.randint(0, len(train_x), (k, bs), device=device)
    x, eps = train_x[idx], torch.randn(k, bs, cfg.latent_dim, device=device)
    beta, free_bits = torch.ones(k, device=device), torch.full((k,), cfg.free_bits, device=device)
    autocast = amp_context(cfg, device)
    configs = [cfg] * k
    seconds = 0.0
    for i in range(steps + 1):
        start = time.perf_counter()
        stats, _ = stacked_vae_step(stack, configs, optimizers, x, eps, beta, free_bits, autocast)
        stats.sum().item()  # waits for the device
        if i > 0:  # the first step allocates and warms up
            seconds += time.perf_counter() - start
    return steps * k * bs / max(seconds, 1e-9)


__all__ = ["AUTO_MAX", "auto_population", "run_population"]
