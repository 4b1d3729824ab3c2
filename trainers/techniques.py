"""The training techniques of ``trainers``, for your own training loop: a small public API.

Everything here is re-exported from the module that implements it (nothing is copied), so your
loop computes β(t), LR(t), free bits, active units and the IS-NLL exactly as the built-in trainer
and the service's search space mean them. Build the schedules from a leased trial's config::

    from trainers import techniques as tq

    cfg = tq.TrainConfig.from_mapping(trial.config)       # validated; LRs at the reference batch
    steps = len(train_loader)                             # optimizer steps per epoch
    kl, lr = tq.kl_schedule_from_config(cfg, steps), tq.lr_schedule_from_config(cfg, steps)
    for step in range(cfg.epochs * steps):
        beta = tq.kl_beta(step, kl)                       # KL weight of this step
        for group in optimizer.param_groups:
            group["lr"] = tq.learning_rate(step, lr)      # effective LR at cfg.batch_size
        kl_dims = tq.gaussian_kl_per_dim(mu, logvar)      # (N, latent_dim), nats
        kl_term, _ = tq.free_bits_kl(kl_dims, cfg.free_bits, cfg.free_bits_mode)
        loss = recon + beta * kl_term

Schedules — pure functions of the 0-based optimizer step (``trainers.schedules``):
  ``kl_beta(step, KLSchedule)``: constant, linear/cosine/sigmoid warm-up (Bowman et al. 2016;
  Sønderby et al. 2016), cyclical (Fu et al. 2019). ``learning_rate(step, LRSchedule)``:
  constant, step, exponential, CLR triangular/triangular2/exp_range (Smith 2017), cosine with
  restarts (Loshchilov & Hutter 2017), one-cycle (Smith & Topin 2017), times a linear warm-up
  (Goyal et al. 2017). ``beta1_at`` cycles Adam's β1 inversely to the LR.
  ``lr_scale_factor(batch, reference, rule)``: the linear (Goyal et al. 2017) or square-root
  (Malladi et al. 2022) rule; ``*_from_config`` apply it, so LRs come out effective.
Losses — nats per example (``trainers.losses``):
  ``gaussian_kl_per_dim`` (Kingma & Welling 2014, App. B), ``reconstruction_nll`` (Bernoulli
  logits or fixed-σ Gaussian), ``free_bits_kl`` (Kingma et al. 2016: clamp after the batch mean,
  per latent dim), ``elbo_terms`` (all of them by name, objective and true −ELBO side by side).
LR range test (Smith 2017, §3.3; ``trainers.lr_finder``):
  ``range_test(model, optimizer, train_step, start_lr=, end_lr=, num_iter=)`` on any model —
  ``train_step(i)`` does one update at the LR already set and returns the loss; the model and
  optimizer are restored afterwards. ``suggestions(curve.lrs, curve.smoothed, num_iter,
  start_lr)`` gives ``max_lr`` (fastai's valley) and ``base_lr`` (max/4).
Diagnostics (``trainers.metrics``):
  ``active_units(posterior_means, threshold)`` (Burda et al. 2016, §5.2, threshold 0.01);
  ``importance_sampled_nll(model, x, k=, likelihood=, gaussian_std=, generator=)`` (Burda et
  al. 2016, Eq. 8) for any model with ``encode(x) -> (mu, logvar)`` and ``decode(z) ->`` logits
  or means; ``posterior_collapse(kl, n_active, threshold)``.
"""

from trainers.config import TrainConfig
from trainers.losses import (
    ELBOTerms,
    elbo_terms,
    free_bits_kl,
    gaussian_kl_per_dim,
    reconstruction_nll,
)
from trainers.lr_finder import RangeTestCurve, range_test, suggestions
from trainers.metrics import (
    active_unit_variances,
    active_units,
    importance_sampled_nll,
    posterior_collapse,
)
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
    warmup_factor,
)

__all__ = [
    "ELBOTerms",
    "KLSchedule",
    "LRSchedule",
    "RangeTestCurve",
    "TrainConfig",
    "active_unit_variances",
    "active_units",
    "beta1_at",
    "elbo_terms",
    "epochs_to_steps",
    "free_bits_kl",
    "gaussian_kl_per_dim",
    "importance_sampled_nll",
    "kl_beta",
    "kl_schedule_from_config",
    "learning_rate",
    "lr_scale_factor",
    "lr_schedule_from_config",
    "posterior_collapse",
    "range_test",
    "reconstruction_nll",
    "suggestions",
    "warmup_factor",
]
