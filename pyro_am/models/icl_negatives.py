"""Negative samples for contrastive divergence: initial chains and a replay buffer.

Langevin chains start from a uniform box ``[-s, s]^D`` or from ``N(0, s^2 I)``. With a replay
buffer, each chain instead starts, with probability ``replay_fraction``, from a past negative of
any data set, and the final negatives are written back into the buffer, oldest first.
"""

from __future__ import annotations

import torch

from pyro_am._validation import check_int


class ReplayBuffer:
    """A fixed-capacity store of past negatives, overwritten oldest first."""

    def __init__(self, capacity: int, dim: int, dtype, device):
        check_int("capacity", capacity)
        check_int("dim", dim)
        self.points = torch.empty((0, dim), dtype=dtype, device=device)
        self.capacity = capacity
        self.position = 0

    def __len__(self) -> int:
        return self.points.shape[0]

    def push(self, points: torch.Tensor) -> None:
        # Of more than ``capacity`` new points only the newest can survive the push.
        points = points.reshape(-1, points.shape[-1])[-self.capacity :]
        room = self.capacity - len(self)
        if room > 0:
            self.points = torch.cat([self.points, points[:room]])
            points = points[room:]
        for start in range(0, points.shape[0], self.capacity):
            chunk = points[start : start + self.capacity]
            index = (self.position + torch.arange(chunk.shape[0])) % self.capacity
            self.points[index.to(self.points.device)] = chunk
            self.position = int((self.position + chunk.shape[0]) % self.capacity)

    def sample(self, count: int, generator) -> torch.Tensor:
        index = torch.randint(len(self), (count,), generator=generator, device=generator.device)
        return self.points[index.to(self.points.device)]

    def state_dict(self) -> dict:
        return {"points": self.points.cpu(), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.points = state["points"].to(self.points)
        self.position = int(state["position"])


def initial_chains(shape, config, generator, dtype, device) -> torch.Tensor:
    """Draw initial Langevin states from the uniform box or Gaussian that ``config`` names.

    :param config: a :class:`~pyro_am.models.icl_training.CDConfig` (``init``, ``init_scale``).
    """
    if config.init == "uniform":
        unit = torch.rand(shape, generator=generator, dtype=dtype, device=device)
        return config.init_scale * (2.0 * unit - 1.0)
    return config.init_scale * torch.randn(shape, generator=generator, dtype=dtype, device=device)


def start_negatives(shape, config, buffer, generator, dtype, device) -> torch.Tensor:
    """Draw initial chains, each replaced by a replay-buffer point with ``replay_fraction``."""
    chains = initial_chains(shape, config, generator, dtype, device)
    if buffer is None or len(buffer) == 0 or config.replay_fraction == 0.0:
        return chains
    flat = chains.reshape(-1, shape[-1])
    uniform = torch.rand(flat.shape[0], generator=generator, dtype=dtype, device=device)
    replay = uniform < config.replay_fraction
    count = int(replay.sum())
    if count:
        flat[replay] = buffer.sample(count, generator)
    return flat.reshape(shape)


__all__ = ["ReplayBuffer", "initial_chains", "start_negatives"]
