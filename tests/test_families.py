"""Tests of the data-set families against SciPy densities and scikit-learn's shape generators."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp
from sklearn.datasets import make_circles

from pyro_am import datasets
from pyro_am.families import (
    GaussianMixtureFamily,
    ShapesFamily,
    make_family,
    mixture_log_prob,
)


def test_reexported_from_datasets():
    assert datasets.GaussianMixtureFamily is GaussianMixtureFamily
    assert datasets.ShapesFamily is ShapesFamily
    assert datasets.make_family is make_family


def test_mixture_defaults():
    family = GaussianMixtureFamily()
    assert (family.dim, family.num_components) == (2, 3)
    assert (family.prior_std, family.component_std) == (5.0, 0.33)
    assert family.num_distinct is None


def test_mixture_log_prob_matches_scipy():
    generator = torch.Generator().manual_seed(0)
    batch = GaussianMixtureFamily(dim=3, dtype=torch.float64).sample(2, 5, generator)
    queries = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64) * 4

    ours = batch.log_prob(queries)

    for b in range(2):
        components = [
            stats.multivariate_normal(batch.locs[b, k].numpy(), 0.33**2 * np.eye(3)).logpdf(
                queries[b].numpy()
            )
            for k in range(3)
        ]
        expected = logsumexp(np.stack(components), axis=0) - math.log(3)
        # float64 GEMM distances against SciPy's direct evaluation.
        np.testing.assert_allclose(ours[b].numpy(), expected, rtol=1e-10, atol=1e-10)


def test_mixture_points_follow_their_components():
    generator = torch.Generator().manual_seed(1)
    family = GaussianMixtureFamily(dtype=torch.float64)
    batch = family.sample(4, 3000, generator)

    centres = torch.gather(batch.locs, 1, batch.assignments[..., None].expand(-1, -1, 2))
    residuals = ((batch.points - centres) / 0.33).flatten().numpy()
    # 24000 standardized residuals against N(0, 1): the KS test keeps a 1% false-alarm rate.
    assert stats.kstest(residuals, "norm").pvalue > 0.01
    counts = torch.bincount(batch.assignments.flatten(), minlength=3).numpy()
    # Uniform assignments: chi-square goodness of fit at the 1% level.
    assert stats.chisquare(counts).pvalue > 0.01
    # Means ~ N(0, 5^2): 24 coordinates, KS at the 1% level.
    assert stats.kstest(batch.locs.flatten().numpy() / 5.0, "norm").pvalue > 0.01


def test_finite_mixture_family_reuses_its_parameters():
    family = GaussianMixtureFamily(num_distinct=3, seed=7)
    again = GaussianMixtureFamily(num_distinct=3, seed=7)
    other = GaussianMixtureFamily(num_distinct=3, seed=8)
    generator = torch.Generator().manual_seed(0)

    locs = family.sample_locs(200, generator)

    distinct = torch.unique(locs.reshape(200, -1), dim=0)
    assert distinct.shape[0] == 3
    assert torch.equal(family._pool, again._pool)
    assert not torch.equal(family._pool, other._pool)
    # Redrawn points: two draws from the same finite family differ.
    first = family.sample_points(2, 5, torch.Generator().manual_seed(1))
    second = family.sample_points(2, 5, torch.Generator().manual_seed(2))
    assert not torch.equal(first, second)


def test_seeded_generator_reproduces_draws():
    family = GaussianMixtureFamily()
    first = family.sample_points(3, 4, torch.Generator().manual_seed(5))
    second = family.sample_points(3, 4, torch.Generator().manual_seed(5))
    assert torch.equal(first, second)
    assert first.dtype == torch.float32


@pytest.mark.parametrize("shape", ["moons", "circles", "blobs"])
def test_shapes_family_draws(shape):
    family = ShapesFamily(shape=shape)
    points = family.sample_points(3, 50, torch.Generator().manual_seed(0))
    again = family.sample_points(3, 50, torch.Generator().manual_seed(0))
    assert points.shape == (3, 50, 2)
    assert torch.equal(points, again)
    assert torch.isfinite(points).all()


def test_circles_keep_sklearn_radii_after_rotation():
    # Without noise, make_circles puts points on radii 1 and factor = 0.5; the random rotation and
    # shift move them, and the scale multiplies both radii by the same factor.
    family = ShapesFamily(shape="circles", noise=0.0, scale_range=(2.0, 2.0), shift_std=0.0)
    points = family.sample_points(2, 40, torch.Generator().manual_seed(3)).double()
    reference, _ = make_circles(40, noise=0.0, factor=0.5)
    expected = np.sort(2.0 * np.linalg.norm(reference, axis=1))
    for b in range(2):
        radii = np.sort(points[b].norm(dim=1).numpy())
        # float32 points: radii agree to ~1e-6 relative.
        np.testing.assert_allclose(radii, expected, rtol=1e-5)


def test_finite_shapes_family_draws_subsets_of_its_pool():
    family = ShapesFamily(shape="moons", num_distinct=2, max_points=30, seed=1)
    points = family.sample_points(5, 12, torch.Generator().manual_seed(0))
    pool = family._pool
    for b in range(5):
        matches = [
            bool((points[b][:, None, :] == pool[i][None]).all(-1).any(-1).all()) for i in range(2)
        ]
        assert any(matches)
    with pytest.raises(ValueError, match="num_points must be at most max_points=30"):
        family.sample_points(1, 31)


def test_make_family_by_name():
    assert isinstance(make_family("gmm", num_components=4), GaussianMixtureFamily)
    assert make_family("blobs").shape == "blobs"
    with pytest.raises(ValueError, match="family must be 'gmm' or one of"):
        make_family("spirals")


@pytest.mark.parametrize(
    ("factory", "error", "match"),
    [
        (lambda: GaussianMixtureFamily(dim=0), ValueError, "dim must be an integer"),
        (lambda: GaussianMixtureFamily(prior_std=-1.0), ValueError, "prior_std must be finite"),
        (lambda: GaussianMixtureFamily(component_std=0.0), ValueError, "component_std"),
        (lambda: GaussianMixtureFamily(num_distinct=0), ValueError, "num_distinct"),
        (lambda: GaussianMixtureFamily(dtype=torch.int64), TypeError, "dtype must be a floating"),
        (lambda: ShapesFamily(shape="spiral"), ValueError, "shape must be one of"),
        (lambda: ShapesFamily(scale_range=(2.0, 1.0)), ValueError, "low <= high"),
        (lambda: ShapesFamily(noise=-0.1), ValueError, "noise must be finite"),
    ],
)
def test_families_reject_bad_arguments(factory, error, match):
    with pytest.raises(error, match=match):
        factory()


def test_sampling_rejects_bad_counts():
    with pytest.raises(ValueError, match="num_datasets must be an integer"):
        GaussianMixtureFamily().sample(0, 3)
    with pytest.raises(TypeError, match="num_points must be an integer"):
        GaussianMixtureFamily().sample(2, 2.5)


def test_mixture_log_prob_function_shape():
    locs = torch.zeros(2, 3, 2)
    values = mixture_log_prob(torch.zeros(2, 5, 2), locs, 1.0)
    assert values.shape == (2, 5)
    # All components at the origin: log N(0; 0, I) in 2-D is -log(2 pi).
    torch.testing.assert_close(values, torch.full((2, 5), -math.log(2 * math.pi)))
