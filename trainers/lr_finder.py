"""The LR range test (Smith 2017, §3.3): ramp the LR up exponentially, watch the loss.

``find_lr(config)`` builds the config's VAE, optimizer and data exactly as training does, and
calls ``range_test``, which owns the ramp, the smoothing, the divergence stop and restores the
model and optimizer to the state they had before the test. The semantics follow the two common
implementations (VAE_DEFINITIONS §7):

* ramp: lr_i = start·(end/start)^(i/(num_iter − 1)) — torch-lr-finder's ``step_mode="exp"``,
  fastai's ``SchedExp``;
* smoothing: fastai's debiased EMA, avg_i = β·avg_{i−1} + (1 − β)·loss_i, smoothed_i =
  avg_i/(1 − β^(i+1)), β = 0.98 (torch-lr-finder's EMA is not debiased; its first points are
  biased towards 0, which is why it skips the start of the curve);
* stop when smoothed > ``diverge_threshold`` × the best smoothed loss so far (fastai: 4×) or
  when the loss is NaN/Inf (the non-finite point is not recorded);
* suggestions on the smoothed curve with the first ``num_iter // 10`` and the last 5 points
  dropped (fastai's trim): ``steepest`` — the LR at the most negative slope in log-LR
  (torch-lr-finder, fastai ``steep``); ``valley`` — fastai's default, a point about half-way
  down the longest decreasing run of the curve.

The suggested range follows Smith 2017, §3.3 — ``base_lr`` where the loss starts to fall,
``max_lr`` where it stops falling, before it diverges — read off a **zero-lag** smoothing of the
raw losses (a centred moving mean, ``smith_range``): the debiased EMA above lags the raw curve by
about 1/(1 − β) = 50 iterations, which moves its minimum well past where the raw loss turned.
fastai's ``valley`` (half-way down the descent) and the steepest point are still reported, but
neither is the top of the range: on a curve whose raw loss kept falling to ≈ 1e-2 the valley
said 7e-4 (issue 10). ``base_lr`` is the first LR at which the smoothed loss has fallen by
``FALL_FRACTION`` of its total fall; when that is not below ``max_lr``, ``max_lr / 4`` (Smith's
rule of thumb, base ≈ max/3 … max/4), never below the first LR scanned.

VAE-specific (VAE_DEFINITIONS §7): the loss is the VAE objective at β = ``beta_target`` (the KL
weight the peak LR will meet after any warm-up; with β = 0 the curve is an autoencoder's and
misleads), with the config's free bits, gradient clipping, optimizer and **batch size**. For a
VAE-GAN the test runs on the generator's VAE objective (one optimizer over encoder and decoder);
the discriminator's LR is not scanned.

Units: the scanned LRs and the suggestions are **effective** LRs (applied to the optimizer at the
config's ``batch_size``); ``reference_lrs()`` converts the suggestions to the config's units (at
``reference_batch_size``, through ``trainers.schedules.lr_scale_factor``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpo_service.lr_range_plot import Mark, RangeCurve, render_lr_range
from trainers.config import TrainConfig
from trainers.data import load_dataset
from trainers.errors import ConfigError
from trainers.models import build_vae
from trainers.schedules import lr_scale_factor
from trainers.train import (
    amp_context,
    build_optimizer,
    clip_gradients,
    parse_config,
    resolve_device,
    vae_loss_fn,
)

#: fastai drops the last 5 points (where the loss explodes) before suggesting.
SKIP_END = 5
#: Smith 2017, §3.3: base_lr ≈ max_lr/3 … max_lr/4 (the fallback when the fall has no start).
BASE_LR_DIVISOR = 4.0
#: "Where the loss starts to fall": the first point this fraction of the way down the fall.
FALL_FRACTION = 0.1
#: Half-width of the centred moving mean, as a fraction of the points recorded (at least 1).
SMOOTH_HALF_WIDTH = 0.03


@dataclass(frozen=True)
class RangeTestCurve:
    """What ``range_test`` recorded: one entry per completed iteration."""

    lrs: list[float]  # LR applied at each iteration
    losses: list[float]  # raw minibatch loss before that iteration's update
    smoothed: list[float]  # debiased EMA of `losses`
    stopped_on_divergence: bool


@dataclass(frozen=True)
class LRFinderResult:
    """The range test's curve and its suggestions (effective LRs at ``batch_size``).

    ``suggested_base_lr``/``suggested_max_lr``: Smith's range (``smith_range``, inside the
    scanned range); they, and ``steepest_lr``/``valley_lr``, are ``None`` when the curve has
    fewer than 3 points (the scan diverged at once: lower ``start_lr``); the suggestions are
    also ``None`` when the loss never fell.
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggested_base_lr: float | None
    suggested_max_lr: float | None
    stopped_on_divergence: bool
    steepest_lr: float | None = None
    valley_lr: float | None = None
    start_lr: float = 0.0
    end_lr: float = 0.0
    num_iter: int = 0
    batch_size: int = 0
    beta: float = 1.0  # the KL weight of the objective scanned
    lr_scale: float = 1.0  # effective LR = config LR × lr_scale (the batch-size rule)

    def reference_lrs(self) -> dict[str, float | None]:
        """The suggestions in config units (LRs at ``reference_batch_size``)."""
        base, peak, k = self.suggested_base_lr, self.suggested_max_lr, self.lr_scale
        return {
            "base_lr": None if base is None else base / k,
            "max_lr": None if peak is None else peak / k,
        }

    def to_json(self) -> str:
        """A JSON object of every field (strict JSON: the curve holds finite numbers only)."""
        return json.dumps(dataclasses.asdict(self), allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> LRFinderResult:
        """Inverse of ``to_json``. Raises ``ValueError`` on malformed or incomplete JSON."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("LR finder JSON must be an object")
        try:
            return cls(**data)
        except TypeError as e:
            raise ValueError(f"not an LR finder result: {e}") from e


# --- pure pieces: ramp, smoothing, suggestions ----------------------------------------------------


def exponential_lrs(start_lr: float, end_lr: float, num_iter: int) -> list[float]:
    """lr_i = start·(end/start)^(i/(num_iter − 1)), i = 0 … num_iter − 1 (torch-lr-finder)."""
    ratio = end_lr / start_lr
    return [start_lr * ratio ** (i / (num_iter - 1)) for i in range(num_iter)]


def debiased_ema(values: Sequence[float], beta: float) -> list[float]:
    """fastai's smoothed loss: avg = β·avg + (1−β)·x; out = avg/(1 − β^(i+1)) (Adam-style
    bias correction, Kingma & Ba 2015, so the first point is the first loss, not (1−β)·loss)."""
    avg, out = 0.0, []
    for i, x in enumerate(values):
        avg = beta * avg + (1.0 - beta) * x
        out.append(avg / (1.0 - beta ** (i + 1)))
    return out


def suggest_steepest(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """LR at the most negative slope d loss / d log(lr) (fastai ``steep``; torch-lr-finder).

    The slope of segment i is (loss[i+1] − loss[i]) / (log lr[i+1] − log lr[i]); the LR returned
    is the segment's left end, lr[i]. Needs at least 2 points.
    """
    if len(lrs) < 2:
        raise ValueError("`lrs` needs at least 2 points to take a slope")
    slopes = [
        (losses[i + 1] - losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i]))
        for i in range(len(lrs) - 1)
    ]
    return lrs[min(range(len(slopes)), key=slopes.__getitem__)]


def suggest_valley(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """fastai's ``valley``: the longest decreasing run (a longest strictly decreasing
    subsequence, O(n²)) from ``start`` to ``end``; the point start + ⌊d/3⌋ + ⌊d/6⌋, d = end −
    start, i.e. about half-way down the valley. (fastai's ``start`` can become −1; clamped to 0.)
    """
    n = len(losses)
    if n < 1:
        raise ValueError("`losses` must not be empty")
    run = [1] * n  # run[i]: length of the longest decreasing subsequence ending at i
    max_start, max_end = 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
            if run[max_end] < run[i]:
                max_end = i
                max_start = max(0, max_end - run[max_end])
    sections = (max_end - max_start) / 3
    return lrs[max_start + int(sections) + int(sections / 2)]


def centred_mean(values: Sequence[float], half_width: int) -> list[float]:
    """Moving mean over ``[i − half_width, i + half_width]`` (shrunk at the ends): no lag, so a
    minimum stays where the raw curve has it."""
    n = len(values)
    return [
        sum(values[max(0, i - half_width) : i + half_width + 1])
        / (min(n, i + half_width + 1) - max(0, i - half_width))
        for i in range(n)
    ]


def smith_range(
    lrs: Sequence[float], losses: Sequence[float], start_lr: float
) -> tuple[float, float] | None:
    """(base_lr, max_lr) by Smith 2017, §3.3, from the raw ``losses`` (module docstring):
    max where the centred-mean loss is lowest, base where it has fallen ``FALL_FRACTION`` of
    the way from its first value to that minimum. None when the loss never falls."""
    half = max(1, round(SMOOTH_HALF_WIDTH * len(losses)))
    curve = centred_mean(losses, half)
    smooth_low = min(range(len(curve)), key=curve.__getitem__)
    fall = curve[0] - curve[smooth_low]
    if fall <= 0:
        return None
    started = next(i for i in range(smooth_low + 1) if curve[i] <= curve[0] - FALL_FRACTION * fall)
    # Next to an exploding tail the window's mean is lowest a few points early: the turn is the
    # lowest raw loss within one window of the smoothed minimum.
    near = range(smooth_low, min(len(losses), smooth_low + half + 1))
    lowest = min(near, key=lambda i: losses[i])
    peak = lrs[lowest]
    base = lrs[started] if started < lowest else peak / BASE_LR_DIVISOR
    return max(start_lr, base), peak


def suggestions(
    lrs: Sequence[float],
    smoothed: Sequence[float],
    num_iter: int,
    start_lr: float,
    losses: Sequence[float] | None = None,
) -> dict[str, float | None]:
    """``steepest`` and ``valley`` on the trimmed smoothed curve (first ``num_iter // 10`` and
    last 5 points dropped, as fastai does; the whole curve when trimming would leave fewer than
    3 points), and ``base_lr``/``max_lr`` by ``smith_range`` on the raw ``losses`` (the smoothed
    curve when not given). ``None`` below 3 points, or when the loss never fell."""
    if len(lrs) < 3:
        return {"steepest": None, "valley": None, "max_lr": None, "base_lr": None}
    lo, hi = num_iter // 10, len(lrs) - SKIP_END
    if hi - lo < 3:
        lo, hi = 0, len(lrs)
    xs, ys = lrs[lo:hi], smoothed[lo:hi]
    steepest, valley = suggest_steepest(xs, ys), suggest_valley(xs, ys)
    picked = smith_range(lrs, smoothed if losses is None else losses, start_lr)
    return {
        "steepest": steepest,
        "valley": valley,
        "max_lr": picked[1] if picked else None,
        "base_lr": picked[0] if picked else None,
    }


# --- the test itself ------------------------------------------------------------------------------


def range_test(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_step: Callable[[int], float],
    *,
    start_lr: float,
    end_lr: float,
    num_iter: int,
    smooth: float = 0.98,
    diverge_threshold: float = 4.0,
) -> RangeTestCurve:
    """Run ``train_step(i)`` for i = 0 … num_iter − 1 at exponentially rising LRs.

    ``train_step`` does one forward/backward/step on the i-th minibatch with the LR already set
    in every param group, and returns the minibatch loss (a float, read before the update). The
    model's and the optimizer's state dicts are copied first and restored afterwards — also when
    ``train_step`` raises — so the caller gets back exactly what it passed in.
    """
    _check_arguments(start_lr, end_lr, num_iter, smooth, diverge_threshold)
    model_state = copy.deepcopy(model.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    lrs_done: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    diverged = False
    avg, best = 0.0, math.inf
    try:
        for i, lr in enumerate(exponential_lrs(start_lr, end_lr, num_iter)):
            # 1) set the ramp's LR on every group
            for group in optimizer.param_groups:
                group["lr"] = lr
            # 2) one update; a NaN/Inf loss is divergence, and its point is not recorded
            loss = train_step(i)
            if not math.isfinite(loss):
                diverged = True
                break
            # 3) debiased EMA (fastai Recorder, β = 0.98)
            avg = smooth * avg + (1.0 - smooth) * loss
            smooth_loss = avg / (1.0 - smooth ** (len(losses) + 1))
            lrs_done.append(lr)
            losses.append(loss)
            smoothed.append(smooth_loss)
            best = min(best, smooth_loss)
            # 4) stop on divergence: smoothed > threshold × best (fastai: 4×; torch-lr-finder 5×)
            if smooth_loss > diverge_threshold * best:
                diverged = True
                break
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
    return RangeTestCurve(lrs_done, losses, smoothed, diverged)


def find_lr(
    config: TrainConfig | Mapping[str, Any],
    *,
    start_lr: float = 1e-6,
    end_lr: float = 1.0,
    num_iter: int = 100,
    smooth: float = 0.98,
    diverge_threshold: float = 4.0,
) -> LRFinderResult:
    """LR range test of the config's VAE on its training data at its batch size.

    The objective is the VAE loss at β = ``beta_target`` with the config's free bits and
    clipping (module docstring). LRs are effective LRs at ``batch_size``.

    Raises ``ConfigError`` (an invalid config, or a batch larger than the training set) and
    ``ValueError`` for invalid range-test arguments (naming the argument).
    """
    _check_arguments(start_lr, end_lr, num_iter, smooth, diverge_threshold)
    cfg = parse_config(config)

    # 1) device, seed, data: as the training loop sets them up
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    data = load_dataset(cfg, device)
    n_train, bs = data.train.shape[0], cfg.batch_size
    if bs > n_train:
        raise ConfigError(
            "batch_size",
            f"larger than the training set of {cfg.dataset!r} ({bs} > {n_train})",
        )
    steps_per_epoch = n_train // bs  # the ragged last batch is dropped, as in training

    # 2) model and optimizer exactly as training builds them
    vae = build_vae(cfg, data.image_shape).to(device)
    optimizer = build_optimizer(vae, cfg, device)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    losses = vae_loss_fn(vae, cfg, amp_context(cfg, device))  # the training loop's own losses
    beta = cfg.beta_target  # the objective the peak LR will meet (VAE_DEFINITIONS §7)
    perm = torch.randperm(n_train, device=device, generator=gen)

    def train_step(i: int) -> float:
        nonlocal perm
        j = i % steps_per_epoch
        if i > 0 and j == 0:  # a fresh shuffle for every pass over the data
            perm = torch.randperm(n_train, device=device, generator=gen)
        x = data.train[perm[j * bs : (j + 1) * bs]]
        if cfg.binarize:
            x = torch.bernoulli(x, generator=gen)
        eps = torch.randn(bs, cfg.latent_dim, device=device, generator=gen)
        terms = losses(x, eps, beta)
        optimizer.zero_grad(set_to_none=True)
        terms.objective.backward()
        clip_gradients(params, cfg.grad_clip_norm, cfg.grad_clip_value)
        optimizer.step()
        return float(terms.objective.detach())  # one sync per step: divergence needs it

    vae.train()
    curve = range_test(
        vae, optimizer, train_step, start_lr=start_lr, end_lr=end_lr, num_iter=num_iter,
        smooth=smooth, diverge_threshold=diverge_threshold,
    )  # fmt: skip
    picks = suggestions(curve.lrs, curve.smoothed, num_iter, start_lr, curve.losses)
    return LRFinderResult(
        lrs=curve.lrs,
        losses=curve.losses,
        smoothed=curve.smoothed,
        suggested_base_lr=picks["base_lr"],
        suggested_max_lr=picks["max_lr"],
        stopped_on_divergence=curve.stopped_on_divergence,
        steepest_lr=picks["steepest"],
        valley_lr=picks["valley"],
        start_lr=start_lr,
        end_lr=end_lr,
        num_iter=num_iter,
        batch_size=bs,
        beta=beta,
        lr_scale=lr_scale_factor(cfg.batch_size, cfg.reference_batch_size, cfg.lr_scaling),
    )


def plot_lr_finder(result: LRFinderResult, path: str | Path) -> None:
    """Write the loss-vs-LR curve (raw and smoothed, log LR axis, suggestions marked) as a PNG
    (``hpo_service.lr_range_plot``, the drawing the server attaches to a study's test)."""
    marks = [
        Mark(lr, name, color)
        for lr, color, name in (
            (result.suggested_base_lr, "C2", "base_lr"),
            (result.suggested_max_lr, "C3", "max_lr (Smith)"),
            (result.valley_lr, "C4", "valley (fastai)"),
            (result.steepest_lr, "C1", "steepest"),
        )
        if lr is not None
    ]
    curve = RangeCurve(
        lrs=result.lrs,
        losses=result.losses,
        smoothed=result.smoothed,
        batch_size=result.batch_size,
        marks=marks,
        stopped_on_divergence=result.stopped_on_divergence,
        ylabel=f"objective at β = {result.beta:g} (nats/example)",
    )
    Path(path).write_bytes(render_lr_range(curve))


def _check_arguments(
    start_lr: float, end_lr: float, num_iter: int, smooth: float, diverge_threshold: float
) -> None:
    if not (math.isfinite(start_lr) and start_lr > 0):
        raise ValueError(f"`start_lr` must be a positive number (got {start_lr})")
    if not (math.isfinite(end_lr) and end_lr > start_lr):
        raise ValueError(f"`end_lr` must be greater than `start_lr` (got {end_lr} <= {start_lr})")
    if num_iter < 2:
        raise ValueError(f"`num_iter` must be at least 2 (got {num_iter})")
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"`smooth` must be in [0, 1) (got {smooth})")
    if not diverge_threshold > 1.0:
        raise ValueError(f"`diverge_threshold` must be greater than 1 (got {diverge_threshold})")


__all__ = [
    "LRFinderResult",
    "RangeTestCurve",
    "centred_mean",
    "debiased_ema",
    "exponential_lrs",
    "find_lr",
    "plot_lr_finder",
    "range_test",
    "smith_range",
    "suggest_steepest",
    "suggest_valley",
    "suggestions",
]
