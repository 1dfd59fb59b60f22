"""The data-parallel part of ``pyro-am fit --distributed``, run under ``torchrun``.

``torchrun --nproc-per-node N -m pyro_am fit --distributed ...`` starts N copies of the command.
Each rank loads the data set and computes the same held-out split and scaling as a single-process
run, keeps its contiguous shard of the training points, and fits with
``DPMemory.fit(..., distributed=True)``, which all-reduces the sufficient statistics (CAVI) or the
gradients (SVI). Every rank ends with the same memory. Rank 0 then scores it on all the training
and held-out points and writes the outputs, and the other ranks write and print nothing.

The backend is ``nccl`` for ``--device cuda`` (each rank uses ``cuda:LOCAL_RANK``) and ``gloo``
for the CPU.
"""

from __future__ import annotations

import logging
import os

import torch

from pyro_am import distributed
from pyro_am.cli import UsageError

logger = logging.getLogger(__name__)


def join_process_group(device: torch.device) -> tuple[int, int, torch.device]:
    """Join the ``torchrun`` process group; returns ``(rank, world_size, device)``.

    :raises UsageError: if the command was not started by ``torchrun``.
    """
    backend = distributed.default_backend(device)
    try:
        rank, world_size = distributed.init_from_env(backend)
    except RuntimeError as error:
        raise UsageError(f"--distributed needs a torchrun launch: {error}") from None
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    logger.info("rank %d of %d fits on %s with %s", rank, world_size, device, backend)
    return rank, world_size, device


def fit_memory_sharded(train: torch.Tensor, settings: dict, progress: bool = True):
    """Fit a DP memory to ``train`` split across the ranks; returns ``(model, fit_result)``.

    Every rank passes all the training points, so the prior (centred on their mean) is the same
    everywhere, and fits only its block of rows (:func:`pyro_am.distributed.shard_bounds`).
    """
    from pyro_am.commands.fit import build_memory

    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    if train.shape[0] < world_size:
        raise UsageError(
            f"--distributed needs at least one training point per rank, but there are "
            f"{train.shape[0]} points for {world_size} ranks."
        )
    start, stop = distributed.shard_bounds(train.shape[0], rank, world_size)
    model = build_memory(train, settings)
    try:
        result = model.fit(
            train[start:stop],
            method=settings["method"],
            max_iter=settings["max_iter"],
            progress=progress and rank == 0,
            seed=settings["seed"],
            distributed=True,
        )
    finally:
        # Nothing after the fit is a collective, so the ranks leave the group here.
        distributed.shutdown()
    return model, result
