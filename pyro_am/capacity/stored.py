"""The numerical storage check, which iterates mean shift inside each pattern's ball.

:func:`stored_patterns` iterates the KDE's mean-shift map from each pattern and from random points
on the boundary of its ball ``B_i = {x : |x - x_i| <= rho}``, for all patterns in one batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pyro_am._validation import check_int, check_interval, check_memories, check_positive
from pyro_am.capacity.geometry import (
    _ball_radius,
    _bandwidth,
    check_on_sphere,
    nearest_neighbour_distances,
)
from pyro_am.energies import GaussianKDEEnergy

logger = logging.getLogger(__name__)


# -- numerical verdict ---------------------------------------------------------------------------
@dataclass
class StoredPatterns:
    """Outcome of :func:`stored_patterns`; every tensor has the patterns on its first axis.

    :ivar stored: the verdict, shape (N,), bool: ``disjoint``, ``self_mapped``,
        ``converged``, ``agreed`` and ``inside`` all hold and ``escaped`` does not.
    :ivar fixed_points: the point reached from ``x_i`` (where iteration stopped, for
        a pattern that escaped or did not converge), shape (N, D).
    :ivar distances: ``|x_i* - x_i|``, shape (N,).
    :ivar ball_radius: the radius rho of every ball ``B_i``.
    :ivar nearest_distances: distance from ``x_i`` to its nearest other pattern.
    :ivar disjoint: ``B_i`` is disjoint from every other ball (``2 rho < d_i``).
    :ivar self_mapped: one step of F from each boundary start stays in ``B_i``.
    :ivar escaped: some iterate of some start left ``B_i``, which shows that F does
        not map ``B_i`` into itself; iteration of that pattern's starts stopped there.
    :ivar converged: every start's last step moved less than ``tol``.
    :ivar agreed: every start ended within ``agreement * rho`` of ``x_i*``.
    :ivar inside: ``x_i*`` lies in ``B_i``.
    :ivar spread: the largest distance from a start's end point to ``x_i*``.
    :ivar steps: the most steps any start of the pattern took, int64.
    :ivar tol: the stopping tolerance used.
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
    bandwidth = _bandwidth(bandwidth)
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
