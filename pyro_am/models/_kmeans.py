"""k-means++ seeding and Lloyd's iterations in torch, used to initialize the clustering models.

k-means++ (Arthur and Vassilvitskii, "k-means++: the advantages of careful seeding", SODA 2007)
draws the first centre uniformly and each further centre with probability proportional to the
squared distance to the nearest centre chosen so far. The greedy variant used here draws
``2 + floor(log K)`` candidates per centre and keeps the one that lowers the total squared distance
most, which reduces the spread between seeds.
"""

from __future__ import annotations

import math

import torch


def squared_distances(
    x: torch.Tensor, centres: torch.Tensor, x_squared_norms: torch.Tensor | None = None
) -> torch.Tensor:
    """Compute ``|x_n - c_k|^2`` in GEMM form, shape (N, K), clamped at zero.

    Loops that reuse ``x`` pass its squared row norms, shape (N,), so they are computed once.
    """
    if x_squared_norms is None:
        x_squared_norms = x.square().sum(-1)
    distances = x_squared_norms.unsqueeze(-1) - 2.0 * x @ centres.T
    distances = distances + centres.square().sum(-1)
    return distances.clamp_min(0.0)


def kmeans_plus_plus(
    x: torch.Tensor, num_centres: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Choose ``num_centres`` rows of ``x`` (N, D) by greedy k-means++; returns (K, D)."""
    num_points = x.shape[0]
    num_trials = 2 + int(math.log(num_centres))
    device = x.device
    norms = x.square().sum(-1)
    first = torch.randint(num_points, (1,), generator=generator, device=device)
    centres = [x[first]]
    closest = squared_distances(x, centres[0], norms).squeeze(-1)
    for _ in range(1, num_centres):
        total = closest.sum()
        if float(total) <= 0:
            # Every point already coincides with a centre: the rest are drawn uniformly.
            weights = torch.ones_like(closest)
        else:
            weights = closest / total
        candidates = torch.multinomial(weights, num_trials, replacement=True, generator=generator)
        candidate_closest = torch.minimum(closest, squared_distances(x, x[candidates], norms).T)
        best = candidate_closest.sum(-1).argmin()
        centres.append(x[candidates[best]].unsqueeze(0))
        closest = candidate_closest[best]
    return torch.cat(centres, dim=0)


def best_kmeans_plus_plus(
    x: torch.Tensor, num_centres: int, restarts: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Run ``restarts`` greedy k-means++ seedings at once; return the best one's centres (K, D).

    The best seeding has the lowest potential ``sum_n min_k |x_n - c_k|^2``. The seedings run as
    one batch, so each new centre costs one GEMM for all restarts and candidates together.
    """
    num_points = x.shape[0]
    num_trials = 2 + int(math.log(num_centres))
    device = x.device
    norms = x.square().sum(-1)
    rows = torch.arange(restarts, device=device)
    chosen = [torch.randint(num_points, (restarts,), generator=generator, device=device)]
    closest = squared_distances(x, x[chosen[0]], norms).T
    for _ in range(1, num_centres):
        totals = closest.sum(-1, keepdim=True)
        # A seeding whose points all coincide with a centre draws the rest uniformly.
        weights = torch.where(totals > 0, closest / totals.clamp_min(1e-300), 1.0)
        candidates = torch.multinomial(weights, num_trials, replacement=True, generator=generator)
        distances = squared_distances(x, x[candidates.reshape(-1)], norms).T
        distances = distances.reshape(restarts, num_trials, num_points)
        candidate_closest = torch.minimum(closest.unsqueeze(1), distances)
        best = candidate_closest.sum(-1).argmin(-1)
        chosen.append(candidates[rows, best])
        closest = candidate_closest[rows, best]
    winner = closest.sum(-1).argmin()
    return x[torch.stack(chosen, dim=1)[winner]]


def lloyd(
    x: torch.Tensor, centres: torch.Tensor, max_iter: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run Lloyd's k-means iterations until the labels stop changing.

    A centre that loses all its points keeps its position.

    :returns: ``(centres, labels)`` of shapes (K, D) and (N,).
    """
    num_centres = centres.shape[0]
    norms = x.square().sum(-1)
    labels = squared_distances(x, centres, norms).argmin(-1)
    for _ in range(max_iter):
        one_hot = torch.nn.functional.one_hot(labels, num_centres).to(x.dtype)
        counts = one_hot.sum(0)
        sums = one_hot.T @ x
        centres = torch.where(
            counts.unsqueeze(-1) > 0, sums / counts.clamp_min(1).unsqueeze(-1), centres
        )
        updated = squared_distances(x, centres, norms).argmin(-1)
        if bool((updated == labels).all()):
            break
        labels = updated
    return centres, labels
