"""Process-group helpers: one-process behaviour, shard bounds, and the local launcher's limits."""

import time

import pytest
import torch

from pyro_am import distributed


def _sleeping_worker(rank, world_size, seconds):
    time.sleep(seconds)
    return rank


def _sum_worker(rank, world_size):
    (total,) = distributed.all_reduce_sum([torch.tensor([float(rank + 1)])])
    distributed.barrier()
    return float(total), distributed.broadcast_object(f"from {rank}")


@pytest.mark.parametrize("num_items, world_size", [(10, 3), (2, 2), (7, 1), (5, 8)])
def test_shard_bounds_partition_rows(num_items, world_size):
    bounds = [distributed.shard_bounds(num_items, rank, world_size) for rank in range(world_size)]
    assert bounds[0][0] == 0
    assert bounds[-1][1] == num_items
    for (_, stop), (start, _) in zip(bounds, bounds[1:], strict=False):
        assert stop == start
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)


def test_helpers_without_process_group():
    assert not distributed.is_initialized()
    assert distributed.get_rank() == 0
    assert distributed.get_world_size() == 1
    tensor = torch.arange(3.0)
    (result,) = distributed.all_reduce_sum([tensor])
    assert torch.equal(result, tensor)
    assert result is not tensor
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_gather_object(5) == [5]
    assert distributed.collective_device() == torch.device("cpu")
    distributed.barrier()


def test_launch_local_reduces_over_two_ranks():
    results = distributed.launch_local(_sum_worker, 2, timeout_seconds=120)
    # 1 + 2 over the two ranks; rank 0's object reaches both ranks.
    assert results == [(3.0, "from 0"), (3.0, "from 0")]


def test_launch_local_times_out():
    # The worker would return normally after 60 s, so only the timeout can raise here.
    with pytest.raises(TimeoutError, match="did not finish within 3"):
        distributed.launch_local(_sleeping_worker, 1, args=(60.0,), timeout_seconds=3.0)


def test_launch_local_rejects_bad_arguments():
    with pytest.raises(ValueError, match="backend must be one of"):
        distributed.launch_local(_sleeping_worker, 1, backend="mpi")
    with pytest.raises(ValueError, match="world_size must be an integer in"):
        distributed.launch_local(_sleeping_worker, 0)
    with pytest.raises(ValueError, match="timeout_seconds must be positive"):
        distributed.launch_local(_sleeping_worker, 1, timeout_seconds=0)
    with pytest.raises(ValueError, match="rank must be an integer in"):
        distributed.shard_bounds(4, 2, 2)
