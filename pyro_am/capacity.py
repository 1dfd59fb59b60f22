"""Memory capacity of a Gaussian kernel density estimate with patterns on a sphere.

Patterns ``x_1 .. x_N`` lie on the sphere ``|x_n| = r`` in R^D and the KDE has bandwidth h. Its
mean-shift map is ``F(x) = sum_n softmax_n(-|x - x_n|^2 / (2 h^2)) x_n``. Because every ``|x_n|^2``
equals ``r^2``, the logits differ from ``beta x . x_n`` (``beta = 1 / h^2``) by a term that does
not depend on n, so F is the modern Hopfield update with inverse temperature ``beta``.

Storage. With the ball ``B_i = {x : |x - x_i| <= rho}`` (by default ``rho = h / 2``), pattern i is
stored when the balls of distinct patterns are disjoint (``2 rho < d_i``, the distance from x_i to
its nearest other pattern), F maps B_i into itself, and all starts in B_i converge to one fixed
point ``x_i*`` of F inside B_i. :func:`stored_patterns` checks this numerically.

Sufficient condition (:func:`storage_bound`; the derivation is in the "KDE capacity" page of the
docs). With ``phi_rho(d) = d^2 / 2 - rho d``, the softmax weight of pattern j anywhere in B_i is at
most ``exp(-beta phi_rho(d_ij))``. Pattern i is stored if::

    d_i > 2 rho,    A_i = sum_j d_ij exp(-beta phi_rho(d_ij)) <= rho,
    L_i = beta sum_j d_ij^2 exp(-beta phi_A_i(d_ij)) < 1

The second makes F map B_i into the ball of radius A_i, and the third bounds the Jacobian
``beta Cov_w(x_n)`` there, so F is a contraction of that ball and Banach's theorem gives ``x_i*``.
Replacing every ``d_ij`` by the worst distance in ``[d_i, 2r]`` gives a form that depends only on
the separation ``Delta_i = r^2 - max_{j != i} x_i . x_j = d_i^2 / 2``, N, r and h; it holds
exactly when ``Delta_i`` exceeds a threshold ``Delta*(N)`` (:func:`separation_threshold`).

Random patterns. For patterns uniform on the sphere, the cosine ``t`` between two of them has
density proportional to ``(1 - t^2)^((D - 3) / 2)`` and tail ``P(t >= s) = I_{1 - s^2}((D - 1) / 2,
1 / 2) / 2`` for ``s >= 0`` (I is the regularized incomplete beta function). Given ``x_i``, the
other cosines are independent, so the nearest-neighbour form certifies a pattern with probability
exactly ``(1 - P(t >= s*))^(N-1)``, ``s* = 1 - Delta* / r^2``
(:func:`nearest_certified_fraction`). :func:`certified_fraction` improves on it with a truncated
Chernoff bound for the pairwise sums, and :func:`capacity_lower_bound` turns either into a
guaranteed N. :func:`high_dimensional_ceiling` is the D-independent limit that stops the growth in
D at fixed ``h / r``.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from pyro_am._validation import (
    as_float_tensor,
    check_int,
    check_interval,
    check_memories,
    check_positive,
)
from pyro_am.energies import GaussianKDEEnergy

logger = logging.getLogger(__name__)

# Pairwise differences are formed in blocks of at most this many elements (8 MiB in float64).
_DIFFERENCE_BLOCK_ELEMENTS = 1 << 20
_BETAINC_MAX_TERMS = 10_000
_BETAINC_TINY = 1e-300


# -- geometry ------------------------------------------------------------------------------------
def _scalar(name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, but has shape {tuple(value.shape)}.")
        value = value.item()
    check_positive(name, value)
    return float(value)


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
    return 0.5 * _scalar("bandwidth", bandwidth)


def _ball_radius(ball_radius, bandwidth: float) -> float:
    if ball_radius is None:
        return default_ball_radius(bandwidth)
    return _scalar("ball_radius", ball_radius)


# -- numerical verdict ---------------------------------------------------------------------------
@dataclass
class StoredPatterns:
    """Outcome of :func:`stored_patterns`; every tensor has the patterns on its first axis.

    :ivar torch.Tensor stored: the verdict, shape (N,), bool: ``disjoint``, ``self_mapped``,
        ``converged``, ``agreed`` and ``inside`` all hold and ``escaped`` does not.
    :ivar torch.Tensor fixed_points: the point reached from ``x_i`` (where iteration stopped, for
        a pattern that escaped or did not converge), shape (N, D).
    :ivar torch.Tensor distances: ``|x_i* - x_i|``, shape (N,).
    :ivar float ball_radius: the radius rho of every ball ``B_i``.
    :ivar torch.Tensor nearest_distances: distance from ``x_i`` to its nearest other pattern.
    :ivar torch.Tensor disjoint: ``B_i`` is disjoint from every other ball (``2 rho < d_i``).
    :ivar torch.Tensor self_mapped: one step of F from each boundary start stays in ``B_i``.
    :ivar torch.Tensor escaped: some iterate of some start left ``B_i``, which shows that F does
        not map ``B_i`` into itself; iteration of that pattern's starts stopped there.
    :ivar torch.Tensor converged: every start's last step moved less than ``tol``.
    :ivar torch.Tensor agreed: every start ended within ``agreement * rho`` of ``x_i*``.
    :ivar torch.Tensor inside: ``x_i*`` lies in ``B_i``.
    :ivar torch.Tensor spread: the largest distance from a start's end point to ``x_i*``.
    :ivar torch.Tensor steps: the most steps any start of the pattern took, int64.
    :ivar float tol: the stopping tolerance used.
    """

    stored: torch.Tensor
    fixed_points: torch.Tensor
    distances: torch.Tensor
    ball_radius: float
    nearest_distances: torch.Tensor
    disjoint: torch.Tensor
    self_mapped: torch.Tensor
    escaped: torch.Tensor
    converged: torch.Tensor
    agreed: torch.Tensor
    inside: torch.Tensor
    spread: torch.Tensor
    steps: torch.Tensor
    tol: float

    @property
    def fraction(self) -> float:
        """Fraction of patterns stored."""
        return float(self.stored.double().mean())


def stored_patterns(
    memories: torch.Tensor,
    bandwidth: float,
    radius: float | None = None,
    ball_radius: float | None = None,
    num_perturbations: int = 8,
    perturbation: float = 1.0,
    max_steps: int = 1000,
    tol: float | None = None,
    agreement: float = 1e-3,
    generator: torch.Generator | None = None,
) -> StoredPatterns:
    """Decide numerically, for every pattern at once, whether the KDE stores it.

    Pattern i is stored when (1) ``2 rho < d_i``, so ``B_i`` is disjoint from every other ball,
    (2) one mean-shift step from each of ``num_perturbations`` random points on the sphere
    ``|x - x_i| = perturbation * rho`` lands in ``B_i``, (3) the iterations from ``x_i`` and from
    those points never leave ``B_i`` and all converge (last step below ``tol``), (4) they end
    within ``agreement * rho`` of the point ``x_i*`` reached from ``x_i``, and (5)
    ``|x_i* - x_i| <= rho``. Checks (2) to (5) sample the conditions of the definition at finitely
    many starts, so a True verdict is evidence, not a proof. A False verdict from (1), (2) or an
    iterate leaving ``B_i`` is exact, up to rounding: it exhibits a point of ``B_i`` that F maps
    outside it. All ``N (num_perturbations + 1)`` starts iterate ``F``
    (:meth:`GaussianKDEEnergy.fixed_point <pyro_am.energies.GaussianKDEEnergy.fixed_point>`) as
    one batch, and the starts of a pattern stop together once one of them leaves its ball.

    Comparisons with rho allow a rounding slack of ``1000 eps max_n |x_n|`` (2e-13 relative in
    float64, 1e-4 in float32).

    :param torch.Tensor memories: patterns of shape (N, D); the check itself does not need them on
        a sphere.
    :param float bandwidth: kernel bandwidth h > 0.
    :param float radius: if given, the patterns must lie on the sphere of this radius.
    :param float ball_radius: rho > 0; default ``h / 2``.
    :param int num_perturbations: number of random starts on each ball's boundary, >= 1.
    :param float perturbation: distance of those starts from ``x_i`` in units of rho, in (0, 1].
    :param int max_steps: the maximum number of mean-shift steps per start.
    :param float tol: stop a start once its largest coordinate change is below ``tol``; default
        ``max(1e-7 rho, 32 eps max_n |x_n|)``, which float32 can resolve.
    :param float agreement: largest distance between end points, in units of rho, in (0, 1].
    :param torch.Generator generator: random source for the boundary directions.
    :returns: a :class:`StoredPatterns`.
    """
    memories = check_memories("memories", memories)
    bandwidth = _scalar("bandwidth", bandwidth)
    if radius is not None:
        check_on_sphere("memories", memories, radius)
    rho = _ball_radius(ball_radius, bandwidth)
    num_perturbations = check_int("num_perturbations", num_perturbations)
    check_interval("perturbation", perturbation, 0.0, 1.0, closed_high=True)
    if perturbation == 0.0:
        raise ValueError("perturbation must be in (0, 1], but got 0.0.")
    max_steps = check_int("max_steps", max_steps)
    check_interval("agreement", agreement, 0.0, 1.0, closed_high=True)
    if agreement == 0.0:
        raise ValueError("agreement must be in (0, 1], but got 0.0.")

    num_patterns, dim = memories.shape
    scale = float(memories.norm(dim=-1).max())
    eps = torch.finfo(memories.dtype).eps
    slack = 1000.0 * eps * max(scale, rho)
    if tol is None:
        tol = max(1e-7 * rho, 32.0 * eps * max(scale, rho))
    check_positive("tol", tol)

    directions = torch.randn(
        num_patterns,
        num_perturbations,
        dim,
        generator=generator,
        dtype=memories.dtype,
        device=memories.device,
    )
    directions = directions / directions.norm(dim=-1, keepdim=True)
    boundary = memories.unsqueeze(1) + (perturbation * rho) * directions
    starts = torch.cat([memories.unsqueeze(1), boundary], dim=1)

    energy = GaussianKDEEnergy(memories, bandwidth)
    with torch.no_grad():
        images = energy.fixed_point(boundary)
    self_mapped = (images - memories.unsqueeze(1)).norm(dim=-1).amax(dim=-1) <= rho + slack

    with torch.no_grad():
        states, steps, start_converged, escaped = _iterate_in_balls(
            energy, starts, rho + slack, max_steps, tol
        )
    fixed_points = states[:, 0]
    distances = (fixed_points - memories).norm(dim=-1)
    spread = (states - fixed_points.unsqueeze(1)).norm(dim=-1).amax(dim=-1)
    converged = start_converged.all(dim=-1)
    agreed = spread <= agreement * rho + slack
    inside = distances <= rho + slack

    nearest, _ = nearest_neighbour_distances(memories)
    disjoint = nearest > 2.0 * rho
    stored = disjoint & self_mapped & ~escaped & converged & agreed & inside
    logger.debug(
        "stored_patterns: %d of %d stored (rho=%.3g, %d escaped, %d not converged in %d steps)",
        int(stored.sum()),
        num_patterns,
        rho,
        int(escaped.sum()),
        int((~converged & ~escaped).sum()),
        max_steps,
    )
    return StoredPatterns(
        stored=stored,
        fixed_points=fixed_points,
        distances=distances,
        ball_radius=rho,
        nearest_distances=nearest,
        disjoint=disjoint,
        self_mapped=self_mapped,
        escaped=escaped,
        converged=converged,
        agreed=agreed,
        inside=inside,
        spread=spread,
        steps=steps.amax(dim=-1),
        tol=float(tol),
    )


def _iterate_in_balls(energy, starts, limit: float, max_steps: int, tol: float):
    """Iterate F from ``starts`` of shape (N, S, D), the starts of pattern n in ``starts[n]``.

    A start stops when its largest coordinate change falls to ``tol``. All starts of pattern n stop
    as soon as one iterate is farther than ``limit`` from ``energy.memories[n]``.

    :returns: ``(states, steps, converged, escaped)`` of shapes (N, S, D), (N, S), (N, S), (N,).
    """
    num_patterns, num_starts, dim = starts.shape
    device = starts.device
    states = starts.reshape(-1, dim).clone()
    owner = torch.arange(num_patterns, device=device).repeat_interleave(num_starts)
    centres = energy.memories[owner]
    steps = torch.zeros(states.shape[0], dtype=torch.long, device=device)
    converged = torch.zeros(states.shape[0], dtype=torch.bool, device=device)
    escaped = torch.zeros(num_patterns, dtype=torch.bool, device=device)
    active = torch.arange(states.shape[0], device=device)
    for _ in range(max_steps):
        if active.numel() == 0:
            break
        current = states[active]
        updated = energy.fixed_point(current)
        states[active] = updated
        steps[active] += 1

        outside = (updated - centres[active]).norm(dim=-1) > limit
        escaped[owner[active[outside]]] = True
        done = (updated - current).abs().amax(dim=-1) <= tol
        converged[active[done]] = True
        active = active[~done & ~escaped[owner[active]]]
    shape = (num_patterns, num_starts)
    return states.reshape(*shape, dim), steps.reshape(shape), converged.reshape(shape), escaped


# -- analytic sufficient condition ---------------------------------------------------------------
@dataclass
class StorageBound:
    """Outcome of :func:`storage_bound`, per pattern.

    :ivar torch.Tensor certified: the pairwise condition holds, so the pattern is stored.
    :ivar torch.Tensor certified_nearest: the nearest-neighbour condition holds; it implies
        ``certified``.
    :ivar torch.Tensor separations: ``Delta_i``, shape (N,).
    :ivar torch.Tensor off_weight: ``min(1, (N - 1) exp(-beta phi_rho(d_i)))``, a bound on the
        total softmax weight of the other patterns anywhere in ``B_i``.
    :ivar torch.Tensor image_radius: ``A_i``, the bound on ``|F(x) - x_i|`` over ``B_i``.
    :ivar torch.Tensor lipschitz: ``L_i``, the bound on the Jacobian norm of F over the ball of
        radius ``min(A_i, rho)`` around ``x_i``.
    :ivar torch.Tensor image_radius_nearest: ``(N - 1) M_1``, the nearest-neighbour form of
        ``image_radius``.
    :ivar torch.Tensor lipschitz_nearest: the nearest-neighbour form of ``lipschitz``.
    :ivar float threshold: ``Delta*``: the nearest-neighbour condition holds exactly when
        ``Delta_i > Delta*`` (up to the bisection's rounding at the boundary); ``inf`` when no
        separation suffices.
    :ivar float ball_radius: rho.
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
    bandwidth = _scalar("bandwidth", bandwidth)
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
    bandwidth = _scalar("bandwidth", bandwidth)
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


# -- spherical-cap tail --------------------------------------------------------------------------
def _betainc_fraction(a: float, b: float, x: float) -> float:
    """Evaluate the continued fraction of ``I_x(a, b)`` by the modified Lentz method.

    The fraction is ``1 / (1 + d_1 / (1 + d_2 / (1 + ...)))`` with
    ``d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m))`` and
    ``d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1))``. It converges fast for
    ``x < (a + 1) / (a + b + 2)``; the caller uses the symmetry ``I_x(a, b) = 1 - I_{1-x}(b, a)``
    otherwise.
    """

    def guard(value: float) -> float:
        return value if abs(value) > _BETAINC_TINY else _BETAINC_TINY

    # Lentz's method keeps the ratios c = A_n / A_{n-1} and d = B_{n-1} / B_n of successive
    # convergents A_n / B_n, so the fraction is the running product of c * d.
    c = 1.0
    d = 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    value = d
    for m in range(1, _BETAINC_MAX_TERMS):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for coefficient in (even, odd):
            d = 1.0 / guard(1.0 + coefficient * d)
            c = guard(1.0 + coefficient / c)
            value *= c * d
        if abs(c * d - 1.0) < 1e-15:
            return value
    raise ArithmeticError(f"the incomplete beta fraction did not converge for a={a}, b={b}, x={x}.")


def regularized_incomplete_beta(a: float, b: float, x: float, complement: float | None = None):
    """Compute ``I_x(a, b) = B(x; a, b) / B(a, b)`` in float64, to about 1e-14 relative accuracy.

    :param float a: first shape parameter, > 0.
    :param float b: second shape parameter, > 0.
    :param float x: the upper limit, in [0, 1].
    :param float complement: ``1 - x`` if known more accurately than by subtraction.
    :returns: a float.
    """
    check_positive("a", a)
    check_positive("b", b)
    check_interval("x", x, 0.0, 1.0, closed_high=True)
    complement = 1.0 - x if complement is None else float(complement)
    if x == 0.0 or complement == 0.0:
        return 0.0 if x == 0.0 else 1.0
    log_front = (
        a * math.log(x)
        + b * math.log(complement)
        + math.lgamma(a + b)
        - math.lgamma(a)
        - math.lgamma(b)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betainc_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betainc_fraction(b, a, complement) / b


def inner_product_tail(threshold: float, dim: int) -> float:
    """Return ``P(u . v >= threshold)`` for independent uniform unit vectors u, v in R^dim.

    The cosine has density proportional to ``(1 - t^2)^((dim - 3) / 2)`` on [-1, 1], whose tail is
    ``I_{1 - s^2}((dim - 1) / 2, 1 / 2) / 2`` for ``s >= 0`` (the area of a spherical cap) and one
    minus the mirrored tail for ``s < 0``.
    """
    dim = check_int("dim", dim, minimum=2)
    threshold = float(threshold)
    if threshold >= 1.0:
        return 0.0
    if threshold <= -1.0:
        return 1.0
    square = threshold * threshold
    cap = 0.5 * regularized_incomplete_beta(0.5 * (dim - 1), 0.5, 1.0 - square, complement=square)
    return cap if threshold >= 0.0 else 1.0 - cap


def _uncertified_probability(num_patterns, dim, bandwidth, radius, ball_radius) -> float:
    threshold = separation_threshold(num_patterns, bandwidth, radius, ball_radius)
    return inner_product_tail(1.0 - threshold / radius**2, dim)


def nearest_certified_fraction(
    num_patterns: int, dim: int, bandwidth: float, radius: float, ball_radius: float | None = None
) -> float:
    """Return the expected fraction of N uniform patterns that the nearest-neighbour form certifies.

    Given ``x_i``, the cosines to the other N - 1 patterns are independent, so the probability that
    all stay below ``s* = 1 - Delta* / r^2`` is exactly ``(1 - P(t >= s*))^(N - 1)``.
    """
    num_patterns = check_int("num_patterns", num_patterns)
    if num_patterns == 1:
        return 1.0
    tail = _uncertified_probability(num_patterns, dim, bandwidth, radius, ball_radius)
    if tail >= 1.0:
        return 0.0
    return math.exp((num_patterns - 1) * math.log1p(-tail))


def growth_rate(
    num_patterns: int, bandwidth: float, radius: float, ball_radius: float | None = None
) -> float:
    """Return ``b = -log(1 - s*^2) / 2``, the rate in D at which the nearest-neighbour bound grows.

    Here ``s* = 1 - Delta*(N) / r^2``. For ``0 < s < 1`` the cosine's tail satisfies ``P(t >= s) <=
    (1 - s^2)^((D - 1) / 2) / (s (D - 1) B((D - 1) / 2, 1 / 2))``. So the guaranteed N grows at
    least like ``exp(b D)``, up to a factor polynomial in D, for as long as it stays below N. The
    rate falls as N grows. It is 0 when ``s* <= 0`` (no growth in D) and ``inf`` when ``Delta* =
    0``.
    """
    threshold = separation_threshold(num_patterns, bandwidth, radius, ball_radius)
    cosine = 1.0 - threshold / _scalar("radius", radius) ** 2
    if cosine <= 0.0:
        return 0.0
    if cosine >= 1.0:
        return math.inf
    return -0.5 * math.log1p(-(cosine**2))


def high_dimensional_ceiling(
    bandwidth: float, radius: float, ball_radius: float | None = None
) -> float:
    """Return ``1 + rho exp(beta r (r - rho)) / (r - rho)``, the most patterns stored as D -> inf.

    Take the point ``x = (1 - rho / r) x_i`` of ``B_i``. Its logits are ``beta r (r - rho)`` for
    ``x_i`` and ``beta (r - rho) r t_j`` for the others, and the cosines ``t_j`` of independent
    uniform patterns tend to 0 as D grows with N fixed. In that limit ``F(x) - x_i`` has a
    component ``-r (N - 1) / (exp(beta r (r - rho)) + N - 1)`` along ``x_i``, so ``F(B_i)`` lies in
    ``B_i`` only if N is at most this value. It does not depend on D, so at fixed ``h / r`` the
    capacity cannot grow exponentially in D without limit. ``inf`` when ``rho >= r``.
    """
    bandwidth = _scalar("bandwidth", bandwidth)
    radius = _scalar("radius", radius)
    rho = _ball_radius(ball_radius, bandwidth)
    if rho >= radius:
        return math.inf
    return 1.0 + rho * math.exp(radius * (radius - rho) / bandwidth**2) / (radius - rho)


# Quadrature and Chernoff grids of the pairwise bound for random patterns.
_PANELS = 192
_NODES_PER_PANEL = 8
_INNER_RADII = tuple(2.0 ** (-0.5 * j) for j in range(12))
_CHERNOFF_SLOPES = np.logspace(-3.0, 7.0, 121)


@functools.lru_cache(maxsize=32)
def _pairwise_moments(dim: int, bandwidth: float, radius: float, rho: float):
    """Tabulate what the Chernoff bound of :func:`certified_fraction` needs, for one setting.

    The angle theta between two uniform patterns has density ``sin^(D-2) theta / B((D-1)/2,
    1/2)`` on ``[0, pi]``. The pairwise condition needs ``theta > theta_ball`` (``d > 2 rho``), so
    ``[theta_ball, pi]`` is split into panels with Gauss-Legendre nodes. For each panel start
    ``theta_k`` (a truncation ``t < s_k = cos theta_k``) and each slope lambda, this returns
    ``log E[exp(lambda Y) 1{t < s_k}]`` for ``Y = u(t) = d exp(-beta phi_rho(d))`` and for
    ``Y = v(t) = beta d^2 exp(-beta phi_rho'(d))`` at every inner radius rho', together with
    ``P(t >= s_k)``. Returns None when no two patterns can have disjoint balls (``rho >= r``).
    """
    cosine_ball = 1.0 - 2.0 * (rho / radius) ** 2
    if cosine_ball <= -1.0:
        return None
    beta = 1.0 / bandwidth**2
    theta_ball = math.acos(cosine_ball)
    edges = np.linspace(theta_ball, math.pi, _PANELS + 1)
    points, weights = np.polynomial.legendre.leggauss(_NODES_PER_PANEL)
    half = 0.5 * np.diff(edges)[:, None]
    theta = (edges[:-1, None] + half * (points[None, :] + 1.0)).reshape(-1)
    log_norm = math.lgamma(0.5 * (dim - 1)) + math.lgamma(0.5) - math.lgamma(0.5 * dim)
    log_weight = (
        np.log((half * weights[None, :]).reshape(-1)) + (dim - 2) * np.log(np.sin(theta)) - log_norm
    )
    distance = 2.0 * radius * np.sin(0.5 * theta)
    phi = 0.5 * distance**2

    def panel_suffix(log_terms):
        # log sum over all nodes from panel k to the last, for every k, along the first axis.
        per_panel = np.logaddexp.reduce(
            log_terms.reshape(_PANELS, _NODES_PER_PANEL, *log_terms.shape[1:]), axis=1
        )
        return np.logaddexp.accumulate(per_panel[::-1], axis=0)[::-1]

    slopes_image = _CHERNOFF_SLOPES / rho
    image_terms = distance * np.exp(-beta * (phi - rho * distance))
    log_image = panel_suffix(log_weight[:, None] + slopes_image[None, :] * image_terms[:, None])

    inner = rho * np.asarray(_INNER_RADII)
    lipschitz_terms = (
        beta
        * distance[:, None] ** 2
        * np.exp(-beta * (phi[:, None] - inner[None, :] * distance[:, None]))
    )
    log_lipschitz = panel_suffix(
        log_weight[:, None, None] + _CHERNOFF_SLOPES[None, None, :] * lipschitz_terms[:, :, None]
    )
    tails = np.array([inner_product_tail(math.cos(edge), dim) for edge in edges[:-1]])
    return tails, slopes_image, log_image, inner, log_lipschitz


def _pairwise_failure_bound(num_patterns: int, moments) -> float:
    """Bound P(the pairwise condition fails for one pattern) by truncation and Chernoff.

    For a truncation ``s_k``, an inner radius rho' and slopes lambda, mu >= 0::

        P(fail) <= P(max_j t_j >= s_k) + P(sum_j u_j 1{t_j < s_k} > rho')
                   + P(sum_j v_j 1{t_j < s_k} >= 1)
                <= 1 - (1 - p_k)^(N-1) + exp(-lambda rho') E[exp(lambda U)]^(N-1)
                   + exp(-mu) E[exp(mu V)]^(N-1)

    with ``U = u(t) 1{t < s_k}`` and ``V = v(t) 1{t < s_k}``. Below ``s_k`` every distance exceeds
    2 rho, ``A_i <= rho'`` makes the inner radius at most rho', and v grows with the inner radius,
    so the three events cover every failure. Every grid point gives a valid bound; this returns the
    smallest.
    """
    tails, slopes_image, log_image, inner, log_lipschitz = moments
    others = num_patterns - 1
    # A tail of exactly 1 (float rounding for a very negative s_k) makes that truncation useless;
    # its -inf logarithm is the right value there.
    with np.errstate(divide="ignore"):
        log_tails = np.log(tails)
        near = -np.expm1(others * np.log1p(-tails))
    log_mgf_image = np.logaddexp(log_tails[:, None], log_image)
    image_term = np.min(
        -slopes_image[None, None, :] * inner[None, :, None] + others * log_mgf_image[:, None, :],
        axis=-1,
    )
    log_mgf_lipschitz = np.logaddexp(log_tails[:, None, None], log_lipschitz)
    lipschitz_term = np.min(-_CHERNOFF_SLOPES + others * log_mgf_lipschitz, axis=-1)
    failure = (
        near[:, None]
        + np.exp(np.minimum(image_term, 0.0))
        + np.exp(np.minimum(lipschitz_term, 0.0))
    )
    return float(failure.min())


def certified_fraction(
    num_patterns: int, dim: int, bandwidth: float, radius: float, ball_radius: float | None = None
) -> float:
    """Return a lower bound on the expected fraction of N uniform patterns that are stored.

    It is the larger of two lower bounds on the probability that one pattern passes the pairwise
    condition of :func:`storage_bound`. The first is the exact probability of the nearest-neighbour
    form (:func:`nearest_certified_fraction`), which implies the pairwise one. The second is one
    minus the truncated Chernoff bound of the failure probability. Certified patterns are stored, so
    both bound the expected stored fraction from below. The Chernoff expectations are
    one-dimensional integrals over the angle, computed by composite Gauss-Legendre quadrature (192
    panels of 8 nodes).

    :param int num_patterns: N >= 1.
    :param int dim: D >= 2.
    :param float bandwidth: h > 0.
    :param float radius: r > 0.
    :param float ball_radius: rho > 0; default ``h / 2``.
    :returns: a float in [0, 1].
    """
    num_patterns = check_int("num_patterns", num_patterns)
    dim = check_int("dim", dim, minimum=2)
    bandwidth = _scalar("bandwidth", bandwidth)
    radius = _scalar("radius", radius)
    rho = _ball_radius(ball_radius, bandwidth)
    nearest = nearest_certified_fraction(num_patterns, dim, bandwidth, radius, rho)
    if num_patterns == 1:
        return nearest
    moments = _pairwise_moments(dim, bandwidth, radius, rho)
    if moments is None:
        return nearest
    return max(nearest, 1.0 - _pairwise_failure_bound(num_patterns, moments))


def all_certified_probability(
    num_patterns: int, dim: int, bandwidth: float, radius: float, ball_radius: float | None = None
) -> float:
    """Return a lower bound on P(every one of N uniform patterns is certified).

    It is the larger of the union bound over pairs for the nearest-neighbour form,
    ``1 - N (N - 1) / 2 P(t >= s*)``, and the union bound over patterns,
    ``1 - N (1 - certified_fraction)``.
    """
    num_patterns = check_int("num_patterns", num_patterns)
    tail = _uncertified_probability(num_patterns, dim, bandwidth, radius, ball_radius)
    pairs = 1.0 - 0.5 * num_patterns * (num_patterns - 1) * tail
    fraction = certified_fraction(num_patterns, dim, bandwidth, radius, ball_radius)
    return max(0.0, pairs, 1.0 - num_patterns * (1.0 - fraction))


def capacity_lower_bound(
    dim: int,
    bandwidth: float,
    radius: float,
    delta: float = 0.05,
    ball_radius: float | None = None,
    criterion: str = "fraction",
    max_patterns: int = 10**12,
) -> int:
    """Return the largest N that the bound guarantees for uniform random patterns.

    With ``criterion="fraction"`` it is the largest N whose bound on the expected stored fraction
    (:func:`certified_fraction`) is at least ``1 - delta``. With ``"all"`` it is the largest N whose
    bound on P(every pattern is certified) (:func:`all_certified_probability`) is at least
    ``1 - delta``. With ``"nearest"`` it is the largest N whose nearest-neighbour fraction
    (:func:`nearest_certified_fraction`) is at least ``1 - delta``, the closed form that the
    derivation analyses. All three decrease in N, so the search doubles N and then bisects. The
    answer is capped at ``max_patterns``.
    """
    check_interval("delta", delta, 0.0, 1.0)
    if delta == 0.0:
        raise ValueError("delta must be in (0, 1), but got 0.0.")
    measures = {
        "fraction": certified_fraction,
        "all": all_certified_probability,
        "nearest": nearest_certified_fraction,
    }
    if criterion not in measures:
        raise ValueError(
            f"criterion must be 'fraction', 'all' or 'nearest', but got {criterion!r}."
        )
    measure = measures[criterion]

    def holds(count: int) -> bool:
        return measure(count, dim, bandwidth, radius, ball_radius) >= 1.0 - delta

    if not holds(1):
        return 0
    low, high = 1, 2
    while high <= max_patterns and holds(high):
        low, high = high, 2 * high
    if high > max_patterns:
        return max_patterns if holds(max_patterns) else _bisect(holds, low, max_patterns)
    return _bisect(holds, low, high)


def _bisect(holds, low: int, high: int) -> int:
    """Largest n in [low, high) with holds(n), given holds(low) and not holds(high)."""
    while high - low > 1:
        middle = (low + high) // 2
        if holds(middle):
            low = middle
        else:
            high = middle
    return low


# -- capacity curves -----------------------------------------------------------------------------
@dataclass
class CapacityCurve:
    """Stored fraction against N for several dimensions, from :func:`capacity_curve`.

    :ivar numpy.ndarray dims: dimensions D, shape (num_dims,).
    :ivar numpy.ndarray num_patterns: the grid of N, increasing, shape (num_sizes,).
    :ivar numpy.ndarray stored_fraction: mean stored fraction over the draws, shape
        (num_dims, num_sizes).
    :ivar numpy.ndarray stored_fraction_se: its standard error over the draws (0 for one draw).
    :ivar numpy.ndarray draws: number of pattern sets drawn per (D, N),
        ``max(trials, ceil(min_patterns / N))``.
    :ivar numpy.ndarray bound_fraction: expected certified fraction (:func:`certified_fraction`),
        a lower bound on the expected stored fraction, shape (num_dims, num_sizes).
    :ivar numpy.ndarray n_max: per D, the largest grid N at which, and at every smaller grid N, the
        mean stored fraction is at least ``1 - delta``; 0 when the smallest N already fails.
    :ivar numpy.ndarray censored: per D, no grid N failed, so the true ``n_max`` may be larger.
    :ivar numpy.ndarray bound_n_max: per D, :func:`capacity_lower_bound` (any integer N).
    :ivar dict fits: ``{"numerical": (a, b), "bound": (a, b)}`` of ``log N_max = a + b D``, fitted
        by least squares over the dimensions with ``N_max >= 1`` (and, for the numerical curve,
        not censored); NaN with fewer than two such dimensions.
    """

    dims: np.ndarray
    num_patterns: np.ndarray
    stored_fraction: np.ndarray
    stored_fraction_se: np.ndarray
    draws: np.ndarray
    bound_fraction: np.ndarray
    n_max: np.ndarray
    censored: np.ndarray
    bound_n_max: np.ndarray
    fits: dict
    bandwidth: float
    radius: float
    ball_radius: float
    delta: float
    trials: int
    min_patterns: int
    seed: int

    def rows(self) -> list[dict]:
        """Return one record per (D, N): draws, mean stored fraction, its standard error, bound."""
        records = []
        for i, dim in enumerate(self.dims):
            for j, count in enumerate(self.num_patterns):
                records.append(
                    {
                        "dim": int(dim),
                        "num_patterns": int(count),
                        "draws": int(self.draws[i, j]),
                        "stored_fraction": float(self.stored_fraction[i, j]),
                        "stored_fraction_se": float(self.stored_fraction_se[i, j]),
                        "bound_fraction": float(self.bound_fraction[i, j]),
                    }
                )
        return records

    def to_dict(self) -> dict:
        """Return every setting and result as JSON-serializable Python objects."""
        return {
            "bandwidth": self.bandwidth,
            "radius": self.radius,
            "ball_radius": self.ball_radius,
            "delta": self.delta,
            "trials": self.trials,
            "min_patterns": self.min_patterns,
            "seed": self.seed,
            "dims": self.dims.tolist(),
            "num_patterns": self.num_patterns.tolist(),
            "n_max": self.n_max.tolist(),
            "censored": self.censored.tolist(),
            "bound_n_max": self.bound_n_max.tolist(),
            "fits": {name: {"a": a, "b": b} for name, (a, b) in self.fits.items()},
            "rows": self.rows(),
        }

    def plot(self, path=None):
        """Draw the stored fraction against N and N_max against D; write a PNG if ``path``.

        :returns: the :class:`~matplotlib.figure.Figure`.
        """
        from pyro_am.plotting import new_figure, save_figure

        figure = new_figure(10.0, 4.0)
        fraction_axis, growth_axis = figure.subplots(1, 2)
        colors = [f"C{i % 10}" for i in range(len(self.dims))]
        for i, dim in enumerate(self.dims):
            fraction_axis.errorbar(
                self.num_patterns,
                self.stored_fraction[i],
                yerr=self.stored_fraction_se[i],
                fmt="o-",
                markersize=3,
                color=colors[i],
                label=f"D={dim}",
            )
            fraction_axis.plot(self.num_patterns, self.bound_fraction[i], "--", color=colors[i])
        fraction_axis.axhline(1.0 - self.delta, color="grey", linewidth=0.8)
        fraction_axis.set_xscale("log")
        fraction_axis.set_xlabel("number of patterns N")
        fraction_axis.set_ylabel("fraction stored (dashed: bound)")
        fraction_axis.legend(fontsize=8)

        for name, values, style, color in (
            ("numerical", self.n_max, "o", "C0"),
            ("bound", self.bound_n_max, "s", "C3"),
        ):
            shown = values >= 1
            growth_axis.plot(
                self.dims[shown], values[shown], style, color=color, label=f"{name} N_max"
            )
            a, b = self.fits[name]
            if math.isfinite(a) and math.isfinite(b):
                growth_axis.plot(
                    self.dims,
                    np.exp(a + b * self.dims),
                    "-",
                    color=color,
                    linewidth=0.8,
                    label=f"fit b={b:.3g}",
                )
        growth_axis.set_yscale("log")
        growth_axis.set_xlabel("dimension D")
        growth_axis.set_ylabel(f"N_max (stored fraction >= {1 - self.delta:g})")
        growth_axis.legend(fontsize=8)
        figure.suptitle(
            f"Gaussian KDE on the sphere: r={self.radius:g}, h={self.bandwidth:g}, "
            f"rho={self.ball_radius:g}, at least {self.trials} draws and {self.min_patterns} "
            "patterns per point",
            fontsize=10,
        )
        if path is not None:
            save_figure(figure, path)
        return figure


def fit_exponential_growth(dims, n_max, valid=None) -> tuple[float, float]:
    """Fit ``log N_max = a + b D`` by least squares over the entries with ``N_max >= 1``.

    :returns: ``(a, b)``, or ``(nan, nan)`` with fewer than two distinct usable dimensions.
    """
    dims = np.asarray(dims, dtype=np.float64)
    n_max = np.asarray(n_max, dtype=np.float64)
    usable = n_max >= 1 if valid is None else (n_max >= 1) & np.asarray(valid, dtype=bool)
    if np.unique(dims[usable]).size < 2:
        return math.nan, math.nan
    slope, intercept = np.polyfit(dims[usable], np.log(n_max[usable]), 1)
    return float(intercept), float(slope)


def _largest_passing(num_patterns: np.ndarray, mean_fraction: np.ndarray, delta: float):
    failing = np.nonzero(mean_fraction < 1.0 - delta)[0]
    if failing.size == 0:
        return int(num_patterns[-1]), True
    first = int(failing[0])
    return (int(num_patterns[first - 1]) if first > 0 else 0), False


def capacity_curve(
    dims,
    num_patterns,
    bandwidth: float,
    radius: float = 1.0,
    trials: int = 4,
    seed: int = 0,
    delta: float = 0.05,
    ball_radius: float | None = None,
    min_patterns: int = 200,
    num_perturbations: int = 4,
    max_steps: int = 500,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> CapacityCurve:
    """Measure the stored fraction of uniform random patterns against N, for each dimension.

    Each (D, N) draws ``max(trials, ceil(min_patterns / N))`` independent sets of N patterns
    uniformly on the sphere of radius ``radius`` and runs :func:`stored_patterns` on each, so small
    N, where one failure moves the fraction most, gets as many judged patterns as large N. All
    draws come from one generator seeded with ``seed``, so a call is reproducible on a device.

    :param dims: dimensions D >= 2.
    :param num_patterns: the grid of N, positive integers (sorted and deduplicated here).
    :param float bandwidth: kernel bandwidth h > 0, in the same units as ``radius``.
    :param float radius: the sphere's radius r.
    :param int trials: the minimum number of draws per (D, N).
    :param int seed: seed of the random generator.
    :param float delta: N_max is the largest N with a mean stored fraction of at least
        ``1 - delta``, in (0, 1).
    :param float ball_radius: rho; default ``h / 2``.
    :param int min_patterns: the minimum number of patterns judged per (D, N), over all draws.
    :param int num_perturbations: boundary starts per pattern in :func:`stored_patterns`.
    :param int max_steps: mean-shift steps per start.
    :param torch.dtype dtype: floating dtype of the patterns.
    :param device: device of the patterns.
    :param bool progress: show a tqdm progress bar over the draws.
    :returns: a :class:`CapacityCurve`.
    """
    dims = [_integer("dims", dim, minimum=2) for dim in dims]
    if not dims:
        raise ValueError("dims must contain at least one dimension >= 2, but it is empty.")
    sizes = sorted({_integer("num_patterns", count, minimum=1) for count in num_patterns})
    if not sizes:
        raise ValueError("num_patterns must contain at least one positive integer, but is empty.")
    bandwidth = _scalar("bandwidth", bandwidth)
    radius = _scalar("radius", radius)
    trials = check_int("trials", trials)
    min_patterns = check_int("min_patterns", min_patterns)
    seed = check_int("seed", seed, minimum=0)
    check_interval("delta", delta, 0.0, 1.0)
    if delta == 0.0:
        raise ValueError("delta must be in (0, 1), but got 0.0.")
    rho = _ball_radius(ball_radius, bandwidth)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, but got {dtype!r}.")

    draws = np.array(
        [[max(trials, math.ceil(min_patterns / count)) for count in sizes] for _ in dims],
        dtype=np.int64,
    )
    mean = np.zeros(draws.shape)
    standard_error = np.zeros(draws.shape)
    generator = torch.Generator(device=device or "cpu").manual_seed(seed)
    with tqdm(total=int(draws.sum()), disable=not progress, desc="capacity", leave=False) as bar:
        for i, dim in enumerate(dims):
            for j, count in enumerate(sizes):
                fractions = np.empty(draws[i, j])
                for draw in range(draws[i, j]):
                    patterns = uniform_on_sphere(count, dim, radius, generator, dtype, device)
                    verdict = stored_patterns(
                        patterns,
                        bandwidth,
                        ball_radius=rho,
                        num_perturbations=num_perturbations,
                        max_steps=max_steps,
                        generator=generator,
                    )
                    fractions[draw] = verdict.fraction
                    bar.update(1)
                mean[i, j] = fractions.mean()
                if fractions.size > 1:
                    standard_error[i, j] = fractions.std(ddof=1) / math.sqrt(fractions.size)

    sizes_array = np.asarray(sizes, dtype=np.int64)
    dims_array = np.asarray(dims, dtype=np.int64)
    n_max = np.zeros(len(dims), dtype=np.int64)
    censored = np.zeros(len(dims), dtype=bool)
    for i in range(len(dims)):
        n_max[i], censored[i] = _largest_passing(sizes_array, mean[i], delta)
    bound_fraction = np.array(
        [[certified_fraction(n, dim, bandwidth, radius, rho) for n in sizes] for dim in dims]
    )
    bound_n_max = np.array(
        [capacity_lower_bound(dim, bandwidth, radius, delta, rho) for dim in dims], dtype=np.int64
    )
    fits = {
        "numerical": fit_exponential_growth(dims_array, n_max, valid=~censored),
        "bound": fit_exponential_growth(dims_array, bound_n_max),
    }
    for dim, value, capped, bound in zip(dims, n_max, censored, bound_n_max, strict=True):
        logger.info(
            "capacity D=%d: N_max=%d%s, bound N_max=%d",
            dim,
            value,
            " (censored)" if capped else "",
            bound,
        )
    return CapacityCurve(
        dims=dims_array,
        num_patterns=sizes_array,
        stored_fraction=mean,
        stored_fraction_se=standard_error,
        draws=draws,
        bound_fraction=bound_fraction,
        n_max=n_max,
        censored=censored,
        bound_n_max=bound_n_max,
        fits=fits,
        bandwidth=bandwidth,
        radius=radius,
        ball_radius=rho,
        delta=float(delta),
        trials=trials,
        min_patterns=min_patterns,
        seed=seed,
    )


def _integer(name: str, value, minimum: int) -> int:
    return check_int(name, int(value) if isinstance(value, np.integer) else value, minimum=minimum)


__all__ = [
    "CapacityCurve",
    "StorageBound",
    "StoredPatterns",
    "all_certified_probability",
    "capacity_curve",
    "capacity_lower_bound",
    "certified_fraction",
    "check_on_sphere",
    "default_ball_radius",
    "fit_exponential_growth",
    "growth_rate",
    "high_dimensional_ceiling",
    "inner_product_tail",
    "nearest_certified_fraction",
    "nearest_neighbour_distances",
    "regularized_incomplete_beta",
    "separation_threshold",
    "separations",
    "storage_bound",
    "stored_patterns",
    "uniform_on_sphere",
]
