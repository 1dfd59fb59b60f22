"""Families of small synthetic data sets for pretraining in-context energies.

An in-context energy ``E(x | D)`` is pretrained on many data sets ``D`` drawn from a family. Each
family here draws a whole batch of data sets as one tensor of shape (num_datasets, n, D):

* :class:`GaussianMixtureFamily`: K isotropic Gaussians with equal weights,
  ``mu_k ~ N(0, prior_std^2 I)``, ``z ~ Uniform{1..K}``, ``x | z ~ N(mu_z, component_std^2 I)``.
  Its true density is known, so samples and predictive densities can be scored against it.
* :class:`ShapesFamily`: scikit-learn's 2-D shapes (``make_moons``, ``make_circles``,
  ``make_blobs``), each data set moved by a random rotation, scale and shift so that the location of
  the shape must be read from the context.

Every draw takes an optional :class:`torch.Generator` on the CPU. Random numbers are drawn on the
CPU and the points are then moved to the family's device, so a seeded generator gives the same data
sets on every device. A family with ``num_distinct=None`` draws a new data set every time. With
``num_distinct=M`` it contains M data sets, data set ``i`` fixed by ``(seed, i)``, and each draw
picks data sets uniformly from them. For mixtures the parameters of data set ``i`` are fixed and its
points are redrawn. For shapes its ``max_points`` points are fixed and a draw takes a subset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pyro_am._validation import check_int, check_positive

SHAPES = ("moons", "circles", "blobs")


@dataclass
class MixtureBatch:
    """A batch of data sets drawn from a :class:`GaussianMixtureFamily`.

    :ivar points: shape (num_datasets, n, D).
    :ivar locs: the component means of each data set, shape (num_datasets, K, D).
    :ivar assignments: the component of every point, shape (num_datasets, n), int64.
    :ivar component_std: the standard deviation of every component.
    """

    points: torch.Tensor
    locs: torch.Tensor
    assignments: torch.Tensor
    component_std: float

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluate the true log density of each data set's mixture at ``x`` of shape (B, m, D)."""
        return mixture_log_prob(x, self.locs, self.component_std)

    def sample(self, num_points: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``num_points`` new points from each data set's mixture, shape (B, num_points, D)."""
        num_points = check_int("num_points", num_points)
        points, _ = _sample_mixture(self.locs, self.component_std, num_points, generator)
        return points


def mixture_log_prob(x: torch.Tensor, locs: torch.Tensor, component_std: float) -> torch.Tensor:
    """Log density of equal-weight isotropic mixtures, one per data set.

    ``log p(x) = logsumexp_k [-|x - mu_k|^2 / (2 s^2)] - log K - (D/2) log(2 pi s^2)``, with the
    squared distances in GEMM form.

    :param torch.Tensor x: points of shape (B, m, D).
    :param torch.Tensor locs: means of shape (B, K, D).
    :param float component_std: the standard deviation ``s`` of every component.
    :returns: shape (B, m).
    """
    check_positive("component_std", component_std)
    if x.dim() != 3 or locs.dim() != 3 or x.shape[-1] != locs.shape[-1]:
        raise ValueError(
            "x and locs must have shapes (B, m, D) and (B, K, D) with the same D, but have "
            f"shapes {tuple(x.shape)} and {tuple(locs.shape)}."
        )
    num_components, dim = locs.shape[-2], locs.shape[-1]
    variance = component_std**2
    squared = (
        x.square().sum(-1, keepdim=True)
        - 2.0 * x @ locs.transpose(-1, -2)
        + locs.square().sum(-1).unsqueeze(-2)
    ).clamp_min(0.0)
    log_norm = math.log(num_components) + 0.5 * dim * math.log(2.0 * math.pi * variance)
    return torch.logsumexp(-0.5 * squared / variance, dim=-1) - log_norm


def _sample_mixture(locs, component_std, num_points, generator):
    batch, num_components, dim = locs.shape
    assignments = torch.randint(num_components, (batch, num_points), generator=generator)
    noise = torch.randn((batch, num_points, dim), generator=generator, dtype=locs.dtype)
    assignments = assignments.to(locs.device)
    centres = torch.gather(locs, 1, assignments.unsqueeze(-1).expand(batch, num_points, dim))
    return centres + component_std * noise.to(locs.device), assignments


def _check_dtype(dtype):
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, but got {dtype!r}.")
    return dtype


class GaussianMixtureFamily:
    """Data sets drawn from random equal-weight mixtures of isotropic Gaussians.

    :param int dim: dimension D of the points.
    :param int num_components: number of components K.
    :param float prior_std: standard deviation of the prior ``N(0, prior_std^2 I)`` on each mean.
    :param float component_std: standard deviation of every component.
    :param int num_distinct: number of distinct mixtures, or None for a new mixture every draw.
    :param int seed: seed of the distinct mixtures (unused when ``num_distinct`` is None).
    :param torch.dtype dtype: floating dtype of the points.
    :param device: device of the points.
    """

    def __init__(
        self,
        dim: int = 2,
        num_components: int = 3,
        prior_std: float = 5.0,
        component_std: float = 0.33,
        num_distinct: int | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.dim = check_int("dim", dim)
        self.num_components = check_int("num_components", num_components)
        self.prior_std = float(check_positive("prior_std", prior_std))
        self.component_std = float(check_positive("component_std", component_std))
        self.num_distinct = (
            None if num_distinct is None else check_int("num_distinct", num_distinct)
        )
        self.seed = check_int("seed", seed, minimum=0)
        self.dtype = _check_dtype(dtype)
        self.device = torch.device(device)
        self._pool = None
        if self.num_distinct is not None:
            pool_generator = torch.Generator().manual_seed(self.seed)
            shape = (self.num_distinct, self.num_components, self.dim)
            pool = self.prior_std * torch.randn(shape, generator=pool_generator, dtype=dtype)
            self._pool = pool.to(self.device)

    def sample_locs(self, num_datasets: int, generator: torch.Generator | None = None):
        """Draw the component means of ``num_datasets`` data sets, shape (num_datasets, K, D)."""
        num_datasets = check_int("num_datasets", num_datasets)
        if self._pool is None:
            shape = (num_datasets, self.num_components, self.dim)
            noise = torch.randn(shape, generator=generator, dtype=self.dtype)
            return self.prior_std * noise.to(self.device)
        index = torch.randint(self.num_distinct, (num_datasets,), generator=generator)
        return self._pool[index.to(self.device)]

    def sample(
        self, num_datasets: int, num_points: int, generator: torch.Generator | None = None
    ) -> MixtureBatch:
        """Draw ``num_datasets`` data sets of ``num_points`` points each.

        :param torch.Generator generator: random source on the CPU.
        :returns: a :class:`MixtureBatch` whose ``points`` have shape (num_datasets, num_points, D).
        """
        num_points = check_int("num_points", num_points)
        locs = self.sample_locs(num_datasets, generator)
        points, assignments = _sample_mixture(locs, self.component_std, num_points, generator)
        return MixtureBatch(points, locs, assignments, self.component_std)

    def sample_points(self, num_datasets, num_points, generator=None) -> torch.Tensor:
        """Draw a batch of data sets and return only the points, shape (num_datasets, n, D)."""
        return self.sample(num_datasets, num_points, generator).points

    def __repr__(self) -> str:
        return (
            f"GaussianMixtureFamily(dim={self.dim}, num_components={self.num_components}, "
            f"prior_std={self.prior_std}, component_std={self.component_std}, "
            f"num_distinct={self.num_distinct})"
        )


class ShapesFamily:
    """Data sets made by scikit-learn's 2-D shape generators, each randomly rotated, scaled, moved.

    Data set ``i`` draws its points with ``sklearn.datasets.make_<shape>`` and maps them by
    ``x -> scale * R(angle) x + shift`` with ``angle ~ Uniform(0, 2 pi)``,
    ``log scale ~ Uniform(log scale_range[0], log scale_range[1])`` and
    ``shift ~ N(0, shift_std^2 I)``. ``make_blobs`` draws 3 centres in ``[-3, 3]^2`` with standard
    deviation 0.3.

    :param str shape: ``"moons"``, ``"circles"`` or ``"blobs"``.
    :param float noise: the ``noise`` argument of ``make_moons`` and ``make_circles``.
    :param float shift_std: standard deviation of the random shift.
    :param tuple scale_range: range of the random scale.
    :param int num_distinct: number of distinct data sets, or None for a new one every draw.
    :param int max_points: points stored per distinct data set; a draw takes at most this many.
    :param int seed: seed of the distinct data sets.
    :param torch.dtype dtype: floating dtype of the points.
    :param device: device of the points.
    """

    dim = 2

    def __init__(
        self,
        shape: str = "moons",
        noise: float = 0.05,
        shift_std: float = 2.0,
        scale_range: tuple[float, float] = (0.5, 2.0),
        num_distinct: int | None = None,
        max_points: int = 256,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, but got {shape!r}.")
        self.shape = shape
        self.noise = float(check_positive("noise", noise, allow_zero=True))
        self.shift_std = float(check_positive("shift_std", shift_std, allow_zero=True))
        low, high = (float(check_positive("scale_range", s)) for s in scale_range)
        if low > high:
            raise ValueError(f"scale_range must satisfy low <= high, but got {scale_range!r}.")
        self.scale_range = (low, high)
        self.num_distinct = (
            None if num_distinct is None else check_int("num_distinct", num_distinct)
        )
        self.max_points = check_int("max_points", max_points)
        self.seed = check_int("seed", seed, minimum=0)
        self.dtype = _check_dtype(dtype)
        self.device = torch.device(device)
        self._pool = None
        if self.num_distinct is not None:
            pool = [self._make(self.max_points, (self.seed, i)) for i in range(self.num_distinct)]
            self._pool = torch.as_tensor(np.stack(pool), dtype=dtype, device=self.device)

    def _make(self, num_points: int, seed) -> np.ndarray:
        # Imported here so that importing pyro_am.datasets does not load scikit-learn.
        from sklearn import datasets as sklearn_datasets

        rng = np.random.default_rng(seed)
        state = int(rng.integers(2**31 - 1))
        if self.shape == "moons":
            points, _ = sklearn_datasets.make_moons(
                num_points, noise=self.noise, random_state=state
            )
            points = points - np.array([0.5, 0.25])
        elif self.shape == "circles":
            points, _ = sklearn_datasets.make_circles(
                num_points, noise=self.noise, factor=0.5, random_state=state
            )
        else:
            points, _ = sklearn_datasets.make_blobs(
                num_points, centers=3, cluster_std=0.3, center_box=(-3.0, 3.0), random_state=state
            )
        angle = rng.uniform(0.0, 2.0 * math.pi)
        rotation = np.array(
            [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
        )
        scale = math.exp(rng.uniform(math.log(self.scale_range[0]), math.log(self.scale_range[1])))
        shift = self.shift_std * rng.standard_normal(2)
        return scale * points @ rotation.T + shift

    def sample_points(
        self, num_datasets: int, num_points: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw ``num_datasets`` data sets of ``num_points`` points, shape (num_datasets, n, 2).

        :param torch.Generator generator: random source on the CPU; it picks the data sets and
            the seeds of new ones, so a seeded generator makes every draw reproducible.
        """
        num_datasets = check_int("num_datasets", num_datasets)
        num_points = check_int("num_points", num_points)
        if self._pool is None:
            seeds = torch.randint(2**31 - 1, (num_datasets,), generator=generator)
            batch = np.stack([self._make(num_points, int(s)) for s in seeds])
            return torch.as_tensor(batch, dtype=self.dtype, device=self.device)
        if num_points > self.max_points:
            raise ValueError(
                f"num_points must be at most max_points={self.max_points} for a finite family, "
                f"but got {num_points}."
            )
        index = torch.randint(self.num_distinct, (num_datasets,), generator=generator)
        order = torch.rand((num_datasets, self.max_points), generator=generator).argsort(dim=1)
        order = order[:, :num_points].to(self.device)
        chosen = self._pool[index.to(self.device)]
        return torch.gather(chosen, 1, order.unsqueeze(-1).expand(-1, -1, 2))

    def __repr__(self) -> str:
        return (
            f"ShapesFamily(shape={self.shape!r}, noise={self.noise}, "
            f"num_distinct={self.num_distinct})"
        )


def make_family(name: str, **kwargs):
    """Build a family by name: ``"gmm"`` or one of :data:`SHAPES`."""
    if name == "gmm":
        return GaussianMixtureFamily(**kwargs)
    if name in SHAPES:
        return ShapesFamily(shape=name, **kwargs)
    raise ValueError(f"family must be 'gmm' or one of {SHAPES}, but got {name!r}.")


__all__ = [
    "SHAPES",
    "GaussianMixtureFamily",
    "MixtureBatch",
    "ShapesFamily",
    "make_family",
    "mixture_log_prob",
]
