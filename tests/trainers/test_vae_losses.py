"""ELBO terms: analytic KL, likelihoods with their constants, and the three free-bits modes."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.losses import (
    elbo_terms,
    free_bits_kl,
    gaussian_kl_per_dim,
    member_free_bits_kl,
    reconstruction_nll,
)


def test_analytic_kl_matches_monte_carlo_estimate() -> None:
    gen = torch.Generator().manual_seed(0)
    mu = torch.tensor([[0.0, 1.5, -0.7]], dtype=torch.float64)
    logvar = torch.tensor([[0.0, -1.0, 0.8]], dtype=torch.float64)
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn(400_000, 3, generator=gen, dtype=torch.float64)
    q = torch.distributions.Normal(mu, std)
    p = torch.distributions.Normal(0.0, 1.0)
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    analytic = gaussian_kl_per_dim(mu, logvar)[0]
    assert analytic[0].item() == pytest.approx(0.0, abs=1e-12)  # q equals the prior
    torch.testing.assert_close(analytic, mc, atol=0.01, rtol=0.0)


def test_gaussian_nll_is_a_proper_density_in_nats() -> None:
    gen = torch.Generator().manual_seed(1)
    x, means = torch.rand(4, 6, generator=gen), torch.rand(4, 6, generator=gen)
    expected = -torch.distributions.Normal(means, 0.3).log_prob(x).sum(-1)
    torch.testing.assert_close(reconstruction_nll(means, x, "gaussian", 0.3), expected)


def test_bernoulli_nll_matches_the_bernoulli_log_likelihood() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.bernoulli(torch.full((5, 7), 0.5), generator=gen)
    logits = torch.randn(5, 7, generator=gen)
    expected = -torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
    torch.testing.assert_close(reconstruction_nll(logits, x, "bernoulli", 1.0), expected)


def _kl_grad(kl: torch.Tensor, free_bits: float, mode: str) -> torch.Tensor:
    kl = kl.clone().requires_grad_(True)
    objective, _ = free_bits_kl(kl, free_bits, mode)  # type: ignore[arg-type]
    (grad,) = torch.autograd.grad(objective, kl)
    return grad


def test_batch_mean_free_bits_zero_gradient_below_floor_unchanged_above() -> None:
    # Dim 0: batch mean 0.1 < λ (example 1 alone is above λ: the clamp is on the mean).
    # Dim 1: batch mean 0.9 > λ.
    kl = torch.tensor([[0.0, 0.8], [0.2, 1.0]])
    grad = _kl_grad(kl, 0.15, "batch_mean_per_group")
    unclamped = _kl_grad(kl, 0.0, "batch_mean_per_group")
    assert torch.equal(grad[:, 0], torch.zeros(2))
    assert torch.equal(grad[:, 1], unclamped[:, 1])
    assert torch.equal(unclamped, torch.full((2, 2), 0.5))  # d mean_b Σ_j KL_bj / d KL_bj


def test_per_example_free_bits_clamps_each_example_separately() -> None:
    kl = torch.tensor([[0.0, 0.8], [0.2, 1.0]])
    grad = _kl_grad(kl, 0.15, "per_example_per_group")
    assert torch.equal(grad, torch.tensor([[0.0, 0.5], [0.5, 0.5]]))
    _, floor = free_bits_kl(kl, 0.15, "per_example_per_group")
    assert floor.item() == pytest.approx(0.5)  # one of four (example, dim) pairs, per example


def test_global_free_bits_clamps_the_total() -> None:
    kl = torch.tensor([[0.1, 0.1], [0.1, 0.1]])  # total 0.2 per example
    below = _kl_grad(kl, 0.2, "global")  # floor 0.4 > 0.2
    above = _kl_grad(kl, 0.05, "global")  # floor 0.1 < 0.2
    assert torch.equal(below, torch.zeros(2, 2))
    assert torch.equal(above, torch.full((2, 2), 0.5))
    value, floor = free_bits_kl(kl, 0.2, "global")
    assert value.item() == pytest.approx(0.4)
    assert floor.item() == 2.0


@pytest.mark.parametrize("mode", ["batch_mean_per_group", "per_example_per_group", "global"])
def test_zero_free_bits_is_the_plain_kl(mode: str) -> None:
    kl = torch.tensor([[0.0, 0.8], [0.2, 1.0]])
    value, floor = free_bits_kl(kl, 0.0, mode)  # type: ignore[arg-type]
    assert value.item() == pytest.approx(1.0)
    assert floor.item() == 0.0


def test_floor_count_counts_dims_below_lambda() -> None:
    kl = torch.tensor([[0.0, 0.8, 0.1], [0.2, 1.0, 0.0]])
    value, floor = free_bits_kl(kl, 0.15, "batch_mean_per_group")
    assert floor.item() == 2.0
    assert value.item() == pytest.approx(0.15 + 0.9 + 0.15)


def test_elbo_terms_report_objective_and_true_neg_elbo_separately() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(8, 5, generator=gen)
    logits = torch.randn(8, 5, generator=gen)
    mu, logvar = 0.1 * torch.randn(8, 3, generator=gen), torch.zeros(8, 3)
    plain = elbo_terms(logits, x, mu, logvar, beta=1.0, likelihood="bernoulli", gaussian_std=1.0)
    annealed = elbo_terms(
        logits, x, mu, logvar, beta=0.25, likelihood="bernoulli", gaussian_std=1.0,
        free_bits=0.5, free_bits_mode="batch_mean_per_group",
    )  # fmt: skip
    assert annealed.neg_elbo.item() == pytest.approx(plain.neg_elbo.item())  # β, λ don't touch it
    assert plain.objective.item() == pytest.approx(plain.neg_elbo.item())
    assert annealed.kl_objective.item() == pytest.approx(1.5)  # every dim below 0.5 → 3·0.5
    assert annealed.objective.item() == pytest.approx(annealed.reconstruction.item() + 0.375)
    assert plain.kl_total.item() == pytest.approx(plain.kl_per_dim.sum().item())
    assert annealed.free_bits_floor_dims.item() == 3.0
    assert math.isclose(annealed.beta, 0.25)


# --- a population's stacked terms (issue 17: mutmut's survivors were all on this path) ---------


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_stacked_members_get_exactly_the_terms_each_gets_alone(likelihood: str) -> None:
    """K members stacked ``(K, N, ·)``, each with its own β, λ and mode (one with λ = 0), give
    the terms each member's own 2-D call gives. Shapes differ per axis (K=4, N=6, D=5, d=3) so a
    reduction over the wrong axis cannot coincide; the KLs straddle λ so every mode clamps some
    dims or examples and not others."""
    gen = torch.Generator().manual_seed(7)
    k, n, d, latent = 4, 6, 5, 3
    x = torch.rand(k, n, d, generator=gen)
    output = torch.randn(k, n, d, generator=gen)
    mu = torch.randn(k, n, latent, generator=gen)
    logvar = 0.5 * torch.randn(k, n, latent, generator=gen)
    betas = torch.tensor([1.0, 0.5, 0.25, 2.0])
    lams = torch.tensor([0.6, 0.4, 0.0, 1.5])
    modes = ["batch_mean_per_group", "per_example_per_group", "global", "global"]
    stacked = elbo_terms(
        output, x, mu, logvar, beta=betas, likelihood=likelihood, gaussian_std=0.7,  # type: ignore[arg-type]
        free_bits=lams, free_bits_mode=modes,  # type: ignore[arg-type]
    )  # fmt: skip
    for m in range(k):
        alone = elbo_terms(
            output[m], x[m], mu[m], logvar[m], beta=float(betas[m]), likelihood=likelihood,  # type: ignore[arg-type]
            gaussian_std=0.7, free_bits=float(lams[m]), free_bits_mode=modes[m],  # type: ignore[arg-type]
        )  # fmt: skip
        for name in ("objective", "neg_elbo", "reconstruction", "kl_total", "kl_objective",
                     "free_bits_floor_dims", "kl_per_dim"):  # fmt: skip
            torch.testing.assert_close(getattr(stacked, name)[m], getattr(alone, name), msg=name)
    # Not vacuous: some members sit at their floor, and the λ = 0 member is the plain KL.
    assert float(stacked.free_bits_floor_dims.sum()) > 0
    assert stacked.kl_objective[2] == stacked.kl_total[2]


def test_stacked_free_bits_kl_with_one_mode_matches_each_member_alone() -> None:
    gen = torch.Generator().manual_seed(11)
    kl = torch.rand(3, 6, 4, generator=gen)  # (K, N, d), each entry in [0, 1)
    lams = torch.tensor([0.3, 0.5, 0.7])
    for mode in ("batch_mean_per_group", "per_example_per_group", "global"):
        objective, floor = free_bits_kl(kl, lams, mode)  # type: ignore[arg-type]
        for m in range(3):
            alone = free_bits_kl(kl[m], float(lams[m]), mode)  # type: ignore[arg-type]
            torch.testing.assert_close(objective[m], alone[0], msg=mode)
            torch.testing.assert_close(floor[m], alone[1], msg=mode)


def test_the_default_free_bits_mode_is_batch_mean_per_group() -> None:
    gen = torch.Generator().manual_seed(5)
    x, logits = torch.rand(8, 5, generator=gen), torch.randn(8, 5, generator=gen)
    mu, logvar = 2.0 * torch.randn(8, 3, generator=gen), torch.zeros(8, 3)
    mu[:, 0] = 0.0  # dim 0 has KL 0, below λ; the others are far above it
    # batch-mean clamps dim 0 alone (+0.5); the global floor (1.5) is far below the total.
    common: dict = {"beta": 1.0, "likelihood": "bernoulli", "gaussian_std": 1.0, "free_bits": 0.5}
    default = elbo_terms(logits, x, mu, logvar, **common)
    explicit = elbo_terms(logits, x, mu, logvar, **common, free_bits_mode="batch_mean_per_group")
    other = elbo_terms(logits, x, mu, logvar, **common, free_bits_mode="per_example_per_group")
    assert default.kl_objective.item() == pytest.approx(explicit.kl_objective.item())
    assert default.kl_objective.item() != pytest.approx(other.kl_objective.item())
    fallen_through = elbo_terms(logits, x, mu, logvar, **common, free_bits_mode="global")
    assert default.kl_objective.item() != pytest.approx(fallen_through.kl_objective.item())


@pytest.mark.parametrize("mode", ["batch_mean_per_group", "per_example_per_group", "global"])
def test_a_kl_exactly_at_the_floor_is_not_counted_as_held_there(mode: str) -> None:
    """At KL = λ the clamp still passes the gradient (``clamp``'s is 1 at its bound), so the
    group is not held at the floor: the count, which reports "groups the floor holds", says 0
    — alone and stacked (a member with λ = 0 beside it). 0.5 is exact in fp32."""
    kl = torch.full((2, 2), 0.5, requires_grad=True)
    value, floor = free_bits_kl(kl, 0.5, mode)  # type: ignore[arg-type]
    (grad,) = torch.autograd.grad(value, kl)
    assert floor.item() == 0.0
    assert torch.equal(grad, torch.full((2, 2), 0.5))
    stacked = torch.full((2, 2, 2), 0.5)
    _, floors = member_free_bits_kl(stacked, torch.tensor([0.5, 0.0]), [mode, mode])  # type: ignore[list-item]
    assert floors.tolist() == [0.0, 0.0]
    # just above the floor's value, the same KL is held: counted (all 2 dims, or 2 per example)
    _, above = free_bits_kl(kl.detach(), 0.5001, mode)  # type: ignore[arg-type]
    assert above.item() == 2.0


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_elbo_terms_are_the_likelihood_s_nll_plus_the_analytic_kl(likelihood: str) -> None:
    """Against torch.distributions, per example then averaged (Kingma & Welling 2014, Eq. 3):
    reconstruction = −E log p(x|z) under the named likelihood, KL = KL(N(μ, σ²) ‖ N(0, I))."""
    gen = torch.Generator().manual_seed(13)
    x = torch.rand(6, 5, generator=gen)
    output = torch.randn(6, 5, generator=gen)
    mu, logvar = torch.randn(6, 3, generator=gen), 0.5 * torch.randn(6, 3, generator=gen)
    terms = elbo_terms(
        output, x, mu, logvar, beta=1.0, likelihood=likelihood,  # type: ignore[arg-type]
        gaussian_std=0.4,
    )  # fmt: skip
    if likelihood == "bernoulli":
        # x in [0, 1], not {0, 1}: the cross-entropy relaxation (losses.reconstruction_nll)
        bernoulli = torch.distributions.Bernoulli(logits=output, validate_args=False)
        log_lik = bernoulli.log_prob(x)
    else:
        log_lik = torch.distributions.Normal(output, 0.4).log_prob(x)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(terms.reconstruction, -log_lik.sum(-1).mean())
    torch.testing.assert_close(terms.kl_total, kl.mean())
    torch.testing.assert_close(terms.neg_elbo, -log_lik.sum(-1).mean() + kl.mean())


def test_per_member_modes_without_a_tensor_of_lambdas_are_refused() -> None:
    kl_input = torch.zeros(2, 3, 4)
    with pytest.raises(TypeError, match=r"^per-member free-bits modes need a \(K,\) tensor of λ$"):
        elbo_terms(
            kl_input, kl_input, kl_input[..., :2], kl_input[..., :2], beta=1.0,
            likelihood="bernoulli", gaussian_std=1.0, free_bits=0.5,
            free_bits_mode=["global", "global"],
        )  # fmt: skip


def test_free_bits_reduce_dims_then_examples_when_they_differ_in_number() -> None:
    """N = 3 examples, d = 2 dims (unequal, so summing over the wrong axis shows), λ = 0.3 and
    0.4, values worked by hand (VAE_DEFINITIONS §3.2)."""
    kl = torch.tensor([[0.0, 0.9], [0.2, 0.4], [0.6, 0.1]])
    # per example: rows clamp to 0.3+0.9, 0.3+0.4, 0.6+0.3 → mean 2.8/3; one pair below λ each
    value, floor = free_bits_kl(kl, 0.3, "per_example_per_group")
    assert value.item() == pytest.approx(2.8 / 3) and floor.item() == pytest.approx(1.0)
    # global: totals 0.9, 0.6, 0.7 → mean 2.2/3 ≈ 0.733, under the floor λ·d = 0.8: clamped,
    # and all d dims count as held
    value, floor = free_bits_kl(kl, 0.4, "global")
    assert value.item() == pytest.approx(0.8) and floor.item() == 2.0
    value, floor = free_bits_kl(kl, 0.3, "global")  # floor 0.6 < 0.733: not clamped
    assert value.item() == pytest.approx(2.2 / 3) and floor.item() == 0.0


def test_a_stack_without_free_bits_gives_one_value_per_member() -> None:
    kl = torch.rand(4, 6, 3, generator=torch.Generator().manual_seed(17))
    value, floor = free_bits_kl(kl, 0.0, "batch_mean_per_group")
    assert value.shape == floor.shape == (4,)
    torch.testing.assert_close(value, kl.sum(-1).mean(-1))
