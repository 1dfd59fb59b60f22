"""Coordinate-ascent variational inference (CAVI) for the truncated stick-breaking Gaussian mixture.

The model is ``v_k ~ Beta(1 - d, alpha + k d)`` (k < K), ``mu_k ~ N(m0, diag(s0^2))``,
``z_n ~ Categorical(w(v))`` and ``x_n ~ N(mu_z, diag(s_z^2))``. The noise variance is shared by the
memories or one per memory, and a scalar (isotropic) or one per coordinate (diagonal). Internally
it has shape (), (1, D), (K, 1) or (K, D), which broadcasts to (K, D). Each precision may carry the
conjugate prior ``1 / s^2 ~ Gamma(1 + c / 2, c sigma0^2 / 2)``, which acts as ``c``
pseudo-observations of squared residual ``sigma0^2``: ``c = nu`` pseudo-data for a diagonal
variance and ``c = nu D`` for an isotropic one, which pools the D coordinates. The
mean-field family is ``q(v_k) = Beta(a_k, b_k)``, ``q(mu_k) = N(m_k, diag(t_k^2))`` and
``q(z_n) = r_n``, and ``s^2`` is a point estimate. The updates (Blei and Jordan, "Variational
inference for Dirichlet process mixtures", Bayesian Analysis 2006, extended to the Pitman-Yor
sticks) each maximize the ELBO exactly over their block with the others fixed::

    log r_nk = E[log w_k] + E[log N(x_n; mu_k, s^2)] + const
    a_k = 1 - d + N_k,   b_k = alpha + k d + sum_{j>k} N_j,       N_k = sum_n r_nk
    1 / t_kd^2 = 1 / s0_d^2 + N_k / s_kd^2,   m_kd = t_kd^2 (m0_d / s0_d^2 + S_kd / s_kd^2)
    s^2 = (R + c sigma0^2) / (n + c),   R_kd = sum_n r_nk E[(x_nd - mu_kd)^2]

where ``S_k = sum_n r_nk x_n`` and R and the count n are summed over the memories and coordinates
that share the variance (``n = N D`` for one shared isotropic variance, ``n = N_k`` for a diagonal
variance per memory). The objective after the local step is the ELBO plus the log prior of the
variance point estimate (zero when ``c = 0``)::

    ELBO = sum_n log sum_k exp(E[log w_k] + E[log N(x_n; mu_k, s_k^2)])
           - sum_k KL(q(mu_k) || p(mu_k)) - sum_{k<K} KL(q(v_k) || p(v_k)) + log p(1 / s^2)

Every data-sized operation is a matrix product: ``E[|x - mu_k|^2]`` is expanded as
``|x|^2 - 2 x . m_k + |m_k|^2 + sum_d t_kd^2``, weighted by the precisions. The data are centred
first (and the prior mean with them), which leaves the model unchanged and keeps the expansion
accurate for data far from the origin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.distributions import Beta, kl_divergence

from pyro_am.distributions.stick_breaking import BetaStickBreaking


@dataclass
class Posterior:
    """Variational parameters of the DP memory as plain tensors.

    :ivar stick_concentration1: ``a_k`` of the K - 1 Beta sticks.
    :ivar stick_concentration0: ``b_k`` of the K - 1 Beta sticks.
    :ivar memory_loc: posterior means ``m_k`` of the memories, shape (K, D).
    :ivar memory_scale: posterior standard deviations ``t_k``, shape (K, D).
    :ivar variance: the noise variance ``s^2``, shape (), (1, D), (K, 1) or (K, D).
    """

    stick_concentration1: torch.Tensor
    stick_concentration0: torch.Tensor
    memory_loc: torch.Tensor
    memory_scale: torch.Tensor
    variance: torch.Tensor

    @property
    def num_memories(self) -> int:
        return self.memory_loc.shape[0]

    def sticks(self) -> BetaStickBreaking:
        return BetaStickBreaking(self.stick_concentration1, self.stick_concentration0)

    def select(self, keep: torch.Tensor, counts: torch.Tensor, prior: Prior) -> Posterior:
        """Keep the memories where ``keep`` is true and refit the sticks to their counts."""
        counts = counts[keep]
        concentration1, concentration0 = update_sticks(counts, prior)
        variance = self.variance[keep] if prior.per_memory else self.variance
        return Posterior(
            concentration1, concentration0, self.memory_loc[keep], self.memory_scale[keep], variance
        )


@dataclass
class Prior:
    """Hyperparameters of the DP memory, in the dtype and device of the data."""

    concentration: float
    discount: float
    prior_mean: torch.Tensor  # (D,)
    prior_variance: torch.Tensor  # (D,)
    learn_variance: bool
    isotropic: bool
    per_memory: bool = False
    variance_pseudo_count: float = 0.0  # nu
    variance_prior: float = 1.0  # sigma0^2

    def empty_memory_variance(self, like: torch.Tensor) -> torch.Tensor:
        """Return the variance row, shape (1, D) or (1, 1), of a memory with no data."""
        width = 1 if self.isotropic else self.prior_mean.shape[0]
        return torch.full((1, width), self.variance_prior, dtype=like.dtype, device=like.device)

    @property
    def coordinate_pseudo_count(self) -> float:
        """Pseudo-observations per variance entry: ``nu D`` when isotropic, else ``nu``."""
        width = self.prior_mean.shape[0] if self.isotropic else 1
        return self.variance_pseudo_count * width

    def variance_log_prior(self, variance: torch.Tensor) -> torch.Tensor:
        """Return ``sum log Gamma(1 / s^2; 1 + c / 2, c sigma0^2 / 2)`` over the entries, with
        ``c`` the :attr:`coordinate_pseudo_count`."""
        pseudo_count = self.coordinate_pseudo_count
        if pseudo_count == 0:
            return variance.new_zeros(())
        shape = 1 + 0.5 * pseudo_count
        rate = 0.5 * pseudo_count * self.variance_prior
        precision = variance.reciprocal()
        log_density = shape * math.log(rate) - math.lgamma(shape)
        return (log_density + (shape - 1) * precision.log() - rate * precision).sum()


@dataclass
class LocalStep:
    """Result of the local (responsibility) step on a batch of data."""

    responsibilities: torch.Tensor  # (N, K)
    log_normalizers: torch.Tensor  # (N,), the per-datum ELBO terms
    counts: torch.Tensor  # (K,)
    sums: torch.Tensor  # (K, D)
    squares: torch.Tensor | None = None  # (K, D), sum_n r_nk x_n^2 when per-memory variances


def full_precision(variance: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Return the noise precisions ``1 / s_kd^2`` broadcast to ``shape`` = (K, D)."""
    return variance.reciprocal().expand(shape)


def expected_log_likelihood(
    x: torch.Tensor, x_squared: torch.Tensor, posterior: Posterior
) -> torch.Tensor:
    """Compute ``E_q[log N(x_n; mu_k, diag(s_k^2))]`` of shape (N, K) by matrix products.

    :param torch.Tensor x: data of shape (N, D).
    :param torch.Tensor x_squared: ``x ** 2`` of shape (N, D), computed once per fit.
    """
    dim = x.shape[-1]
    loc = posterior.memory_loc
    precision = full_precision(posterior.variance, loc.shape)
    second_moment = loc.square() + posterior.memory_scale.square()
    log_normalizer = -0.5 * (dim * math.log(2 * math.pi) - precision.log().sum(-1))
    bias = log_normalizer - 0.5 * (second_moment * precision).sum(-1)
    if posterior.variance.dim() == 0 or posterior.variance.shape[0] == 1:
        # A variance shared by the memories: the query term is one matrix-vector product.
        query = (-0.5 * (x_squared @ precision[0])).unsqueeze(-1)
    else:
        query = -0.5 * (x_squared @ precision.T)
    return torch.addmm(bias + query, x, (loc * precision).T)


def local_step(x, x_squared, posterior: Posterior, with_squares: bool = False) -> LocalStep:
    """Compute the responsibilities and their sufficient statistics."""
    log_rho = expected_log_likelihood(x, x_squared, posterior)
    log_rho = log_rho + posterior.sticks().expected_log_weights()
    # One in-place exp pass gives both the softmax and the log-sum-exp.
    maximum = log_rho.amax(-1, keepdim=True)
    responsibilities = log_rho.sub_(maximum).exp_()
    total = responsibilities.sum(-1, keepdim=True)
    responsibilities.div_(total)
    log_normalizers = (maximum + total.log()).squeeze(-1)
    counts = responsibilities.sum(0)
    sums = responsibilities.T @ x
    squares = responsibilities.T @ x_squared if with_squares else None
    return LocalStep(responsibilities, log_normalizers, counts, sums, squares)


def update_sticks(counts: torch.Tensor, prior: Prior) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``a_k = 1 - d + N_k`` and ``b_k = alpha + k d + sum_{j>k} N_j`` for k < K."""
    num_memories = counts.shape[0]
    index = torch.arange(1, num_memories, dtype=counts.dtype, device=counts.device)
    tail = counts.flip(0).cumsum(0).flip(0) - counts
    concentration1 = (1.0 - prior.discount) + counts[:-1]
    concentration0 = prior.concentration + prior.discount * index + tail[:-1]
    return concentration1, concentration0


def update_memories(
    counts: torch.Tensor, sums: torch.Tensor, variance: torch.Tensor, prior: Prior
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the Gaussian posterior ``(m_k, t_k)`` of each memory given the statistics."""
    precision = full_precision(variance, sums.shape)
    prior_precision = prior.prior_variance.reciprocal()
    posterior_precision = prior_precision + counts.unsqueeze(-1) * precision
    loc = (prior.prior_mean * prior_precision + sums * precision) / posterior_precision
    return loc, posterior_precision.rsqrt()


def update_variance(
    step: LocalStep,
    total_x_squared: torch.Tensor,
    num_data: int,
    loc: torch.Tensor,
    scale: torch.Tensor,
    prior: Prior,
) -> torch.Tensor:
    """Return the closed-form M-step ``s^2 = (R + c sigma0^2) / (n + c)``.

    ``R_kd = sum_n r_nk E[(x_nd - mu_kd)^2] = Q_kd - 2 S_kd m_kd + N_k (m_kd^2 + t_kd^2)`` with
    ``Q_kd = sum_n r_nk x_nd^2``. For a shared variance ``sum_k Q_kd = sum_n x_nd^2`` because the
    responsibilities of each datum sum to one, so only per-memory variances need Q.

    :param torch.Tensor total_x_squared: ``sum_n x_n ** 2`` of shape (D,).
    """
    counts = step.counts
    expected = counts.unsqueeze(-1) * (loc.square() + scale.square()) - 2 * step.sums * loc
    dim = loc.shape[-1]
    if prior.per_memory:
        residual = step.squares + expected
        count = counts.unsqueeze(-1).expand_as(residual)
    else:
        residual = (total_x_squared + expected.sum(0)).unsqueeze(0)
        count = torch.full_like(residual, float(num_data))
    if prior.isotropic:
        residual = residual.sum(-1, keepdim=True)
        count = count[..., :1] * dim
    pseudo_count = prior.coordinate_pseudo_count
    variance = (residual + pseudo_count * prior.variance_prior) / (count + pseudo_count)
    if not prior.per_memory and prior.isotropic:
        variance = variance.reshape(())
    return variance.clamp_min(torch.finfo(variance.dtype).tiny)


def global_terms(posterior: Posterior, prior: Prior) -> torch.Tensor:
    """Return ``-KL(q(mu) || p(mu)) - KL(q(v) || p(v)) + log p(1 / s^2)``, the global terms."""
    variance_ratio = posterior.memory_scale.square() / prior.prior_variance
    squared_offset = (posterior.memory_loc - prior.prior_mean).square() / prior.prior_variance
    kl_memories = 0.5 * (variance_ratio + squared_offset - 1 - variance_ratio.log()).sum()
    num_sticks = posterior.num_memories - 1
    if num_sticks == 0:
        return -kl_memories + prior.variance_log_prior(posterior.variance)
    like = posterior.stick_concentration1
    index = torch.arange(1, num_sticks + 1, dtype=like.dtype, device=like.device)
    prior_sticks = Beta(
        torch.full_like(like, 1.0 - prior.discount),
        prior.concentration + prior.discount * index,
    )
    kl_sticks = kl_divergence(
        Beta(posterior.stick_concentration1, posterior.stick_concentration0), prior_sticks
    ).sum()
    return -kl_memories - kl_sticks + prior.variance_log_prior(posterior.variance)


def global_step(
    step: LocalStep, total_x_squared, num_data: int, posterior: Posterior, prior: Prior
) -> Posterior:
    """Update the sticks, the memories and (when learned) the variance, in that order."""
    concentration1, concentration0 = update_sticks(step.counts, prior)
    loc, scale = update_memories(step.counts, step.sums, posterior.variance, prior)
    variance = posterior.variance
    if prior.learn_variance:
        variance = update_variance(step, total_x_squared, num_data, loc, scale, prior)
    return Posterior(concentration1, concentration0, loc, scale, variance)


def hard_assignment_posterior(
    x: torch.Tensor, labels: torch.Tensor, num_memories: int, variance, prior: Prior
) -> Posterior:
    """Build the posterior that one global step gives from one-hot responsibilities ``labels``.

    When the variance is learned, it starts at the M-step of the labelling with the memories at
    their sample means.
    """
    responsibilities = torch.nn.functional.one_hot(labels, num_memories).to(x.dtype)
    x_squared = x.square()
    step = LocalStep(
        responsibilities,
        None,
        responsibilities.sum(0),
        responsibilities.T @ x,
        responsibilities.T @ x_squared,
    )
    if prior.learn_variance:
        means = step.sums / step.counts.clamp_min(1).unsqueeze(-1)
        zeros = torch.zeros_like(means)
        variance = update_variance(step, x_squared.sum(0), x.shape[0], means, zeros, prior)
        variance = variance.clamp_min(1e-6 * float(x.var(0).mean().clamp_min(1e-12)))
    concentration1, concentration0 = update_sticks(step.counts, prior)
    loc, scale = update_memories(step.counts, step.sums, variance, prior)
    return Posterior(concentration1, concentration0, loc, scale, variance)


def new_memory_posterior(x: torch.Tensor, variance_row: torch.Tensor, prior: Prior):
    """Return ``q(mu)`` given one datum alone: mean ``(s0^2 x + s^2 m0) / (s0^2 + s^2)``.

    :param torch.Tensor variance_row: the new memory's noise variance, broadcastable to (D,).
    """
    noise_variance = variance_row.reshape(-1).expand_as(x)
    total = prior.prior_variance + noise_variance
    loc = (prior.prior_variance * x + noise_variance * prior.prior_mean) / total
    scale = (prior.prior_variance * noise_variance / total).sqrt()
    return loc, scale
