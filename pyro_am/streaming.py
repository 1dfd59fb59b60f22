"""Streamed log-sum-exp and softmax-weighted sums over a bank of memories.

Every energy in :mod:`pyro_am.energies` has logits that are affine in a feature map of the query::

    logits[b, n] = features[b] . keys[n] + bias[n]

(for a Gaussian kernel, ``features = x``, ``keys = m / h^2`` and ``bias = -|m|^2 / (2 h^2)``; the
``-|x|^2 / (2 h^2)`` term depends on the query alone and is added afterwards). The functions here
evaluate ``log sum_n exp(logits[b, n])`` and ``sum_n softmax_n(logits[b]) values[n]`` in blocks of
queries and memories, rescaling running sums by the running maximum as in streamed softmax, so the
largest temporary is one block of ``query_chunk x memory_chunk`` logits rather than
``num_queries x num_memories``.

Chunk policy: a block holds at most ``block_elements`` logits (default ``2**22``, which is 16 MiB
in float32). Queries are taken whole unless that would leave fewer than 1024 memories a block, and
the memory chunk fills the rest of the block. This keeps each GEMM large enough to run near peak
speed while peak memory stays O(block), independent of N. A ``block_elements`` below 1024 gives
one query a block and ``block_elements`` memories, so the bound on the block always holds.

Shifted logits are clamped from below at ``log(tiny) + 1``, with ``tiny`` the dtype's smallest
normal number, before they are exponentiated. The shifted maximum is 0, so every normalizer is at
least 1, and a clamped term adds at most ``e * tiny`` to it (about 3e-38 in float32), far below one
unit in the last place. The clamp keeps ``exp`` out of the underflow range, where PyTorch's CPU
kernel was measured 10 to 40 times slower (PyTorch 2.13, x86_64) than for moderate arguments.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

DEFAULT_BLOCK_ELEMENTS = 1 << 22
MIN_MEMORY_CHUNK = 1024


class SoftmaxStatistics(NamedTuple):
    """Partial softmax statistics of one block of memories, in a form that combines exactly.

    ``maximum[b]`` is the largest logit seen,
    ``normalizer[b] = sum_n exp(logits[b, n] - maximum[b])`` and
    ``weighted[b] = sum_n exp(logits[b, n] - maximum[b]) values[n]``. Two sets of statistics over
    disjoint memory sets combine with :func:`combine_statistics`, which is how a memory bank split
    across devices or processes is reduced.
    """

    maximum: torch.Tensor
    normalizer: torch.Tensor
    weighted: torch.Tensor | None

    def logsumexp(self) -> torch.Tensor:
        return self.maximum + self.normalizer.log()

    def mean(self) -> torch.Tensor:
        if self.weighted is None:
            raise ValueError("these statistics were computed without values, so they have no mean.")
        return self.weighted / self.normalizer.unsqueeze(-1)


def chunk_sizes(
    num_queries: int, num_memories: int, block_elements: int | None = None
) -> tuple[int, int]:
    """Return ``(query_chunk, memory_chunk)`` for the block policy described in the module."""
    block = DEFAULT_BLOCK_ELEMENTS if block_elements is None else int(block_elements)
    if block < 1:
        raise ValueError(f"block_elements must be a positive integer, but got {block_elements!r}.")
    min_memories = min(num_memories, MIN_MEMORY_CHUNK)
    query_chunk = max(1, min(num_queries, block // max(min_memories, 1)))
    memory_chunk = max(1, min(num_memories, block // query_chunk))
    return query_chunk, memory_chunk


def _block_statistics(
    features: torch.Tensor,
    keys: torch.Tensor,
    bias: torch.Tensor,
    values: torch.Tensor | None,
    memory_chunk: int,
) -> SoftmaxStatistics:
    num_memories = keys.shape[0]
    floor = math.log(torch.finfo(features.dtype).tiny) + 1.0
    maximum = normalizer = weighted = None
    for start in range(0, num_memories, memory_chunk):
        stop = min(start + memory_chunk, num_memories)
        logits = torch.addmm(bias[start:stop], features, keys[start:stop].T)
        # The running maximum only stabilizes the exponentials, so it carries no gradient.
        block_max = logits.detach().amax(dim=1)
        if maximum is None:
            new_max = block_max
        else:
            new_max = torch.maximum(maximum, block_max)
        # In place: the addmm output is not needed by autograd, and exp_ keeps its own result.
        probabilities = logits.sub_(new_max.unsqueeze(1)).clamp_min_(floor).exp_()
        block_sum = probabilities.sum(dim=1)
        block_weighted = None if values is None else probabilities @ values[start:stop]
        if maximum is None:
            normalizer, weighted = block_sum, block_weighted
        else:
            rescale = torch.exp(maximum - new_max)
            normalizer = normalizer * rescale + block_sum
            if values is not None:
                weighted = torch.addcmul(block_weighted, weighted, rescale.unsqueeze(1))
        maximum = new_max
    return SoftmaxStatistics(maximum, normalizer, weighted)


def _check_operands(features, keys, bias, values) -> None:
    if features.dim() != 2 or keys.dim() != 2 or features.shape[1] != keys.shape[1]:
        raise ValueError(
            "features and keys must have shapes (B, F) and (N, F), but have shapes "
            f"{tuple(features.shape)} and {tuple(keys.shape)}."
        )
    if keys.shape[0] < 1:
        raise ValueError(f"keys must hold at least one memory, but has shape {tuple(keys.shape)}.")
    if bias.shape != keys.shape[:1]:
        raise ValueError(
            f"bias must have shape ({keys.shape[0]},) to match keys, but has shape "
            f"{tuple(bias.shape)}."
        )
    if values is not None and (values.dim() != 2 or values.shape[0] != keys.shape[0]):
        raise ValueError(
            f"values must have shape ({keys.shape[0]}, V) to match keys, but has shape "
            f"{tuple(values.shape)}."
        )


def softmax_statistics(
    features: torch.Tensor,
    keys: torch.Tensor,
    bias: torch.Tensor,
    values: torch.Tensor | None = None,
    block_elements: int | None = None,
) -> SoftmaxStatistics:
    """Compute streamed softmax statistics of ``features @ keys.T + bias`` over the memories.

    :param torch.Tensor features: query features of shape (B, F).
    :param torch.Tensor keys: memory keys of shape (N, F).
    :param torch.Tensor bias: per-memory offsets of shape (N,).
    :param torch.Tensor values: optional per-memory values of shape (N, V) to average.
    :param int block_elements: the largest number of logits held at once.
    :returns: :class:`SoftmaxStatistics` with tensors of shape (B,) and (B, V).
    """
    _check_operands(features, keys, bias, values)
    num_queries, num_memories = features.shape[0], keys.shape[0]
    query_chunk, memory_chunk = chunk_sizes(num_queries, num_memories, block_elements)
    if query_chunk >= num_queries:
        return _block_statistics(features, keys, bias, values, memory_chunk)
    parts = [
        _block_statistics(features[start : start + query_chunk], keys, bias, values, memory_chunk)
        for start in range(0, num_queries, query_chunk)
    ]
    return SoftmaxStatistics(
        torch.cat([part.maximum for part in parts]),
        torch.cat([part.normalizer for part in parts]),
        None if values is None else torch.cat([part.weighted for part in parts]),
    )


def combine_statistics(parts: list[SoftmaxStatistics]) -> SoftmaxStatistics:
    """Combine statistics computed over disjoint sets of memories into those of their union."""
    if not parts:
        raise ValueError("parts must contain at least one SoftmaxStatistics, but it is empty.")
    with_values = [part.weighted is not None for part in parts]
    if any(with_values) and not all(with_values):
        raise ValueError(
            "parts must all carry weighted values or all omit them, but "
            f"{with_values.count(False)} of {len(parts)} have weighted=None."
        )
    maximum = torch.stack([part.maximum for part in parts]).amax(dim=0)
    normalizer = torch.zeros_like(maximum)
    weighted = None
    for part in parts:
        rescale = torch.exp(part.maximum - maximum)
        normalizer = normalizer + part.normalizer * rescale
        if part.weighted is not None:
            term = part.weighted * rescale.unsqueeze(-1)
            weighted = term if weighted is None else weighted + term
    return SoftmaxStatistics(maximum, normalizer, weighted)


__all__ = [
    "DEFAULT_BLOCK_ELEMENTS",
    "SoftmaxStatistics",
    "chunk_sizes",
    "combine_statistics",
    "softmax_statistics",
]
