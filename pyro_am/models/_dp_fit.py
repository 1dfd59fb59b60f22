"""Fitting loops of the DP memory: coordinate ascent with memory creation and pruning, and SVI.

Both loops record the ELBO every iteration, stop with :class:`FloatingPointError` naming the
iteration when it is not finite (after restoring the last parameters whose ELBO was finite), and
write atomic checkpoints from which ``resume=True`` continues. A checkpoint stores the memory's
parameters and the loop's record, so that a resumed CAVI run takes exactly the steps an
uninterrupted run would.

Structural changes happen in CAVI after each global step. Memories whose expected weight falls
below ``prune_threshold`` are removed and the sticks are refitted to the remaining counts. When
the last memory's expected weight exceeds ``grow_threshold``, the truncation might hide further
memories, so a birth is proposed. The new memory is seeded at the datum with the lowest ELBO
term (the worst-explained datum) and takes every datum closer to it than to its current memory.
When the ELBO stalls, merges of the closest pairs of memories are proposed. Births and merges
are kept only if they raise the ELBO, and a rejected kind of proposal waits ``_RETRY_AFTER``
iterations.
"""

from __future__ import annotations

import logging
import math
import os

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO
from tqdm.auto import tqdm

from pyro_am.models import _dp_cavi as cavi
from pyro_am.models import _dp_moves as moves

logger = logging.getLogger(__name__)

_SVI_WINDOW = 50
# Merges are proposed when the relative ELBO change of an iteration falls below this.
_MERGE_STALL = 1e-4
_MERGE_CANDIDATES = 5
# A rejected birth or merge proposal is retried after this many iterations.
_RETRY_AFTER = 10


def _new_record(method: str, num_memories: int) -> dict:
    return {
        "method": method,
        "iteration": 0,
        "elbo": [],
        "events": [],
        "num_created": 0,
        "num_pruned": 0,
        "converged": False,
        "num_merged": 0,
        "merge_rejected_at": -(10**9),
        "birth_rejected_at": -(10**9),
    }


def _result(record: dict):
    from pyro_am.models.dp_memory import DPFitResult

    return DPFitResult(
        elbo=list(record["elbo"]),
        iterations=record["iteration"],
        converged=record["converged"],
        num_created=record["num_created"],
        num_pruned=record["num_pruned"],
        num_merged=record["num_merged"],
        events=[dict(event) for event in record["events"]],
        method=record["method"],
    )


def save_checkpoint(memory, path, record: dict, extra: dict | None = None) -> None:
    from pyro_am.models.dp_memory import atomic_save

    state = {"memory": memory.state(), "fit": record}
    state.update(extra or {})
    atomic_save(state, path)


def load_checkpoint(memory, path, method: str) -> dict | None:
    """Load ``path`` into ``memory`` and return the fit record, or None when the file is missing."""
    if not os.path.exists(path):
        logger.info("checkpoint %s not found; starting a new fit", path)
        return None
    state = torch.load(path, weights_only=True)
    record = state["fit"]
    if record["method"] != method:
        raise ValueError(
            f"checkpoint {path} was written by method={record['method']!r}, but method={method!r} "
            "was requested; resume with the same method or start a new fit."
        )
    memory.load_state(state["memory"])
    record["extra"] = {key: value for key, value in state.items() if key not in ("memory", "fit")}
    logger.info("resuming %s fit from %s at iteration %d", method, path, record["iteration"])
    return record


def _prune(memory, posterior, step, prior, record, iteration):
    """Remove the memories whose expected weight is below the threshold; refit the sticks."""
    weights = posterior.sticks().mean
    keep = weights >= memory.prune_threshold
    if not bool(keep.any()):
        keep[weights.argmax()] = True
    if bool(keep.all()):
        return posterior, False
    for index in (~keep).nonzero().flatten().tolist():
        weight = float(weights[index])
        logger.info(
            "iteration %d: pruned memory %d (expected weight %.3g)", iteration, index, weight
        )
        record["events"].append(
            {"iteration": iteration, "kind": "pruned", "memory": index, "weight": weight}
        )
        record["num_pruned"] += 1
    return posterior.select(keep, step.counts, prior), True


def _propose_birth(posterior, step, x, x_squared, total_x_squared, prior, elbo, with_squares):
    """Propose one new memory at the worst-explained datum and keep it if the ELBO rises.

    The datum with the lowest ELBO term seeds the memory. Every datum closer to it than to the
    mean of its most responsible memory moves to the new memory, and one global and one local
    step follow. Accepted births therefore never lower the ELBO.

    :returns: ``(posterior, step, elbo)`` of the accepted birth, or None.
    """
    worst = int(step.log_normalizers.argmin())
    moved = moves.moved_to_seed(x, x[worst], posterior, step.responsibilities)
    moved[worst] = True
    responsibilities = step.responsibilities.masked_fill(moved.unsqueeze(-1), 0.0)
    responsibilities = torch.cat([responsibilities, moved.unsqueeze(-1).to(x.dtype)], dim=-1)
    statistics = cavi.LocalStep(
        responsibilities,
        None,
        responsibilities.sum(0),
        responsibilities.T @ x,
        responsibilities.T @ x_squared if with_squares else None,
    )
    extended = moves.with_empty_memory(posterior, prior, x)
    born = cavi.global_step(statistics, total_x_squared, x.shape[0], extended, prior)
    born_step = cavi.local_step(x, x_squared, born, with_squares)
    born_elbo = float(born_step.log_normalizers.sum() + cavi.global_terms(born, prior))
    if born_elbo > elbo:
        return born, born_step, born_elbo
    return None


def _propose_merge(posterior, step, x, x_squared, total_x_squared, prior, elbo):
    """Try merging the closest pairs of memories and return the first merge that raises the ELBO.

    A merge adds the responsibilities of memory k to memory j and drops k, then takes one global
    step and one local step. It is accepted only when the ELBO of the merged parameters exceeds
    ``elbo``, the ELBO of the current ones, so accepted merges never lower the ELBO. Candidate
    pairs are the ``_MERGE_CANDIDATES`` closest in Mahalanobis distance under the noise variance.

    :returns: ``(posterior, step, elbo, (j, k))`` of the accepted merge, or None.
    """
    for j, k in moves.merge_candidates(posterior, _MERGE_CANDIDATES):
        keep, counts, kept_counts, sums, squares = moves.merge_statistics(
            step.counts, step.sums, step.squares, j, k
        )
        merged_statistics = cavi.LocalStep(None, None, kept_counts, sums, squares)
        start = posterior.select(keep, counts, prior)
        merged = cavi.global_step(merged_statistics, total_x_squared, x.shape[0], start, prior)
        merged_step = cavi.local_step(x, x_squared, merged, with_squares=squares is not None)
        merged_elbo = float(merged_step.log_normalizers.sum() + cavi.global_terms(merged, prior))
        if merged_elbo > elbo:
            return merged, merged_step, merged_elbo, (j, k)
    return None


def _record_birth(record, iteration, posterior, last_weight, memory) -> None:
    index = posterior.num_memories - 1
    weight = float(posterior.sticks().mean[-1])
    logger.info(
        "iteration %d: created memory %d (last weight %.3g exceeded %.3g)",
        iteration,
        index,
        last_weight,
        memory.grow_threshold,
    )
    record["events"].append(
        {"iteration": iteration, "kind": "created", "memory": index, "weight": weight}
    )
    record["num_created"] += 1


def _record_merge(record, iteration, j, k, posterior) -> None:
    kept = j if j < k else j - 1
    weight = float(posterior.sticks().mean[kept])
    logger.info("iteration %d: merged memory %d into memory %d", iteration, k, j)
    record["events"].append(
        {"iteration": iteration, "kind": "merged", "memory": k, "into": j, "weight": weight}
    )
    record["num_merged"] += 1


def _shift(posterior: cavi.Posterior, offset: torch.Tensor) -> cavi.Posterior:
    return cavi.Posterior(
        posterior.stick_concentration1,
        posterior.stick_concentration0,
        posterior.memory_loc + offset,
        posterior.memory_scale,
        posterior.variance,
    )


def _relative_change(new: float, old: float) -> float:
    return abs(new - old) / max(abs(new), abs(old), 1e-300)


def fit_cavi(memory, data, *, max_iter, tol, progress, checkpoint, checkpoint_every, state):
    """Run coordinate ascent on ``memory`` until convergence or ``max_iter`` total iterations."""
    memory._match_dtype(data)
    record = state if state is not None else _new_record("cavi", memory.truncation)
    record.pop("extra", None)
    prior = memory._prior(data)
    # Centring the data (and the prior mean with it) leaves the model unchanged.
    centre = data.mean(0)
    x = data - centre
    prior.prior_mean = prior.prior_mean - centre
    x_squared = x.square()
    total_x_squared = x_squared.sum(0)
    num_data = x.shape[0]

    posterior = _shift(memory._posterior(), -centre)
    with_squares = prior.per_memory and prior.learn_variance
    step = cavi.local_step(x, x_squared, posterior, with_squares)
    bar = tqdm(total=max_iter, initial=record["iteration"], disable=not progress, desc="CAVI")
    try:
        while record["iteration"] < max_iter and not record["converged"]:
            iteration = record["iteration"] + 1
            candidate = cavi.global_step(step, total_x_squared, num_data, posterior, prior)
            candidate, changed = _prune(memory, candidate, step, prior, record, iteration)
            candidate_step = cavi.local_step(x, x_squared, candidate, with_squares)
            elbo = float(candidate_step.log_normalizers.sum() + cavi.global_terms(candidate, prior))
            if not math.isfinite(elbo):
                raise FloatingPointError(
                    f"the ELBO is {elbo} at CAVI iteration {iteration}; the parameters of "
                    f"iteration {iteration - 1} are kept."
                )
            posterior, step = candidate, candidate_step
            previous = record["elbo"][-1] if record["elbo"] else None
            last_weight = float(posterior.sticks().mean[-1])
            can_grow = posterior.num_memories < memory.max_truncation
            if can_grow and last_weight > memory.grow_threshold:
                if record["birth_rejected_at"] < iteration - _RETRY_AFTER:
                    birth = _propose_birth(
                        posterior, step, x, x_squared, total_x_squared, prior, elbo, with_squares
                    )
                    if birth is None:
                        record["birth_rejected_at"] = iteration
                    else:
                        posterior, step, elbo = birth
                        _record_birth(record, iteration, posterior, last_weight, memory)
                        changed = True
            stalled = previous is not None and _relative_change(elbo, previous) < _MERGE_STALL
            if stalled and not changed and record["merge_rejected_at"] < iteration - _RETRY_AFTER:
                merge = _propose_merge(posterior, step, x, x_squared, total_x_squared, prior, elbo)
                if merge is None:
                    record["merge_rejected_at"] = iteration
                else:
                    posterior, step, elbo, (j, k) = merge
                    _record_merge(record, iteration, j, k, posterior)
                    changed = True
            record["elbo"].append(elbo)
            record["iteration"] = iteration
            if previous is not None and not changed:
                record["converged"] = _relative_change(elbo, previous) < tol
            bar.update(1)
            bar.set_postfix(elbo=f"{elbo:.6g}", memories=posterior.num_memories)
            if checkpoint is not None and iteration % checkpoint_every == 0:
                _write_back(memory, posterior, centre, step.counts)
                save_checkpoint(memory, checkpoint, record)
    finally:
        bar.close()
        _write_back(memory, posterior, centre, step.counts)
    if checkpoint is not None:
        save_checkpoint(memory, checkpoint, record)
    logger.info(
        "CAVI stopped after %d iterations (converged: %s) with %d memories",
        record["iteration"],
        record["converged"],
        memory.truncation,
    )
    return _result(record)


def _write_back(memory, posterior, centre, counts) -> None:
    memory._write_posterior(_shift(posterior, centre))
    memory.memory_counts = counts.detach().clone()


def _unconstrained_parameters(memory) -> dict[str, torch.Tensor]:
    names = ["stick_concentration1", "stick_concentration0", "memory_loc", "memory_scale"]
    if memory.learn_scale:
        names.append("noise_scale")
    return {name: getattr(memory, name + "_unconstrained") for name in names}


def fit_svi(
    memory,
    data,
    *,
    lr,
    num_particles,
    batch_size,
    max_iter,
    tol,
    progress,
    checkpoint,
    checkpoint_every,
    state,
):
    """Run Pyro SVI with Adam on the marginalized (or enumerated) ELBO."""
    memory._match_dtype(data)
    record = state if state is not None else _new_record("svi", memory.truncation)
    extra = record.pop("extra", {})
    if memory.assignment == "marginalized":
        loss = Trace_ELBO(num_particles=num_particles, max_plate_nesting=1)
    else:
        loss = TraceEnum_ELBO(num_particles=num_particles, max_plate_nesting=1)
    optimizer = pyro.optim.Adam({"lr": lr})
    if "optimizer" in extra:
        optimizer.set_state(extra["optimizer"])
    if "rng" in extra:
        torch.set_rng_state(extra["rng"])
    svi = SVI(memory.model, memory.guide, optimizer, loss)
    subsample_size = None if batch_size is None or batch_size >= data.shape[0] else batch_size

    def write_checkpoint():
        save_checkpoint(
            memory,
            checkpoint,
            record,
            {"optimizer": optimizer.get_state(), "rng": torch.get_rng_state()},
        )

    bar = tqdm(total=max_iter, initial=record["iteration"], disable=not progress, desc="SVI")
    try:
        while record["iteration"] < max_iter and not record["converged"]:
            iteration = record["iteration"] + 1
            parameters = _unconstrained_parameters(memory)
            snapshot = {name: value.detach().clone() for name, value in parameters.items()}
            value = svi.step(data, subsample_size=subsample_size)
            if not math.isfinite(value):
                with torch.no_grad():
                    for name, tensor in _unconstrained_parameters(memory).items():
                        tensor.copy_(snapshot[name])
                raise FloatingPointError(
                    f"the ELBO is {-value} at SVI step {iteration}; the parameters of step "
                    f"{iteration - 1} are kept."
                )
            record["elbo"].append(-value)
            record["iteration"] = iteration
            elbo = record["elbo"]
            if len(elbo) >= 2 * _SVI_WINDOW:
                recent = sum(elbo[-_SVI_WINDOW:]) / _SVI_WINDOW
                before = sum(elbo[-2 * _SVI_WINDOW : -_SVI_WINDOW]) / _SVI_WINDOW
                record["converged"] = _relative_change(recent, before) < tol
            bar.update(1)
            if iteration % 10 == 0:
                bar.set_postfix(elbo=f"{-value:.6g}")
            if checkpoint is not None and iteration % checkpoint_every == 0:
                write_checkpoint()
    finally:
        bar.close()
    with torch.no_grad():
        # Expected counts under the fitted parameters, for the CRP rule and energy.
        memory.memory_counts = cavi.local_step(data, data.square(), memory._posterior()).counts
    if checkpoint is not None:
        write_checkpoint()
    return _result(record)
