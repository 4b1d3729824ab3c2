"""One optimizer step of a VAE or a VAE-GAN, with the per-step statistics and NaN/Inf checks
they leave on the device (summed and read back once per epoch by the loop)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F
from torch import nn

from trainers.config import TrainConfig
from trainers.losses import ELBOTerms, elbo_terms
from trainers.models import VAE
from trainers.optim import clip_gradients

# Per-step statistics summed on the device; their order is the order of the stacked tensor.
VAE_STEP_STATS = (
    "train_loss",
    "train_neg_elbo",
    "train_recon",
    "train_kl",
    "free_bits_floor_dims",
    "grad_norm",
    "clipped",
)
VAEGAN_STEP_STATS = (
    *VAE_STEP_STATS,
    "feature_recon",
    "disc_loss",
    "gen_loss",
    "disc_skipped",
    "dec_skipped",
    "disc_grad_norm",
)
# Terms checked for NaN/Inf every step (on the device); the names go into NonFiniteLossError.
VAE_CHECKS = ("objective", "grad_norm")
VAEGAN_CHECKS = ("objective", "gen_loss", "disc_loss", "grad_norm", "disc_grad_norm")


LossFn = Callable[[torch.Tensor, torch.Tensor, float], ELBOTerms]


def vae_loss_fn(
    forward: Callable[..., Any],
    cfg: TrainConfig,
    autocast: Callable[[], AbstractContextManager[Any]],
) -> LossFn:
    """``(x, ε, β) -> ELBOTerms`` of ``forward`` (a VAE) under the config's likelihood.

    The model runs under ``autocast``; the losses in fp32, because sums over 784 pixels lose too
    much in bf16. Only plain values are captured (no config object), so ``torch.compile``
    traces it without guards on the config.
    """
    likelihood, gaussian_std = cfg.likelihood, cfg.gaussian_std
    free_bits, free_bits_mode = cfg.free_bits, cfg.free_bits_mode

    def losses(x: torch.Tensor, eps: torch.Tensor, beta: float) -> ELBOTerms:
        with autocast():
            mu, logvar, output = forward(x, eps)
        return elbo_terms(
            output.float(), x, mu.float(), logvar.float(), beta=beta, likelihood=likelihood,
            gaussian_std=gaussian_std, free_bits=free_bits, free_bits_mode=free_bits_mode,
        )  # fmt: skip

    return losses


def vae_step(
    losses: LossFn,
    x: torch.Tensor,
    eps: torch.Tensor,
    beta: float,
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One VAE update; returns (``VAE_STEP_STATS`` values, ``VAE_CHECKS`` values) on the device."""
    terms = losses(x, eps, beta)
    optimizer.zero_grad(set_to_none=True)
    terms.objective.backward()
    params = _params(optimizer)
    grad_norm, clipped = clip_gradients(params, cfg.grad_clip_norm, cfg.grad_clip_value)
    optimizer.step()
    return vae_step_stats(terms, grad_norm, clipped)


def vae_step_stats(
    terms: ELBOTerms, grad_norm: torch.Tensor, clipped: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``VAE_STEP_STATS`` and ``VAE_CHECKS`` values of a step, stacked on the device (one
    column per member when the terms are a population's)."""
    stats = torch.stack(
        [
            terms.objective.detach(),
            terms.neg_elbo.detach(),
            terms.reconstruction.detach(),
            terms.kl_total.detach(),
            terms.free_bits_floor_dims,
            grad_norm,
            clipped,
        ]
    )
    return stats, torch.stack([stats[0], grad_norm])


# The three VAE-GAN losses share one forward graph; torch.compile's "donated buffers"
# optimisation frees saved activations after the first backward and then refuses the others,
# so it is switched off around the VAE-GAN step (it only saves memory).
@functorch_config.patch(donated_buffer=False)
def vaegan_step(
    vae_forward: Callable[..., Any],
    disc_forward: Callable[..., Any],
    vae: VAE,
    x: torch.Tensor,
    eps: torch.Tensor,
    eps_prior: torch.Tensor,
    beta: float,
    cfg: TrainConfig,
    optimizers: list[torch.optim.Optimizer],
    autocast: Callable[[], AbstractContextManager[Any]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One VAE-GAN update (Larsen et al. 2016, Alg. 1); returns (``VAEGAN_STEP_STATS``,
    ``VAEGAN_CHECKS``) values on the device.

    Encoder:  ∇(β·L_prior + L_llike);  decoder: ∇(γ·L_llike + L_gen);  discriminator: ∇L_GAN.
    L_llike is a Gaussian (σ = 1) likelihood of the discriminator's features Dis_l (Eq. 7);
    L_gen is the non-saturating form of −L_GAN (Goodfellow et al. 2014) on reconstructions and
    prior samples, both of which count as fake (Eq. 8). Each backward is restricted to its own
    parameters (``inputs=``) and every backward runs before any step (VAE_DEFINITIONS §12).
    """
    enc_opt, dec_opt, disc_opt = optimizers
    with autocast():
        mu, logvar, output = vae_forward(x, eps)
        x_recon = _as_image(output, cfg)
        x_prior = _as_image(vae.decode(eps_prior), cfg)  # z ~ p(z) = N(0, I)
        logit_real, feat_real = disc_forward(x)
        logit_recon, feat_recon = disc_forward(x_recon)
        logit_prior, _ = disc_forward(x_prior)
    terms = elbo_terms(
        output.float(),
        x,
        mu.float(),
        logvar.float(),
        beta=beta,
        likelihood=cfg.likelihood,
        gaussian_std=cfg.gaussian_std,
        free_bits=cfg.free_bits,
        free_bits_mode=cfg.free_bits_mode,
    )
    # Larsen et al. 2016, Eq. 7: −log N(Dis_l(x); Dis_l(x̃), I), constant dropped; per example.
    feature_recon = 0.5 * (feat_recon.float() - feat_real.float()).pow(2).sum(-1).mean()
    real_bce = F.binary_cross_entropy_with_logits(
        logit_real.float(), torch.ones_like(logit_real, dtype=torch.float32)
    )
    recon_bce = F.binary_cross_entropy_with_logits(
        logit_recon.float(), torch.zeros_like(logit_recon, dtype=torch.float32)
    )
    prior_bce = F.binary_cross_entropy_with_logits(
        logit_prior.float(), torch.zeros_like(logit_prior, dtype=torch.float32)
    )
    disc_loss = real_bce + recon_bce + prior_bce  # −L_GAN: the discriminator's cross-entropy
    gen_loss = F.binary_cross_entropy_with_logits(
        logit_recon.float(), torch.ones_like(logit_recon, dtype=torch.float32)
    ) + F.binary_cross_entropy_with_logits(
        logit_prior.float(), torch.ones_like(logit_prior, dtype=torch.float32)
    )
    enc_loss = beta * terms.kl_objective + feature_recon
    dec_loss = cfg.gan_gamma * feature_recon + gen_loss

    # Equilibrium/margin rule (andersbll/autoencoding_beyond_pixels): skip the discriminator
    # when it is already winning, the decoder when it is losing badly, never both. Decided on
    # the device: a skipped module gets zero gradient and its parameters are restored.
    fake_bce = 0.5 * (recon_bce + prior_bce)
    low, high = cfg.gan_equilibrium - cfg.gan_margin, cfg.gan_equilibrium + cfg.gan_margin
    train_disc = ~((real_bce < low) | (fake_bce < low))
    train_dec = ~((real_bce > high) | (fake_bce > high))
    neither = ~train_disc & ~train_dec
    train_disc, train_dec = train_disc | neither, train_dec | neither

    enc_params, dec_params, disc_params = (_params(o) for o in optimizers)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    enc_loss.backward(inputs=enc_params, retain_graph=True)
    dec_loss.backward(inputs=dec_params, retain_graph=True)
    disc_loss.backward(inputs=disc_params)
    # All gradients exist; only now does any parameter change.
    enc_norm, enc_clip = clip_gradients(enc_params, cfg.grad_clip_norm, cfg.grad_clip_value)
    dec_norm, dec_clip = clip_gradients(dec_params, cfg.grad_clip_norm, cfg.grad_clip_value)
    disc_norm, disc_clip = clip_gradients(disc_params, cfg.grad_clip_norm, cfg.grad_clip_value)
    enc_opt.step()
    _gated_step(dec_opt, dec_params, train_dec)
    _gated_step(disc_opt, disc_params, train_disc)

    stats = torch.stack(
        [
            enc_loss.detach(),
            terms.neg_elbo.detach(),
            terms.reconstruction.detach(),
            terms.kl_total.detach(),
            terms.free_bits_floor_dims,
            torch.sqrt(enc_norm**2 + dec_norm**2),  # the generator's global norm
            torch.maximum(torch.maximum(enc_clip, dec_clip), disc_clip),
            feature_recon.detach(),
            disc_loss.detach(),
            gen_loss.detach(),
            (~train_disc).float(),
            (~train_dec).float(),
            disc_norm,
        ]
    )
    checks = torch.stack([stats[0], gen_loss.detach(), stats[8], stats[5], disc_norm])
    return stats, checks


def _params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _as_image(output: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Decoder output as pixels for the discriminator: Bernoulli means or Gaussian means."""
    return torch.sigmoid(output) if cfg.likelihood == "bernoulli" else output


def _gated_step(
    optimizer: torch.optim.Optimizer, params: list[nn.Parameter], gate: torch.Tensor
) -> None:
    """``optimizer.step()`` that leaves the parameters unchanged where ``gate`` is False.

    Decided on the device (no sync): gradients are zeroed and the parameters restored when
    skipped. Adam's moments still see that zero gradient (they decay by β1/β2 once), the
    price of not reading the decision back to the host every step.
    """
    keep = gate.to(params[0].dtype)
    before = [p.detach().clone() for p in params]
    for p in params:
        if p.grad is not None:
            p.grad.mul_(keep)
    optimizer.step()
    with torch.no_grad():
        for p, old in zip(params, before, strict=True):
            p.copy_(torch.where(gate, p, old))
