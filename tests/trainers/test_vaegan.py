"""VAE-GAN (Larsen et al. 2016): three optimizers, restricted backward passes, the skip rule."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from trainers import train as train_module
from trainers.config import TrainConfig
from trainers.losses import gaussian_kl_per_dim
from trainers.models import VAE, Discriminator, build_vae, discriminator
from trainers.schedules import learning_rate, lr_schedule_from_config
from trainers.train import train, vaegan_step

GAN: dict[str, Any] = {
    "dataset": "digits",
    "model": "vaegan",
    "hidden_sizes": (32, 16),
    "latent_dim": 3,
    "epochs": 2,
    "batch_size": 128,
    "kl_warmup_epochs": 1.0,
    "final_is_samples": 0,
}


def _parts(cfg: TrainConfig) -> tuple[VAE, Discriminator]:
    torch.manual_seed(0)
    return build_vae(cfg, (1, 8, 8)), discriminator(cfg, (1, 8, 8))


def _step(
    cfg: TrainConfig, vae: VAE, disc: Discriminator, optimizers: list[torch.optim.Optimizer]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ``vaegan_step`` on a fixed batch; returns (stats, x, ε, ε_prior)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(16, 64, generator=gen)
    eps, eps_prior = torch.randn(16, 3, generator=gen), torch.randn(16, 3, generator=gen)
    stats, _ = vaegan_step(
        vae, disc, vae, x, eps, eps_prior, 1.0, cfg, optimizers, contextlib.nullcontext
    )
    return stats, x, eps, eps_prior


def test_each_backward_reaches_only_its_own_parameters() -> None:
    cfg = TrainConfig.model_validate({**GAN, "gan_margin": 100.0, "gan_gamma": 0.3})  # no skips
    vae, disc = _parts(cfg)
    # lr = 0: parameters stay put, so the gradients left behind can be recomputed exactly.
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.SGD(m.parameters(), lr=0.0) for m in (vae.encoder, vae.decoder, disc)
    ]
    _, x, eps, eps_prior = _step(cfg, vae, disc, optimizers)

    mu, logvar, out = vae(x, eps)
    logit_real, feat_real = disc(x)
    logit_recon, feat_recon = disc(torch.sigmoid(out))
    logit_prior, _ = disc(torch.sigmoid(vae.decode(eps_prior)))
    feature = 0.5 * (feat_recon - feat_real).pow(2).sum(-1).mean()
    ones, zeros = torch.ones(16), torch.zeros(16)
    bce = F.binary_cross_entropy_with_logits
    disc_loss = bce(logit_real, ones) + bce(logit_recon, zeros) + bce(logit_prior, zeros)
    gen_loss = bce(logit_recon, ones) + bce(logit_prior, ones)
    kl = gaussian_kl_per_dim(mu, logvar).sum(-1).mean()
    expected = {
        "encoder": (kl + feature, list(vae.encoder.parameters())),
        "decoder": (0.3 * feature + gen_loss, list(vae.decoder.parameters())),
        "discriminator": (disc_loss, list(disc.parameters())),
    }
    for name, (loss, params) in expected.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        for p, g in zip(params, grads, strict=True):
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, g, msg=f"{name} gradient mixes in another loss")


@pytest.mark.parametrize(
    ("equilibrium", "frozen", "trained"),
    [
        (0.1, "decoder", "discriminator"),  # BCE ≈ ln 2 > 0.1: decoder is "losing", skip it
        (5.0, "discriminator", "decoder"),  # BCE ≈ ln 2 < 5: discriminator "winning", skip it
    ],
)
def test_equilibrium_rule_skips_updates_on_the_device(
    equilibrium: float, frozen: str, trained: str
) -> None:
    cfg = TrainConfig.model_validate({**GAN, "gan_equilibrium": equilibrium, "gan_margin": 0.0})
    vae, disc = _parts(cfg)
    modules = {"encoder": vae.encoder, "decoder": vae.decoder, "discriminator": disc}
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in modules.items()}
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.Adam(m.parameters(), lr=1e-2) for m in modules.values()
    ]
    stats, *_ = _step(cfg, vae, disc, optimizers)

    def changed(name: str) -> bool:
        now = list(modules[name].parameters())
        return any(not torch.equal(a, b) for a, b in zip(before[name], now, strict=True))

    assert not changed(frozen)
    assert changed(trained) and changed("encoder")
    names = train_module.VAEGAN_STEP_STATS
    skipped = {"decoder": "dec_skipped", "discriminator": "disc_skipped"}
    assert stats[names.index(skipped[frozen])].item() == 1.0
    assert stats[names.index(skipped[trained])].item() == 0.0


def test_vaegan_trains_with_three_optimizers_and_reports_gan_metrics(
    monkeypatch: pytest.MonkeyPatch, train_device: str
) -> None:
    built: list[torch.optim.Optimizer] = []
    original = train_module.build_optimizer

    def counting(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(train_module, "build_optimizer", counting)
    config = {
        **GAN,
        "device": train_device,
        "base_lr": 1e-3,
        "decoder_lr": 2e-3,
        "disc_lr": 5e-4,
        "batch_size": 64,
    }
    result = train(config)
    assert len(built) == 3
    values = result.metrics
    for name in ("disc_loss", "gen_loss", "feature_recon", "val_neg_elbo", "test_neg_elbo"):
        assert values[name] > 0, name
    for name in ("disc_skip_fraction", "dec_skip_fraction", "clip_fraction"):
        assert 0.0 <= values[name] <= 1.0, name
    assert values["disc_grad_norm_max"] >= values["disc_grad_norm_mean"] > 0

    cfg = TrainConfig.model_validate(config)
    steps = 1437 // 64
    last = 2 * steps - 1
    for metric, base in (("lr", None), ("decoder_lr", 2e-3), ("disc_lr", 5e-4)):
        expected = learning_rate(last, lr_schedule_from_config(cfg, steps, base_lr=base))
        assert values[metric] == pytest.approx(expected), metric
    assert values["decoder_lr"] == pytest.approx(4 * values["disc_lr"])


def test_conv_vaegan_runs_on_28x28_images_and_is_deterministic(train_device: str) -> None:
    config = {
        **GAN, "device": train_device, "dataset": "synthetic", "synthetic_size": 64,
        "conv_channels": (4, 8), "batch_size": 16, "epochs": 1, "active_unit_examples": 6,
    }  # fmt: skip
    a, b = train(config), train(config)
    timing = {"samples_per_sec", "epoch_seconds", "final_eval_seconds"}
    assert {k: v for k, v in a.metrics.items() if k not in timing} == {
        k: v for k, v in b.metrics.items() if k not in timing
    }
    assert a.metrics["disc_loss"] > 0
