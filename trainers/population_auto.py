"""``hpo-worker --population auto``: how many trials to fuse, measured on the trial's config.

K = 1 unless fusing measurably pays on this device: the single-trial step ``train()`` runs
(``vae_step``) and fused steps of K = 1, 2, 4, … members (``stacked_vae_step``) are timed alike
on the same batches of the real training set; doubling goes on while it raises samples/s by
``AUTO_MIN_GAIN``, and the K it settles on is kept only if it also beats the single-trial step
by ``AUTO_MIN_GAIN`` (``choose_population``). With K = 1 the population worker trains every
trial alone with ``train()``, as ``hpo-worker`` without ``--population`` does. Why the baseline
is ``train()``'s step and not fused K = 1: on the idle 2-core CPU fused K = 16 reached 0.91× of
sequential ``train()`` at batch 128 and fused K = 1 0.74× (docs/benchmarks.md, "Population
throughput"), so a rule that only compared fused K against fused K/2 picked a population that
trained slower than one trial at a time.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from trainers.config import TrainConfig
from trainers.data import load_dataset
from trainers.models import build_vae
from trainers.population_stack import MemberStack, stacked_vae_step, unfusable_reason
from trainers.train import (
    amp_context,
    build_optimizer,
    resolve_device,
    vae_loss_fn,
    vae_step,
)

log = logging.getLogger("hpo.worker")

#: Members ``auto`` ever picks, and the gain in samples/s a doubling must bring to be kept (and
#: the fused K over the single-trial step).
AUTO_MAX = 64
AUTO_MIN_GAIN = 1.10
#: Least time each rate is measured over: a 5-step block of one small member lasts ~25 ms on a
#: CPU, too short to read a 10 % difference through the noise.
AUTO_MIN_SECONDS = 0.2


def auto_population(cfg: TrainConfig, steps: int = 5) -> int:
    """K for ``cfg``'s group: 1 unless fusing measurably beats training one trial at a time.

    ``measure_population`` times train()'s own single-trial step and fused steps of K = 1, 2,
    4, …; ``choose_population`` turns those rates into K. Unfusable configs get 1.
    """
    if unfusable_reason(cfg) is not None:
        return 1
    measured = measure_population(cfg, steps)
    k = measured.k
    log.info(
        "--population auto: train() step %.0f samples/s; fused %s (samples/s); "
        "%d fit in half the free memory; picked K = %d",
        measured.single_rate,
        ", ".join(f"K={n}: {rate:.0f}" for n, rate in sorted(measured.fused_rates.items())),
        measured.fits,
        k,
    )
    return k


@dataclass(frozen=True)
class AutoMeasurement:
    """What ``--population auto`` measured on one config, and the K it implies."""

    #: samples/s of the step ``train()`` runs (``vae_step``), one member: the worker's rate
    #: without ``--population``, and the baseline any fused K has to beat
    single_rate: float
    #: samples/s of K fused members (``stacked_vae_step``), K = 1, 2, 4, … as far as measured
    fused_rates: dict[int, float]
    #: members whose weights, Adam state and activations fit in half the free device memory
    fits: int

    @property
    def k(self) -> int:
        return choose_population(self.single_rate, self.fused_rates)


def doubling_pick(fused_rates: Mapping[int, float], min_gain: float = AUTO_MIN_GAIN) -> int:
    """The K doubling settles on: K = 1, 2, 4, … in turn, each kept while its samples/s is at
    least ``min_gain`` × that of the K kept before it (the first K that is not ends the walk)."""
    if not fused_rates:
        raise ValueError("no fused rate measured")
    best_k, best_rate = 0, 0.0
    for k in sorted(fused_rates):
        if best_k and fused_rates[k] < best_rate * min_gain:
            break
        best_k, best_rate = k, fused_rates[k]
    return best_k


def choose_population(
    single_rate: float, fused_rates: Mapping[int, float], min_gain: float = AUTO_MIN_GAIN
) -> int:
    """K from measured rates: the K doubling settles on (``doubling_pick``) if its samples/s
    beat the single-trial step's by at least ``min_gain``, else 1 (train one trial at a time).

    The doubling walks the fused rates, not the single one: fused K = 1 is slower than
    ``train()``'s step (the stacked step's bookkeeping for one member; 18,143 against 24,473
    samples/s on the idle 2-core CPU, docs/benchmarks.md "Population throughput"), so a walk
    started from ``train()`` would stop at K = 2 even where K = 16 pays. Only the K it ends on
    is held against the single-trial baseline.
    """
    if not fused_rates:
        return 1
    k = doubling_pick(fused_rates, min_gain)
    return k if k > 1 and fused_rates[k] >= min_gain * single_rate else 1


def measure_population(
    cfg: TrainConfig, steps: int = 5, min_seconds: float = AUTO_MIN_SECONDS
) -> AutoMeasurement:
    """Time ``cfg``'s single-trial step and fused steps of K = 1, 2, 4, … on the same batches.

    Per member: weights, gradient and two Adam moments (4 × 4 bytes per parameter) plus about
    three copies of every layer's activations for a batch; K stops at what fits in half the
    free memory, at ``AUTO_MAX``, or at the first doubling ``doubling_pick`` does not keep.
    Each rate is timed alike (``_samples_per_s``: one warm-up step, then blocks of ``steps``
    until ``min_seconds`` have passed). The single-trial step is timed before and after the
    fused ones and its faster reading kept, so load that drifts during the measurement does
    not make fusing look better than it is.
    """
    device = resolve_device(cfg.device)
    data = load_dataset(cfg, device)
    vae = build_vae(cfg, data.image_shape)
    n_params = sum(p.numel() for p in vae.parameters())
    widths = sum(m.out_features for m in vae.modules() if isinstance(m, torch.nn.Linear))
    per_member = 16 * n_params + 12 * cfg.batch_size * widths
    fits = max(1, int(0.5 * _free_bytes(device) // per_member))
    limit = min(fits, AUTO_MAX)
    # The same random batches of the real training set for every K (member j sees row j).
    idx = torch.randint(0, len(data.train), (limit, cfg.batch_size), device=device)
    x = data.train[idx]
    eps = torch.randn(limit, cfg.batch_size, cfg.latent_dim, device=device)
    single = _single_rate(cfg, device, data.image_shape, x[0], eps[0], steps, min_seconds)
    fused: dict[int, float] = {}
    k = 1
    while k <= limit:
        fused[k] = _fused_rate(cfg, device, data.image_shape, x[:k], eps[:k], steps, min_seconds)
        if doubling_pick(fused) != k:
            break
        k *= 2
    single = max(
        single, _single_rate(cfg, device, data.image_shape, x[0], eps[0], steps, min_seconds)
    )
    return AutoMeasurement(single_rate=single, fused_rates=fused, fits=fits)


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _single_rate(
    cfg: TrainConfig,
    device: torch.device,
    image_shape: tuple[int, int, int],
    x: torch.Tensor,
    eps: torch.Tensor,
    steps: int,
    min_seconds: float,
) -> float:
    """Samples/s of ``train()``'s step on one member (``vae_step``, ``train()``'s loss and
    optimizer), on the batch ``x`` (``(batch, D)``)."""
    vae = build_vae(cfg, image_shape).to(device)
    optimizer = build_optimizer(vae, cfg, device)
    losses = vae_loss_fn(vae, cfg, amp_context(cfg, device))

    def step() -> torch.Tensor:
        return vae_step(losses, x, eps, 1.0, cfg, optimizer)[0]

    return _samples_per_s(step, device, x.shape[0], steps, min_seconds)


def _fused_rate(
    cfg: TrainConfig,
    device: torch.device,
    image_shape: tuple[int, int, int],
    x: torch.Tensor,
    eps: torch.Tensor,
    steps: int,
    min_seconds: float,
) -> float:
    """Samples/s of ``len(x)`` fused members of ``cfg`` (``x``: ``(K, batch, D)``)."""
    k = x.shape[0]
    vaes = [build_vae(cfg, image_shape).to(device) for _ in range(k)]
    optimizers = [build_optimizer(v, cfg, device) for v in vaes]
    stack = MemberStack(vaes)
    beta, free_bits = torch.ones(k, device=device), torch.full((k,), cfg.free_bits, device=device)
    autocast = amp_context(cfg, device)
    configs = [cfg] * k

    def step() -> torch.Tensor:
        return stacked_vae_step(stack, configs, optimizers, x, eps, beta, free_bits, autocast)[0]

    return _samples_per_s(step, device, k * x.shape[1], steps, min_seconds)


def _samples_per_s(
    step: Callable[[], torch.Tensor],
    device: torch.device,
    samples_per_step: int,
    steps: int,
    min_seconds: float,
) -> float:
    """Samples/s of ``step``: one warm-up step (it allocates the optimizer's state), then
    blocks of ``steps`` steps, each ended by one device wait (as ``train()`` waits once per
    epoch, not per step), until ``min_seconds`` have passed."""
    _wait(step(), device)
    done, seconds = 0, 0.0
    start = time.perf_counter()
    while done == 0 or seconds < min_seconds:
        for _ in range(max(steps, 1)):
            last = step()
        _wait(last, device)
        done += max(steps, 1)
        seconds = time.perf_counter() - start
    return done * samples_per_step / max(seconds, 1e-9)


def _wait(stats: torch.Tensor, device: torch.device) -> None:
    stats.sum().item()  # reads a result back: every queued kernel has run
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = [
    "AUTO_MAX",
    "AUTO_MIN_GAIN",
    "AutoMeasurement",
    "auto_population",
    "choose_population",
    "doubling_pick",
    "measure_population",
]
