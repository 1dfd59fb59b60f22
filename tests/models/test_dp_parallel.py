"""Data-parallel fits of the DP memory on 2 gloo processes against 1 process on the same data.

The reference is the single-process fit (:meth:`DPMemory.fit`, :meth:`DPMemory.fit_stream`) on
the concatenation of the ranks' blocks with the same seed. The processes talk over 127.0.0.1 and
use CPU tensors in float64.
"""

import numpy as np
import pytest
import torch

from pyro_am import distributed
from pyro_am.models import DPMemory, VariationalMemory

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


def _resumed(block, directory):
    """Fit in two parts through a checkpoint that rank 0 writes and every rank reads."""
    parameters = {}
    for method, split, total, truncation in [("cavi", 4, 60, 2), ("svi", 15, 40, 4)]:
        path = f"{directory}/{method}.pt"
        seed = 1 if method == "cavi" else 2
        first = _memory(truncation)
        first_result = first.fit(
            block, method, max_iter=split, seed=seed, checkpoint=path, progress=False,
            distributed=True,
        )  # fmt: skip
        # A different seed: only a resumed run reproduces the uninterrupted one.
        resumed = _memory(truncation)
        result = resumed.fit(
            block, method, max_iter=total, seed=99, checkpoint=path, resume=True,
            progress=False, distributed=True,
        )  # fmt: skip
        parameters[method] = {
            "first_elbo": first_result.elbo,
            "elbo": result.elbo,
            "parameters": resumed.variational_parameters(),
        }
    return parameters


def _parallel_worker(rank, world_size, data, directory):
    start, stop = distributed.shard_bounds(data.shape[0], rank, world_size)
    # The streaming source is the whole array: each rank keeps its rows of every batch.
    results = _fit_all(data[start:stop], True, data)
    results["resumed"] = _resumed(data[start:stop], directory)
    results["variational"] = _variational_stream(data)
    # Rank 0 passes one batch more than rank 1, which every rank must detect.
    batches = [data[index * 40 : (index + 1) * 40] for index in range(3 - rank)]
    try:
        _memory().fit_stream(batches, num_data=240, seed=0, progress=False)
        results["mismatch"] = None
    except ValueError as error:
        results["mismatch"] = str(error)
    return results


def _variational_stream(data):
    memory = VariationalMemory(4, DIM, name="parallel_variational")
    memory.fit_stream(data, batch_size=50, num_epochs=2, seed=3)
    return {"elbo": torch.tensor(memory.elbo_history_), "locs": memory.locs.detach()}


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    data = _blobs()
    directory = str(tmp_path_factory.mktemp("checkpoints"))
    parallel = distributed.launch_local(
        _parallel_worker, 2, args=(data, directory), timeout_seconds=240
    )
    single = _fit_all(data, False, data)
    single["variational"] = _variational_stream(data)
    return parallel, single


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


@pytest.mark.parametrize("method", ["cavi", "svi"])
def test_two_ranks_resume_from_checkpoint(fits, method):
    parallel, _ = fits
    split = 4 if method == "cavi" else 15
    for result in parallel:
        resumed = result["resumed"][method]
        assert len(resumed["first_elbo"]) == split
        # The resumed record starts with the checkpoint's trace.
        assert resumed["elbo"][:split] == resumed["first_elbo"]
        assert len(resumed["elbo"]) == len(result[method]["elbo"])
        for name, value in result[method]["parameters"].items():
            # The checkpoint stores float64 parameters, which round-trip through the positive
            # constraint's transform, so the resumed run differs by rounding only.
            torch.testing.assert_close(resumed["parameters"][name], value, rtol=1e-9, atol=1e-9)


def test_two_ranks_stream_variational_memory(fits):
    parallel, single = fits
    reference = single["variational"]
    for result in parallel:
        # float64 stepwise EM whose batch sums are all-reduced: rounding differences only.
        tolerance = dict(rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(result["variational"]["elbo"], reference["elbo"], **tolerance)
        torch.testing.assert_close(result["variational"]["locs"], reference["locs"], **tolerance)


def test_two_ranks_unequal_batch_counts_raise(fits):
    parallel, _ = fits
    for result in parallel:
        assert "yielded different numbers of batches" in result["mismatch"]
