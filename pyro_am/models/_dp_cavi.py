"""Coordinate-ascent variational inference (CAVI) for the truncated stick-breaking Gaussian mixture.

The model is ``v_k ~ Beta(1 - d, alpha + k d)`` (k < K), ``mu_k ~ N(m0, diag(s0^2))``,
``z_n ~ Categorical(w(v))`` and ``x_n ~ N(mu_z, diag(s^2))`` with one variance ``s^2`` shared by
the memories (a scalar for isotropic noise, one per coordinate for diagonal noise). The
mean-field family is ``q(v_k) = Beta(a_k, b_k)``, ``q(mu_k) = N(m_k, diag(t_k^2))`` and
``q(z_n) = r_n``, and ``s^2`` is a point estimate. The updates (Blei and Jordan, "Variational
inference for Dirichlet process mixtures", Bayesian Analysis 2006, extended to the Pitman-Yor
sticks) each maximize the ELBO exactly over their block with the others fixed::

    log r_nk = E[log w_k] + E[log N(x_n; mu_k, s^2)] + const
    a_k = 1 - d + N_k,   b_k = alpha + k d + sum_{j>k} N_j,       N_k = sum_n r_nk
    1 / t_kd^2 = 1 / s0_d^2 + N_k / s_d^2,   m_kd = t_kd^2 (m0_d / s0_d^2 + S_kd / s_d^2)
    s_d^2 = sum_nk r_nk E[(x_nd - mu_kd)^2] / N        (averaged over d when isotropic)

with ``S_k = sum_n r_nk x_n``. The ELBO after the local step is::

    ELBO = sum_n log sum_k exp(E[log w_k] + E[log N(x_n; mu_k, s^2)])
           - sum_k KL(q(mu_k) || p(mu_k)) - sum_{k<K} KL(q(v_k) || p(v_k))

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

    :ivar torch.Tensor stick_concentration1: ``a_k`` of the K - 1 Beta sticks.
    :ivar torch.Tensor stick_concentration0: ``b_k`` of the K - 1 Beta sticks.
    :ivar torch.Tensor memory_loc: posterior means ``m_k`` of the memories, shape (K, D).
    :ivar torch.Tensor memory_scale: posterior standard deviations ``t_k``, shape (K, D).
    :ivar torch.Tensor variance: the noise variance ``s^2``, shape () or (D,).
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
        return Posterior(
            concentration1,
            concentration0,
            self.memory_loc[keep],
            self.memory_scale[keep],
            self.variance,
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


@dataclass
class LocalStep:
    """Result of the local (responsibility) step on a batch of data."""

    responsibilities: torch.Tensor  # (N, K)
    log_normalizers: torch.Tensor  # (N,), the per-datum ELBO terms
    counts: torch.Tensor  # (K,)
    sums: torch.Tensor  # (K, D)


def full_precision(variance: torch.Tensor, dim: int) -> torch.Tensor:
    """Return the noise precision ``1 / s_d^2`` broadcast to shape (D,)."""
    return variance.reciprocal().expand(dim) if variance.dim() == 0 else variance.reciprocal()


def expected_log_likelihood(
    x: torch.Tensor, x_squared: torch.Tensor, posterior: Posterior
) -> torch.Tensor:
    """Compute ``E_q[log N(x_n; mu_k, diag(s^2))]`` of shape (N, K) by two matrix products.

    :param torch.Tensor x: data of shape (N, D).
    :param torch.Tensor x_squared: ``x ** 2`` of shape (N, D), computed once per fit.
    """
    dim = x.shape[-1]
    precision = full_precision(posterior.variance, dim)
    loc = posterior.memory_loc
    second_moment = loc.square() + posterior.memory_scale.square()
    log_normalizer = -0.5 * (dim * math.log(2 * math.pi) - precision.log().sum())
    bias = log_normalizer - 0.5 * second_moment @ precision
    query = -0.5 * (x_squared @ precision)
    return torch.addmm(bias + query.unsqueeze(-1), x, (loc * precision).T)


def local_step(x, x_squared, posterior: Posterior) -> LocalStep:
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
    return LocalStep(responsibilities, log_normalizers, counts, sums)


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
    precision = full_precision(variance, sums.shape[-1])
    prior_precision = prior.prior_variance.reciprocal()
    posterior_precision = prior_precision + counts.unsqueeze(-1) * precision
    loc = (prior.prior_mean * prior_precision + sums * precision) / posterior_precision
    return loc, posterior_precision.rsqrt()


def update_variance(
    total_x_squared: torch.Tensor,
    num_data: int,
    counts: torch.Tensor,
    sums: torch.Tensor,
    loc: torch.Tensor,
    scale: torch.Tensor,
    isotropic: bool,
) -> torch.Tensor:
    """Return the closed-form M-step for ``s^2``: the expected squared residual per coordinate.

    ``sum_nk r_nk E[(x_nd - mu_kd)^2] = sum_n x_nd^2 - 2 sum_k S_kd m_kd
    + sum_k N_k (m_kd^2 + t_kd^2)`` because the responsibilities of each datum sum to one.

    :param torch.Tensor total_x_squared: ``sum_n x_n ** 2`` of shape (D,).
    """
    residual = total_x_squared - 2 * (sums * loc).sum(0)
    residual = residual + counts @ (loc.square() + scale.square())
    variance = residual / num_data
    if isotropic:
        variance = variance.mean()
    return variance.clamp_min(torch.finfo(variance.dtype).tiny)


def global_terms(posterior: Posterior, prior: Prior) -> torch.Tensor:
    """Return ``-KL(q(mu) || p(mu)) - KL(q(v) || p(v))``, the ELBO terms of the global variables."""
    variance_ratio = posterior.memory_scale.square() / prior.prior_variance
    squared_offset = (posterior.memory_loc - prior.prior_mean).square() / prior.prior_variance
    kl_memories = 0.5 * (variance_ratio + squared_offset - 1 - variance_ratio.log()).sum()
    num_sticks = posterior.num_memories - 1
    if num_sticks == 0:
        return -kl_memories
    like = posterior.stick_concentration1
    index = torch.arange(1, num_sticks + 1, dtype=like.dtype, device=like.device)
    prior_sticks = Beta(
        torch.full_like(like, 1.0 - prior.discount),
        prior.concentration + prior.discount * index,
    )
    kl_sticks = kl_divergence(
        Beta(posterior.stick_concentration1, posterior.stick_concentration0), prior_sticks
    ).sum()
    return -kl_memories - kl_sticks


def global_step(
    step: LocalStep, total_x_squared, num_data: int, posterior: Posterior, prior: Prior
) -> Posterior:
    """Update the sticks, the memories and (when learned) the variance, in that order."""
    concentration1, concentration0 = update_sticks(step.counts, prior)
    loc, scale = update_memories(step.counts, step.sums, posterior.variance, prior)
    variance = posterior.variance
    if prior.learn_variance:
        variance = update_variance(
            total_x_squared, num_data, step.counts, step.sums, loc, scale, prior.isotropic
        )
    return Posterior(concentration1, concentration0, loc, scale, variance)


def hard_assignment_posterior(
    x: torch.Tensor, labels: torch.Tensor, num_memories: int, variance, prior: Prior
) -> Posterior:
    """Build the posterior that one global step gives from one-hot responsibilities ``labels``.

    The variance, when learned, starts at the pooled within-memory variance of the labelling.
    """
    responsibilities = torch.nn.functional.one_hot(labels, num_memories).to(x.dtype)
    counts = responsibilities.sum(0)
    sums = responsibilities.T @ x
    if prior.learn_variance:
        means = sums / counts.clamp_min(1).unsqueeze(-1)
        residual = (x - means[labels]).square().sum(0) / x.shape[0]
        variance = residual.mean() if prior.isotropic else residual
        variance = variance.clamp_min(1e-6 * float(x.var(0).mean().clamp_min(1e-12)))
    step = LocalStep(responsibilities, torch.zeros(0), counts, sums)
    concentration1, concentration0 = update_sticks(counts, prior)
    loc, scale = update_memories(step.counts, step.sums, variance, prior)
    return Posterior(concentration1, concentration0, loc, scale, variance)


def new_memory_posterior(x: torch.Tensor, variance: torch.Tensor, prior: Prior):
    """Return ``q(mu)`` given one datum alone: mean ``(s0^2 x + s^2 m0) / (s0^2 + s^2)``."""
    dim = x.shape[-1]
    noise_variance = full_precision(variance, dim).reciprocal()
    total = prior.prior_variance + noise_variance
    loc = (prior.prior_variance * x + noise_variance * prior.prior_mean) / total
    scale = (prior.prior_variance * noise_variance / total).sqrt()
    return loc, scale
