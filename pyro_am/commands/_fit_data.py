"""The patterns of ``pyro-am fit``: loading and checking them, the held-out split and the scaling.

The scaling is the affine map ``z = (x - shift) / factor`` per column. It is fitted to the
training points only, so the held-out points do not inform it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pyro_am.cli import UsageError
from pyro_am.datasets import Dataset, load_dataset, load_pattern_file

SCALINGS = ("auto", "unit", "standardize", "none")


@dataclass
class Scaling:
    """The affine map ``z = (x - shift) / factor`` applied per column before fitting.

    :ivar name: ``unit`` (one global shift and factor onto [0, 1]), ``standardize`` (per
        column mean and standard deviation) or ``none``.
    :ivar shift: the subtracted value per column.
    :ivar factor: the divisor per column, positive.
    """

    name: str
    shift: list[float]
    factor: list[float]

    @classmethod
    def fit(cls, name: str, data: np.ndarray) -> Scaling:
        dim = data.shape[1]
        if name == "unit":
            low, high = float(data.min()), float(data.max())
            span = high - low if high > low else 1.0
            return cls(name, [low] * dim, [span] * dim)
        if name == "standardize":
            std = data.std(axis=0)
            std = np.where(std > 1e-12, std, 1.0)
            return cls(name, data.mean(axis=0).tolist(), std.tolist())
        return cls("none", [0.0] * dim, [1.0] * dim)

    def transform(self, data):
        shift, factor = self._as(data)
        return (data - shift) / factor

    def inverse(self, data):
        shift, factor = self._as(data)
        return data * factor + shift

    def log_abs_det_jacobian(self) -> float:
        """Return ``log |dz/dx| = -sum_d log factor_d``, so ``log p(x) = log p(z) + this``."""
        return -float(np.log(np.asarray(self.factor)).sum())

    def _as(self, data):
        if isinstance(data, torch.Tensor):
            return (
                torch.as_tensor(self.shift, dtype=data.dtype, device=data.device),
                torch.as_tensor(self.factor, dtype=data.dtype, device=data.device),
            )
        return np.asarray(self.shift), np.asarray(self.factor)


def choose_scaling(name: str, dataset: Dataset) -> str:
    """Resolve ``auto``: ``unit`` for images (one grey scale for all pixels), else ``standardize``.

    Per-pixel standardization would blow up the nearly constant border pixels of the digits.
    """
    if name != "auto":
        return name
    return "unit" if dataset.image_shape is not None else "standardize"


def split_held_out(num_points: int, fraction: float, seed: int):
    """Return (train index, held-out index) from a seeded permutation; held-out may be empty."""
    order = np.random.default_rng(seed).permutation(num_points)
    num_held_out = int(round(fraction * num_points))
    num_held_out = min(num_held_out, num_points - 1)
    return np.sort(order[num_held_out:]), np.sort(order[:num_held_out])


def load_data(args) -> Dataset:
    """Load ``--data FILE`` or ``--dataset NAME`` (default digits) and check it has >= 2 points."""
    if args.data is not None:
        dataset = load_pattern_file(args.data)
    else:
        dataset = load_dataset(args.dataset or "digits")
    if not np.isfinite(dataset.data).all():
        raise UsageError(f"{dataset.name} contains NaN or infinite values; remove them first.")
    if dataset.num_patterns < 2:
        raise UsageError(
            f"{dataset.name} has {dataset.num_patterns} pattern(s); a fit needs at least 2."
        )
    return dataset
