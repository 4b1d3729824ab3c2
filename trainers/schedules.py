"""Schedules as pure functions of the optimizer step: β(t) for KL annealing, LR(t) and β1(t).

nanoGPT's ``get_lr(it)`` style: a frozen dataclass holds everything in **steps** (converted once
from the config's ``*_epochs`` fields), and ``kl_beta(step, s)`` / ``learning_rate(step, s)`` /
``beta1_at(step, s)`` are cheap pure functions the loop calls every step. ``step`` is the 0-based
global optimizer step; ``T = epochs · steps_per_epoch`` is the number of steps in the run.

Epochs become steps by rounding half up (``round_half_up(epochs · steps_per_epoch)``); lengths
that divide (a half cycle, a decay period) are at least one step.

Learning rates in the config are given at ``reference_batch_size``; ``lr_scale_factor`` is the one
place that turns them into the effective LRs at ``batch_size`` (Goyal et al. 2017 linear rule,
Malladi et al. 2022 square-root rule). ``LRSchedule`` holds LRs already scaled.

Choices worth knowing (each also noted where it is made):

* **Sigmoid ramp** (Fu et al. 2019 notebook, ``frange_cycle_sigmoid``): the raw logistic
  σ(12v − 6) is 0.0025 at v = 0 and 0.9975 at v = 1. We rescale it to hit exactly 0 and 1, so a
  sigmoid warm-up starts at ``beta_min`` and ends at ``beta_target`` with no jump onto the
  plateau. It differs from the raw curve by at most 0.0025·(β_target − β_min).
* **Exponential LR decay** is applied smoothly per step, lr = base·γ^(t / steps_per_epoch): it
  equals torch's per-epoch ``ExponentialLR`` at every epoch boundary and has no staircase.
* **LR warm-up** (Goyal et al. 2017) multiplies whatever the policy gives by min(1, (t+1)/W):
  the first step already moves (lr/W rather than 0) and step W−1 reaches the policy's LR. The
  policy's clock is not delayed by the warm-up, so a cycle's edges stay where the config puts
  them. β1 is not warmed up: it follows the policy's phase.
* **One-cycle** follows ``torch.optim.lr_scheduler.OneCycleLR`` (cosine anneal): the peak is
  ``max_lr``, the start ``max_lr/div_factor``; ``base_lr`` is not used by this policy.
* **β1 cycling** (Smith & Topin 2017; torch ``cycle_momentum``) exists only for the policies
  that move between two LRs (triangular, triangular2, exp_range, cosine, one_cycle); for the
  others ``beta1_at`` returns ``None`` even when ``cycle_beta1`` is set (β1 stays fixed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from hpo_service.schemas import KLRamp as RampShape
from hpo_service.schemas import KLScheduleName as KLKind
from hpo_service.schemas import LRPolicy as LRPolicyName
from trainers.config import CYCLICAL_LR_POLICIES, TrainConfig

#: A warm-up's ramp shape is its name; the cyclical schedule takes its shape from `kl_ramp`.
_WARMUP_SHAPES: dict[str, RampShape] = {
    "linear": "linear",
    "cosine": "cosine",
    "sigmoid": "sigmoid",
}

#: Steepness of the sigmoid ramp: σ(12v − 6) (Fu et al. 2019, ``frange_cycle_sigmoid``).
SIGMOID_SPAN = 6.0


# --- batch-size scaling of the learning rate ---------------------------------------------------


def lr_scale_factor(
    batch_size: int, reference_batch_size: int, rule: Literal["linear", "sqrt", "none"]
) -> float:
    """Factor k that turns an LR given at ``reference_batch_size`` into one at ``batch_size``.

    * ``linear``: k = B/B_ref — Goyal et al. 2017 ("multiply the learning rate by k");
      derived for SGD with momentum.
    * ``sqrt``: k = √(B/B_ref) — Malladi et al. 2022 (SDE analysis of adaptive methods).
    * ``none``: k = 1.

    Raises ``ValueError`` for non-positive batch sizes or an unknown rule.
    """
    if batch_size < 1 or reference_batch_size < 1:
        raise ValueError(
            f"`batch_size` and `reference_batch_size` must be positive "
            f"(got {batch_size} and {reference_batch_size})"
        )
    ratio = batch_size / reference_batch_size
    if rule == "linear":
        return ratio  # Goyal et al. 2017, §2.1: η ← k·η when the minibatch grows by k
    if rule == "sqrt":
        return math.sqrt(ratio)  # Malladi et al. 2022: η ∝ √B for Adam-family methods
    if rule == "none":
        return 1.0
    raise ValueError(f"`rule` must be 'linear', 'sqrt' or 'none' (got {rule!r})")


# --- small helpers --------------------------------------------------------------------------------


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """``epochs · steps_per_epoch`` rounded half up (0.5 epoch of 3 steps → 2 steps)."""
    return math.floor(epochs * steps_per_epoch + 0.5)


def _check_steps_per_epoch(steps_per_epoch: int) -> None:
    if steps_per_epoch < 1:
        raise ValueError(f"`steps_per_epoch` must be at least 1 (got {steps_per_epoch})")


def _check_step(step: int) -> None:
    if step < 0:
        raise ValueError(f"`step` must be non-negative (got {step})")


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def ramp(v: float, shape: RampShape) -> float:
    """A monotone ramp f on [0, 1] with f(0) = 0 and f(1) = 1.

    * linear: f(v) = v (Sønderby et al. 2016 warm-up; Fu et al. 2019 linear cycle);
    * cosine: f(v) = ½ − ½·cos(πv) (Fu et al. 2019 notebook, ``frange_cycle_cosine``);
    * sigmoid: σ(12v − 6) (Fu et al. 2019 notebook, ``frange_cycle_sigmoid``), rescaled by
      (σ(12v−6) − σ(−6)) / (σ(6) − σ(−6)) so that f(0) = 0 and f(1) = 1 exactly (the raw
      logistic is 0.0025 and 0.9975 there); f(½) = ½ either way.
    """
    v = min(1.0, max(0.0, v))
    if shape == "linear":
        return v
    if shape == "cosine":
        return 0.5 - 0.5 * math.cos(math.pi * v)
    if shape == "sigmoid":
        low, high = _sigmoid(-SIGMOID_SPAN), _sigmoid(SIGMOID_SPAN)
        return (_sigmoid(2 * SIGMOID_SPAN * v - SIGMOID_SPAN) - low) / (high - low)
    raise ValueError(f"unknown ramp shape {shape!r}")


# --- KL annealing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KLSchedule:
    """β(t) settings, all lengths in optimizer steps.

    ``kind`` is ``constant`` (β_target throughout), a warm-up ``linear``/``cosine``/``sigmoid``
    over ``warmup_steps`` from ``beta_min`` to ``beta_target``, or ``cyclical`` (Fu et al. 2019)
    with period ``cycle_steps`` = ⌈T/M⌉, rising fraction ``ratio`` (R) and rise shape ``ramp``.
    """

    kind: KLKind
    beta_target: float
    beta_min: float = 0.0
    warmup_steps: int = 0
    total_steps: int = 1
    cycle_steps: int = 1
    ratio: float = 1.0
    ramp: RampShape = "linear"

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be non-negative (got {self.warmup_steps})")
        if self.cycle_steps < 1:
            raise ValueError(f"`cycle_steps` must be at least 1 (got {self.cycle_steps})")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"`ratio` must be in (0, 1] (got {self.ratio})")
        if self.beta_min > self.beta_target:
            raise ValueError(
                f"`beta_min` ({self.beta_min}) must not exceed `beta_target` ({self.beta_target})"
            )


def kl_schedule_from_config(cfg: TrainConfig, steps_per_epoch: int) -> KLSchedule:
    """The config's KL schedule in steps: ``kl_warmup_epochs`` → ``warmup_steps``,
    P = ⌈T/M⌉ with T = ``epochs · steps_per_epoch`` and M = ``kl_cycles``.

    Raises ``ValueError`` when ``steps_per_epoch`` < 1.
    """
    _check_steps_per_epoch(steps_per_epoch)
    total = cfg.epochs * steps_per_epoch
    return KLSchedule(
        kind=cfg.kl_schedule,
        beta_target=cfg.beta_target,
        beta_min=cfg.beta_min,
        warmup_steps=epochs_to_steps(cfg.kl_warmup_epochs, steps_per_epoch),
        total_steps=total,
        cycle_steps=max(1, math.ceil(total / cfg.kl_cycles)),  # Fu et al. 2019: P = ⌈T/M⌉
        ratio=cfg.kl_ratio,
        ramp=_WARMUP_SHAPES.get(cfg.kl_schedule, cfg.kl_ramp),
    )


def kl_beta(step: int, s: KLSchedule) -> float:
    """The KL weight β at optimizer ``step`` (0-based). Raises ``ValueError`` if step < 0."""
    _check_step(step)
    span = s.beta_target - s.beta_min
    # 1) constant: β-VAE weight from the first step (Higgins et al. 2017)
    if s.kind == "constant":
        return s.beta_target
    # 2) cyclical (Fu et al. 2019): τ = (t mod P)/P; β = β_min + (β_max−β_min)·f(min(1, τ/R))
    if s.kind == "cyclical":
        tau = (step % s.cycle_steps) / s.cycle_steps
        return s.beta_min + span * ramp(min(1.0, tau / s.ratio), s.ramp)
    # 3) warm-up of 0 steps: the target at once (no division by zero)
    if s.warmup_steps == 0:
        return s.beta_target
    # 4) monotone warm-up (Sønderby et al. 2016; Bowman et al. 2016 sigmoid shape):
    #    β_t = β_min + (β_target − β_min)·f(min(1, t/N_warm)); β = β_target from t = N_warm on
    return s.beta_min + span * ramp(min(1.0, step / s.warmup_steps), s.ramp)


# --- learning rate --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LRSchedule:
    """LR(t) settings, all lengths in optimizer steps, all LRs already batch-scaled.

    ``max_lr`` equals ``base_lr`` for policies that do not use it (constant, step, exponential).
    """

    policy: LRPolicyName
    base_lr: float
    max_lr: float
    total_steps: int
    warmup_steps: int = 0
    # step decay: ×decay_gamma every `step_size` steps; exponential: ×decay_gamma per epoch
    decay_gamma: float = 1.0
    step_size: int = 1
    steps_per_epoch: int = 1
    # CLR (Smith 2017): half-cycle length and exp_range's γ per iteration
    half_cycle_steps: int = 1
    exp_range_gamma: float = 1.0
    # SGDR (Loshchilov & Hutter 2017): number of cosine cycles over the run
    cosine_cycles: int = 1
    # one-cycle (Smith & Topin 2017; torch OneCycleLR)
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    three_phase: bool = False
    # β1 cycling inverse to the LR (Smith & Topin 2017); off unless `cycle_beta1`
    cycle_beta1: bool = False
    beta1_min: float = 0.85
    beta1_max: float = 0.95

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"`total_steps` must be at least 1 (got {self.total_steps})")
        if self.base_lr <= 0 or self.max_lr <= 0:
            raise ValueError(
                f"`base_lr` and `max_lr` must be positive (got {self.base_lr}, {self.max_lr})"
            )
        for name in ("step_size", "steps_per_epoch", "half_cycle_steps", "cosine_cycles"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1 (got {getattr(self, name)})")
        if self.warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be non-negative (got {self.warmup_steps})")

    @property
    def cosine_cycle_steps(self) -> int:
        """Length of one SGDR cycle: ⌈T / cycles⌉ (the last one may be cut short)."""
        return max(1, math.ceil(self.total_steps / self.cosine_cycles))

    @property
    def one_cycle_initial_lr(self) -> float:
        return self.max_lr / self.div_factor  # torch OneCycleLR: initial_lr = max_lr/div_factor

    @property
    def one_cycle_min_lr(self) -> float:
        return self.one_cycle_initial_lr / self.final_div_factor  # min_lr = initial/final_div


def lr_schedule_from_config(
    cfg: TrainConfig, steps_per_epoch: int, base_lr: float | None = None
) -> LRSchedule:
    """The config's LR policy in steps, with LRs scaled to ``cfg.batch_size``.

    ``base_lr`` overrides ``cfg.base_lr`` for another parameter group (the VAE-GAN decoder or
    discriminator), also given at the reference batch size; ``max_lr`` then scales by the same
    ratio, so every group keeps the config's ``max_lr/base_lr``. ``None`` uses ``cfg.base_lr``.

    Raises ``ValueError`` when ``steps_per_epoch`` < 1 or ``base_lr`` ≤ 0.
    """
    _check_steps_per_epoch(steps_per_epoch)
    if base_lr is not None and not base_lr > 0:
        raise ValueError(f"`base_lr` must be positive (got {base_lr})")
    k = lr_scale_factor(cfg.batch_size, cfg.reference_batch_size, cfg.lr_scaling)
    reference_base = cfg.base_lr if base_lr is None else base_lr
    if cfg.max_lr is not None and cfg.lr_policy in CYCLICAL_LR_POLICIES:
        reference_max = cfg.max_lr * (reference_base / cfg.base_lr)
    else:
        reference_max = reference_base  # unused by this policy
    return LRSchedule(
        policy=cfg.lr_policy,
        base_lr=k * reference_base,
        max_lr=k * reference_max,
        total_steps=cfg.epochs * steps_per_epoch,
        warmup_steps=epochs_to_steps(cfg.lr_warmup_epochs, steps_per_epoch),
        decay_gamma=cfg.lr_decay_gamma,
        step_size=max(1, epochs_to_steps(cfg.lr_step_epochs, steps_per_epoch)),
        steps_per_epoch=steps_per_epoch,
        half_cycle_steps=max(1, epochs_to_steps(cfg.lr_half_cycle_epochs, steps_per_epoch)),
        exp_range_gamma=cfg.lr_exp_range_gamma,
        cosine_cycles=cfg.lr_cosine_cycles,
        pct_start=cfg.one_cycle_pct_start,
        div_factor=cfg.one_cycle_div_factor,
        final_div_factor=cfg.one_cycle_final_div_factor,
        three_phase=cfg.one_cycle_three_phase,
        cycle_beta1=cfg.cycle_beta1,
        beta1_min=cfg.beta1_min,
        beta1_max=cfg.beta1_max,
    )


def _clr_height(step: int, s: LRSchedule) -> float:
    """Smith 2017 CLR (bckenstler/CLR, torch CyclicLR): the fraction of (max_lr − base_lr).

    cycle = ⌊1 + it/(2·step_size)⌋;  x = |it/step_size − 2·cycle + 1|;
    height = max(0, 1 − x)·scale, scale = 1 (triangular), 1/2^(cycle−1) (triangular2),
    γ^it (exp_range, evaluated on iterations).
    """
    cycle = math.floor(1 + step / (2 * s.half_cycle_steps))
    x = abs(step / s.half_cycle_steps - 2 * cycle + 1)
    if s.policy == "triangular2":
        scale = 1.0 / 2.0 ** (cycle - 1)
    elif s.policy == "exp_range":
        scale = s.exp_range_gamma**step
    else:
        scale = 1.0
    return max(0.0, 1.0 - x) * scale


def _cosine_height(step: int, s: LRSchedule) -> float:
    """SGDR (Loshchilov & Hutter 2017, Eq. 5) with T_mult = 1: ½(1 + cos(π·T_cur/T_i)),
    T_cur = t mod T_i, T_i = ⌈T / cycles⌉ — torch's ``CosineAnnealingWarmRestarts``."""
    period = s.cosine_cycle_steps
    return 0.5 * (1.0 + math.cos(math.pi * (step % period) / period))


def _one_cycle(step: int, s: LRSchedule) -> tuple[float, float]:
    """(LR, β1) of torch's ``OneCycleLR`` with cosine annealing (Smith & Topin 2017).

    Phases end at pct_start·T − 1 (initial → max), then [three-phase] 2·pct_start·T − 2
    (max → initial) and T − 1 (initial → min), or [two-phase, fastai] T − 1 (max → min). Within a
    phase, anneal(a, b, p) = b + (a − b)/2·(1 + cos(πp)). β1 runs max → min → max inversely
    (constant at max in the third phase). Steps past T − 1 hold the final values.
    """
    initial, peak, low = s.one_cycle_initial_lr, s.max_lr, s.one_cycle_min_lr
    b_hi, b_lo = s.beta1_max, s.beta1_min
    T = s.total_steps
    phases: list[tuple[float, float, float, float, float]]  # end_step, lr a→b, β1 a→b
    if s.three_phase:
        phases = [
            (float(s.pct_start * T) - 1, initial, peak, b_hi, b_lo),
            (float(2 * s.pct_start * T) - 2, peak, initial, b_lo, b_hi),
            (T - 1, initial, low, b_hi, b_hi),
        ]
    else:
        phases = [
            (float(s.pct_start * T) - 1, initial, peak, b_hi, b_lo),
            (T - 1, peak, low, b_lo, b_hi),
        ]
    t = min(step, T - 1)
    start = 0.0
    for i, (end, lr_a, lr_b, m_a, m_b) in enumerate(phases):
        if t <= end or i == len(phases) - 1:
            pct = (t - start) / (end - start)
            cos_out = math.cos(math.pi * pct) + 1
            return lr_b + (lr_a - lr_b) / 2.0 * cos_out, m_b + (m_a - m_b) / 2.0 * cos_out
        start = end
    raise AssertionError("unreachable: the last phase always matches")


def _policy_lr(step: int, s: LRSchedule) -> float:
    """The policy's LR before warm-up."""
    # 1) constant
    if s.policy == "constant":
        return s.base_lr
    # 2) step decay: ×γ every `step_size` steps (torch StepLR stepped per batch)
    if s.policy == "step":
        return s.base_lr * s.decay_gamma ** (step // s.step_size)
    # 3) exponential decay: ×γ per epoch, smooth per step (= ExponentialLR at epoch boundaries)
    if s.policy == "exponential":
        return s.base_lr * s.decay_gamma ** (step / s.steps_per_epoch)
    # 4) CLR (Smith 2017, §3.1): lr = base + (max − base)·max(0, 1 − x)·scale
    if s.policy in ("triangular", "triangular2", "exp_range"):
        return s.base_lr + (s.max_lr - s.base_lr) * _clr_height(step, s)
    # 5) cosine with warm restarts (Loshchilov & Hutter 2017, Eq. 5): from max_lr down to base_lr
    if s.policy == "cosine":
        return s.base_lr + (s.max_lr - s.base_lr) * _cosine_height(step, s)
    # 6) one-cycle (Smith & Topin 2017; torch OneCycleLR semantics)
    if s.policy == "one_cycle":
        return _one_cycle(step, s)[0]
    raise ValueError(f"unknown LR policy {s.policy!r}")


def warmup_factor(step: int, s: LRSchedule) -> float:
    """Gradual warm-up (Goyal et al. 2017, §2.2): min(1, (t + 1)/W); 1 when W = 0."""
    if s.warmup_steps == 0:
        return 1.0
    return min(1.0, (step + 1) / s.warmup_steps)


def learning_rate(step: int, s: LRSchedule) -> float:
    """The effective LR at optimizer ``step`` (0-based): policy(t) · warm-up(t).

    Raises ``ValueError`` if step < 0.
    """
    _check_step(step)
    return _policy_lr(step, s) * warmup_factor(step, s)


def beta1_at(step: int, s: LRSchedule) -> float | None:
    """Adam's β1 at ``step`` when cycled (``cycle_beta1``), else ``None`` (leave β1 alone).

    Inverse to the LR (Smith & Topin 2017; torch ``cycle_momentum``): ``beta1_max`` at the
    policy's lowest LR, ``beta1_min`` at its peak. For CLR the swing shrinks with the same scale
    as the LR (torch CyclicLR), for one-cycle it follows OneCycleLR's momentum phases. ``None``
    for constant/step/exponential, which have no cycle. Raises ``ValueError`` if step < 0.
    """
    _check_step(step)
    if not s.cycle_beta1:
        return None
    swing = s.beta1_max - s.beta1_min
    if s.policy in ("triangular", "triangular2", "exp_range"):
        return s.beta1_max - swing * _clr_height(step, s)
    if s.policy == "cosine":
        return s.beta1_max - swing * _cosine_height(step, s)
    if s.policy == "one_cycle":
        return _one_cycle(step, s)[1]
    return None


__all__ = [
    "KLSchedule",
    "LRSchedule",
    "beta1_at",
    "epochs_to_steps",
    "kl_beta",
    "kl_schedule_from_config",
    "learning_rate",
    "lr_scale_factor",
    "lr_schedule_from_config",
    "ramp",
    "warmup_factor",
]
