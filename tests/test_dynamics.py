"""Tests of retrieve(): monotone descent, clamping, stopping, shapes and the Langevin law.

References: the closed-form fixed-point maps written out with ``torch.softmax`` over direct pairwise
distances, explicit bounds for stored patterns, and the exact stationary law of unadjusted Langevin
on a Gaussian energy.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_am import (
    DenseAMEnergy,
    Energy,
    GaussianKDEEnergy,
    GaussianMixtureEnergy,
    RetrievalResult,
    retrieve,
)
from pyro_am.dynamics import METHODS

HYPOTHESIS = settings(
    max_examples=15,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
KINDS = ["kde", "dense_am", "gmm_scalar", "gmm_component", "gmm_diagonal"]


def _randn(*shape, seed, device, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=generator).to(device, dtype)


def _make_energy(kind, memories, seed=0):
    num_memories, dim = memories.shape
    generator = torch.Generator().manual_seed(seed)
    options = dict(dtype=torch.float64, generator=generator)
    if kind == "kde":
        return GaussianKDEEnergy(memories, 0.3 + torch.rand((), **options).item(), block_elements=7)
    if kind == "dense_am":
        return DenseAMEnergy(memories, 0.5 + 4 * torch.rand((), **options).item(), block_elements=7)
    shape = {"gmm_scalar": (), "gmm_component": (num_memories,), "gmm_diagonal": memories.shape}
    scales = (0.3 + torch.rand(shape[kind], **options)).to(memories)
    logits = torch.randn(num_memories, **options).to(memories)
    return GaussianMixtureEnergy(memories, scales, logits=logits, block_elements=7)


class ShiftedQuadratic(Energy):
    """``E(x) = |x - c|^2 / 2`` with ``c`` the first memory: an energy without a fixed-point map."""

    def _energy(self, x):
        return 0.5 * (x - self.memories[0]).square().sum(-1)


def _rounding_size(energy, x):
    """Return the size of the terms the GEMM form cancels, in units of the energy."""
    max_norm_squared = energy.memories.square().sum(-1).max()
    return (x.square().sum(-1) + max_norm_squared) / energy.default_step_size + 1


# -- monotone descent and clamping ------------------------------------------------------------
@HYPOTHESIS
@given(
    seed=st.integers(0, 2**31 - 1),
    num_memories=st.integers(1, 12),
    dim=st.integers(1, 4),
    kind=st.sampled_from(KINDS),
    method=st.sampled_from(["fixed_point", "gradient"]),
    masked=st.booleans(),
)
def test_energy_never_increases(device, seed, num_memories, dim, kind, method, masked):
    # Both methods are monotone in exact arithmetic. Recomputing the energies of the trajectory in
    # float64 adds rounding of about eps times the cancelled terms, so 1e-12 times their size.
    memories = _randn(num_memories, dim, seed=seed, device=device)
    energy = _make_energy(kind, memories, seed)
    x0 = 1.5 * _randn(6, dim, seed=seed + 1, device=device)
    mask = None
    if masked:
        generator = torch.Generator().manual_seed(seed + 2)
        mask = (torch.rand(6, dim, generator=generator) < 0.4).to(device)

    result = retrieve(energy, x0, method, mask=mask, max_steps=25, tol=0.0, return_trajectory=True)
    energies = energy.energy(result.trajectory)
    increase = energies[1:] - energies[:-1]
    tolerance = 1e-12 * (_rounding_size(energy, result.trajectory[:-1]) + energies[:-1].abs())
    assert bool((increase <= tolerance).all()), float((increase - tolerance).max())

    if mask is not None:
        assert torch.equal(result.trajectory[:, mask], x0[mask].expand(len(result.trajectory), -1))


@pytest.mark.parametrize("method", ["fixed_point", "gradient"])
@pytest.mark.parametrize("kind", KINDS)
def test_energy_never_increases_float32(device, kind, method):
    # The same check in float32: energies carry float32 rounding of the cancelled terms, so the
    # tolerance is 64 eps (eps = 1.2e-7) times their size.
    memories = _randn(10, 3, seed=40, device=device, dtype=torch.float32)
    energy = _make_energy(kind, memories, seed=41)
    x0 = 1.5 * _randn(8, 3, seed=42, device=device, dtype=torch.float32)
    result = retrieve(energy, x0, method, max_steps=25, tol=0.0, return_trajectory=True)
    assert result.states.dtype == torch.float32

    energies = energy.energy(result.trajectory)
    eps = torch.finfo(torch.float32).eps
    size = _rounding_size(energy, result.trajectory[:-1]) + energies[:-1].abs()
    assert bool((energies[1:] - energies[:-1] <= 64 * eps * size).all())


@pytest.mark.parametrize("method", METHODS)
def test_masked_coordinates_stay_clamped(device, method):
    memories = _randn(15, 4, seed=43, device=device)
    energy = _make_energy("kde", memories, seed=44)
    x0 = _randn(3, 5, 4, seed=45, device=device)
    # One mask for every query, broadcast over the batch, observing coordinates 0 and 2.
    mask = torch.tensor([True, False, True, False], device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    result = retrieve(
        energy, x0, method, mask=mask, max_steps=10, generator=generator, return_trajectory=True
    )
    assert torch.equal(result.trajectory[..., mask], x0[..., mask].expand(11, 3, 5, 2))
    assert not torch.equal(result.states[..., ~mask], x0[..., ~mask])


# -- the clamped fixed-point step in closed form --------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_clamped_fixed_point_closed_form(device, kind):
    # One clamped step sets the missing coordinates to the responsibility-weighted mean of the
    # memories' missing coordinates, with responsibilities from the full current vector. With
    # per-component scales, each responsibility is also weighted by that component's precision.
    # The reference is written with torch.softmax over direct distances (float64 rounding).
    memories = _randn(9, 4, seed=46, device=device)
    energy = _make_energy(kind, memories, seed=47)
    x0 = _randn(6, 4, seed=48, device=device)
    generator = torch.Generator().manual_seed(49)
    mask = (torch.rand(6, 4, generator=generator) < 0.5).to(device)
    mask[:, 0] = False

    if kind == "kde":
        squared = (x0.unsqueeze(-2) - memories).square().sum(-1)
        weights = torch.softmax(-squared / (2 * energy.variance), -1).unsqueeze(-1)
        expected = (weights * memories).sum(-2)
    elif kind == "dense_am":
        weights = torch.softmax(energy.beta * x0 @ memories.T, -1).unsqueeze(-1)
        expected = (weights * memories).sum(-2)
    else:
        variances = energy.scales.square()
        if variances.dim() == 1:
            variances = variances.unsqueeze(-1)
        variances = variances.expand_as(memories)
        residual = x0.unsqueeze(-2) - memories
        log_joint = energy.log_weights - 0.5 * (
            residual.square() / variances + torch.log(2 * math.pi * variances)
        ).sum(-1)
        weights = torch.softmax(log_joint, -1).unsqueeze(-1) / variances
        expected = (weights * memories).sum(-2) / weights.sum(-2)

    result = retrieve(energy, x0, "fixed_point", mask=mask, max_steps=1, tol=0.0)
    assert torch.equal(result.states[mask], x0[mask])
    torch.testing.assert_close(result.states[~mask], expected[~mask], rtol=0, atol=1e-12)


# -- stored patterns --------------------------------------------------------------------------
def _stored_pattern_bound(memories, variance):
    """Bound |F(x_n) - x_n|_inf by sum_{m != n} exp(-|x_m - x_n|^2 / (2 h^2)) |x_m - x_n|_inf."""
    difference = memories.unsqueeze(0) - memories.unsqueeze(1)
    weights = torch.exp(-difference.square().sum(-1) / (2 * variance))
    weights.fill_diagonal_(0.0)
    return (weights * difference.abs().amax(-1)).sum(-1)


def _separated_memories(device, radius=None):
    # Eight corners of a cube of side 2: every pair of memories is at least 2 apart.
    corners = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0], dtype=torch.float64)] * 3)
    corners = corners.to(device)
    if radius is not None:
        corners = radius * corners / corners.norm(dim=-1, keepdim=True)
    return corners


@pytest.mark.parametrize("bandwidth", [0.6, 0.4, 0.25])
def test_kde_patterns_fixed_as_bandwidth_shrinks(device, bandwidth):
    # F(x_n) - x_n = sum_{m != n} w_m (x_m - x_n) with w_m <= exp(logit_m - logit_n), which gives
    # the bound below, which falls like exp(-2 / h^2). It holds in exact arithmetic, so the check
    # allows 1e-12 for float64 rounding.
    memories = _separated_memories(device)
    energy = GaussianKDEEnergy(memories, bandwidth)
    bound = _stored_pattern_bound(memories, bandwidth**2)
    error = (energy.fixed_point(memories) - memories).abs().amax(-1)
    assert bool((error <= bound + 1e-12).all())
    if bandwidth == 0.25:
        assert float(bound.max()) < 1e-12

    noisy = memories + 0.1 * _randn(8, 3, seed=50, device=device)
    result = retrieve(energy, noisy, "fixed_point", max_steps=200, tol=1e-12)
    assert bool(result.converged.all())
    torch.testing.assert_close(result.states, memories, rtol=0, atol=float(bound.max()) + 1e-10)


@pytest.mark.parametrize("beta", [2.0, 5.0, 30.0])
def test_dense_am_patterns_fixed_as_beta_grows(device, beta):
    # With equal norms, beta (x_m . x_n - |x_n|^2) = -beta |x_m - x_n|^2 / 2, so the KDE bound with
    # h^2 = 1 / beta holds for the modern Hopfield update as well.
    memories = _separated_memories(device, radius=2.0)
    energy = DenseAMEnergy(memories, beta)
    bound = _stored_pattern_bound(memories, 1 / beta)
    error = (energy.fixed_point(memories) - memories).abs().amax(-1)
    assert bool((error <= bound + 1e-12).all())
    if beta == 30.0:
        assert float(bound.max()) < 1e-12


# -- stopping, steps and shapes ---------------------------------------------------------------
@pytest.mark.parametrize("method", ["fixed_point", "gradient"])
def test_per_query_convergence_and_steps(device, method):
    memories = _separated_memories(device)
    energy = GaussianKDEEnergy(memories, 0.3)
    x0 = torch.stack(
        [
            memories[0],  # moves by 2 exp(-2 / h^2) = 4e-10 < tol, so it stops after one step
            memories[3] + 0.05,  # converges in a few steps
            torch.tensor(
                [0.05, 0.02, 0.01], dtype=torch.float64, device=device
            ),  # flat centre, too slow for 4 steps
        ]
    )
    tol = 1e-9
    result = retrieve(energy, x0, method, max_steps=4, tol=tol, return_trajectory=True)

    assert result.steps[0] == 1
    assert bool(result.converged[0])
    assert not bool(result.converged[2])
    assert result.steps[2] == 4
    assert result.trajectory.shape == (int(result.steps.max()) + 1, 3, 3)
    for query in range(3):
        steps = int(result.steps[query])
        path = result.trajectory[:, query]
        changes = (path[1 : steps + 1] - path[:steps]).abs().amax(-1)
        # Every step but the last moved more than tol, and the last one decides convergence.
        assert bool((changes[:-1] > tol).all())
        assert bool(changes[-1] <= tol) == bool(result.converged[query])
        # After stopping, a query repeats its final state.
        assert torch.equal(path[steps:], result.states[query].expand(len(path) - steps, -1))

    # Stopping is per query: each query alone takes the same steps to the same state.
    for query in range(3):
        alone = retrieve(energy, x0[query], method, max_steps=4, tol=tol)
        assert int(alone.steps) == int(result.steps[query])
        assert bool(alone.converged) == bool(result.converged[query])
        torch.testing.assert_close(alone.states, result.states[query], rtol=0, atol=1e-12)


def test_gradient_with_large_step_reaches_stationary_point(device):
    # A step 1000 times the mean-shift step overshoots, so backtracking must shrink it. A
    # stationary point of E_kde is a fixed point of F, so |F(x) - x| measures how far it stopped.
    memories = _randn(12, 2, seed=51, device=device)
    energy = GaussianKDEEnergy(memories, 0.5)
    x0 = _randn(5, 2, seed=52, device=device)
    step_size = 1000 * energy.default_step_size
    result = retrieve(energy, x0, "gradient", max_steps=500, tol=1e-10, step_size=step_size)
    assert bool(result.converged.all())
    assert bool((result.energies <= energy.energy(x0)).all())
    residual = (energy.fixed_point(result.states) - result.states).abs().max()
    assert float(residual) < 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_max_steps_zero_returns_start(device, method):
    energy = GaussianKDEEnergy(_randn(5, 2, seed=53, device=device), 0.5)
    x0 = _randn(3, 4, 2, seed=54, device=device)
    result = retrieve(energy, x0, method, max_steps=0, return_trajectory=True)
    assert torch.equal(result.states, x0)
    assert torch.equal(result.steps, torch.zeros(3, 4, dtype=torch.long, device=device))
    assert not bool(result.converged.any())
    assert result.trajectory.shape == (1, 3, 4, 2)
    torch.testing.assert_close(result.energies, energy.energy(x0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("batch_shape", [(), (7,), (3, 4)], ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_result_shapes(device, method, batch_shape):
    energy = GaussianMixtureEnergy(_randn(5, 2, seed=55, device=device), 0.7)
    x0 = _randn(*batch_shape, 2, seed=56, device=device)
    result = retrieve(energy, x0, method, max_steps=6, return_trajectory=True)

    assert isinstance(result, RetrievalResult)
    assert result.states.shape == (*batch_shape, 2)
    assert result.energies.shape == batch_shape
    assert result.steps.shape == batch_shape
    assert result.steps.dtype == torch.long
    assert result.converged.shape == batch_shape
    assert result.converged.dtype == torch.bool
    assert result.trajectory.shape == (int(result.steps.max()) + 1, *batch_shape, 2)
    assert torch.equal(result.trajectory[-1], result.states)
    torch.testing.assert_close(result.energies, energy.energy(result.states), rtol=0, atol=1e-12)
    assert retrieve(energy, x0, method, max_steps=6).trajectory is None
    if method == "langevin":
        assert bool((result.steps == 6).all())
        assert not bool(result.converged.any())


@pytest.mark.parametrize("method", METHODS)
def test_parameters_requiring_grad_build_no_graph(device, method):
    # retrieve() runs without autograd, so a differentiable bandwidth leaves the results detached,
    # as Langevin negatives for contrastive training need.
    bandwidth = torch.tensor(0.5, dtype=torch.float64, device=device, requires_grad=True)
    energy = GaussianKDEEnergy(_randn(5, 2, seed=69, device=device), bandwidth)
    result = retrieve(energy, _randn(4, 2, seed=70, device=device), method, max_steps=3)
    assert not result.states.requires_grad
    assert not result.energies.requires_grad
    assert energy.energy(result.states).requires_grad


@pytest.mark.parametrize("method", METHODS)
def test_empty_batch(device, method):
    energy = GaussianKDEEnergy(_randn(5, 2, seed=67, device=device), 0.5)
    x0 = torch.zeros(0, 3, 2, dtype=torch.float64, device=device)
    result = retrieve(energy, x0, method, max_steps=3, return_trajectory=True)
    assert result.states.shape == (0, 3, 2)
    assert result.energies.shape == (0, 3)
    assert result.steps.shape == (0, 3)
    expected_length = 4 if method == "langevin" else 1
    assert result.trajectory.shape == (expected_length, 0, 3, 2)


def test_gradient_on_energy_without_fixed_point(device):
    # The gradient comes from autograd. A step of 0.5 halves the distance to c, so the run stops
    # once a step moves less than tol = 1e-13, at a distance below 1e-13 from c.
    memories = _randn(2, 3, seed=57, device=device)
    energy = ShiftedQuadratic(memories)
    x0 = _randn(4, 3, seed=58, device=device)
    result = retrieve(energy, x0, "gradient", step_size=0.5, max_steps=200, tol=1e-13)
    assert bool(result.converged.all())
    torch.testing.assert_close(result.states, memories[0].expand(4, 3), rtol=0, atol=1e-12)


# -- Langevin ---------------------------------------------------------------------------------
def _gaussian_energy(kind, mean, scale):
    if kind == "gmm":
        return GaussianMixtureEnergy(mean.unsqueeze(0), scale)
    if kind == "kde":
        return GaussianKDEEnergy(mean.unsqueeze(0), scale)
    return ShiftedQuadratic(mean.unsqueeze(0))


@pytest.mark.parametrize(
    "kind, scale", [("gmm", 0.8), ("kde", 0.6), ("quadratic", 1.0)], ids=["gmm", "kde", "quad"]
)
def test_langevin_gaussian_stationary_law(device, kind, scale):
    # On E = |x - mu|^2 / (2 s^2) the ULA step is x' = mu + a (x - mu) + sqrt(2 eta T) eps with
    # a = 1 - eta / s^2, so the stationary variance v solves v = a^2 v + 2 eta T:
    #     v = 2 eta T / (1 - a^2) = T s^2 / (1 - eta / (2 s^2)).
    # Chains start at mu, so after t steps the variance is v (1 - a^(2t)) exactly, and a^(2t) is
    # below 1e-15 here. The chains are independent draws, so with n draws a sample mean has
    # standard error sqrt(v / n), the second moment about mu sqrt(2 / n) v and a covariance v /
    # sqrt(n). Every check allows 4.5 standard errors (two-sided p = 7e-6 under the exact law).
    temperature, num_chains, dim = 0.5, 8000, 2
    step_size = 0.25 * scale**2
    mean = torch.tensor([1.0, -2.0], dtype=torch.float64, device=device)
    energy = _gaussian_energy(kind, mean, scale)
    a = 1 - step_size / scale**2
    num_steps = math.ceil(math.log(1e-15) / (2 * math.log(a)))
    variance = temperature * scale**2 / (1 - step_size / (2 * scale**2))

    generator = torch.Generator(device=device).manual_seed(1234)
    x0 = mean.expand(num_chains, dim)
    result = retrieve(
        energy,
        x0,
        "langevin",
        max_steps=num_steps,
        step_size=step_size,
        temperature=temperature,
        generator=generator,
    )
    samples = result.states - mean
    num_draws = num_chains * dim

    sample_mean = samples.mean(0)
    assert bool((sample_mean.abs() <= 4.5 * math.sqrt(variance / num_chains)).all())
    second_moment = samples.square().mean()
    standard_error = math.sqrt(2 / num_draws) * variance
    assert abs(float(second_moment) - variance) <= 4.5 * standard_error
    covariance = (samples[:, 0] * samples[:, 1]).mean()
    assert abs(float(covariance)) <= 4.5 * variance / math.sqrt(num_chains)
    # The discretization bias (a factor 1 / (1 - 1/8) here) is resolved: T s^2 alone is rejected.
    assert abs(float(second_moment) - temperature * scale**2) > 4.5 * standard_error


def test_langevin_reproducible_with_generator(device):
    energy = GaussianKDEEnergy(_randn(6, 2, seed=59, device=device), 0.5)
    x0 = _randn(4, 2, seed=60, device=device)

    def run(seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        return retrieve(energy, x0, "langevin", max_steps=20, generator=generator).states

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_langevin_default_step_is_tenth_of_energy_step(device):
    # The default Langevin step is a tenth of the energy's step (h^2 / 10 for a KDE). One step is
    # compared with the update written out from the same generator seed, both in float64.
    energy = GaussianKDEEnergy(_randn(6, 2, seed=61, device=device), 0.5)
    x0 = _randn(4, 2, seed=62, device=device)
    generator = torch.Generator(device=device).manual_seed(3)
    result = retrieve(energy, x0, "langevin", max_steps=1, temperature=2.0, generator=generator)

    step_size = 0.1 * 0.25
    generator = torch.Generator(device=device).manual_seed(3)
    noise = torch.randn(x0.shape, dtype=x0.dtype, device=device, generator=generator)
    expected = x0 - step_size * energy.grad(x0) + math.sqrt(2 * step_size * 2.0) * noise
    torch.testing.assert_close(result.states, expected, rtol=0, atol=1e-14)


# -- bad input --------------------------------------------------------------------------------
def test_bad_arguments_raise(device):
    energy = GaussianKDEEnergy(_randn(5, 3, seed=63, device=device), 0.5)
    x0 = _randn(4, 3, seed=64, device=device)
    cases = [
        (dict(method="newton"), ValueError, "method must be one of"),
        (dict(max_steps=-1), ValueError, r"max_steps must be an integer in \[0, inf\]"),
        (dict(max_steps=2.5), TypeError, "max_steps must be an integer"),
        (dict(tol=-1e-3), ValueError, r"tol must be finite and in \[0, inf\)"),
        (dict(tol=float("nan")), ValueError, "tol must be finite"),
        (dict(temperature=0.0), ValueError, "temperature must be finite and in"),
        (dict(temperature=-1.0, method="langevin"), ValueError, "temperature must be finite"),
        (dict(step_size=0.0), ValueError, "step_size must be finite and in"),
        (dict(step_size=-0.1, method="gradient"), ValueError, "step_size must be finite"),
        (dict(step_size=float("inf")), ValueError, "step_size must be finite"),
        (dict(mask=torch.ones(4, 2, dtype=torch.bool)), ValueError, "mask of shape"),
        (dict(mask=torch.ones(4, 3)), TypeError, "mask must be a boolean tensor"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            retrieve(energy, x0, **kwargs)


def test_bad_queries_raise(device):
    energy = GaussianKDEEnergy(_randn(5, 3, seed=65, device=device), 0.5)
    with pytest.raises(ValueError, match=r"x0 must have shape \(\.\.\., 3\)"):
        retrieve(energy, torch.zeros(4, 2, dtype=torch.float64, device=device))
    with pytest.raises(TypeError, match="x0 has dtype torch.float32"):
        retrieve(energy, torch.zeros(4, 3, dtype=torch.float32, device=device))
    with_nan = torch.zeros(4, 3, dtype=torch.float64, device=device)
    with_nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match="x0 contains 1 NaN or infinite"):
        retrieve(energy, with_nan)
    with pytest.raises(TypeError, match="energy must be a pyro_am Energy"):
        retrieve(lambda x: x.square().sum(-1), with_nan)


def test_generator_on_other_device_raises(device):
    energy = GaussianKDEEnergy(_randn(5, 3, seed=68, device=device), 0.5)
    if device.type == "cpu":
        # A CPU-only build cannot create a CUDA generator, and retrieve() reads only .device.
        generator = SimpleNamespace(device=torch.device("cuda"))
    else:
        generator = torch.Generator(device="cpu")
    x0 = torch.zeros(3, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="generator is on device"):
        retrieve(energy, x0, "langevin", generator=generator)


def test_fixed_point_without_map_raises(device):
    energy = ShiftedQuadratic(_randn(2, 3, seed=66, device=device))
    with pytest.raises(ValueError, match="method='fixed_point' needs a closed-form fixed-point"):
        retrieve(energy, torch.zeros(3, dtype=torch.float64, device=device))
