"""Active units (Burda et al. 2016), importance-sampled NLL, and the collapse flag."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainers.losses import elbo_terms
from trainers.metrics import (
    active_units,
    importance_sampled_nll,
    posterior_collapse,
    posterior_means,
)
from trainers.models import VAE, mlp_vae


def _linear_encoder_vae(input_dim: int, latent_dim: int, informative: int, scale: float) -> VAE:
    """μ_u(x) = scale·x_u for the first `informative` dims, constant elsewhere; log σ² = 0."""
    encoder = nn.Linear(input_dim, 2 * latent_dim)
    decoder = nn.Linear(latent_dim, input_dim)
    with torch.no_grad():
        encoder.weight.zero_()
        encoder.bias.fill_(0.3)  # constant offsets do not make a unit active
        for u in range(informative):
            encoder.weight[u, u] = scale
    return VAE(encoder, decoder, latent_dim)


def test_active_units_counts_only_dims_whose_mean_depends_on_x() -> None:
    vae = _linear_encoder_vae(input_dim=10, latent_dim=8, informative=3, scale=1.0)
    x = torch.rand(500, 10, generator=torch.Generator().manual_seed(0))
    means = posterior_means(vae, x, batch_size=128)
    assert means.shape == (500, 8)
    assert active_units(means, threshold=0.01).item() == 3


def test_active_units_respects_the_threshold() -> None:
    # Var(0.2·U(0,1)) = 0.04/12 ≈ 0.0033 < 0.01: informative but below Burda's threshold.
    vae = _linear_encoder_vae(input_dim=10, latent_dim=8, informative=3, scale=0.2)
    x = torch.rand(500, 10, generator=torch.Generator().manual_seed(0))
    means = posterior_means(vae, x)
    assert active_units(means, threshold=0.01).item() == 0
    assert active_units(means, threshold=0.001).item() == 3


def _linear_gaussian_vae(w: torch.Tensor, b: torch.Tensor) -> VAE:
    """Decoder x = W z + b; the encoder returns the prior (μ = 0, log σ² = 0) for every x."""
    latent_dim, input_dim = w.shape[1], w.shape[0]
    encoder = nn.Linear(input_dim, 2 * latent_dim)
    decoder = nn.Linear(latent_dim, input_dim)
    with torch.no_grad():
        encoder.weight.zero_()
        encoder.bias.zero_()
        decoder.weight.copy_(w)
        decoder.bias.copy_(b)
    return VAE(encoder, decoder, latent_dim)


def test_is_nll_converges_to_the_exact_marginal_of_a_linear_gaussian_model() -> None:
    # p(z) = N(0, 1), p(x|z) = N(Wz + b, σ²I) ⇒ p(x) = N(b, WWᵀ + σ²I) in closed form.
    w, b, sigma = torch.tensor([[1.0], [0.5]]), torch.tensor([0.2, -0.1]), 0.8
    vae = _linear_gaussian_vae(w, b)
    x = torch.tensor([[0.5, 0.3], [-1.0, 0.4], [1.5, 1.0]])
    marginal = torch.distributions.MultivariateNormal(b, w @ w.T + sigma**2 * torch.eye(2))
    exact = -marginal.log_prob(x)
    estimate = importance_sampled_nll(
        vae, x, k=5000, likelihood="gaussian", gaussian_std=sigma,
        generator=torch.Generator().manual_seed(0), rows_per_chunk=1000,  # forces chunking
    )  # fmt: skip
    torch.testing.assert_close(estimate, exact, atol=0.02, rtol=0.0)


def test_is_nll_is_tighter_than_the_elbo_on_average() -> None:
    torch.manual_seed(0)
    vae = mlp_vae(input_dim=12, hidden_sizes=(16,), latent_dim=3, act="tanh")
    x = torch.rand(32, 12, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        mu, logvar = vae.encode(x)
        elbos = []
        for _ in range(200):  # average many one-sample −ELBOs: E_q[−log w]
            z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=gen)
            terms = elbo_terms(
                vae.decode(z), x, mu, logvar, beta=1.0, likelihood="bernoulli", gaussian_std=1.0
            )
            elbos.append(terms.neg_elbo.item())
    neg_elbo = sum(elbos) / len(elbos)
    nll_1 = importance_sampled_nll(
        vae, x, k=1, likelihood="bernoulli", gaussian_std=1.0, generator=gen
    ).mean()
    nll_100 = importance_sampled_nll(
        vae, x, k=100, likelihood="bernoulli", gaussian_std=1.0, generator=gen
    ).mean()
    assert nll_1.item() == pytest.approx(neg_elbo, abs=0.3)  # k = 1 is the ELBO
    assert nll_100.item() < neg_elbo - 0.01  # Burda et al. 2016, Thm 1: the bound tightens


def test_is_nll_with_k_5000_decodes_in_bounded_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Memory is bounded by the rows decoded at once, whatever k and the number of examples.
    torch.manual_seed(0)
    vae = mlp_vae(input_dim=6, hidden_sizes=(8,), latent_dim=2, act="tanh")
    x = torch.rand(7, 6, generator=torch.Generator().manual_seed(1))
    rows: list[int] = []
    real_decode = VAE.decode

    def counting(self: VAE, z: torch.Tensor) -> torch.Tensor:
        rows.append(z.shape[0])
        return real_decode(self, z)

    monkeypatch.setattr(VAE, "decode", counting)
    nll = importance_sampled_nll(
        vae, x, k=5000, likelihood="bernoulli", gaussian_std=1.0,
        generator=torch.Generator().manual_seed(2), rows_per_chunk=2048,
    )  # fmt: skip
    assert max(rows) <= 2048
    assert sum(rows) == 7 * 5000  # every example got all k samples
    assert nll.shape == (7,) and bool(torch.isfinite(nll).all())


def test_is_nll_rejects_zero_samples() -> None:
    vae = mlp_vae(4, (4,), 2, "relu")
    with pytest.raises(ValueError, match="`k`"):
        importance_sampled_nll(
            vae, torch.rand(2, 4), k=0, likelihood="bernoulli", gaussian_std=1.0,
            generator=torch.Generator(),
        )  # fmt: skip


@pytest.mark.parametrize(
    ("kl", "n_active", "collapsed"),
    [(0.05, 4, True), (3.0, 0, True), (3.0, 4, False), (0.1, 1, False)],
)
def test_posterior_collapse_flag(kl: float, n_active: int, collapsed: bool) -> None:
    assert posterior_collapse(kl, n_active, kl_threshold=0.1) is collapsed


def test_active_unit_variances_are_unbiased_and_the_threshold_is_strict() -> None:
    """Var over examples with Bessel's correction (N − 1), and A_u = #{Var > δ} with a strict
    inequality (Burda et al. 2016, §5.2); values chosen exactly representable in fp32."""
    from trainers.metrics import active_unit_variances

    means = torch.tensor([[0.0, 1.0, 2.0], [0.0, 3.0, 2.0], [0.0, 1.0, 6.0], [0.0, 3.0, 6.0]])
    variances = active_unit_variances(means)  # column sums of squares 0, 4, 16 over N − 1 = 3
    torch.testing.assert_close(variances, torch.tensor([0.0, 4.0 / 3.0, 16.0 / 3.0]))
    exact = torch.tensor([[0.0], [2.0]])  # variance exactly 2.0
    assert active_units(exact, 2.0).item() == 0 and active_units(exact, 1.999).item() == 1


@pytest.mark.parametrize(("k", "rows_per_chunk"), [(10, 32), (3, 1), (4, 2)])
def test_is_nll_chunks_hold_the_row_bound_and_cover_each_example_once(
    k: int, rows_per_chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several examples per chunk (10 samples in 32 rows: 3 examples), and the bound down to
    one row at a time: never more rows decoded at once, every example exactly k samples, one
    estimate per example in order (the same chunking's estimates of the same examples)."""
    torch.manual_seed(0)
    vae = mlp_vae(input_dim=6, hidden_sizes=(8,), latent_dim=2, act="tanh")
    x = torch.rand(7, 6, generator=torch.Generator().manual_seed(1))
    rows: list[int] = []
    real_decode = VAE.decode

    def counting(self: VAE, z: torch.Tensor) -> torch.Tensor:
        rows.append(z.shape[0])
        return real_decode(self, z)

    monkeypatch.setattr(VAE, "decode", counting)

    def nll(data: torch.Tensor) -> torch.Tensor:
        return importance_sampled_nll(
            vae, data, k=k, likelihood="bernoulli", gaussian_std=1.0,
            generator=torch.Generator().manual_seed(2), rows_per_chunk=rows_per_chunk,
        )  # fmt: skip

    all_at_once = nll(x)
    assert max(rows) <= rows_per_chunk
    assert sum(rows) == 7 * k
    assert all_at_once.shape == (7,) and bool(torch.isfinite(all_at_once).all())
    # the first chunk's examples alone get the same estimates (same generator, same chunks)
    first = max(1, rows_per_chunk // k)
    torch.testing.assert_close(nll(x[:first]), all_at_once[:first])


def test_is_nll_refuses_zero_samples_naming_the_count() -> None:
    vae = mlp_vae(4, (4,), 2, "relu")
    with pytest.raises(ValueError) as caught:
        importance_sampled_nll(
            vae, torch.rand(2, 4), k=0, likelihood="bernoulli", gaussian_std=1.0,
            generator=torch.Generator(),
        )  # fmt: skip
    assert str(caught.value) == "`k` must be at least 1 (got 0)"
