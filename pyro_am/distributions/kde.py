"""Gaussian kernel density estimate as a Pyro distribution.

For memories ``x_1 .. x_N`` in ``R^D`` and bandwidth ``h > 0``::

    p(x) = (1 / N) sum_n N(x; x_n, h^2 I)
    log p(x) = logsumexp_n(-|x - x_n|^2 / (2 h^2)) - log N - (D / 2) log(2 pi h^2)
    E[x] = (1 / N) sum_n x_n,   Cov[x] = h^2 I + (1 / N) sum_n (x_n - E[x]) (x_n - E[x])^T

The density is ``exp(-E_kde(x))`` of :class:`pyro_am.energies.GaussianKDEEnergy`, normalized. A draw
picks a memory uniformly at random and adds Gaussian noise of scale ``h``: ``x = x_I + h eps``.
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution

from pyro_am._validation import as_float_tensor, check_finite
from pyro_am.energies import GaussianKDEEnergy


class GaussianKDE(TorchDistribution):
    """Gaussian kernel density estimate over ``R^D`` centred on a bank of memories.

    This is the density an associative memory with a Gaussian kernel defines, so it serves as a
    likelihood whose parameters are the memories and the bandwidth. For example, the bandwidth that
    maximizes the held-out likelihood is fitted by SVI with an empty guide::

        bandwidth = pyro.param("bandwidth", torch.tensor(1.0), constraint=constraints.positive)
        with pyro.plate("held_out", len(held_out)):
            pyro.sample("obs", GaussianKDE(train, bandwidth), obs=held_out)

    :meth:`rsample` is reparameterized: the memory index ``I`` is drawn uniformly, so its law does
    not depend on any parameter, and ``x_I + h eps`` is differentiable in the memories and in the
    bandwidth. With unbatched memories of shape (N, D) and a scalar bandwidth, :meth:`log_prob` is
    streamed through :class:`~pyro_am.energies.GaussianKDEEnergy` in GEMM form, so its peak memory
    does not grow with N.

    .. note:: With batched memories or a batched bandwidth, :meth:`log_prob` materializes the
        (..., N) squared distances of each query to the memories of its batch element.

    :param torch.Tensor memories: kernel centres of shape (\\*batch, N, D).
    :param bandwidth: kernel bandwidth h > 0, a float or a tensor broadcastable to the batch shape.
    :param bool validate_args: whether to check the parameters and the values passed to
        :meth:`log_prob` against their constraints.
    """

    arg_constraints = {
        "memories": constraints.independent(constraints.real, 2),
        "bandwidth": constraints.positive,
    }
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, memories, bandwidth, *, validate_args=None):
        memories = as_float_tensor("memories", memories)
        if memories.dim() < 2 or memories.shape[-2] < 1 or memories.shape[-1] < 1:
            raise ValueError(
                "memories must have shape (*batch, num_memories, dim) with at least one memory, "
                f"but has shape {tuple(memories.shape)}."
            )
        bandwidth = as_float_tensor("bandwidth", bandwidth, like=memories)
        try:
            batch_shape = torch.broadcast_shapes(memories.shape[:-2], bandwidth.shape)
        except RuntimeError as error:
            raise ValueError(
                f"bandwidth of shape {tuple(bandwidth.shape)} does not broadcast with the batch "
                f"shape {tuple(memories.shape[:-2])} of the memories."
            ) from error

        # Unbatched memories and a scalar bandwidth take the streamed path. The energy checks
        # finiteness and positivity itself, regardless of validate_args.
        self._energy = None
        if memories.dim() == 2 and bandwidth.numel() == 1:
            self._energy = GaussianKDEEnergy(memories, bandwidth.reshape(()))

        self._memories = memories
        self.memories = memories.expand(batch_shape + memories.shape[-2:])
        self.bandwidth = bandwidth.expand(batch_shape)
        super().__init__(batch_shape, memories.shape[-1:], validate_args=validate_args)
        if self._validate_args:
            # The real constraint rejects NaN only, and an infinite memory breaks log_prob too.
            check_finite("memories", memories)

    @staticmethod
    def infer_shapes(memories, bandwidth):
        batch_shape = torch.broadcast_shapes(memories[:-2], bandwidth)
        return batch_shape, memories[-1:]

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        new = self._get_checked_instance(GaussianKDE, _instance)
        new._energy = self._energy
        new._memories = self._memories
        new.memories = self.memories.expand(batch_shape + self.memories.shape[-2:])
        new.bandwidth = self.bandwidth.expand(batch_shape)
        super(GaussianKDE, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self.__dict__.get("_validate_args")
        return new

    @property
    def energy(self) -> GaussianKDEEnergy:
        """The :class:`~pyro_am.energies.GaussianKDEEnergy` of the memories, when unbatched."""
        if self._energy is None:
            raise ValueError(
                "energy is defined for unbatched memories of shape (N, D) and a scalar bandwidth, "
                f"but this GaussianKDE has memories of shape {tuple(self.memories.shape)} and "
                f"bandwidth of shape {tuple(self.bandwidth.shape)}."
            )
        return self._energy

    @property
    def num_memories(self) -> int:
        return self.memories.shape[-2]

    @property
    def mean(self) -> torch.Tensor:
        return self.memories.mean(-2)

    @property
    def variance(self) -> torch.Tensor:
        spread = self.memories.var(-2, correction=0)
        return spread + self.bandwidth.square().unsqueeze(-1)

    @property
    def covariance_matrix(self) -> torch.Tensor:
        centred = self.memories - self.mean.unsqueeze(-2)
        spread = centred.mT @ centred / self.num_memories
        identity = torch.eye(self.event_shape[0], dtype=spread.dtype, device=spread.device)
        return spread + self.bandwidth.square()[..., None, None] * identity

    def rsample(self, sample_shape=()) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        leading = shape[:-1]
        index = torch.randint(
            self.num_memories, leading, device=self.memories.device, dtype=torch.long
        )
        noise = torch.randn(shape, dtype=self.memories.dtype, device=self.memories.device)
        return self._select(index) + self.bandwidth.unsqueeze(-1) * noise

    def _select(self, index: torch.Tensor) -> torch.Tensor:
        """Gather ``memories[..., index, :]`` from the unexpanded memories.

        Indexing the memories as given, rather than their expanded view, keeps the backward pass
        from allocating a gradient of the full (sample, batch, N, D) shape.
        """
        memories = self._memories
        batch_rank = len(self.batch_shape)
        memories = memories.reshape((1,) * (batch_rank + 2 - memories.dim()) + memories.shape)
        batch_indices = []
        for position, size in enumerate(memories.shape[:batch_rank]):
            trailing_ones = (1,) * (batch_rank - 1 - position)
            batch_indices.append(
                torch.arange(size, device=index.device).reshape((size,) + trailing_ones)
            )
        return memories[(*batch_indices, index)]

    def sample(self, sample_shape=()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Compute the exact log density of value of shape (..., D), of shape (...)."""
        if self._validate_args:
            self._validate_sample(value)
        result_shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        if self._energy is not None:
            return self._energy.log_prob(value).expand(result_shape)
        return self._batched_log_prob(value).expand(result_shape)

    def _batched_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        # |x - m|^2 = |x|^2 - 2 x.m + |m|^2, with one matrix product per batch element.
        cross = (value.unsqueeze(-2) @ self.memories.mT).squeeze(-2)
        squared_distances = (
            value.square().sum(-1, keepdim=True) - 2 * cross + self.memories.square().sum(-1)
        )
        variance = self.bandwidth.square()
        log_kernel = torch.logsumexp(-0.5 * squared_distances / variance.unsqueeze(-1), dim=-1)
        dim = self.event_shape[0]
        log_normalizer = math.log(self.num_memories) + 0.5 * dim * torch.log(2 * math.pi * variance)
        return log_kernel - log_normalizer


__all__ = ["GaussianKDE"]
