"""vMF mixture energy, retrieval on the sphere and EM, against brute force and SciPy."""

import math

import numpy as np
import pytest
import scipy.special as sp
import torch
from scipy.optimize import brentq
from sklearn.metrics import adjusted_rand_score

from pyro_am.distributions import VonMisesFisher
from pyro_am.dynamics import retrieve
from pyro_am.models.vmf_mixture import (
    VMFMixture,
    VMFMixtureEnergy,
    retrieve_on_sphere,
    solve_concentration,
    spherical_kmeans,
)


def _unit(tensor):
    return tensor / tensor.norm(dim=-1, keepdim=True)


def _mixture(device, dim=6, num_components=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    options = {"dtype": torch.float64}
    directions = _unit(torch.randn(num_components, dim, generator=generator, **options))
    concentrations = 1.0 + 30.0 * torch.rand(num_components, generator=generator, **options)
    weights = torch.softmax(torch.randn(num_components, generator=generator, **options), -1)
    return directions.to(device), concentrations.to(device), weights.to(device)


def _planted(device, dim, concentrations, weights, num_points, seed):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    options = {"dtype": torch.float64}
    directions = _unit(torch.randn(len(weights), dim, generator=generator, **options)).to(device)
    concentrations = torch.tensor(concentrations, **options, device=device)
    weights = torch.tensor(weights, **options, device=device)
    labels = torch.multinomial(weights, num_points, replacement=True)
    x = VonMisesFisher(directions[labels], concentrations[labels]).sample()
    return x, labels, directions, concentrations, weights


def test_energy_matches_brute_force(device):
    directions, concentrations, weights = _mixture(device)
    energy = VMFMixtureEnergy(directions, concentrations, weights=weights)
    x = _unit(torch.randn(3, 5, directions.shape[1], dtype=torch.float64, device=device))
    components = VonMisesFisher(directions, concentrations).log_prob(x.unsqueeze(-2))
    expected = -torch.logsumexp(weights.log() + components, dim=-1)
    # Float64 on both sides; only the summation order differs.
    torch.testing.assert_close(energy(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(energy.log_prob(x), -expected, rtol=1e-12, atol=1e-12)


def test_energy_normalizes_on_the_circle():
    # On S^1 the density integrates to one; a 20000-point midpoint rule on a smooth periodic
    # integrand is exact to float64 rounding.
    directions, concentrations, weights = _mixture("cpu", dim=2, num_components=3)
    energy = VMFMixtureEnergy(directions, concentrations, weights=weights)
    angles = torch.linspace(0, 2 * math.pi, 20_001, dtype=torch.float64)[:-1]
    points = torch.stack([angles.cos(), angles.sin()], dim=-1)
    total = energy.log_prob(points).exp().sum() * (2 * math.pi / 20_000)
    assert total.item() == pytest.approx(1.0, abs=1e-10)


def test_gradient_matches_autograd(device):
    directions, concentrations, weights = _mixture(device)
    energy = VMFMixtureEnergy(directions, concentrations, weights=weights)
    x = _unit(torch.randn(7, directions.shape[1], dtype=torch.float64, device=device))
    point = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(energy(point).sum(), point)
    torch.testing.assert_close(energy.grad(x), expected, rtol=1e-10, atol=1e-12)


def test_fixed_point_stays_on_sphere_and_descends(device):
    directions, concentrations, weights = _mixture(device)
    energy = VMFMixtureEnergy(directions, concentrations, weights=weights)
    x = _unit(torch.randn(50, directions.shape[1], dtype=torch.float64, device=device))
    result = retrieve_on_sphere(energy, x, max_steps=50, return_trajectory=True)
    norms = result.states.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    energies = energy(result.trajectory)
    # The majorize-minimize argument gives exact monotonicity; 1e-12 absorbs float64 rounding.
    assert bool((energies.diff(dim=0) <= 1e-12).all())
    # The shared dynamics give the same path from unit queries.
    shared = retrieve(energy, x, "fixed_point", max_steps=50, tol=1e-6)
    torch.testing.assert_close(shared.states, result.states)


def test_projected_gradient_descends_to_fixed_point(device):
    directions, concentrations, weights = _mixture(device)
    energy = VMFMixtureEnergy(directions, concentrations, weights=weights)
    x = directions + 0.2 * torch.randn(directions.shape, dtype=torch.float64, device=device)
    result = retrieve_on_sphere(
        energy, x, method="gradient", max_steps=2000, tol=1e-12, return_trajectory=True
    )
    energies = energy(result.trajectory)
    assert bool((energies.diff(dim=0) <= 1e-12).all())
    assert bool(result.converged.all())
    # A stationary point of E on the sphere is a fixed point of the fixed-point map, because the
    # Euclidean gradient there is -|sum r kappa mu| times x.
    torch.testing.assert_close(energy.fixed_point(result.states), result.states, atol=1e-6, rtol=0)


def test_retrieve_on_sphere_rejects_bad_input():
    directions, concentrations, weights = _mixture("cpu")
    energy = VMFMixtureEnergy(directions, concentrations, weights=weights)
    with pytest.raises(ValueError, match="method"):
        retrieve_on_sphere(energy, directions, method="langevin")
    with pytest.raises(ValueError, match="zero vector"):
        retrieve_on_sphere(energy, torch.zeros(1, directions.shape[1], dtype=torch.float64))


def test_energy_rejects_bad_parameters():
    directions, concentrations, _ = _mixture("cpu")
    with pytest.raises(ValueError, match="unit norm"):
        VMFMixtureEnergy(2 * directions, concentrations)
    with pytest.raises(ValueError, match="concentrations"):
        VMFMixtureEnergy(directions, -concentrations)
    with pytest.raises(ValueError, match="concentrations"):
        VMFMixtureEnergy(directions, torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="weights"):
        VMFMixtureEnergy(directions, concentrations, weights=torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="not both"):
        VMFMixtureEnergy(
            directions, concentrations, weights=torch.ones(4) / 4, logits=torch.ones(4)
        )


@pytest.mark.parametrize("dim", [2, 3, 10, 100])
def test_solve_concentration_matches_scipy_root(dim):
    resultant = torch.tensor([0.001, 0.1, 0.5, 0.9, 0.999], dtype=torch.float64)
    ours = solve_concentration(dim, resultant)

    def length(kappa):
        return sp.ive(dim / 2, kappa) / sp.ive(dim / 2 - 1, kappa)

    # A_D(k) <= k / D, so the root lies above rbar D and half of that brackets it from below.
    expected = [
        brentq(lambda k, r=r: length(k) - r, 0.5 * r * dim, 1e6, xtol=1e-14)
        for r in resultant.tolist()
    ]
    # Newton reaches the root of our A_D to float64 resolution, but near rbar = 1 the root moves by
    # dA / (k A'(k)) ~ 2 k dA / (D - 1) relative to kappa, which turns the ~5e-11 error of A_D at
    # kappa = 5e4 into ~1e-7, hence 1e-6.
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6)


def test_em_recovers_planted_mixture(device):
    x, labels, directions, concentrations, weights = _planted(
        device, 10, [20.0, 50.0, 100.0, 200.0], [0.1, 0.2, 0.3, 0.4], 3000, seed=1
    )
    model = VMFMixture(4, seed=0).fit(x)
    ari = adjusted_rand_score(labels.cpu().numpy(), model.predict(x).cpu().numpy())
    # Separated components in D = 10: the Bayes classifier errs on a handful of points at most.
    assert ari >= 0.98
    order = (model.mean_directions_ @ directions.T).argmax(0)
    assert len(set(order.tolist())) == 4
    # About 300 to 1200 points per component: kappa's MLE has a relative standard error near
    # sqrt(1 / (N_k (D - 1))) < 2%, so 10% is five standard errors or more.
    torch.testing.assert_close(model.concentrations_[order], concentrations, rtol=0.1, atol=0)
    # Weights: binomial standard error at most 0.009 with 3000 points.
    torch.testing.assert_close(model.weights_[order], weights, atol=0.04, rtol=0)
    cosine = (model.mean_directions_[order] * directions).sum(-1)
    assert bool((cosine > 0.99).all())


def test_em_log_likelihood_never_decreases(device):
    # Overlapping, weak components in D = 3 make EM take many small steps.
    x, *_ = _planted(device, 3, [2.0, 3.0, 5.0], [0.3, 0.3, 0.4], 1500, seed=2)
    model = VMFMixture(3, max_iter=60, tol=0.0, seed=1).fit(x)
    history = torch.tensor(model.log_likelihood_history_, dtype=torch.float64)
    assert len(history) == 60
    # Exact EM is monotone; 1e-12 absorbs the rounding of a mean of 1500 float64 terms.
    assert bool((history.diff() >= -1e-12).all())
    assert history[-1] > history[0]


def test_em_energy_and_assign_agree(device):
    x, *_ = _planted(device, 5, [30.0, 30.0], [0.5, 0.5], 400, seed=3)
    model = VMFMixture(2, seed=0).fit(x)
    energy = model.energy()
    torch.testing.assert_close(energy.log_prob(x), model.log_likelihood(x))
    torch.testing.assert_close(energy.responsibilities(x), model.assign(x))
    assert model.predict(x).shape == (400,)


def test_em_checkpoint_and_resume(tmp_path):
    x, *_ = _planted("cpu", 4, [5.0, 8.0], [0.5, 0.5], 600, seed=4)
    path = tmp_path / "vmf.pt"
    full = VMFMixture(2, max_iter=30, tol=0.0, seed=0).fit(x)
    VMFMixture(2, max_iter=10, tol=0.0, seed=0).fit(x, checkpoint=path)
    resumed = VMFMixture(2, max_iter=30, tol=0.0, seed=0).fit(x, checkpoint=path, resume=True)
    assert resumed.n_iter_ == 30
    # The same iterations from the same state: identical up to float64 rounding.
    torch.testing.assert_close(resumed.mean_directions_, full.mean_directions_)
    torch.testing.assert_close(resumed.concentrations_, full.concentrations_)
    assert resumed.log_likelihood_history_ == pytest.approx(full.log_likelihood_history_)


def test_em_rejects_bad_input():
    model = VMFMixture(3)
    with pytest.raises(ValueError, match="not fitted"):
        model.energy()
    with pytest.raises(ValueError, match="unit norm"):
        model.fit(2 * _unit(torch.randn(10, 3, dtype=torch.float64)))
    with pytest.raises(ValueError, match="at least"):
        model.fit(_unit(torch.randn(2, 3, dtype=torch.float64)))
    with pytest.raises(ValueError, match="num_components"):
        VMFMixture(0)


def test_spherical_kmeans_separates_clusters(device):
    x, labels, *_ = _planted(device, 8, [100.0, 100.0, 100.0], [0.3, 0.3, 0.4], 600, seed=5)
    centroids, predicted = spherical_kmeans(x, 3, generator=torch.Generator(device).manual_seed(0))
    norms = centroids.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    # kappa = 100 in D = 8: the clusters are far apart, so k-means labels them exactly.
    assert adjusted_rand_score(labels.cpu().numpy(), predicted.cpu().numpy()) == 1.0


def test_em_stops_on_nan_and_keeps_parameters(monkeypatch):
    import pyro_am.models.vmf_mixture as module

    x, *_ = _planted("cpu", 4, [5.0, 8.0], [0.5, 0.5], 300, seed=6)
    solve = module.solve_concentration
    calls = []

    def fails_after_initialization(*args):
        # The first call is the initial M-step; the second, in EM iteration 0, returns NaN.
        calls.append(1)
        result = solve(*args)
        return result if len(calls) == 1 else torch.full_like(result, float("nan"))

    monkeypatch.setattr(module, "solve_concentration", fails_after_initialization)
    model = VMFMixture(2, max_iter=5, tol=0.0, seed=0)
    with pytest.raises(RuntimeError, match="iteration 0"):
        model.fit(x)
    assert bool(torch.isfinite(model.concentrations_).all())
    assert bool((model.concentrations_ > 0).all())
    assert len(model.log_likelihood_history_) == 1
    assert math.isfinite(model.log_likelihood_history_[0])
