"""Patterns on a sphere: the radius check, nearest-neighbour distances and separations.

The separation of pattern i is ``Delta_i = r^2 - max_{j != i} x_i . x_j``, which on the sphere of
radius r equals ``d_i^2 / 2`` with ``d_i`` the distance to the nearest other pattern. This module
also draws uniform patterns and sets the default ball radius ``rho = h / 2``.
"""

from __future__ import annotations

import math

import torch

from pyro_am._validation import check_int, check_memories, check_positive

# Pairwise differences are formed in blocks of at most this many elements (8 MiB in float64).
_DIFFERENCE_BLOCK_ELEMENTS = 1 << 20

# Range of bandwidths h for which 1 / h^2 is a finite positive float64.
_MIN_BANDWIDTH = 1e-150
_MAX_BANDWIDTH = 1e150


# -- geometry ------------------------------------------------------------------------------------
def _scalar(name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, but has shape {tuple(value.shape)}.")
        value = value.item()
    check_positive(name, value)
    return float(value)


def _bandwidth(value) -> float:
    # beta = 1 / h^2 must be a finite positive float: h^2 underflows to 0 below about 1e-154 and
    # overflows above about 1e154.
    bandwidth = _scalar("bandwidth", value)
    if not _MIN_BANDWIDTH <= bandwidth <= _MAX_BANDWIDTH:
        raise ValueError(
            f"bandwidth must be in [{_MIN_BANDWIDTH:g}, {_MAX_BANDWIDTH:g}], so that "
            f"beta = 1 / bandwidth**2 is a finite positive float, but got {bandwidth}."
        )
    return bandwidth


def _sphere_tolerance(dtype: torch.dtype) -> float:
    return 10.0 * math.sqrt(torch.finfo(dtype).eps)


def check_on_sphere(name: str, memories: torch.Tensor, radius: float | None) -> float:
    """Check that every row of ``memories`` has norm ``radius`` and return that radius.

    With ``radius=None`` the radius is the mean norm. The relative tolerance is
    ``10 sqrt(eps)`` of the dtype, about 1.5e-7 in float64 and 3.5e-3 in float32.
    """
    norms = memories.norm(dim=-1)
    if radius is None:
        radius = float(norms.mean())
        if radius <= 0.0:
            raise ValueError(f"{name} must lie on a sphere of positive radius, but all are zero.")
    else:
        radius = _scalar("radius", radius)
    deviation = float((norms - radius).abs().max()) / radius
    if deviation > _sphere_tolerance(memories.dtype):
        raise ValueError(
            f"{name} must lie on the sphere of radius {radius:.6g}, but a norm deviates from it by "
            f"a relative {deviation:.3g}; normalize the rows, for example "
            "radius * x / x.norm(dim=-1, keepdim=True)."
        )
    return radius


def nearest_neighbour_distances(memories: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute each pattern's distance to its nearest other pattern, and that pattern's index.

    Differences are formed explicitly, in blocks of rows, rather than through the GEMM expansion,
    so that close pairs keep their relative accuracy. A single pattern has distance ``inf`` and
    index -1.

    :param torch.Tensor memories: patterns of shape (N, D).
    :returns: ``(distances, indices)``, both of shape (N,).
    """
    memories = check_memories("memories", memories)
    num_patterns, dim = memories.shape
    distances = torch.full((num_patterns,), math.inf, dtype=memories.dtype, device=memories.device)
    indices = torch.full((num_patterns,), -1, dtype=torch.long, device=memories.device)
    if num_patterns == 1:
        return distances, indices
    rows_per_block = max(1, _DIFFERENCE_BLOCK_ELEMENTS // (num_patterns * dim))
    for start in range(0, num_patterns, rows_per_block):
        stop = min(start + rows_per_block, num_patterns)
        squared = (memories[start:stop, None, :] - memories[None, :, :]).square().sum(-1)
        rows = torch.arange(stop - start, device=memories.device)
        squared[rows, rows + start] = math.inf
        block_min, block_index = squared.min(dim=-1)
        distances[start:stop] = block_min.sqrt()
        indices[start:stop] = block_index
    return distances, indices


def separations(memories: torch.Tensor, radius: float | None = None) -> torch.Tensor:
    """Compute ``Delta_i = r^2 - max_{j != i} x_i . x_j`` for patterns on a sphere of radius r.

    On the sphere ``Delta_i = d_i^2 / 2`` with ``d_i`` the nearest-neighbour distance, which is how
    it is evaluated (without cancellation for close pairs). A single pattern has ``Delta = inf``.

    :param torch.Tensor memories: patterns of shape (N, D) with equal norms.
    :param float radius: the sphere's radius r; by default the patterns' mean norm.
    :returns: separations of shape (N,).
    """
    memories = check_memories("memories", memories)
    check_on_sphere("memories", memories, radius)
    return _sphere_separations(memories)


def _sphere_separations(memories: torch.Tensor) -> torch.Tensor:
    distances, _ = nearest_neighbour_distances(memories)
    return 0.5 * distances.square()


def uniform_on_sphere(
    num_patterns: int,
    dim: int,
    radius: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw ``num_patterns`` patterns uniformly on the sphere of radius ``radius`` in R^dim."""
    num_patterns = check_int("num_patterns", num_patterns)
    dim = check_int("dim", dim)
    radius = _scalar("radius", radius)
    gaussian = torch.randn(num_patterns, dim, generator=generator, dtype=dtype, device=device)
    return radius * gaussian / gaussian.norm(dim=-1, keepdim=True)


def default_ball_radius(bandwidth: float) -> float:
    """Return the default ball radius ``rho = h / 2``, half a kernel width."""
    return 0.5 * _bandwidth(bandwidth)


def _ball_radius(ball_radius, bandwidth: float) -> float:
    if ball_radius is None:
        return default_ball_radius(bandwidth)
    return _scalar("ball_radius", ball_radius)
