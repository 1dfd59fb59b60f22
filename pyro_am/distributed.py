"""Process-group helpers on :mod:`torch.distributed`, for sharded memories and data-parallel fits.

pyro_am scales past one process through PyTorch's own engine: ``torchrun`` starts P processes and
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, and
:func:`init_from_env` joins them into one process group (``gloo`` for CPU tensors, ``nccl`` for CUDA
tensors). Two collective patterns cover everything the library reduces:

* sums of sufficient statistics and gradients, ``S = sum_r S_r`` (:func:`all_reduce_sum`), which
  are exact up to the order of floating-point additions;
* an ordered gather (:func:`all_gather_tensor`), after which every rank runs the same combination
  on the same inputs, so every rank gets a bitwise-identical result. Sharded retrieval uses it for
  the softmax statistics, because the decisions made from them (which queries converged) must not
  differ between ranks.

Without an initialized process group every helper acts as the one-process identity (rank 0 of 1),
so the same code runs under ``torchrun`` and in a plain ``python`` process.
:func:`launch_local` starts P processes on the loopback interface, for tests and benchmarks.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyro_am._validation import check_int

logger = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")
_ENVIRONMENT = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def is_initialized() -> bool:
    """Return whether a default process group with more than zero ranks is active."""
    return dist.is_available() and dist.is_initialized()


def get_rank(group=None) -> int:
    """Return this process's rank in ``group``, or 0 without a process group."""
    return dist.get_rank(group) if is_initialized() else 0


def get_world_size(group=None) -> int:
    """Return the number of processes in ``group``, or 1 without a process group."""
    return dist.get_world_size(group) if is_initialized() else 1


def default_backend(device: torch.device | str | None = None) -> str:
    """Return ``"nccl"`` for a CUDA device and ``"gloo"`` otherwise."""
    device = torch.device("cpu" if device is None else device)
    return "nccl" if device.type == "cuda" else "gloo"


def init_from_env(backend: str | None = None, timeout_seconds: float = 300.0) -> tuple[int, int]:
    """Join the process group described by the ``torchrun`` environment variables.

    With ``backend=None`` the backend is ``nccl`` when CUDA is available and ``gloo`` otherwise.
    With ``nccl`` the current CUDA device is set to ``LOCAL_RANK``, so each process drives its own
    GPU. Calling it when the group already exists returns the existing rank and world size.

    :param str backend: ``"gloo"``, ``"nccl"`` or None.
    :param float timeout_seconds: how long collectives wait for the other ranks before failing.
    :returns: ``(rank, world_size)``.
    :raises RuntimeError: if an environment variable that ``torchrun`` sets is missing.
    """
    if is_initialized():
        return get_rank(), get_world_size()
    missing = [name for name in _ENVIRONMENT if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"the environment variables {', '.join(missing)} are not set; launch with "
            "'torchrun --nproc-per-node N ...', which sets them."
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, but got {backend!r}.")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds))
    rank, world_size = get_rank(), get_world_size()
    logger.info("joined process group: rank %d of %d, backend %s", rank, world_size, backend)
    return rank, world_size


def collective_device(group=None) -> torch.device:
    """Return where small bookkeeping tensors must live for collectives: the current CUDA device
    under ``nccl`` (which reduces CUDA tensors only), the CPU otherwise."""
    if is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier(group=None) -> None:
    """Wait until every rank of ``group`` reaches this call (a no-op without a process group)."""
    if get_world_size(group) > 1:
        flag = torch.zeros(1, device=collective_device(group))
        dist.all_reduce(flag, group=group)


def shutdown() -> None:
    """Destroy the default process group if one is active."""
    if is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensors: list[torch.Tensor], group=None) -> list[torch.Tensor]:
    """Sum each tensor over the ranks and return the sums (the inputs are left unchanged).

    The tensors are flattened into one buffer per dtype, so the reduction costs one collective
    per dtype. Without a process group the inputs are returned as copies.
    """
    results = [tensor.detach().clone() for tensor in tensors]
    if get_world_size(group) == 1:
        return results
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, tensor in enumerate(results):
        by_dtype.setdefault(tensor.dtype, []).append(index)
    for indices in by_dtype.values():
        flat = torch.cat([results[i].reshape(-1) for i in indices])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for i in indices:
            count = results[i].numel()
            results[i] = flat[offset : offset + count].reshape(results[i].shape)
            offset += count
    return results


def all_reduce_max(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Return the elementwise maximum of ``tensor`` over the ranks."""
    result = tensor.detach().clone()
    if get_world_size(group) > 1:
        dist.all_reduce(result, op=dist.ReduceOp.MAX, group=group)
    return result


def all_gather_tensor(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Gather one tensor of the same shape from every rank, in rank order.

    :raises ValueError: if the ranks pass tensors of different shapes.
    """
    tensor = tensor.detach().contiguous()
    world_size = get_world_size(group)
    if world_size == 1:
        return [tensor.clone()]
    shape = torch.tensor(list(tensor.shape), dtype=torch.long, device=tensor.device)
    low = shape.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    high = all_reduce_max(shape, group)
    if not (torch.equal(low, shape) and torch.equal(high, shape)):
        raise ValueError(
            f"all_gather_tensor needs the same shape on every rank, but rank {get_rank(group)} "
            f"has {tuple(tensor.shape)} and the shapes range from {low.tolist()} to "
            f"{high.tolist()}."
        )
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor, group=group)
    return parts


def all_gather_object(value, group=None) -> list:
    """Gather one picklable object from every rank, in rank order (small objects only)."""
    world_size = get_world_size(group)
    if world_size == 1:
        return [value]
    parts = [None] * world_size
    dist.all_gather_object(parts, value, group=group)
    return parts


def broadcast_object(value, source: int = 0, group=None):
    """Return ``value`` from rank ``source`` on every rank."""
    if get_world_size(group) == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=source, group=group)
    return box[0]


def all_reduce_gradients(parameters, group=None, average: bool = True) -> None:
    """Sum (or average) the ``.grad`` of each parameter over the ranks, in place.

    A parameter without a gradient on this rank contributes zeros, so every rank takes part in the
    same collectives even when some parameters were unused locally.
    """
    parameters = [parameter for parameter in parameters if parameter.requires_grad]
    world_size = get_world_size(group)
    if world_size == 1 or not parameters:
        return
    gradients = [
        torch.zeros_like(parameter) if parameter.grad is None else parameter.grad
        for parameter in parameters
    ]
    reduced = all_reduce_sum(gradients, group)
    for parameter, gradient in zip(parameters, reduced, strict=True):
        parameter.grad = gradient / world_size if average else gradient


def shard_bounds(num_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """Return the ``[start, stop)`` rows of ``num_items`` held by ``rank`` of ``world_size``.

    The rows are split into contiguous blocks whose sizes differ by at most one, the larger blocks
    first, so rank r's rows follow rank r - 1's.
    """
    num_items = check_int("num_items", num_items, minimum=0)
    world_size = check_int("world_size", world_size, minimum=1)
    rank = check_int("rank", rank, minimum=0, maximum=world_size - 1)
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free when checked.

    Another process may take it before it is used, which makes the rendezvous fail loudly.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _loopback_interface() -> str | None:
    """Return the name of the loopback interface (``lo`` on Linux, ``lo0`` on macOS), or None."""
    try:
        names = {name for _, name in socket.if_nameindex()}
    except OSError:
        return None
    return next((name for name in ("lo", "lo0") if name in names), None)


def _local_worker(rank, world_size, port, function, args, result_dir, backend, timeout_seconds):
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    loopback = _loopback_interface()
    if loopback is not None:
        # Keep gloo's own connections on the loopback interface too.
        os.environ["GLOO_SOCKET_IFNAME"] = loopback
    torch.set_num_threads(1)
    init_from_env(backend, timeout_seconds=timeout_seconds)
    try:
        result = function(rank, world_size, *args)
        torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        shutdown()


def launch_local(
    function,
    world_size: int,
    args: tuple = (),
    backend: str = "gloo",
    timeout_seconds: float = 300.0,
) -> list:
    """Run ``function(rank, world_size, *args)`` in ``world_size`` processes on 127.0.0.1.

    Each process joins a process group on a free loopback port, runs ``function`` with one
    intra-op thread, and sends its return value back through :func:`torch.save`, so the value must
    be picklable by :mod:`torch`. ``function`` must be defined at module level, because the
    processes are started with the ``spawn`` method and import it by name. This is how the tests
    and benchmarks run several ranks on one machine. Production runs use ``torchrun``.

    :param float timeout_seconds: the processes are terminated and :class:`TimeoutError` is
        raised when they have not all finished after this long; collectives inside them also
        fail after this long instead of waiting for a missing rank.
    :returns: the return values, in rank order.
    :raises torch.multiprocessing.ProcessRaisedException: if a process fails.
    """
    world_size = check_int("world_size", world_size, minimum=1)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, but got {backend!r}.")
    if not timeout_seconds > 0:
        raise ValueError(f"timeout_seconds must be positive, but got {timeout_seconds!r}.")
    port = find_free_port()
    with tempfile.TemporaryDirectory(prefix="pyro_am_launch_") as result_dir:
        context = mp.spawn(
            _local_worker,
            args=(world_size, port, function, args, result_dir, backend, timeout_seconds),
            nprocs=world_size,
            join=False,
        )
        deadline = time.monotonic() + timeout_seconds
        while not context.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.terminate()
                for process in context.processes:
                    process.join(5.0)
                raise TimeoutError(
                    f"the {world_size} local processes did not finish within {timeout_seconds} s "
                    "and were terminated."
                )
        return [
            torch.load(os.path.join(result_dir, f"rank{rank}.pt"), weights_only=False)
            for rank in range(world_size)
        ]


__all__ = [
    "BACKENDS",
    "all_gather_object",
    "all_gather_tensor",
    "all_reduce_gradients",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "collective_device",
    "default_backend",
    "find_free_port",
    "get_rank",
    "get_world_size",
    "init_from_env",
    "is_initialized",
    "launch_local",
    "shard_bounds",
    "shutdown",
]
