"""Evaluation of a run (shared with trainers.population): held-out metrics, the end of an
epoch (first NaN/Inf, the training values, validation) and of a run (snapshot, final metrics)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from trainers.config import TrainConfig
from trainers.errors import NonFiniteLossError
from trainers.losses import gaussian_kl_per_dim, reconstruction_nll
from trainers.metrics import active_units, importance_sampled_nll, posterior_collapse
from trainers.models import VAE

if TYPE_CHECKING:  # trainers.train imports this module; the type is only annotated here
    from trainers.train import EpochMetrics

#: Eval batches are larger than training ones: no activations are kept for backward.
EVAL_BATCH_SIZE = 1024
#: Offset of the evaluation generator's seed: validation uses the same noise every epoch
#: (common random numbers), so epoch-to-epoch differences in −ELBO are the model's, not noise.
EVAL_SEED_OFFSET = 1_000_003


def eval_generator(cfg: TrainConfig, device: torch.device) -> torch.Generator:
    """A fresh generator with a fixed seed: every evaluation draws the same posterior noise."""
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed + EVAL_SEED_OFFSET)
    return gen


@torch.no_grad()
def evaluate(
    vae: VAE, x: torch.Tensor, cfg: TrainConfig, generator: torch.Generator
) -> tuple[dict[str, float], list[float]]:
    """Held-out metrics of ``vae`` on ``x`` (one posterior sample per example), one host read.

    Returns ``val_neg_elbo``, ``val_recon``, ``val_kl`` (nats per example, β = 1, no clamp),
    ``active_units`` (Burda et al. 2016, on the first ``active_unit_examples`` rows),
    ``mean_sigma``, ``mean_abs_mu``, and the KL per latent dim.
    """
    n = len(x)
    totals = torch.zeros(4, device=x.device)  # sums of: recon, KL, mean σ, mean |μ|
    kl_dims = torch.zeros(cfg.latent_dim, device=x.device)
    means = []
    for start in range(0, n, EVAL_BATCH_SIZE):
        xb = x[start : start + EVAL_BATCH_SIZE]
        mu, logvar = vae.encode(xb)
        eps = torch.randn(mu.shape, device=x.device, generator=generator)
        output = vae.decode(mu + torch.exp(0.5 * logvar) * eps)
        kl = gaussian_kl_per_dim(mu, logvar)  # (n, L), Kingma & Welling 2014, App. B
        recon = reconstruction_nll(output, xb, cfg.likelihood, cfg.gaussian_std)
        totals[0] += recon.sum()
        totals[1] += kl.sum()
        totals[2] += torch.exp(0.5 * logvar).mean(-1).sum()
        totals[3] += mu.abs().mean(-1).sum()
        kl_dims += kl.sum(0)
        means.append(mu)
    au_rows = min(n, cfg.active_unit_examples)
    n_active = active_units(torch.cat(means)[:au_rows], cfg.active_unit_threshold)
    host = torch.cat([totals / n, kl_dims / n, n_active.view(1).float()]).tolist()
    recon_mean, kl_mean, sigma, abs_mu = host[0], host[1], host[2], host[3]
    return (
        {
            "val_neg_elbo": recon_mean + kl_mean,
            "val_recon": recon_mean,
            "val_kl": kl_mean,
            "active_units": host[-1],
            "mean_sigma": sigma,
            "mean_abs_mu": abs_mu,
        },
        host[4 : 4 + cfg.latent_dim],
    )


# --- the end of an epoch and of a run ------------------------------------------------------------


def first_nonfinite(first_bad: list[float], check_names: tuple[str, ...]) -> tuple[int, str] | None:
    """The first (step, term) that went NaN/Inf, from the per-check first-bad steps read back
    from the device (−1 = never); ties name the loss before the gradient it caused."""
    bad_steps = [(int(s), j) for j, s in enumerate(first_bad) if s >= 0]
    if not bad_steps:
        return None
    bad_step, j = min(bad_steps)
    return bad_step, check_names[j]


def vae_epoch_values(
    means: Mapping[str, float],
    peaks: Mapping[str, float],
    beta: float,
    lr: float,
    samples_per_sec: float,
) -> dict[str, float]:
    """The training half of an epoch's ``values`` from the epoch means and maxima of
    ``VAE_STEP_STATS``; ``beta`` and ``lr`` are those of the epoch's last step."""
    return {
        "train_loss": means["train_loss"],
        "train_neg_elbo": means["train_neg_elbo"],
        "train_recon": means["train_recon"],
        "train_kl": means["train_kl"],
        "free_bits_floor_dims": means["free_bits_floor_dims"],
        "beta": beta,
        "lr": lr,
        "grad_norm_mean": means["grad_norm"],
        "grad_norm_max": peaks["grad_norm"],
        "clip_fraction": means["clipped"],
        "samples_per_sec": samples_per_sec,
    }


def validate(
    vae: VAE, x: torch.Tensor, cfg: TrainConfig, device: torch.device, epoch: int, step: int
) -> tuple[dict[str, float], list[float]]:
    """``evaluate`` on the validation split plus the posterior-collapse flag; raises
    ``NonFiniteLossError`` (at ``step``, the epoch's last) when the −ELBO is not finite."""
    val, kl_per_dim = evaluate(vae, x, cfg, eval_generator(cfg, device))
    if not math.isfinite(val["val_neg_elbo"]):
        raise NonFiniteLossError(epoch, step, "val_neg_elbo")
    val["posterior_collapse"] = float(
        posterior_collapse(val["val_kl"], int(val["active_units"]), cfg.collapse_kl_threshold)
    )
    return val, kl_per_dim


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``module``'s state. ``clone`` per tensor, not ``deepcopy``: a population
    member's parameters are views into the stacked storage, which deepcopy would copy whole."""
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def final_metrics(
    vae: VAE,
    best_state: Mapping[str, torch.Tensor],
    test_x: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device,
    history: list[EpochMetrics],
    best: tuple[float, int, float],
    *,
    test: bool,
) -> dict[str, float]:
    """A run's final ``metrics`` (see ``train``): the last epoch's values with the selected
    model's ``best`` (val −ELBO, epoch, active units); with ``test``, the selected model's test
    −ELBO and IS-NLL. Loads ``best_state`` into ``vae``."""
    best_val, best_epoch, best_au = best
    final = dict(history[-1].values)
    final |= {
        "val_neg_elbo": best_val,
        "active_units": best_au,
        "best_epoch": float(best_epoch),
        "epochs_run": float(len(history)),
    }
    if not test:
        return final
    eval_started = time.perf_counter()  # issue 10: evaluation timed apart from training
    vae.load_state_dict(best_state)
    vae.eval()
    result, _ = evaluate(vae, test_x, cfg, eval_generator(cfg, device))
    final["test_neg_elbo"] = result["val_neg_elbo"]
    if cfg.final_is_samples > 0:
        n = cfg.final_is_examples or len(test_x)
        nll = importance_sampled_nll(
            vae,
            test_x[:n],
            k=cfg.final_is_samples,
            likelihood=cfg.likelihood,
            gaussian_std=cfg.gaussian_std,
            generator=eval_generator(cfg, device),
        )
        final["test_is_nll"] = nll.mean().item()
    final["final_eval_seconds"] = time.perf_counter() - eval_started  # issue 10
    return final
