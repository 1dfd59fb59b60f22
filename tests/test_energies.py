"""Tests of the energies against brute force, SciPy, scikit-learn and torch.distributions.

The brute-force references compute pairwise differences ``x[:, None] - X[None]`` directly (no GEMM
expansion) and reduce with ``torch.logsumexp`` in float64. For energies of order one built from
data of order one, float64 results then agree to about ``1e-13`` absolute. The tests allow
``1e-10``, which no chunking or sign error could pass.
"""

import math

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.special
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.neighbors import KernelDensity
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from pyro_am import DenseAMEnergy, Energy, GaussianKDEEnergy, GaussianMixtureEnergy

BATCH_SHAPES = [(), (7,), (3, 4)]
# None is the default block. With 40 memories, 100 logits a block gives query chunks of two
# queries, and 16 logits a block gives one query and 16 memories a block (three memory chunks).
BLOCKS = [None, 100, 16]
NUM_MEMORIES, DIM = 40, 3
FLOAT64_ATOL = 1e-10
HYPOTHESIS = settings(
    max_examples=12,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _randn(*shape, seed, device, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=generator).to(device, dtype)


def _mixture_parameters(scale_shape, device, num_components=NUM_MEMORIES, dim=DIM):
    generator = torch.Generator().manual_seed(11)
    full_shape = {"scalar": (), "component": (num_components,), "diagonal": (num_components, dim)}
    scales = 0.5 + torch.rand(full_shape[scale_shape], dtype=torch.float64, generator=generator)
    logits = torch.randn(num_components, dtype=torch.float64, generator=generator)
    return scales.to(device), logits.to(device)


# -- brute-force references -----------------------------------------------------------------------
def kde_energy_reference(memories, bandwidth, x):
    squared = (x.unsqueeze(-2) - memories).square().sum(-1)
    return -torch.logsumexp(-squared / (2 * bandwidth**2), dim=-1)


def kde_fixed_point_reference(memories, bandwidth, x):
    squared = (x.unsqueeze(-2) - memories).square().sum(-1)
    return torch.softmax(-squared / (2 * bandwidth**2), dim=-1) @ memories


def dense_am_energy_reference(memories, beta, x):
    num_memories = memories.shape[0]
    max_norm = memories.norm(dim=-1).max()
    logits = beta * (x.unsqueeze(-2) * memories).sum(-1)
    return (
        -torch.logsumexp(logits, dim=-1) / beta
        + 0.5 * x.square().sum(-1)
        + math.log(num_memories) / beta
        + 0.5 * max_norm**2
    )


def dense_am_fixed_point_reference(memories, beta, x):
    logits = beta * (x.unsqueeze(-2) * memories).sum(-1)
    return torch.softmax(logits, dim=-1) @ memories


def _full_variances(means, scales):
    variances = scales.square()
    if variances.dim() == 1:
        variances = variances.unsqueeze(-1)
    return variances.expand_as(means)


def mixture_log_joint_reference(means, scales, log_weights, x):
    """Return log pi_k + log N(x; mu_k, diag(s_k^2)) of shape (..., K) from the density formula."""
    variances = _full_variances(means, scales)
    residual = x.unsqueeze(-2) - means
    log_normal = -0.5 * (residual.square() / variances + torch.log(2 * math.pi * variances))
    return log_weights + log_normal.sum(-1)


def mixture_energy_reference(means, scales, log_weights, x):
    return -torch.logsumexp(mixture_log_joint_reference(means, scales, log_weights, x), dim=-1)


def mixture_fixed_point_reference(means, scales, log_weights, x):
    responsibilities = torch.softmax(
        mixture_log_joint_reference(means, scales, log_weights, x), dim=-1
    )
    precisions = _full_variances(means, scales).reciprocal()
    weighted = responsibilities @ (means * precisions)
    return weighted / (responsibilities @ precisions)


def _energy_cases(device, block_elements, dtype=torch.float64):
    """Return (name, energy, energy reference, fixed-point reference) for every energy type."""
    memories = _randn(NUM_MEMORIES, DIM, seed=1, device=device, dtype=dtype)
    bandwidth, beta = 0.8, 1.7
    cases = [
        (
            "kde",
            GaussianKDEEnergy(memories, bandwidth, block_elements),
            lambda x, X=memories: kde_energy_reference(X, bandwidth, x),
            lambda x, X=memories: kde_fixed_point_reference(X, bandwidth, x),
        ),
        (
            "dense_am",
            DenseAMEnergy(memories, beta, block_elements),
            lambda x, X=memories: dense_am_energy_reference(X, beta, x),
            lambda x, X=memories: dense_am_fixed_point_reference(X, beta, x),
        ),
    ]
    for scale_shape in ["scalar", "component", "diagonal"]:
        scales, logits = _mixture_parameters(scale_shape, device)
        scales, logits = scales.to(dtype), logits.to(dtype)
        energy = GaussianMixtureEnergy(
            memories, scales, logits=logits, block_elements=block_elements
        )
        log_weights = torch.log_softmax(logits, -1)
        cases.append(
            (
                f"gmm_{scale_shape}",
                energy,
                lambda x, X=memories, s=scales, w=log_weights: mixture_energy_reference(X, s, w, x),
                lambda x, X=memories, s=scales, w=log_weights: mixture_fixed_point_reference(
                    X, s, w, x
                ),
            )
        )
    return cases


CASE_NAMES = ["kde", "dense_am", "gmm_scalar", "gmm_component", "gmm_diagonal"]


def _case(device, name, block_elements=None, dtype=torch.float64):
    return next(case for case in _energy_cases(device, block_elements, dtype) if case[0] == name)


# -- energies, gradients and fixed points -------------------------------------------------------
@pytest.mark.parametrize("block_elements", BLOCKS)
@pytest.mark.parametrize("batch_shape", BATCH_SHAPES, ids=str)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_energy_matches_brute_force(device, name, batch_shape, block_elements):
    _, energy, energy_reference, fixed_point_reference = _case(device, name, block_elements)
    x = _randn(*batch_shape, DIM, seed=2, device=device)

    value = energy.energy(x)
    assert value.shape == batch_shape
    torch.testing.assert_close(value, energy_reference(x), rtol=0, atol=FLOAT64_ATOL)
    torch.testing.assert_close(energy(x), value, rtol=0, atol=0)

    fixed_point = energy.fixed_point(x)
    assert fixed_point.shape == (*batch_shape, DIM)
    torch.testing.assert_close(fixed_point, fixed_point_reference(x), rtol=0, atol=FLOAT64_ATOL)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_energy_many_memories_both_chunkings(device, name):
    # 2100 memories exceed the 1024-memory minimum chunk, so a block of 4096 logits gives four
    # queries by 1024 memories: three query chunks and three memory chunks.
    memories = _randn(2100, 2, seed=3, device=device)
    x = _randn(3, 4, 2, seed=4, device=device)
    scales, logits = _mixture_parameters("diagonal", device, num_components=2100, dim=2)
    if name == "kde":
        energy = GaussianKDEEnergy(memories, 0.3, block_elements=4096)
        reference = kde_energy_reference(memories, 0.3, x)
    elif name == "dense_am":
        energy = DenseAMEnergy(memories, 3.0, block_elements=4096)
        reference = dense_am_energy_reference(memories, 3.0, x)
    else:
        scale_shape = name.removeprefix("gmm_")
        scales = {"scalar": scales[0, 0], "component": scales[:, 0], "diagonal": scales}[
            scale_shape
        ]
        energy = GaussianMixtureEnergy(memories, scales, logits=logits, block_elements=4096)
        reference = mixture_energy_reference(memories, scales, torch.log_softmax(logits, -1), x)
    torch.testing.assert_close(energy.energy(x), reference, rtol=0, atol=FLOAT64_ATOL)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_float32_matches_float64(device, name):
    # The GEMM form |x|^2 - 2 x.m + |m|^2 cancels terms of size (|x|^2 + |m|^2) / h^2, at most
    # about 30 here, each rounded to float32 eps = 1.2e-7, so errors are near 30 eps = 3.6e-6.
    # The energies and fixed points are allowed 1e-4: 25 times that, but far below any modelling
    # error.
    _, energy64, _, _ = _case(device, name, block_elements=16)
    _, energy32, _, _ = _case(device, name, block_elements=16, dtype=torch.float32)
    x = _randn(3, 4, DIM, seed=5, device=device)

    value32 = energy32.energy(x.float())
    assert value32.dtype == torch.float32
    torch.testing.assert_close(value32.double(), energy64.energy(x), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        energy32.fixed_point(x.float()).double(), energy64.fixed_point(x), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES, ids=str)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_closed_form_grad_matches_autograd(device, name, batch_shape):
    # Reference: autograd of the brute-force energy. Both are float64 evaluations of the same
    # derivative, so they agree to rounding (1e-10 absolute for gradients of order one to ten).
    _, energy, energy_reference, _ = _case(device, name, block_elements=16)
    x = _randn(*batch_shape, DIM, seed=6, device=device).requires_grad_(True)
    (expected,) = torch.autograd.grad(energy_reference(x).sum(), x)

    grad = energy.grad(x.detach())
    assert grad.shape == (*batch_shape, DIM)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=FLOAT64_ATOL)

    value, joint_grad = energy.energy_and_grad(x.detach())
    torch.testing.assert_close(value, energy_reference(x.detach()), rtol=0, atol=FLOAT64_ATOL)
    torch.testing.assert_close(joint_grad, expected, rtol=1e-10, atol=FLOAT64_ATOL)

    (streamed,) = torch.autograd.grad(energy.energy(x).sum(), x)
    torch.testing.assert_close(streamed, expected, rtol=1e-10, atol=FLOAT64_ATOL)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_responsibilities_match_softmax(device, name):
    _, energy, _, _ = _case(device, name)
    x = _randn(3, 4, DIM, seed=7, device=device)
    memories = energy.memories
    if name == "kde":
        logits = -(x.unsqueeze(-2) - memories).square().sum(-1) / (2 * energy.variance)
    elif name == "dense_am":
        logits = energy.beta * (x.unsqueeze(-2) * memories).sum(-1)
    else:
        logits = mixture_log_joint_reference(memories, energy.scales, energy.log_weights, x)
    responsibilities = energy.responsibilities(x)
    assert responsibilities.shape == (3, 4, NUM_MEMORIES)
    torch.testing.assert_close(responsibilities, torch.softmax(logits, -1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale_shape", ["scalar", "component", "diagonal"])
def test_mixture_component_log_likelihoods(device, scale_shape):
    # Reference: the Gaussian log density written out per component (float64 rounding).
    means = _randn(6, DIM, seed=34, device=device)
    scales, logits = _mixture_parameters(scale_shape, device, num_components=6)
    energy = GaussianMixtureEnergy(means, scales, logits=logits)
    x = _randn(3, 4, DIM, seed=35, device=device)
    expected = mixture_log_joint_reference(means, scales, torch.log_softmax(logits, -1), x)

    log_joint = energy.component_log_likelihoods(x)
    assert log_joint.shape == (3, 4, 6)
    torch.testing.assert_close(log_joint, expected, rtol=0, atol=FLOAT64_ATOL)
    torch.testing.assert_close(
        torch.logsumexp(log_joint, -1), -energy.energy(x), rtol=0, atol=FLOAT64_ATOL
    )


@HYPOTHESIS
@given(
    seed=st.integers(0, 2**31 - 1),
    num_memories=st.integers(1, 30),
    dim=st.integers(1, 5),
    num_queries=st.integers(1, 9),
    block_elements=st.integers(1, 200),
)
def test_energies_random_blocks_match_brute_force(
    device, seed, num_memories, dim, num_queries, block_elements
):
    # Random sizes and block sizes, same brute-force references and float64 tolerance as above.
    # The dense AM energy is also checked against its lower bound: with M = max_n |x_n|,
    # E_dam(xi) >= -M |xi| + |xi|^2 / 2 + M^2 / 2 = (|xi| - M)^2 / 2 >= 0.
    memories = _randn(num_memories, dim, seed=seed, device=device)
    x = 1.5 * _randn(num_queries, dim, seed=seed + 1, device=device)
    scales = 0.4 + _randn(num_memories, dim, seed=seed + 2, device=device).abs()
    log_weights = torch.log_softmax(_randn(num_memories, seed=seed + 3, device=device), -1)

    kde = GaussianKDEEnergy(memories, 0.7, block_elements)
    expected = kde_energy_reference(memories, 0.7, x)
    torch.testing.assert_close(kde.energy(x), expected, rtol=0, atol=FLOAT64_ATOL)

    dense_am = DenseAMEnergy(memories, 2.5, block_elements)
    value = dense_am.energy(x)
    torch.testing.assert_close(
        value, dense_am_energy_reference(memories, 2.5, x), rtol=0, atol=FLOAT64_ATOL
    )
    max_norm = memories.norm(dim=-1).max()
    lower_bound = 0.5 * (x.norm(dim=-1) - max_norm).square()
    assert bool((value >= lower_bound - FLOAT64_ATOL).all())

    mixture = GaussianMixtureEnergy(
        memories, scales, logits=log_weights, block_elements=block_elements
    )
    expected = mixture_energy_reference(memories, scales, log_weights, x)
    torch.testing.assert_close(mixture.energy(x), expected, rtol=0, atol=FLOAT64_ATOL)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_grad_is_differentiable(device, name):
    # Hessian-vector products through the closed-form gradient, as score-based objectives use,
    # against double backward through the brute-force energy (float64 rounding).
    _, energy, energy_reference, _ = _case(device, name, block_elements=16)
    x = _randn(5, DIM, seed=36, device=device).requires_grad_(True)
    direction = _randn(5, DIM, seed=37, device=device)

    (hvp,) = torch.autograd.grad((energy.grad(x) * direction).sum(), x)
    (reference_grad,) = torch.autograd.grad(energy_reference(x).sum(), x, create_graph=True)
    (expected,) = torch.autograd.grad((reference_grad * direction).sum(), x)
    torch.testing.assert_close(hvp, expected, rtol=1e-10, atol=FLOAT64_ATOL)


# -- normalized densities ---------------------------------------------------------------------
@pytest.mark.parametrize("parameterization", ["weights", "logits", "uniform"])
@pytest.mark.parametrize("scale_shape", ["scalar", "component", "diagonal"])
def test_mixture_log_prob_matches_torch(device, scale_shape, parameterization):
    # Reference: torch.distributions.MixtureSameFamily with diagonal Normal components, which
    # evaluates the same normalized density without the GEMM expansion (float64 rounding).
    means = _randn(6, DIM, seed=8, device=device)
    scales, logits = _mixture_parameters(scale_shape, device, num_components=6)
    weights = torch.softmax(logits, -1)
    if parameterization == "weights":
        energy = GaussianMixtureEnergy(means, scales, weights=weights, block_elements=5)
    elif parameterization == "logits":
        energy = GaussianMixtureEnergy(means, scales, logits=logits, block_elements=5)
    else:
        energy = GaussianMixtureEnergy(means, scales, block_elements=5)
        weights = torch.full((6,), 1 / 6, dtype=torch.float64, device=device)

    component_scales = _full_variances(means, scales).sqrt()
    reference = MixtureSameFamily(
        Categorical(probs=weights), Independent(Normal(means, component_scales), 1)
    )
    x = 2 * _randn(3, 4, DIM, seed=9, device=device)
    torch.testing.assert_close(energy.log_prob(x), reference.log_prob(x), rtol=0, atol=1e-10)
    torch.testing.assert_close(energy.weights, weights, rtol=0, atol=1e-15)


def test_kde_log_prob_matches_scipy(device):
    # Reference: distances from scipy.spatial.distance.cdist and scipy.special.logsumexp in
    # float64 numpy, normalized by N (2 pi h^2)^(D/2). scipy.stats.gaussian_kde scales its kernel
    # by the data covariance, so it is not the same density.
    memories = _randn(NUM_MEMORIES, DIM, seed=10, device=device)
    x = _randn(25, DIM, seed=11, device=device)
    bandwidth = 0.6
    energy = GaussianKDEEnergy(memories, bandwidth, block_elements=16)

    squared = scipy.spatial.distance.cdist(x.cpu().numpy(), memories.cpu().numpy(), "sqeuclidean")
    expected = (
        scipy.special.logsumexp(-squared / (2 * bandwidth**2), axis=1)
        - math.log(NUM_MEMORIES)
        - 0.5 * DIM * math.log(2 * math.pi * bandwidth**2)
    )
    np.testing.assert_allclose(energy.log_prob(x).cpu().numpy(), expected, rtol=1e-12, atol=1e-12)


def test_kde_log_prob_matches_sklearn(device):
    # Reference: sklearn.neighbors.KernelDensity with the Gaussian kernel and atol = rtol = 0,
    # which sums the kernels exactly. Queries sit near the data so |log p| is of order 5 and
    # float64 rounding is far below the 1e-10 relative tolerance.
    memories = _randn(60, DIM, seed=12, device=device)
    x = 0.7 * _randn(30, DIM, seed=13, device=device)
    bandwidth = 0.45
    energy = GaussianKDEEnergy(memories, bandwidth, block_elements=50)

    density = KernelDensity(kernel="gaussian", bandwidth=bandwidth).fit(memories.cpu().numpy())
    expected = density.score_samples(x.cpu().numpy())
    np.testing.assert_allclose(energy.log_prob(x).cpu().numpy(), expected, rtol=1e-10, atol=0)


def test_dense_am_has_no_log_prob(device):
    energy = DenseAMEnergy(_randn(4, 2, seed=14, device=device), 1.0)
    assert not energy.has_log_prob
    with pytest.raises(NotImplementedError, match="no closed-form normalizer"):
        energy.log_prob(torch.zeros(2, dtype=torch.float64, device=device))


# -- the equal-norm identity between dense AM and KDE -------------------------------------------
@HYPOTHESIS
@given(
    seed=st.integers(0, 2**31 - 1),
    num_memories=st.integers(1, 30),
    dim=st.integers(1, 6),
    radius=st.floats(0.1, 3.0),
    beta=st.floats(0.05, 20.0),
)
def test_equal_norm_identity(device, seed, num_memories, dim, radius, beta):
    # When every |x_n| = M, beta E_dam(xi) = E_kde(xi; h^2 = 1/beta) + log N exactly, and the two
    # fixed-point maps coincide. Both sides are float64 GEMM-form evaluations whose terms scale
    # with beta (|xi|^2 + M^2), so the tolerance is 1e-10 relative to that size.
    directions = _randn(num_memories, dim, seed=seed, device=device)
    memories = radius * directions / directions.norm(dim=-1, keepdim=True)
    xi = 2 * radius * _randn(5, dim, seed=seed + 1, device=device)
    block_elements = 1 + seed % 50
    dense_am = DenseAMEnergy(memories, beta, block_elements)
    kde = GaussianKDEEnergy(memories, 1 / math.sqrt(beta), block_elements)

    size = beta * (xi.square().sum(-1) + radius**2) + math.log(num_memories) + 1
    difference = beta * dense_am.energy(xi) - kde.energy(xi) - math.log(num_memories)
    assert bool((difference.abs() <= 1e-10 * size).all())
    torch.testing.assert_close(
        dense_am.fixed_point(xi), kde.fixed_point(xi), rtol=1e-9, atol=1e-9 * radius
    )


# -- differentiating wrt the parameters ---------------------------------------------------------
@pytest.mark.parametrize("block_elements", BLOCKS)
def test_kde_autograd_wrt_memories_and_bandwidth(device, block_elements):
    # Reference: autograd of the brute-force KDE energy and log density. The streamed blocks
    # work in place, so this checks that autograd through them is still exact (float64 rounding).
    memories = _randn(NUM_MEMORIES, DIM, seed=15, device=device).requires_grad_(True)
    bandwidth = torch.tensor(0.7, dtype=torch.float64, device=device, requires_grad=True)
    x = _randn(7, DIM, seed=16, device=device)
    energy = GaussianKDEEnergy(memories, bandwidth, block_elements)
    assert energy.bandwidth.requires_grad

    streamed = torch.autograd.grad(energy.log_prob(x).sum(), (memories, bandwidth))
    log_normalizer = math.log(NUM_MEMORIES) + 0.5 * DIM * torch.log(2 * math.pi * bandwidth**2)
    reference_log_prob = -kde_energy_reference(memories, bandwidth, x) - log_normalizer
    expected = torch.autograd.grad(reference_log_prob.sum(), (memories, bandwidth))
    for got, want in zip(streamed, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=FLOAT64_ATOL)


def test_kde_bandwidth_of_other_dtype_keeps_grad(device):
    # A float32 bandwidth leaf with float64 memories is cast to float64, and its gradient flows
    # back to the leaf. The reference is brute-force autograd in float64, compared in float32.
    memories = _randn(10, 2, seed=17, device=device)
    bandwidth = torch.tensor(0.5, dtype=torch.float32, device=device, requires_grad=True)
    energy = GaussianKDEEnergy(memories, bandwidth)
    assert energy.bandwidth.dtype == torch.float64
    assert energy.default_step_size == pytest.approx(0.25)
    x = _randn(4, 2, seed=18, device=device)
    (grad,) = torch.autograd.grad(energy.energy(x).sum(), bandwidth)

    bandwidth64 = bandwidth.detach().double().requires_grad_(True)
    (expected,) = torch.autograd.grad(
        kde_energy_reference(memories, bandwidth64, x).sum(), bandwidth64
    )
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, expected.float(), rtol=1e-6, atol=1e-6)


def test_dense_am_autograd_wrt_memories_and_beta(device):
    memories = _randn(NUM_MEMORIES, DIM, seed=19, device=device).requires_grad_(True)
    beta = torch.tensor(1.3, dtype=torch.float64, device=device, requires_grad=True)
    x = _randn(7, DIM, seed=20, device=device)
    energy = DenseAMEnergy(memories, beta, block_elements=16)

    streamed = torch.autograd.grad(energy.energy(x).sum(), (memories, beta))
    expected = torch.autograd.grad(
        dense_am_energy_reference(memories, beta, x).sum(), (memories, beta)
    )
    for got, want in zip(streamed, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=FLOAT64_ATOL)


@pytest.mark.parametrize("scale_shape", ["scalar", "component", "diagonal"])
def test_mixture_autograd_wrt_parameters(device, scale_shape):
    means = _randn(NUM_MEMORIES, DIM, seed=21, device=device).requires_grad_(True)
    scales, logits = _mixture_parameters(scale_shape, device)
    scales.requires_grad_(True)
    logits.requires_grad_(True)
    x = _randn(7, DIM, seed=22, device=device)
    energy = GaussianMixtureEnergy(means, scales, logits=logits, block_elements=16)

    parameters = (means, scales, logits)
    streamed = torch.autograd.grad(energy.log_prob(x).sum(), parameters)
    reference = -mixture_energy_reference(means, scales, torch.log_softmax(logits, -1), x)
    expected = torch.autograd.grad(reference.sum(), parameters)
    for got, want in zip(streamed, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=FLOAT64_ATOL)


# -- accepted parameter forms ---------------------------------------------------------------------
def test_scalar_parameters_accept_tensors_and_numbers(device):
    memories = _randn(5, 2, seed=23, device=device)
    x = _randn(3, 2, seed=24, device=device)
    from_float = GaussianKDEEnergy(memories, 0.5).energy(x)
    for bandwidth in [torch.tensor(0.5), torch.tensor([0.5]), np.float64(0.5)]:
        energy = GaussianKDEEnergy(memories, bandwidth)
        assert energy.bandwidth.shape == ()
        torch.testing.assert_close(energy.energy(x), from_float, rtol=0, atol=0)
    mixture = GaussianMixtureEnergy(memories, torch.tensor([0.5], dtype=torch.float64))
    assert mixture.scales.shape == ()


def test_integer_memories_become_default_float(device):
    memories = torch.tensor([[0, 1], [2, 3]], device=device)
    energy = GaussianKDEEnergy(memories, 1.0)
    assert energy.dtype == torch.get_default_dtype()


def test_query_as_list_follows_memories(device):
    memories = _randn(5, 2, seed=25, device=device)
    energy = GaussianKDEEnergy(memories, 0.5)
    value = energy.energy([[0.1, 0.2]])
    assert value.dtype == torch.float64
    assert value.shape == (1,)


def test_repr_names_sizes(device):
    energy = DenseAMEnergy(_randn(5, 2, seed=26, device=device), 1.0)
    assert repr(energy) == "DenseAMEnergy(num_memories=5, dim=2)"


def test_base_energy_has_no_fixed_point(device):
    class Quadratic(Energy):
        def _energy(self, x):
            return 0.5 * x.square().sum(-1)

    energy = Quadratic(_randn(2, 3, seed=27, device=device))
    x = _randn(4, 3, seed=28, device=device)
    assert not energy.has_fixed_point
    # The base class differentiates _energy by autograd: the gradient of |x|^2 / 2 is x.
    torch.testing.assert_close(energy.grad(x), x, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="no closed-form fixed-point map"):
        energy.fixed_point(x)


# -- bad input --------------------------------------------------------------------------------
def _bad_memories(device):
    good = _randn(4, 2, seed=29, device=device)
    with_nan = good.clone()
    with_nan[1, 0] = float("nan")
    with_inf = good.clone()
    with_inf[2, 1] = float("inf")
    return [
        (with_nan, ValueError, "contains 1 NaN or infinite"),
        (with_inf, ValueError, "contains 1 NaN or infinite"),
        (good[:0], ValueError, "at least one memory"),
        (good[0], ValueError, r"must have shape \(num_memories, dim\)"),
        (torch.zeros(2, 2, dtype=torch.complex64, device=device), TypeError, "real tensor"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_bad_memories_raise(device, case):
    memories, error, message = _bad_memories(device)[case]
    with pytest.raises(error, match=f"memories.*{message}"):
        GaussianKDEEnergy(memories, 1.0)
    with pytest.raises(error, match=f"memories.*{message}"):
        DenseAMEnergy(memories, 1.0)
    with pytest.raises(error, match=f"means.*{message}"):
        GaussianMixtureEnergy(memories, 1.0)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scalar_parameters_raise(device, value):
    memories = _randn(4, 2, seed=30, device=device)
    with pytest.raises(ValueError, match="bandwidth must be finite and positive"):
        GaussianKDEEnergy(memories, value)
    with pytest.raises(ValueError, match="beta must be finite and positive"):
        DenseAMEnergy(memories, torch.tensor(value))
    with pytest.raises(ValueError, match="scales must be finite and positive"):
        GaussianMixtureEnergy(memories, value)
    with pytest.raises(ValueError, match="scales must be finite and positive"):
        GaussianMixtureEnergy(memories, torch.tensor([1.0, 1.0, value, 1.0]))


def test_bad_parameter_shapes_and_types_raise(device):
    memories = _randn(4, 2, seed=31, device=device)
    with pytest.raises(ValueError, match="bandwidth must be a scalar"):
        GaussianKDEEnergy(memories, torch.ones(2))
    with pytest.raises(TypeError, match="bandwidth must be array-like"):
        GaussianKDEEnergy(memories, "wide")
    with pytest.raises(ValueError, match=r"scales must have shape \(\), \(4,\) or \(4, 2\)"):
        GaussianMixtureEnergy(memories, torch.ones(3))
    with pytest.raises(ValueError, match="block_elements must be a positive integer"):
        GaussianKDEEnergy(memories, 1.0, block_elements=0)
    with pytest.raises(ValueError, match="block_elements must be a positive integer"):
        GaussianKDEEnergy(memories, 1.0, block_elements=True)


def test_bad_mixture_weights_raise(device):
    means = _randn(4, 2, seed=32, device=device)
    with pytest.raises(ValueError, match="weights must sum to one, but sum to 0.8"):
        GaussianMixtureEnergy(means, 1.0, weights=torch.full((4,), 0.2))
    with pytest.raises(ValueError, match="weights must be finite and positive"):
        GaussianMixtureEnergy(means, 1.0, weights=torch.tensor([0.5, 0.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"weights must have shape \(4,\)"):
        GaussianMixtureEnergy(means, 1.0, weights=torch.full((2,), 0.5))
    with pytest.raises(ValueError, match=r"logits must have shape \(4,\)"):
        GaussianMixtureEnergy(means, 1.0, logits=torch.zeros(3))
    with pytest.raises(ValueError, match="logits contains 1 NaN or infinite"):
        GaussianMixtureEnergy(means, 1.0, logits=torch.tensor([0.0, float("nan"), 0.0, 0.0]))
    with pytest.raises(ValueError, match="either weights or logits"):
        GaussianMixtureEnergy(means, 1.0, weights=torch.full((4,), 0.25), logits=torch.zeros(4))


def test_bad_queries_raise(device):
    energy = GaussianKDEEnergy(_randn(4, 3, seed=33, device=device), 1.0)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 3\)"):
        energy.energy(torch.zeros(5, 2, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 3\)"):
        energy.grad(torch.tensor(1.0, dtype=torch.float64, device=device))
    with pytest.raises(TypeError, match="x has dtype torch.float32"):
        energy.fixed_point(torch.zeros(5, 3, dtype=torch.float32, device=device))
    with pytest.raises(TypeError, match="x has dtype torch.float32"):
        energy.log_prob(torch.zeros(3, dtype=torch.float32, device=device))
