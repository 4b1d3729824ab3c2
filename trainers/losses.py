"""ELBO terms, returned by name, all in **nats per example** (sum over pixels / latent dims,
mean over the batch).

Every function reduces over the last two dimensions only (batch, then pixels or latent dims), so
the same code serves one model, ``(N, D)`` → scalars, and a population of K stacked models,
``(K, N, D)`` → one value per member (``trainers.population``); β and λ may then be ``(K,)``
tensors, one per member.

The optimised objective and the true −ELBO are reported side by side (VAE_DEFINITIONS §2): the
objective carries β and the free-bits clamp, the −ELBO has β = 1 and no clamp, and model
selection always uses the latter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from hpo_service.schemas import FreeBitsMode, Likelihood

_LOG_2PI = math.log(2.0 * math.pi)


class ELBOTerms(NamedTuple):
    """The terms of one minibatch; every tensor is on the batch's device (no host sync).

    "scalar" below is ``()`` for one model and ``(K,)`` for a population of K members.
    """

    objective: torch.Tensor  # scalar: recon + β·KL_free_bits, what is back-propagated
    neg_elbo: torch.Tensor  # scalar: recon + KL (β = 1, no clamp), the true −ELBO
    reconstruction: torch.Tensor  # scalar: −E_q log p(x|z), one sample of z
    kl_total: torch.Tensor  # scalar: KL(q(z|x) ‖ p(z)) summed over dims, unclamped
    kl_per_dim: torch.Tensor  # (latent_dim,) or (K, latent_dim): batch-mean KL of each dim
    kl_objective: torch.Tensor  # scalar: the KL as it enters the objective (after free bits)
    free_bits_floor_dims: torch.Tensor  # scalar float: groups held at the floor λ
    beta: float | torch.Tensor  # KL weight of this step (per member in a population)


def gaussian_kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) per example and dim, ``(N, latent_dim)``, in nats.

    Kingma & Welling 2014, Appendix B: −KL = ½ Σ_j (1 + log σ_j² − μ_j² − σ_j²).
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def reconstruction_nll(
    output: torch.Tensor, x: torch.Tensor, likelihood: Likelihood, gaussian_std: float
) -> torch.Tensor:
    """−log p(x|z) per example, ``(N,)``, in nats; ``output`` is the decoder's ``(N, D)``.

    Bernoulli: ``output`` are logits; the cross-entropy with targets in [0, 1] (for
    non-binary pixels this is the usual continuous relaxation, not a normalised density).
    Gaussian: ``output`` are means and σ is fixed; the constant ½·log 2πσ² is included so the
    value is a proper NLL in nats.
    """
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(output, x, reduction="none").sum(-1)
    # −log N(x; μ, σ²) = ½((x−μ)/σ)² + log σ + ½ log 2π, summed over the D pixels
    z = (x - output) / gaussian_std
    const = math.log(gaussian_std) + 0.5 * _LOG_2PI
    return (0.5 * z.pow(2) + const).sum(-1)


def free_bits_kl(
    kl: torch.Tensor, free_bits: float | torch.Tensor, mode: FreeBitsMode
) -> tuple[torch.Tensor, torch.Tensor]:
    """The KL as it enters the objective, and how many groups sit at the floor λ.

    ``kl`` is ``(N, latent_dim)`` (or ``(K, N, latent_dim)`` with ``free_bits`` a ``(K,)``
    tensor of λ > 0); one group = one latent dim (VAE_DEFINITIONS §3.2).

    * ``batch_mean_per_group`` (Kingma et al. 2016, IAF appendix; ``openai/iaf``):
      Σ_j max(λ, E_batch[KL_j]) — average over the minibatch first, then clamp.
    * ``per_example_per_group``: E_batch[Σ_j max(λ, KL_ij)] — a stronger, per-example clamp;
      the floor count is the batch-mean number of (example, dim) pairs below λ.
    * ``global``: max(λ·latent_dim, E_batch[Σ_j KL_ij]) — one group of all dims; the floor
      count is latent_dim when the total is clamped, else 0.

    λ = 0 disables the clamp. Below the floor the KL gradient is exactly zero (``clamp``).
    """
    if isinstance(free_bits, float | int) and free_bits <= 0.0:
        return kl.sum(-1).mean(-1), kl.new_zeros(kl.shape[:-2])
    # λ broadcast against (…, latent_dim) and against (…, N, latent_dim)
    lam_dims = free_bits.unsqueeze(-1) if isinstance(free_bits, torch.Tensor) else free_bits
    lam_rows = lam_dims.unsqueeze(-1) if isinstance(lam_dims, torch.Tensor) else lam_dims
    if mode == "batch_mean_per_group":
        per_dim = kl.mean(-2)
        return per_dim.clamp(min=lam_dims).sum(-1), (per_dim < lam_dims).float().sum(-1)
    if mode == "per_example_per_group":
        clamped = kl.clamp(min=lam_rows).sum(-1).mean(-1)
        return clamped, (kl < lam_rows).float().sum(-1).mean(-1)
    floor = free_bits * kl.shape[-1]
    total = kl.sum(-1).mean(-1)
    return total.clamp(min=floor), (total < floor).float() * kl.shape[-1]


def member_free_bits_kl(
    kl: torch.Tensor, free_bits: torch.Tensor, modes: Sequence[FreeBitsMode]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``free_bits_kl`` for K members at once, each with its own λ and mode.

    ``kl`` is ``(K, N, latent_dim)``, ``free_bits`` ``(K,)``, ``modes`` one per member. Each mode
    present is computed once for the whole stack and picked per member (``where``, so a member
    gets exactly the gradient its own mode gives it); λ = 0 is the unclamped KL, as alone.
    """
    objective, floor_dims = free_bits_kl(kl, 0.0, "batch_mean_per_group")
    on = free_bits > 0
    for mode in dict.fromkeys(modes):
        chosen = on & torch.tensor([m == mode for m in modes], device=kl.device)
        clamped, floor = free_bits_kl(kl, free_bits, mode)
        objective = torch.where(chosen, clamped, objective)
        floor_dims = torch.where(chosen, floor, floor_dims)
    return objective, floor_dims


def elbo_terms(
    output: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    beta: float | torch.Tensor,
    likelihood: Likelihood,
    gaussian_std: float,
    free_bits: float | torch.Tensor = 0.0,
    free_bits_mode: FreeBitsMode | Sequence[FreeBitsMode] = "batch_mean_per_group",
) -> ELBOTerms:
    """All ELBO terms of one minibatch (one posterior sample per example), nats per example.

    −ELBO = E_q[−log p(x|z)] + KL(q(z|x) ‖ p(z)) (Kingma & Welling 2014, Eq. 3);
    objective = reconstruction + β·KL_free_bits (Higgins et al. 2017 β; Kingma et al. 2016).

    For K stacked members (inputs ``(K, N, ·)``) ``beta`` and ``free_bits`` are ``(K,)``
    tensors and ``free_bits_mode`` is one mode per member.
    """
    recon = reconstruction_nll(output, x, likelihood, gaussian_std).mean(-1)
    kl = gaussian_kl_per_dim(mu, logvar)
    kl_total = kl.sum(-1).mean(-1)
    if isinstance(free_bits_mode, str):
        kl_objective, floor_dims = free_bits_kl(kl, free_bits, free_bits_mode)
    else:
        if not isinstance(free_bits, torch.Tensor):
            raise TypeError("per-member free-bits modes need a (K,) tensor of λ")
        kl_objective, floor_dims = member_free_bits_kl(kl, free_bits, free_bits_mode)
    return ELBOTerms(
        objective=recon + beta * kl_objective,
        neg_elbo=recon + kl_total,
        reconstruction=recon,
        kl_total=kl_total,
        kl_per_dim=kl.mean(-2),
        kl_objective=kl_objective,
        free_bits_floor_dims=floor_dims,
        beta=beta,
    )
