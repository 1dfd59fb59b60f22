"""Data-parallel fits of the DP memory on 2 gloo processes against 1 process on the same data.

The reference is the single-process fit (:meth:`DPMemory.fit`, :meth:`DPMemory.fit_stream`) on
the concatenation of the ranks' blocks with the same seed. The processes talk over 127.0.0.1 and
use CPU tensors in float64.
"""

import numpy as np
import pytest
import torch

from pyro_am import distributed
from pyro_am.models import DPMemory

DIM = 3


def _blobs():
    generator = np.random.default_rng(4)
    centres = 4.0 * generator.standard_normal((4, DIM))
    labels = generator.integers(4, size=301)
    # 301 rows split 151 / 150, so the blocks differ in size.
    return torch.as_tensor(centres[labels] + generator.standard_normal((301, DIM)))


def _memory(truncation=2):
    # A small truncation makes the CAVI fit create memories, so births are compared too.
    return DPMemory(DIM, truncation=truncation, prior_scale=4.0, name="parallel")


def _fit_all(data, distributed_fit, stream_source):
    cavi = _memory()
    cavi_result = cavi.fit(data, max_iter=60, seed=1, progress=False, distributed=distributed_fit)
    svi = _memory(truncation=4)
    svi_result = svi.fit(
        data, method="svi", max_iter=40, seed=2, progress=False, distributed=distributed_fit
    )
    stream = _memory()
    stream_result = stream.fit_stream(
        stream_source, batch_size=50, num_epochs=3, seed=3, progress=False
    )
    return {
        name: {
            "elbo": torch.tensor(result.elbo),
            "events": result.events,
            "parameters": memory.variational_parameters(),
            "counts": memory.memory_counts,
        }
        for name, memory, result in [
            ("cavi", cavi, cavi_result),
            ("svi", svi, svi_result),
            ("stream", stream, stream_result),
        ]
    }


def _parallel_worker(rank, world_size, data):
    start, stop = distributed.shard_bounds(data.shape[0], rank, world_size)
    # The streaming source is the whole array: each rank keeps its rows of every batch.
    return _fit_all(data[start:stop], True, data)


@pytest.fixture(scope="module")
def fits():
    data = _blobs()
    parallel = distributed.launch_local(_parallel_worker, 2, args=(data,), timeout_seconds=240)
    return parallel, _fit_all(data, False, data)


@pytest.mark.parametrize("method", ["cavi", "svi", "stream"])
def test_two_ranks_match_one_process(fits, method):
    parallel, single = fits
    reference = single[method]
    for result in parallel:
        # float64; the ranks add the same terms in a different order, so the relative error per
        # step is near 1e-15 and stays below 1e-9 over these 40 to 60 steps.
        tolerance = dict(rtol=1e-9, atol=1e-9)
        assert [event["kind"] for event in result[method]["events"]] == [
            event["kind"] for event in reference["events"]
        ]
        torch.testing.assert_close(result[method]["elbo"], reference["elbo"], **tolerance)
        for name, value in reference["parameters"].items():
            torch.testing.assert_close(result[method]["parameters"][name], value, **tolerance)
        torch.testing.assert_close(result[method]["counts"], reference["counts"], **tolerance)


def test_cavi_reference_creates_memories(fits):
    # The comparison covers births only if the single-process fit made some.
    _, single = fits
    kinds = [event["kind"] for event in single["cavi"]["events"]]
    assert "created" in kinds
    assert single["cavi"]["parameters"]["memory_loc"].shape[0] >= 4
