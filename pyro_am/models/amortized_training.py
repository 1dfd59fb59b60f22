"""Training an :class:`~pyro_am.models.amortized.AmortizedMixtureGuide` by SVI across data sets.

Each step draws ``batch_size`` data sets from a family with one context size n drawn uniformly
from ``[min_points, max_points]``, and takes one :class:`pyro.infer.SVI` step with
:class:`pyro.infer.Trace_ELBO` on the model and guide of all of them at once. The encoder
therefore learns posteriors for every context size in that range. The ELBO per context point is
recorded for every step.

Checkpoints hold the encoder, the optimizer state, the data generator and Pyro's random states,
and are written atomically, so resuming gives the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import os
import pickle

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from tqdm.auto import tqdm

from pyro_am._validation import check_int, check_positive
from pyro_am.models.amortized import AmortizedMixtureGuide, NonFiniteGuideError
from pyro_am.models.icl_training import write_atomically

logger = logging.getLogger(__name__)


def _forget_stored_parameters(name: str) -> None:
    # pyro.module reuses parameters already in the global store under the same name. Stale ones
    # from an earlier guide would then be optimized in place of this encoder's own tensors.
    store = pyro.get_param_store()
    prefix = f"{name}$$$"
    for key in [key for key in store.keys() if key.startswith(prefix)]:
        del store[key]


def fit_amortized_guide(
    amortized: AmortizedMixtureGuide,
    family,
    steps: int = 2000,
    batch_size: int = 32,
    max_points: int = 24,
    min_points: int = 1,
    learning_rate: float = 1e-3,
    num_particles: int = 1,
    seed: int = 0,
    checkpoint=None,
    resume: bool = False,
    checkpoint_every: int = 100,
    log_every: int = 100,
    progress: bool = True,
    per_point: bool = True,
) -> AmortizedMixtureGuide:
    """Train the encoder of ``amortized`` by SVI on data sets drawn from ``family``.

    :param AmortizedMixtureGuide amortized: the guide, on the dtype and device to train in.
    :param family: a family from :mod:`pyro_am.families` with ``dim`` equal to ``amortized.dim``.
    :param int steps: total SVI steps (a resumed run continues up to this number).
    :param int batch_size: data sets per step.
    :param int max_points: largest context size.
    :param int min_points: smallest context size.
    :param float learning_rate: Adam learning rate.
    :param int num_particles: ELBO particles per step.
    :param int seed: seed of the data sets and of Pyro's random state.
    :param checkpoint: optional path, written atomically every ``checkpoint_every`` steps and at
        the end.
    :param bool resume: continue from ``checkpoint`` if that file exists.
    :param int log_every: steps between log records.
    :param bool progress: show a tqdm progress bar.
    :param bool per_point: divide each data set's ELBO by its context size n (through
        :class:`pyro.poutine.scale` on the model and the guide). Otherwise the summed ELBO weighs a
        data set by n, and the shared encoder is fitted mostly to large contexts.
    :returns: ``amortized``, with the ELBO per point of every step appended to its ``history``.
    :raises RuntimeError: if the loss becomes NaN or infinite. The message names the step and the
        encoder keeps the parameters from before that step.
    """
    if not isinstance(amortized, AmortizedMixtureGuide):
        raise TypeError(
            f"amortized must be an AmortizedMixtureGuide, but got {type(amortized).__name__}."
        )
    steps = check_int("steps", steps)
    batch_size = check_int("batch_size", batch_size)
    min_points = check_int("min_points", min_points)
    max_points = check_int("max_points", max_points, minimum=min_points)
    num_particles = check_int("num_particles", num_particles)
    seed = check_int("seed", seed, minimum=0)
    checkpoint_every = check_int("checkpoint_every", checkpoint_every)
    log_every = check_int("log_every", log_every)
    check_positive("learning_rate", learning_rate)
    if getattr(family, "dim", None) != amortized.dim:
        raise ValueError(
            f"family has dimension {getattr(family, 'dim', None)}, but the guide has "
            f"dimension {amortized.dim}; build them with the same dim."
        )
    parameter = next(amortized.encoder.parameters())
    generator = torch.Generator().manual_seed(seed)
    pyro.set_rng_seed(seed)
    _forget_stored_parameters(amortized.name)
    optimizer = pyro.optim.Adam({"lr": learning_rate})
    elbo = Trace_ELBO(
        num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=2
    )
    model, guide = amortized.model, amortized.guide
    if per_point:
        model, guide = _per_point(model), _per_point(guide)
    svi = SVI(model, guide, optimizer, loss=elbo)
    start = 0
    if resume and checkpoint is not None and os.path.exists(checkpoint):
        start = _load_training_state(amortized, checkpoint, optimizer, generator)
        logger.info("resumed amortized SVI from %s at step %d", checkpoint, start)

    amortized.encoder.train()
    for step in tqdm(range(start, steps), disable=not progress, desc="amortized SVI"):
        size = int(torch.randint(min_points, max_points + 1, (1,), generator=generator))
        context = family.sample_points(batch_size, size, generator)
        context = context.to(dtype=parameter.dtype, device=parameter.device)
        snapshot = {k: v.detach().clone() for k, v in amortized.encoder.state_dict().items()}
        try:
            loss = svi.step(context) / (batch_size if per_point else batch_size * size)
        except NonFiniteGuideError as error:
            _restore_and_stop(amortized, snapshot, step, str(error))
        if not math.isfinite(loss):
            _restore_and_stop(amortized, snapshot, step, f"the loss is {loss}")
        amortized.history.append(-loss)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            logger.info("amortized SVI step %d: ELBO per point %.4g", step + 1, -loss)
        if checkpoint is not None and (step + 1) % checkpoint_every == 0:
            _save_training_state(amortized, checkpoint, optimizer, generator, step + 1)
    if checkpoint is not None:
        _save_training_state(amortized, checkpoint, optimizer, generator, max(start, steps))
    amortized.encoder.eval()
    return amortized


def _restore_and_stop(amortized, snapshot, step, cause):
    with torch.no_grad():
        amortized.encoder.load_state_dict(snapshot)
    raise RuntimeError(
        f"amortized SVI stopped at step {step}: {cause}; the encoder parameters from before "
        "that step were kept. Lower the learning rate."
    )


def _per_point(program):
    def scaled(context, *args, **kwargs):
        with poutine.scale(scale=1.0 / context.shape[1]):
            return program(context, *args, **kwargs)

    return scaled


def _save_training_state(amortized, path, optimizer, generator, step) -> None:
    state = {
        **amortized.state(),
        "optimizer": optimizer.get_state(),
        "generator": generator.get_state(),
        "rng": pyro.util.get_rng_state(),
        "step": step,
    }
    write_atomically(path, state)


def _read_state(path) -> dict:
    """Read a guide file, raising a ValueError that names it when it is not one.

    NOTE: ``weights_only=False`` because the training checkpoint stores Pyro's RNG state, which
    contains NumPy arrays, so load only files from a trusted source.
    """
    path = os.fspath(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"amortized guide {path!r} cannot be read ({reason}); write it again with "
            "fit_amortized_guide or `pyro-am icl train`."
        ) from error
    if not isinstance(state, dict) or "config" not in state or "encoder" not in state:
        raise ValueError(
            f"{path!r} is not an amortized guide checkpoint (it lacks 'config' or 'encoder'); "
            "pass the amortized.pt that `pyro-am icl train` writes."
        )
    return state


def _load_training_state(amortized, path, optimizer, generator) -> int:
    state = _read_state(path)
    if state["config"] != amortized.config:
        raise ValueError(
            f"checkpoint {path} contains a guide with {state['config']}, which does not match "
            f"{amortized.config}; build the same guide or start without resume."
        )
    with torch.no_grad():
        amortized.encoder.load_state_dict(state["encoder"])
    optimizer.set_state(state["optimizer"])
    generator.set_state(state["generator"])
    pyro.util.set_rng_state(state["rng"])
    amortized.history = list(state["history"])
    return int(state["step"])


def load_amortized_guide(path, device="cpu") -> AmortizedMixtureGuide:
    """Rebuild a guide saved by :func:`fit_amortized_guide` or from
    :meth:`~pyro_am.models.amortized.AmortizedMixtureGuide.state`."""
    state = _read_state(path)
    return AmortizedMixtureGuide.from_state(state, device=device)


__all__ = ["fit_amortized_guide", "load_amortized_guide"]
