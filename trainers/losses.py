"""ELBO terms, returned by name, all in **nats per example** (sum over pixels / latent dims,
mean over the batch).

The optimised objective and the true −ELBO are reported side by side (VAE_DEFINITIONS §2): the
objective carries β and the free-bits clamp, the −ELBO has β = 1 and no clamp, and model
selection always uses the latter.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from hpo_service.schemas import FreeBitsMode, Likelihood

_LOG_2PI = math.log(2.0 * math.pi)


class ELBOTerms(NamedTuple):
    """The terms of one minibatch; every tensor is on the batch's device (no host sync)."""

    objective: torch.Tensor  # scalar: recon + β·KL_free_bits, what is back-propagated
    neg_elbo: torch.Tensor  # scalar: recon + KL (β = 1, no clamp), the true −ELBO
    reconstruction: torch.Tensor  # scalar: −E_q log p(x|z), one sample of z
    kl_total: torch.Tensor  # scalar: KL(q(z|x) ‖ p(z)) summed over dims, unclamped
    kl_per_dim: torch.Tensor  # (latent_dim,): batch-mean KL of each dim, unclamped
    kl_objective: torch.Tensor  # scalar: the KL as it enters the objective (after free bits)
    free_bits_floor_dims: torch.Tensor  # scalar float: groups held at the floor λ
    beta: float  # KL weight of this step


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
    kl: torch.Tensor, free_bits: float, mode: FreeBitsMode
) -> tuple[torch.Tensor, torch.Tensor]:
    """The KL as it enters the objective, and how many groups sit at the floor λ.

    ``kl`` is ``(N, latent_dim)``; one group = one latent dim (VAE_DEFINITIONS §3.2).

    * ``batch_mean_per_group`` (Kingma et al. 2016, IAF appendix; ``openai/iaf``):
      Σ_j max(λ, E_batch[KL_j]) — average over the minibatch first, then clamp.
    * ``per_example_per_group``: E_batch[Σ_j max(λ, KL_ij)] — a stronger, per-example clamp;
      the floor count is the batch-mean number of (example, dim) pairs below λ.
    * ``global``: max(λ·latent_dim, E_batch[Σ_j KL_ij]) — one group of all dims; the floor
      count is latent_dim when the total is clamped, else 0.

    λ = 0 disables the clamp. Below the floor the KL gradient is exactly zero (``clamp``).
    """
    if free_bits <= 0.0:
        return kl.sum(-1).mean(), kl.new_zeros(())
    if mode == "batch_mean_per_group":
        per_dim = kl.mean(0)
        return per_dim.clamp(min=free_bits).sum(), (per_dim < free_bits).float().sum()
    if mode == "per_example_per_group":
        clamped = kl.clamp(min=free_bits).sum(-1).mean()
        return clamped, (kl < free_bits).float().sum(-1).mean()
    floor = free_bits * kl.shape[-1]
    total = kl.sum(-1).mean()
    return total.clamp(min=floor), (total < floor).float() * kl.shape[-1]


def elbo_terms(
    output: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    beta: float,
    likelihood: Likelihood,
    gaussian_std: float,
    free_bits: float = 0.0,
    free_bits_mode: FreeBitsMode = "batch_mean_per_group",
) -> ELBOTerms:
    """All ELBO terms of one minibatch (one posterior sample per example), nats per example.

    −ELBO = E_q[−log p(x|z)] + KL(q(z|x) ‖ p(z)) (Kingma & Welling 2014, Eq. 3);
    objective = reconstruction + β·KL_free_bits (Higgins et al. 2017 β; Kingma et al. 2016).
    """
    recon = reconstruction_nll(output, x, likelihood, gaussian_std).mean()
    kl = gaussian_kl_per_dim(mu, logvar)
    kl_total = kl.sum(-1).mean()
    kl_objective, floor_dims = free_bits_kl(kl, free_bits, free_bits_mode)
    return ELBOTerms(
        objective=recon + beta * kl_objective,
        neg_elbo=recon + kl_total,
        reconstruction=recon,
        kl_total=kl_total,
        kl_per_dim=kl.mean(0),
        kl_objective=kl_objective,
        free_bits_floor_dims=floor_dims,
        beta=beta,
    )
