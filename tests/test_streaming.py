"""Tests of the streamed softmax statistics against the unchunked softmax, and of the block policy.

The reference for every numeric check is the dense computation in float64:
``torch.logsumexp(features @ keys.T + bias, -1)`` and ``softmax(...) @ values``. Both sides add the
same terms in a different order, so they agree to a few float64 ulps relative to the largest term.
The tolerances allow ``1e-12`` relative, about 5000 ulps. A missed or double-counted block changes
the result by at least ``exp(min logit - max logit)``, which is far above 1e-12 for logits of
order one.
"""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from pyro_am import DenseAMEnergy, GaussianKDEEnergy, GaussianMixtureEnergy
from pyro_am.streaming import (
    DEFAULT_BLOCK_ELEMENTS,
    MIN_MEMORY_CHUNK,
    chunk_sizes,
    combine_statistics,
    softmax_statistics,
)

HYPOTHESIS = settings(
    max_examples=15,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
FLOAT64_RTOL = 1e-12


def _random_operands(seed, num_queries, num_memories, num_features, num_values, device):
    generator = torch.Generator().manual_seed(seed)
    options = dict(dtype=torch.float64, generator=generator)
    features = torch.randn(num_queries, num_features, **options)
    keys = torch.randn(num_memories, num_features, **options)
    bias = torch.randn(num_memories, **options)
    values = torch.randn(num_memories, num_values, **options)
    return [tensor.to(device) for tensor in (features, keys, bias, values)]


def _dense_reference(features, keys, bias, values):
    logits = features @ keys.T + bias
    return torch.logsumexp(logits, dim=-1), torch.softmax(logits, dim=-1) @ values


@HYPOTHESIS
@given(
    seed=st.integers(0, 2**31 - 1),
    num_queries=st.integers(1, 9),
    num_memories=st.integers(1, 40),
    num_features=st.integers(1, 4),
    num_values=st.integers(1, 3),
    block_elements=st.integers(1, 400),
)
def test_softmax_statistics_match_dense(
    device, seed, num_queries, num_memories, num_features, num_values, block_elements
):
    features, keys, bias, values = _random_operands(
        seed, num_queries, num_memories, num_features, num_values, device
    )
    expected_lse, expected_mean = _dense_reference(features, keys, bias, values)

    statistics = softmax_statistics(features, keys, bias, values, block_elements)
    torch.testing.assert_close(statistics.logsumexp(), expected_lse, rtol=FLOAT64_RTOL, atol=0)
    torch.testing.assert_close(statistics.mean(), expected_mean, rtol=FLOAT64_RTOL, atol=1e-13)

    without_values = softmax_statistics(features, keys, bias, None, block_elements)
    assert without_values.weighted is None
    torch.testing.assert_close(without_values.logsumexp(), expected_lse, rtol=FLOAT64_RTOL, atol=0)


def test_softmax_statistics_extreme_logits(device):
    # Logits of order 1e4 overflow exp() without the running maximum. The dense logsumexp is the
    # reference, and both work in float64, so the tolerance is a few ulps of 1e4.
    features, keys, bias, values = _random_operands(1, 5, 30, 2, 2, device)
    features = features * 3000.0
    expected_lse, expected_mean = _dense_reference(features, keys, bias, values)
    statistics = softmax_statistics(features, keys, bias, values, block_elements=7)
    assert torch.isfinite(statistics.logsumexp()).all()
    torch.testing.assert_close(statistics.logsumexp(), expected_lse, rtol=FLOAT64_RTOL, atol=0)
    torch.testing.assert_close(statistics.mean(), expected_mean, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_statistics_underflowing_terms(device, dtype):
    # Shifted logits from 0 down to -1e4: most terms underflow, and the kernel clamps them before
    # exp(). Each clamped term adds at most e * tiny to a normalizer of at least 1, so the result
    # must match the dense float64 reference to a few ulps of the dtype.
    generator = torch.Generator().manual_seed(0)
    logits = -1e4 * torch.rand(1, 50, generator=generator, dtype=torch.float64)
    logits[:, 0] = 0.0
    values = torch.randn(50, 2, generator=generator, dtype=torch.float64)
    # Zero features and keys make every query's logits equal to the bias.
    features = torch.zeros(3, 1, dtype=torch.float64)
    keys = torch.zeros(50, 1, dtype=torch.float64)
    expected_lse = torch.logsumexp(logits, dim=-1)
    expected_mean = torch.softmax(logits, dim=-1) @ values
    statistics = softmax_statistics(
        features.to(device, dtype),
        keys.to(device, dtype),
        logits[0].to(device, dtype),
        values.to(device, dtype),
        block_elements=16,
    )
    tolerance = 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(
        statistics.logsumexp().cpu().double(), expected_lse[:1].expand(3), rtol=0, atol=tolerance
    )
    torch.testing.assert_close(
        statistics.mean().cpu().double(),
        expected_mean[:1].expand(3, 2),
        rtol=tolerance,
        atol=tolerance,
    )


@HYPOTHESIS
@given(
    seed=st.integers(0, 2**31 - 1),
    num_memories=st.integers(2, 40),
    num_parts=st.integers(1, 5),
    block_elements=st.integers(1, 100),
)
def test_combine_statistics_random_split(device, seed, num_memories, num_parts, block_elements):
    features, keys, bias, values = _random_operands(seed, 6, num_memories, 3, 2, device)
    generator = torch.Generator().manual_seed(seed + 1)
    order = torch.randperm(num_memories, generator=generator).to(device)
    cuts = torch.randint(0, num_memories + 1, (num_parts - 1,), generator=generator).sort().values
    bounds = [0, *cuts.tolist(), num_memories]
    pieces = [
        order[start:stop]
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True)
        if stop > start
    ]

    parts = [
        softmax_statistics(features, keys[piece], bias[piece], values[piece], block_elements)
        for piece in pieces
    ]
    combined = combine_statistics(parts)
    whole = softmax_statistics(features, keys, bias, values)

    torch.testing.assert_close(combined.logsumexp(), whole.logsumexp(), rtol=FLOAT64_RTOL, atol=0)
    torch.testing.assert_close(combined.mean(), whole.mean(), rtol=FLOAT64_RTOL, atol=1e-13)


def test_combine_statistics_rejects_bad_parts(device):
    features, keys, bias, values = _random_operands(2, 3, 8, 2, 2, device)
    with_values = softmax_statistics(features, keys, bias, values)
    without_values = softmax_statistics(features, keys, bias)
    with pytest.raises(ValueError, match="parts must contain at least one"):
        combine_statistics([])
    with pytest.raises(ValueError, match="parts must all carry weighted values"):
        combine_statistics([with_values, without_values])


def test_mean_without_values_raises(device):
    features, keys, bias, _ = _random_operands(3, 2, 4, 2, 1, device)
    with pytest.raises(ValueError, match="without values"):
        softmax_statistics(features, keys, bias).mean()


def test_softmax_statistics_rejects_shapes(device):
    features, keys, bias, values = _random_operands(4, 3, 5, 2, 2, device)
    with pytest.raises(ValueError, match="features and keys"):
        softmax_statistics(features[:, :1], keys, bias)
    with pytest.raises(ValueError, match="bias must have shape"):
        softmax_statistics(features, keys, bias[:4])
    with pytest.raises(ValueError, match="values must have shape"):
        softmax_statistics(features, keys, bias, values[:4])
    with pytest.raises(ValueError, match="keys must hold at least one memory"):
        softmax_statistics(features, keys[:0], bias[:0])


@settings(max_examples=200, deadline=None, database=None)
@given(
    num_queries=st.integers(0, 5000),
    num_memories=st.integers(1, 100_000),
    block_elements=st.integers(1, 1 << 24),
)
def test_chunk_sizes_policy(num_queries, num_memories, block_elements):
    query_chunk, memory_chunk = chunk_sizes(num_queries, num_memories, block_elements)

    assert 1 <= query_chunk <= max(num_queries, 1)
    assert 1 <= memory_chunk <= num_memories
    # The block bound is a hard cap, so it wins over the memory minimum when the two conflict.
    assert query_chunk * memory_chunk <= block_elements
    assert memory_chunk >= min(num_memories, MIN_MEMORY_CHUNK, block_elements)
    if num_queries * num_memories <= block_elements and num_queries > 0:
        assert (query_chunk, memory_chunk) == (num_queries, num_memories)


def test_chunk_sizes_default_and_invalid():
    assert chunk_sizes(10**6, 10**6) == chunk_sizes(10**6, 10**6, DEFAULT_BLOCK_ELEMENTS)
    assert chunk_sizes(10**6, 10**6) == (DEFAULT_BLOCK_ELEMENTS // MIN_MEMORY_CHUNK, 1024)
    with pytest.raises(ValueError, match="block_elements must be a positive integer"):
        chunk_sizes(4, 4, 0)


class _OutputRecorder(TorchDispatchMode):
    """Record the name and element count of every tensor each ATen operator returns."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        flat = result if isinstance(result, (tuple, list)) else (result,)
        for item in flat:
            if isinstance(item, torch.Tensor):
                self.outputs.append((str(func), item.numel()))
        return result


def test_streaming_runs_one_addmm_per_block(device):
    features, keys, bias, values = _random_operands(5, 10, 2500, 3, 2, device)
    block_elements = 3000
    query_chunk, memory_chunk = chunk_sizes(10, 2500, block_elements)
    assert (query_chunk, memory_chunk) == (2, 1500)

    with _OutputRecorder() as recorder:
        softmax_statistics(features, keys, bias, values, block_elements)
    addmm_calls = [name for name, _ in recorder.outputs if "addmm" in name]
    assert len(addmm_calls) == math.ceil(10 / query_chunk) * math.ceil(2500 / memory_chunk)


def _energies(memories, block_elements):
    num_memories, dim = memories.shape
    scales = torch.full((num_memories, dim), 0.7, dtype=memories.dtype, device=memories.device)
    return [
        GaussianKDEEnergy(memories, 0.5, block_elements),
        DenseAMEnergy(memories, 2.0, block_elements),
        GaussianMixtureEnergy(memories, scales, block_elements=block_elements),
    ]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["kde", "dense_am", "gmm_diagonal"])
def test_energy_never_materializes_batch_by_memories(device, index):
    # Every intermediate an ATen operator returns is bounded by the block or by the inputs
    # (features, keys: at most (2D + 1) per row), never the B x N logits matrix.
    num_queries, num_memories, dim, block_elements = 64, 3000, 3, 4096
    generator = torch.Generator().manual_seed(6)
    memories = torch.randn(num_memories, dim, dtype=torch.float64, generator=generator).to(device)
    x = torch.randn(num_queries, dim, dtype=torch.float64, generator=generator).to(device)
    energy = _energies(memories, block_elements)[index]
    bound = max(block_elements, num_memories * (2 * dim + 1), num_queries * (2 * dim + 1))
    assert bound * 8 <= num_queries * num_memories

    with _OutputRecorder() as recorder:
        energy.energy(x)
        energy.grad(x)
        energy.fixed_point(x)
        energy.energy_and_grad(x)
    largest = max(count for _, count in recorder.outputs)
    assert largest <= bound


_RSS_SCRIPT = textwrap.dedent(
    """
    import resource, torch
    from pyro_am import GaussianKDEEnergy
    torch.manual_seed(0)
    memories = torch.randn(50_000, 4)
    x = torch.randn(2048, 4)
    energy = GaussianKDEEnergy(memories, 0.5)
    energy.energy(x[:8])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    energy.energy(x)
    energy.fixed_point(x)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)
    """
)


def test_streamed_energy_peak_rss_stays_small(device):
    # B x N = 2048 x 50_000 float32 logits take 410 MB, and the default block of 2**22 logits
    # takes 16 MiB. A pass keeps a few block-sized temporaries alive (logits, their exponentials
    # times the values, the running sums), so 150 MB leaves room for allocator slack while staying
    # far below the dense 410 MB. The peak resident set is measured in a fresh process, because
    # earlier tests in this process may already have raised it.
    dense_bytes = 2048 * 50_000 * 4
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        memories = torch.randn(50_000, 4, device=device)
        x = torch.randn(2048, 4, device=device)
        energy = GaussianKDEEnergy(memories, 0.5)
        start = torch.cuda.max_memory_allocated(device)
        energy.energy(x)
        energy.fixed_point(x)
        growth = torch.cuda.max_memory_allocated(device) - start
    else:
        environment = dict(os.environ, OMP_NUM_THREADS="1")
        output = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT],
            capture_output=True,
            text=True,
            check=True,
            env=environment,
        )
        growth = int(output.stdout.strip())
    assert growth < 150e6
    assert growth < dense_bytes / 2


@pytest.mark.parametrize("block_elements", [5, 64, None])
def test_autograd_through_blocks_matches_dense(device, block_elements):
    # The blocks compute exp() in place on the GEMM output. Autograd must still differentiate the
    # same function as the dense reference, so the gradients agree to float64 rounding.
    operands = _random_operands(7, 6, 20, 3, 2, device)
    operands = [tensor.requires_grad_(True) for tensor in operands]
    statistics = softmax_statistics(*operands, block_elements=block_elements)
    loss = statistics.logsumexp().sum() + statistics.mean().square().sum()
    streamed = torch.autograd.grad(loss, operands)

    expected_lse, expected_mean = _dense_reference(*operands)
    dense = torch.autograd.grad(expected_lse.sum() + expected_mean.square().sum(), operands)
    for got, want in zip(streamed, dense, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
