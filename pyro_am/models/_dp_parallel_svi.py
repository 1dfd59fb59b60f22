"""Pyro SVI for the DP memory with gradients averaged over ``torch.distributed`` ranks.

Rank r holds a block of the N data. Each rank evaluates the ELBO on its block with the sites of
the ``"data"`` plate scaled by P, the number of ranks, which gives
``L_r = global terms + P * sum_{n in r} log p(x_n | ...)``. The mean of the ranks' gradients is
then the gradient of ``global terms + sum_r sum_{n in r} log p(x_n | ...)``, the ELBO of all the
data, whatever the block sizes. Every rank uses the same seed, so the guide draws the same samples
on every rank, and every rank applies the same averaged gradient with the same Adam state.
"""

from __future__ import annotations

import logging
import math

import pyro
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from pyro.poutine.messenger import Messenger
from tqdm.auto import tqdm

from pyro_am import distributed
from pyro_am.models import _dp_cavi as cavi
from pyro_am.models import _dp_fit
from pyro_am.models._dp_parallel import initialize_parallel

logger = logging.getLogger(__name__)


class _ScaleDataPlate(Messenger):
    """Multiply the log density of every site inside the ``"data"`` plate by ``factor``."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def _process_message(self, msg):
        if msg["type"] == "sample" and any(
            frame.name == "data" for frame in msg["cond_indep_stack"]
        ):
            msg["scale"] = self.factor * msg["scale"]


def _converged(elbo: list, tol: float) -> bool:
    """Apply :meth:`DPMemory.fit`'s SVI rule: compare the means of the last two windows."""
    window = _dp_fit._SVI_WINDOW
    if len(elbo) < 2 * window:
        return False
    recent = sum(elbo[-window:]) / window
    before = sum(elbo[-2 * window : -window]) / window
    return _dp_fit._relative_change(recent, before) < tol


def fit_svi_parallel(
    memory,
    local_data,
    *,
    max_iter=1000,
    tol=1e-6,
    lr=0.05,
    num_particles=1,
    batch_size=None,
    seed=0,
    warm_start=False,
    init_sample_size=None,
    progress=True,
    checkpoint=None,
    checkpoint_every=10,
    resume=False,
    group=None,
):
    """Fit ``memory`` by Pyro SVI with Adam, averaging the gradients over the ranks.

    ``batch_size`` subsamples each rank's block (the ``"data"`` plate), so a step uses
    ``P * batch_size`` data. The recorded ELBO of a step is the mean of the ranks' estimates,
    which estimates the ELBO of all the data. Rank 0 writes the checkpoints, and with
    ``resume=True`` every rank reads the checkpoint, so it must be on a file system that all
    ranks see.

    NOTE: every rank applies the same averaged gradient to the same parameters, so they stay
    equal up to the rounding of the all-reduce; nothing re-synchronizes them.

    :param DPMemory memory: the memory, constructed identically on every rank.
    :param torch.Tensor local_data: this rank's data, shape (N_r, D).
    :param int max_iter: the total number of steps, counting those before a resume.
    :param float tol: stop when the mean ELBO of the last 50 steps changes by less than ``tol``
        (relative) from the 50 before.
    :returns: a :class:`~pyro_am.models.dp_memory.DPFitResult` with ``method="svi"``.
    """
    local_data = memory._check_data("local_data", local_data)
    record = None
    if resume:
        if checkpoint is None:
            raise ValueError("resume=True needs a checkpoint path.")
        record = _dp_fit.load_checkpoint(memory, checkpoint, "svi")
    extra = {}
    if record is None:
        if warm_start:
            memory._match_dtype(local_data)
        else:
            initialize_parallel(memory, local_data, seed, init_sample_size, group)
        record = _dp_fit._new_record("svi", memory.truncation)
        pyro.set_rng_seed(seed)
    else:
        extra = record.pop("extra", {})
        if "rng" in extra:
            torch.set_rng_state(extra["rng"])
    memory._match_dtype(local_data)
    world_size = distributed.get_world_size(group)
    is_writer = distributed.get_rank(group) == 0
    if memory.assignment == "marginalized":
        loss = Trace_ELBO(num_particles=num_particles, max_plate_nesting=1)
    else:
        loss = TraceEnum_ELBO(num_particles=num_particles, max_plate_nesting=1)
    size = local_data.shape[0]
    subsample_size = None if batch_size is None or batch_size >= size else batch_size
    optimizer = None
    parameters, snapshot = [], []

    def write_checkpoint():
        if is_writer:
            state = {"torch_optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}
            _dp_fit.save_checkpoint(memory, checkpoint, record, state)

    bar = tqdm(
        total=max_iter,
        initial=record["iteration"],
        disable=not (progress and is_writer),
        desc="SVI (data-parallel)",
    )
    try:
        while record["iteration"] < max_iter and not record["converged"]:
            iteration = record["iteration"] + 1
            with pyro.poutine.trace(param_only=True) as capture, _ScaleDataPlate(world_size):
                value = loss.differentiable_loss(
                    memory.model, memory.guide, local_data, subsample_size=subsample_size
                )
            parameters = [site["value"].unconstrained() for site in capture.trace.nodes.values()]
            if optimizer is None:
                optimizer = torch.optim.Adam(parameters, lr=lr)
                if "torch_optimizer" in extra:
                    optimizer.load_state_dict(extra["torch_optimizer"])
            snapshot = [parameter.detach().clone() for parameter in parameters]
            value.backward()
            distributed.all_reduce_gradients(parameters, group, average=True)
            (mean_loss,) = distributed.all_reduce_sum([value.detach().reshape(1)], group)
            mean_loss = float(mean_loss) / world_size
            if not math.isfinite(mean_loss):
                raise FloatingPointError(
                    f"the ELBO is {-mean_loss} at SVI step {iteration}; the parameters of step "
                    f"{iteration - 1} are kept."
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            record["elbo"].append(-mean_loss)
            record["iteration"] = iteration
            record["converged"] = _converged(record["elbo"], tol)
            bar.update(1)
            if checkpoint is not None and iteration % checkpoint_every == 0:
                write_checkpoint()
    except FloatingPointError:
        with torch.no_grad():
            for parameter, saved in zip(parameters, snapshot, strict=True):
                parameter.copy_(saved)
        raise
    finally:
        bar.close()
    with torch.no_grad():
        local = cavi.local_step(local_data, local_data.square(), memory._posterior())
        (memory.memory_counts,) = distributed.all_reduce_sum([local.counts], group)
    if checkpoint is not None and optimizer is not None:
        write_checkpoint()
        # The other ranks may read the checkpoint next (to resume), so they wait for the write.
        distributed.barrier(group)
    logger.info(
        "data-parallel SVI on %d ranks stopped after %d steps",
        world_size,
        record["iteration"],
    )
    return _dp_fit._result(record)
