"""Birth and merge pieces shared by the CAVI, data-parallel and streaming fits of the DP memory.

A birth seeds a new memory at one datum and moves to it every datum that lies closer to the seed
than to the mean of its most responsible memory. A merge adds memory k's sufficient statistics to
memory j and drops k; its candidates are the pairs of memory means closest in the metric of the
noise precision. The fits differ only in how they reduce the statistics (one process, an
all-reduce over ranks, or running averages over batches) and judge the result, so those parts
stay in their own modules.
"""

from __future__ import annotations

import math

import torch

from pyro_am.models import _dp_cavi as cavi


def moved_to_seed(x, seed, posterior: cavi.Posterior, responsibilities) -> torch.Tensor:
    """Mark the data closer to ``seed`` than to the mean of their most responsible memory.

    :returns: a bool tensor of shape (N,).
    """
    own = (x - posterior.memory_loc[responsibilities.argmax(-1)]).square().sum(-1)
    return (x - seed).square().sum(-1) < own


def with_empty_memory(posterior: cavi.Posterior, prior: cavi.Prior, like) -> cavi.Posterior:
    """Return ``posterior`` ready for a global step with one more memory than it has.

    Only the noise variance has a row per memory before that step, and only when each memory has
    its own variance: the new memory starts at the prior's variance for a memory without data.
    """
    variance = posterior.variance
    if prior.per_memory:
        variance = torch.cat([variance, prior.empty_memory_variance(like)])
    return cavi.Posterior(
        posterior.stick_concentration1,
        posterior.stick_concentration0,
        posterior.memory_loc,
        posterior.memory_scale,
        variance,
    )


def merge_candidates(posterior: cavi.Posterior, max_candidates: int) -> list[tuple[int, int]]:
    """Return up to ``max_candidates`` pairs ``(j, k)``, ``j < k``, of the closest memory means.

    Distances are Mahalanobis distances under the noise variance, closest pair first. Fewer than
    two memories give no pair.
    """
    num_memories = posterior.num_memories
    if num_memories < 2:
        return []
    precision = cavi.full_precision(posterior.variance, posterior.memory_loc.shape)
    scaled = posterior.memory_loc * precision.sqrt()
    distances = torch.cdist(scaled, scaled).square()
    upper = torch.triu(torch.ones_like(distances, dtype=torch.bool), diagonal=1)
    distances = distances.masked_fill(~upper, math.inf).flatten()
    num_candidates = min(max_candidates, num_memories * (num_memories - 1) // 2)
    indices = distances.topk(num_candidates, largest=False).indices.tolist()
    return [divmod(flat, num_memories) for flat in indices]


def merge_statistics(counts, sums, squares, j: int, k: int):
    """Add memory k's statistics to memory j's and drop memory k.

    :returns: ``(keep, merged_counts, counts, sums, squares)``: the mask of kept memories, the
        merged counts before k is dropped (which :meth:`Posterior.select` reads), and the kept
        statistics. ``squares`` stays None when it is None.
    """
    keep = torch.ones(counts.shape[0], dtype=torch.bool, device=counts.device)
    keep[k] = False
    counts, sums = counts.clone(), sums.clone()
    counts[j] += counts[k]
    sums[j] += sums[k]
    if squares is not None:
        squares = squares.clone()
        squares[j] += squares[k]
        squares = squares[keep]
    return keep, counts, counts[keep], sums[keep], squares
