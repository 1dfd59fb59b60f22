"""Streaming stochastic variational inference (SVI) for the DP memory, over minibatches.

Natural-gradient SVI (Hoffman, Blei, Wang and Paisley, "Stochastic variational inference", JMLR
2013) for the conjugate model of :mod:`pyro_am.models._dp_cavi`. The global variational parameters
are the Beta sticks and the Gaussian memories. Their natural parameters are affine in the
whole-data sufficient statistics ``T = (N_k, S_k, Q_k, sum_n x_n^2)``::

    a_k - 1 = -d + N_k,   b_k - 1 = alpha + k d - 1 + sum_{j>k} N_j
    1 / t_k^2 = 1 / s0^2 + N_k / s_k^2,   m_k / t_k^2 = m0 / s0^2 + S_k / s_k^2

Step t draws a batch B_t, runs the CAVI local step on it, and forms the intermediate statistics
``T_hat = (N / |B_t|) T(B_t)``, the statistics of N copies of the batch. For a fixed noise
variance the natural-gradient step ``lambda <- (1 - rho_t) lambda + rho_t lambda_hat`` is then,
by linearity, the same blend of the statistics, ``T <- (1 - rho_t) T + rho_t T_hat``, after which
the closed-form CAVI global step turns T into sticks and memories. With a learned variance the
memories are computed from the blended T under the current variance estimate. The step sizes follow

    rho_t = (t + tau)^(-kappa),   t = 1, 2, ...

which satisfies the Robbins-Monro conditions (sum rho_t = inf, sum rho_t^2 < inf) for
``0.5 < kappa <= 1`` and ``tau >= 0``. ``kappa = 0`` gives rho_t = 1, a CAVI step on each batch
alone. With one batch that contains all the data, that step is exactly the global and local step
of a CAVI iteration.

A learned noise variance is a point estimate, not a conjugate factor. It is set by the CAVI
M-step from the running statistics, which is stochastic (online) EM for the variance (Cappe and
Moulines, "On-line expectation-maximization algorithm for latent data models", JRSS-B 2009).

Memory creation and pruning work on the running statistics:

* pruning removes the memories whose expected weight falls below ``prune_threshold``, as in CAVI;
* a birth is proposed while the last memory's expected weight exceeds ``grow_threshold``. It is
  seeded at the batch's worst-explained datum, and the batch data closer to it than to their own
  memory move to it. Their share of each memory's running statistics, estimated from the batch
  and capped at that memory's own statistics, moves to the new memory, so every total of T is kept;
* a merge of the closest pairs of memories adds their statistics. It is proposed at every step
  without another structural change, and ``_RETRY_AFTER`` steps after a rejected proposal.

A move is kept only when it raises the ELBO estimate
``(N / |B|) sum_{n in B} log Z_n + global terms`` of a batch B against that of the parameters
without it. A merge is judged on the current batch. A birth is judged on the next batch, because
the new memory was fitted to the current one, which would favour it.

Under ``torch.distributed`` every batch-sized sum is all-reduced first (see
:mod:`pyro_am.minibatches` for how the ranks split each batch), so the ranks take the steps that
one process takes on the union of their batches.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from pyro_am import distributed
from pyro_am.models import _dp_cavi as cavi
from pyro_am.models import _dp_fit
from pyro_am.models import _dp_moves as moves

logger = logging.getLogger(__name__)


def step_size(step: int, offset: float, exponent: float) -> float:
    """Return ``rho_t = (t + tau)^(-kappa)`` for step ``t >= 1``, offset tau and exponent kappa."""
    return float((step + offset) ** (-exponent))


@dataclass
class Statistics:
    """Running estimates of the whole-data sufficient statistics of the memories.

    :ivar counts: ``N_k``, shape (K,).
    :ivar sums: ``S_k = sum_n r_nk x_n``, shape (K, D).
    :ivar squares: ``Q_k = sum_n r_nk x_n^2``, shape (K, D), kept only for per-memory variances.
    :ivar total_x_squared: ``sum_n x_n^2``, shape (D,).
    """

    counts: torch.Tensor
    sums: torch.Tensor
    squares: torch.Tensor | None
    total_x_squared: torch.Tensor

    def blend(self, other: Statistics, rho: float) -> Statistics:
        """Return ``(1 - rho) self + rho other``."""
        squares = None
        if self.squares is not None:
            squares = torch.lerp(self.squares, other.squares, rho)
        return Statistics(
            torch.lerp(self.counts, other.counts, rho),
            torch.lerp(self.sums, other.sums, rho),
            squares,
            torch.lerp(self.total_x_squared, other.total_x_squared, rho),
        )

    def select(self, keep: torch.Tensor) -> Statistics:
        squares = None if self.squares is None else self.squares[keep]
        return Statistics(self.counts[keep], self.sums[keep], squares, self.total_x_squared)

    def as_step(self) -> cavi.LocalStep:
        return cavi.LocalStep(None, None, self.counts, self.sums, self.squares)

    def tensors(self) -> dict:
        return {name: value for name, value in vars(self).items() if value is not None}


@dataclass
class _Batch:
    """The local step of one batch on this rank, and its statistics summed over the ranks."""

    local: cavi.LocalStep
    statistics: Statistics
    log_normalizer: float
    size: int


def _reduce_batch(x, x_squared, posterior, with_squares, group) -> _Batch:
    local = cavi.local_step(x, x_squared, posterior, with_squares)
    size = torch.tensor([x.shape[0]], dtype=x.dtype, device=x.device)
    tensors = [
        local.counts,
        local.sums,
        x_squared.sum(0),
        local.log_normalizers.sum().reshape(1),
        size,
    ]
    if with_squares:
        tensors.append(local.squares)
    reduced = distributed.all_reduce_sum(tensors, group)
    squares = reduced[5] if with_squares else None
    statistics = Statistics(reduced[0], reduced[1], squares, reduced[2])
    return _Batch(local, statistics, float(reduced[3]), int(reduced[4]))


def _scaled(statistics: Statistics, scale: float) -> Statistics:
    squares = None if statistics.squares is None else scale * statistics.squares
    return Statistics(
        scale * statistics.counts,
        scale * statistics.sums,
        squares,
        scale * statistics.total_x_squared,
    )


def _global_step(statistics: Statistics, posterior, num_data: int, prior) -> cavi.Posterior:
    step = statistics.as_step()
    return cavi.global_step(step, statistics.total_x_squared, num_data, posterior, prior)


def _elbo_estimate(batch: _Batch, posterior, prior, num_data: int) -> float:
    """Return ``(N / |B|) sum_{n in B} log Z_n + global terms``.

    It estimates the ELBO without bias when the batch is a uniform sample of the data.
    """
    data_term = num_data / batch.size * batch.log_normalizer
    return data_term + float(cavi.global_terms(posterior, prior))


def _global_worst(x, local, group):
    """Return the batch datum with the lowest ELBO term over all ranks and this rank's index.

    Ties go to the lowest rank. The index is None on the ranks that do not hold the datum.
    """
    if x.shape[0] == 0:
        packed = torch.cat([x.new_full((1,), math.inf), x.new_zeros(x.shape[1])])
        index = None
    else:
        index = int(local.log_normalizers.argmin())
        packed = torch.cat([local.log_normalizers[index].reshape(1), x[index]])
    gathered = torch.stack(distributed.all_gather_tensor(packed, group))
    winner = int(gathered[:, 0].argmin())
    own_index = index if winner == distributed.get_rank(group) else None
    return gathered[winner, 1:], own_index


def _prune(memory, posterior, statistics, prior, record, step):
    """Drop the memories whose expected weight is below ``prune_threshold``."""
    weights = posterior.sticks().mean
    keep = weights >= memory.prune_threshold
    if not bool(keep.any()):
        keep[weights.argmax()] = True
    if bool(keep.all()):
        return posterior, statistics, False
    for index in (~keep).nonzero().flatten().tolist():
        weight = float(weights[index])
        logger.info("step %d: pruned memory %d (expected weight %.3g)", step, index, weight)
        record["events"].append(
            {"iteration": step, "kind": "pruned", "memory": index, "weight": weight}
        )
        record["num_pruned"] += 1
    return posterior.select(keep, statistics.counts, prior), statistics.select(keep), True


def _propose_birth(posterior, statistics, batch, x, x_squared, prior, num_data, group):
    """Build a new memory at the batch's worst-explained datum (see the module).

    :returns: ``(posterior, statistics)`` with the new memory last, or None when no data move.
    """
    local = batch.local
    with_squares = statistics.squares is not None
    seed, own_index = _global_worst(x, local, group)
    moved = moves.moved_to_seed(x, seed, posterior, local.responsibilities)
    if own_index is not None:
        moved[own_index] = True
    weights = local.responsibilities * moved.unsqueeze(-1).to(x.dtype)
    tensors = [weights.sum(0), weights.T @ x]
    if with_squares:
        tensors.append(weights.T @ x_squared)
    reduced = distributed.all_reduce_sum(tensors, group)
    scale = num_data / batch.size
    moved_counts = scale * reduced[0]
    # Move at most what each memory holds, so that no running count becomes negative.
    ratio = statistics.counts / moved_counts.clamp_min(torch.finfo(x.dtype).tiny)
    fraction = torch.where(moved_counts > 0, ratio.clamp(max=1.0), torch.zeros_like(ratio))
    parts = [fraction * moved_counts, (scale * fraction).unsqueeze(-1) * reduced[1]]
    if with_squares:
        parts.append((scale * fraction).unsqueeze(-1) * reduced[2])
    if float(parts[0].sum()) <= 0:
        return None
    born_squares = None
    if with_squares:
        born_squares = torch.cat([statistics.squares - parts[2], parts[2].sum(0, keepdim=True)])
    born_statistics = Statistics(
        torch.cat([statistics.counts - parts[0], parts[0].sum().reshape(1)]),
        torch.cat([statistics.sums - parts[1], parts[1].sum(0, keepdim=True)]),
        born_squares,
        statistics.total_x_squared,
    )
    extended = moves.with_empty_memory(posterior, prior, x)
    return _global_step(born_statistics, extended, num_data, prior), born_statistics


def _propose_merge(posterior, statistics, x, x_squared, prior, elbo, num_data, group):
    """Try the closest pairs of memories and return the first merge that raises the estimate.

    :returns: ``(posterior, statistics, batch, elbo, (j, k))`` of the accepted merge, or None.
    """
    with_squares = statistics.squares is not None
    for j, k in moves.merge_candidates(posterior, _dp_fit._MERGE_CANDIDATES):
        keep, counts, kept_counts, sums, squares = moves.merge_statistics(
            statistics.counts, statistics.sums, statistics.squares, j, k
        )
        merged_statistics = Statistics(kept_counts, sums, squares, statistics.total_x_squared)
        start = posterior.select(keep, counts, prior)
        merged = _global_step(merged_statistics, start, num_data, prior)
        merged_batch = _reduce_batch(x, x_squared, merged, with_squares, group)
        merged_elbo = _elbo_estimate(merged_batch, merged, prior, num_data)
        if merged_elbo > elbo:
            return merged, merged_statistics, merged_batch, merged_elbo, (j, k)
    return None


def _structural_moves(
    memory, posterior, statistics, x, x_squared, prior, num_data, record, step, changed, group
):
    """Propose a birth (judged on the next batch) or a merge (judged on this batch).

    :returns: ``(posterior, statistics, changed, pending)``, where ``pending`` is a proposed birth
        ``(posterior, statistics, last_weight)`` or None.
    """
    last_weight = float(posterior.sticks().mean[-1])
    can_grow = posterior.num_memories < memory.max_truncation
    retry = step - _dp_fit._RETRY_AFTER
    want_birth = can_grow and last_weight > memory.grow_threshold
    want_birth = want_birth and record["birth_rejected_at"] < retry
    want_merge = not changed and record["merge_rejected_at"] < retry
    if not (want_birth or want_merge):
        return posterior, statistics, changed, None
    with_squares = statistics.squares is not None
    batch = _reduce_batch(x, x_squared, posterior, with_squares, group)
    if want_birth:
        birth = _propose_birth(posterior, statistics, batch, x, x_squared, prior, num_data, group)
        if birth is None:
            record["birth_rejected_at"] = step
        else:
            return posterior, statistics, changed, (*birth, last_weight)
    if want_merge:
        elbo = _elbo_estimate(batch, posterior, prior, num_data)
        merge = _propose_merge(posterior, statistics, x, x_squared, prior, elbo, num_data, group)
        if merge is None:
            record["merge_rejected_at"] = step
        else:
            posterior, statistics, _, _, (j, k) = merge
            _dp_fit._record_merge(record, step, j, k, posterior)
            changed = True
    return posterior, statistics, changed, None


def _judge_birth(memory, pending, posterior, statistics, current, elbo, x, x_squared, prior,
                 num_data, record, step, group):  # fmt: skip
    """Keep the pending birth if its ELBO estimate on this batch, which did not shape it, is higher.

    :returns: ``(posterior, statistics, batch, elbo)`` of the kept parameters.
    """
    born, born_statistics, last_weight = pending
    born_batch = _reduce_batch(x, x_squared, born, born_statistics.squares is not None, group)
    born_elbo = _elbo_estimate(born_batch, born, prior, num_data)
    if born_elbo > elbo:
        _dp_fit._record_birth(record, step, born, last_weight, memory)
        return born, born_statistics, born_batch, born_elbo
    record["birth_rejected_at"] = step
    return posterior, statistics, current, elbo
