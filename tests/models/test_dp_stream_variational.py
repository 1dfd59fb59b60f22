"""Stepwise EM of the variational memory over minibatches.

References: the closed-form EM fit (:meth:`VariationalMemory.fit`) on all the data, and an
uninterrupted stream for the checkpoint test.
"""

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from pyro_am.models import VariationalMemory

DIM = 3


def _blobs(num_data, seed=0):
    generator = np.random.default_rng(seed)
    centres = 5.0 * generator.standard_normal((4, DIM))

    def draw(size):
        return centres[generator.integers(4, size=size)] + generator.standard_normal((size, DIM))

    return draw(num_data), torch.as_tensor(draw(1000))


@pytest.mark.parametrize("scale", ["shared", "per_memory"])
def test_full_batch_with_unit_steps_equals_em(scale):
    data, _ = _blobs(1500)
    reference = VariationalMemory(4, DIM, scale=scale, warm_start=False, max_iter=6, tol=0.0)
    reference.fit(data)
    stream = VariationalMemory(4, DIM, scale=scale, warm_start=False)
    stream.fit_stream(data, batch_size=len(data), num_epochs=6, step_size_exponent=0.0)

    assert stream.n_iter_ == 6
    # float64, the same updates up to the 10 eps added to the counts and the summation order.
    assert stream.elbo_history_ == pytest.approx(reference.elbo_history_, rel=1e-12)
    for mine, theirs in zip(
        stream._current_parameters(), reference._current_parameters(), strict=True
    ):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)


def test_streamed_blobs_match_full_fit():
    data, held_out = _blobs(8000, seed=1)
    stream = VariationalMemory(4, DIM).fit_stream(data, batch_size=400, num_epochs=2, seed=3)
    full = VariationalMemory(4, DIM).fit(data)

    # 1,000 held-out points and memories each estimated from about 2,000 points: both fits
    # sit within about 0.01 nats per point of the maximum likelihood fit.
    assert abs(stream.score(held_out) - full.score(held_out)) < 0.02
    labels = stream.predict(held_out).numpy()
    assert adjusted_rand_score(full.predict(held_out).numpy(), labels) > 0.99
    assert len(stream.elbo_history_) == 40


def test_checkpoint_resume_continues_the_stream(tmp_path):
    data, _ = _blobs(1000)
    options = dict(batch_size=100, num_epochs=2, seed=5)
    uninterrupted = VariationalMemory(4, DIM).fit_stream(data, **options)
    path = str(tmp_path / "vm.pt")
    VariationalMemory(4, DIM).fit_stream(data, max_steps=7, checkpoint=path, **options)
    resumed = VariationalMemory(4, DIM).fit_stream(data, checkpoint=path, resume=True, **options)

    assert resumed.n_iter_ == 20
    assert resumed.elbo_history_ == uninterrupted.elbo_history_
    for mine, theirs in zip(
        resumed._current_parameters(), uninterrupted._current_parameters(), strict=True
    ):
        # The same float64 operations on the same batches.
        assert torch.equal(mine, theirs)


def test_overflow_stops_and_keeps_last_parameters():
    data, _ = _blobs(500)
    batches = [torch.as_tensor(data[start : start + 100]) for start in range(0, 500, 100)]
    reference = VariationalMemory(4, DIM).fit_stream(batches[:2])
    batches[2] = batches[2].clone()
    batches[2][0, 0] = 1e200  # finite, but its square overflows float64
    memory = VariationalMemory(4, DIM)
    with pytest.raises(RuntimeError, match="fit stopped at iteration 2"):
        memory.fit_stream(batches)
    for mine, theirs in zip(
        memory._current_parameters(), reference._current_parameters(), strict=True
    ):
        assert torch.equal(mine, theirs)


def test_fit_stream_rejects_bad_arguments():
    data, _ = _blobs(50)
    memory = VariationalMemory(4, DIM)
    with pytest.raises(ValueError, match="step_size_exponent must be in"):
        memory.fit_stream(data, batch_size=10, step_size_exponent=2.0)
    with pytest.raises(ValueError, match="num_memories must be at most"):
        memory.fit_stream(data, batch_size=2)
    with pytest.raises(ValueError, match=r"batch 0 must have shape \(B, 3\)"):
        memory.fit_stream([torch.zeros(8, 2, dtype=torch.float64)])


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "cannot be read"), (b"junk", "cannot be read"), (None, "no 'stream' entry")],
)
def test_resume_rejects_foreign_checkpoint(tmp_path, content, message):
    path = tmp_path / "memory.pt"
    if content is None:
        torch.save({"fit": {}}, path)
    else:
        path.write_bytes(content)
    memory = VariationalMemory(num_memories=2, dim=3)
    with pytest.raises(ValueError, match=message):
        memory.fit_stream(np.zeros((10, 3)), batch_size=5, checkpoint=str(path), resume=True)
