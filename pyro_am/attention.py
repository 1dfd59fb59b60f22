"""Softmax attention after a normalization, read as the posterior of a vMF mixture on a sphere.

For a unit query ``u`` and effective keys ``e_j`` the von Mises-Fisher mixture with mean directions
``mu_j = e_j / |e_j|``, concentrations ``kappa_j = |e_j|`` and mixing weights
``pi_j ~ exp(b_j) / C(kappa_j)`` has responsibilities::

    p(j given u) = pi_j C(kappa_j) exp(kappa_j mu_j.u) / sum_i (...) = softmax_j(e_j.u + b_j)

so any attention whose logits are affine in a unit vector is exactly this posterior, and its output
``sum_j softmax_j v_j`` is the posterior mean of the values. In a pre-norm transformer the logit is
``s q.k_j`` with ``q = W_Q y + b_Q`` and ``y`` the normalized token:

* LayerNorm with eps = 0: ``y = g * sqrt(D) u + delta`` with ``u = (x - mean(x)) / |x - mean(x)|``,
  a unit vector in the hyperplane orthogonal to the all-ones vector. The query projection and an
  elementwise gain fold into the keys, ``e_j = s sqrt(D) P (g * W_Q^T k_j)`` with ``P`` the
  projection onto that hyperplane, and the bias adds ``b_j = s (W_Q^T k_j).delta + s b_Q.k_j`` to
  the log weights. The sphere is S^{D-2}, so C is the normalizer of the vMF in dimension D - 1.
* RMSNorm with eps = 0: the same with ``u = x / |x|`` on S^{D-1}, no projection, C in dimension D.
* No normalization: the queries must already be unit vectors; ``e_j = s W_Q^T k_j``.

Concentration and mixing weight are tied through ``|e_j|`` in standard attention.
:class:`VMFAttention` learns them separately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pyro_am._validation import as_float_tensor, check_finite, check_int, check_positive
from pyro_am.distributions.von_mises_fisher import log_vmf_normalizer

NORMS = ("none", "layer", "rms")


def _check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, but got {norm!r}.")
    return norm


def sphere_dimension(dim: int, norm: str) -> int:
    """Return the ambient dimension of the sphere the normalized queries lie on.

    LayerNorm's outputs lie in the hyperplane orthogonal to the all-ones vector, so their sphere
    is S^{D-2} inside R^{D-1}; RMSNorm and unit queries lie on S^{D-1} in R^D.
    """
    return dim - 1 if _check_norm(norm) == "layer" else dim


def hyperplane_basis(dim: int, dtype=None, device=None) -> torch.Tensor:
    """Return an orthonormal basis of the hyperplane orthogonal to the all-ones vector, (D, D-1).

    Column k (k = 1 .. D-1) is the Helmert vector ``(1, .., 1, -k, 0, .., 0) / sqrt(k (k + 1))``
    with k leading ones. ``u @ basis`` gives the coordinates of a LayerNorm direction.
    """
    dim = check_int("dim", dim, minimum=2)
    rows = torch.arange(dim, dtype=dtype, device=device).unsqueeze(-1)
    k = torch.arange(1, dim, dtype=dtype, device=device).unsqueeze(0)
    basis = torch.where(rows < k, torch.ones_like(rows * k), torch.zeros_like(rows * k))
    basis = torch.where(rows == k, -k.expand_as(basis), basis)
    return basis / torch.sqrt(k * (k + 1))


def normalize_queries(x: torch.Tensor, norm: str = "layer") -> torch.Tensor:
    """Map tokens to the unit directions that a normalization's output is proportional to.

    ``"layer"``: ``(x - mean) / |x - mean|``, so ``LayerNorm(x) = sqrt(D) u`` for eps = 0 without
    gain or bias. ``"rms"``: ``x / |x|``, so ``RMSNorm(x) = sqrt(D) u``. ``"none"``: ``x`` itself,
    which must already have unit norm.

    :param torch.Tensor x: tokens of shape (..., D).
    :param str norm: ``"layer"``, ``"rms"`` or ``"none"``.
    """
    _check_norm(norm)
    x = check_finite("x", as_float_tensor("x", x))
    if norm == "layer":
        x = x - x.mean(-1, keepdim=True)
    length = x.norm(dim=-1, keepdim=True)
    if norm == "none":
        tolerance = 1e-10 if x.dtype == torch.float64 else 1e-5
        deviation = (length - 1).abs().max() if x.numel() else torch.tensor(0.0)
        if float(deviation) > tolerance * math.sqrt(x.shape[-1]):
            raise ValueError(
                f"with norm='none' the queries must have unit norm, but a norm is off by "
                f"{float(deviation):.3g}; normalize them or pass norm='rms'."
            )
        return x
    if bool((length == 0).any()):
        raise ValueError(
            f"x contains a token with no direction after norm={norm!r} (a constant token for "
            "LayerNorm, a zero token for RMSNorm), so it has no point on the sphere."
        )
    return x / length


@dataclass
class AttentionMixture:
    """The vMF mixture whose posterior an attention layer computes.

    :ivar mean_directions: unit vectors mu_j of shape (..., N, D). For LayerNorm
        they lie in the hyperplane orthogonal to the all-ones vector.
    :ivar concentrations: kappa_j >= 0, shape (..., N).
    :ivar log_weights: normalized log mixing weights log pi_j, shape (..., N).
    :ivar sphere_dim: ambient dimension of the vMF normalizer C (D - 1 for LayerNorm).
    :ivar norm: the normalization the mixture was built for.
    """

    mean_directions: torch.Tensor
    concentrations: torch.Tensor
    log_weights: torch.Tensor
    sphere_dim: int
    norm: str

    def log_joint(self, unit_queries: torch.Tensor) -> torch.Tensor:
        """Compute ``log pi_j + log C(kappa_j) + kappa_j mu_j.u``, shape (..., M, N).

        :param torch.Tensor unit_queries: unit queries u of shape (..., M, D).
        """
        log_normalizer = log_vmf_normalizer(self.sphere_dim, self.concentrations)
        keys = self.concentrations.unsqueeze(-1) * self.mean_directions
        return (self.log_weights + log_normalizer).unsqueeze(-2) + unit_queries @ keys.mT

    def responsibilities(self, unit_queries: torch.Tensor) -> torch.Tensor:
        """Compute the posterior ``p(j given u)`` of every query, shape (..., M, N)."""
        return torch.softmax(self.log_joint(unit_queries), dim=-1)

    def posterior_mean(self, unit_queries: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Compute ``E[v_j given u] = sum_j p(j given u) v_j``, shape (..., M, V).

        :param torch.Tensor values: values v_j of shape (..., N, V).
        """
        return self.responsibilities(unit_queries) @ values

    def energy(self):
        """Build the :class:`~pyro_am.models.vmf_mixture.VMFMixtureEnergy` of unbatched keys.

        For LayerNorm the energy lives in the coordinates ``u @ hyperplane_basis(D)`` of the
        hyperplane, where the sphere is S^{D-2} and the normalizer is that of dimension D - 1.
        """
        from pyro_am.models.vmf_mixture import VMFMixtureEnergy

        if self.mean_directions.dim() != 2:
            raise ValueError(
                "energy() needs unbatched keys, but the mean directions have shape "
                f"{tuple(self.mean_directions.shape)}; index one batch element first."
            )
        directions = self.mean_directions
        if self.norm == "layer":
            directions = directions @ hyperplane_basis(
                directions.shape[-1], directions.dtype, directions.device
            )
        return VMFMixtureEnergy(directions, self.concentrations, logits=self.log_weights)


def attention_vmf_mixture(
    keys: torch.Tensor,
    scale: float | torch.Tensor,
    norm: str = "none",
    gain: torch.Tensor | float | None = None,
    bias: torch.Tensor | None = None,
    query_weight: torch.Tensor | None = None,
    query_bias: torch.Tensor | None = None,
) -> AttentionMixture:
    """Build the vMF mixture whose responsibilities equal ``softmax_j(scale q.k_j)``.

    The query is ``q = W_Q y + b_Q`` with ``y = gain * r u + bias``, where ``u`` is
    ``normalize_queries(x, norm)``, ``r = sqrt(D)`` for LayerNorm and RMSNorm (eps = 0) and
    ``r = 1`` for ``norm="none"``. The responsibilities of the result at ``u`` are the attention
    weights, for every query at once.

    :param torch.Tensor keys: keys k_j of shape (..., N, d_k).
    :param scale: the attention scale s > 0 (``1 / sqrt(d_k)`` in scaled dot-product attention).
    :param str norm: ``"none"`` (unit queries), ``"layer"`` or ``"rms"``.
    :param gain: the normalization's gain, a scalar or a tensor of shape (D,); default 1.
    :param torch.Tensor bias: the normalization's bias delta of shape (D,); default 0.
    :param torch.Tensor query_weight: W_Q of shape (..., d_k, D) as in ``nn.Linear.weight``;
        default the identity (d_k = D).
    :param torch.Tensor query_bias: b_Q of shape (..., d_k); default 0.
    :returns: an :class:`AttentionMixture`.
    """
    _check_norm(norm)
    keys = check_finite("keys", as_float_tensor("keys", keys))
    if keys.dim() < 2:
        raise ValueError(f"keys must have shape (..., N, d_k), but has shape {tuple(keys.shape)}.")
    scale = as_float_tensor("scale", scale, like=keys)
    if scale.numel() != 1:
        raise ValueError(f"scale must be a scalar, but has shape {tuple(scale.shape)}.")
    scale = scale.reshape(())
    check_positive("scale", scale.detach())

    # W_Q^T k_j, in the space of the normalized tokens.
    if query_weight is None:
        folded = keys
    else:
        query_weight = as_float_tensor("query_weight", query_weight, like=keys)
        if query_weight.dim() < 2 or query_weight.shape[-2] != keys.shape[-1]:
            raise ValueError(
                f"query_weight must have shape (..., {keys.shape[-1]}, D) to match keys of "
                f"shape {tuple(keys.shape)}, but has shape {tuple(query_weight.shape)}."
            )
        folded = keys @ query_weight
    dim = folded.shape[-1]
    if dim < 2 + (norm == "layer"):
        raise ValueError(
            f"the token dimension must be at least {2 + (norm == 'layer')} for "
            f"norm={norm!r}, but is {dim}."
        )

    bias_logits = torch.zeros(folded.shape[:-1], dtype=keys.dtype, device=keys.device)
    if bias is not None:
        bias = as_float_tensor("bias", bias, like=keys)
        if bias.shape != (dim,):
            raise ValueError(f"bias must have shape ({dim},), but has {tuple(bias.shape)}.")
        bias_logits = bias_logits + scale * (folded @ bias)
    if query_bias is not None:
        query_bias = as_float_tensor("query_bias", query_bias, like=keys)
        if query_bias.shape[-1:] != keys.shape[-1:]:
            raise ValueError(
                f"query_bias must have shape (..., {keys.shape[-1]}), but has shape "
                f"{tuple(query_bias.shape)}."
            )
        bias_logits = bias_logits + scale * (keys @ query_bias.unsqueeze(-1)).squeeze(-1)

    radius = 1.0 if norm == "none" else math.sqrt(dim)
    effective = radius * scale * folded
    if gain is not None:
        gain = as_float_tensor("gain", gain, like=keys)
        if gain.shape not in ((), (1,), (dim,)):
            raise ValueError(
                f"gain must be a scalar or have shape ({dim},), but has {tuple(gain.shape)}."
            )
        effective = effective * gain
    if norm == "layer":
        # Only the component in the hyperplane of the centred queries changes a logit.
        effective = effective - effective.mean(-1, keepdim=True)

    concentrations = effective.norm(dim=-1)
    safe = concentrations.clamp_min(torch.finfo(keys.dtype).tiny).unsqueeze(-1)
    mean_directions = effective / safe
    # A key with zero effective length is a uniform component; give it any unit direction.
    fallback = _default_direction(dim, norm, keys.dtype, keys.device)
    mean_directions = torch.where(concentrations.unsqueeze(-1) > 0, mean_directions, fallback)

    sphere_dim = sphere_dimension(dim, norm)
    log_weights = bias_logits - log_vmf_normalizer(sphere_dim, concentrations)
    log_weights = torch.log_softmax(log_weights, dim=-1)
    return AttentionMixture(mean_directions, concentrations, log_weights, sphere_dim, norm)


def _default_direction(dim, norm, dtype, device) -> torch.Tensor:
    if norm == "layer":
        return hyperplane_basis(dim, dtype, device)[:, 0]
    direction = torch.zeros(dim, dtype=dtype, device=device)
    direction[0] = 1
    return direction


class VMFAttention(nn.Module):
    """Pre-norm multi-head attention whose logits are those of a vMF mixture posterior.

    Queries are the unit directions ``u_i`` of the normalized tokens (see
    :func:`normalize_queries`). Each context token ``c_j`` and head ``h`` defines a vMF component
    on the sphere with mean direction ``mu_jh = normalize(W_Q^hT W_K^h y_j)``, where
    ``y_j = sqrt(D) normalize_queries(c_j)`` is the normalized context token, and the head's
    attention weights are the responsibilities::

        logit_ijh = log pi_jh + log C(kappa_jh) + kappa_jh mu_jh.u_i

    With ``tied=True``, ``kappa_jh = sqrt(D / d_h) |W_Q^hT W_K^h y_j|`` and
    ``pi_jh ~ 1 / C(kappa_jh)``, so the logits are ``q_i.k_j / sqrt(d_h)`` with
    ``q_i = W_Q^h (sqrt(D) u_i)``: standard scaled dot-product attention on normalized tokens. With
    ``tied=False`` (the default), ``kappa_jh = softplus(a_h.y_j + a0_h)`` and
    ``log pi_jh = w_h.y_j + w0_h`` come from their own linear maps, so how sharply a key attracts
    and how much prior mass it has are learned separately from its direction.

    :param int embed_dim: token dimension D.
    :param int num_heads: number of heads H.
    :param int head_dim: per-head dimension d_h; default D / H.
    :param str norm: ``"layer"`` or ``"rms"``; both with eps = 0 and no gain or bias (a gain
        folds into W_Q and W_K).
    :param bool tied: use the tied parameterization of standard attention.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int = 1,
        head_dim: int | None = None,
        norm: str = "layer",
        tied: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        embed_dim = check_int("embed_dim", embed_dim, minimum=3)
        num_heads = check_int("num_heads", num_heads)
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(
                    f"embed_dim = {embed_dim} is not divisible by num_heads = {num_heads}; "
                    "pass head_dim explicitly."
                )
            head_dim = embed_dim // num_heads
        head_dim = check_int("head_dim", head_dim)
        if _check_norm(norm) == "none":
            raise ValueError("VMFAttention needs norm='layer' or norm='rms', but got 'none'.")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.norm, self.tied = norm, tied
        self.sphere_dim = sphere_dimension(embed_dim, norm)
        options = {"device": device, "dtype": dtype}
        inner = num_heads * head_dim
        self.query = nn.Linear(embed_dim, inner, bias=False, **options)
        self.key = nn.Linear(embed_dim, inner, bias=False, **options)
        self.value = nn.Linear(embed_dim, inner, bias=False, **options)
        self.output = nn.Linear(inner, embed_dim, bias=False, **options)
        if not tied:
            self.concentration = nn.Linear(embed_dim, num_heads, **options)
            self.mixing_logits = nn.Linear(embed_dim, num_heads, **options)

    def _split(self, tensor: torch.Tensor) -> torch.Tensor:
        # (..., T, H * d_h) -> (..., H, T, d_h)
        return tensor.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

    def mixture(self, context: torch.Tensor) -> AttentionMixture:
        """Build the per-head vMF mixture of the context tokens (..., N, D): batch (..., H)."""
        normalized = math.sqrt(self.embed_dim) * normalize_queries(context, self.norm)
        keys = self._split(self.key(normalized))
        # W_Q^hT k_jh, shape (..., H, N, D).
        query_weight = self.query.weight.unflatten(0, (self.num_heads, self.head_dim))
        folded = keys @ query_weight
        if self.norm == "layer":
            folded = folded - folded.mean(-1, keepdim=True)
        length = folded.norm(dim=-1)
        directions = folded / length.clamp_min(torch.finfo(folded.dtype).tiny).unsqueeze(-1)
        if self.tied:
            concentrations = math.sqrt(self.embed_dim / self.head_dim) * length
            log_weights = -log_vmf_normalizer(self.sphere_dim, concentrations)
        else:
            concentrations = nn.functional.softplus(self.concentration(normalized)).transpose(
                -1, -2
            )
            log_weights = self.mixing_logits(normalized).transpose(-1, -2)
        log_weights = torch.log_softmax(log_weights, dim=-1)
        return AttentionMixture(directions, concentrations, log_weights, self.sphere_dim, self.norm)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        return_weights: bool = False,
    ):
        """Attend from the tokens ``x`` (..., M, D) to ``context`` (..., N, D), default ``x``.

        :param torch.Tensor mask: optional boolean tensor broadcastable to (..., H, M, N); True
            marks the pairs that may attend, as in ``scaled_dot_product_attention``.
        :param bool return_weights: also return the attention weights (..., H, M, N).
        :returns: the output of shape (..., M, D), and the weights if requested.
        """
        context = x if context is None else context
        mixture = self.mixture(context)
        unit_queries = normalize_queries(x, self.norm).unsqueeze(-3)
        logits = mixture.log_joint(unit_queries)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        normalized = math.sqrt(self.embed_dim) * normalize_queries(context, self.norm)
        values = self._split(self.value(normalized))
        heads = (weights @ values).transpose(-3, -2).flatten(-2)
        output = self.output(heads)
        return (output, weights) if return_weights else output


__all__ = [
    "NORMS",
    "AttentionMixture",
    "VMFAttention",
    "attention_vmf_mixture",
    "hyperplane_basis",
    "normalize_queries",
    "sphere_dimension",
]
