"""Tests of the KDE capacity analysis against SciPy, brute force and limiting cases."""

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.special
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_am import DenseAMEnergy, GaussianKDEEnergy, retrieve
from pyro_am.capacity import (
    all_certified_probability,
    capacity_curve,
    capacity_lower_bound,
    certified_fraction,
    growth_rate,
    high_dimensional_ceiling,
    inner_product_tail,
    nearest_certified_fraction,
    nearest_neighbour_distances,
    regularized_incomplete_beta,
    separation_threshold,
    separations,
    storage_bound,
    stored_patterns,
    uniform_on_sphere,
)
from pyro_am.capacity.random_patterns import _pairwise_moments


def _generator(device, seed=0):
    return torch.Generator(device=device).manual_seed(seed)


# -- special functions ---------------------------------------------------------------------------
@pytest.mark.parametrize("a", [0.5, 1.0, 1.5, 3.5, 15.5, 63.5])
@pytest.mark.parametrize("b", [0.5, 1.0, 2.5])
@pytest.mark.parametrize("x", [1e-9, 1e-3, 0.1, 0.5, 0.9, 0.999, 1.0 - 1e-9])
def test_incomplete_beta_matches_scipy(a, b, x):
    expected = scipy.special.betainc(a, b, x)
    # Both are float64 evaluations of a convergent expansion: agreement to 1e-10 relative leaves
    # room for the log-gamma prefactor's rounding at large a.
    assert regularized_incomplete_beta(a, b, x) == pytest.approx(expected, rel=1e-10, abs=1e-300)


def test_incomplete_beta_endpoints():
    assert regularized_incomplete_beta(2.0, 3.0, 0.0) == 0.0
    assert regularized_incomplete_beta(2.0, 3.0, 1.0) == 1.0


@pytest.mark.parametrize("dim", [2, 3, 5, 16, 64])
@pytest.mark.parametrize("threshold", [-0.9, -0.3, 0.0, 0.2, 0.6, 0.95])
def test_inner_product_tail_matches_beta_law(dim, threshold):
    # Reference: (1 + u.v) / 2 follows Beta((D - 1) / 2, (D - 1) / 2), so the tail is SciPy's
    # beta survival function. It checks the cap formula and its mirrored branch independently.
    shape = 0.5 * (dim - 1)
    expected = scipy.stats.beta.sf(0.5 * (1.0 + threshold), shape, shape)
    assert inner_product_tail(threshold, dim) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_inner_product_tail_circle_closed_form():
    # On the circle the angle is uniform, so P(cos >= s) = arccos(s) / pi.
    for threshold in (-0.5, 0.1, 0.7):
        expected = math.acos(threshold) / math.pi
        assert inner_product_tail(threshold, 2) == pytest.approx(expected, rel=1e-12)


def test_inner_product_tail_monte_carlo():
    generator = torch.Generator().manual_seed(3)
    u = uniform_on_sphere(100_000, 6, generator=generator)
    v = uniform_on_sphere(100_000, 6, generator=generator)
    empirical = float(((u * v).sum(-1) >= 0.4).double().mean())
    # Binomial standard error at p ~ 0.17 and n = 1e5 is 1.2e-3; allow five of them.
    assert abs(empirical - inner_product_tail(0.4, 6)) < 6e-3


# -- geometry and the Hopfield equivalence -------------------------------------------------------
def test_nearest_neighbour_matches_cdist(device):
    memories = torch.randn(37, 5, dtype=torch.float64, device=device)
    distances, indices = nearest_neighbour_distances(memories)
    pairwise = torch.cdist(memories, memories, compute_mode="donot_use_mm_for_euclid_dist")
    pairwise.fill_diagonal_(math.inf)
    expected, expected_index = pairwise.min(dim=-1)
    torch.testing.assert_close(distances, expected, rtol=1e-12, atol=0.0)
    assert torch.equal(indices, expected_index)


def test_separations_are_inner_product_gaps(device):
    memories = uniform_on_sphere(20, 4, radius=2.0, generator=_generator(device), device=device)
    gram = memories @ memories.T
    gram.fill_diagonal_(-math.inf)
    expected = 4.0 - gram.max(dim=-1).values
    # Two float64 routes to the same quantity; the GEMM route loses ~eps * r^2.
    torch.testing.assert_close(separations(memories), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bandwidth", [0.1, 0.5, 2.0])
def test_kde_map_is_hopfield_update_on_sphere(device, bandwidth):
    radius = 1.5
    memories = uniform_on_sphere(30, 6, radius, generator=_generator(device), device=device)
    queries = 2.0 * torch.randn(40, 6, dtype=torch.float64, device=device)
    kde = GaussianKDEEnergy(memories, bandwidth).fixed_point(queries)
    hopfield = DenseAMEnergy(memories, 1.0 / bandwidth**2).fixed_point(queries)
    # Completing the square leaves logits that differ by a per-query constant, so the maps agree
    # to float64 rounding of logits of size |x| r / h^2 <= 1e3.
    torch.testing.assert_close(kde, hopfield, rtol=1e-9, atol=1e-9)

    logits = (queries @ memories.T) / bandwidth**2
    brute_force = torch.softmax(logits, dim=-1) @ memories
    torch.testing.assert_close(kde, brute_force, rtol=1e-9, atol=1e-9)


# -- numerical verdict ---------------------------------------------------------------------------
def test_small_bandwidth_stores_every_distinct_pattern(device):
    memories = uniform_on_sphere(40, 3, generator=_generator(device), device=device)
    memories[1] = memories[0] + 1e-3 * torch.tensor([0.0, 0.6, 0.8], dtype=torch.float64)
    memories = memories / memories.norm(dim=-1, keepdim=True)
    nearest = float(nearest_neighbour_distances(memories)[0].min())
    result = stored_patterns(memories, 0.05 * nearest, radius=1.0, generator=_generator(device, 1))
    assert bool(result.stored.all())
    # With h far below every distance, each pattern is its own fixed point to rounding.
    assert float(result.distances.max()) < 1e-10
    # The bound's off-pattern weights are at most exp(-(d / h)^2 / 2 + d / (2 h)) <= e^-180 here,
    # so it certifies every pattern as well.
    assert bool(storage_bound(memories, 0.05 * nearest, 1.0).certified.all())


@pytest.mark.parametrize("dim", [2, 5])
def test_stored_fraction_tends_to_one_as_bandwidth_shrinks(device, dim):
    memories = uniform_on_sphere(30, dim, generator=_generator(device, 4), device=device)
    nearest = float(nearest_neighbour_distances(memories)[0].min())
    fractions = [
        stored_patterns(memories, factor * nearest, generator=_generator(device)).fraction
        for factor in (4.0, 1.0, 0.3, 0.1)
    ]
    # For these draws the fraction rises as h shrinks. At h = d_min / 10 the off-pattern weights in
    # a ball are below 30 exp(-45), so the bound certifies, and the check stores, every pattern.
    assert fractions == sorted(fractions)
    assert fractions[0] < 1.0
    assert fractions[-1] == 1.0
    assert bool(storage_bound(memories, 0.1 * nearest, 1.0).certified.all())


def test_duplicate_patterns_are_not_stored(device):
    memories = uniform_on_sphere(5, 3, generator=_generator(device), device=device)
    memories = torch.cat([memories, memories[:1]])
    result = stored_patterns(memories, 0.05, generator=_generator(device, 1))
    assert not bool(result.stored[0])
    assert not bool(result.stored[-1])
    assert bool(result.stored[1:-1].all())


@pytest.mark.parametrize("ratio", [2.0, 10.0])
def test_large_bandwidth_leaves_one_fixed_point(device, ratio):
    radius = 1.0
    memories = uniform_on_sphere(12, 4, radius, generator=_generator(device), device=device)
    energy = GaussianKDEEnergy(memories, ratio * radius)
    starts = 3.0 * torch.randn(
        200, 4, generator=_generator(device, 2), dtype=torch.float64, device=device
    )
    result = retrieve(energy, starts, max_steps=2000, tol=1e-12)
    assert bool(result.converged.all())
    # The Jacobian beta Cov_w(x_n) has norm at most beta r^2 = 1 / ratio^2 < 1 everywhere, so F is
    # a global contraction: every start ends at its one fixed point. tol = 1e-12 leaves an error
    # of at most tol / (1 - 1 / ratio^2) < 2e-12.
    spread = (result.states - result.states[0]).norm(dim=-1).max()
    assert float(spread) < 1e-9
    # That point is a softmax-weighted mean whose weights differ from 1 / N by a factor of at most
    # exp(2 r^2 / h^2), so it lies near the centroid.
    centroid = memories.mean(dim=0)
    assert float((result.states[0] - centroid).norm()) < 2.0 * radius / ratio**2
    assert not bool(
        stored_patterns(memories, ratio * radius, generator=_generator(device)).stored.any()
    )


@pytest.mark.parametrize("dim", [400, 1000])
def test_high_dimension_cannot_store_past_ceiling(device, dim):
    # At h = r / 2 the D -> inf ceiling 1 + rho exp(beta r (r - rho)) / (r - rho) is 7.7, whatever
    # D. Random patterns in D >= 400 are nearly orthogonal (|t| of order 1 / sqrt(D)), far apart
    # (d ~ sqrt(2) r >> 2 rho), and yet 12 of them leave none stored, while 4 are all stored.
    ceiling = high_dimensional_ceiling(0.5, 1.0)
    assert ceiling == pytest.approx(1 + 0.25 * math.exp(0.75 / 0.25) / 0.75, rel=1e-12)
    for count, expected in ((4, 1.0), (12, 0.0)):
        memories = uniform_on_sphere(count, dim, generator=_generator(device, count), device=device)
        result = stored_patterns(memories, 0.5, radius=1.0, generator=_generator(device))
        assert bool(result.disjoint.all())
        assert result.fraction == expected


def test_two_patterns_merge_below_twice_bandwidth(device):
    bandwidth = 0.1
    for distance, expected in ((1.8 * bandwidth, False), (3.0 * bandwidth, True)):
        angle = 2.0 * math.asin(distance / 2.0)
        memories = torch.tensor(
            [[1.0, 0.0], [math.cos(angle), math.sin(angle)]], dtype=torch.float64, device=device
        )
        result = stored_patterns(memories, bandwidth, radius=1.0, generator=_generator(device))
        assert bool(result.stored.all()) is expected
        assert bool(result.disjoint.all())
    # Below 2h the two kernels' sum is unimodal, so the iteration from a pattern ends at the
    # midpoint, and the pattern escapes its ball of radius h / 2 on the way.
    angle = 2.0 * math.asin(0.9 * bandwidth)
    memories = torch.tensor(
        [[1.0, 0.0], [math.cos(angle), math.sin(angle)]], dtype=torch.float64, device=device
    )
    merged = retrieve(GaussianKDEEnergy(memories, bandwidth), memories, max_steps=5000, tol=1e-12)
    midpoint = memories.mean(dim=0)
    # Convergence is geometric near the merged mode, so 1e-6 is far above the remaining error.
    torch.testing.assert_close(merged.states, midpoint.expand(2, 2), rtol=0.0, atol=1e-6)
    assert bool(stored_patterns(memories, bandwidth, generator=_generator(device)).escaped.all())


def test_stored_patterns_follows_dtype_and_device(device):
    memories = uniform_on_sphere(
        16, 8, generator=_generator(device), dtype=torch.float32, device=device
    )
    result = stored_patterns(memories, 0.3, radius=1.0, generator=_generator(device))
    assert result.fixed_points.dtype == torch.float32
    assert result.fixed_points.device.type == torch.device(device).type
    assert result.stored.shape == (16,)
    reference = stored_patterns(memories.double(), 0.3, generator=_generator(device))
    # float32 rounding (1e-7 relative) can flip only a pattern at the edge of a condition.
    assert int((result.stored != reference.stored).sum()) <= 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bandwidth": 0.0}, "bandwidth"),
        ({"bandwidth": 0.3, "radius": 2.0}, "sphere"),
        ({"bandwidth": 0.3, "perturbation": 0.0}, "perturbation"),
        ({"bandwidth": 0.3, "num_perturbations": 0}, "num_perturbations"),
        ({"bandwidth": 0.3, "ball_radius": -1.0}, "ball_radius"),
    ],
)
def test_stored_patterns_rejects_bad_input(kwargs, message):
    memories = uniform_on_sphere(4, 3)
    with pytest.raises(ValueError, match=message):
        stored_patterns(memories, **kwargs)


# -- analytic bound ------------------------------------------------------------------------------
def _random_instance(seed, num_patterns, dim, clustered):
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(num_patterns, dim, generator=generator, dtype=torch.float64)
    if clustered:
        # Pull half of the patterns towards the first one so that close pairs occur.
        patterns[: num_patterns // 2] = patterns[0] + 0.3 * patterns[: num_patterns // 2]
    return patterns / patterns.norm(dim=-1, keepdim=True)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_patterns=st.integers(2, 12),
    dim=st.integers(2, 8),
    log_bandwidth=st.floats(math.log(0.03), math.log(1.5)),
    radius=st.floats(0.5, 3.0),
    clustered=st.booleans(),
)
def test_bound_never_violated(seed, num_patterns, dim, log_bandwidth, radius, clustered):
    memories = radius * _random_instance(seed, num_patterns, dim, clustered)
    bandwidth = radius * math.exp(log_bandwidth)
    bound = storage_bound(memories, bandwidth, radius)
    verdict = stored_patterns(
        memories, bandwidth, radius, max_steps=20_000, generator=torch.Generator().manual_seed(seed)
    )
    # The nearest-neighbour form replaces every distance by a worse one, so it implies the pairwise
    # form.
    assert not bool((bound.certified_nearest & ~bound.certified).any())
    certified_but_not_stored = bound.certified & ~verdict.stored
    assert not bool(certified_but_not_stored.any()), (
        f"certified but not stored: {certified_but_not_stored.nonzero().flatten().tolist()}"
    )
    # Where the bound certifies, the fixed point also lies within the bound's image radius.
    inside = verdict.distances <= bound.image_radius + 1e-12
    assert bool(inside[bound.certified].all())


def test_bound_certifies_well_separated_patterns(device):
    # +-e_k in R^4: separations r^2 = 1 (nearest distance sqrt(2)); at h = 0.2 the condition holds.
    eye = torch.eye(4, dtype=torch.float64, device=device)
    memories = torch.cat([eye, -eye])
    bound = storage_bound(memories, 0.2)
    assert bool(bound.certified.all())
    assert bool(stored_patterns(memories, 0.2, generator=_generator(device)).stored.all())
    # At h = 1 the same patterns are not certified (nor stored: they collapse to the origin).
    assert not bool(storage_bound(memories, 1.0).certified.any())


def test_threshold_separates_certified_separations():
    for num_patterns, bandwidth, radius in ((5, 0.25, 1.0), (50, 0.1, 2.0), (3, 0.4, 1.0)):
        threshold = separation_threshold(num_patterns, bandwidth, radius)
        assert math.isfinite(threshold)
        below = torch.tensor([threshold * (1 - 1e-9)], dtype=torch.float64)
        above = torch.tensor([threshold * (1 + 1e-9)], dtype=torch.float64)
        kwargs = {"radius": radius, "num_patterns": num_patterns}
        assert not bool(storage_bound(None, bandwidth, separations=below, **kwargs).certified)
        assert bool(storage_bound(None, bandwidth, separations=above, **kwargs).certified)


def test_threshold_is_infinite_when_nothing_can_be_stored():
    assert separation_threshold(10, 3.0, 1.0) == math.inf
    assert separation_threshold(1, 3.0, 1.0) == 0.0


def test_simple_condition_implies_refined_one():
    # The docs' simple form (2 r eps <= rho, 4 beta r^2 eps < 1) must imply certification.
    radius, bandwidth, num_patterns = 1.0, 0.2, 20
    rho, beta = bandwidth / 2, 1 / bandwidth**2
    delta = torch.linspace(0.05, 2.0, 400, dtype=torch.float64)
    d = torch.sqrt(2 * delta)
    eps = (num_patterns - 1) * torch.exp(-beta * (0.5 * d**2 - rho * d))
    simple = (d > 2 * rho) & (2 * radius * eps <= rho) & (4 * beta * radius**2 * eps < 1)
    bound = storage_bound(None, bandwidth, radius, separations=delta, num_patterns=num_patterns)
    assert bool(simple.any())
    assert bool((bound.certified | ~simple).all())


def test_storage_bound_rejects_bad_input():
    memories = uniform_on_sphere(4, 3)
    with pytest.raises(ValueError, match="exactly one"):
        storage_bound(memories, 0.3, separations=torch.ones(4))
    with pytest.raises(ValueError, match="radius is required"):
        storage_bound(None, 0.3, separations=torch.ones(4))
    with pytest.raises(ValueError, match="sphere"):
        storage_bound(memories * torch.arange(1.0, 5.0).double().unsqueeze(-1), 0.3)
    with pytest.raises(ValueError, match="num_patterns"):
        storage_bound(None, 0.3, 1.0, separations=torch.ones(4), num_patterns=0)


def test_nearest_fraction_matches_monte_carlo():
    num_patterns, dim, bandwidth = 6, 10, 0.25
    generator = torch.Generator().manual_seed(5)
    draws = 1500
    memories = uniform_on_sphere(draws * num_patterns, dim, generator=generator)
    bounds = [storage_bound(block, bandwidth, 1.0) for block in memories.split(num_patterns)]
    nearest = torch.stack([bound.certified_nearest for bound in bounds]).double()
    expected = nearest_certified_fraction(num_patterns, dim, bandwidth, 1.0)
    assert 0.2 < expected < 0.95
    # The mean over 9000 patterns (1500 independent sets) has standard error below 0.013.
    assert abs(float(nearest.mean()) - expected) < 0.04
    all_certified = torch.stack([bound.certified.all() for bound in bounds]).double().mean()
    # The union bounds lower-bound P(all certified); allow three standard errors (0.013 each).
    assert (
        float(all_certified) >= all_certified_probability(num_patterns, dim, bandwidth, 1.0) - 0.04
    )


@pytest.mark.parametrize(
    ("num_patterns", "dim", "bandwidth"), [(16, 32, 1 / 3), (8, 16, 1 / 3), (40, 24, 0.25)]
)
def test_certified_fraction_bounds_monte_carlo(num_patterns, dim, bandwidth):
    generator = torch.Generator().manual_seed(11)
    draws = max(40, 1200 // num_patterns)
    memories = uniform_on_sphere(draws * num_patterns, dim, generator=generator)
    bounds = [storage_bound(block, bandwidth, 1.0) for block in memories.split(num_patterns)]
    pairwise = torch.stack([bound.certified for bound in bounds]).double().mean()
    nearest = torch.stack([bound.certified_nearest for bound in bounds]).double().mean()

    lower = certified_fraction(num_patterns, dim, bandwidth, 1.0)
    # The Chernoff bound must improve on the nearest-neighbour form where the latter is weak.
    assert lower > nearest_certified_fraction(num_patterns, dim, bandwidth, 1.0) + 0.1
    # It bounds the pairwise certificate's probability from below. The Monte Carlo mean over
    # >= 1200 patterns has standard error <= 0.015 at p >= 0.7; allow three of them.
    assert float(pairwise) >= lower - 0.045
    assert float(pairwise) >= float(nearest)


@pytest.mark.parametrize("dim", [2, 7, 40])
def test_pairwise_moments_match_scipy_quadrature(dim):
    bandwidth, radius = 0.3, 1.0
    rho = bandwidth / 2
    tails, slopes_image, log_image, _, _ = _pairwise_moments(dim, bandwidth, radius, rho)
    beta = 1 / bandwidth**2
    log_norm = math.log(scipy.special.beta(0.5 * (dim - 1), 0.5))
    for panel in (0, 60, 150):
        theta_k = (
            math.acos(1 - 2 * (rho / radius) ** 2)
            + panel * (math.pi - math.acos(1 - 2 * (rho / radius) ** 2)) / 192
        )
        # The density integrates to P(t < s_k), which SciPy's beta law gives independently.
        shape = 0.5 * (dim - 1)
        assert tails[panel] == pytest.approx(
            scipy.stats.beta.sf(0.5 * (1 + math.cos(theta_k)), shape, shape), rel=1e-9
        )
        for index in (0, 40, 60):
            slope = slopes_image[index]

            def log_integrand(theta, slope=slope):
                distance = 2 * radius * math.sin(theta / 2)
                term = distance * math.exp(-beta * (distance**2 / 2 - rho * distance))
                return (dim - 2) * math.log(math.sin(theta)) - log_norm + slope * term

            grid = np.linspace(theta_k, math.pi, 2001)[:-1]
            shift = max(log_integrand(theta) for theta in grid)
            value, _ = scipy.integrate.quad(
                lambda theta, f=log_integrand, c=shift: math.exp(f(theta) - c),
                theta_k,
                math.pi,
                limit=400,
                epsabs=0,
            )
            # Adaptive quadrature and 8-node Gauss-Legendre panels on a smooth integrand agree
            # to far better than 1e-8 relative; the bound needs only a few digits.
            assert log_image[panel, index] == pytest.approx(math.log(value) + shift, rel=1e-8)


def test_capacity_lower_bound_grows_with_dim():
    dims = (2, 8, 16, 32)
    bounds = [capacity_lower_bound(dim, 0.25, 1.0, 0.05) for dim in dims]
    assert bounds == sorted(bounds)
    assert bounds[-1] > 10 * bounds[1]
    for dim, value in zip(dims, bounds, strict=True):
        assert certified_fraction(value, dim, 0.25, 1.0) >= 0.95
        assert certified_fraction(value + 1, dim, 0.25, 1.0) < 0.95
    nearest = [capacity_lower_bound(dim, 0.25, 1.0, 0.05, criterion="nearest") for dim in dims]
    # The Chernoff bound contains the nearest-neighbour form, so it can only be larger.
    assert all(a >= b for a, b in zip(bounds, nearest, strict=True))


def test_nearest_bound_saturates_in_dim():
    # At fixed h / r the nearest-neighbour condition fails for every pattern once N exceeds
    # 1 + rho exp(beta phi_rho(2 r)) / (2 r), whatever D (with d = 2 r past the peak of M_1).
    bandwidth, radius = 1 / 3, 1.0
    rho, beta = bandwidth / 2, 9.0
    ceiling = 1 + rho * math.exp(beta * (2 * radius**2 - 2 * rho * radius)) / (2 * radius)
    assert separation_threshold(int(ceiling) + 1, bandwidth, radius) == math.inf
    large = [
        capacity_lower_bound(dim, bandwidth, radius, criterion="nearest") for dim in (256, 1024)
    ]
    assert all(value < ceiling for value in large)


def test_growth_rate_bounds_slope_of_nearest_bound():
    bandwidth, radius, delta = 0.25, 1.0, 0.05
    dims = np.arange(8, 65, 8)
    n_max = np.array(
        [
            capacity_lower_bound(int(dim), bandwidth, radius, delta, criterion="nearest")
            for dim in dims
        ]
    )
    rates = np.array([growth_rate(int(count), bandwidth, radius) for count in n_max])
    slopes = np.diff(np.log(n_max)) / np.diff(dims)
    assert bool((slopes > 0).all())
    # The threshold cosine s* falls as N grows, so the local rate falls too and bounds the slope
    # from above: log N_max grows with D, but ever more slowly.
    assert bool((np.diff(rates) < 0).all())
    assert bool((slopes <= rates[:-1]).all())
    assert growth_rate(1, bandwidth, radius) == math.inf
    assert growth_rate(10**9, bandwidth, radius) == 0.0


# -- capacity curves -----------------------------------------------------------------------------
GRID = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]


def test_capacity_finite_in_two_dimensions():
    curve = capacity_curve([2], GRID, 0.25, 1.0, trials=6, seed=1, progress=False)
    assert not bool(curve.censored[0])
    assert 1 <= int(curve.n_max[0]) <= 8
    # Packing: stored patterns have disjoint arcs of half-width asin(rho / r) on the circle.
    packing = math.pi / math.asin(curve.ball_radius)
    assert int(curve.n_max[0]) < packing
    assert float(curve.stored_fraction[0, -1]) == 0.0


def test_capacity_grows_with_dim(tmp_path):
    curve = capacity_curve([2, 4, 8], GRID, 0.25, 1.0, trials=6, seed=0, progress=False)
    n_max = curve.n_max.tolist()
    assert n_max[0] < n_max[1] < n_max[2], n_max
    assert math.isfinite(curve.fits["numerical"][1]) and curve.fits["numerical"][1] > 0
    # The bound's expected certified fraction lower-bounds the expected stored fraction. Allow
    # four standard errors of the measured mean, plus 0.02 where all draws agreed (SE = 0).
    slack = 4 * curve.stored_fraction_se + 0.02
    assert bool((curve.stored_fraction >= curve.bound_fraction - slack).all())

    record = curve.to_dict()
    assert record["n_max"] == n_max
    assert len(record["rows"]) == 3 * len(GRID)
    figure_path = tmp_path / "curve.png"
    curve.plot(figure_path)
    assert figure_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_capacity_curve_rejects_bad_input():
    with pytest.raises(ValueError, match="dims"):
        capacity_curve([1], GRID, 0.25, progress=False)
    with pytest.raises(ValueError, match="delta"):
        capacity_curve([2], GRID, 0.25, delta=1.5, progress=False)
    with pytest.raises(ValueError, match="num_patterns"):
        capacity_curve([2], [0, 3], 0.25, progress=False)


def test_capacity_curve_is_reproducible():
    first = capacity_curve([3], [2, 5], 0.3, trials=2, seed=7, progress=False)
    second = capacity_curve([3], [2, 5], 0.3, trials=2, seed=7, progress=False)
    np.testing.assert_array_equal(first.stored_fraction, second.stored_fraction)


def test_ceiling_past_float_range_is_inf():
    # At h = 0.03 r the exponent beta r (r - rho) is 0.985 / 9e-4 ~ 1094, past log(float max) ~ 709.
    assert high_dimensional_ceiling(0.03, 1.0) == math.inf
    # At h = 0.05 r it is 390, so the direct formula is still a float and must match to rounding.
    rho = 0.025
    expected = 1.0 + rho * math.exp(1.0 * (1.0 - rho) / 0.05**2) / (1.0 - rho)
    assert high_dimensional_ceiling(0.05, 1.0) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("bandwidth", [1e-300, 1e300])
def test_bound_rejects_bandwidth_outside_float_range(bandwidth):
    memories = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="bandwidth"):
        storage_bound(memories, bandwidth)
    with pytest.raises(ValueError, match="bandwidth"):
        separation_threshold(3, bandwidth, 1.0)
    with pytest.raises(ValueError, match="bandwidth"):
        high_dimensional_ceiling(bandwidth, 1.0)
