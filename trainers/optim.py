"""Optimizers of a training run: parameter groups, the config's optimizer, the schedule applied
to an optimizer's groups each step, and gradient clipping."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from trainers.config import TrainConfig
from trainers.schedules import beta1_at, learning_rate


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weights (matrices, conv kernels) decayed; biases and norm scales not.

    Decaying biases or normalisation gains only shrinks offsets/scales that carry no capacity
    to overfit (the usual rule, e.g. nanoGPT's ``configure_optimizers``: ``dim >= 2`` decays).
    """
    params = [p for p in module.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def build_optimizer(
    module: nn.Module, cfg: TrainConfig, device: torch.device, *, fused: bool = True
) -> torch.optim.Optimizer:
    """The config's optimizer over ``module``; the LR is set every step by the loop.

    * ``adamw``: decoupled decay, per step ``θ ← θ·(1 − lr·wd)`` (Loshchilov & Hutter 2019;
      torch's form, VAE_DEFINITIONS §9);
    * ``radam``: rectified Adam (Liu et al. 2020) with the same decoupled decay;
    * ``adam``: L2-coupled decay, ``g ← g + wd·θ`` (Kingma & Ba 2015 with L2).

    ``fused`` (the default, chosen by measurement, docs/benchmarks.md): torch's single-kernel
    Adam/AdamW on CPU and CUDA. On a 2-core CPU the multi-tensor ``foreach`` kernels spent about
    a third of a training step in the optimizer, the fused ones about a tenth; the update rule
    is the same and only rounding differs (a test compares the two). ``foreach`` when False and
    for RAdam (torch has no fused RAdam). ``device`` is where the parameters live.
    """
    groups = param_groups(module, cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    lr = cfg.base_lr  # placeholder: overwritten with the schedule's value before every step
    fused = fused and device.type in ("cpu", "cuda")
    kernels: dict[str, Any] = {"fused": True} if fused else {"foreach": True}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=cfg.eps, **kernels)
    if cfg.optimizer == "radam":
        return torch.optim.RAdam(
            groups, lr=lr, betas=betas, eps=cfg.eps, decoupled_weight_decay=True, foreach=True
        )
    return torch.optim.Adam(groups, lr=lr, betas=betas, eps=cfg.eps, **kernels)


def set_schedule(optimizer: torch.optim.Optimizer, step: int, schedule: Any) -> float:
    """Set every group's LR (and β1 when cycled) for ``step``; returns the effective LR."""
    lr = learning_rate(step, schedule)
    beta1 = beta1_at(step, schedule)
    for group in optimizer.param_groups:
        group["lr"] = lr
        if beta1 is not None:  # cyclical momentum, inverse to the LR (Smith & Topin 2017)
            group["betas"] = (beta1, group["betas"][1])
    return lr


def clip_gradients(
    params: list[nn.Parameter], max_norm: float, max_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip by global L2 norm, then by value; returns (pre-clip norm, 1.0 if clipping fired).

    Both are device tensors (no sync). ``clip_grad_norm_`` returns the norm *before* clipping
    and scales by min(1, max_norm/(norm + 1e-6)) (VAE_DEFINITIONS §11).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        fired = norm > max_norm
    else:
        norm = torch.nn.utils.get_total_norm(grads)
        fired = torch.zeros((), dtype=torch.bool, device=norm.device)
    if max_value > 0:
        fired = fired | (torch.nn.utils.get_total_norm(grads, norm_type=math.inf) > max_value)
        torch.nn.utils.clip_grad_value_(params, max_value)
    return norm, fired.float()


def clip_stacked_gradients(
    grads: list[torch.Tensor], max_norms: Sequence[float], max_values: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`clip_gradients` for K stacked members at once, in place.

    ``grads`` are the stack's gradients, each ``(K, …)`` with member k in row k; ``max_norms``
    and ``max_values`` hold each member's thresholds (≤ 0: that clip off for that member). Per
    member the rule is the one it gets alone: the global L2 norm over the member's own
    gradients, a scale of min(1, max_norm/(norm + 1e-6)), then a clamp by value; returns the
    pre-clip norms ``(K,)`` and 1.0 where either clip fired. A few ops per stacked tensor instead
    of K calls of ``clip_grad_norm_`` over K lists, the norms in torch's order (each tensor's
    norm, then the norm of those).
    """
    k, device = len(max_norms), grads[0].device

    def per_member(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.view(k, *([1] * (like.dim() - 1)))  # broadcast over each member's row

    # torch's order: each tensor's norm, then the norm of those (per member: dim 1)
    per_tensor = [torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads]
    norms = torch.linalg.vector_norm(torch.stack(per_tensor), dim=0)
    fired = torch.zeros(k, dtype=torch.bool, device=device)
    if any(v > 0 for v in max_norms):
        bound = torch.tensor(max_norms, dtype=norms.dtype, device=device)
        clipping = bound > 0
        fired = clipping & (norms > bound)
        coef = torch.where(clipping, (bound / (norms + 1e-6)).clamp(max=1.0), 1.0)
        for g in grads:
            g.mul_(per_member(coef, g))
    if any(v > 0 for v in max_values):
        limit = torch.tensor(
            [v if v > 0 else math.inf for v in max_values], dtype=norms.dtype, device=device
        )
        peaks = torch.stack(
            [torch.linalg.vector_norm(g.flatten(1), ord=math.inf, dim=1) for g in grads]
        ).amax(0)
        fired = fired | (peaks > limit)
        for g in grads:
            bound_k = per_member(limit, g)
            torch.clamp(g, min=-bound_k, max=bound_k, out=g)
    return norms, fired.float()
