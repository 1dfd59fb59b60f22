"""Minibatch sources for streaming fits: arrays, memory maps, ``.npy`` shards and data loaders.

A streaming fit reads the data only as a sequence of (B, D) batches and, for the DP memory, the
total number of data N, which scales each batch's statistics by ``N / B``. :func:`minibatches`
wraps the supported sources in one interface:

* a NumPy array, a ``numpy.memmap`` or a 2-D tensor: contiguous blocks of ``batch_size`` rows.
  A memory map is read block by block, so peak memory is one batch, not N rows;
* a ``.npy`` file, a folder of ``.npy`` files (read in sorted name order) or a list of paths:
  each file is memory-mapped and cut into blocks that never cross a file boundary;
* any other iterable, such as a :class:`torch.utils.data.DataLoader`: its items are taken as
  batches (the first element of a tuple or list item, so ``(x, label)`` works). N is
  ``len(loader.dataset)`` when the loader has a sized data set, or ``num_data``.

Blocked sources can shuffle the order of the blocks in each epoch, from ``seed`` and the epoch
number, which keeps each read contiguous. Rows inside a block keep their order, so data sorted by
cluster should be shuffled on disk once before streaming.

Under ``torch.distributed`` every rank walks the same blocks in the same order and keeps its own
contiguous part of each block (:func:`pyro_am.distributed.shard_bounds`), so the union of the
ranks' batches at step t is the block a single process would see at step t. An iterable source
cannot be split this way: each rank passes its own loader (for example with a
:class:`torch.utils.data.distributed.DistributedSampler`), and N is the size of the whole data set.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from pyro_am._validation import check_int
from pyro_am.distributed import shard_bounds

logger = logging.getLogger(__name__)


def _as_tensor(rows, dtype, device) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        tensor = rows
    else:
        array = np.asarray(rows)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"a batch must be numeric, but has dtype {array.dtype}.")
        # A read-only memory map is copied into memory here, one batch at a time.
        copy = not array.flags.writeable or not array.flags.c_contiguous
        tensor = torch.from_numpy(np.array(array, order="C") if copy else array)
    if not torch.is_floating_point(tensor):
        tensor = tensor.to(torch.float64)
    return tensor.to(dtype=dtype or tensor.dtype, device=device)


class MinibatchSource:
    """A re-iterable stream of (B, D) batches with a known number of data.

    :ivar num_data: N, the number of data in one epoch over all ranks, or None when an iterable
        source has no sized data set.
    :ivar dim: D, or None until the first batch of an iterable source is read.
    """

    num_data: int
    dim: int | None

    @property
    def num_batches(self) -> int | None:
        """The number of batches in one epoch, or None when the source has no length."""
        return None

    @property
    def reiterable(self) -> bool:
        """Whether :meth:`epoch` may be called more than once."""
        return True

    def epoch(self, epoch: int, rank: int = 0, world_size: int = 1, start: int = 0) -> Iterator:
        """Yield this rank's batches of ``epoch`` as tensors, skipping the first ``start``."""
        raise NotImplementedError


class BlockSource(MinibatchSource):
    """Contiguous blocks of rows from in-memory or memory-mapped 2-D arrays (see the module).

    :param list arrays: 2-D arrays or tensors with the same number of columns.
    :param int batch_size: rows per block (the last block of each array may be shorter).
    :param bool shuffle: visit the blocks in a new random order in every epoch.
    :param int seed: seed of the block order.
    :param dtype: dtype of the yielded tensors; None keeps a float dtype and uses float64 otherwise.
    :param device: device of the yielded tensors.
    """

    def __init__(self, arrays, batch_size, shuffle=False, seed=0, dtype=None, device=None):
        self.arrays = list(arrays)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        if not self.arrays:
            raise ValueError("the minibatch source must contain at least one array, but has none.")
        dims = set()
        for array in self.arrays:
            if len(array.shape) != 2 or array.shape[0] < 1:
                raise ValueError(
                    f"every array must have shape (N, D) with N >= 1, but one has shape "
                    f"{tuple(array.shape)}."
                )
            dims.add(int(array.shape[1]))
        if len(dims) != 1:
            raise ValueError(f"every array must have the same D, but the arrays have {dims}.")
        self.dim = dims.pop()
        self.num_data = sum(int(array.shape[0]) for array in self.arrays)
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.dtype, self.device = dtype, device
        self.blocks = [
            (index, begin, min(begin + self.batch_size, int(array.shape[0])))
            for index, array in enumerate(self.arrays)
            for begin in range(0, int(array.shape[0]), self.batch_size)
        ]

    @property
    def num_batches(self) -> int:
        return len(self.blocks)

    def order(self, epoch: int) -> list[int]:
        """Return the block indices in the order that ``epoch`` visits them."""
        if not self.shuffle:
            return list(range(len(self.blocks)))
        generator = np.random.default_rng([int(self.seed), int(epoch)])
        return generator.permutation(len(self.blocks)).tolist()

    def epoch(self, epoch: int, rank: int = 0, world_size: int = 1, start: int = 0) -> Iterator:
        for block in self.order(epoch)[start:]:
            index, begin, stop = self.blocks[block]
            low, high = shard_bounds(stop - begin, rank, world_size)
            yield _as_tensor(
                self.arrays[index][begin + low : begin + high], self.dtype, self.device
            )


class IterableSource(MinibatchSource):
    """Batches taken from any iterable, such as a :class:`torch.utils.data.DataLoader`.

    :param source: the iterable; an item is a batch or a tuple or list whose first element is.
    :param int num_data: N; None reads ``len(source.dataset)``, and stays None when the source
        has no sized data set.
    """

    def __init__(self, source, num_data=None, dtype=None, device=None):
        self.source = source
        if num_data is None:
            try:
                num_data = len(source.dataset)
            except (AttributeError, TypeError):
                num_data = None
            if num_data == 0:
                raise ValueError(
                    "the source's data set is empty (len(source.dataset) == 0), so there is "
                    "nothing to fit."
                )
        if num_data is not None:
            num_data = check_int("num_data", num_data, minimum=1)
        self.num_data = num_data
        self.dim = None
        self.dtype, self.device = dtype, device

    @property
    def num_batches(self) -> int | None:
        try:
            return len(self.source)
        except TypeError:
            return None

    @property
    def reiterable(self) -> bool:
        return iter(self.source) is not self.source

    def epoch(self, epoch: int, rank: int = 0, world_size: int = 1, start: int = 0) -> Iterator:
        for position, item in enumerate(self.source):
            if position < start:
                continue
            if isinstance(item, (tuple, list)):
                item = item[0]
            batch = _as_tensor(item, self.dtype, self.device)
            if batch.dim() != 2:
                raise ValueError(
                    f"every batch must have shape (B, D), but batch {position} has shape "
                    f"{tuple(batch.shape)}."
                )
            self.dim = batch.shape[1] if self.dim is None else self.dim
            yield batch


def _npy_paths(source) -> list[str] | None:
    """Return the ``.npy`` files that ``source`` names, or None when it names no path."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            paths = sorted(glob.glob(os.path.join(path, "*.npy")))
            if not paths:
                raise FileNotFoundError(f"folder {path!r} contains no .npy files.")
            return paths
        return [path]
    if isinstance(source, (list, tuple)) and source:
        if all(isinstance(item, (str, os.PathLike)) for item in source):
            return [os.fspath(item) for item in source]
    return None


def _open_npy(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard {path!r} not found.")
    try:
        array = np.load(path, mmap_mode="r")
    except ValueError as error:
        raise ValueError(f"shard {path!r} is not a readable .npy array: {error}") from None
    if array.ndim != 2:
        raise ValueError(
            f"shard {path!r} must hold an array of shape (N, D), but has {array.shape}."
        )
    return array


def minibatches(
    source,
    batch_size: int | None = None,
    *,
    num_data: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device=None,
) -> MinibatchSource:
    """Wrap ``source`` as a :class:`MinibatchSource` (the supported sources are in the module).

    :param source: an array, memory map or tensor of shape (N, D); a ``.npy`` path, a folder of
        them or a list of paths; an iterable of batches; or a :class:`MinibatchSource`.
    :param int batch_size: rows per batch, required for arrays and files, unused for iterables.
    :param int num_data: N for an iterable whose ``.dataset`` has no length.
    :param bool shuffle: visit the blocks of an array or file source in a new order every epoch.
    :param int seed: seed of that order.
    :param dtype: dtype of the batches; None keeps the source's float dtype.
    :param device: device of the batches.
    :returns: a :class:`MinibatchSource`.
    """
    if isinstance(source, MinibatchSource):
        return source
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, but got {dtype!r}.")
    paths = _npy_paths(source)
    if paths is not None:
        arrays = [_open_npy(path) for path in paths]
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        arrays = [source]
    elif isinstance(source, Iterable):
        return IterableSource(source, num_data, dtype, device)
    else:
        raise TypeError(
            "source must be an array, a tensor, a .npy path, a list of paths or an iterable of "
            f"batches, but got {type(source).__name__}."
        )
    if batch_size is None:
        raise ValueError("batch_size is required to cut arrays and .npy files into batches.")
    if num_data is not None and num_data != sum(array.shape[0] for array in arrays):
        raise ValueError(
            f"num_data={num_data} does not match the {sum(a.shape[0] for a in arrays)} rows of "
            "the arrays; leave it out for array and file sources."
        )
    return BlockSource(arrays, batch_size, shuffle, seed, dtype, device)


__all__ = ["BlockSource", "IterableSource", "MinibatchSource", "minibatches"]
