"""Streaming natural-gradient SVI of the DP memory.

References: the closed-form CAVI updates of :mod:`pyro_am.models._dp_cavi` applied by hand, the
full-batch CAVI fit (:meth:`DPMemory.fit`), and the same stream read from other sources.
"""

import math

import numpy as np
import pytest
import torch

from pyro_am.models import DPMemory
from pyro_am.models import _dp_cavi as cavi
from pyro_am.models._dp_stream import step_size

DIM = 4


def _blobs(num_blobs=3, num_data=600, seed=0, spread=6.0):
    generator = np.random.default_rng(seed)
    centres = spread * generator.standard_normal((num_blobs, DIM))
    labels = generator.integers(num_blobs, size=num_data)
    # Shuffled order, so every contiguous batch is a sample of all blobs.
    return centres[labels] + generator.standard_normal((num_data, DIM)), centres


def _fixed_memory(truncation=3):
    # No births (max_truncation = truncation) and no pruning, so only the updates are compared.
    return DPMemory(
        DIM, truncation=truncation, max_truncation=truncation, prune_threshold=0.0, prior_scale=6.0
    )


def test_step_size_schedule():
    assert step_size(1, 0.0, 0.7) == 1.0
    assert step_size(3, 1.0, 0.5) == pytest.approx(0.5)
    assert step_size(7, 9.0, 1.0) == pytest.approx(1 / 16)
    assert step_size(5, 2.0, 0.0) == 1.0


def test_full_batch_with_unit_steps_equals_cavi():
    data, _ = _blobs()
    stream = _fixed_memory()
    result = stream.fit_stream(
        data, batch_size=len(data), num_epochs=6, step_size_exponent=0.0, seed=5, progress=False
    )
    reference = _fixed_memory()
    cavi_result = reference.fit(data, max_iter=6, tol=0.0, seed=5, progress=False)

    assert result.iterations == 6
    assert result.events == []
    assert cavi_result.events == []
    # float64 and the same operations in the same order: equal up to the last few bits.
    tolerance = dict(rtol=1e-12, atol=1e-12)
    for name, value in reference.variational_parameters().items():
        torch.testing.assert_close(stream.variational_parameters()[name], value, **tolerance)
    # The stream records the ELBO of the parameters before each step, CAVI those after it.
    assert result.elbo[1:] == pytest.approx(cavi_result.elbo[:-1], rel=1e-12)


def test_two_steps_match_closed_form_updates():
    data, _ = _blobs()
    data = torch.as_tensor(data)
    first, second = data[:200], data[200:250]
    num_data = 1000  # N differs from the rows streamed, so the scaling N / |B| is tested.
    memory = _fixed_memory()
    source = [first, second]
    memory.fit_stream(
        source,
        num_data=num_data,
        step_size_offset=1.0,
        step_size_exponent=0.7,
        seed=2,
        progress=False,
    )

    # The reference repeats the steps with the CAVI closed forms, in the stream's centred frame.
    start = _fixed_memory()
    start.initialize(first, seed=2)
    centre = first.mean(0)
    prior = start._prior(first)
    prior.prior_mean = prior.prior_mean - centre
    posterior = start._posterior()
    posterior.memory_loc = posterior.memory_loc - centre
    statistics = None
    for step, batch in enumerate([first, second], start=1):
        x = batch - centre
        local = cavi.local_step(x, x.square(), posterior)
        scale = num_data / len(batch)
        batch_statistics = [scale * local.counts, scale * local.sums, scale * x.square().sum(0)]
        if statistics is None:
            statistics = batch_statistics
        else:
            rho = (step + 1.0) ** -0.7
            statistics = [
                (1 - rho) * old + rho * new
                for old, new in zip(statistics, batch_statistics, strict=True)
            ]
        counts, sums, total_x_squared = statistics
        posterior = cavi.global_step(
            cavi.LocalStep(None, None, counts, sums), total_x_squared, num_data, posterior, prior
        )

    # float64 closed forms on the same numbers; only summation order may differ.
    tolerance = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(memory.memories, posterior.memory_loc + centre, **tolerance)
    torch.testing.assert_close(memory.weights, posterior.sticks().mean, **tolerance)
    torch.testing.assert_close(memory.scale, posterior.variance.sqrt(), **tolerance)
    torch.testing.assert_close(memory.memory_counts, statistics[0], **tolerance)
    # The running counts estimate N.
    assert float(memory.memory_counts.sum()) == pytest.approx(num_data, rel=1e-12)


@pytest.mark.parametrize("truncation", [2, 15])
def test_blobs_streamed_recover_count_and_likelihood(truncation):
    generator = np.random.default_rng(7)
    centres = 5.0 * generator.standard_normal((5, DIM))
    data = centres[generator.integers(5, size=6000)] + generator.standard_normal((6000, DIM))
    held_out = centres[generator.integers(5, size=2000)] + generator.standard_normal((2000, DIM))
    held_out = torch.as_tensor(held_out)

    stream = DPMemory(DIM, truncation=truncation, prior_scale=5.0)
    result = stream.fit_stream(data, batch_size=500, num_epochs=3, seed=0, progress=False)
    full = DPMemory(DIM, truncation=truncation, prior_scale=5.0)
    full.fit(data, seed=0, progress=False)

    assert int((stream.weights > 0.01).sum()) == 5
    if truncation == 2:
        assert result.num_created >= 3
    else:
        assert result.num_merged + result.num_pruned >= 10
    streamed = float(stream.log_predictive(held_out).mean())
    reference = float(full.log_predictive(held_out).mean())
    # Each blob contains about 1,200 points, so its memory is known to about 1 / sqrt(1200) = 0.03
    # noise standard deviations in either fit; that moves the mean held-out log density by
    # well under 0.01 nats, and 0.02 allows for it.
    assert abs(streamed - reference) < 0.02


def test_checkpoint_resume_continues_the_stream(tmp_path):
    data, _ = _blobs(num_data=900)
    options = dict(batch_size=100, num_epochs=2, seed=4, progress=False)
    uninterrupted = _fixed_memory()
    uninterrupted.fit_stream(data, **options)

    path = tmp_path / "stream.pt"
    first = _fixed_memory()
    first.fit_stream(data, max_steps=13, checkpoint=str(path), checkpoint_every=5, **options)
    resumed = _fixed_memory()
    result = resumed.fit_stream(data, checkpoint=str(path), resume=True, **options)

    assert result.iterations == 18
    assert len(result.elbo) == 18
    for name, value in uninterrupted.variational_parameters().items():
        # The resumed run takes the same float64 operations on the same batches.
        torch.testing.assert_close(resumed.variational_parameters()[name], value, rtol=0, atol=0)


def test_nan_batch_stops_and_keeps_last_parameters():
    data, _ = _blobs()
    batches = [torch.as_tensor(data[start : start + 100]) for start in range(0, 600, 100)]
    reference = _fixed_memory()
    reference.fit_stream(batches[:3], num_data=600, seed=1, progress=False)

    poisoned = [batch.clone() for batch in batches]
    poisoned[3][5, 2] = math.nan
    memory = _fixed_memory()
    with pytest.raises(ValueError, match="batch 3 contains 1 NaN"):
        memory.fit_stream(poisoned, num_data=600, seed=1, progress=False)
    for name, value in reference.variational_parameters().items():
        assert torch.equal(memory.variational_parameters()[name], value), name

    overflowing = [batch.clone() for batch in batches]
    overflowing[3][0, 0] = 1e200  # finite, but its square overflows float64
    memory = _fixed_memory()
    with pytest.raises(FloatingPointError, match="streaming step 4; the parameters of step 3"):
        memory.fit_stream(overflowing, num_data=600, seed=1, progress=False)
    for name, value in reference.variational_parameters().items():
        assert torch.equal(memory.variational_parameters()[name], value), name


def test_fit_stream_rejects_bad_arguments():
    data, _ = _blobs(num_data=50)
    memory = _fixed_memory()
    with pytest.raises(ValueError, match="step_size_exponent must be in"):
        memory.fit_stream(data, batch_size=10, step_size_exponent=1.5)
    with pytest.raises(ValueError, match="step_size_offset"):
        memory.fit_stream(data, batch_size=10, step_size_offset=-1.0)
    with pytest.raises(ValueError, match="num_epochs must be an integer in"):
        memory.fit_stream(data, batch_size=10, num_epochs=0)
    with pytest.raises(ValueError, match="resume=True needs a checkpoint"):
        memory.fit_stream(data, batch_size=10, resume=True)
    with pytest.raises(ValueError, match="batch_size is required"):
        memory.fit_stream(data)
    with pytest.raises(ValueError, match="one-shot iterator"):
        memory.fit_stream(iter([torch.as_tensor(data)]), num_data=50, num_epochs=2)
    with pytest.raises(ValueError, match="num_data is required"):
        memory.fit_stream([torch.as_tensor(data)])
    with pytest.raises(ValueError, match=r"batch 0 must have shape \(B, 4\)"):
        memory.fit_stream([torch.zeros(5, 3, dtype=torch.float64)], num_data=5)
    with pytest.raises(ValueError, match="yielded no batch"):
        memory.fit_stream([], num_data=5)


@pytest.mark.parametrize("options", [{"batch_size": 1}, {"batch_size": 10, "init_size": 1}])
def test_fit_stream_rejects_one_row_initialization(options):
    # One row has no variance, so the k-means initialization would set a NaN noise scale.
    data, _ = _blobs(num_data=20)
    memory = _fixed_memory()
    with pytest.raises(ValueError, match="has 1 row and the initialization needs at least 2"):
        memory.fit_stream(data, progress=False, **options)


def test_fit_stream_one_row_batches_after_warm_start():
    data, _ = _blobs(num_data=40)
    memory = _fixed_memory()
    memory.initialize(torch.as_tensor(data[:20]), seed=0)
    result = memory.fit_stream(data[20:], batch_size=1, warm_start=True, progress=False)
    assert len(result.elbo) == 20
    assert all(math.isfinite(value) for value in result.elbo)
    assert bool(torch.isfinite(memory.memory_loc).all())
