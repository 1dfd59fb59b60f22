"""Sharded memory banks against the unsplit bank in one process (the reference).

The two-process checks run with gloo on 127.0.0.1, so they use CPU tensors whatever the device
fixture says; the one-process checks honour it.
"""

import pytest
import torch

from pyro_am import distributed, retrieve
from pyro_am.energies import DenseAMEnergy, GaussianKDEEnergy
from pyro_am.sharded import (
    ShardedDenseAMEnergy,
    ShardedGaussianKDEEnergy,
    ShardedMemoryBank,
    combine_across_ranks,
)
from pyro_am.streaming import softmax_statistics

BANDWIDTH = 0.6
BETA = 2.0


def _problem(dtype=torch.float64, device="cpu"):
    generator = torch.Generator().manual_seed(3)
    # 101 memories split 51 / 50, so the blocks differ in size.
    memories = torch.randn(101, 3, generator=generator, dtype=dtype)
    queries = memories[:12] + 0.3 * torch.randn(12, 3, generator=generator, dtype=dtype)
    return memories.to(device), queries.to(device)


def _sharded_worker(rank, world_size, memories, queries):
    bank = ShardedMemoryBank.from_full(memories)
    kde = bank.energy("kde", bandwidth=BANDWIDTH)
    dense = bank.energy("dense_am", beta=BETA)
    local_memories = bank.local_memories.clone().requires_grad_(True)
    ShardedGaussianKDEEnergy(local_memories, BANDWIDTH).energy(queries).sum().backward()
    fixed = retrieve(kde, queries, method="fixed_point", tol=1e-6, max_steps=200)
    gradient = retrieve(kde, queries, method="gradient", tol=1e-6, max_steps=100)
    dense_result = retrieve(dense, queries, method="fixed_point", tol=1e-8)
    generator = torch.Generator().manual_seed(5)
    langevin = retrieve(kde, queries, method="langevin", max_steps=5, generator=generator)
    return {
        "offset": bank.offset,
        "local": bank.local_num_memories,
        "num_memories": kde.num_memories,
        "energy": kde.energy(queries),
        "grad": kde.grad(queries),
        "fixed_point": kde.fixed_point(queries),
        "log_prob": kde.log_prob(queries),
        "responsibilities": kde.responsibilities(queries),
        "memory_grad": local_memories.grad,
        "fixed": fixed,
        "gradient": gradient,
        "dense_energy": dense.energy(queries),
        "dense": dense_result,
        "langevin": langevin.states,
        "gathered": bank.gather(),
    }


@pytest.fixture(scope="module")
def two_ranks():
    memories, queries = _problem()
    results = distributed.launch_local(_sharded_worker, 2, args=(memories, queries))
    return memories, queries, results


def test_two_ranks_split_bank(two_ranks):
    memories, _, results = two_ranks
    assert [result["local"] for result in results] == [51, 50]
    assert [result["offset"] for result in results] == [0, 51]
    assert all(result["num_memories"] == 101 for result in results)
    assert torch.equal(results[0]["gathered"], memories)


def test_two_ranks_bitwise_identical(two_ranks):
    # The statistics are gathered in rank order and combined identically, so every rank computes
    # exactly the same numbers and takes the same convergence decisions.
    first, second = two_ranks[2]
    for key in ("energy", "grad", "fixed_point", "log_prob", "dense_energy", "langevin"):
        assert torch.equal(first[key], second[key]), key
    for key in ("fixed", "gradient", "dense"):
        assert torch.equal(first[key].states, second[key].states), key
        assert torch.equal(first[key].steps, second[key].steps), key
        assert torch.equal(first[key].converged, second[key].converged), key


def test_two_ranks_match_one_process(two_ranks):
    memories, queries, results = two_ranks
    result = results[0]
    kde = GaussianKDEEnergy(memories, BANDWIDTH)
    dense = DenseAMEnergy(memories, BETA)
    # float64: combining two blocks instead of streaming one changes only the order of a few
    # additions, so the relative error stays near 1e-15; 1e-10 leaves room for 200 steps.
    tolerance = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(result["energy"], kde.energy(queries), **tolerance)
    torch.testing.assert_close(result["grad"], kde.grad(queries), **tolerance)
    torch.testing.assert_close(result["fixed_point"], kde.fixed_point(queries), **tolerance)
    torch.testing.assert_close(result["log_prob"], kde.log_prob(queries), **tolerance)
    torch.testing.assert_close(result["dense_energy"], dense.energy(queries), **tolerance)

    reference = retrieve(kde, queries, method="fixed_point", tol=1e-6, max_steps=200)
    torch.testing.assert_close(result["fixed"].states, reference.states, **tolerance)
    assert torch.equal(result["fixed"].steps, reference.steps)
    assert torch.equal(result["fixed"].converged, reference.converged)
    # The queries stop at different steps, so the active set really shrank during the run.
    assert len(set(reference.steps.tolist())) > 1

    reference = retrieve(kde, queries, method="gradient", tol=1e-6, max_steps=100)
    torch.testing.assert_close(result["gradient"].states, reference.states, **tolerance)
    assert torch.equal(result["gradient"].steps, reference.steps)

    reference = retrieve(dense, queries, method="fixed_point", tol=1e-8)
    torch.testing.assert_close(result["dense"].states, reference.states, **tolerance)
    assert torch.equal(result["dense"].steps, reference.steps)

    generator = torch.Generator().manual_seed(5)
    reference = retrieve(kde, queries, method="langevin", max_steps=5, generator=generator)
    torch.testing.assert_close(result["langevin"], reference.states, **tolerance)


def test_two_ranks_responsibilities_and_gradients(two_ranks):
    memories, queries, results = two_ranks
    kde = GaussianKDEEnergy(memories, BANDWIDTH)
    local = torch.cat([result["responsibilities"] for result in results], dim=-1)
    torch.testing.assert_close(local, kde.responsibilities(queries), rtol=1e-10, atol=1e-12)

    # Autograd reaches each rank's own memories exactly; the blocks stack to the full gradient.
    full = memories.clone().requires_grad_(True)
    GaussianKDEEnergy(full, BANDWIDTH).energy(queries).sum().backward()
    stacked = torch.cat([result["memory_grad"] for result in results])
    torch.testing.assert_close(stacked, full.grad, rtol=1e-10, atol=1e-12)


def test_one_process_equals_unsharded(device):
    memories, queries = _problem(device=device)
    sharded = ShardedGaussianKDEEnergy(memories, BANDWIDTH)
    assert sharded.num_memories == 101
    assert torch.equal(sharded.energy(queries), GaussianKDEEnergy(memories, BANDWIDTH)(queries))
    dense = ShardedDenseAMEnergy(memories, BETA)
    assert torch.equal(dense.energy(queries), DenseAMEnergy(memories, BETA)(queries))


def test_combine_across_ranks_single_process_identity(device):
    memories, queries = _problem(device=device)
    statistics = softmax_statistics(
        queries, memories, torch.zeros(101, dtype=memories.dtype, device=device), memories
    )
    assert combine_across_ranks(statistics) is statistics


def test_bank_rejects_bad_arguments():
    memories, _ = _problem()
    bank = ShardedMemoryBank(memories)
    with pytest.raises(ValueError, match="energy must be one of"):
        bank.energy("gmm", bandwidth=1.0)
    with pytest.raises(ValueError, match="needs a bandwidth"):
        bank.energy("kde")
    with pytest.raises(ValueError, match="needs beta"):
        bank.energy("dense_am")
    with pytest.raises(ValueError, match="local_memories must have shape"):
        ShardedMemoryBank(torch.zeros(3))


def test_bank_from_npy_reads_rows(tmp_path):
    import numpy as np

    memories, _ = _problem()
    path = tmp_path / "bank.npy"
    np.save(path, memories.numpy())
    bank = ShardedMemoryBank.from_npy(path)
    assert torch.equal(bank.local_memories, memories)
    np.save(tmp_path / "flat.npy", memories.numpy().ravel())
    with pytest.raises(ValueError, match="shape"):
        ShardedMemoryBank.from_npy(tmp_path / "flat.npy")
