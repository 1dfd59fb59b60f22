"""VonMisesFisher against scipy.stats.vonmises_fisher (SciPy >= 1.11) and closed forms."""

import math

import numpy as np
import pyro
import pytest
import scipy.special as sp
import torch
from pyro.distributions import constraints
from scipy import stats
from scipy.optimize import brentq

from pyro_am.distributions.von_mises_fisher import VonMisesFisher, log_vmf_normalizer

DIMS = [2, 3, 10, 100]
KAPPAS = [0.01, 1.0, 10.0, 1000.0]
NUM_DRAWS = 20_000
# Two-sample KS tests at family-wise level 0.001, Bonferroni-corrected over the 16 grid cells.
KS_ALPHA = 0.001 / (len(DIMS) * len(KAPPAS))


def _unit(dim, seed, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(dim, dtype=torch.float64, generator=generator)
    return (direction / direction.norm()).to(device)


def _mean_resultant_length(dim, kappa):
    return sp.ive(dim / 2, kappa) / sp.ive(dim / 2 - 1, kappa)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("kappa", KAPPAS + [1e4])
def test_log_prob_matches_scipy(dim, kappa):
    loc = _unit(dim, seed=dim)
    reference = stats.vonmises_fisher(loc.numpy(), kappa)
    points = torch.as_tensor(reference.rvs(50, random_state=1))
    points = torch.cat([points, -loc.unsqueeze(0), loc.unsqueeze(0)])
    ours = VonMisesFisher(loc, torch.tensor(kappa, dtype=torch.float64)).log_prob(points)
    # Float64 throughout; the Bessel function is accurate to about 1e-13 relative.
    np.testing.assert_allclose(ours.numpy(), reference.logpdf(points.numpy()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dim", DIMS)
def test_zero_concentration_is_uniform(dim):
    loc = _unit(dim, seed=0)
    points = torch.stack([loc, -loc])
    ours = VonMisesFisher(loc, torch.tensor(0.0, dtype=torch.float64)).log_prob(points)
    # The uniform density is one over the surface area 2 pi^(D/2) / Gamma(D/2).
    log_area = math.log(2) + 0.5 * dim * math.log(math.pi) - math.lgamma(0.5 * dim)
    torch.testing.assert_close(ours, torch.full_like(ours, -log_area), rtol=1e-12, atol=1e-12)
    near_zero = log_vmf_normalizer(dim, torch.tensor(1e-8, dtype=torch.float64))
    torch.testing.assert_close(near_zero, torch.tensor(-log_area, dtype=torch.float64))


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("kappa", KAPPAS)
def test_entropy_and_mean_match_scipy(dim, kappa):
    loc = _unit(dim, seed=dim + 1)
    distribution = VonMisesFisher(loc, torch.tensor(kappa, dtype=torch.float64))
    reference = stats.vonmises_fisher(loc.numpy(), kappa)
    # Float64 closed forms on both sides.
    np.testing.assert_allclose(distribution.entropy().item(), reference.entropy(), rtol=1e-9)
    expected_mean = _mean_resultant_length(dim, kappa) * loc.numpy()
    np.testing.assert_allclose(distribution.mean.numpy(), expected_mean, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("kappa", KAPPAS)
def test_samples_match_scipy(dim, kappa):
    torch.manual_seed(1000 * dim + int(kappa))
    loc = _unit(dim, seed=7 * dim)
    draws = VonMisesFisher(loc, torch.tensor(kappa, dtype=torch.float64)).sample((NUM_DRAWS,))
    assert draws.shape == (NUM_DRAWS, dim)
    torch.testing.assert_close(draws.norm(dim=-1), torch.ones(NUM_DRAWS, dtype=torch.float64))

    cosine = (draws @ loc).numpy()
    length = _mean_resultant_length(dim, kappa)
    # Mean of mu.x: within 5 standard errors of A_D(kappa), with Var(mu.x) = 1 - (D-1) A / kappa
    # - A^2 (two-sided chance of a false failure about 6e-7).
    variance = 1 - (dim - 1) * length / kappa - length**2
    assert abs(cosine.mean() - length) <= 5 * math.sqrt(variance / NUM_DRAWS)

    # Tangent part of the sample mean: n |mean - (mu.mean) mu|^2 is a sum of D - 1 independent
    # chi-square(1) terms times A / kappa, so it has mean (D-1) A / kappa and standard deviation
    # sqrt(2 (D-1)) A / kappa; allow 6 standard deviations.
    mean = draws.mean(0)
    tangent = mean - (mean @ loc) * loc
    statistic = NUM_DRAWS * tangent.square().sum().item()
    scale = length / kappa
    assert statistic <= (dim - 1) * scale + 6 * math.sqrt(2 * (dim - 1)) * scale

    reference = stats.vonmises_fisher(loc.numpy(), kappa).rvs(NUM_DRAWS, random_state=dim)
    result = stats.ks_2samp(cosine, reference @ loc.numpy())
    assert result.pvalue > KS_ALPHA


def test_tangent_direction_is_uniform():
    # On S^2 the azimuth around loc = e_3 is uniform on (-pi, pi]; a KS test against it, at level
    # 0.001, checks the tangent draw and the Householder reflection together.
    torch.manual_seed(3)
    loc = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    draws = VonMisesFisher(loc, torch.tensor(2.0, dtype=torch.float64)).sample((20_000,))
    azimuth = torch.atan2(draws[:, 1], draws[:, 0]).numpy()
    assert stats.kstest(azimuth, stats.uniform(loc=-math.pi, scale=2 * math.pi).cdf).pvalue > 1e-3


def test_batch_shapes_and_expand(device):
    locs = torch.stack([_unit(4, seed) for seed in range(3)]).to(device)
    kappa = torch.tensor([[0.5], [5.0]], dtype=torch.float64, device=device)
    distribution = VonMisesFisher(locs, kappa)
    assert distribution.batch_shape == (2, 3)
    assert distribution.event_shape == (4,)

    draws = distribution.sample((5,))
    assert draws.shape == (5, 2, 3, 4)
    assert draws.device == locs.device
    assert distribution.log_prob(draws).shape == (5, 2, 3)
    assert distribution.entropy().shape == (2, 3)
    assert distribution.mean.shape == (2, 3, 4)

    expanded = distribution.expand((7, 2, 3))
    assert expanded.batch_shape == (7, 2, 3)
    assert expanded.sample().shape == (7, 2, 3, 4)
    expected = distribution.log_prob(draws[0]).expand(7, 2, 3)
    torch.testing.assert_close(expanded.log_prob(draws[0]), expected)


def test_batched_samples_follow_their_loc():
    locs = torch.eye(5, dtype=torch.float64)[:3]
    draws = VonMisesFisher(locs, torch.tensor(200.0, dtype=torch.float64)).sample((4000,))
    # A_5(200) is about 0.99, and the mean of 4000 draws is within about 1e-3 of it.
    torch.testing.assert_close(draws.mean(0), 0.99 * locs, atol=5e-3, rtol=0)


def test_support_and_validation():
    assert VonMisesFisher.support is constraints.sphere
    loc = torch.tensor([1.0, 0.0, 0.0])
    distribution = VonMisesFisher(loc, torch.tensor(1.0), validate_args=True)
    with pytest.raises(ValueError):
        distribution.log_prob(torch.tensor([2.0, 0.0, 0.0]))
    with pytest.raises(ValueError):
        VonMisesFisher(torch.tensor([1.0, 1.0, 0.0]), torch.tensor(1.0), validate_args=True)
    with pytest.raises(ValueError):
        VonMisesFisher(loc, torch.tensor(-1.0), validate_args=True)
    with pytest.raises(ValueError, match="loc"):
        VonMisesFisher(torch.tensor([1.0]), torch.tensor(1.0))
    with pytest.raises(ValueError, match="concentration"):
        VonMisesFisher(torch.eye(3), torch.ones(2))


def test_float32_follows_dtype():
    loc = torch.tensor([0.6, 0.8, 0.0])
    distribution = VonMisesFisher(loc, torch.tensor(50.0))
    draws = distribution.sample((10,))
    assert draws.dtype == torch.float32
    assert distribution.log_prob(draws).dtype == torch.float32
    assert distribution.entropy().dtype == torch.float32


def test_log_prob_gradient_matches_finite_difference():
    loc = _unit(6, seed=2)
    x = _unit(6, seed=3)
    kappa = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(VonMisesFisher(loc, kappa).log_prob(x), kappa)
    # d/dk log f = mu.x - A_D(k), with A_D from SciPy.
    expected = (loc @ x).item() - _mean_resultant_length(6, 4.0)
    assert grad.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_maximum_likelihood_by_svi_recovers_concentration():
    # Pyro integration: fit kappa of an observed vMF by SVI with an empty guide and compare with
    # the MLE, the root of A_D(k) = mean(mu.x), found with SciPy.
    torch.manual_seed(0)
    dim, true_kappa = 5, 8.0
    loc = torch.eye(dim, dtype=torch.float64)[0]
    data = VonMisesFisher(loc, torch.tensor(true_kappa, dtype=torch.float64)).sample((2000,))

    def model():
        kappa = pyro.param(
            "kappa", torch.tensor(1.0, dtype=torch.float64), constraint=constraints.positive
        )
        with pyro.plate("data", len(data)):
            pyro.sample("obs", VonMisesFisher(loc, kappa), obs=data)

    svi = pyro.infer.SVI(
        model, lambda: None, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO()
    )
    for _ in range(600):
        svi.step()
    fitted = pyro.param("kappa").item()
    resultant = (data @ loc).mean().item()
    root = brentq(lambda k: _mean_resultant_length(dim, k) - resultant, 1e-3, 1e3)
    # 1% covers Adam's residual oscillation at lr 0.05 around the optimum after 600 steps.
    assert fitted == pytest.approx(root, rel=1e-2)


@pytest.mark.parametrize("dim, kappa", [(3, 0.0), (5, 2.0), (10, 50.0)])
def test_variance_matches_sample_variance(dim, kappa):
    torch.manual_seed(5)
    loc = _unit(dim, seed=11)
    distribution = VonMisesFisher(loc, torch.tensor(kappa, dtype=torch.float64))
    draws = distribution.sample((40_000,))
    # Each coordinate's sample variance has a standard error of at most about
    # sqrt(2 / 40000) = 0.007 of a variance no larger than 1, so 0.02 is three of them.
    torch.testing.assert_close(distribution.variance, draws.var(0), atol=0.02, rtol=0)
    assert distribution.variance.sum().item() == pytest.approx(
        1 - distribution.mean.square().sum().item(), rel=1e-9
    )


@pytest.mark.parametrize("dim", [2, 3, 10, 50, 512])
@pytest.mark.parametrize("kappa", [1.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e8])
def test_variance_along_mean_matches_mpmath(dim, kappa):
    mpmath = pytest.importorskip("mpmath")
    # Var[mu.x] = A' = 1 - A^2 - (D - 1) A / kappa cancels to about (D - 1) / (2 kappa^2), so the
    # reference evaluates it with 60 significant digits.
    with mpmath.workdps(60):
        nu = mpmath.mpf(dim) / 2 - 1
        ratio = mpmath.besseli(nu + 1, kappa) / mpmath.besseli(nu, kappa)
        expected = float(1 - ratio**2 - (dim - 1) * ratio / kappa)
    loc = torch.eye(dim, dtype=torch.float64)[0]
    variance = VonMisesFisher(loc, torch.tensor(kappa, dtype=torch.float64)).variance
    # Below the series threshold the closed form inherits bessel_ratio's absolute error of
    # about 1e-12, which is a relative error of at most 2e-8 over this grid.
    assert variance[0].item() == pytest.approx(expected, rel=1e-7)
    assert variance[0].item() > 0


def test_variance_is_positive_at_huge_concentration():
    # For D = 3, A(kappa) = coth(kappa) - 1 / kappa, so Var[mu.x] = 1 / kappa^2 - 1 / sinh^2(kappa),
    # which is 1 / kappa^2 to double precision once kappa exceeds about 20.
    # The tangent variance A / kappa uses bessel_ratio, accurate to about 3e-11 relative here.
    loc = torch.tensor([0.0, 0.6, 0.8], dtype=torch.float64)
    for kappa in [1e4, 1e5, 1e6]:
        variance = VonMisesFisher(loc, torch.tensor(kappa, dtype=torch.float64)).variance
        tangent = (1 / math.tanh(kappa) - 1 / kappa) / kappa
        along = 1 / kappa**2
        expected = tangent + (along - tangent) * loc.square()
        torch.testing.assert_close(variance, expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("kappa", [math.inf, math.nan])
def test_sample_rejects_non_finite_concentration(kappa):
    # Wood's acceptance test is NaN for these, so sampling used to loop forever.
    distribution = VonMisesFisher(torch.tensor([1.0, 0.0, 0.0]), kappa, validate_args=False)
    with pytest.raises(ValueError, match="concentration must be finite"):
        distribution.sample((3,))
