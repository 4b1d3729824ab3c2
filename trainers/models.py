"""VAE modules: MLP and convolutional VAEs, and the VAE-GAN discriminator.

Every VAE has a diagonal-Gaussian posterior q(z|x) = N(μ, diag σ²) (encoder returns μ and
log σ²) and a standard-normal prior p(z) = N(0, I) (Kingma & Welling 2014, §3). The decoder
returns, per pixel, Bernoulli **logits** or Gaussian **means** (the Gaussian σ is fixed by the
config), always flattened to ``(N, D)`` so the losses never care about the architecture.

The noise ε of the reparameterisation z = μ + σ·ε is an *argument* of ``forward`` so the loop
draws it from its own seeded ``torch.Generator`` (determinism) and the module stays a pure
function that ``torch.compile`` can trace without graph breaks.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn

from trainers.config import TrainConfig
from trainers.errors import ConfigError

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
}


def activation(name: str) -> nn.Module:
    """A fresh activation module by its config name."""
    return _ACTIVATIONS[name]()


def _mlp(sizes: list[int], act: str) -> nn.Sequential:
    """Linear layers with an activation between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(activation(act))
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """An encoder to (μ, log σ²) and a decoder to per-pixel likelihood parameters."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, latent_dim: int) -> None:
        super().__init__()
        self.encoder = encoder  # x (N, D) → (N, 2·latent_dim): μ then log σ²
        self.decoder = decoder  # z (N, latent_dim) → (N, D)
        self.latent_dim = latent_dim

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters ``(mu, logvar)``, each ``(N, latent_dim)``."""
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters ``(N, D)``: logits (Bernoulli) or means (Gaussian)."""
        out: torch.Tensor = self.decoder(z)
        return out

    def forward(
        self, x: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mu, logvar, decoder_output)``; z = μ + σ·ε (Kingma & Welling 2014, §2.4)."""
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * eps
        return mu, logvar, self.decode(z)


def mlp_vae(input_dim: int, hidden_sizes: tuple[int, ...], latent_dim: int, act: str) -> VAE:
    """MLP VAE; the decoder mirrors the encoder's hidden sizes."""
    encoder = _mlp([input_dim, *hidden_sizes, 2 * latent_dim], act)
    decoder = _mlp([latent_dim, *reversed(hidden_sizes), input_dim], act)
    return VAE(encoder, decoder, latent_dim)


def _conv_stack(
    image_shape: tuple[int, int, int], channels: tuple[int, ...], act: str
) -> tuple[nn.Sequential, tuple[int, int, int]]:
    """Convolutions that halve 28×28 twice (stride 2) then keep 7×7 (stride 1).

    Returns the stack and its output shape (C, H, W).
    """
    c, h, w = image_shape
    if (h, w) != (28, 28):
        raise ConfigError("model", f"convolutional models need 28×28 images, got {h}×{w}")
    layers: list[nn.Module] = []
    for i, c_out in enumerate(channels):
        if i < 2:  # 28 → 14 → 7
            layers += [nn.Conv2d(c, c_out, kernel_size=4, stride=2, padding=1), activation(act)]
            h, w = h // 2, w // 2
        else:
            layers += [nn.Conv2d(c, c_out, kernel_size=3, stride=1, padding=1), activation(act)]
        c = c_out
    return nn.Sequential(*layers), (c, h, w)


def conv_vae(
    image_shape: tuple[int, int, int], channels: tuple[int, ...], latent_dim: int, act: str
) -> VAE:
    """Convolutional VAE for 28×28 images; the decoder mirrors the encoder with transposed convs."""
    if len(channels) < 2:  # two stride-2 layers take 28×28 to 7×7; the mirror needs both
        raise ConfigError("conv_channels", "needs at least 2 layers (28×28 → 7×7)")
    convs, (c, h, w) = _conv_stack(image_shape, channels, act)
    encoder = nn.Sequential(
        nn.Unflatten(1, image_shape), convs, nn.Flatten(), nn.Linear(c * h * w, 2 * latent_dim)
    )
    # Mirror: undo the stride-1 layers, then the two stride-2 layers, ending at the image's C.
    outs = [*reversed(channels[:-1]), image_shape[0]]
    layers: list[nn.Module] = [nn.Linear(latent_dim, c * h * w), activation(act)]
    layers.append(nn.Unflatten(1, (c, h, w)))
    for j, c_out in enumerate(outs):
        i = len(channels) - 1 - j  # index of the encoder layer this one undoes
        if i < 2:
            layers.append(nn.ConvTranspose2d(c, c_out, kernel_size=4, stride=2, padding=1))
        else:
            layers.append(nn.Conv2d(c, c_out, kernel_size=3, stride=1, padding=1))
        if j < len(outs) - 1:
            layers.append(activation(act))
        c = c_out
    layers.append(nn.Flatten())
    return VAE(encoder, nn.Sequential(*layers), latent_dim)


class Discriminator(nn.Module):
    """VAE-GAN discriminator (Larsen et al. 2016): a real/fake logit and the features Dis_l(x).

    ``features`` is the layer whose Gaussian likelihood replaces the pixel-wise reconstruction
    error (Larsen et al. 2016, Eq. 7): ``(N, F)``.
    """

    def __init__(self, body: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.body = body  # x (N, D) → features (N, F)
        self.head = nn.Linear(feature_dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logit (N,), features (N, F))``."""
        features = self.body(x)
        return self.head(features).squeeze(-1), features


def discriminator(config: TrainConfig, image_shape: tuple[int, int, int]) -> Discriminator:
    """Convolutional on 28×28 images (as in Larsen et al.), an MLP on anything else."""
    act = config.activation
    if image_shape[1:] == (28, 28):
        convs, (c, h, w) = _conv_stack(image_shape, config.conv_channels, act)
        body: nn.Module = nn.Sequential(nn.Unflatten(1, image_shape), convs, nn.Flatten())
        return Discriminator(body, c * h * w)
    input_dim = image_shape[0] * image_shape[1] * image_shape[2]
    sizes = [input_dim, *config.hidden_sizes]
    body = nn.Sequential(_mlp(sizes, act), activation(act))
    return Discriminator(body, sizes[-1])


class VAEGAN(nn.Module):
    """A VAE (encoder + decoder = generator) and a discriminator, each with its own optimizer."""

    def __init__(self, vae: VAE, disc: Discriminator) -> None:
        super().__init__()
        self.vae = vae
        self.discriminator = disc


def build_vae(config: TrainConfig, image_shape: tuple[int, int, int]) -> VAE:
    """The VAE of ``config.model``; a VAE-GAN's generator is conv on 28×28 images, else MLP."""
    input_dim = image_shape[0] * image_shape[1] * image_shape[2]
    use_conv = config.model == "conv" or (config.model == "vaegan" and image_shape[1:] == (28, 28))
    if use_conv:
        return conv_vae(image_shape, config.conv_channels, config.latent_dim, config.activation)
    return mlp_vae(input_dim, config.hidden_sizes, config.latent_dim, config.activation)
