"""The von Mises-Fisher distribution on the unit sphere S^{D-1} in R^D, for any D >= 2.

With mean direction ``mu`` (a unit vector) and concentration ``kappa >= 0``, the density with
respect to the surface measure of the sphere is::

    f(x; mu, kappa) = C_D(kappa) exp(kappa mu.x)
    C_D(kappa) = kappa^(D/2 - 1) / ((2 pi)^(D/2) I_(D/2 - 1)(kappa))
    E[x] = A_D(kappa) mu,          A_D(kappa) = I_(D/2)(kappa) / I_(D/2 - 1)(kappa)
    H = -log C_D(kappa) - kappa A_D(kappa)

At ``kappa = 0`` it is the uniform law, ``C_D(0) = Gamma(D/2) / (2 pi^(D/2))``. Draws use Wood's
rejection sampler for the component ``w = mu.x`` (A. T. A. Wood, "Simulation of the von
Mises-Fisher distribution", Communications in Statistics - Simulation and Computation 23(1),
1994), a uniform direction in the tangent space, and the Householder reflection that maps the
first basis vector to ``mu``.
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution

from pyro_am._validation import as_float_tensor
from pyro_am.special import bessel_ratio, log_bessel_iv


def log_vmf_normalizer(dim: int, concentration: torch.Tensor) -> torch.Tensor:
    """Compute ``log C_D(kappa)``, the log normalizer of the vMF density on S^{D-1}.

    Exact at ``kappa = 0`` (the log of one over the sphere's surface area).

    :param int dim: ambient dimension D >= 2.
    :param torch.Tensor concentration: kappa >= 0, any shape.
    """
    nu = 0.5 * dim - 1
    log_uniform = math.lgamma(0.5 * dim) - math.log(2.0) - 0.5 * dim * math.log(math.pi)
    # nu log(kappa) and log I_nu(kappa) nearly cancel at small kappa and large nu, so lower
    # precisions are evaluated in float64 and rounded once at the end.
    dtype = concentration.dtype
    kappa = concentration if dtype == torch.float64 else concentration.to(torch.float64)
    zero = kappa == 0
    safe = torch.where(zero, torch.ones_like(kappa), kappa)
    value = nu * torch.log(safe) - 0.5 * dim * math.log(2 * math.pi) - log_bessel_iv(nu, safe)
    return torch.where(zero, torch.full_like(value, log_uniform), value).to(dtype)


def mean_resultant_length(dim: int, concentration: torch.Tensor) -> torch.Tensor:
    """Compute ``A_D(kappa) = I_(D/2)(kappa) / I_(D/2 - 1)(kappa)``, the norm of the vMF mean."""
    return bessel_ratio(0.5 * dim - 1, concentration)


# From kappa >= max(_SERIES_MIN_KAPPA, nu^2 / 2) on, the j-th term of the Hankel series is at most
# about 1/j + 0.01 times the one before, so _HANKEL_TERMS terms leave a relative remainder near
# 1/20! ~ 4e-19, far below float64 rounding.
_SERIES_MIN_KAPPA = 1000.0
_HANKEL_TERMS = 20


def _hankel_series(nu: float, inverse_kappa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``S(x) = sum_j (-1)^j a_j(nu) x^j`` and ``dS/dx`` at ``x = 1 / kappa``.

    ``I_nu(kappa) ~ exp(kappa) S(1 / kappa) / sqrt(2 pi kappa)`` as kappa grows, with
    ``a_j(nu) = prod_{i<=j} (4 nu^2 - (2i - 1)^2) / (8 i)`` (DLMF 10.40.1).
    """
    x = inverse_kappa
    squared_order = 4.0 * nu * nu
    coefficient = torch.ones_like(x)
    total = torch.ones_like(x)
    derivative = torch.zeros_like(x)
    power = torch.ones_like(x)
    for j in range(1, _HANKEL_TERMS + 1):
        coefficient = coefficient * (squared_order - (2 * j - 1) ** 2) / (8 * j)
        signed = -coefficient if j % 2 else coefficient
        derivative = derivative + j * signed * power
        power = power * x
        total = total + signed * power
    return total, derivative


def mean_direction_variance(dim: int, concentration: torch.Tensor) -> torch.Tensor:
    """Compute ``Var[mu.x] = A_D'(kappa) = 1 - A_D^2 - (D - 1) A_D / kappa``, in float64.

    At large kappa the closed form loses every digit to cancellation (the result is about
    ``(D - 1) / (2 kappa^2)``), so there ``A_D = S_(nu+1) / S_nu`` with the Hankel series of
    :func:`_hankel_series` is differentiated instead, which keeps full relative precision.
    At ``kappa = 0`` the value is ``E[(mu.x)^2] = 1 / D``.
    """
    nu = 0.5 * dim - 1
    kappa = concentration.to(torch.float64)
    zero = kappa == 0
    safe = torch.where(zero, torch.ones_like(kappa), kappa)
    length = mean_resultant_length(dim, safe)
    closed_form = 1 - length.square() - (dim - 1) * length / safe

    large = safe >= max(_SERIES_MIN_KAPPA, 0.5 * nu * nu)
    x = torch.where(large, safe, torch.full_like(safe, _SERIES_MIN_KAPPA)).reciprocal()
    series, series_derivative = _hankel_series(nu, x)
    next_series, next_derivative = _hankel_series(nu + 1, x)
    # A' = d/dkappa (S_(nu+1) / S_nu) = -x^2 d/dx (S_(nu+1) / S_nu).
    wronskian = next_derivative * series - next_series * series_derivative
    asymptotic = -x.square() * wronskian / series.square()

    # NOTE: below the threshold the closed form keeps the absolute error of bessel_ratio, about
    # 1e-12 near A_D = 1. Against mpmath that is a relative error under 2e-8 for D <= 512, but
    # up to 3e-4 at D = 1024 and kappa = 1e5.
    variance = torch.where(large, asymptotic, closed_form)
    return torch.where(zero, torch.full_like(variance, 1.0 / dim), variance)


class VonMisesFisher(TorchDistribution):
    """Von Mises-Fisher distribution on the unit sphere in ``R^D`` for any ``D >= 2``.

    This is the Gaussian of directional data: a law of unit vectors peaked at ``loc`` with
    concentration ``kappa``. It is the component distribution of the vMF mixtures that softmax
    attention after a LayerNorm or RMSNorm computes posteriors of (see :mod:`pyro_am.attention`),
    and the likelihood of the vMF mixture memory in :mod:`pyro_am.models.vmf_mixture`. Pyro's own
    ``VonMises3D`` covers only D = 3 and implements no sampler.

    :meth:`log_prob` is exact (the normalizer uses :func:`pyro_am.special.log_bessel_iv`) and
    differentiable in ``loc`` and ``concentration``, so both can be Pyro parameters fitted by SVI
    with this distribution as an observed likelihood.

    .. note:: :meth:`sample` is not reparameterized (``has_rsample = False``): Wood's sampler
        accepts or rejects proposals, so draws carry no gradient. Use it for observed sites, or
        with a score-function ELBO for latent sites.

    :param torch.Tensor loc: mean direction of shape (\\*batch, D), unit norm.
    :param concentration: kappa >= 0, broadcastable to the batch shape.
    :param bool validate_args: whether to check the parameters and the values passed to
        :meth:`log_prob` against their constraints.
    """

    arg_constraints = {
        "loc": constraints.sphere,
        "concentration": constraints.nonnegative,
    }
    support = constraints.sphere
    has_rsample = False

    def __init__(self, loc, concentration, validate_args=None):
        loc = as_float_tensor("loc", loc)
        if loc.dim() < 1 or loc.shape[-1] < 2:
            raise ValueError(
                f"loc must have shape (*batch, D) with D >= 2, but has shape {tuple(loc.shape)}."
            )
        concentration = as_float_tensor("concentration", concentration, like=loc)
        try:
            batch_shape = torch.broadcast_shapes(loc.shape[:-1], concentration.shape)
        except RuntimeError as error:
            raise ValueError(
                f"concentration of shape {tuple(concentration.shape)} does not broadcast with "
                f"the batch shape {tuple(loc.shape[:-1])} of loc."
            ) from error
        self.loc = loc.expand(batch_shape + loc.shape[-1:])
        self.concentration = concentration.expand(batch_shape)
        super().__init__(batch_shape, loc.shape[-1:], validate_args=validate_args)

    @staticmethod
    def infer_shapes(loc, concentration):
        return torch.broadcast_shapes(loc[:-1], concentration), loc[-1:]

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        new = self._get_checked_instance(VonMisesFisher, _instance)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new.concentration = self.concentration.expand(batch_shape)
        super(VonMisesFisher, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self.__dict__.get("_validate_args")
        return new

    @property
    def dim(self) -> int:
        return self.event_shape[0]

    @property
    def mean(self) -> torch.Tensor:
        length = mean_resultant_length(self.dim, self.concentration)
        return length.unsqueeze(-1) * self.loc

    @property
    def variance(self) -> torch.Tensor:
        """Coordinate variances, the diagonal of the covariance.

        ``Cov[x] = (A_D / kappa) I + (1 - D A_D / kappa - A_D^2) mu mu^T``, from
        ``E[x x^T] = (A_D / kappa) I + (1 - D A_D / kappa) mu mu^T``. At ``kappa = 0`` the limit
        ``A_D / kappa = 1 / D`` is used. The variance along ``mu``, ``1 - (D - 1) A_D / kappa -
        A_D^2``, comes from :func:`mean_direction_variance`, which stays accurate (and positive)
        at large kappa.
        """
        # In float64, because along and ratio nearly cancel in the coordinates near mu.
        kappa = self.concentration.to(torch.float64)
        zero = kappa == 0
        safe = torch.where(zero, torch.ones_like(kappa), kappa)
        length = mean_resultant_length(self.dim, safe)
        ratio = torch.where(zero, torch.full_like(kappa, 1.0 / self.dim), length / safe)
        along = mean_direction_variance(self.dim, kappa) - ratio
        variance = ratio.unsqueeze(-1) + along.unsqueeze(-1) * self.loc.to(torch.float64).square()
        return variance.to(self.loc.dtype)

    @property
    def mode(self) -> torch.Tensor:
        return self.loc

    def log_normalizer(self) -> torch.Tensor:
        """Compute ``log C_D(kappa)`` for each batch element."""
        return log_vmf_normalizer(self.dim, self.concentration)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Compute the log density on the sphere with respect to surface measure, shape (...)."""
        if self._validate_args:
            self._validate_sample(value)
        return self.log_normalizer() + self.concentration * (value * self.loc).sum(-1)

    def entropy(self) -> torch.Tensor:
        length = mean_resultant_length(self.dim, self.concentration)
        return -self.log_normalizer() - self.concentration * length

    def sample(self, sample_shape=()) -> torch.Tensor:
        """Draw samples of shape ``sample_shape + batch_shape + (D,)`` by Wood's algorithm."""
        shape = self._extended_shape(torch.Size(sample_shape))
        if not bool(torch.isfinite(self.concentration).all()):
            # Wood's acceptance test is NaN for an infinite or NaN kappa, so it would never stop.
            raise ValueError(
                "concentration must be finite to sample, but it contains "
                f"{self.concentration[~torch.isfinite(self.concentration)].flatten()[0].item()}; "
                "pass values in [0, inf)."
            )
        with torch.no_grad():
            loc = self.loc.detach()
            kappa = self.concentration.detach().expand(shape[:-1])
            w, one_minus_w = _sample_cosine(kappa, self.dim)
            # Fill the draws in place: column 0 is w, the others a uniform tangent direction
            # scaled by sqrt(1 - w^2), which is computed from 1 - w to keep precision near w = 1.
            draws = torch.randn(shape, dtype=loc.dtype, device=loc.device)
            tangent = draws[..., 1:]
            sine = torch.sqrt((one_minus_w * (2 - one_minus_w)).clamp(min=0))
            tangent.mul_((sine / tangent.norm(dim=-1)).unsqueeze(-1))
            draws[..., 0] = w
            return _reflect_first_axis_to(draws, loc)


def _sample_cosine(kappa: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``w = mu.x`` by Wood's rejection sampler; return ``(w, 1 - w)``.

    Every pending draw gets a proposal at once, and the loop runs only while some draw is still
    pending. Each round accepts a fixed fraction of the pending draws on average, so the number of
    rounds grows like the log of the number of draws.
    """
    dtype, device = kappa.dtype, kappa.device
    m1 = float(dim - 1)
    # b = (-2 kappa + sqrt(4 kappa^2 + (D-1)^2)) / (D-1), in the cancellation-free form.
    b = m1 / (2 * kappa + torch.sqrt(4 * kappa.square() + m1**2))
    # 1 - x0 with x0 = (1 - b) / (1 + b); the acceptance test below is written in 1 - x0 and
    # 1 - w so that it keeps its precision when kappa is large and both are near 1.
    one_minus_x0 = 2 * b / (1 + b)
    half = torch.tensor(0.5 * m1, dtype=dtype, device=device)
    beta = torch.distributions.Beta(half, half)

    w = torch.empty(kappa.shape, dtype=dtype, device=device)
    one_minus_w = torch.empty(kappa.shape, dtype=dtype, device=device)
    flat_w, flat_one_minus_w = w.view(-1), one_minus_w.view(-1)
    flat_b, flat_one_minus_x0, flat_kappa = (t.reshape(-1) for t in (b, one_minus_x0, kappa))
    index = torch.arange(flat_w.numel(), device=device)
    while index.numel() > 0:
        bi, ki = flat_b[index], flat_kappa[index]
        z = beta.sample(index.shape)
        denominator = 1 - (1 - bi) * z
        proposal = (1 - (1 + bi) * z) / denominator
        proposal_one_minus = 2 * bi * z / denominator
        uniform = torch.rand(index.shape, dtype=dtype, device=device)
        # Wood's test is kappa w + (D-1) log(1 - x0 w) - c >= log u, where
        # c = kappa x0 + (D-1) log(1 - x0^2), 1 - x0^2 = 4 b / (1 + b)^2 and
        # 1 - x0 w = (2 b + (1 - b)(1 - w)) / (1 + b).
        log_ratio = ki * (flat_one_minus_x0[index] - proposal_one_minus) + m1 * (
            torch.log(2 * bi + (1 - bi) * proposal_one_minus)
            + torch.log1p(bi)
            - math.log(4.0)
            - torch.log(bi)
        )
        accepted = log_ratio >= torch.log(uniform)
        done = index[accepted]
        flat_w[done] = proposal[accepted]
        flat_one_minus_w[done] = proposal_one_minus[accepted]
        index = index[~accepted]
    return w, one_minus_w


def _reflect_first_axis_to(draws: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    """Apply, in place, the Householder reflection H with H e_1 = loc to draws of shape (..., D).

    ``H x = x - 2 n (n.x) / |n|^2`` with ``n = e_1 - loc``; at ``loc = e_1`` it is the identity.
    """
    normal = -loc.clone()
    normal[..., 0] += 1
    squared = normal.square().sum(-1, keepdim=True)
    near_axis = squared == 0
    normal = torch.where(near_axis, torch.zeros_like(normal), normal)
    normal = normal * torch.sqrt(2 / torch.where(near_axis, torch.ones_like(squared), squared))
    if normal.dim() == 1:
        # One mean direction for all draws: a rank-one update, x <- x - (x.n) n.
        flat = draws.view(-1, draws.shape[-1])
        flat.addr_(flat @ normal, normal, alpha=-1)
        return draws
    projection = (draws * normal).sum(-1, keepdim=True)
    return draws.sub_(projection * normal)


__all__ = [
    "VonMisesFisher",
    "log_vmf_normalizer",
    "mean_direction_variance",
    "mean_resultant_length",
]
