"""The data-parallel part of ``pyro-am fit --distributed``, run under ``torchrun``.

``torchrun --nproc-per-node N -m pyro_am fit --distributed ...`` starts N copies of the command.
Rank 0 loads the data set, computes the held-out split and the scaling as a single-process run
does, and builds the memory. It then sends the other ranks a plan, which contains the memory's
constructor arguments, the scaling, the fit settings and the number of patterns. Every rank then
fits its contiguous shard of the training points with ``DPMemory.fit(..., distributed=True)``,
which all-reduces the sufficient statistics (CAVI) or the gradients (SVI), so every rank ends
with the same memory.

The other ranks read only their shard: from a ``.npy`` file given by ``--data`` through a memory
map, and otherwise by loading the data set and keeping their rows. Rank 0 reads the whole data
set, because it scores the memory on all the training and held-out points and writes the outputs;
the other ranks write and print nothing.

The backend is ``nccl`` for ``--device cuda`` (each rank uses ``cuda:LOCAL_RANK``) and ``gloo``
for the CPU. If rank 0 fails before it sends the plan, the other ranks wait for it until the
process group's timeout, unless ``torchrun`` stops them first when rank 0 exits with an error.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict

import numpy as np
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


def _fit_shard(model, local_train: torch.Tensor, settings: dict, progress: bool):
    try:
        return model.fit(
            local_train,
            method=settings["method"],
            max_iter=settings["max_iter"],
            progress=progress,
            seed=settings["seed"],
            distributed=True,
        )
    finally:
        # Nothing after the fit is a collective, so the ranks leave the group here.
        distributed.shutdown()


def fit_memory_sharded(train, settings, scaling, num_patterns, progress=True):
    """Fit a DP memory from rank 0, which has all the training points, with the other ranks.

    Sends the plan that :func:`run_worker` reads, then fits rank 0's block of rows
    (:func:`pyro_am.distributed.shard_bounds`).

    :returns: ``(model, fit_result)``.
    """
    from pyro_am.commands.fit import build_memory

    world_size = distributed.get_world_size()
    if train.shape[0] < world_size:
        distributed.broadcast_object({"error": "too few training points"}, 0)
        raise UsageError(
            f"--distributed needs at least one training point per rank, but there are "
            f"{train.shape[0]} points for {world_size} ranks."
        )
    model = build_memory(train, settings)
    plan = {
        "config": model.config(),
        "settings": settings,
        "scaling": asdict(scaling),
        "num_patterns": int(num_patterns),
        "num_train": int(train.shape[0]),
    }
    distributed.broadcast_object(plan, 0)
    start, stop = distributed.shard_bounds(train.shape[0], 0, world_size)
    return model, _fit_shard(model, train[start:stop], settings, progress)


def read_training_rows(args, index: np.ndarray) -> np.ndarray:
    """Read the patterns at the sorted row ``index`` as float64, without the other rows if the
    data set is a ``.npy`` file."""
    if args.data is not None and os.fspath(args.data).lower().endswith(".npy"):
        array = np.load(args.data, mmap_mode="r", allow_pickle=False)
        return np.asarray(array[index]).astype(np.float64)
    from pyro_am.commands.fit import load_data

    return load_data(args).data[index]


def run_worker(args, device: torch.device) -> int:
    """Fit this rank's shard for rank 0's plan (see the module); returns the exit status 0."""
    from pyro_am.commands.fit import Scaling, split_held_out
    from pyro_am.models import DPMemory

    plan = distributed.broadcast_object(None, 0)
    if "error" in plan:
        distributed.shutdown()
        raise UsageError(f"rank 0 stopped before the fit: {plan['error']}.")
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    train_index, _ = split_held_out(plan["num_patterns"], args.held_out_fraction, args.seed)
    if len(train_index) != plan["num_train"]:
        distributed.shutdown()
        raise UsageError(
            f"rank {rank} computed {len(train_index)} training points but rank 0 has "
            f"{plan['num_train']}; give every rank the same --held-out-fraction and --seed."
        )
    start, stop = distributed.shard_bounds(len(train_index), rank, world_size)
    rows = Scaling(**plan["scaling"]).transform(read_training_rows(args, train_index[start:stop]))
    local_train = torch.as_tensor(rows, dtype=torch.float32, device=device)
    model = DPMemory(**plan["config"])
    _fit_shard(model, local_train, plan["settings"], progress=False)
    logger.info("rank %d fitted %d training points and writes nothing", rank, stop - start)
    return 0
