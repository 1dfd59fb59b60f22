"""Minibatch sources: every kind of source yields the same batches and the same streamed fit."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pyro_am.minibatches import BlockSource, minibatches
from pyro_am.models import DPMemory

DIM = 3


def _data(num_data=400):
    generator = np.random.default_rng(11)
    centres = 5.0 * generator.standard_normal((3, DIM))
    return centres[generator.integers(3, size=num_data)] + generator.standard_normal(
        (num_data, DIM)
    )


def _fit(source, **options):
    memory = DPMemory(DIM, truncation=3, prior_scale=5.0)
    memory.fit_stream(source, seed=0, progress=False, **options)
    return memory.variational_parameters()


def test_sources_give_identical_fits(tmp_path):
    data = _data()
    reference = _fit(data, batch_size=100, shuffle=False)

    np.save(tmp_path / "all.npy", data)
    memmap = np.load(tmp_path / "all.npy", mmap_mode="r")
    shards = tmp_path / "shards"
    shards.mkdir()
    for index in range(4):
        np.save(shards / f"part{index}.npy", data[100 * index : 100 * (index + 1)])
    paths = [str(shards / f"part{index}.npy") for index in range(4)]
    loader = DataLoader(TensorDataset(torch.as_tensor(data)), batch_size=100, shuffle=False)

    candidates = {
        "memmap": _fit(memmap, batch_size=100, shuffle=False),
        "file": _fit(str(tmp_path / "all.npy"), batch_size=100, shuffle=False),
        "folder": _fit(str(shards), batch_size=100, shuffle=False),
        "paths": _fit(paths, batch_size=100, shuffle=False),
        "tensor": _fit(torch.as_tensor(data), batch_size=100, shuffle=False),
        "loader": _fit(loader),
    }
    for kind, parameters in candidates.items():
        for name, value in reference.items():
            # The same float64 rows in the same order: the fits are identical.
            assert torch.equal(parameters[name], value), (kind, name)


def test_memmap_float32_batches_keep_dtype(tmp_path):
    np.save(tmp_path / "data.npy", _data().astype(np.float32))
    source = minibatches(str(tmp_path / "data.npy"), 64)
    batches = list(source.epoch(0))
    assert all(batch.dtype == torch.float32 for batch in batches)
    assert [len(batch) for batch in batches] == [64] * 6 + [16]
    assert source.num_data == 400
    assert source.num_batches == 7


def test_block_source_ranks_split_each_block():
    data = torch.arange(23 * 2, dtype=torch.float64).reshape(23, 2)
    source = BlockSource([data[:13], data[13:]], batch_size=5, shuffle=True, seed=3)
    single = list(source.epoch(2))
    ranks = [list(source.epoch(2, rank=rank, world_size=3)) for rank in range(3)]
    assert len(single) == 5  # blocks never cross the boundary between the two arrays
    for step, block in enumerate(single):
        joined = torch.cat([ranks[rank][step] for rank in range(3)])
        assert torch.equal(joined, block)
    # Shuffled order: every block once per epoch, reproducible from the seed and the epoch.
    assert sorted(source.order(2)) == list(range(5))
    assert source.order(2) == BlockSource([data[:13], data[13:]], 5, True, 3).order(2)
    assert torch.equal(torch.cat(single).sum(0), data.sum(0))


def test_resume_position_skips_batches():
    data = torch.arange(20, dtype=torch.float64).reshape(10, 2)
    source = minibatches(data, 3)
    assert torch.equal(next(source.epoch(0, start=2)), data[6:9])


def test_minibatches_rejects_bad_sources(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros(5))
    with pytest.raises(ValueError, match="shape \\(N, D\\)"):
        minibatches(str(tmp_path / "flat.npy"), 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="contains no .npy files"):
        minibatches(str(empty), 2)
    with pytest.raises(FileNotFoundError, match="not found"):
        minibatches(str(tmp_path / "missing.npy"), 2)
    with pytest.raises(ValueError, match="same D"):
        BlockSource([np.zeros((3, 2)), np.zeros((3, 4))], 2)
    with pytest.raises(ValueError, match="does not match"):
        minibatches(np.zeros((3, 2)), 2, num_data=5)
    with pytest.raises(ValueError, match="batch_size must be an integer in"):
        minibatches(np.zeros((3, 2)), 0)
    with pytest.raises(TypeError, match="source must be"):
        minibatches(3.0, 2)


def test_minibatches_rejects_integer_dtype():
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        minibatches(np.zeros((3, 2)), 2, dtype=torch.int64)


def test_minibatches_rejects_empty_loader():
    loader = DataLoader(TensorDataset(torch.zeros(0, 2)), batch_size=4)
    with pytest.raises(ValueError, match="data set is empty"):
        minibatches(loader)
