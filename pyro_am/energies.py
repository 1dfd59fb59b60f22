"""Energies of associative memories, each read as a negative log density.

For memories ``X`` of shape (N, D) and queries ``x`` of shape (..., D)::

    Gaussian KDE, bandwidth h:
        E_kde(x) = -log sum_n exp(-|x - x_n|^2 / (2 h^2))
        log p_kde(x) = -E_kde(x) - log N - (D / 2) log(2 pi h^2)
        grad E_kde(x) = (x - F(x)) / h^2,     F(x) = sum_n softmax_n(-|x - x_n|^2 / (2 h^2)) x_n

    Dense associative memory (modern Hopfield network), inverse temperature beta, M = max_n |x_n|:
        E_dam(xi) = -(1 / beta) log sum_n exp(beta x_n . xi) + |xi|^2 / 2
                    + (1 / beta) log N + M^2 / 2
        F(xi) = sum_n softmax_n(beta x_n . xi) x_n

    Gaussian mixture, weights pi_k, means mu_k, variances s_k^2 (scalar, per component or diagonal):
        E_gmm(x) = -log sum_k pi_k N(x; mu_k, s_k^2 I)
        F(x) = (sum_k r_k mu_k / s_k^2) / (sum_k r_k / s_k^2),   r = responsibilities

``F`` is each energy's fixed-point (majorize-minimize) map: it minimizes a quadratic upper bound of
E that touches E at the current point, so E never increases along it. When every memory has norm
M, ``beta * E_dam(xi) = E_kde(xi; h^2 = 1 / beta) + log N`` and the two maps coincide.

Squared distances are expanded in GEMM form, ``|x|^2 - 2 x . m + |m|^2``, and the log-sum-exp over
memories is streamed in blocks (:mod:`pyro_am.streaming`), so peak memory is O(block) for any N. The
GEMM form loses about ``eps * |x|^2 / h^2`` in absolute accuracy; use float64 for queries far from
the memories relative to the bandwidth.
"""

from __future__ import annotations

import math

import torch

from pyro_am._validation import (
    as_float_tensor,
    check_finite,
    check_memories,
    check_positive,
    check_query,
)
from pyro_am.streaming import SoftmaxStatistics, softmax_statistics


class Energy:
    """Base class of energies ``E(x)`` over queries of shape (..., D).

    Subclasses implement ``_energy`` on flattened queries of shape (B, D). Energies whose logits
    over the memories are affine in a feature map also implement ``_logit_parts``, so that the
    inherited ``_statistics`` streams them, and add the closed forms ``_grad``, ``_fixed_point``
    and ``_log_prob`` where they exist. Without ``_grad`` the gradient comes from autograd. The
    base class handles flattening, shape checks and the batch shape of the result.

    :ivar has_fixed_point: whether :meth:`fixed_point` is implemented in closed form.
    :ivar has_log_prob: whether :meth:`log_prob` is normalized exactly.
    """

    has_fixed_point = False
    has_log_prob = False

    def __init__(self, memories: torch.Tensor, block_elements: int | None = None):
        self.memories = check_memories("memories", memories)
        invalid = isinstance(block_elements, bool) or not isinstance(block_elements, int)
        if block_elements is not None and (invalid or block_elements < 1):
            raise ValueError(
                f"block_elements must be a positive integer, but got {block_elements!r}."
            )
        self.block_elements = block_elements

    # -- shape helpers ---------------------------------------------------------------------------
    @property
    def default_step_size(self) -> float:
        """Gradient step size used by :func:`~pyro_am.dynamics.retrieve` when none is given."""
        return 0.1

    @property
    def num_memories(self) -> int:
        return self.memories.shape[0]

    @property
    def dim(self) -> int:
        return self.memories.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.memories.dtype

    @property
    def device(self) -> torch.device:
        return self.memories.device

    def _flatten(self, x, name: str = "x") -> tuple[torch.Tensor, torch.Size]:
        x = check_query(name, x, self.dim, self.memories)
        batch_shape = x.shape[:-1]
        return x.reshape(-1, self.dim), batch_shape

    # -- interface -------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.energy(x)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """Compute E(x) for x of shape (..., D); the result has shape (...)."""
        flat, batch_shape = self._flatten(x)
        return self._energy(flat).reshape(batch_shape)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        """Compute the gradient of E at x, of shape (..., D)."""
        flat, batch_shape = self._flatten(x)
        return self._grad(flat).reshape(*batch_shape, self.dim)

    def fixed_point(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the closed-form fixed-point map F(x), of shape (..., D)."""
        if not self.has_fixed_point:
            raise NotImplementedError(f"{type(self).__name__} has no closed-form fixed-point map.")
        flat, batch_shape = self._flatten(x)
        return self._fixed_point(flat).reshape(*batch_shape, self.dim)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Compute the normalized log density log p(x) = -E(x) - log Z, of shape (...)."""
        if not self.has_log_prob:
            raise NotImplementedError(
                f"{type(self).__name__} has no closed-form normalizer, so log_prob is undefined."
            )
        flat, batch_shape = self._flatten(x)
        return self._log_prob(flat).reshape(batch_shape)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """Compute the softmax weights over memories, of shape (..., N).

        NOTE: the result is (batch x N), so this materializes what the streamed methods avoid.
        """
        flat, batch_shape = self._flatten(x)
        features, keys, bias = self._logit_parts(flat)
        logits = torch.addmm(bias, features, keys.T)
        return torch.softmax(logits, dim=-1).reshape(*batch_shape, self.num_memories)

    def energy_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute E(x) and its gradient in one pass over the memories."""
        flat, batch_shape = self._flatten(x)
        energy, grad = self._energy_and_grad(flat)
        return energy.reshape(batch_shape), grad.reshape(*batch_shape, self.dim)

    # -- subclass hooks on flattened queries (B, D) ----------------------------------------------
    def _logit_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _values(self) -> torch.Tensor | None:
        return self.memories

    def _statistics(self, x: torch.Tensor, with_values: bool) -> SoftmaxStatistics:
        features, keys, bias = self._logit_parts(x)
        values = self._values() if with_values else None
        return softmax_statistics(features, keys, bias, values, self.block_elements)

    def _energy(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _energy_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._energy(x), self._grad(x)

    def _grad(self, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self._energy(x).sum(), x)
        return grad

    def _fixed_point(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_memories={self.num_memories}, dim={self.dim})"


def _scalar_parameter(name: str, value, like: torch.Tensor) -> torch.Tensor:
    """Convert a positive scalar (float or 0-d tensor, may require grad) to ``like``'s dtype."""
    tensor = as_float_tensor(name, value, like=like)
    if tensor.numel() != 1:
        raise ValueError(f"{name} must be a scalar, but has shape {tuple(tensor.shape)}.")
    check_positive(name, tensor.detach())
    return tensor.reshape(())


class GaussianKDEEnergy(Energy):
    """Energy of a Gaussian kernel density estimate, ``-log sum_n exp(-|x - x_n|^2 / (2 h^2))``.

    The normalized density is :meth:`log_prob`; :class:`pyro_am.distributions.GaussianKDE` is the
    matching Pyro distribution. :meth:`fixed_point` is one mean-shift step.

    :param torch.Tensor memories: stored patterns of shape (N, D).
    :param bandwidth: kernel bandwidth h > 0 (a float or a 0-d tensor, which may require grad).
    :param int block_elements: the largest number of logits held at once while streaming.
    """

    has_fixed_point = True
    has_log_prob = True

    def __init__(self, memories, bandwidth, block_elements: int | None = None):
        super().__init__(memories, block_elements)
        self.bandwidth = _scalar_parameter("bandwidth", bandwidth, self.memories)

    @property
    def variance(self) -> torch.Tensor:
        return self.bandwidth.square()

    @property
    def default_step_size(self) -> float:
        # A gradient step of size h^2 is exactly one mean-shift step.
        return float(self.variance.detach())

    def _logit_parts(self, x):
        precision = self.variance.reciprocal()
        # A norm reduction, not square().sum(), so no temporary the size of the bank is made.
        bias = -0.5 * precision * torch.linalg.vector_norm(self.memories, dim=-1).square()
        return x * precision, self.memories, bias

    def _query_term(self, x):
        return 0.5 * x.square().sum(-1) / self.variance

    def _energy(self, x):
        statistics = self._statistics(x, with_values=False)
        return self._query_term(x) - statistics.logsumexp()

    def _energy_and_grad(self, x):
        statistics = self._statistics(x, with_values=True)
        energy = self._query_term(x) - statistics.logsumexp()
        return energy, (x - statistics.mean()) / self.variance

    def _grad(self, x):
        return (x - self._fixed_point(x)) / self.variance

    def _fixed_point(self, x):
        return self._statistics(x, with_values=True).mean()

    def _log_prob(self, x):
        log_normalizer = math.log(self.num_memories) + 0.5 * self.dim * torch.log(
            2 * math.pi * self.variance
        )
        return -self._energy(x) - log_normalizer


class DenseAMEnergy(Energy):
    """Energy of a dense associative memory (modern Hopfield network).

    ``E(xi) = -(1/beta) log sum_n exp(beta x_n . xi) + |xi|^2 / 2 + (1/beta) log N + M^2 / 2`` with
    ``M = max_n |x_n|``. One :meth:`fixed_point` step is the modern Hopfield update, which is also
    one step of softmax attention with the memories as keys and values. The density ``exp(-E)`` has
    no closed-form normalizer unless all memories share a norm, so :meth:`log_prob` is not defined.

    :param torch.Tensor memories: stored patterns of shape (N, D).
    :param beta: inverse temperature beta > 0.
    :param int block_elements: the largest number of logits held at once while streaming.
    """

    has_fixed_point = True

    def __init__(self, memories, beta, block_elements: int | None = None):
        super().__init__(memories, block_elements)
        self.beta = _scalar_parameter("beta", beta, self.memories)

    @property
    def default_step_size(self) -> float:
        # A gradient step of size 1 is exactly one modern Hopfield update.
        return 1.0

    @property
    def max_norm(self) -> torch.Tensor:
        return self.memories.norm(dim=-1).max()

    def _logit_parts(self, x):
        bias = torch.zeros(self.num_memories, dtype=self.dtype, device=self.device)
        return x * self.beta, self.memories, bias

    def _energy_from(self, x, statistics):
        constant = math.log(self.num_memories) / self.beta + 0.5 * self.max_norm.square()
        return -statistics.logsumexp() / self.beta + 0.5 * x.square().sum(-1) + constant

    def _energy(self, x):
        return self._energy_from(x, self._statistics(x, with_values=False))

    def _energy_and_grad(self, x):
        statistics = self._statistics(x, with_values=True)
        return self._energy_from(x, statistics), x - statistics.mean()

    def _grad(self, x):
        return x - self._fixed_point(x)

    def _fixed_point(self, x):
        return self._statistics(x, with_values=True).mean()


class GaussianMixtureEnergy(Energy):
    """Negative log likelihood of a Gaussian mixture, ``-log sum_k pi_k N(x; mu_k, diag(s_k^2))``.

    ``scales`` may be a scalar (one shared isotropic scale), of shape (K,) (isotropic per component)
    or of shape (K, D) (diagonal per component). The logits are affine in ``[x, x^2]`` so they are
    computed by one GEMM, and :meth:`fixed_point` is the precision-weighted mean of the means under
    the responsibilities, which minimizes the EM upper bound of E with the responsibilities fixed.

    :param torch.Tensor means: component means mu_k of shape (K, D).
    :param scales: component standard deviations, positive, of shape (), (K,) or (K, D).
    :param weights: mixing weights of shape (K,), positive and summing to one. Give ``weights`` or
        ``logits`` (normalized by softmax), not both; with neither the weights are uniform.
    :param int block_elements: the largest number of logits held at once while streaming.
    """

    has_fixed_point = True
    has_log_prob = True

    def __init__(self, means, scales, weights=None, logits=None, block_elements=None):
        # Checked here first so that an error names the argument the caller passed.
        means = check_memories("means", means)
        super().__init__(means, block_elements)
        num_components, dim = self.memories.shape
        scales = as_float_tensor("scales", scales, like=self.memories)
        if scales.shape not in ((), (1,), (num_components,), (num_components, dim)):
            raise ValueError(
                f"scales must have shape (), ({num_components},) or ({num_components}, {dim}), "
                f"but has shape {tuple(scales.shape)}."
            )
        check_positive("scales", scales.detach())
        self.scales = scales.reshape(()) if scales.numel() == 1 else scales
        self.log_weights = self._log_weights(weights, logits, num_components)

    def _log_weights(self, weights, logits, num_components):
        if weights is not None and logits is not None:
            raise ValueError("pass either weights or logits to GaussianMixtureEnergy, not both.")
        if logits is not None:
            logits = as_float_tensor("logits", logits, like=self.memories)
            if logits.shape != (num_components,):
                raise ValueError(
                    f"logits must have shape ({num_components},), but has {tuple(logits.shape)}."
                )
            check_finite("logits", logits.detach())
            return torch.log_softmax(logits, dim=-1)
        if weights is None:
            return torch.full(
                (num_components,), -math.log(num_components), dtype=self.dtype, device=self.device
            )
        weights = as_float_tensor("weights", weights, like=self.memories)
        if weights.shape != (num_components,):
            raise ValueError(
                f"weights must have shape ({num_components},), but has {tuple(weights.shape)}."
            )
        check_positive("weights", weights.detach())
        total = float(weights.detach().sum())
        tolerance = 1e-5 if self.dtype == torch.float32 else 1e-10
        if abs(total - 1.0) > tolerance:
            raise ValueError(
                f"weights must sum to one, but sum to {total}; normalize them or pass logits."
            )
        return weights.log()

    @property
    def means(self) -> torch.Tensor:
        return self.memories

    @property
    def default_step_size(self) -> float:
        # The smallest variance: the step that is a fixed-point step for the narrowest component.
        return float(self.scales.detach().square().min())

    @property
    def weights(self) -> torch.Tensor:
        return self.log_weights.exp()

    @property
    def _full_variances(self) -> torch.Tensor:
        """Variances broadcast to shape (K, D)."""
        variances = self.scales.square()
        if variances.dim() == 1:
            variances = variances.unsqueeze(-1)
        return variances.expand_as(self.memories)

    def _logit_parts(self, x):
        means = self.memories
        variances = self._full_variances
        precisions = variances.reciprocal()
        log_normalizers = -0.5 * torch.log(2 * math.pi * variances).sum(-1)
        bias = self.log_weights + log_normalizers - 0.5 * (means.square() * precisions).sum(-1)
        if self.scales.dim() == 0:
            return x * precisions[0, 0], means, bias
        if self.scales.dim() == 1:
            features = torch.cat([x, x.square().sum(-1, keepdim=True)], dim=-1)
            keys = torch.cat([means * precisions, -0.5 * precisions[:, :1]], dim=-1)
            return features, keys, bias
        features = torch.cat([x, x.square()], dim=-1)
        keys = torch.cat([means * precisions, -0.5 * precisions], dim=-1)
        return features, keys, bias

    def component_log_likelihoods(self, x: torch.Tensor) -> torch.Tensor:
        """Compute ``log pi_k + log N(x; mu_k, diag(s_k^2))`` for every component, shape (..., K).

        The log-sum-exp of the result over K is ``-E(x)``, and its softmax is
        :meth:`responsibilities`. All K values come from one GEMM of the energy's features.

        NOTE: the result is (batch x K), so this materializes what the streamed methods avoid.
        """
        flat, batch_shape = self._flatten(x)
        features, keys, bias = self._logit_parts(flat)
        log_joint = torch.addmm(bias, features, keys.T) - self._query_term(flat).unsqueeze(-1)
        return log_joint.reshape(*batch_shape, self.num_memories)

    def _query_term(self, x):
        if self.scales.dim() == 0:
            return 0.5 * x.square().sum(-1) / self.scales.square()
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)

    def _values(self):
        if self.scales.dim() == 0:
            return self.memories
        precisions = self._full_variances.reciprocal()
        return torch.cat([self.memories * precisions, precisions], dim=-1)

    def _moments(self, statistics):
        """Return (sum_k r_k mu_k / s_k^2, sum_k r_k / s_k^2) from the streamed statistics."""
        mean = statistics.mean()
        if self.scales.dim() == 0:
            precision = self.scales.square().reciprocal()
            return mean * precision, precision.expand_as(mean)
        return mean[:, : self.dim], mean[:, self.dim :]

    def _energy(self, x):
        statistics = self._statistics(x, with_values=False)
        return self._query_term(x) - statistics.logsumexp()

    def _energy_and_grad(self, x):
        statistics = self._statistics(x, with_values=True)
        weighted_means, precision = self._moments(statistics)
        energy = self._query_term(x) - statistics.logsumexp()
        return energy, x * precision - weighted_means

    def _grad(self, x):
        weighted_means, precision = self._moments(self._statistics(x, with_values=True))
        return x * precision - weighted_means

    def _fixed_point(self, x):
        weighted_means, precision = self._moments(self._statistics(x, with_values=True))
        return weighted_means / precision

    def _log_prob(self, x):
        return -self._energy(x)


__all__ = ["DenseAMEnergy", "Energy", "GaussianKDEEnergy", "GaussianMixtureEnergy"]
