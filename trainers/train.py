"""One training run of a VAE (MLP, conv) or a VAE-GAN: ``train(config, on_epoch) -> TrainResult``.

Read it top to bottom: setup, then for each epoch a loop over minibatches (schedules → forward →
backward → clip → step), then validation, reporting and model selection.

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
import re
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from trainers.config import TrainConfig
from trainers.data import Dataset, load_dataset
from trainers.errors import ConfigError, NonFiniteLossError
from trainers.losses import ELBOTerms, elbo_terms, gaussian_kl_per_dim, reconstruction_nll
from trainers.metrics import active_units, importance_sampled_nll, posterior_collapse
from trainers.models import VAE, VAEGAN, build_vae, discriminator
from trainers.schedules import (
    beta1_at,
    kl_beta,
    kl_schedule_from_config,
    learning_rate,
    lr_schedule_from_config,
)

Decision = Literal["continue", "stop"] | None


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch reports: scalar metrics by name, and the validation KL of each latent dim."""

    epoch: int  # 1-based
    values: dict[str, float]  # scalar metrics (names in the module docstring of `train`)
    kl_per_dim: list[float]  # validation KL per latent dim, nats per example


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


#: Eval batches are larger than training ones: no activations are kept for backward.
EVAL_BATCH_SIZE = 1024
#: Offset of the evaluation generator's seed: validation uses the same noise every epoch
#: (common random numbers), so epoch-to-epoch differences in −ELBO are the model's, not noise.
EVAL_SEED_OFFSET = 1_000_003

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


def train(
    config: TrainConfig | Mapping[str, Any],
    on_epoch: OnEpoch | None = None,
    *,
    patience: int | None = None,
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

    Raises ``ConfigError`` (invalid setting, naming the field) and ``NonFiniteLossError``
    (NaN/Inf loss or gradient norm, with the epoch and the first bad step).
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
    step = 0
    for epoch in range(1, cfg.epochs + 1):
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
        metrics = EpochMetrics(epoch=epoch, values=values, kl_per_dim=kl_per_dim)
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
    )


# --- the end of an epoch and of a run (shared with trainers.population) ------------------------


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


# --- setup helpers -------------------------------------------------------------------------------


def parse_config(config: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    """Validate a mapping into ``TrainConfig``; a pydantic error becomes ``ConfigError``.

    The field is the error's location, or for whole-model checks (``max_lr`` vs ``base_lr``)
    the first backticked name in the message.
    """
    if isinstance(config, TrainConfig):
        return config
    try:
        return TrainConfig.from_mapping(config)
    except ValidationError as e:
        errors = e.errors()
        first = errors[0]
        reason = str(first["msg"]).removeprefix("Value error, ")
        if first["loc"]:
            field = ".".join(str(part) for part in first["loc"])
        else:
            named = re.search(r"`([A-Za-z_][A-Za-z0-9_]*)`", reason)
            field = named.group(1) if named else "config"
        if len(errors) > 1:
            reason += f" (and {len(errors) - 1} more error(s))"
        raise ConfigError(field, reason) from e


def load_training_data(cfg: TrainConfig, device: torch.device) -> Dataset:
    """``load_dataset``, checked against the batch size (``ConfigError`` naming ``batch_size``)."""
    data = load_dataset(cfg, device)
    n_train = data.train.shape[0]
    if cfg.batch_size > n_train:
        raise ConfigError(
            "batch_size",
            f"larger than the training set of {cfg.dataset!r} ({cfg.batch_size} > {n_train})",
        )
    return data


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError("device", f"not a torch device: {name!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{name!r} requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError("device", f"unsupported device type {device.type!r} (cpu or cuda)")
    return device


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


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: a CUDA GPU that supports bf16
    (Ampere and newer), or a CPU with AVX512-BF16 or AMX. Elsewhere bf16 is emulated and slower
    than fp32, so ``amp="auto"`` leaves it off."""
    if device.type == "cuda":
        # Compute capability 8.0 (Ampere) brought bf16 tensor cores; older GPUs emulate it.
        return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        # torch.cpu's probes are underscored; a torch without them counts as no native bf16.
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)
    return False


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """``amp="bf16"``: always; ``"auto"``: where the device has native bf16 (chosen by
    measurement, docs/benchmarks.md: on an AVX512-BF16 CPU the MLP VAE trains 1.7–1.8× faster
    than in fp32 and reaches the same test −ELBO and IS-NLL within seed noise); ``"off"``:
    never."""
    return cfg.amp == "bf16" or (cfg.amp == "auto" and native_bf16(device))


def amp_context(
    cfg: TrainConfig, device: torch.device
) -> Callable[[], AbstractContextManager[Any]]:
    """bf16 autocast around the forward pass when ``uses_bf16``; else a no-op.

    bf16 keeps fp32's exponent range, so no loss scaling is needed (unlike fp16). Weights,
    optimizer state, losses and every evaluation stay fp32.
    """
    enabled = uses_bf16(cfg, device)
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def eval_generator(cfg: TrainConfig, device: torch.device) -> torch.Generator:
    """A fresh generator with a fixed seed: every evaluation draws the same posterior noise."""
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed + EVAL_SEED_OFFSET)
    return gen


# --- one optimizer step --------------------------------------------------------------------------


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


# --- evaluation ----------------------------------------------------------------------------------


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


__all__ = [
    "Decision",
    "EpochMetrics",
    "LossFn",
    "OnEpoch",
    "TrainResult",
    "build_optimizer",
    "evaluate",
    "param_groups",
    "parse_config",
    "resolve_device",
    "train",
    "vae_loss_fn",
]
