"""VAE and discriminator modules: shapes, mirroring, the reparameterisation, bad configs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainers.config import TrainConfig
from trainers.errors import ConfigError
from trainers.models import build_vae, conv_vae, discriminator, mlp_vae


def test_mlp_vae_decoder_mirrors_encoder() -> None:
    vae = mlp_vae(input_dim=64, hidden_sizes=(32, 16), latent_dim=4, act="gelu")
    enc = [
        (m.in_features, m.out_features) for m in vae.encoder.modules() if isinstance(m, nn.Linear)
    ]
    dec = [
        (m.in_features, m.out_features) for m in vae.decoder.modules() if isinstance(m, nn.Linear)
    ]
    assert enc == [(64, 32), (32, 16), (16, 8)]  # last layer: μ and log σ²
    assert dec == [(4, 16), (16, 32), (32, 64)]
    assert sum(isinstance(m, nn.GELU) for m in vae.decoder.modules()) == 2  # none after the output


def test_forward_uses_the_given_noise_for_the_reparameterisation() -> None:
    torch.manual_seed(0)
    vae = mlp_vae(input_dim=10, hidden_sizes=(8,), latent_dim=3, act="relu")
    x = torch.rand(5, 10)
    mu, logvar, out = vae(x, torch.zeros(5, 3))
    torch.testing.assert_close(out, vae.decode(mu))  # ε = 0 ⇒ z = μ
    eps = torch.ones(5, 3)
    _, _, shifted = vae(x, eps)
    torch.testing.assert_close(shifted, vae.decode(mu + torch.exp(0.5 * logvar)))
    assert out.shape == (5, 10) and mu.shape == logvar.shape == (5, 3)


@pytest.mark.parametrize("channels", [(4, 8), (4, 8, 8)])
def test_conv_vae_maps_28x28_images_to_flat_outputs(channels: tuple[int, ...]) -> None:
    vae = conv_vae((1, 28, 28), channels, latent_dim=5, act="elu")
    mu, logvar, out = vae(torch.rand(3, 784), torch.randn(3, 5))
    assert mu.shape == (3, 5) and out.shape == (3, 784)
    loss = out.sum() + mu.sum() + logvar.sum()
    loss.backward()  # every parameter takes part in the graph
    assert all(p.grad is not None for p in vae.parameters())


def test_conv_vae_rejects_images_that_are_not_28x28() -> None:
    with pytest.raises(ConfigError) as info:
        conv_vae((1, 8, 8), (4, 8), latent_dim=2, act="relu")
    assert info.value.field == "model"


def test_conv_vae_needs_two_downsampling_layers() -> None:
    with pytest.raises(ConfigError) as info:
        conv_vae((1, 28, 28), (4,), latent_dim=2, act="relu")
    assert info.value.field == "conv_channels"


def test_build_vae_picks_the_architecture_from_the_config() -> None:
    mlp = build_vae(TrainConfig(model="mlp", hidden_sizes=(8,)), (1, 28, 28))
    conv = build_vae(TrainConfig(model="conv", conv_channels=(4, 8)), (1, 28, 28))
    gan_small = build_vae(TrainConfig(model="vaegan", dataset="digits"), (1, 8, 8))
    assert not any(isinstance(m, nn.Conv2d) for m in mlp.modules())
    assert any(isinstance(m, nn.Conv2d) for m in conv.modules())
    assert not any(isinstance(m, nn.Conv2d) for m in gan_small.modules())  # 8×8: MLP body


@pytest.mark.parametrize(
    ("shape", "config"),
    [
        ((1, 28, 28), TrainConfig(model="vaegan", conv_channels=(4, 8))),
        ((1, 8, 8), TrainConfig(model="vaegan", dataset="digits", hidden_sizes=(16, 8))),
    ],
)
def test_discriminator_returns_logit_and_feature_layer(
    shape: tuple[int, int, int], config: TrainConfig
) -> None:
    disc = discriminator(config, shape)
    d = shape[0] * shape[1] * shape[2]
    logit, features = disc(torch.rand(6, d))
    assert logit.shape == (6,)
    assert features.ndim == 2 and features.shape[0] == 6
    torch.testing.assert_close(logit, disc.head(features).squeeze(-1))  # logit reads features
