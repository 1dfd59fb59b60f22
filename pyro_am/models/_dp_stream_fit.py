"""The loop of streaming SVI for the DP memory: batches, the step schedule and checkpoints.

The update of each step, the running statistics and the birth, merge and pruning moves are in
:mod:`pyro_am.models._dp_stream`. A checkpoint stores the memory, the running statistics, the
centring offset and the position in the stream (epoch and batch), so ``resume=True`` continues
with the next batch. A birth still waiting to be judged on the next batch is not stored, so a
resumed run can differ from an uninterrupted one after such a step.
"""

from __future__ import annotations

import itertools
import logging
import math

import torch
from tqdm.auto import tqdm

from pyro_am import distributed
from pyro_am._validation import check_finite, check_int, check_interval, check_positive
from pyro_am.minibatches import minibatches
from pyro_am.models import _dp_fit
from pyro_am.models._dp_stream import (
    Statistics,
    _elbo_estimate,
    _global_step,
    _judge_birth,
    _prune,
    _reduce_batch,
    _scaled,
    _structural_moves,
    step_size,
)

logger = logging.getLogger(__name__)


def _check_batch(batch, dim: int, like: torch.Tensor, position: int) -> torch.Tensor:
    if batch.dim() != 2 or batch.shape[1] != dim:
        raise ValueError(
            f"batch {position} must have shape (B, {dim}), but has shape {tuple(batch.shape)}."
        )
    return check_finite(f"batch {position}", batch.to(like))


def _check_options(num_epochs, max_steps, offset, exponent, checkpoint_every, resume, checkpoint):
    check_int("num_epochs", num_epochs, minimum=1)
    if max_steps is not None:
        check_int("max_steps", max_steps, minimum=1)
    check_positive("step_size_offset", offset, allow_zero=True)
    check_interval("step_size_exponent", exponent, 0.0, 1.0, closed_high=True)
    check_int("checkpoint_every", checkpoint_every, minimum=1)
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path.")


def _flag(value: bool, group) -> torch.Tensor:
    device = distributed.collective_device(group)
    return torch.tensor([1.0 if value else 0.0], device=device)


def _first_batch(batches, rank, group):
    first = next(batches, None)
    (present,) = distributed.all_reduce_sum([_flag(first is not None, group)], group)
    if float(present) == 0:
        raise ValueError("the minibatch source yielded no batch, so there is nothing to fit.")
    if first is None:
        raise ValueError(f"rank {rank} received no batch while other ranks did.")
    return first, itertools.chain([first], batches)


def _aligned(batches, world_size, group):
    """Yield the batches while every rank has one. Raise if the ranks run out at different steps."""
    if world_size == 1:
        yield from batches
        return
    while True:
        batch = next(batches, None)
        (present,) = distributed.all_reduce_sum([_flag(batch is not None, group)], group)
        if float(present) == 0:
            return
        if float(present) < world_size:
            raise ValueError(
                f"the ranks' minibatch sources yielded different numbers of batches "
                f"({int(present)} of {world_size} ranks have one more); give every rank the same "
                "number of batches per epoch."
            )
        yield batch


def fit_stream(
    memory,
    source,
    *,
    batch_size=None,
    num_data=None,
    num_epochs=1,
    max_steps=None,
    step_size_offset=1.0,
    step_size_exponent=0.7,
    shuffle=True,
    seed=None,
    warm_start=False,
    init_size=None,
    dtype=None,
    device=None,
    progress=True,
    checkpoint=None,
    checkpoint_every=10,
    resume=False,
    group=None,
):
    """Fit ``memory`` by streaming natural-gradient SVI; see :meth:`DPMemory.fit_stream`."""
    _check_options(
        num_epochs, max_steps, step_size_offset, step_size_exponent, checkpoint_every, resume,
        checkpoint,
    )  # fmt: skip
    if seed is None:
        seed = int(torch.randint(2**31, ()).item())
    seed = distributed.broadcast_object(check_int("seed", seed, minimum=0), 0, group)
    stream = minibatches(
        source,
        batch_size,
        num_data=num_data,
        shuffle=shuffle,
        seed=seed,
        dtype=dtype,
        device=device,
    )
    if num_epochs > 1 and not stream.reiterable:
        raise ValueError(
            f"num_epochs={num_epochs} needs a source that can be iterated again, but the source "
            "is a one-shot iterator; pass num_epochs=1 or a re-iterable source."
        )
    if stream.num_data is None:
        raise ValueError(
            "num_data is required for an iterable without a sized .dataset, because the DP "
            "memory scales each batch's statistics by num_data / batch size."
        )
    rank, world_size = distributed.get_rank(group), distributed.get_world_size(group)
    num_data = stream.num_data
    record = _dp_fit.load_checkpoint(memory, checkpoint, "stream") if resume else None
    statistics = None
    if record is None:
        record = _dp_fit._new_record("stream", memory.truncation)
        record.update({"epoch": 0, "batch": 0, "num_data": num_data, "step_sizes": []})
        first, batches = _first_batch(stream.epoch(0, rank, world_size), rank, group)
        first = _check_batch(first, memory.dim, first, 0)
        sample = torch.cat(distributed.all_gather_object(first.cpu(), group)).to(first)
        if not warm_start:
            if init_size is not None:
                sample = sample[: check_int("init_size", init_size, minimum=1)]
            if sample.shape[0] < 2:
                # One row has no spread, so the initial noise variance would be NaN.
                raise ValueError(
                    f"the first batch initializes the memory, but it has {sample.shape[0]} row "
                    "and the initialization needs at least 2; raise batch_size or init_size, "
                    "or initialize the memory and pass warm_start=True."
                )
            memory.initialize(sample, seed=seed)
        memory._match_dtype(first)
        centre = sample.mean(0)
    else:
        extra = record.pop("extra")
        centre = extra["centre"]
        if extra.get("statistics") is not None:
            statistics = Statistics(**{"squares": None, **extra["statistics"]})
        batches = stream.epoch(record["epoch"], rank, world_size, record["batch"])
    like = memory.memory_loc.detach()
    centre = centre.to(like)
    prior = memory._prior(like)
    prior.prior_mean = prior.prior_mean - centre
    posterior = _dp_fit._shift(memory._posterior(), -centre)
    with_squares = prior.per_memory and prior.learn_variance
    offset, exponent = float(step_size_offset), float(step_size_exponent)

    def save():
        counts = memory.memory_counts if statistics is None else statistics.counts
        _dp_fit._write_back(memory, posterior, centre, counts)
        if rank == 0:
            tensors = None if statistics is None else statistics.tensors()
            extra = {"statistics": tensors, "centre": centre}
            _dp_fit.save_checkpoint(memory, checkpoint, record, extra)

    total = None if stream.num_batches is None else num_epochs * stream.num_batches
    if max_steps is not None:
        total = max_steps if total is None else min(total, max_steps)
    bar = tqdm(
        total=total,
        initial=record["iteration"],
        disable=not (progress and rank == 0),
        desc="streaming SVI",
    )
    start_epoch = record["epoch"]
    # A proposed birth is judged on the next batch, and a checkpoint does not store it.
    pending = None
    try:
        for epoch in range(start_epoch, num_epochs):
            if epoch != start_epoch:
                batches = stream.epoch(epoch, rank, world_size)
            for batch in _aligned(batches, world_size, group):
                if max_steps is not None and record["iteration"] >= max_steps:
                    break
                step = record["iteration"] + 1
                x = _check_batch(batch, memory.dim, like, record["batch"]) - centre
                x_squared = x.square()
                current = _reduce_batch(x, x_squared, posterior, with_squares, group)
                elbo = _elbo_estimate(current, posterior, prior, num_data)
                if not math.isfinite(elbo):
                    raise FloatingPointError(
                        f"the ELBO estimate is {elbo} at streaming step {step}; the parameters "
                        f"of step {step - 1} are kept."
                    )
                if pending is not None:
                    posterior, statistics, current, elbo = _judge_birth(
                        memory, pending, posterior, statistics, current, elbo, x, x_squared,
                        prior, num_data, record, step, group,
                    )  # fmt: skip
                    pending = None
                rho = step_size(step, offset, exponent)
                batch_statistics = _scaled(current.statistics, num_data / current.size)
                if statistics is None:
                    statistics = batch_statistics
                else:
                    statistics = statistics.blend(batch_statistics, rho)
                posterior = _global_step(statistics, posterior, num_data, prior)
                posterior, statistics, changed = _prune(
                    memory, posterior, statistics, prior, record, step
                )
                posterior, statistics, changed, pending = _structural_moves(
                    memory, posterior, statistics, x, x_squared, prior, num_data, record, step,
                    changed, group,
                )  # fmt: skip
                record["elbo"].append(elbo)
                record["step_sizes"].append(rho)
                record["iteration"] = step
                record["batch"] += 1
                bar.update(1)
                bar.set_postfix(elbo=f"{elbo:.6g}", memories=posterior.num_memories)
                if checkpoint is not None and step % checkpoint_every == 0:
                    save()
            else:
                record["epoch"], record["batch"] = epoch + 1, 0
                continue
            break
    finally:
        bar.close()
        counts = memory.memory_counts if statistics is None else statistics.counts
        _dp_fit._write_back(memory, posterior, centre, counts)
    if checkpoint is not None:
        save()
        # The other ranks may read the checkpoint next (to resume), so they wait for the write.
        distributed.barrier(group)
    logger.info(
        "streaming SVI stopped after %d steps (%d epochs) with %d memories",
        record["iteration"],
        record["epoch"],
        memory.truncation,
    )
    return _dp_fit._result(record)
