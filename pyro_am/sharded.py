"""Memory banks split across processes, with energies and retrieval equal to the unsplit bank's.

Rank r of P holds the memories ``X_r``, a contiguous block of the N rows of the bank. Every energy
here has logits affine in a feature map of the query, so each rank computes the streamed softmax
statistics of its own block (:func:`pyro_am.streaming.softmax_statistics`)::

    m_r = max_{n in r} l_n,   Z_r = sum_{n in r} exp(l_n - m_r),
    W_r = sum_{n in r} exp(l_n - m_r) v_n

and the statistics of the whole bank follow exactly from the P triples::

    m = max_r m_r,   Z = sum_r exp(m_r - m) Z_r,   W = sum_r exp(m_r - m) W_r

which is :func:`pyro_am.streaming.combine_statistics` across ranks. Each retrieval step costs one
all-gather of ``B x (V + 2)`` numbers, where B is the number of queries and V the width of the
values, independent of N.

The queries are replicated: every rank passes the same queries and receives the same energies,
gradients and fixed-point maps. The triples are all-gathered in rank order and every rank runs the
same combination on the same inputs, so the combined statistics are bitwise identical on all
ranks. :func:`pyro_am.retrieve` decides per query whether it converged from these values alone,
so every rank keeps the same active queries and calls the collectives in the same order.
Langevin retrieval needs the same ``generator`` seed on every rank for the same reason.

Autograd: each rank's combined statistics are differentiable through its own block only (the
other blocks arrive as constants), so the gradient of a replicated loss with respect to this
rank's memories is exact. A replicated tensor (queries, bandwidth, beta) also enters terms that
every rank computes in full, such as the ``|x|^2 / (2 h^2)`` term of the KDE energy, so its
autograd gradient is neither the full gradient nor a share that sums to it.
NOTE: differentiate replicated parameters in one process; the closed-form gradients with respect
to the queries, which retrieval uses, are exact and need no autograd.
"""

from __future__ import annotations

import numpy as np
import torch

from pyro_am import distributed
from pyro_am._validation import check_memories
from pyro_am.dynamics import retrieve
from pyro_am.energies import DenseAMEnergy, Energy, GaussianKDEEnergy
from pyro_am.streaming import SoftmaxStatistics, combine_statistics

ENERGIES = ("kde", "dense_am")


def _pack(statistics: SoftmaxStatistics) -> torch.Tensor:
    columns = [statistics.maximum.unsqueeze(-1), statistics.normalizer.unsqueeze(-1)]
    if statistics.weighted is not None:
        columns.append(statistics.weighted)
    return torch.cat([column.detach() for column in columns], dim=-1)


def _unpack(packed: torch.Tensor, with_values: bool) -> SoftmaxStatistics:
    weighted = packed[:, 2:] if with_values else None
    return SoftmaxStatistics(packed[:, 0], packed[:, 1], weighted)


def combine_across_ranks(local: SoftmaxStatistics, group=None) -> SoftmaxStatistics:
    """Combine this rank's softmax statistics with every other rank's over disjoint memories.

    Every rank must call it with statistics of the same queries (same shapes). The result is
    bitwise identical on every rank, and differentiable through ``local`` only.

    :param SoftmaxStatistics local: statistics of this rank's memories, shapes (B,) and (B, V).
    :returns: the statistics of the union of all ranks' memories.
    """
    world_size = distributed.get_world_size(group)
    if world_size == 1:
        return local
    with_values = local.weighted is not None
    gathered = distributed.all_gather_tensor(_pack(local), group)
    parts = [_unpack(packed, with_values) for packed in gathered]
    # The gathered copy of this rank's block has the same values as ``local``; using ``local``
    # keeps its autograd graph without changing the forward result.
    parts[distributed.get_rank(group)] = local
    return combine_statistics(parts)


class ShardedEnergy(Energy):
    """Mix-in that turns a streamed energy over this rank's memories into one over all ranks'.

    Combine it before a concrete energy (``class E(ShardedEnergy, GaussianKDEEnergy)``), as
    :class:`ShardedGaussianKDEEnergy` and :class:`ShardedDenseAMEnergy` do. ``memories`` is this
    rank's block, :attr:`num_memories` counts the whole bank, and :attr:`local_num_memories` the
    block. Every method is a collective: all ranks must call it with the same queries.
    """

    def _init_shard(self, group) -> None:
        self.group = group
        sizes = torch.tensor(list(self.memories.shape), dtype=torch.long, device=self.device)
        shapes = [part.tolist() for part in distributed.all_gather_tensor(sizes, group)]
        dims = {dim for _, dim in shapes}
        if len(dims) != 1:
            raise ValueError(
                f"every rank must hold memories of the same dimension, but the ranks hold "
                f"dimensions {[dim for _, dim in shapes]}."
            )
        self.shard_sizes = [rows for rows, _ in shapes]
        rank = distributed.get_rank(group)
        self.shard_offset = sum(self.shard_sizes[:rank])

    @property
    def num_memories(self) -> int:
        return sum(self.shard_sizes)

    @property
    def local_num_memories(self) -> int:
        return self.memories.shape[0]

    def _statistics(self, x, with_values):
        return combine_across_ranks(super()._statistics(x, with_values), self.group)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """Compute the softmax weights of this rank's memories, of shape (..., local N).

        The weights are normalized over the whole bank, so they sum to one only across ranks. Row
        ``i`` of the bank is column ``i - shard_offset`` here.
        """
        flat, batch_shape = self._flatten(x)
        statistics = self._statistics(flat, with_values=False)
        features, keys, bias = self._logit_parts(flat)
        logits = torch.addmm(bias, features, keys.T)
        weights = torch.exp(logits - statistics.logsumexp().unsqueeze(-1))
        return weights.reshape(*batch_shape, self.local_num_memories)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_memories={self.num_memories}, "
            f"local_num_memories={self.local_num_memories}, dim={self.dim})"
        )


class ShardedGaussianKDEEnergy(ShardedEnergy, GaussianKDEEnergy):
    """Gaussian KDE energy over a bank split across ranks; see :class:`GaussianKDEEnergy`.

    :param torch.Tensor memories: this rank's memories, shape (N_r, D).
    :param bandwidth: kernel bandwidth h > 0, the same on every rank.
    :param group: the process group; None is the default group (or one process).
    :param int block_elements: the largest number of logits held at once while streaming.
    """

    def __init__(self, memories, bandwidth, group=None, block_elements: int | None = None):
        super().__init__(memories, bandwidth, block_elements=block_elements)
        self._init_shard(group)


class ShardedDenseAMEnergy(ShardedEnergy, DenseAMEnergy):
    """Dense associative memory energy over a bank split across ranks; see :class:`DenseAMEnergy`.

    The constant ``M^2 / 2`` uses ``M = max_n |x_n|`` over all ranks, computed once here.

    :param torch.Tensor memories: this rank's memories, shape (N_r, D).
    :param beta: inverse temperature beta > 0, the same on every rank.
    :param group: the process group; None is the default group (or one process).
    :param int block_elements: the largest number of logits held at once while streaming.
    """

    def __init__(self, memories, beta, group=None, block_elements: int | None = None):
        super().__init__(memories, beta, block_elements=block_elements)
        self._init_shard(group)
        # NOTE: M is detached, so autograd sees it as a constant of the memories.
        local_max = self.memories.detach().norm(dim=-1).max()
        self._max_norm = distributed.all_reduce_max(local_max, group)

    @property
    def max_norm(self) -> torch.Tensor:
        return self._max_norm

    def _logit_parts(self, x):
        bias = torch.zeros(self.local_num_memories, dtype=self.dtype, device=self.device)
        return x * self.beta, self.memories, bias


class ShardedMemoryBank:
    """The block of a memory bank that this rank holds, and the sharded energies built on it.

    Rank r holds rows ``[offset, offset + N_r)`` of the bank. Build it from this rank's block, from
    the full bank (each rank keeps its rows), or from a ``.npy`` file that each rank reads only its
    rows of::

        bank = ShardedMemoryBank.from_npy("memories.npy")     # under torchrun
        result = bank.retrieve(queries, energy="kde", bandwidth=0.5)

    :param torch.Tensor local_memories: this rank's memories, shape (N_r, D), N_r >= 1.
    :param group: the process group; None is the default group (or one process).
    """

    def __init__(self, local_memories, group=None):
        self.local_memories = check_memories("local_memories", local_memories)
        self.group = group
        shapes = distributed.all_gather_tensor(
            torch.tensor(list(self.local_memories.shape), device=self.local_memories.device), group
        )
        self.shard_sizes = [int(shape[0]) for shape in shapes]
        self.offset = sum(self.shard_sizes[: distributed.get_rank(group)])

    @classmethod
    def from_full(cls, memories, group=None) -> ShardedMemoryBank:
        """Keep this rank's contiguous block (see :func:`~pyro_am.distributed.shard_bounds`)."""
        memories = check_memories("memories", memories)
        rank, world_size = distributed.get_rank(group), distributed.get_world_size(group)
        if memories.shape[0] < world_size:
            raise ValueError(
                f"memories must hold at least one row per rank, but has {memories.shape[0]} rows "
                f"for {world_size} ranks."
            )
        start, stop = distributed.shard_bounds(memories.shape[0], rank, world_size)
        return cls(memories[start:stop].clone(), group)

    @classmethod
    def from_npy(cls, path, group=None, dtype=None, device=None) -> ShardedMemoryBank:
        """Read this rank's block of the (N, D) array in the ``.npy`` file ``path``.

        The file is memory-mapped, so each rank reads only its own rows from disk.
        """
        array = np.load(path, mmap_mode="r")
        if array.ndim != 2:
            raise ValueError(f"{path} must hold an array of shape (N, D), but has {array.shape}.")
        rank, world_size = distributed.get_rank(group), distributed.get_world_size(group)
        if array.shape[0] < world_size:
            raise ValueError(
                f"{path} must hold at least one row per rank, but has {array.shape[0]} rows for "
                f"{world_size} ranks."
            )
        start, stop = distributed.shard_bounds(array.shape[0], rank, world_size)
        block = torch.from_numpy(np.array(array[start:stop]))
        return cls(block.to(dtype=dtype or block.dtype, device=device), group)

    @property
    def num_memories(self) -> int:
        return sum(self.shard_sizes)

    @property
    def local_num_memories(self) -> int:
        return self.local_memories.shape[0]

    @property
    def dim(self) -> int:
        return self.local_memories.shape[1]

    def energy(self, energy: str = "kde", *, bandwidth=None, beta=None, block_elements=None):
        """Build the sharded energy ``"kde"`` (needs ``bandwidth``) or ``"dense_am"`` (``beta``)."""
        if energy == "kde":
            if bandwidth is None:
                raise ValueError("energy='kde' needs a bandwidth > 0, but bandwidth is None.")
            return ShardedGaussianKDEEnergy(
                self.local_memories, bandwidth, self.group, block_elements
            )
        if energy == "dense_am":
            if beta is None:
                raise ValueError("energy='dense_am' needs beta > 0, but beta is None.")
            return ShardedDenseAMEnergy(self.local_memories, beta, self.group, block_elements)
        raise ValueError(f"energy must be one of {ENERGIES}, but got {energy!r}.")

    def retrieve(self, x0, energy: str = "kde", *, bandwidth=None, beta=None, **kwargs):
        """Run :func:`pyro_am.retrieve` on the sharded energy; every rank gets the same result."""
        sharded = self.energy(energy, bandwidth=bandwidth, beta=beta)
        return retrieve(sharded, x0, **kwargs)

    def gather(self) -> torch.Tensor:
        """Return the whole bank, shape (N, D), on every rank (it must fit in one process)."""
        largest = max(self.shard_sizes)
        padded = self.local_memories.new_zeros(largest, self.dim)
        padded[: self.local_num_memories] = self.local_memories
        blocks = distributed.all_gather_tensor(padded, self.group)
        return torch.cat(
            [block[:size] for block, size in zip(blocks, self.shard_sizes, strict=True)]
        )

    def __repr__(self) -> str:
        return (
            f"ShardedMemoryBank(num_memories={self.num_memories}, "
            f"local_num_memories={self.local_num_memories}, dim={self.dim}, offset={self.offset})"
        )


__all__ = [
    "ENERGIES",
    "ShardedDenseAMEnergy",
    "ShardedEnergy",
    "ShardedGaussianKDEEnergy",
    "ShardedMemoryBank",
    "combine_across_ranks",
]
