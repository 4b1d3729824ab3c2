"""K MLP VAEs as one stacked model: the grouping rule, the stacked weights, one fused step.

Horizontal fusion (Wang et al., "Horizontally Fused Training Array", MLSys 2021): K models of
one shape train as one model whose every weight has a leading member dimension, so each layer
is one batched matrix product (``torch.baddbmm``) instead of K small ones.

How the weights are held: every member is a real ``VAE`` module (built exactly as ``train()``
builds it, same seed → same initial weights), and its ``Parameter`` objects are re-pointed
(``param.data = stacked[k]``) at rows of one ``(K, …)`` tensor per parameter. The fused forward
and backward run on the stacked tensors; after backward each member's ``.grad`` is set to its row
of the stacked gradient (a view, no copy). So every member keeps its own torch optimizer
(AdamW, RAdam, Adam side by side, each with its own LR, β, weight decay), its own clipping
(``clip_stacked_gradients``: ``clip_gradients``' rule per member, over that member's gradients
only, never the stack's, in one pass over the stacked gradients) and its own
``evaluate``/``final_metrics`` — the functions ``train()`` uses. Optimizers update the rows
in place, which is the stacked storage, so the next fused forward sees the new weights.

Measured (``benchmarks/population_throughput.py --extras``, docs/benchmarks.md, "Population
throughput"): on this shared 2-core CPU hand-written ``baddbmm`` was 1.1–2.6× faster than
``torch.func.stack_module_state`` + ``vmap(functional_call)`` in 4 of 6 cases and slower in 2
(0.64× at batch 32, K = 16; 0.96× at batch 128, K = 16), under a load that varied 2–27. It is kept
because it is never far behind and it keeps each member's ``Parameter`` objects (and so its own
torch optimizer) instead of functional copies of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from trainers.config import TrainConfig
from trainers.losses import elbo_terms
from trainers.models import VAE
from trainers.optim import clip_stacked_gradients
from trainers.train import resolve_device, uses_bf16, vae_step_stats

#: Fields that must be equal for members to share a step, each for one reason:
#: the stacked weights need one shape (``model``, ``hidden_sizes``, ``latent_dim``), the forward
#: one activation; one batch index per step needs one training set and one batch size
#: (``dataset``, ``data_dir``, ``synthetic_size``, ``batch_size``); one loss function needs one
#: likelihood (``likelihood``, ``gaussian_std``). The device and whether bf16 autocast is on are
#: added by ``group_key``. Everything else (schedules, β(t), free bits, optimizer, weight decay,
#: clipping, seed, epochs, evaluation settings) is per member; `binarize` is a group field.
GROUP_FIELDS = (
    "dataset",
    "data_dir",
    "synthetic_size",
    "model",
    "hidden_sizes",
    "latent_dim",
    "activation",
    "likelihood",
    "gaussian_std",
    "batch_size",
    # With binarize the validation and test splits are one fixed binarization (issue 10), so
    # members that differ in it evaluate on different data and cannot share the group's splits.
    "binarize",
)

GroupKey = tuple[tuple[str, Any], ...]


def unfusable_reason(cfg: TrainConfig) -> str | None:
    """Why ``cfg`` must train alone (``train()``), or None when it can join a population.

    Only the MLP VAE is fused. The conv VAE and the VAE-GAN stay single-trial: ``vmap`` over 4
    stacked conv VAEs measured 1.95× and 0.86× of 4 sequential passes in two runs on the loaded
    2-core CPU (docs/benchmarks.md, "Population throughput"): no clear gain, so not built; a
    VAE-GAN's three optimizers and gated steps would need their own stacked step. A compiled
    model (``compile: true``) is one graph of one model, so it trains alone too.
    """
    if cfg.model != "mlp":
        return f"model {cfg.model!r} trains alone (only the MLP VAE is fused)"
    if cfg.compile:
        return "compile: true trains alone (a compiled graph is one model's)"
    return None


def group_key(cfg: TrainConfig) -> GroupKey:
    """The members that can share a step have equal keys (``GROUP_FIELDS`` + device + bf16)."""
    device = resolve_device(cfg.device)
    fields = tuple((name, getattr(cfg, name)) for name in GROUP_FIELDS)
    return (*fields, ("device", str(device)), ("bf16", uses_bf16(cfg, device)))


def group_configs(configs: Sequence[TrainConfig]) -> dict[GroupKey, list[int]]:
    """Indices of ``configs`` by group, in first-seen order (unfusable configs excluded)."""
    groups: dict[GroupKey, list[int]] = {}
    for i, cfg in enumerate(configs):
        if unfusable_reason(cfg) is None:
            groups.setdefault(group_key(cfg), []).append(i)
    return groups


# A layer of the fused forward: (weight index, bias index) of a Linear, or an activation module.
_Op = tuple[int, int] | nn.Module


def _plan(sequential: nn.Module, prefix: str, names: list[str]) -> list[_Op]:
    ops: list[_Op] = []
    for child, module in sequential.named_children():
        if isinstance(module, nn.Linear):
            ops.append(
                (names.index(f"{prefix}.{child}.weight"), names.index(f"{prefix}.{child}.bias"))
            )
        else:
            ops.append(module)  # an activation: elementwise, so it applies to (K, N, ·) as is
    return ops


class MemberStack:
    """The weights of K same-shape MLP VAEs, stacked; each member's parameters view a row."""

    def __init__(self, vaes: Sequence[VAE]) -> None:
        names = [name for name, _ in vaes[0].named_parameters()]
        self.encoder_plan = _plan(vaes[0].encoder, "encoder", names)
        self.decoder_plan = _plan(vaes[0].decoder, "decoder", names)
        self.vaes: list[VAE] = []
        self.member_params: list[list[nn.Parameter]] = []
        self.stacked: list[torch.Tensor] = []
        self.restack(vaes)

    def __len__(self) -> int:
        return len(self.vaes)

    def restack(self, vaes: Sequence[VAE]) -> None:
        """Stack ``vaes``' current weights into fresh ``(K, …)`` leaves and point each member's
        parameters at its row. Used when members join or leave (the stack is compacted, never
        masked: a masked slot would still cost its share of every product)."""
        self.vaes = list(vaes)
        self.member_params = [list(vae.parameters()) for vae in self.vaes]
        with torch.no_grad():
            self.stacked = [
                torch.stack([params[i].detach() for params in self.member_params])
                for i in range(len(self.member_params[0]))
            ]
        for i, leaf in enumerate(self.stacked):
            leaf.requires_grad_(True)
            for k, params in enumerate(self.member_params):
                params[i].data = leaf.detach()[k]

    def forward(
        self, x: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mu, logvar, output)``, each ``(K, N, ·)``, for inputs ``x (K, N, D)``, ``eps (K, N,
        L)``; z = μ + σ·ε (Kingma & Welling 2014, §2.4), as ``VAE.forward`` per member."""
        mu, logvar = self._run(self.encoder_plan, x).chunk(2, dim=-1)
        z = mu + torch.exp(0.5 * logvar) * eps
        return mu, logvar, self._run(self.decoder_plan, z)

    def _run(self, plan: list[_Op], h: torch.Tensor) -> torch.Tensor:
        for op in plan:
            if isinstance(op, tuple):
                weight, bias = self.stacked[op[0]], self.stacked[op[1]]
                # per member: h Wᵀ + b, as nn.Linear
                h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
            else:
                h = op(h)
        return h

    def backward(self, objective: torch.Tensor) -> None:
        """Back-propagate the members' objectives ``(K,)`` and hand each member its gradients.

        The sum's gradient is 1 for every member and members share no weights, so each member's
        gradient is exactly that of its own objective alone.
        """
        for leaf in self.stacked:
            leaf.grad = None
        objective.sum().backward()
        for i, leaf in enumerate(self.stacked):
            grad = leaf.grad
            for k, params in enumerate(self.member_params):
                params[i].grad = None if grad is None else grad[k]


def stacked_vae_step(
    stack: MemberStack,
    configs: Sequence[TrainConfig],
    optimizers: Sequence[torch.optim.Optimizer],
    x: torch.Tensor,
    eps: torch.Tensor,
    beta: torch.Tensor,
    free_bits: torch.Tensor,
    autocast: Callable[[], AbstractContextManager[Any]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One update of every member; ``(VAE_STEP_STATS, K)`` and ``(VAE_CHECKS, K)`` on the device.

    The loss, clipping and optimizer step are ``train()``'s, per member: ``elbo_terms`` with
    that member's β and λ and free-bits mode, ``clip_gradients``' rule over that member's
    gradients with its thresholds (``clip_stacked_gradients``), then its own optimizer's
    ``step``.
    """
    cfg = configs[0]  # the group's likelihood is the same for all (GROUP_FIELDS)
    with autocast():
        mu, logvar, output = stack.forward(x, eps)
    terms = elbo_terms(
        output.float(), x, mu.float(), logvar.float(), beta=beta, likelihood=cfg.likelihood,
        gaussian_std=cfg.gaussian_std, free_bits=free_bits,
        free_bits_mode=[c.free_bits_mode for c in configs],
    )  # fmt: skip
    stack.backward(terms.objective)
    # each member clipped by its own thresholds over its own gradients, all in one pass
    norms, clipped = clip_stacked_gradients(
        [leaf.grad for leaf in stack.stacked if leaf.grad is not None],
        [c.grad_clip_norm for c in configs],
        [c.grad_clip_value for c in configs],
    )
    for optimizer in optimizers:
        optimizer.step()
    return vae_step_stats(terms, norms, clipped)


__all__ = [
    "GROUP_FIELDS",
    "GroupKey",
    "MemberStack",
    "group_configs",
    "group_key",
    "stacked_vae_step",
    "unfusable_reason",
]
