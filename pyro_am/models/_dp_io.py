"""Persistence of a DP memory: its configuration and state as dicts, and atomic writes.

The state is a dict with the keys ``format`` (1), ``config`` (the constructor arguments),
``parameters`` (the variational parameters) and ``memory_counts``. It holds only plain values and
tensors, so :func:`torch.load` reads it back with ``weights_only=True``. These functions are the
bodies of :meth:`~pyro_am.models.DPMemory.config`, :meth:`~pyro_am.models.DPMemory.state` and
:meth:`~pyro_am.models.DPMemory.load_state`.
"""

from __future__ import annotations

import os
import tempfile

import torch

from pyro_am.models import _dp_cavi as cavi


def config(memory) -> dict:
    """Return the constructor arguments, enough to rebuild an unfitted copy."""
    return {
        "dim": memory.dim,
        "truncation": memory.truncation,
        "concentration": memory.concentration,
        "discount": memory.discount,
        "prior_mean": memory.prior_mean.clone(),
        "prior_scale": memory.prior_scale.clone(),
        "scale": None if memory.learn_scale else memory.fixed_scale.clone(),
        "covariance": memory.covariance,
        "per_memory_scale": memory.per_memory_scale,
        "scale_prior": memory.scale_prior,
        "assignment": memory.assignment,
        "grow_threshold": memory.grow_threshold,
        "prune_threshold": memory.prune_threshold,
        "max_truncation": memory.max_truncation,
    }


def state(memory) -> dict:
    """Return the configuration, the variational parameters and the counts as one dict."""
    return {
        "format": 1,
        "config": memory.config(),
        "parameters": memory.variational_parameters(),
        "memory_counts": memory.memory_counts.clone(),
    }


def load_state(memory, state: dict) -> None:
    """Set the variational parameters and counts from :func:`state`'s output."""
    parameters = state["parameters"]
    if memory.learn_scale:
        variance = memory._to_internal(parameters["noise_scale"].square())
    else:
        variance = memory._to_internal(memory.fixed_scale.to(parameters["memory_loc"]).square())
    memory._write_posterior(
        cavi.Posterior(
            parameters["stick_concentration1"],
            parameters["stick_concentration0"],
            parameters["memory_loc"],
            parameters["memory_scale"],
            variance,
        )
    )
    memory.memory_counts = state["memory_counts"].clone()


def atomic_save(obj, path) -> None:
    """Save ``obj`` with :func:`torch.save` to a temporary file, then rename it onto ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(obj, stream)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
