"""One training run of a VAE (MLP, conv) or a VAE-GAN: ``train(config, on_epoch) -> TrainResult``.

Read it top to bottom: setup, then for each epoch a loop over minibatches (schedules → forward →
backward → clip → step), then validation, reporting and model selection.
The pieces live by job: ``run_setup`` (config, device, data), ``optim`` (optimizers, schedules
on their groups, clipping), ``precision`` (bf16 autocast), ``steps`` (one VAE / VAE-GAN update)
and ``evaluation`` (validation, final metrics); this module re-exports them all.

Speed rules the loop keeps:
* the dataset lives on the device as one tensor and is shuffled by a device permutation;
* nothing in the step loop reads a tensor back to the host: per-step statistics are summed on
  the device and read once per epoch (a NaN/Inf check included — the first bad step is recorded
  on the device and reported when the epoch ends);
* LR and β are Python floats from pure schedule functions of the step, so setting them is free;
* fused Adam/AdamW kernels on every device (one pass over the parameters, not one per
  elementwise op);
* bf16 autocast (``amp``) wherever the device multiplies bf16 natively (CUDA, CPUs with
  AVX512-BF16 or AMX); optional ``torch.compile`` of forward + loss together (a VAE) or of the
  modules (a VAE-GAN).

Defaults were chosen by measurement: ``docs/benchmarks.md`` ("Trainer throughput").

Units: every loss is in nats per example; ``step`` is the 0-based global optimizer step;
``epoch`` is 1-based.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from trainers.checkpoints import TrainState, capture, restore
from trainers.config import TrainConfig
from trainers.errors import ConfigError, NonFiniteLossError
from trainers.evaluation import (
    EVAL_BATCH_SIZE,
    EVAL_SEED_OFFSET,
    eval_generator,
    evaluate,
    final_metrics,
    first_nonfinite,
    snapshot,
    vae_epoch_values,
    validate,
)
from trainers.models import VAEGAN, build_vae, discriminator
from trainers.optim import (
    build_optimizer,
    clip_gradients,
    param_groups,
    set_schedule,
)
from trainers.precision import (
    amp_context,
    native_bf16,
    uses_bf16,
)
from trainers.run_setup import (
    load_training_data,
    parse_config,
    resolve_device,
)
from trainers.schedules import kl_beta, kl_schedule_from_config, lr_schedule_from_config
from trainers.steps import (
    VAE_CHECKS,
    VAE_STEP_STATS,
    VAEGAN_CHECKS,
    VAEGAN_STEP_STATS,
    LossFn,
    vae_loss_fn,
    vae_step,
    vae_step_stats,
    vaegan_step,
)

Decision = Literal["continue", "stop"] | None


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch reports: scalar metrics by name, and the validation KL of each latent dim."""

    epoch: int  # 1-based
    values: dict[str, float]  # scalar metrics (names in the module docstring of `train`)
    kl_per_dim: list[float]  # validation KL per latent dim, nats per example
    # The run's state at the end of this epoch (issue 14), for a checkpoint: call it inside
    # ``on_epoch`` (later calls see a later state). None where a run cannot be checkpointed.
    checkpoint: Callable[[], TrainState] | None = field(default=None, compare=False, repr=False)


OnEpoch = Callable[[EpochMetrics], Decision]


@dataclass(frozen=True)
class TrainResult:
    """The run's final metrics (the selected model's), the per-epoch history, how it ended."""

    metrics: dict[str, float]
    history: list[EpochMetrics]
    epochs_run: int
    best_epoch: int  # 1-based epoch with the lowest validation −ELBO (the selected model)
    stopped_early: bool  # `on_epoch` returned "stop"
    plateaued: bool = False  # ended by `patience`: no new best validation −ELBO for that long
    # The selected model's state (issue 14: what a finished trial keeps for the final
    # evaluation of the winners); None from trainers that do not keep it.
    best_state: dict[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)


def train(
    config: TrainConfig | Mapping[str, Any],
    on_epoch: OnEpoch | None = None,
    *,
    patience: int | None = None,
    resume: TrainState | None = None,
) -> TrainResult:
    """Train one VAE or VAE-GAN and return its metrics.

    ``on_epoch`` is called after every epoch with that epoch's metrics; returning ``"stop"``
    ends the run at once (``stopped_early=True``; the test-set evaluation is skipped because a
    stopped trial is a pruned one).

    ``patience`` (epochs): end the run once the validation −ELBO has not improved on its best
    for that many epochs in a row (``plateaued=True``); unlike a stop, the selected model is
    still evaluated on the test set. ``None`` runs all ``epochs``.

    Per-epoch ``values`` (nats per example where a loss): ``train_loss`` (the optimised
    objective; for a VAE-GAN the encoder's), ``train_neg_elbo``, ``train_recon``, ``train_kl``,
    ``val_neg_elbo``, ``val_recon``, ``val_kl``, ``active_units``, ``free_bits_floor_dims``,
    ``beta`` and ``lr`` (at the epoch's last step; ``lr`` is the effective, batch-scaled LR),
    ``grad_norm_mean``, ``grad_norm_max`` (pre-clip), ``clip_fraction``, ``samples_per_sec``,
    ``posterior_collapse`` (0/1), ``mean_sigma``, ``mean_abs_mu``, ``epoch_seconds``. A VAE-GAN
    adds ``feature_recon``, ``disc_loss``, ``gen_loss``, ``disc_skip_fraction``,
    ``dec_skip_fraction``, ``disc_grad_norm_mean``, ``disc_grad_norm_max``, ``decoder_lr``,
    ``disc_lr``.

    For a VAE-GAN the ``*_neg_elbo``/``*_recon`` metrics are still the pixel-space Bernoulli or
    Gaussian ELBO of the generator (comparable with plain VAEs), although the decoder is trained
    on feature-space reconstruction and the GAN loss instead.

    Final ``metrics``: the last epoch's values, overridden by the selected (best validation
    −ELBO) model's ``val_neg_elbo`` and ``active_units``, plus ``best_epoch``, ``epochs_run``,
    ``test_neg_elbo`` and ``test_is_nll`` (k = ``final_is_samples``; absent when 0 or stopped).

    ``resume`` (issue 14, ``trainers.checkpoints``): continue a run from a checkpoint of the
    same config taken at the end of its epoch E; the run trains epochs E+1.. and its result
    (history included) is the uninterrupted run's. Each epoch's ``EpochMetrics.checkpoint``
    captures the state such a checkpoint holds.

    Raises ``ConfigError`` (invalid setting, naming the field), ``NonFiniteLossError``
    (NaN/Inf loss or gradient norm, with the epoch and the first bad step) and
    ``CheckpointError`` (``resume`` does not fit this run).
    """
    cfg = parse_config(config)
    if patience is not None and patience < 1:
        raise ConfigError("patience", f"must be at least 1 epoch (got {patience})")

    # --- 1) device and seeds: same seed on the same device → identical metrics --------------
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)  # model initialisation
    gen = torch.Generator(device=device)  # shuffling, posterior noise, prior samples, binarizing
    gen.manual_seed(cfg.seed)

    # --- 2) data ------------------------------------------------------------------------------
    data = load_training_data(cfg, device)
    n_train = data.train.shape[0]
    bs = cfg.batch_size
    # Drop the ragged last batch: a constant batch size keeps free bits (whose clamp depends on
    # the batch mean) and compiled graphs the same on every step.
    steps_per_epoch = n_train // bs

    # --- 3) model, optimizers, schedules --------------------------------------------------------
    is_gan = cfg.model == "vaegan"
    vae = build_vae(cfg, data.image_shape).to(device)
    disc = discriminator(cfg, data.image_shape).to(device) if is_gan else None
    model: nn.Module = VAEGAN(vae, disc) if disc is not None else vae
    autocast = amp_context(cfg, device)
    vae_forward: Callable[..., Any] = vae
    disc_forward: Callable[..., Any] | None = None
    losses = vae_loss_fn(vae, cfg, autocast)
    if disc is not None:
        vae_forward = torch.compile(vae) if cfg.compile else vae
        disc_forward = torch.compile(disc) if cfg.compile else disc
    elif cfg.compile:
        # One graph for forward + ELBO terms, so the loss's elementwise work fuses with the
        # model's (and with its backward).
        losses = torch.compile(losses)

    ksched = kl_schedule_from_config(cfg, steps_per_epoch)
    lsched = lr_schedule_from_config(cfg, steps_per_epoch)
    if disc is None:
        optimizers = [build_optimizer(vae, cfg, device)]
        lr_scheds = [lsched]
    else:
        # Larsen et al. 2016, Alg. 1: encoder, decoder and discriminator have separate
        # parameter sets, optimizers and (here) LR schedules (VAE_DEFINITIONS §12).
        optimizers = [
            build_optimizer(vae.encoder, cfg, device),
            build_optimizer(vae.decoder, cfg, device),
            build_optimizer(disc, cfg, device),
        ]
        lr_scheds = [
            lsched,
            lr_schedule_from_config(cfg, steps_per_epoch, base_lr=cfg.decoder_lr),
            lr_schedule_from_config(cfg, steps_per_epoch, base_lr=cfg.disc_lr),
        ]
    stat_names = VAEGAN_STEP_STATS if is_gan else VAE_STEP_STATS
    check_names = VAEGAN_CHECKS if is_gan else VAE_CHECKS
    # Statistics whose epoch maximum is reported too (pre-clip gradient norms).
    max_names = ("grad_norm", "disc_grad_norm") if is_gan else ("grad_norm",)
    max_index = torch.tensor([stat_names.index(n) for n in max_names], device=device)

    history: list[EpochMetrics] = []
    best_val, best_epoch, best_au = math.inf, 0, 0.0
    best_state = snapshot(vae)
    stopped_early = plateaued = False
    step, first_epoch = 0, 1
    if resume is not None:  # issue 14: continue where the checkpoint's run stopped
        best_state = restore(resume, model, optimizers, gen, device, cfg.epochs)
        step, best = resume.step, resume.best
        best_val, best_epoch, best_au = best
        history = [
            EpochMetrics(int(e["epoch"]), dict(e["values"]), list(e["kl_per_dim"]))
            for e in resume.history
        ]
        first_epoch = resume.epoch + 1

    def state_now() -> TrainState:
        best = (best_val, best_epoch, best_au)
        return capture(epoch, step, model, optimizers, gen, best, best_state, history)

    for epoch in range(first_epoch, cfg.epochs + 1):
        t_epoch = time.perf_counter()
        model.train()
        perm = torch.randperm(n_train, device=device, generator=gen)
        sums = torch.zeros(len(stat_names), device=device)
        maxima = torch.zeros(len(max_names), device=device)
        first_bad = torch.full((len(check_names),), -1, dtype=torch.long, device=device)
        lrs: list[float] = []
        beta = 0.0
        for i in range(steps_per_epoch):
            # 1) minibatch: a slice of the device permutation (dynamic binarization if asked)
            x = data.train[perm[i * bs : (i + 1) * bs]]
            if cfg.binarize:
                x = torch.bernoulli(x, generator=gen)
            # 2) schedules are pure functions of the step → Python floats, no device sync
            beta = kl_beta(step, ksched)
            lrs = [set_schedule(opt, step, s) for opt, s in zip(optimizers, lr_scheds, strict=True)]
            # 3) forward, all backward passes, clipping, optimizer steps
            eps = torch.randn(bs, cfg.latent_dim, device=device, generator=gen)
            if disc_forward is None:
                stats, checks = vae_step(losses, x, eps, beta, cfg, optimizers[0])
            else:
                eps_prior = torch.randn(bs, cfg.latent_dim, device=device, generator=gen)
                stats, checks = vaegan_step(
                    vae_forward, disc_forward, vae, x, eps, eps_prior, beta, cfg, optimizers,
                    autocast,
                )  # fmt: skip
            # 4) accumulate on the device; remember the first step whose loss/grad went bad
            sums += stats
            maxima = torch.maximum(maxima, stats[max_index])
            bad = ~torch.isfinite(checks)
            first_bad = torch.where((first_bad < 0) & bad, step, first_bad)
            step += 1

        # --- end of epoch: one host read of everything the steps accumulated ------------------
        host = torch.cat([sums.double(), maxima.double(), first_bad.double()]).tolist()
        train_seconds = time.perf_counter() - t_epoch
        n_sums, n_max = len(stat_names), len(max_names)
        nonfinite = first_nonfinite(host[n_sums + n_max :], check_names)
        if nonfinite is not None:
            raise NonFiniteLossError(epoch, *nonfinite)
        means = {n: total / steps_per_epoch for n, total in zip(stat_names, host, strict=False)}
        peaks = dict(zip(max_names, host[n_sums : n_sums + n_max], strict=True))
        values = vae_epoch_values(
            means, peaks, beta, lrs[0], steps_per_epoch * bs / max(train_seconds, 1e-9)
        )
        if is_gan:
            values |= {
                "feature_recon": means["feature_recon"],
                "disc_loss": means["disc_loss"],
                "gen_loss": means["gen_loss"],
                "disc_skip_fraction": means["disc_skipped"],
                "dec_skip_fraction": means["dec_skipped"],
                "disc_grad_norm_mean": means["disc_grad_norm"],
                "disc_grad_norm_max": peaks["disc_grad_norm"],
                "decoder_lr": lrs[1],
                "disc_lr": lrs[2],
            }

        # --- validation: the true −ELBO (β = 1, no free-bits clamp) selects the model ---------
        model.eval()
        val, kl_per_dim = validate(vae, data.val, cfg, device, epoch, step - 1)
        values |= val
        values["epoch_seconds"] = time.perf_counter() - t_epoch
        metrics = EpochMetrics(epoch, values, kl_per_dim, checkpoint=state_now)
        history.append(metrics)

        if val["val_neg_elbo"] < best_val:
            best_val, best_epoch, best_au = val["val_neg_elbo"], epoch, val["active_units"]
            best_state = snapshot(vae)
        if on_epoch is not None and on_epoch(metrics) == "stop":
            stopped_early = True
            break
        if patience is not None and epoch - best_epoch >= patience:
            plateaued = True
            break

    # --- final: the selected model on the test set ---------------------------------------------
    final = final_metrics(
        vae, best_state, data.test, cfg, device, history, (best_val, best_epoch, best_au),
        test=not stopped_early,
    )  # fmt: skip
    return TrainResult(
        metrics=final,
        history=history,
        epochs_run=len(history),
        best_epoch=best_epoch,
        stopped_early=stopped_early,
        plateaued=plateaued,
        best_state=best_state,
    )


# Every name this module defined before the split into trainers.{run_setup, optim, precision,
# steps, evaluation}; tests, benchmarks and the population trainer import them from here.
__all__ = [
    "EVAL_BATCH_SIZE",
    "EVAL_SEED_OFFSET",
    "VAEGAN_CHECKS",
    "VAEGAN_STEP_STATS",
    "VAE_CHECKS",
    "VAE_STEP_STATS",
    "Decision",
    "EpochMetrics",
    "LossFn",
    "OnEpoch",
    "TrainResult",
    "amp_context",
    "build_optimizer",
    "clip_gradients",
    "eval_generator",
    "evaluate",
    "final_metrics",
    "first_nonfinite",
    "load_training_data",
    "native_bf16",
    "param_groups",
    "parse_config",
    "resolve_device",
    "set_schedule",
    "snapshot",
    "train",
    "uses_bf16",
    "vae_epoch_values",
    "vae_loss_fn",
    "vae_step",
    "vae_step_stats",
    "vaegan_step",
    "validate",
]
