"""Schedules at their boundaries against hand-computed values, and against torch's schedulers.

Hand values are worked out in the comments beside them; torch comparisons drive the real
``torch.optim.lr_scheduler`` classes with a dummy parameter over a full run, step by step.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch

from trainers.cli import describe_kl
from trainers.config import TrainConfig
from trainers.schedules import (
    KLSchedule,
    LRSchedule,
    beta1_at,
    epochs_to_steps,
    kl_beta,
    kl_schedule_from_config,
    learning_rate,
    lr_scale_factor,
    lr_schedule_from_config,
    ramp,
)

REL = 1e-12


def config(**overrides: Any) -> TrainConfig:
    """A config whose LRs are not batch-scaled unless a test asks (batch = reference)."""
    values: dict[str, Any] = {"batch_size": 128, "reference_batch_size": 128, "epochs": 10}
    return TrainConfig.model_validate(values | overrides)


def lr_sched(spe: int = 10, **overrides: Any) -> LRSchedule:
    return lr_schedule_from_config(config(**overrides), spe)


def kl_sched(spe: int = 10, **overrides: Any) -> KLSchedule:
    return kl_schedule_from_config(config(**overrides), spe)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=0.0)


# --- batch-size scaling ---------------------------------------------------------------------------


def test_linear_and_sqrt_scaling_rules() -> None:
    assert lr_scale_factor(512, 128, "linear") == 4.0  # Goyal: k = 4
    assert lr_scale_factor(512, 128, "sqrt") == 2.0  # Malladi: √4
    assert lr_scale_factor(64, 128, "linear") == 0.5
    assert close(lr_scale_factor(64, 128, "sqrt"), 1 / math.sqrt(2))
    assert lr_scale_factor(512, 128, "none") == 1.0
    with pytest.raises(ValueError, match="batch_size"):
        lr_scale_factor(0, 128, "linear")


def test_schedule_lrs_are_batch_scaled_and_an_override_keeps_the_max_ratio() -> None:
    cfg = config(
        batch_size=256, lr_scaling="linear", base_lr=1e-3, max_lr=4e-3, lr_policy="triangular"
    )
    s = lr_schedule_from_config(cfg, 10)
    assert close(s.base_lr, 2e-3) and close(s.max_lr, 8e-3)
    assert close(learning_rate(0, s), 2e-3)  # the effective LR starts at the scaled base
    # a VAE-GAN group at reference LR 5e-4 keeps max/base = 4 and gets the same ×2
    d = lr_schedule_from_config(cfg, 10, base_lr=5e-4)
    assert close(d.base_lr, 1e-3) and close(d.max_lr, 4e-3)
    sq = lr_schedule_from_config(cfg.model_copy(update={"lr_scaling": "sqrt"}), 10)
    assert close(sq.base_lr, math.sqrt(2) * 1e-3)


def test_epochs_convert_to_steps_rounding_half_up() -> None:
    assert epochs_to_steps(0.5, 3) == 2  # 1.5 → 2 (Python's round would give 2 as well)
    assert epochs_to_steps(2.5, 1) == 3  # 2.5 → 3 (Python's banker's round would give 2)
    assert epochs_to_steps(0.0, 7) == 0
    assert kl_sched(spe=3, kl_warmup_epochs=0.5).warmup_steps == 2


# --- KL annealing ---------------------------------------------------------------------------------


def test_constant_beta_is_the_target_from_the_first_to_the_last_step() -> None:
    s = kl_sched(kl_schedule="constant", beta_target=0.7, beta_min=0.1)
    assert [kl_beta(t, s) for t in (0, 50, 99)] == [0.7, 0.7, 0.7]


def test_linear_warmup_boundaries() -> None:
    s = kl_sched(kl_schedule="linear", kl_warmup_epochs=2.0)  # N = 20 steps
    assert s.warmup_steps == 20
    assert kl_beta(0, s) == 0.0
    assert close(kl_beta(10, s), 0.5)
    assert close(kl_beta(19, s), 0.95)  # the last warm-up step is still below the target
    assert kl_beta(20, s) == 1.0  # end of warm-up
    assert kl_beta(99, s) == 1.0  # last step


def test_linear_warmup_from_beta_min_to_beta_target() -> None:
    s = kl_sched(kl_schedule="linear", kl_warmup_epochs=2.0, beta_min=0.2, beta_target=0.8)
    assert close(kl_beta(0, s), 0.2)
    assert close(kl_beta(10, s), 0.5)  # 0.2 + 0.6·½
    assert close(kl_beta(20, s), 0.8)


def test_cosine_warmup() -> None:
    s = kl_sched(kl_schedule="cosine", kl_warmup_epochs=2.0)
    assert kl_beta(0, s) == 0.0
    assert close(kl_beta(5, s), 0.1464466094067262)  # ½ − ½cos(π/4)
    assert close(kl_beta(10, s), 0.5)
    assert kl_beta(20, s) == 1.0


def test_sigmoid_warmup_is_rescaled_to_start_at_beta_min_and_end_at_the_target() -> None:
    # Our choice: (σ(12v−6) − σ(−6)) / (σ(6) − σ(−6)). The raw logistic would give 0.00247 at
    # v = 0 and 0.99753 at v = 1 and then jump to 1 on the plateau.
    s = kl_sched(kl_schedule="sigmoid", kl_warmup_epochs=2.0)
    assert kl_beta(0, s) == 0.0
    # v = ¼: (σ(−3) − σ(−6))/(σ(6) − σ(−6)) = (0.0474259 − 0.0024726)/0.9950548
    assert close(kl_beta(5, s), 0.04517665973091212)
    assert close(kl_beta(10, s), 0.5)
    assert close(kl_beta(20, s), 1.0)
    assert close(ramp(1.0, "sigmoid"), 1.0) and ramp(0.0, "sigmoid") == 0.0


def test_zero_warmup_gives_the_target_immediately() -> None:
    for kind in ("linear", "cosine", "sigmoid"):
        s = kl_sched(kl_schedule=kind, kl_warmup_epochs=0.0, beta_target=0.5)
        assert kl_beta(0, s) == 0.5, kind


def test_cyclical_beta_at_cycle_edges() -> None:
    # T = 100, M = 4 → P = 25; R = 0.5 → β rises over τ ∈ [0, 0.5]
    s = kl_sched(kl_schedule="cyclical", kl_cycles=4, kl_ratio=0.5, kl_ramp="linear")
    assert s.cycle_steps == 25
    assert kl_beta(0, s) == 0.0
    assert close(kl_beta(5, s), 0.4)  # τ = 0.2 → 0.2/0.5
    assert close(kl_beta(12, s), 0.96)  # τ = 0.48
    assert kl_beta(13, s) == 1.0  # τ = 0.52 > R: plateau
    assert kl_beta(24, s) == 1.0  # last step of the first cycle
    assert kl_beta(25, s) == 0.0  # cycle edge: restart
    assert close(kl_beta(30, s), 0.4)
    assert kl_beta(99, s) == 1.0  # last step


def test_cyclical_beta_with_beta_min_cosine_ramp_and_a_ragged_last_cycle() -> None:
    # T = 30, M = 4 → P = ⌈7.5⌉ = 8: edges at 8, 16, 24; the last cycle has 6 steps
    s = kl_sched(
        epochs=3, kl_schedule="cyclical", kl_cycles=4, kl_ratio=0.5, kl_ramp="cosine",
        beta_min=0.1, beta_target=1.0, kl_warmup_epochs=1.0,
    )  # fmt: skip
    assert s.cycle_steps == 8
    for edge in (0, 8, 16, 24):
        assert close(kl_beta(edge, s), 0.1), edge
    # t = 2: τ = 0.25, τ/R = 0.5 → 0.1 + 0.9·½
    assert close(kl_beta(2, s), 0.55)
    # t = 1: τ/R = 0.25 → 0.1 + 0.9·(½ − ½cos(π/4))
    assert close(kl_beta(1, s), 0.1 + 0.9 * 0.1464466094067262)
    assert close(kl_beta(29, s), 1.0)  # τ = 5/8 > R


# --- LR policies: hand-computed boundaries --------------------------------------------------------


def test_constant_and_step_decay() -> None:
    c = lr_sched(base_lr=1e-3)
    assert learning_rate(0, c) == learning_rate(99, c) == 1e-3
    s = lr_sched(lr_policy="step", base_lr=1e-3, lr_decay_gamma=0.5, lr_step_epochs=2.0)
    assert s.step_size == 20
    assert learning_rate(19, s) == 1e-3
    assert learning_rate(20, s) == 5e-4  # first drop exactly at 2 epochs
    assert learning_rate(40, s) == 2.5e-4
    assert close(learning_rate(99, s), 1e-3 * 0.5**4)  # last step: 4 drops


def test_exponential_decay_is_smooth_per_step_and_exact_at_epoch_boundaries() -> None:
    s = lr_sched(lr_policy="exponential", base_lr=1e-3, lr_decay_gamma=0.5)
    assert learning_rate(0, s) == 1e-3
    assert close(learning_rate(5, s), 1e-3 * math.sqrt(0.5))  # half an epoch: γ^0.5
    assert close(learning_rate(10, s), 5e-4)
    assert close(learning_rate(99, s), 1e-3 * 0.5**9.9)


def test_triangular_cycle_edges() -> None:
    # step_size = 2 epochs × 5 steps = 10: up 0→10, down 10→20
    s = lr_sched(spe=5, lr_policy="triangular", base_lr=1e-3, max_lr=5e-3, lr_half_cycle_epochs=2.0)
    assert s.half_cycle_steps == 10
    assert close(learning_rate(0, s), 1e-3)
    assert close(learning_rate(5, s), 3e-3)
    assert close(learning_rate(10, s), 5e-3)  # peak
    assert close(learning_rate(15, s), 3e-3)
    assert close(learning_rate(20, s), 1e-3)  # cycle edge
    assert close(learning_rate(30, s), 5e-3)  # second peak at full height
    assert close(
        learning_rate(49, s), 4.6e-3
    )  # last step: x = |4.9 − 6 + 1| = 0.1 → 1e-3 + 4e-3·0.9


def test_triangular2_halves_and_exp_range_decays_the_amplitude() -> None:
    kw: dict[str, Any] = {"spe": 5, "base_lr": 1e-3, "max_lr": 5e-3, "lr_half_cycle_epochs": 2.0}
    t2 = lr_sched(lr_policy="triangular2", **kw)
    assert close(learning_rate(10, t2), 5e-3)
    assert close(learning_rate(30, t2), 3e-3)  # cycle 2: 1e-3 + 4e-3/2
    # epochs = 10, T = 50: cycle 3 would peak at 50 — at 45 it is half-way up: 1e-3 + 4e-3/4·½
    assert close(learning_rate(45, t2), 1.5e-3)
    er = lr_sched(lr_policy="exp_range", lr_exp_range_gamma=0.99, **kw)
    assert close(learning_rate(10, er), 0.004617528300035218)  # 1e-3 + 4e-3·0.99^10


def test_cosine_restarts_from_max_lr_down_to_base_lr() -> None:
    # T = 40, 2 cycles → T_i = 20
    s = lr_sched(epochs=4, lr_policy="cosine", base_lr=1e-3, max_lr=5e-3, lr_cosine_cycles=2)
    assert close(learning_rate(0, s), 5e-3)
    assert close(learning_rate(10, s), 3e-3)  # half-way: ½(1 + cos π/2)
    assert close(learning_rate(19, s), 0.0010246233188097246)  # 1e-3 + 4e-3·½(1 + cos(19π/20))
    assert close(learning_rate(20, s), 5e-3)  # warm restart
    assert close(learning_rate(39, s), 0.0010246233188097246)  # last step


def test_one_cycle_boundaries() -> None:
    # T = 100, pct 0.3: up over steps 0..29, down to min_lr at 99
    s = lr_sched(lr_policy="one_cycle", base_lr=1e-3, max_lr=1e-2, one_cycle_pct_start=0.3)
    assert close(learning_rate(0, s), 1e-2 / 25)  # initial = max/div_factor
    assert close(learning_rate(29, s), 1e-2)  # peak at pct·T − 1
    assert close(learning_rate(99, s), 1e-2 / 25 / 1e4)  # min = initial/final_div_factor
    three = lr_sched(
        lr_policy="one_cycle", base_lr=1e-3, max_lr=1e-2, one_cycle_pct_start=0.3,
        one_cycle_three_phase=True,
    )  # fmt: skip
    assert close(learning_rate(29, three), 1e-2)
    assert close(learning_rate(58, three), 1e-2 / 25)  # back to initial at 2·pct·T − 2
    assert close(learning_rate(99, three), 1e-2 / 25 / 1e4)


# --- warm-up composes with every policy --------------------------------------------------------


def test_warmup_ramps_linearly_to_the_policy_lr() -> None:
    s = lr_sched(base_lr=1e-3, lr_warmup_epochs=1.0)  # W = 10
    lrs = [learning_rate(t, s) for t in range(12)]
    assert close(lrs[0], 1e-4)  # (0+1)/10 of the LR: the first step already moves
    assert close(lrs[4], 5e-4)
    assert lrs[9] == lrs[10] == lrs[11] == 1e-3  # reached at step W − 1
    # Goyal et al.: a constant increment per iteration
    diffs = [b - a for a, b in itertools.pairwise(lrs[:10])]
    assert all(math.isclose(d, 1e-4, rel_tol=1e-9) for d in diffs)


def test_warmup_composes_with_a_cyclical_policy() -> None:
    kw: dict[str, Any] = {
        "spe": 5, "lr_policy": "triangular", "base_lr": 1e-3, "max_lr": 5e-3,
        "lr_half_cycle_epochs": 2.0,
    }  # fmt: skip
    plain = lr_sched(**kw)
    warm = lr_sched(lr_warmup_epochs=1.0, **kw)  # W = 5
    # during warm-up: the cyclical LR times (t+1)/W; e.g. t = 2: (1e-3 + 4e-3·0.2)·3/5
    assert close(learning_rate(2, warm), 1.8e-3 * 0.6)
    for t in range(5):
        assert close(learning_rate(t, warm), learning_rate(t, plain) * (t + 1) / 5), t
    # afterwards the cycle is not shifted: identical to the schedule without warm-up
    for t in range(4, 50):
        assert learning_rate(t, warm) == learning_rate(t, plain), t
    assert close(learning_rate(10, warm), 5e-3)  # the peak stays at the cycle edge


def test_warmup_composes_with_one_cycle_and_step_decay() -> None:
    extras: list[dict[str, Any]] = [
        {"lr_policy": "one_cycle", "max_lr": 1e-2},
        {"lr_policy": "step", "lr_step_epochs": 1.0},
    ]
    for extra in extras:
        plain = lr_sched(base_lr=1e-3, **extra)
        warm = lr_sched(base_lr=1e-3, lr_warmup_epochs=2.0, **extra)  # W = 20
        assert close(learning_rate(9, warm), learning_rate(9, plain) * 0.5), extra
        assert learning_rate(25, warm) == learning_rate(25, plain), extra


# --- β1 cycling ---------------------------------------------------------------------------------


def test_beta1_is_none_unless_cycled_and_inverse_to_the_lr() -> None:
    kw: dict[str, Any] = {
        "spe": 5, "lr_policy": "triangular", "base_lr": 1e-3, "max_lr": 5e-3,
        "lr_half_cycle_epochs": 2.0,
    }  # fmt: skip
    assert beta1_at(0, lr_sched(**kw)) is None
    s = lr_sched(cycle_beta1=True, beta1_min=0.85, beta1_max=0.95, **kw)
    assert close(beta1_at(0, s) or 0.0, 0.95)  # lowest LR → highest β1
    assert close(beta1_at(5, s) or 0.0, 0.90)
    assert close(beta1_at(10, s) or 0.0, 0.85)  # peak LR → lowest β1
    assert close(beta1_at(20, s) or 0.0, 0.95)
    cos = lr_sched(epochs=4, lr_policy="cosine", max_lr=5e-3, lr_cosine_cycles=2, cycle_beta1=True)
    assert close(beta1_at(0, cos) or 0.0, 0.85) and close(beta1_at(20, cos) or 0.0, 0.85)
    # no cycle, no β1 schedule, even when asked
    assert beta1_at(3, lr_sched(lr_policy="step", cycle_beta1=True)) is None


def test_negative_steps_and_empty_epochs_are_refused() -> None:
    with pytest.raises(ValueError, match="step"):
        learning_rate(-1, lr_sched())
    with pytest.raises(ValueError, match="step"):
        kl_beta(-1, kl_sched())
    with pytest.raises(ValueError, match="steps_per_epoch"):
        lr_schedule_from_config(config(), 0)


# --- against torch's schedulers, step by step over a full run ------------------------------------


def _sgd() -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.123, momentum=0.9)


def _adam() -> torch.optim.Adam:
    return torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.123)


def _drive(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, n: int
) -> tuple[list[float], list[float]]:
    """(LR, β1-or-momentum) in effect at each of ``n`` steps, stepping the scheduler per batch."""
    lrs, moms = [], []
    group = optimizer.param_groups[0]
    for _ in range(n):
        lrs.append(float(group["lr"]))
        moms.append(float(group["betas"][0] if "betas" in group else group["momentum"]))
        optimizer.step()
        scheduler.step()
    return lrs, moms


@pytest.mark.parametrize("mode", ["triangular", "triangular2", "exp_range"])
def test_matches_torch_cyclic_lr(mode: str) -> None:
    # 7 epochs × 6 steps, half cycle 1.5 epochs = 9 steps: 2⅓ cycles, so triangular2 halves twice
    s = lr_sched(
        spe=6, epochs=7, lr_policy=mode, base_lr=1e-3, max_lr=6e-3, lr_half_cycle_epochs=1.5,
        lr_exp_range_gamma=0.97,
    )  # fmt: skip
    opt = _sgd()
    sched = torch.optim.lr_scheduler.CyclicLR(
        opt, base_lr=1e-3, max_lr=6e-3, step_size_up=9, mode=mode, gamma=0.97,  # type: ignore[arg-type]
        cycle_momentum=False,
    )  # fmt: skip
    torch_lrs, _ = _drive(opt, sched, s.total_steps)
    ours = [learning_rate(t, s) for t in range(s.total_steps)]
    for t, (a, b) in enumerate(zip(ours, torch_lrs, strict=True)):
        assert close(a, b), (t, a, b)


@pytest.mark.parametrize("mode", ["triangular", "triangular2", "exp_range"])
def test_beta1_matches_torch_cyclic_lr_momentum_on_adam(mode: str) -> None:
    s = lr_sched(
        spe=6, epochs=7, lr_policy=mode, base_lr=1e-3, max_lr=6e-3, lr_half_cycle_epochs=1.5,
        lr_exp_range_gamma=0.97, cycle_beta1=True, beta1_min=0.8, beta1_max=0.9,
    )  # fmt: skip
    opt = _adam()
    sched = torch.optim.lr_scheduler.CyclicLR(
        opt, base_lr=1e-3, max_lr=6e-3, step_size_up=9, mode=mode, gamma=0.97,  # type: ignore[arg-type]
        cycle_momentum=True, base_momentum=0.8, max_momentum=0.9,
    )  # fmt: skip
    _, betas = _drive(opt, sched, s.total_steps)
    for t, b in enumerate(betas):
        assert close(beta1_at(t, s) or 0.0, b), t


def test_cosine_matches_torch_warm_restarts() -> None:
    s = lr_sched(epochs=6, lr_policy="cosine", base_lr=1e-3, max_lr=5e-3, lr_cosine_cycles=3)
    opt = _sgd()
    for group in opt.param_groups:
        group["lr"] = 5e-3  # torch starts each cycle at the optimizer's LR
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=20, eta_min=1e-3)
    torch_lrs, _ = _drive(opt, sched, s.total_steps)
    for t, b in enumerate(torch_lrs):
        assert close(learning_rate(t, s), b), t


def test_step_and_exponential_match_torch() -> None:
    s = lr_sched(lr_policy="step", base_lr=1e-3, lr_decay_gamma=0.3, lr_step_epochs=1.5)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    step_lr = torch.optim.lr_scheduler.StepLR(opt, step_size=15, gamma=0.3)
    torch_lrs, _ = _drive(opt, step_lr, s.total_steps)
    for t, b in enumerate(torch_lrs):
        assert close(learning_rate(t, s), b), t

    e = lr_sched(lr_policy="exponential", base_lr=1e-3, lr_decay_gamma=0.8)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    exp_lr = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)
    per_epoch, _ = _drive(opt, exp_lr, 10)  # torch steps once per epoch
    for epoch, b in enumerate(per_epoch):
        assert close(learning_rate(epoch * 10, e), b), epoch


@pytest.mark.parametrize("three_phase", [False, True])
@pytest.mark.parametrize(("epochs", "spe", "pct"), [(10, 10, 0.3), (7, 9, 0.25)])
def test_matches_torch_one_cycle(three_phase: bool, epochs: int, spe: int, pct: float) -> None:
    # (7, 9, 0.25): pct·T = 15.75 is not an integer — phase ends fall between steps
    kw: dict[str, Any] = {
        "spe": spe, "epochs": epochs, "lr_policy": "one_cycle", "base_lr": 1e-4,
        "max_lr": 3e-3, "one_cycle_pct_start": pct, "one_cycle_div_factor": 20.0,
        "one_cycle_final_div_factor": 500.0, "one_cycle_three_phase": three_phase,
    }  # fmt: skip
    s = lr_sched(**kw)
    T = s.total_steps

    opt: torch.optim.Optimizer = _sgd()
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=3e-3, total_steps=T, pct_start=pct, div_factor=20.0,
        final_div_factor=500.0, three_phase=three_phase, cycle_momentum=False,
    )  # fmt: skip
    torch_lrs, _ = _drive(opt, sched, T)
    for t, b in enumerate(torch_lrs):
        assert close(learning_rate(t, s), b), t
    assert beta1_at(0, s) is None  # cycle_beta1 off

    cycled = lr_sched(cycle_beta1=True, beta1_min=0.85, beta1_max=0.95, **kw)
    opt = _adam()
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=3e-3, total_steps=T, pct_start=pct, div_factor=20.0,
        final_div_factor=500.0, three_phase=three_phase, cycle_momentum=True,
        base_momentum=0.85, max_momentum=0.95,
    )  # fmt: skip
    torch_lrs, torch_betas = _drive(opt, sched, T)
    for t, (b_lr, b_beta) in enumerate(zip(torch_lrs, torch_betas, strict=True)):
        assert close(learning_rate(t, cycled), b_lr), t
        assert close(beta1_at(t, cycled) or 0.0, b_beta), t


# --- settings refused and accepted, built from a config, held past their end (issue 17:
# mutmut's survivors in trainers/schedules.py) -----------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"warmup_steps": -1}, "`warmup_steps` must be non-negative (got -1)"),
        ({"cycle_steps": 0}, "`cycle_steps` must be at least 1 (got 0)"),
        ({"ratio": 0.0}, "`ratio` must be in (0, 1] (got 0.0)"),
        ({"ratio": 1.01}, "`ratio` must be in (0, 1] (got 1.01)"),
        ({"beta_min": 0.6}, "`beta_min` (0.6) must not exceed `beta_target` (0.5)"),
    ],
)
def test_a_kl_schedule_refuses_settings_outside_their_range_naming_them(
    settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError) as caught:
        KLSchedule(kind="cyclical", beta_target=0.5, **settings)
    assert str(caught.value) == message


def test_a_kl_schedule_accepts_each_limit_itself() -> None:
    """One-step cycles, a full-cycle rise (R = 1) and β_min = β_target are valid settings."""
    s = KLSchedule(kind="cyclical", beta_target=0.5, beta_min=0.5, cycle_steps=1, ratio=1.0)
    assert [kl_beta(t, s) for t in range(3)] == [0.5, 0.5, 0.5]


def test_the_config_s_kl_schedule_in_steps() -> None:
    cfg = config(
        epochs=10, kl_schedule="cyclical", kl_cycles=3, kl_ratio=0.4, kl_ramp="cosine",
        beta_target=2.0, beta_min=0.1, kl_warmup_epochs=1.5,
    )  # fmt: skip
    s = kl_schedule_from_config(cfg, 7)
    assert s == KLSchedule(
        kind="cyclical",
        beta_target=2.0,
        beta_min=0.1,
        warmup_steps=11,
        total_steps=70,
        cycle_steps=24,
        ratio=0.4,
        ramp="cosine",
    )  # fmt: skip  (P = ⌈70/3⌉ = 24; 1.5 epochs of 7 steps = 10.5 → 11)
    # what `hpo-train schedule` prints from it: ⌈T/P⌉ cycles of P steps
    assert describe_kl(s).startswith("KL cyclical: 3 cycles of 24 steps")


def test_more_cycles_than_steps_restart_beta_at_every_step() -> None:
    """T = 2 steps, M = 4 cycles: P = max(1, ⌈2/4⌉) = 1, each step starts a cycle at β_min."""
    cfg = config(epochs=1, kl_schedule="cyclical", kl_cycles=4, beta_min=0.25)
    s = kl_schedule_from_config(cfg, 2)
    assert s.cycle_steps == 1
    assert [kl_beta(t, s) for t in range(4)] == [0.25] * 4


@pytest.mark.parametrize("shape", ["linear", "cosine", "sigmoid"])
def test_a_ramp_is_held_at_its_ends_outside_zero_to_one(shape: Any) -> None:
    assert ramp(1.5, shape) == ramp(1.0, shape) == 1.0
    assert ramp(-0.5, shape) == ramp(0.0, shape) == 0.0


def test_an_unknown_ramp_shape_is_named() -> None:
    with pytest.raises(ValueError) as caught:
        ramp(0.5, "square")  # type: ignore[arg-type]
    assert str(caught.value) == "unknown ramp shape 'square'"


@pytest.mark.parametrize("three_phase", [False, True])
def test_one_cycle_holds_its_final_lr_and_beta1_past_the_run(three_phase: bool) -> None:
    cfg = config(
        epochs=2, lr_policy="one_cycle", max_lr=1e-2, cycle_beta1=True,
        one_cycle_three_phase=three_phase,
    )  # fmt: skip
    s = lr_schedule_from_config(cfg, 5)
    last = s.total_steps - 1
    final = (learning_rate(last, s), beta1_at(last, s))
    assert final[0] == pytest.approx(s.one_cycle_min_lr, rel=1e-9)
    for t in (last + 1, last + 2, last + 10):
        assert (learning_rate(t, s), beta1_at(t, s)) == final


def test_cycled_beta1_inside_a_cosine_cycle_mirrors_the_lr() -> None:
    """β1 = β1_max − (β1_max − β1_min)·h(t), h the cosine height the LR uses (Smith & Topin
    2017): at every step of a cycle, not only at its ends (where h is 0 or 1)."""
    cfg = config(
        epochs=4, lr_policy="cosine", base_lr=1e-3, max_lr=5e-3, lr_cosine_cycles=2,
        cycle_beta1=True, beta1_min=0.85, beta1_max=0.95,
    )  # fmt: skip
    s = lr_schedule_from_config(cfg, 10)
    for t in range(s.total_steps):
        height = (learning_rate(t, s) - 1e-3) / (5e-3 - 1e-3)
        assert beta1_at(t, s) == pytest.approx(0.95 - 0.1 * height, abs=1e-12), t
    quarter = beta1_at(5, s)  # a quarter into a 20-step cycle: h = ½(1 + cos(π/4))
    assert quarter == pytest.approx(0.95 - 0.1 * 0.5 * (1 + math.cos(math.pi / 4)))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"total_steps": 0}, "`total_steps` must be at least 1 (got 0)"),
        ({"base_lr": 0.0}, "`base_lr` and `max_lr` must be positive (got 0.0, 1.0)"),
        ({"max_lr": 0.0}, "`base_lr` and `max_lr` must be positive (got 1.0, 0.0)"),
        ({"step_size": 0}, "`step_size` must be at least 1 (got 0)"),
        ({"steps_per_epoch": 0}, "`steps_per_epoch` must be at least 1 (got 0)"),
        ({"half_cycle_steps": 0}, "`half_cycle_steps` must be at least 1 (got 0)"),
        ({"cosine_cycles": 0}, "`cosine_cycles` must be at least 1 (got 0)"),
        ({"warmup_steps": -1}, "`warmup_steps` must be non-negative (got -1)"),
    ],
)
def test_an_lr_schedule_refuses_settings_outside_their_range_naming_them(
    settings: dict[str, Any], message: str
) -> None:
    values: dict[str, Any] = {"policy": "cosine", "base_lr": 1.0, "max_lr": 1.0, "total_steps": 5}
    with pytest.raises(ValueError) as caught:
        LRSchedule(**values | settings)
    assert str(caught.value) == message


def test_an_lr_schedule_accepts_each_limit_itself() -> None:
    """A one-step run, the smallest positive LRs, one-step periods, no warm-up."""
    s = LRSchedule(policy="triangular", base_lr=1e-12, max_lr=2e-12, total_steps=1)
    assert learning_rate(0, s) == 1e-12
    assert learning_rate(0, LRSchedule(policy="constant", base_lr=3.0, max_lr=1e-9, total_steps=1))


def test_another_group_s_base_lr_must_be_positive() -> None:
    with pytest.raises(ValueError) as caught:
        lr_schedule_from_config(config(), 10, base_lr=0.0)
    assert str(caught.value) == "`base_lr` must be positive (got 0.0)"
    assert lr_schedule_from_config(config(), 10, base_lr=1e-9).base_lr == 1e-9


def test_an_unknown_lr_policy_is_named() -> None:
    s = LRSchedule(policy="warp", base_lr=1.0, max_lr=1.0, total_steps=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError) as caught:
        learning_rate(0, s)
    assert str(caught.value) == "unknown LR policy 'warp'"


def test_one_step_per_epoch_and_batches_of_one_are_valid() -> None:
    cfg = config(epochs=3, lr_policy="step", lr_step_epochs=1.0, lr_decay_gamma=0.5)
    lr = lr_schedule_from_config(cfg, 1)
    assert [learning_rate(t, lr) for t in range(3)] == [1e-3, 5e-4, 2.5e-4]
    assert kl_schedule_from_config(cfg, 1).total_steps == 3
    # LRs scale to a batch of one, and from a reference batch of one
    assert lr_scale_factor(1, 128, "linear") == 1 / 128
    assert lr_scale_factor(128, 1, "sqrt") == math.sqrt(128)
    with pytest.raises(ValueError) as caught:
        lr_scale_factor(64, 128, "cubic")  # type: ignore[arg-type]
    assert str(caught.value) == "`rule` must be 'linear', 'sqrt' or 'none' (got 'cubic')"


def test_periods_shorter_than_a_step_become_one_step() -> None:
    """0.1 epoch of 5 steps rounds to 1 step (half up): a decay every step, a CLR half cycle
    of one step (base, max, base, … — Smith 2017's triangle at its finest)."""
    step = lr_schedule_from_config(
        config(lr_policy="step", lr_step_epochs=0.1, lr_decay_gamma=0.5), 5
    )
    assert [learning_rate(t, step) for t in range(3)] == [1e-3, 5e-4, 2.5e-4]
    clr = lr_schedule_from_config(
        config(lr_policy="triangular", max_lr=4e-3, lr_half_cycle_epochs=0.1), 5
    )
    assert [learning_rate(t, clr) for t in range(4)] == pytest.approx([1e-3, 4e-3, 1e-3, 4e-3])


def test_a_policy_without_a_peak_ignores_max_lr() -> None:
    """``max_lr`` equals ``base_lr`` for the policies that do not use it (LRSchedule)."""
    for policy in ("constant", "step", "exponential"):
        s = lr_schedule_from_config(config(lr_policy=policy, max_lr=5e-3), 10)
        assert s.max_lr == s.base_lr == 1e-3, policy
