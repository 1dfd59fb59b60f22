"""A set transformer that maps a context set to one feature vector per mixture component.

The encoder reads a set ``D = {x_1 .. x_n}`` in three stages:

* an MLP embeds each point, and pre-norm self-attention blocks over the points update them
  (permutation-equivariant);
* K learned seed vectors attend to the points (pooling by multi-head attention), which makes the
  output invariant to the order of the points; the pooling weights are returned too, so a caller
  can read them as soft assignments of the points to the seeds;
* one self-attention block over the K pooled seeds lets the components coordinate, so that two
  seeds do not describe the same cluster.

No positional encoding is used anywhere, so permuting the context only permutes the rows inside
attention and leaves the output unchanged up to floating-point rounding.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pyro_am._validation import check_int


class _AttentionBlock(nn.Module):
    """Pre-norm multi-head attention of ``queries`` onto ``keys``, followed by an MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.query_norm = nn.LayerNorm(width)
        self.key_norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, need_weights: bool = False):
        keys = self.key_norm(keys)
        attended, weights = self.attention(
            self.query_norm(queries), keys, keys, need_weights=need_weights
        )
        h = queries + attended
        h = h + self.mlp(self.mlp_norm(h))
        return (h, weights) if need_weights else h


class SetEncoder(nn.Module):
    """A permutation-invariant map from a context (B, n, D) to features (B, K, out_features).

    :param int dim: point dimension D.
    :param int num_components: K, the number of learned seeds and of output rows.
    :param int out_features: features per component.
    :param int width: hidden width; must be divisible by ``heads``.
    :param int heads: attention heads.
    :param int depth: self-attention blocks over the points (0 pools the embeddings directly).
    """

    def __init__(
        self,
        dim: int,
        num_components: int,
        out_features: int,
        width: int = 64,
        heads: int = 4,
        depth: int = 2,
    ):
        super().__init__()
        check_int("dim", dim)
        check_int("num_components", num_components)
        check_int("out_features", out_features)
        check_int("width", width)
        check_int("heads", heads)
        check_int("depth", depth, minimum=0)
        if width % heads:
            raise ValueError(f"width must be divisible by heads={heads}, but got width={width}.")
        self.dim = dim
        self.embed = nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, width))
        self.point_blocks = nn.ModuleList(_AttentionBlock(width, heads) for _ in range(depth))
        self.seeds = nn.Parameter(torch.randn(num_components, width) / math.sqrt(width))
        self.pool = _AttentionBlock(width, heads)
        self.seed_block = _AttentionBlock(width, heads)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out_features))

    def forward(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``context`` of shape (B, n, D), n >= 1.

        :returns: the features, shape (B, K, out_features), and the pooling weights of each seed
            over the points averaged over heads, shape (B, K, n), each row summing to one.
        """
        h = self.embed(context)
        for block in self.point_blocks:
            h = block(h, h)
        seeds = self.seeds.expand(context.shape[0], -1, -1)
        pooled, pooling_weights = self.pool(seeds, h, need_weights=True)
        return self.head(self.seed_block(pooled, pooled)), pooling_weights


__all__ = ["SetEncoder"]
