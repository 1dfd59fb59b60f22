"""Tests of the truncated stick-breaking weights against closed forms and SciPy."""

import math

import numpy as np
import pyro
import pytest
import torch
from scipy import integrate, stats
from torch.distributions import kl_divergence

from pyro_am.distributions import StickBreakingWeights
from pyro_am.distributions.stick_breaking import BetaStickBreaking

PRIORS = [(1.0, 5, 0.0), (0.3, 4, 0.0), (5.0, 6, 0.0), (1.0, 5, 0.4), (2.0, 3, 0.75)]


@pytest.mark.parametrize("concentration,truncation,discount", PRIORS)
def test_mean_matches_samples(concentration, truncation, discount, device):
    prior = StickBreakingWeights(
        torch.tensor(concentration, dtype=torch.float64, device=device), truncation, discount
    )
    num_samples = 200_000
    samples = prior.sample((num_samples,))
    # Five standard errors of the sample mean, from the closed-form variance.
    tolerance = 5 * (prior.variance / num_samples).sqrt()
    assert (samples.mean(0) - prior.mean).abs().le(tolerance).all()
    sample_variance = samples.var(0)
    assert torch.allclose(sample_variance, prior.variance, rtol=0.05, atol=1e-5)


@pytest.mark.parametrize("concentration,truncation,discount", PRIORS)
def test_samples_on_simplex(concentration, truncation, discount):
    samples = StickBreakingWeights(concentration, truncation, discount).sample((1000,))
    assert samples.shape == (1000, truncation)
    assert (samples >= 0).all()
    assert torch.allclose(samples.sum(-1), torch.ones(1000), atol=1e-5)


def test_stick_parameters_of_pitman_yor():
    prior = StickBreakingWeights(torch.tensor(2.0, dtype=torch.float64), 4, discount=0.25)
    expected0 = torch.tensor([2.25, 2.5, 2.75], dtype=torch.float64)
    assert torch.equal(prior.concentration1, torch.full((3,), 0.75, dtype=torch.float64))
    assert torch.allclose(prior.concentration0, expected0)


@pytest.mark.parametrize("a,b", [(1.0, 1.0), (0.5, 3.0), (4.0, 0.7)])
def test_truncation_two_is_beta(a, b):
    dist = BetaStickBreaking(
        torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)
    )
    grid = torch.linspace(0.01, 0.99, 17, dtype=torch.float64)
    weights = torch.stack([grid, 1 - grid], dim=-1)
    expected = stats.beta(a, b).logpdf(grid.numpy())
    np.testing.assert_allclose(dist.log_prob(weights).numpy(), expected, rtol=1e-10)


def _density_three(dist):
    def density(w2, w1):
        value = torch.tensor([w1, w2, 1 - w1 - w2], dtype=torch.float64)
        return math.exp(dist.log_prob(value).item())

    return density


@pytest.mark.parametrize("concentration,discount", [(1.0, 0.0), (3.0, 0.0), (2.0, 0.3)])
def test_truncation_three_density(concentration, discount):
    prior = StickBreakingWeights(torch.tensor(concentration, dtype=torch.float64), 3, discount)
    a, b = 1 - discount, [concentration + discount, concentration + 2 * discount]
    rng = np.random.default_rng(0)
    for w1, fraction in rng.uniform(0.05, 0.95, size=(10, 2)):
        w2 = fraction * (1 - w1)
        # p(w1, w2) = Beta(v1; a, b1) Beta(v2; a, b2) / (1 - w1) with v1 = w1, v2 = w2 / (1 - w1).
        expected = (
            stats.beta(a, b[0]).logpdf(w1)
            + stats.beta(a, b[1]).logpdf(w2 / (1 - w1))
            - math.log(1 - w1)
        )
        value = torch.tensor([w1, w2, 1 - w1 - w2], dtype=torch.float64)
        assert prior.log_prob(value).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("concentration,discount", [(1.0, 0.0), (3.0, 0.0), (2.0, 0.3)])
def test_truncation_three_integrates_to_one(concentration, discount):
    prior = StickBreakingWeights(torch.tensor(concentration, dtype=torch.float64), 3, discount)
    total, error = integrate.dblquad(
        _density_three(prior), 0, 1, 0, lambda w1: 1 - w1, epsabs=1e-5, epsrel=1e-5
    )
    # The density has integrable singularities at the boundary when a stick parameter is below
    # one (discount 0.3), and quadrature still reaches 1e-4.
    assert total == pytest.approx(1.0, abs=1e-4)


def test_truncation_two_integrates_to_one():
    prior = StickBreakingWeights(torch.tensor(2.5, dtype=torch.float64), 2)

    def density(w1):
        return math.exp(prior.log_prob(torch.tensor([w1, 1 - w1], dtype=torch.float64)).item())

    total, _ = integrate.quad(density, 0, 1)
    assert total == pytest.approx(1.0, abs=1e-8)


def test_truncation_one_is_point_mass():
    prior = StickBreakingWeights(1.0, 1)
    assert prior.event_shape == (1,)
    assert torch.equal(prior.sample((3,)), torch.ones(3, 1))
    assert prior.log_prob(torch.ones(1)).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("a", [1e-3, 1e-1, 1.0, 1e3])
@pytest.mark.parametrize("b", [1e-3, 1.0, 1e3])
def test_extreme_parameters_finite(a, b, dtype):
    truncation = 6
    concentration1 = torch.full((truncation - 1,), a, dtype=dtype, requires_grad=True)
    concentration0 = torch.full((truncation - 1,), b, dtype=dtype, requires_grad=True)
    guide = BetaStickBreaking(concentration1, concentration0)
    prior = StickBreakingWeights(torch.tensor(1.0, dtype=dtype), truncation)
    weights = guide.rsample((256,))
    assert torch.isfinite(weights).all()
    elbo = (prior.log_prob(weights) - guide.log_prob(weights)).mean()
    assert torch.isfinite(elbo)
    elbo.backward()
    assert torch.isfinite(concentration1.grad).all()
    assert torch.isfinite(concentration0.grad).all()


def test_near_boundary_weights_finite():
    prior = StickBreakingWeights(torch.tensor(1e-3, dtype=torch.float64), 4)
    value = torch.tensor([1 - 1e-300, 1e-300, 0.0, 0.0], dtype=torch.float64)
    assert torch.isfinite(prior.log_prob(value))


def test_kl_matches_monte_carlo():
    guide = BetaStickBreaking(
        torch.tensor([3.0, 2.0, 0.5], dtype=torch.float64),
        torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64),
    )
    prior = StickBreakingWeights(torch.tensor(1.5, dtype=torch.float64), 4, discount=0.2)
    samples = guide.sample((200_000,))
    log_ratio = guide.log_prob(samples) - prior.log_prob(samples)
    standard_error = log_ratio.std() / math.sqrt(len(samples))
    # Five standard errors of the Monte Carlo mean.
    assert abs(kl_divergence(guide, prior) - log_ratio.mean()) < 5 * standard_error


def test_entropy_and_expected_log_weights_match_monte_carlo():
    dist = BetaStickBreaking(
        torch.tensor([2.0, 0.7], dtype=torch.float64), torch.tensor([1.5, 3.0], dtype=torch.float64)
    )
    samples = dist.sample((200_000,))
    negative_log_density = -dist.log_prob(samples)
    error = 5 * negative_log_density.std() / math.sqrt(len(samples))
    assert abs(dist.entropy() - negative_log_density.mean()) < error
    log_weights = samples.log()
    errors = 5 * log_weights.std(0) / math.sqrt(len(samples))
    assert (dist.expected_log_weights() - log_weights.mean(0)).abs().le(errors).all()


def test_expand_and_batch_shape():
    prior = StickBreakingWeights(torch.tensor([1.0, 2.0]), 5)
    assert prior.batch_shape == (2,)
    assert prior.event_shape == (5,)
    expanded = prior.expand((3, 2))
    assert expanded.batch_shape == (3, 2)
    assert expanded.sample().shape == (3, 2, 5)
    assert isinstance(expanded, StickBreakingWeights)
    assert expanded.log_prob(prior.sample()).shape == (3, 2)
    assert torch.allclose(expanded.mean[2], prior.mean)


def test_validate_args_rejects_non_simplex():
    prior = StickBreakingWeights(1.0, 3, validate_args=True)
    with pytest.raises(ValueError):
        prior.log_prob(torch.tensor([0.5, 0.6, 0.1]))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"concentration": 0.0, "truncation": 3}, "concentration"),
        ({"concentration": -1.0, "truncation": 3}, "concentration"),
        ({"concentration": 1.0, "truncation": 0}, "truncation"),
        ({"concentration": 1.0, "truncation": 3, "discount": 1.0}, "discount"),
        ({"concentration": 1.0, "truncation": 3, "discount": -0.1}, "discount"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        StickBreakingWeights(**kwargs)


def test_svi_matches_conjugate_posterior():
    # The posterior of the sticks given category counts n_k is Beta(1 + n_k, alpha + sum_{j>k}
    # n_j), which lies in the guide family. After 1000 Adam steps with a learning rate decaying
    # to 0.0025 the guide's mean weights are within 0.02 of the exact posterior mean (posterior
    # standard deviations are about 0.03).
    alpha = 1.0
    true_weights = torch.tensor([0.6, 0.3, 0.1])
    data = torch.distributions.Categorical(true_weights).sample((300,))
    counts = torch.bincount(data, minlength=3).double()
    exact = BetaStickBreaking(1 + counts[:2], alpha + counts.flip(0).cumsum(0).flip(0)[1:])
    positive = pyro.distributions.constraints.positive

    def model():
        prior = StickBreakingWeights(torch.tensor(alpha, dtype=torch.float64), 3)
        weights = pyro.sample("weights", prior)
        with pyro.plate("data", len(data)):
            pyro.sample("obs", pyro.distributions.Categorical(weights), obs=data)

    def guide():
        a = pyro.param("a", torch.ones(2, dtype=torch.float64), constraint=positive)
        b = pyro.param("b", torch.ones(2, dtype=torch.float64), constraint=positive)
        pyro.sample("weights", BetaStickBreaking(a, b))

    svi = pyro.infer.SVI(
        model,
        guide,
        pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.997}),
        pyro.infer.Trace_ELBO(num_particles=2),
    )
    for _ in range(1000):
        svi.step()
    posterior = BetaStickBreaking(pyro.param("a").detach(), pyro.param("b").detach())
    assert torch.allclose(posterior.mean, exact.mean, atol=0.02)


def test_truncation_one_moments():
    prior = StickBreakingWeights(torch.tensor(1.0, dtype=torch.float64), 1)
    assert torch.equal(prior.mean, torch.ones(1, dtype=torch.float64))
    assert torch.equal(prior.variance, torch.zeros(1, dtype=torch.float64))
    assert torch.equal(prior.expected_log_weights(), torch.zeros(1, dtype=torch.float64))
