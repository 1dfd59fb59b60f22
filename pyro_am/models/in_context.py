"""In-context energies: a transformer maps a context set D and a query x to an energy E(x | D).

The parameters are pretrained on many data sets and then stay fixed, so a new context changes the
energy landscape without any fitting. The network is a pre-norm transformer without positional
encodings. Context points and queries are embedded by the same linear map, queries also get a
learned query embedding, and every block computes ``h <- h + Attn(LN(h))`` and
``h <- h + MLP(LN(h))``. A final LayerNorm and a linear head turn each query's state into a scalar
energy.

Two attention patterns are available:

* ``mode="causal"``: context position i attends to positions j <= i. A query evaluated against the
  prefix of length p attends to the context positions j < p and to itself. A query therefore never
  attends to another query, and ``E(x | x_<p)`` is computed for every prefix p in one pass.
* ``mode="set"``: every context point attends to every context point and a query attends to the
  whole context and itself. The energy is invariant to permutations of the context.

Because context tokens never attend to queries, their keys and values per block are computed once
(:meth:`InContextEnergy.encode_context`) and reused for every query and every Langevin step.
Queries then cost O(num_queries x n) per block, not O((n + num_queries)^2).

Sampling uses unadjusted Langevin dynamics on ``E(. | D)``, with the conventions of
:func:`pyro_am.dynamics.retrieve`::

    x <- x - eta * clamp(grad_x E(x | D), -c, c) + sqrt(2 eta T) * eps,   eps ~ N(0, I)

for every chain, prefix and data set at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pyro_am._validation import check_finite, check_int, check_interval, check_positive

MODES = ("causal", "set")


class NonFiniteEnergyError(RuntimeError):
    """An energy or its gradient became NaN or infinite during Langevin sampling."""


@dataclass
class ContextCache:
    """Keys and values of the context tokens in every block, from
    :meth:`InContextEnergy.encode_context`.

    :ivar keys: one tensor of shape (B, heads, n, width / heads) per block.
    :ivar values: same shapes as ``keys``.
    :ivar num_points: the context size n.
    """

    keys: list
    values: list
    num_points: int

    def detach(self) -> ContextCache:
        """Return a copy cut from the autograd graph, for sampling without parameter gradients."""
        keys = [k.detach() for k in self.keys]
        values = [v.detach() for v in self.values]
        return ContextCache(keys, values, self.num_points)


class _Block(nn.Module):
    """A pre-norm transformer block whose attention keeps context and queries in two streams."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.attention_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width),
            nn.GELU(),
            nn.Linear(mlp_ratio * width, width),
            nn.Dropout(dropout),
        )

    def _split(self, h):
        batch, length, _ = h.shape
        q, k, v = self.qkv(self.attention_norm(h)).chunk(3, dim=-1)
        shape = (batch, length, self.heads, self.head_dim)
        return [t.reshape(shape).transpose(1, 2) for t in (q, k, v)]

    def _merge(self, attended):
        batch, _, length, _ = attended.shape
        return self.out(attended.transpose(1, 2).reshape(batch, length, -1))

    def context_forward(self, h, causal: bool):
        """Update the context stream; returns the new states and this block's keys and values."""
        q, k, v = self._split(h)
        attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        h = h + self._merge(attended)
        h = h + self.mlp(self.mlp_norm(h))
        return h, k, v

    def query_forward(self, h, context_keys, context_values, visible):
        """Update the query stream: each query attends to the visible context tokens and itself.

        :param torch.Tensor visible: boolean mask of shape (Q, n), or None for the whole context.
        """
        q, k, v = self._split(h)
        scale = 1.0 / math.sqrt(self.head_dim)
        context_logits = (q @ context_keys.transpose(-1, -2)) * scale
        if visible is not None:
            context_logits = context_logits.masked_fill(~visible, -math.inf)
        self_logits = (q * k).sum(-1, keepdim=True) * scale
        weights = torch.softmax(torch.cat([context_logits, self_logits], dim=-1), dim=-1)
        attended = weights[..., :-1] @ context_values + weights[..., -1:] * v
        h = h + self._merge(attended)
        h = h + self.mlp(self.mlp_norm(h))
        return h


class InContextEnergy(nn.Module):
    """A transformer energy ``E_theta(x | D)`` that conditions on a context set in its input.

    Pretrain it with :func:`pyro_am.models.icl_training.train_in_context_energy` on a family of
    data sets (:mod:`pyro_am.families`), then call it on a new context::

        energy = InContextEnergy(dim=2, width=64, depth=2, heads=4, mode="causal")
        values = energy(context, queries)              # (B, n + 1, m): every prefix at once
        samples = energy.langevin(context, x0)         # Langevin on E(. | D)

    The energy is unnormalized, and ``exp(-E(x | D))`` is integrable on R^D only with
    ``confinement_std`` set. It is then a density up to a constant that depends on D.

    :param int dim: dimension D of the points.
    :param int width: model width; must be divisible by ``heads``.
    :param int depth: number of transformer blocks.
    :param int heads: number of attention heads.
    :param str mode: ``"causal"`` or ``"set"`` (see the module docstring).
    :param int mlp_ratio: hidden width of each block's MLP, as a multiple of ``width``.
    :param float dropout: dropout after each MLP, in [0, 1).
    :param float confinement_std: if given, ``|x|^2 / (2 confinement_std^2)`` is added to every
        energy. The final LayerNorm bounds the network's output, so without this term
        ``exp(-E(. | D))`` tends to a positive constant far from the data and is not integrable on
        R^D. With it, ``exp(-E)`` is bounded by a Gaussian and is a proper unnormalized density.
    """

    def __init__(
        self,
        dim: int = 2,
        width: int = 128,
        depth: int = 6,
        heads: int = 8,
        mode: str = "causal",
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        confinement_std: float | None = None,
    ):
        super().__init__()
        self.dim = check_int("dim", dim)
        self.width = check_int("width", width)
        self.depth = check_int("depth", depth)
        self.heads = check_int("heads", heads)
        if width % heads:
            raise ValueError(f"width must be divisible by heads={heads}, but got width={width}.")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, but got {mode!r}.")
        self.mode = mode
        self.mlp_ratio = check_int("mlp_ratio", mlp_ratio)
        self.dropout = float(check_interval("dropout", dropout, 0.0, 1.0))
        if confinement_std is not None:
            confinement_std = float(check_positive("confinement_std", confinement_std))
        self.confinement_std = confinement_std
        self.embed = nn.Linear(dim, width)
        self.query_embedding = nn.Parameter(torch.zeros(width))
        nn.init.normal_(self.query_embedding, std=0.02)
        self.blocks = nn.ModuleList(
            _Block(width, heads, self.mlp_ratio, self.dropout) for _ in range(depth)
        )
        self.final_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1)

    @property
    def config(self) -> dict:
        """The constructor arguments, enough to rebuild the module before loading a state dict."""
        return {
            "dim": self.dim,
            "width": self.width,
            "depth": self.depth,
            "heads": self.heads,
            "mode": self.mode,
            "mlp_ratio": self.mlp_ratio,
            "dropout": self.dropout,
            "confinement_std": self.confinement_std,
        }

    def _check_points(self, name, x, rank):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, but got {type(x).__name__}.")
        if x.dim() != rank or x.shape[-1] != self.dim:
            expected = "(B, n, D)" if rank == 3 else "(B, P, m, D)"
            raise ValueError(
                f"{name} must have shape {expected} with D={self.dim}, but has shape "
                f"{tuple(x.shape)}."
            )
        parameter = self.embed.weight
        if x.dtype != parameter.dtype or x.device != parameter.device:
            raise ValueError(
                f"{name} has dtype {x.dtype} on {x.device}, but the model has dtype "
                f"{parameter.dtype} on {parameter.device}; move one of them with .to()."
            )
        return check_finite(name, x)

    def encode_context(self, context: torch.Tensor) -> ContextCache:
        """Run the context stream and keep each block's keys and values.

        :param torch.Tensor context: shape (B, n, D); n may be 0.
        """
        self._check_points("context", context, 3)
        h = self.embed(context)
        keys, values = [], []
        for block in self.blocks:
            if context.shape[1] == 0:
                shape = (context.shape[0], self.heads, 0, self.width // self.heads)
                empty = h.new_zeros(shape)
                keys.append(empty)
                values.append(empty)
                continue
            h, k, v = block.context_forward(h, causal=self.mode == "causal")
            keys.append(k)
            values.append(v)
        return ContextCache(keys, values, context.shape[1])

    def query_energy(
        self,
        cache: ContextCache,
        queries: torch.Tensor,
        prefix_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute the energies of queries given an encoded context.

        In set mode ``queries`` has shape (B, m, D) and the result (B, m).

        In causal mode ``queries`` of shape (B, m, D) is evaluated against every prefix length
        p = 0 .. n and the result has shape (B, n + 1, m). Queries of shape (B, P, m, D) are
        evaluated with ``queries[:, i]`` against the prefix of length ``prefix_lengths[i]``
        (default ``i``) and the result has shape (B, P, m).

        :param torch.Tensor prefix_lengths: int64 tensor of shape (P,) with entries in [0, n].
        """
        n = cache.num_points
        if not isinstance(queries, torch.Tensor):
            raise TypeError(f"queries must be a torch.Tensor, but got {type(queries).__name__}.")
        if self.mode == "set":
            self._check_points("queries", queries, 3)
            return self._run_queries(cache, queries, visible=None)

        if queries.dim() == 3:
            self._check_points("queries", queries, 3)
            queries = queries.unsqueeze(1).expand(-1, n + 1, -1, -1)
        self._check_points("queries", queries, 4)
        batch, num_prefixes, num_queries, _ = queries.shape
        if prefix_lengths is None:
            prefix_lengths = torch.arange(num_prefixes, device=queries.device)
        prefix_lengths = torch.as_tensor(prefix_lengths, device=queries.device)
        if prefix_lengths.shape != (num_prefixes,):
            raise ValueError(
                f"prefix_lengths must have shape ({num_prefixes},) to match queries, but has "
                f"shape {tuple(prefix_lengths.shape)}."
            )
        if bool((prefix_lengths < 0).any()) or bool((prefix_lengths > n).any()):
            raise ValueError(
                f"prefix_lengths must lie in [0, {n}] for a context of {n} points, but got "
                f"values from {int(prefix_lengths.min())} to {int(prefix_lengths.max())}."
            )
        prefix = prefix_lengths.repeat_interleave(num_queries)
        visible = torch.arange(n, device=queries.device) < prefix.unsqueeze(-1)
        flat = queries.reshape(batch, num_prefixes * num_queries, self.dim)
        energies = self._run_queries(cache, flat, visible)
        return energies.reshape(batch, num_prefixes, num_queries)

    def full_context_energy(self, cache: ContextCache, queries: torch.Tensor) -> torch.Tensor:
        """Energies of queries (B, m, D) given the whole context, shape (B, m), in either mode."""
        if self.mode == "set":
            return self.query_energy(cache, queries)
        self._check_points("queries", queries, 3)
        lengths = torch.tensor([cache.num_points], device=queries.device)
        return self.query_energy(cache, queries.unsqueeze(1), lengths).squeeze(1)

    def _run_queries(self, cache, queries, visible):
        h = self.embed(queries) + self.query_embedding
        for block, keys, values in zip(self.blocks, cache.keys, cache.values, strict=True):
            h = block.query_forward(h, keys, values, visible)
        energies = self.head(self.final_norm(h)).squeeze(-1)
        if self.confinement_std is not None:
            energies = energies + 0.5 * queries.square().sum(-1) / self.confinement_std**2
        return energies

    def forward(self, context: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Compute ``E(queries | context)``; shapes as in :meth:`query_energy`."""
        return self.query_energy(self.encode_context(context), queries)

    def langevin(
        self,
        context: torch.Tensor | ContextCache,
        x0: torch.Tensor,
        steps: int = 15,
        step_size: float = 0.01,
        temperature: float = 0.005,
        grad_clamp: float | None = 1.0,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        prefix_lengths: torch.Tensor | None = None,
    ):
        """Draw samples from ``exp(-E(. | D) / T)`` by unadjusted Langevin dynamics.

        Every chain, prefix and data set moves at once; the context is encoded once. The parameters
        receive no gradient and the result is detached.

        :param context: the context, shape (B, n, D), or its :class:`ContextCache`.
        :param torch.Tensor x0: initial states. Shape (B, m, D) samples given the whole context (in
            either mode). In causal mode, shape (B, P, m, D) samples ``x0[:, i]`` given the prefix
            of length ``prefix_lengths[i]``.
        :param torch.Tensor prefix_lengths: prefix lengths for 4-D ``x0`` (default 0 .. P - 1).
        :param int steps: number of Langevin steps.
        :param float step_size: step size eta.
        :param float temperature: temperature T; the noise standard deviation is sqrt(2 eta T).
        :param float grad_clamp: each gradient coordinate is clamped to [-c, c]; None turns it off.
        :param torch.Generator generator: random source for the noise, on the model's device.
        :param bool return_trajectory: also return the states after every step,
            shape (steps + 1, *x0.shape).
        :returns: the final states, shaped like ``x0`` (and the trajectory if requested).
        :raises NonFiniteEnergyError: if a gradient becomes NaN or infinite.
        """
        if not isinstance(x0, torch.Tensor):
            raise TypeError(f"x0 must be a torch.Tensor, but got {type(x0).__name__}.")
        if x0.dim() == 4 and self.mode == "set":
            raise ValueError(
                "x0 of shape (B, P, m, D) samples given prefixes, which needs mode='causal'; "
                f"this model has mode='set'. Pass x0 of shape (B, m, D), got {tuple(x0.shape)}."
            )
        if x0.dim() == 3 and prefix_lengths is not None:
            raise ValueError(
                "prefix_lengths applies to x0 of shape (B, P, m, D), but x0 has shape "
                f"{tuple(x0.shape)}; drop prefix_lengths or add the prefix axis."
            )
        steps = check_int("steps", steps, minimum=0)
        check_positive("step_size", step_size)
        check_positive("temperature", temperature, allow_zero=True)
        if grad_clamp is not None:
            check_positive("grad_clamp", grad_clamp)
        with torch.no_grad():
            cache = context if isinstance(context, ContextCache) else self.encode_context(context)
        noise_std = math.sqrt(2.0 * step_size * temperature)
        x = x0.detach().clone()
        trajectory = [x.clone()] if return_trajectory else None
        for step in range(steps):
            with torch.enable_grad():
                x.requires_grad_(True)
                if x.dim() == 3:
                    energy = self.full_context_energy(cache, x)
                else:
                    energy = self.query_energy(cache, x, prefix_lengths)
                (grad,) = torch.autograd.grad(energy.sum(), x)
            if not bool(torch.isfinite(grad).all()):
                raise NonFiniteEnergyError(
                    f"the energy gradient became NaN or infinite at Langevin step {step}; lower "
                    "step_size or check the model's parameters."
                )
            if grad_clamp is not None:
                grad = grad.clamp(-grad_clamp, grad_clamp)
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = (x.detach() - step_size * grad + noise_std * noise).detach()
            if return_trajectory:
                trajectory.append(x.clone())
        if return_trajectory:
            return x, torch.stack(trajectory)
        return x


__all__ = ["MODES", "ContextCache", "InContextEnergy", "NonFiniteEnergyError"]
