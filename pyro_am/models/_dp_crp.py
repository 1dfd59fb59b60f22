"""Memory creation by the Chinese restaurant process (CRP) in a DP memory.

Given counts n_k, a datum x joins memory k with weight ``(n_k - d) N(x; m_k, s^2 I)`` or opens a
new memory with weight ``(alpha + d K) N(x; m0, (s^2 + s0^2) I)``. :class:`CRPEnergy` is the
negative log of the sum of these weights, and :func:`partial_fit` applies the rule greedily, one
datum at a time, behind :meth:`pyro_am.models.DPMemory.partial_fit`.
"""

from __future__ import annotations

import logging
import math

import torch

from pyro_am.energies import GaussianMixtureEnergy
from pyro_am.models import _dp_cavi as cavi

logger = logging.getLogger(__name__)


class CRPEnergy(GaussianMixtureEnergy):
    """The Chinese-restaurant energy of a DP memory, with an attractor for a new memory.

    ``E_crp(x) = -log[(alpha + d K) N(x; m0, (s^2 + s0^2) I) + sum_k (n_k - d) N(x; m_k, s^2 I)]``.
    The weights are unnormalized counts. :meth:`log_prob` is the normalized CRP predictive density
    ``-E_crp(x) - log(n + alpha)``, where ``n = sum_k n_k``. The new-memory component is the last
    of the K + 1 memories.

    :param torch.Tensor means: memory means of shape (K, D).
    :param torch.Tensor counts: memory counts n_k of shape (K,).
    :param torch.Tensor noise_variance: ``s_k^2``, broadcastable to (K, D).
    :param torch.Tensor new_variance: the noise variance of a new memory, broadcastable to (D,).
    :param float concentration: alpha.
    :param float discount: d.
    :param torch.Tensor prior_mean: m0 of shape (D,).
    :param torch.Tensor prior_variance: s0^2 of shape (D,).
    """

    def __init__(
        self,
        means,
        counts,
        noise_variance,
        new_variance,
        concentration,
        discount,
        prior_mean,
        prior_variance,
    ):
        num_memories, dim = means.shape
        noise = noise_variance.expand(num_memories, dim)
        create = (new_variance.reshape(-1).expand(dim) + prior_variance)[None]
        variances = torch.cat([noise, create])
        tiny = torch.finfo(means.dtype).tiny
        join = (counts - discount).clamp_min(tiny)
        create = torch.as_tensor(concentration + discount * num_memories, dtype=means.dtype)
        unnormalized = torch.cat([join, create.reshape(1).to(means.device)])
        self.total_weight = unnormalized.sum()
        super().__init__(
            torch.cat([means, prior_mean[None]]), variances.sqrt(), logits=unnormalized.log()
        )

    def _energy(self, x):
        return super()._energy(x) - self.total_weight.log()

    def _log_prob(self, x):
        return -super()._energy(x)


def crp_energy(memory) -> CRPEnergy:
    """Build the :class:`CRPEnergy` of ``memory``'s current variational posterior."""
    posterior = memory._posterior()
    prior = memory._prior(posterior.memory_loc)
    counts = memory.memory_counts.to(posterior.memory_loc)
    if memory.per_memory_scale:
        new_variance = prior.empty_memory_variance(posterior.memory_loc)
    else:
        new_variance = posterior.variance
    return CRPEnergy(
        posterior.memory_loc,
        counts,
        posterior.variance,
        new_variance,
        memory.concentration,
        memory.discount,
        prior.prior_mean,
        prior.prior_variance,
    )


def partial_fit(memory, batch) -> torch.Tensor:
    """Absorb ``batch`` into ``memory`` (see :meth:`pyro_am.models.DPMemory.partial_fit`)."""
    batch = memory._check_data("batch", batch)
    if memory.memory_counts.sum() <= 0:
        memory._match_dtype(batch)
    batch = batch.to(memory.memory_loc.detach())
    prior = memory._prior(batch)
    posterior = memory._posterior()
    variance = posterior.variance
    counts = memory.memory_counts.to(batch).clone()
    loc, scale = posterior.memory_loc, posterior.memory_scale
    if counts.sum() <= 0:
        counts, loc, scale = counts[:0], loc[:0], scale[:0]
        if memory.per_memory_scale:
            variance = variance[:0]
    if memory.per_memory_scale:
        new_row = prior.empty_memory_variance(batch)
    else:
        new_row = variance.reshape(-1)[None] if variance.dim() else variance.reshape(1, 1)
    precision = cavi.full_precision(variance, loc.shape)
    # Sufficient statistics S_k = sum of the data in memory k, recovered from q(mu_k).
    prior_precision = prior.prior_variance.reciprocal()
    sums = (loc / scale.square() - prior.prior_mean * prior_precision) / precision

    log_two_pi = math.log(2 * math.pi)
    new_variance = new_row.reshape(-1).expand(memory.dim) + prior.prior_variance
    new_normalizer = -0.5 * (memory.dim * log_two_pi + new_variance.log().sum())
    labels = torch.empty(batch.shape[0], dtype=torch.long, device=batch.device)
    tiny = torch.finfo(batch.dtype).tiny
    for n, x in enumerate(batch):
        num_memories = counts.shape[0]
        create_score = math.log(memory.concentration + memory.discount * num_memories)
        create_score += float(
            new_normalizer - 0.5 * ((x - prior.prior_mean).square() / new_variance).sum()
        )
        best_score, best = -math.inf, -1
        if num_memories > 0:
            join_normalizer = -0.5 * (memory.dim * log_two_pi - precision.log().sum(-1))
            scores = (counts - memory.discount).clamp_min(tiny).log() + join_normalizer
            scores = scores - 0.5 * ((x - loc).square() * precision).sum(-1)
            best_score, best = (float(v) for v in scores.max(0))
            best = int(best)
        if create_score > best_score and num_memories < memory.max_truncation:
            new_loc, new_scale = cavi.new_memory_posterior(x, new_row, prior)
            counts = torch.cat([counts, counts.new_zeros(1)])
            sums = torch.cat([sums, torch.zeros_like(x)[None]])
            loc = torch.cat([loc, new_loc[None]])
            scale = torch.cat([scale, new_scale[None]])
            if memory.per_memory_scale:
                variance = torch.cat([variance, new_row])
            precision = cavi.full_precision(variance, loc.shape)
            best = num_memories
            logger.info(
                "partial_fit: datum %d created memory %d (%d memories)",
                n,
                best,
                num_memories + 1,
            )
        counts[best] += 1
        sums[best] += x
        row_loc, row_scale = cavi.update_memories(
            counts[best : best + 1],
            sums[best : best + 1],
            precision[best : best + 1].reciprocal(),
            prior,
        )
        loc[best], scale[best] = row_loc[0], row_scale[0]
        labels[n] = best

    concentration1, concentration0 = cavi.update_sticks(counts, prior)
    memory._write_posterior(cavi.Posterior(concentration1, concentration0, loc, scale, variance))
    memory.memory_counts = counts
    return labels
