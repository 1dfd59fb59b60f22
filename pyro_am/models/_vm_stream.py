"""Streaming fit of the variational memory: stochastic EM over minibatches.

The closed-form M-step of :mod:`pyro_am.models.variational_memory` depends on the data only
through the per-datum averages of the sufficient statistics::

    w_k = (1/N) sum_n q_nk,   s_k = (1/N) sum_n q_nk x_n,   e_k = (1/N) sum_n q_nk |x_n|^2

    pi_k = w_k,   mu_k = s_k / w_k,   s_k^2 = (e_k - w_k |mu_k|^2) / (D w_k)
    (shared: s^2 = sum_k (e_k - w_k |mu_k|^2) / D)

Step t runs the E-step (``flow_steps`` flow steps from uniform q) on a batch, blends the batch's
averages into the running ones, ``u <- (1 - rho_t) u + rho_t u_hat`` with
``rho_t = (t + tau)^(-kappa)``, and applies the M-step to the running averages. This is stepwise
(online) EM (Cappe and Moulines, "On-line expectation-maximization algorithm for latent data
models", JRSS-B 2009; Liang and Klein, "Online EM for unsupervised models", NAACL 2009). It
converges to a stationary point of the likelihood for ``0.5 < kappa <= 1`` when the E-step is
exact. With T flow steps the E-step is the T-step flow posterior, as in :meth:`fit`, so the fixed
points are those of the generalized EM that :meth:`fit` runs. With ``kappa = 0`` and one batch
that contains all the data, each step is exactly one iteration of the closed-form :meth:`fit`
without warm starts. The averages do not depend on N, so no data count is needed.

NOTE: the flow starts from uniform q on every batch, because a stream does not revisit data by
index, so ``warm_start`` does not apply here.
"""

from __future__ import annotations

import logging
import math
import pickle
import struct

import torch
from tqdm.auto import tqdm

from pyro_am import distributed
from pyro_am.minibatches import minibatches
from pyro_am.models._dp_stream import step_size
from pyro_am.models._dp_stream_fit import _aligned, _check_batch, _check_options, _first_batch
from pyro_am.models.flow import assignment_flow

logger = logging.getLogger(__name__)


def _batch_averages(memory, x, locs, log_weights, variances, group):
    """Run the E-step on ``x``; return the batch averages (w, s, e) and the mean free energy."""
    from pyro_am.models.variational_memory import _fast_log_joint

    squared_norms = x.square().sum(-1)
    log_joint = _fast_log_joint(x, squared_norms, locs, log_weights, variances)
    flow = assignment_flow(
        log_joint,
        steps=memory.flow_steps,
        step_size=memory.flow_step_size,
        scheme=memory.flow_scheme,
        validate=False,
    )
    q = flow.log_q.exp()
    size = torch.tensor([x.shape[0]], dtype=x.dtype, device=x.device)
    tensors = [q.sum(0), q.T @ x, q.T @ squared_norms, flow.free_energy.sum().reshape(1), size]
    counts, sums, squares, free_energy, size = distributed.all_reduce_sum(tensors, group)
    size = float(size)
    return [counts / size, sums / size, squares / size], float(free_energy) / size


def _m_step(memory, averages, fallback_locs):
    """Apply the closed-form M-step of the module to the running averages."""
    weights, sums, squares = averages
    dim = sums.shape[-1]
    safe = weights + 10 * torch.finfo(weights.dtype).eps
    log_weights = torch.log(safe / safe.sum())
    locs = torch.where(weights.unsqueeze(-1) > 0, sums / safe.unsqueeze(-1), fallback_locs)
    spread = (squares - weights * locs.square().sum(-1)).clamp_min(0.0)
    if memory.scale == "shared":
        variances = spread.sum() / (safe.sum() * dim) + memory.reg_variance
    else:
        variances = spread / (safe * dim) + memory.reg_variance
    return locs, log_weights, variances


def _save(memory, path, averages, position) -> None:
    from pyro_am.models.dp_memory import atomic_save

    locs, logits, scales = memory._current_parameters()
    atomic_save(
        {
            "locs": locs.cpu(),
            "mixture_logits": logits.cpu(),
            "scales": scales.cpu(),
            "scale": memory.scale,
            "n_iter": memory.n_iter_,
            "elbo_history": list(memory.elbo_history_),
            "stream": {"averages": [a.cpu() for a in averages], **position},
        },
        path,
    )


def _read_stream_state(path) -> dict:
    """Read the stream position of a checkpoint, raising a ValueError that names the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError, ValueError, pickle.UnpicklingError, struct.error) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"checkpoint {path!r} cannot be read ({reason}); delete it or pass resume=False."
        ) from error
    if not isinstance(state, dict) or "stream" not in state:
        raise ValueError(
            f"checkpoint {path!r} was not written by VariationalMemory.fit_stream (it has no "
            "'stream' entry); pass that checkpoint or resume=False."
        )
    return state["stream"]


def fit_stream(
    memory,
    source,
    *,
    batch_size=None,
    num_epochs=1,
    max_steps=None,
    step_size_offset=1.0,
    step_size_exponent=0.7,
    shuffle=True,
    seed=0,
    warm_start=False,
    dtype=None,
    device=None,
    checkpoint=None,
    checkpoint_every=10,
    resume=False,
    group=None,
):
    """Fit ``memory`` by stepwise EM over minibatches; see :meth:`VariationalMemory.fit_stream`."""
    _check_options(
        num_epochs, max_steps, step_size_offset, step_size_exponent, checkpoint_every, resume,
        checkpoint,
    )  # fmt: skip
    stream = minibatches(source, batch_size, shuffle=shuffle, seed=seed, dtype=dtype, device=device)
    if num_epochs > 1 and not stream.reiterable:
        raise ValueError(
            f"num_epochs={num_epochs} needs a source that can be iterated again, but the source "
            "is a one-shot iterator; pass num_epochs=1 or a re-iterable source."
        )
    rank, world_size = distributed.get_rank(group), distributed.get_world_size(group)
    position = {"epoch": 0, "batch": 0}
    averages = None
    if resume and checkpoint is not None and _exists(checkpoint):
        saved = _read_stream_state(checkpoint)
        memory.load_checkpoint(checkpoint)
        like = memory.locs.detach()
        averages = [value.to(like) for value in saved["averages"]]
        position = {"epoch": saved["epoch"], "batch": saved["batch"]}
        batches = stream.epoch(position["epoch"], rank, world_size, position["batch"])
    else:
        first, batches = _first_batch(stream.epoch(0, rank, world_size), rank, group)
        first = _check_batch(first, memory.dim, first, 0)
        if not warm_start:
            sample = torch.cat(distributed.all_gather_object(first.cpu(), group)).to(first)
            memory.initialize(sample)
        memory.elbo_history_, memory.n_iter_ = [], 0
    memory.converged_ = False
    locs, log_weights, scales = memory._parameters_snapshot()
    variances = scales.square()
    offset, exponent = float(step_size_offset), float(step_size_exponent)
    start_epoch = position["epoch"]
    bar = tqdm(
        initial=memory.n_iter_,
        total=max_steps,
        disable=not (memory.progress and rank == 0),
        desc="stepwise EM",
    )
    try:
        for epoch in range(start_epoch, num_epochs):
            if epoch != start_epoch:
                batches = stream.epoch(epoch, rank, world_size)
            for batch in _aligned(batches, world_size, group):
                if max_steps is not None and memory.n_iter_ >= max_steps:
                    break
                step = memory.n_iter_ + 1
                x = _check_batch(batch, memory.dim, locs, position["batch"])
                batch_averages, free_energy = _batch_averages(
                    memory, x, locs, log_weights, variances, group
                )
                elbo = -free_energy
                if not math.isfinite(elbo):
                    memory._stop_on_nan(step - 1, elbo, locs, log_weights, variances)
                rho = step_size(step, offset, exponent)
                if averages is None:
                    averages = batch_averages
                else:
                    averages = [
                        torch.lerp(a, b, rho) for a, b in zip(averages, batch_averages, strict=True)
                    ]
                new = _m_step(memory, averages, locs)
                if not all(bool(torch.isfinite(t).all()) for t in new):
                    memory._stop_on_nan(step - 1, elbo, locs, log_weights, variances)
                locs, log_weights, variances = new
                memory.elbo_history_.append(elbo)
                memory.n_iter_ = step
                position["batch"] += 1
                bar.update(1)
                if checkpoint is not None and step % checkpoint_every == 0:
                    memory._set_parameters(locs, log_weights, variances.sqrt())
                    if rank == 0:
                        _save(memory, checkpoint, averages, position)
            else:
                position = {"epoch": epoch + 1, "batch": 0}
                continue
            break
    finally:
        bar.close()
    memory._set_parameters(locs, log_weights, variances.sqrt())
    memory.reset_assignments()
    if checkpoint is not None and averages is not None:
        if rank == 0:
            _save(memory, checkpoint, averages, position)
        # The other ranks may read the checkpoint next (to resume), so they wait for the write.
        distributed.barrier(group)
    logger.info(
        "stepwise EM: %d steps, last batch ELBO per datum %.6g",
        memory.n_iter_,
        memory.elbo_history_[-1] if memory.elbo_history_ else math.nan,
    )
    return memory


def _exists(path) -> bool:
    import os

    return os.path.exists(path)
