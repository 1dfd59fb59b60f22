"""Data-parallel CAVI and Pyro SVI for the DP memory over ``torch.distributed`` ranks.

Rank r holds a block ``X_r`` of the N data. Every data-sized quantity of coordinate ascent is a sum
over the data, so each rank computes it on its block and an all-reduce gives the full sum::

    N_k = sum_r sum_{n in r} r_nk,   S_k = sum_r sum_{n in r} r_nk x_n,
    Q_k = sum_r sum_{n in r} r_nk x_n^2,   sum_n log Z_n = sum_r sum_{n in r} log Z_n

The global step, pruning and the accept-or-reject decisions of births and merges then run on
identical numbers on every rank. A birth is seeded at the datum with the lowest ELBO term over all
ranks (found with one all-gather), so the loop takes the steps that
:meth:`~pyro_am.models.DPMemory.fit` takes on the concatenated data, up to the order of
floating-point additions.

Pyro SVI over ranks is in :mod:`pyro_am.models._dp_parallel_svi`.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pyro
import torch
from tqdm.auto import tqdm

from pyro_am import distributed
from pyro_am.models import _dp_cavi as cavi
from pyro_am.models import _dp_fit
from pyro_am.models import _dp_moves as moves

logger = logging.getLogger(__name__)


def _reduced_step(x, x_squared, posterior, with_squares, group):
    """Run the local step on this rank's block; return it, the summed statistics and sum log Z."""
    local = cavi.local_step(x, x_squared, posterior, with_squares)
    tensors = [local.counts, local.sums, local.log_normalizers.sum().reshape(1)]
    if with_squares:
        tensors.append(local.squares)
    reduced = distributed.all_reduce_sum(tensors, group)
    squares = reduced[3] if with_squares else None
    total = cavi.LocalStep(None, None, reduced[0], reduced[1], squares)
    return local, total, float(reduced[2])


def _global_worst(x, local, group):
    """Return the datum with the lowest ELBO term over all ranks, and this rank's index of it.

    Ties go to the lowest rank, and within a rank to the lowest index, as ``argmin`` does on the
    concatenated data. The index is None on the ranks that do not hold the datum.
    """
    index = int(local.log_normalizers.argmin())
    packed = torch.cat([local.log_normalizers[index].reshape(1), x[index]])
    gathered = torch.stack(distributed.all_gather_tensor(packed, group))
    winner = int(gathered[:, 0].argmin())
    own_index = index if winner == distributed.get_rank(group) else None
    return gathered[winner, 1:], own_index


def _propose_birth(posterior, local, x, x_squared, totals, prior, elbo, with_squares, group):
    """Data-parallel form of the CAVI birth move: the same proposal and the same acceptance."""
    seed, own_index = _global_worst(x, local, group)
    moved = moves.moved_to_seed(x, seed, posterior, local.responsibilities)
    if own_index is not None:
        moved[own_index] = True
    responsibilities = local.responsibilities.masked_fill(moved.unsqueeze(-1), 0.0)
    responsibilities = torch.cat([responsibilities, moved.unsqueeze(-1).to(x.dtype)], dim=-1)
    tensors = [responsibilities.sum(0), responsibilities.T @ x]
    if with_squares:
        tensors.append(responsibilities.T @ x_squared)
    reduced = distributed.all_reduce_sum(tensors, group)
    statistics = cavi.LocalStep(
        None, None, reduced[0], reduced[1], reduced[2] if with_squares else None
    )
    extended = moves.with_empty_memory(posterior, prior, x)
    total_x_squared, num_data = totals
    born = cavi.global_step(statistics, total_x_squared, num_data, extended, prior)
    born_local, born_total, data_term = _reduced_step(x, x_squared, born, with_squares, group)
    born_elbo = data_term + float(cavi.global_terms(born, prior))
    if born_elbo > elbo:
        return born, born_local, born_total, born_elbo
    return None


def _propose_merge(posterior, total, x, x_squared, totals, prior, elbo, group):
    """Data-parallel form of the CAVI merge move: the closest pairs, kept if the ELBO rises."""
    total_x_squared, num_data = totals
    for j, k in moves.merge_candidates(posterior, _dp_fit._MERGE_CANDIDATES):
        keep, counts, kept_counts, sums, squares = moves.merge_statistics(
            total.counts, total.sums, total.squares, j, k
        )
        merged_statistics = cavi.LocalStep(None, None, kept_counts, sums, squares)
        start = posterior.select(keep, counts, prior)
        merged = cavi.global_step(merged_statistics, total_x_squared, num_data, start, prior)
        with_squares = squares is not None
        merged_local, merged_total, data_term = _reduced_step(
            x, x_squared, merged, with_squares, group
        )
        merged_elbo = data_term + float(cavi.global_terms(merged, prior))
        if merged_elbo > elbo:
            return merged, merged_local, merged_total, merged_elbo, (j, k)
    return None


def initialize_parallel(memory, local_data, seed, sample_size=None, group=None) -> None:
    """Initialize ``memory`` identically on every rank from a sample of all ranks' data.

    The sample is the rows with global indices drawn by ``numpy.random.default_rng(seed)`` (all
    rows when ``sample_size`` is None or at least N), in global order, where rank r's block
    follows rank r - 1's. Every rank then runs :meth:`DPMemory.initialize` on it with ``seed``,
    so with the whole data it is the initialization of :meth:`DPMemory.fit`.
    """
    sizes = distributed.all_gather_object(local_data.shape[0], group)
    num_data = sum(sizes)
    offset = sum(sizes[: distributed.get_rank(group)])
    if sample_size is None or sample_size >= num_data:
        rows = local_data
    else:
        chosen = np.sort(np.random.default_rng(seed).choice(num_data, sample_size, replace=False))
        local = chosen[(chosen >= offset) & (chosen < offset + local_data.shape[0])] - offset
        rows = local_data[torch.as_tensor(local, device=local_data.device)]
    parts = distributed.all_gather_object(rows.cpu(), group)
    sample = torch.cat(parts).to(local_data)
    pyro.set_rng_seed(seed)
    memory.initialize(sample, seed=seed)


def fit_cavi_parallel(
    memory,
    local_data,
    *,
    max_iter=200,
    tol=1e-6,
    seed=0,
    warm_start=False,
    init_sample_size=None,
    progress=True,
    checkpoint=None,
    checkpoint_every=10,
    resume=False,
    group=None,
):
    """Fit ``memory`` by coordinate ascent on data split across ranks (see the module).

    Every rank calls it with its own block; every rank ends with the same memory. Rank 0 writes
    the checkpoints, and with ``resume=True`` every rank reads the checkpoint, so it must be on a
    file system that all ranks see.

    :param DPMemory memory: the memory, constructed identically on every rank.
    :param torch.Tensor local_data: this rank's data, shape (N_r, D).
    :param int max_iter: the total number of iterations, counting those before a resume.
    :param float tol: stop when the relative ELBO change falls below ``tol``.
    :param int seed: the seed of the initialization, the same on every rank.
    :param bool warm_start: start from the memory's current parameters.
    :param int init_sample_size: rows of the k-means initialization sample; None uses all data.
    :returns: a :class:`~pyro_am.models.dp_memory.DPFitResult`.
    """
    local_data = memory._check_data("local_data", local_data)
    record = None
    if resume:
        if checkpoint is None:
            raise ValueError("resume=True needs a checkpoint path.")
        record = _dp_fit.load_checkpoint(memory, checkpoint, "cavi")
    if record is None:
        if warm_start:
            memory._match_dtype(local_data)
        else:
            initialize_parallel(memory, local_data, seed, init_sample_size, group)
    memory._match_dtype(local_data)
    record = record if record is not None else _dp_fit._new_record("cavi", memory.truncation)
    record.pop("extra", None)
    x = local_data
    prior = memory._prior(x)
    sums = distributed.all_reduce_sum(
        [x.sum(0), torch.tensor([x.shape[0]], dtype=x.dtype, device=x.device)], group
    )
    num_data = int(sums[1])
    # Centring by the mean of all data (and the prior mean with it) leaves the model unchanged.
    centre = sums[0] / num_data
    x = x - centre
    prior.prior_mean = prior.prior_mean - centre
    x_squared = x.square()
    (total_x_squared,) = distributed.all_reduce_sum([x_squared.sum(0)], group)
    totals = (total_x_squared, num_data)
    is_writer = distributed.get_rank(group) == 0

    posterior = _dp_fit._shift(memory._posterior(), -centre)
    with_squares = prior.per_memory and prior.learn_variance
    local, total, _ = _reduced_step(x, x_squared, posterior, with_squares, group)
    bar = tqdm(
        total=max_iter,
        initial=record["iteration"],
        disable=not (progress and is_writer),
        desc="CAVI (data-parallel)",
    )
    try:
        while record["iteration"] < max_iter and not record["converged"]:
            iteration = record["iteration"] + 1
            candidate = cavi.global_step(total, total_x_squared, num_data, posterior, prior)
            candidate, changed = _dp_fit._prune(memory, candidate, total, prior, record, iteration)
            candidate_local, candidate_total, data_term = _reduced_step(
                x, x_squared, candidate, with_squares, group
            )
            elbo = data_term + float(cavi.global_terms(candidate, prior))
            if not math.isfinite(elbo):
                raise FloatingPointError(
                    f"the ELBO is {elbo} at CAVI iteration {iteration}; the parameters of "
                    f"iteration {iteration - 1} are kept."
                )
            posterior, local, total = candidate, candidate_local, candidate_total
            previous = record["elbo"][-1] if record["elbo"] else None
            last_weight = float(posterior.sticks().mean[-1])
            can_grow = posterior.num_memories < memory.max_truncation
            retry = iteration - _dp_fit._RETRY_AFTER
            if can_grow and last_weight > memory.grow_threshold:
                if record["birth_rejected_at"] < retry:
                    birth = _propose_birth(
                        posterior, local, x, x_squared, totals, prior, elbo, with_squares, group
                    )
                    if birth is None:
                        record["birth_rejected_at"] = iteration
                    else:
                        posterior, local, total, elbo = birth
                        _dp_fit._record_birth(record, iteration, posterior, last_weight, memory)
                        changed = True
            change = None if previous is None else _dp_fit._relative_change(elbo, previous)
            stalled = change is not None and change < _dp_fit._MERGE_STALL
            if stalled and not changed and record["merge_rejected_at"] < retry:
                merge = _propose_merge(posterior, total, x, x_squared, totals, prior, elbo, group)
                if merge is None:
                    record["merge_rejected_at"] = iteration
                else:
                    posterior, local, total, elbo, (j, k) = merge
                    _dp_fit._record_merge(record, iteration, j, k, posterior)
                    changed = True
            record["elbo"].append(elbo)
            record["iteration"] = iteration
            if previous is not None and not changed:
                record["converged"] = _dp_fit._relative_change(elbo, previous) < tol
            bar.update(1)
            bar.set_postfix(elbo=f"{elbo:.6g}", memories=posterior.num_memories)
            if checkpoint is not None and iteration % checkpoint_every == 0:
                _dp_fit._write_back(memory, posterior, centre, total.counts)
                if is_writer:
                    _dp_fit.save_checkpoint(memory, checkpoint, record)
    finally:
        bar.close()
        _dp_fit._write_back(memory, posterior, centre, total.counts)
    if checkpoint is not None:
        if is_writer:
            _dp_fit.save_checkpoint(memory, checkpoint, record)
        # The other ranks may read the checkpoint next (to resume), so they wait for the write.
        distributed.barrier(group)
    logger.info(
        "data-parallel CAVI on %d ranks stopped after %d iterations with %d memories",
        distributed.get_world_size(group),
        record["iteration"],
        memory.truncation,
    )
    return _dp_fit._result(record)


def fit_parallel(memory, local_data, method: str = "cavi", seed=None, **options):
    """Run :func:`fit_cavi_parallel` or, for ``method="svi"``, ``fit_svi_parallel``.

    A ``seed`` of None is drawn on rank 0 and sent to the other ranks, because every rank must
    initialize from the same seed.
    """
    if seed is None:
        seed = int(torch.randint(2**31, ()).item())
    seed = distributed.broadcast_object(seed, 0, options.get("group"))
    if method == "cavi":
        for name in ("lr", "num_particles", "batch_size"):
            options.pop(name, None)
        return fit_cavi_parallel(memory, local_data, seed=seed, **options)
    from pyro_am.models._dp_parallel_svi import fit_svi_parallel

    return fit_svi_parallel(memory, local_data, seed=seed, **options)
