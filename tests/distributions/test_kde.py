"""GaussianKDE against scikit-learn's KernelDensity, brute force and the closed-form moments."""

import math

import numpy as np
import pytest
import torch
from sklearn.neighbors import KernelDensity

from pyro_am.distributions import GaussianKDE
from pyro_am.energies import GaussianKDEEnergy

NUM_MEMORIES, DIM = 40, 3


def _float64(*shape, device):
    return torch.randn(*shape, dtype=torch.float64, device=device)


def _brute_force_log_prob(memories, bandwidth, x):
    """Direct (x - m) differences in float64, one memory bank of shape (N, D) at a time."""
    squared_distances = (x.unsqueeze(-2) - memories).square().sum(-1)
    dim = memories.shape[-1]
    variance = torch.as_tensor(bandwidth, dtype=memories.dtype, device=memories.device).square()
    log_normalizer = math.log(memories.shape[-2]) + 0.5 * dim * torch.log(2 * math.pi * variance)
    return torch.logsumexp(-0.5 * squared_distances / bandwidth**2, dim=-1) - log_normalizer


def _sklearn_log_prob(memories, bandwidth, x):
    # rtol=0 and atol=0 are the defaults, so the tree search returns the exact sum.
    estimator = KernelDensity(kernel="gaussian", bandwidth=bandwidth).fit(memories.cpu().numpy())
    return torch.from_numpy(estimator.score_samples(x.cpu().numpy())).to(x.device)


@pytest.mark.parametrize("bandwidth", [0.2, 1.0, 3.0])
def test_log_prob_matches_sklearn(device, bandwidth):
    memories = _float64(NUM_MEMORIES, DIM, device=device)
    x = 2.0 * _float64(25, DIM, device=device)

    actual = GaussianKDE(memories, bandwidth).log_prob(x)

    # float64: the GEMM form loses about eps * |x|^2 / h^2 <= 1e-13 absolute on log p ~ -10 to -1e3,
    # so a relative tolerance of 1e-10 leaves room to spare.
    torch.testing.assert_close(
        actual, _sklearn_log_prob(memories, bandwidth, x), rtol=1e-10, atol=0
    )
    torch.testing.assert_close(
        actual, _brute_force_log_prob(memories, bandwidth, x), rtol=1e-10, atol=0
    )


def test_batched_log_prob_matches_sklearn(device):
    memories = _float64(2, 1, NUM_MEMORIES, DIM, device=device)
    bandwidth = torch.tensor([0.3, 0.8, 2.0], dtype=torch.float64, device=device)
    x = 2.0 * _float64(5, 1, 1, DIM, device=device)

    actual = GaussianKDE(memories, bandwidth).log_prob(x)

    assert actual.shape == (5, 2, 3)
    for i in range(2):
        for j in range(3):
            expected = _sklearn_log_prob(memories[i, 0], float(bandwidth[j]), x[:, 0, 0])
            # Same float64 argument as the unbatched test.
            torch.testing.assert_close(actual[:, i, j], expected, rtol=1e-10, atol=0)


def test_streamed_and_batched_paths_agree(device):
    memories = _float64(NUM_MEMORIES, DIM, device=device)
    x = _float64(6, DIM, device=device)
    bandwidth = torch.tensor(0.7, dtype=torch.float64, device=device)

    streamed = GaussianKDE(memories, bandwidth)
    batched = GaussianKDE(memories.unsqueeze(0), bandwidth.reshape(1))

    assert streamed._energy is not None
    assert batched._energy is None
    torch.testing.assert_close(
        batched.log_prob(x.unsqueeze(-2)).squeeze(-1), streamed.log_prob(x), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("batched", [False, True])
def test_log_prob_gradients_match_brute_force(device, batched):
    memories = _float64(NUM_MEMORIES, DIM, device=device).requires_grad_(True)
    bandwidth = torch.tensor(0.8, dtype=torch.float64, device=device, requires_grad=True)
    x = _float64(10, DIM, device=device)

    if batched:
        log_prob = GaussianKDE(memories.unsqueeze(0), bandwidth.reshape(1)).log_prob(x[:, None])
    else:
        log_prob = GaussianKDE(memories, bandwidth).log_prob(x)
    actual = torch.autograd.grad(log_prob.sum(), [memories, bandwidth])
    expected = torch.autograd.grad(
        _brute_force_log_prob(memories, bandwidth, x).sum(), [memories, bandwidth]
    )

    # float64 sums of 10 O(1) terms: 1e-10 leaves several orders of margin.
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_shapes_and_expand(device):
    memories = _float64(3, 1, NUM_MEMORIES, DIM, device=device)
    bandwidth = torch.full((4,), 0.5, dtype=torch.float64, device=device)
    kde = GaussianKDE(memories, bandwidth)

    assert kde.batch_shape == (3, 4)
    assert kde.event_shape == (DIM,)
    assert kde.sample().shape == (3, 4, DIM)
    assert kde.rsample((2,)).shape == (2, 3, 4, DIM)
    assert kde.mean.shape == (3, 4, DIM)
    assert kde.variance.shape == (3, 4, DIM)
    assert kde.covariance_matrix.shape == (3, 4, DIM, DIM)
    assert kde.log_prob(_float64(DIM, device=device)).shape == (3, 4)

    expanded = kde.expand((5, 3, 4))
    x = _float64(5, 3, 4, DIM, device=device)
    assert expanded.batch_shape == (5, 3, 4)
    assert expanded.sample().shape == (5, 3, 4, DIM)
    torch.testing.assert_close(expanded.log_prob(x), kde.log_prob(x), rtol=0, atol=0)

    assert GaussianKDE.infer_shapes((3, 1, NUM_MEMORIES, DIM), (4,)) == ((3, 4), (DIM,))


def test_expand_keeps_streamed_path(device):
    memories = _float64(NUM_MEMORIES, DIM, device=device)
    kde = GaussianKDE(memories, 0.5, validate_args=True)

    expanded = kde.expand((7,))

    assert expanded.batch_shape == (7,)
    assert expanded._energy is kde._energy
    assert expanded._validate_args is True
    assert expanded.log_prob(_float64(DIM, device=device)).shape == (7,)
    assert expanded.rsample((2,)).shape == (2, 7, DIM)


def test_energy_accessor(device):
    memories = _float64(NUM_MEMORIES, DIM, device=device)
    x = _float64(4, DIM, device=device)
    kde = GaussianKDE(memories, 0.5)

    assert isinstance(kde.energy, GaussianKDEEnergy)
    torch.testing.assert_close(kde.energy.log_prob(x), kde.log_prob(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unbatched memories"):
        _ = GaussianKDE(memories.expand(2, -1, -1), 0.5).energy


def test_moments_match_closed_form(device):
    memories = _float64(NUM_MEMORIES, DIM, device=device)
    bandwidth = 0.6
    kde = GaussianKDE(memories, bandwidth)

    # Law of total covariance: the spread of the memories plus the kernel's h^2 I.
    spread = np.cov(memories.cpu().numpy(), rowvar=False, bias=True)
    expected = torch.from_numpy(spread + bandwidth**2 * np.eye(DIM)).to(device)

    torch.testing.assert_close(kde.mean, memories.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kde.covariance_matrix, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kde.variance, expected.diagonal(), rtol=1e-12, atol=1e-12)


def test_sample_moments(device):
    memories = 2.0 * _float64(NUM_MEMORIES, DIM, device=device)
    kde = GaussianKDE(memories, 0.5)
    num_samples = 200_000

    samples = kde.sample((num_samples,))

    # Five standard errors of each estimate. A covariance entry is the mean of the products
    # (x_i - mu_i)(x_j - mu_j), so its standard error is their standard deviation over sqrt(n).
    mean_error = 5 * (kde.variance / num_samples).sqrt()
    centred = samples - kde.mean
    products = centred.unsqueeze(-1) * centred.unsqueeze(-2)
    covariance_error = 5 * products.std(0) / math.sqrt(num_samples)
    sample_covariance = products.mean(0)
    assert ((samples.mean(0) - kde.mean).abs() < mean_error).all()
    assert ((sample_covariance - kde.covariance_matrix).abs() < covariance_error).all()


@pytest.mark.parametrize("batched", [False, True])
def test_rsample_gradients_match_brute_force(device, batched):
    """Recover each draw's memory and noise, redo the draw by hand and compare gradients.

    Memories on a grid of spacing 20 with bandwidth 0.1 make the memory a draw came from its
    nearest one: a wrong match needs |eps| > 100.
    """
    grid = 20.0 * torch.arange(NUM_MEMORIES, dtype=torch.float64, device=device)
    memories = torch.stack([grid, -grid, 0.5 * grid], dim=-1).requires_grad_(True)
    bandwidth = torch.tensor(0.1, dtype=torch.float64, device=device, requires_grad=True)
    weights = _float64(DIM, device=device)

    if batched:
        kde = GaussianKDE(memories.unsqueeze(0), bandwidth.expand(2))
    else:
        kde = GaussianKDE(memories, bandwidth)
    samples = kde.rsample((50,))
    actual = torch.autograd.grad(
        (torch.sin(samples) * weights).sum(), [memories, bandwidth], allow_unused=False
    )

    detached = samples.detach()
    index = (detached.unsqueeze(-2) - memories.detach()).square().sum(-1).argmin(-1)
    noise = (detached - memories.detach()[index]) / bandwidth.detach()
    by_hand = memories[index] + bandwidth * noise
    expected = torch.autograd.grad((torch.sin(by_hand) * weights).sum(), [memories, bandwidth])

    assert samples.requires_grad
    # The by-hand draw equals the sample to rounding, and both graphs are float64 sums of 50 terms.
    torch.testing.assert_close(by_hand.detach(), detached, rtol=0, atol=1e-12)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_follows_float32(device):
    memories = torch.randn(NUM_MEMORIES, DIM, device=device)
    kde = GaussianKDE(memories, 0.5)

    assert kde.log_prob(torch.randn(3, DIM, device=device)).dtype == torch.float32
    assert kde.sample((2,)).dtype == torch.float32
    assert kde.bandwidth.dtype == torch.float32


def test_invalid_shapes(device):
    memories = _float64(NUM_MEMORIES, DIM, device=device)
    with pytest.raises(ValueError, match="memories must have shape"):
        GaussianKDE(memories[0], 0.5)
    with pytest.raises(ValueError, match="memories must have shape"):
        GaussianKDE(memories[:0], 0.5)
    with pytest.raises(ValueError, match="does not broadcast"):
        GaussianKDE(memories.expand(2, -1, -1), torch.ones(3, dtype=torch.float64))


def test_validate_args_errors(device):
    memories = _float64(2, NUM_MEMORIES, DIM, device=device)
    bandwidth = torch.tensor([0.5, -0.5], dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="bandwidth"):
        GaussianKDE(memories, bandwidth, validate_args=True)
    with pytest.raises(ValueError, match="memories"):
        GaussianKDE(torch.full_like(memories, float("nan")), 0.5, validate_args=True)
    with pytest.raises(ValueError, match="memories contains"):
        GaussianKDE(torch.full_like(memories, float("inf")), 0.5, validate_args=True)

    kde = GaussianKDE(memories, 0.5, validate_args=True)
    with pytest.raises(ValueError, match="event_shape"):
        kde.log_prob(_float64(2, DIM + 1, device=device))
    with pytest.raises(ValueError, match="support"):
        kde.log_prob(torch.full((2, DIM), float("nan"), dtype=torch.float64, device=device))

    # Without validation a batched bandwidth is not checked, but the streamed path always checks.
    GaussianKDE(memories, bandwidth, validate_args=False)
    with pytest.raises(ValueError, match="bandwidth"):
        GaussianKDE(memories[0], -0.5, validate_args=False)
