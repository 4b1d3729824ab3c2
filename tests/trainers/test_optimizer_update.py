"""The optimizer really applies the scheduled LR and the clipped gradients (issue 17's mutants).

Adam normalises the gradient's scale away, so neither deleting ``group["lr"] = lr`` in
``set_schedule`` nor switching off ``clip_grad_norm_`` in ``clip_gradients`` changed any other
trainer test's outcome. These tests measure the update itself: Adam's first step moves every
parameter with a nonzero gradient by ≈ lr (|m̂/√v̂| = 1 at step 1, Kingma & Ba 2015, §2), and
after clipping the gradients the optimizer sees have a global norm ≤ the threshold. Each holds
for ``train()``'s step and for the population trainer's fused step.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from trainers.config import TrainConfig
from trainers.data import load_dataset
from trainers.models import build_vae
from trainers.population import train_population
from trainers.population_stack import MemberStack, stacked_vae_step
from trainers.schedules import lr_schedule_from_config
from trainers.train import (
    TrainResult,
    amp_context,
    build_optimizer,
    set_schedule,
    train,
    vae_loss_fn,
    vae_step,
)

BASE: dict[str, Any] = {
    "dataset": "digits",
    "hidden_sizes": (32,),
    "latent_dim": 4,
    "epochs": 3,
    "batch_size": 64,
    "final_is_samples": 0,
    "active_unit_examples": 180,
    "amp": "off",
}
STEPS_PER_EPOCH = 1437 // 64  # digits' training split at batch 64
#: At step 3 of a 10-step warm-up from a base LR 4× the reference batch's: lr = 1e-3 · 0.5 · 0.4.
WARMED: dict[str, Any] = {
    "base_lr": 1e-3,
    "reference_batch_size": 128,
    "lr_warmup_epochs": 10 / STEPS_PER_EPOCH,
}
STEP = 3


def cfg_of(device: str, **overrides: Any) -> TrainConfig:
    return TrainConfig.from_mapping({**BASE, "device": device, **overrides})


def batch(cfg: TrainConfig, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset(cfg, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    x = data.train[torch.randperm(len(data.train), generator=gen, device=device)[: cfg.batch_size]]
    return x, torch.randn(cfg.batch_size, cfg.latent_dim, generator=gen, device=device)


def largest_moves(before: list[torch.Tensor], params: list[torch.nn.Parameter]) -> float:
    return max((p.detach() - b).abs().max().item() for b, p in zip(before, params, strict=True))


# --- the scheduled LR reaches the optimizer ------------------------------------------------------


def test_train_s_step_moves_parameters_by_the_scheduled_lr_not_the_base_lr(
    train_device: str,
) -> None:
    cfg = cfg_of(train_device, **WARMED)
    device = torch.device(train_device)
    torch.manual_seed(0)
    vae = build_vae(cfg, (1, 8, 8)).to(device)
    optimizer = build_optimizer(vae, cfg, device)
    schedule = lr_schedule_from_config(cfg, STEPS_PER_EPOCH)
    lr = set_schedule(optimizer, STEP, schedule)
    assert lr == pytest.approx(1e-3 * 0.5 * (STEP + 1) / 10)  # batch-scaled, warming up
    params = list(vae.parameters())
    before = [p.detach().clone() for p in params]
    x, eps = batch(cfg, device, seed=1)
    vae_step(vae_loss_fn(vae, cfg, amp_context(cfg, device)), x, eps, 1.0, cfg, optimizer)
    # Adam's first step: |Δθ| ≤ lr, with equality up to ε for every element with a gradient.
    assert largest_moves(before, params) == pytest.approx(lr, rel=1e-3)


def test_the_fused_step_moves_each_member_by_its_own_scheduled_lr(train_device: str) -> None:
    configs = [
        cfg_of(train_device, **WARMED),
        cfg_of(train_device, base_lr=3e-3, seed=1),
        cfg_of(train_device, base_lr=1e-3, lr_policy="step", lr_step_epochs=STEP / STEPS_PER_EPOCH,
               lr_decay_gamma=0.1, seed=2, optimizer="radam"),
    ]  # fmt: skip
    device = torch.device(train_device)
    vaes = [build_vae(c, (1, 8, 8)).to(device) for c in configs]
    optimizers = [build_optimizer(v, c, device) for v, c in zip(vaes, configs, strict=True)]
    stack = MemberStack(vaes)
    lrs = [
        set_schedule(o, STEP, lr_schedule_from_config(c, STEPS_PER_EPOCH))
        for o, c in zip(optimizers, configs, strict=True)
    ]
    assert lrs == pytest.approx([2e-4, 1.5e-3, 5e-5])  # warm-up; batch scaling; one decay
    before = [[p.detach().clone() for p in params] for params in stack.member_params]
    pairs = [batch(c, device, seed=k) for k, c in enumerate(configs)]
    x, eps = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    stacked_vae_step(
        stack, configs, optimizers, x, eps, torch.ones(3, device=device),
        torch.zeros(3, device=device), amp_context(configs[0], device),
    )  # fmt: skip
    # AdamW moves by lr at step 1; RAdam's first steps are SGD with momentum (Liu et al. 2020,
    # Alg. 2: ρ_t ≤ 5), which moves by lr·|g|·(1−β1)/(1−β1) = lr·|g| — so check it against g.
    assert largest_moves(before[0], stack.member_params[0]) == pytest.approx(lrs[0], rel=1e-3)
    assert largest_moves(before[1], stack.member_params[1]) == pytest.approx(lrs[1], rel=1e-3)
    for b, p in zip(before[2], stack.member_params[2], strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.detach(), b - lrs[2] * p.grad, rtol=1e-4, atol=1e-7)


def test_a_decaying_lr_changes_training_in_train_and_in_the_population(train_device: str) -> None:
    """Same seed, constant LR vs a 100× drop after epoch 1: epoch 1 is identical, epoch 2 is
    not — unless the optimizer ignores the schedule."""
    constant = {**BASE, "device": train_device, "base_lr": 3e-3}
    decayed = {**constant, "lr_policy": "step", "lr_step_epochs": 1.0, "lr_decay_gamma": 0.01}
    alone = [train(constant), train(decayed)]
    fused = train_population([("constant", constant), ("decayed", decayed)])
    runs = [*alone, fused["constant"], fused["decayed"]]
    assert all(isinstance(r, TrainResult) for r in runs)
    for a, b in ((runs[0], runs[1]), (runs[2], runs[3])):
        assert isinstance(a, TrainResult) and isinstance(b, TrainResult)
        assert a.history[0].values["train_loss"] == pytest.approx(b.history[0].values["train_loss"])
        assert a.history[1].values["lr"] == pytest.approx(100 * b.history[1].values["lr"])
        assert abs(a.history[1].values["train_loss"] - b.history[1].values["train_loss"]) > 0.05


# --- clipping reaches the gradients the optimizer uses -----------------------------------------


def total_norm(params: list[torch.nn.Parameter]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads).item()


def test_train_s_step_clips_the_gradient_the_optimizer_sees(train_device: str) -> None:
    cfg = cfg_of(train_device, grad_clip_norm=0.5)
    device = torch.device(train_device)
    vae = build_vae(cfg, (1, 8, 8)).to(device)
    optimizer = build_optimizer(vae, cfg, device)
    set_schedule(optimizer, 0, lr_schedule_from_config(cfg, STEPS_PER_EPOCH))
    x, eps = batch(cfg, device, seed=3)
    stats, _ = vae_step(
        vae_loss_fn(vae, cfg, amp_context(cfg, device)), x, eps, 1.0, cfg, optimizer
    )
    pre_clip = stats[5].item()
    assert pre_clip > 2.0  # a fresh model's gradient is far above the threshold …
    assert stats[6].item() == 1.0  # … so clipping fired …
    assert total_norm(list(vae.parameters())) == pytest.approx(0.5, rel=1e-4)  # … and applied


def test_the_fused_step_clips_each_member_by_its_own_norm_never_the_stack_s(
    train_device: str,
) -> None:
    configs = [
        cfg_of(train_device, grad_clip_norm=0.5),
        cfg_of(train_device, seed=1),  # no clipping
        cfg_of(train_device, seed=2, grad_clip_norm=1.5),
    ]
    device = torch.device(train_device)
    vaes = [build_vae(c, (1, 8, 8)).to(device) for c in configs]
    optimizers = [build_optimizer(v, c, device) for v, c in zip(vaes, configs, strict=True)]
    for o, c in zip(optimizers, configs, strict=True):
        set_schedule(o, 0, lr_schedule_from_config(c, STEPS_PER_EPOCH))
    stack = MemberStack(vaes)
    pairs = [batch(c, device, seed=k) for k, c in enumerate(configs)]
    x, eps = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    stats, _ = stacked_vae_step(
        stack, configs, optimizers, x, eps, torch.ones(3, device=device),
        torch.zeros(3, device=device), amp_context(configs[0], device),
    )  # fmt: skip
    pre_clip = stats[5].tolist()
    assert min(pre_clip) > 2.0
    assert stats[6].tolist() == [1.0, 0.0, 1.0]
    norms = [total_norm(params) for params in stack.member_params]
    assert norms == pytest.approx([0.5, pre_clip[1], 1.5], rel=1e-4)


# --- the optimizer is the config's (issue 17: mutmut's survivors in build_optimizer) -------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [("adamw", torch.optim.AdamW), ("radam", torch.optim.RAdam), ("adam", torch.optim.Adam)],
)
def test_build_optimizer_carries_the_config_s_optimizer_and_settings(
    name: str, cls: type, train_device: str
) -> None:
    """Class, β1/β2, ε, decay on weights only, and decoupled decay for RAdam; the LR placeholder
    is the base LR. None of these change a first Adam step's size, so the update tests above
    cannot see them."""
    # base_lr 2e-3, not torch's default 1e-3, so a dropped `lr=` shows
    cfg = cfg_of(
        train_device, optimizer=name, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.05,
        base_lr=2e-3,
    )  # fmt: skip
    device = torch.device(train_device)
    vae = build_vae(cfg, (1, 8, 8)).to(device)
    optimizer = build_optimizer(vae, cfg, device)
    assert type(optimizer) is cls
    weights, biases = optimizer.param_groups
    for group in (weights, biases):
        assert group["betas"] == (0.8, 0.99) and group["eps"] == 1e-6 and group["lr"] == 2e-3
    assert weights["weight_decay"] == 0.05 and biases["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in weights["params"]) and all(p.ndim < 2 for p in biases["params"])
    assert len(weights["params"]) + len(biases["params"]) == len(list(vae.parameters()))
    if name == "radam":
        assert optimizer.defaults["decoupled_weight_decay"] is True


@pytest.mark.parametrize("name", ["adamw", "adam", "radam"])
def test_build_optimizer_uses_the_measured_kernels(name: str, train_device: str) -> None:
    """docs/benchmarks.md: the fused single-kernel Adam/AdamW by default on CPU and CUDA (the
    multi-tensor kernels spent about 3× as long in the optimizer); multi-tensor ``foreach``
    when asked (``fused=False``), on other device types, and for RAdam (torch has no fused
    RAdam). A wrong choice changes no result, only the speed, so only this test sees it."""
    cfg = cfg_of(train_device, optimizer=name)
    device = torch.device(train_device)
    vae = build_vae(cfg, (1, 8, 8)).to(device)

    def kernels(optimizer: torch.optim.Optimizer) -> tuple[object, object]:
        return optimizer.defaults.get("fused"), optimizer.defaults.get("foreach")

    multi_tensor = (None, True)
    default = multi_tensor if name == "radam" else (True, None)
    assert kernels(build_optimizer(vae, cfg, device)) == default
    assert kernels(build_optimizer(vae, cfg, device, fused=False)) == multi_tensor
    # a device type without fused kernels here (the parameters stay where they are)
    assert kernels(build_optimizer(vae, cfg, torch.device("meta"))) == multi_tensor


def test_set_schedule_cycles_beta1_inversely_to_the_lr_and_keeps_beta2(train_device: str) -> None:
    cfg = cfg_of(
        train_device, lr_policy="triangular", max_lr=4e-3, lr_half_cycle_epochs=1.0,
        cycle_beta1=True, beta1_min=0.8, beta1_max=0.9, beta2=0.98,
    )  # fmt: skip
    device = torch.device(train_device)
    optimizer = build_optimizer(build_vae(cfg, (1, 8, 8)).to(device), cfg, device)
    schedule = lr_schedule_from_config(cfg, STEPS_PER_EPOCH)
    set_schedule(optimizer, 0, schedule)  # the cycle's foot: lowest LR, highest β1
    assert [g["betas"] for g in optimizer.param_groups] == [(0.9, 0.98)] * 2
    set_schedule(optimizer, STEPS_PER_EPOCH, schedule)  # its peak: highest LR, lowest β1
    assert [g["betas"] for g in optimizer.param_groups] == [pytest.approx((0.8, 0.98))] * 2


def test_clipping_fires_only_above_the_threshold_and_by_value(train_device: str) -> None:
    """``clipped`` is 1 exactly when a limit was exceeded: the norm strictly above ``max_norm``
    (equal is not clipped), or any element above ``max_value``; with both off it is 0."""
    from trainers.optim import clip_gradients

    device = torch.device(train_device)
    p = torch.nn.Parameter(torch.zeros(2, device=device))

    def clip(grad: list[float], max_norm: float, max_value: float) -> tuple[float, float]:
        p.grad = torch.tensor(grad, device=device)
        norm, fired = clip_gradients([p], max_norm, max_value)
        assert fired.dtype == torch.float32 and fired.device.type == device.type
        return norm.item(), fired.item()

    assert clip([3.0, 4.0], 5.0, 0.0) == (pytest.approx(5.0), 0.0)  # at the threshold: not fired
    assert clip([3.0, 4.0], 4.9, 0.0) == (pytest.approx(5.0), 1.0)
    assert clip([3.0, 4.0], 0.0, 0.0) == (pytest.approx(5.0), 0.0)  # both off
    assert clip([3.0, 4.0], 0.0, 3.5) == (pytest.approx(5.0), 1.0)  # by value only
    assert p.grad.tolist() == [3.0, 3.5]
    assert clip([3.0, -4.0], 0.0, 4.0) == (pytest.approx(5.0), 0.0)  # |−4| is not above 4
    # a limit below 1 (small gradients): clipped by value, the sign kept
    assert clip([0.3, -0.8], 0.0, 0.5) == (pytest.approx(0.8544, abs=1e-4), 1.0)
    assert p.grad.tolist() == pytest.approx([0.3, -0.5])


def test_a_skipped_gated_step_keeps_the_parameters_and_feeds_adam_a_zero_gradient(
    train_device: str,
) -> None:
    """The VAE-GAN's equilibrium rule (``steps._gated_step``): a skipped module's parameters
    are restored, and its Adam moments see a zero gradient (they decay), not the gradient of
    the step it skipped; a passing gate steps as usual."""
    from trainers.steps import _gated_step

    device = torch.device(train_device)
    p = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0], device=device))
    optimizer = torch.optim.Adam([p], lr=0.1)
    before = p.detach().clone()
    p.grad = torch.ones(3, device=device)
    _gated_step(optimizer, [p], torch.tensor(False, device=device))
    assert torch.equal(p.detach(), before)
    assert torch.equal(optimizer.state[p]["exp_avg"], torch.zeros(3, device=device))
    p.grad = torch.ones(3, device=device)
    _gated_step(optimizer, [p], torch.tensor(True, device=device))
    assert torch.all(p.detach() < before)  # Adam's step against a positive gradient
    assert torch.all(optimizer.state[p]["exp_avg"] > 0)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_the_step_s_loss_is_the_config_s_likelihood_and_free_bits(
    likelihood: str, train_device: str
) -> None:
    """``vae_loss_fn`` carries the config's likelihood, σ, β and free bits into the terms the
    step back-propagates: the same forward's terms as ``elbo_terms`` with those settings. λ is
    the median of the batch's per-dim KLs, where the global mode and the default
    (batch-mean) mode give different values, so a dropped mode shows."""
    from trainers.losses import elbo_terms, gaussian_kl_per_dim

    device = torch.device(train_device)
    plain = cfg_of(train_device, likelihood=likelihood, gaussian_std=0.3)
    vae = build_vae(plain, (1, 8, 8)).to(device)
    x, eps = batch(plain, device, seed=5)
    with torch.no_grad():
        mu, logvar, output = vae(x, eps)
    lam = float(gaussian_kl_per_dim(mu, logvar).mean(0).median())
    cfg = cfg_of(
        train_device, likelihood=likelihood, gaussian_std=0.3, free_bits=lam,
        free_bits_mode="global",
    )  # fmt: skip
    terms = vae_loss_fn(vae, cfg, amp_context(cfg, device))(x, eps, 0.5)
    common: dict[str, Any] = {"beta": 0.5, "gaussian_std": 0.3, "free_bits": lam}
    expected = elbo_terms(
        output, x, mu, logvar, likelihood=likelihood, free_bits_mode="global", **common,  # type: ignore[arg-type]
    )  # fmt: skip
    batch_mean = elbo_terms(output, x, mu, logvar, likelihood=likelihood, **common)  # type: ignore[arg-type]
    assert not torch.isclose(expected.kl_objective, batch_mean.kl_objective)  # not vacuous
    for name in ("objective", "reconstruction", "kl_objective", "free_bits_floor_dims"):
        torch.testing.assert_close(getattr(terms, name).detach(), getattr(expected, name))


def test_the_step_checks_the_objective_it_back_propagated() -> None:
    """``VAE_CHECKS`` is (objective, grad_norm): a non-finite objective is caught even where
    the −ELBO beside it is finite (β·KL can overflow where KL does not)."""
    from trainers.losses import ELBOTerms
    from trainers.steps import VAE_CHECKS, VAE_STEP_STATS, vae_step_stats

    values = dict.fromkeys(ELBOTerms._fields, torch.tensor(1.0)) | {
        "objective": torch.tensor(math.inf),
        "beta": 1.0,
    }
    stats, checks = vae_step_stats(ELBOTerms(**values), torch.tensor(2.0), torch.tensor(0.0))
    assert VAE_CHECKS == ("objective", "grad_norm")
    assert checks.tolist() == [math.inf, 2.0]
    assert dict(zip(VAE_STEP_STATS, stats.tolist(), strict=True)) == {
        "train_loss": math.inf, "train_neg_elbo": 1.0, "train_recon": 1.0, "train_kl": 1.0,
        "free_bits_floor_dims": 1.0, "grad_norm": 2.0, "clipped": 0.0,
    }  # fmt: skip
