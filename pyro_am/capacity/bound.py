"""The analytic sufficient condition for storage, by a contraction argument.

With ``phi_rho(d) = d^2 / 2 - rho d``, pattern i is stored if ``d_i > 2 rho``,
``A_i = sum_j d_ij exp(-beta phi_rho(d_ij)) <= rho`` and
``L_i = beta sum_j d_ij^2 exp(-beta phi_A_i(d_ij)) < 1``. :func:`storage_bound` evaluates this
pairwise form and its nearest-neighbour form, and :func:`separation_threshold` returns the
separation ``Delta*(N)`` above which the nearest-neighbour form holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pyro_am._validation import as_float_tensor, check_int, check_memories
from pyro_am.capacity.geometry import (
    _DIFFERENCE_BLOCK_ELEMENTS,
    _ball_radius,
    _bandwidth,
    _scalar,
    _sphere_separations,
    check_on_sphere,
)


# -- analytic sufficient condition ---------------------------------------------------------------
@dataclass
class StorageBound:
    """Outcome of :func:`storage_bound`, per pattern.

    :ivar certified: the pairwise condition holds, so the pattern is stored.
    :ivar certified_nearest: the nearest-neighbour condition holds; it implies
        ``certified``.
    :ivar separations: ``Delta_i``, shape (N,).
    :ivar off_weight: ``min(1, (N - 1) exp(-beta phi_rho(d_i)))``, a bound on the
        total softmax weight of the other patterns anywhere in ``B_i``.
    :ivar image_radius: ``A_i``, the bound on ``|F(x) - x_i|`` over ``B_i``.
    :ivar lipschitz: ``L_i``, the bound on the Jacobian norm of F over the ball of
        radius ``min(A_i, rho)`` around ``x_i``.
    :ivar image_radius_nearest: ``(N - 1) M_1``, the nearest-neighbour form of
        ``image_radius``.
    :ivar lipschitz_nearest: the nearest-neighbour form of ``lipschitz``.
    :ivar threshold: ``Delta*``: the nearest-neighbour condition holds exactly when
        ``Delta_i > Delta*`` (up to the bisection's rounding at the boundary); ``inf`` when no
        separation suffices.
    :ivar ball_radius: rho.
    """

    certified: torch.Tensor
    certified_nearest: torch.Tensor
    separations: torch.Tensor
    off_weight: torch.Tensor
    image_radius: torch.Tensor
    lipschitz: torch.Tensor
    image_radius_nearest: torch.Tensor
    lipschitz_nearest: torch.Tensor
    threshold: float
    ball_radius: float


def _kernel_term(power: int, distance, beta: float, ball_radius):
    """Compute ``d^k exp(-beta phi_rho(d))`` with ``phi_rho(d) = d^2 / 2 - rho d``; 0 at d = inf."""
    finite = torch.isfinite(distance)
    safe = torch.where(finite, distance, torch.zeros_like(distance))
    value = safe.pow(power) * torch.exp(-beta * (0.5 * safe.square() - ball_radius * safe))
    return torch.where(finite, value, torch.zeros_like(value))


def _peak(power: int, nearest: torch.Tensor, beta: float, ball_radius, radius: float):
    """Compute ``M_k = max_{d_i <= d <= 2r} d^k exp(-beta phi_rho(d))`` for ``k = power``.

    The logarithm of the maximized function is concave in d with its peak at
    ``(rho + sqrt(rho^2 + 4 k / beta)) / 2``, so the maximum over the interval is at that peak
    clamped to the interval. ``ball_radius`` may be a tensor broadcastable with ``nearest``; an
    infinite ``d_i`` (no other pattern) gives 0.
    """
    ball_radius = torch.as_tensor(ball_radius, dtype=nearest.dtype, device=nearest.device)
    peak = 0.5 * (ball_radius + torch.sqrt(ball_radius.square() + 4.0 * power / beta))
    upper = torch.clamp(nearest, min=2.0 * radius)
    point = torch.minimum(torch.maximum(nearest, peak), upper)
    return _kernel_term(power, point, beta, ball_radius)


def _nearest_condition(nearest: torch.Tensor, count: int, beta: float, rho: float, radius: float):
    """Evaluate the nearest-neighbour condition; returns ``(certified, image, lipschitz)``."""
    others = count - 1
    image = others * _peak(1, nearest, beta, rho, radius)
    inner = image.clamp(max=rho)
    lipschitz = beta * others * _peak(2, nearest, beta, inner, radius)
    certified = (nearest > 2.0 * rho) & (image <= rho) & (lipschitz < 1.0)
    return certified, image, lipschitz


def _holds(nearest: float, count: int, beta: float, rho: float, radius: float) -> bool:
    """Evaluate the nearest-neighbour condition for one float distance, as in
    :func:`_nearest_condition` but with math functions, for the bisection's many calls."""

    def peak(power: int, ball_radius: float) -> float:
        top = 0.5 * (ball_radius + math.sqrt(ball_radius**2 + 4.0 * power / beta))
        point = min(max(nearest, top), max(nearest, 2.0 * radius))
        return point**power * math.exp(-beta * (0.5 * point**2 - ball_radius * point))

    image = (count - 1) * peak(1, rho)
    lipschitz = beta * (count - 1) * peak(2, min(image, rho))
    return nearest > 2.0 * rho and image <= rho and lipschitz < 1.0


def _pairwise_condition(memories: torch.Tensor, beta: float, rho: float):
    """Compute ``A_i`` and ``L_i`` from all pairwise distances, in blocks of rows.

    ``A_i = sum_j d_ij exp(-beta phi_rho(d_ij))`` and
    ``L_i = beta sum_j d_ij^2 exp(-beta phi_rho'(d_ij))`` with ``rho' = min(A_i, rho)``.
    Differences are formed explicitly, as in :func:`nearest_neighbour_distances`.
    """
    num_patterns, dim = memories.shape
    image = torch.zeros(num_patterns, dtype=memories.dtype, device=memories.device)
    lipschitz = torch.zeros_like(image)
    rows_per_block = max(1, _DIFFERENCE_BLOCK_ELEMENTS // (num_patterns * dim))
    for start in range(0, num_patterns, rows_per_block):
        stop = min(start + rows_per_block, num_patterns)
        distance = (memories[start:stop, None, :] - memories[None, :, :]).norm(dim=-1)
        rows = torch.arange(stop - start, device=memories.device)
        distance[rows, rows + start] = math.inf
        block_image = _kernel_term(1, distance, beta, rho).sum(-1)
        inner = block_image.clamp(max=rho).unsqueeze(-1)
        image[start:stop] = block_image
        lipschitz[start:stop] = beta * _kernel_term(2, distance, beta, inner).sum(-1)
    return image, lipschitz


def separation_threshold(
    num_patterns: int, bandwidth: float, radius: float, ball_radius: float | None = None
) -> float:
    """Return ``Delta*``, the separation above which the nearest-neighbour condition holds.

    That condition depends on ``Delta_i`` only through ``d_i = sqrt(2 Delta_i)``. Its image bound
    ``(N - 1) M_1`` cannot grow as ``d_i`` grows, because ``M_1`` is a maximum over ``[d_i, 2r]``.
    Its Lipschitz bound cannot grow either, because the interval shrinks and the inner radius
    ``min((N - 1) M_1, rho)`` does not grow. So the certified separations form an interval
    ``(Delta*, 2 r^2]``, and ``Delta* = d*^2 / 2`` is found by bisection on d over
    ``[2 rho, 2 r]``. A single pattern is always stored, so its threshold is 0. If even
    ``d_i = 2 r`` (antipodal patterns) fails, the threshold is ``inf``.
    """
    count = check_int("num_patterns", num_patterns)
    bandwidth = _bandwidth(bandwidth)
    radius = _scalar("radius", radius)
    rho = _ball_radius(ball_radius, bandwidth)
    if count == 1:
        return 0.0
    beta = 1.0 / bandwidth**2
    low, high = 2.0 * rho, 2.0 * radius
    if low >= high or not _holds(high, count, beta, rho, radius):
        return math.inf
    if _holds(low * (1.0 + 1e-15), count, beta, rho, radius):
        return 0.5 * low**2
    for _ in range(200):
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        if _holds(middle, count, beta, rho, radius):
            high = middle
        else:
            low = middle
    return 0.5 * low**2


def storage_bound(
    memories: torch.Tensor | None,
    bandwidth: float,
    radius: float | None = None,
    *,
    separations: torch.Tensor | None = None,
    num_patterns: int | None = None,
    ball_radius: float | None = None,
) -> StorageBound:
    """Certify patterns as stored from their distances to the others, by a contraction argument.

    Write ``phi_rho(d) = d^2 / 2 - rho d`` and ``d_ij = |x_i - x_j|``. For ``x`` in ``B_i`` and
    ``j != i``, ``|x - x_j|^2 - |x - x_i|^2 >= 2 phi_rho(d_ij)``, so the softmax weight ``w_j(x)``
    is at most ``exp(-beta phi_rho(d_ij))``. Hence::

        |F(x) - x_i| <= sum_j w_j(x) d_ij <= sum_j d_ij exp(-beta phi_rho(d_ij)) = A_i
        |J_F(x)| = beta |Cov_w(x_n)| <= beta sum_j w_j(x) d_ij^2

    A pattern is certified when ``d_i > 2 rho`` (its ball is disjoint from the others),
    ``A_i <= rho`` (F maps ``B_i`` into the ball of radius ``rho' = A_i`` around ``x_i``) and
    ``L_i = beta sum_j d_ij^2 exp(-beta phi_rho'(d_ij)) < 1`` (F is a contraction on that smaller
    ball, which it maps into itself). Banach's theorem then gives one fixed point in ``B_i``,
    and every start in ``B_i`` converges to it.

    The nearest-neighbour form replaces each ``d_ij`` by the worst distance in ``[d_i, 2r]``, so
    it depends only on ``Delta_i = d_i^2 / 2``, N, r and h (``M_k`` is the maximum of
    ``d^k exp(-beta phi(d))`` there): ``(N - 1) M_1 <= rho`` and ``beta (N - 1) M_2 < 1``, with
    ``M_2`` taken at the inner radius. It implies the pairwise form. With only ``separations``
    given, the pairwise form cannot be evaluated, and ``certified`` is the nearest-neighbour
    form.

    :param torch.Tensor memories: patterns of shape (N, D) on the sphere of radius ``radius``, or
        None when ``separations`` is given.
    :param float bandwidth: kernel bandwidth h > 0.
    :param float radius: the sphere's radius r; by default the patterns' mean norm. Required with
        ``separations``.
    :param torch.Tensor separations: ``Delta_i`` of shape (N,), in place of ``memories``.
    :param int num_patterns: N, the number of patterns in the memory; each separation is judged
        as one pattern's among N. By default the number of separations (or of memories).
    :param float ball_radius: rho > 0; default ``h / 2``.
    :returns: a :class:`StorageBound`.
    """
    bandwidth = _bandwidth(bandwidth)
    if (memories is None) == (separations is None):
        raise ValueError("pass exactly one of memories and separations to storage_bound.")
    if memories is not None:
        memories = check_memories("memories", memories)
        radius = check_on_sphere("memories", memories, radius)
        delta = _sphere_separations(memories)
    else:
        if radius is None:
            raise ValueError("radius is required when storage_bound is given separations.")
        radius = _scalar("radius", radius)
        delta = as_float_tensor("separations", separations).reshape(-1)
        if delta.numel() == 0 or bool((torch.isnan(delta) | (delta < 0)).any()):
            raise ValueError(
                "separations must be a non-empty tensor of values >= 0 (inf for a lone pattern)."
            )
    if num_patterns is None:
        count = delta.numel()
    elif memories is not None and num_patterns != delta.numel():
        raise ValueError(
            f"num_patterns must equal the number of memories ({delta.numel()}) when memories are "
            f"given, but got {num_patterns}."
        )
    else:
        count = check_int("num_patterns", num_patterns)
    rho = _ball_radius(ball_radius, bandwidth)

    beta = 1.0 / bandwidth**2
    nearest = torch.sqrt(2.0 * delta)
    phi = torch.where(
        torch.isfinite(nearest),
        0.5 * nearest.square() - rho * nearest,
        torch.full_like(delta, math.inf),
    )
    off_weight = ((count - 1) * torch.exp(-beta * phi)).clamp(max=1.0)
    certified_nearest, image_nearest, lipschitz_nearest = _nearest_condition(
        nearest, count, beta, rho, radius
    )
    if memories is None:
        certified, image, lipschitz = certified_nearest, image_nearest, lipschitz_nearest
    else:
        image, lipschitz = _pairwise_condition(memories, beta, rho)
        certified = (nearest > 2.0 * rho) & (image <= rho) & (lipschitz < 1.0)
    return StorageBound(
        certified=certified,
        certified_nearest=certified_nearest,
        separations=delta,
        off_weight=off_weight,
        image_radius=image,
        lipschitz=lipschitz,
        image_radius_nearest=image_nearest,
        lipschitz_nearest=lipschitz_nearest,
        threshold=separation_threshold(count, bandwidth, radius, rho),
        ball_radius=rho,
    )
