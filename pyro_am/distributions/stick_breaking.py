"""Truncated stick-breaking weights: the Dirichlet and Pitman-Yor process priors on the simplex.

For sticks ``v_k ~ Beta(a_k, b_k)``, ``k = 1 .. K-1``, the weights are::

    w_k = v_k prod_{j<k} (1 - v_j)   for k < K,      w_K = prod_{j<K} (1 - v_j)

so they sum to one exactly. The Pitman-Yor process with discount ``0 <= d < 1`` and concentration
``alpha > 0`` has ``a_k = 1 - d`` and ``b_k = alpha + k d``; ``d = 0`` is the Dirichlet process.

The density of the weights follows by change of variables. With remainders
``r_k = 1 - sum_{j<k} w_j = sum_{j>=k} w_j`` the sticks are ``v_k = w_k / r_k`` and
``1 - v_k = r_{k+1} / r_k``, and the map from sticks to ``(w_1 .. w_{K-1})`` is triangular with
diagonal ``dw_k / dv_k = r_k``, so::

    log p(w) = sum_{k<K} [log Beta(v_k; a_k, b_k) - log r_k]

Every term is computed from ``log w`` and ``log r``, with ``r`` summed from the tail so that it
keeps full relative accuracy when the remainder is tiny. Because the weights are one bijection of
independent sticks, the KL divergence between two stick-breaking laws is the sum of the Beta KL
divergences of their sticks, which is registered with :func:`torch.distributions.kl_divergence`.
"""

from __future__ import annotations

import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import Beta, kl_divergence, register_kl
from torch.distributions.utils import broadcast_all

from pyro_am._validation import check_int, check_interval


def _tiny(tensor: torch.Tensor) -> float:
    return torch.finfo(tensor.dtype).tiny


class BetaStickBreaking(TorchDistribution):
    """Weights on the simplex built by breaking a unit stick with independent Beta sticks.

    This is the general family behind :class:`StickBreakingWeights`, with one Beta law per stick.
    Use it as the variational family ``q(w)`` of a truncated stick-breaking prior: the guide
    samples the same ``"weights"`` site as the model, from per-stick ``Beta(a_k, b_k)``, and
    ``rsample`` is reparameterized through the Beta draws::

        a = pyro.param("a", torch.ones(K - 1), constraint=constraints.positive)
        b = pyro.param("b", torch.ones(K - 1), constraint=constraints.positive)
        pyro.sample("weights", BetaStickBreaking(a, b))

    :param torch.Tensor concentration1: the first Beta parameters ``a_k > 0`` of the sticks, of
        shape (..., K - 1). The batch shape is ``(...)`` and the event shape is ``(K,)``.
    :param torch.Tensor concentration0: the second Beta parameters ``b_k > 0``, same shape.
    :param bool validate_args: whether to check parameters and values against their constraints.
    """

    arg_constraints = {
        "concentration1": constraints.independent(constraints.positive, 1),
        "concentration0": constraints.independent(constraints.positive, 1),
    }
    support = constraints.simplex
    has_rsample = True

    def __init__(self, concentration1, concentration0, validate_args=None):
        concentration1, concentration0 = broadcast_all(concentration1, concentration0)
        if concentration1.dim() < 1:
            raise ValueError(
                "concentration1 and concentration0 must have shape (..., truncation - 1), "
                f"but have shape {tuple(concentration1.shape)}."
            )
        self.concentration1 = concentration1
        self.concentration0 = concentration0
        batch_shape = concentration1.shape[:-1]
        event_shape = torch.Size([concentration1.shape[-1] + 1])
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    @staticmethod
    def infer_shapes(concentration1, concentration0):
        shape = torch.broadcast_shapes(concentration1, concentration0)
        return shape[:-1], torch.Size([shape[-1] + 1])

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(BetaStickBreaking, _instance)
        batch_shape = torch.Size(batch_shape)
        stick_shape = batch_shape + self.concentration1.shape[-1:]
        new.concentration1 = self.concentration1.expand(stick_shape)
        new.concentration0 = self.concentration0.expand(stick_shape)
        super(BetaStickBreaking, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def truncation(self) -> int:
        return self.event_shape[0]

    @property
    def sticks(self) -> Beta:
        """The independent Beta laws of the K - 1 sticks, batch shape (..., K - 1)."""
        # Arguments were validated by this distribution; Beta cannot validate zero sticks.
        return Beta(self.concentration1, self.concentration0, validate_args=False)

    # -- moments ---------------------------------------------------------------------------------
    def _stick_moments(self, power: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``E[v^p]`` and ``E[(1 - v)^p]`` for p = 1 or 2."""
        a, b = self.concentration1, self.concentration0
        total = a + b
        if power == 1:
            return a / total, b / total
        denominator = total * (total + 1)
        return a * (a + 1) / denominator, b * (b + 1) / denominator

    def _weight_moment(self, power: int) -> torch.Tensor:
        # By independence of the sticks, E[w_k^p] = E[v_k^p] prod_{j<k} E[(1 - v_j)^p].
        stick, rest = self._stick_moments(power)
        survival = torch.cumprod(rest, dim=-1)
        ones = survival.new_ones(survival.shape[:-1] + (1,))
        before = torch.cat([ones, survival], dim=-1)
        return before * torch.cat([stick, ones], dim=-1)

    @property
    def mean(self) -> torch.Tensor:
        return self._weight_moment(1)

    @property
    def variance(self) -> torch.Tensor:
        return self._weight_moment(2) - self._weight_moment(1).square()

    def expected_log_weights(self) -> torch.Tensor:
        """Compute ``E[log w_k]`` in closed form (digamma), of shape (..., K).

        ``E[log v] = psi(a) - psi(a + b)`` and ``E[log(1 - v)] = psi(b) - psi(a + b)``; this is the
        term that enters the coordinate-ascent responsibilities of a stick-breaking mixture.
        """
        a, b = self.concentration1, self.concentration0
        digamma_total = torch.digamma(a + b)
        log_stick = torch.digamma(a) - digamma_total
        log_rest = torch.digamma(b) - digamma_total
        zeros = log_rest.new_zeros(log_rest.shape[:-1] + (1,))
        before = torch.cat([zeros, log_rest.cumsum(-1)], dim=-1)
        return before + torch.cat([log_stick, zeros], dim=-1)

    # -- sampling and density --------------------------------------------------------------------
    def rsample(self, sample_shape=()) -> torch.Tensor:
        sample_shape = torch.Size(sample_shape)
        shape = self._extended_shape(sample_shape)
        if self.truncation == 1:
            return self.concentration1.new_ones(shape)
        sticks = self.sticks.rsample(sample_shape)
        # A Beta draw with a parameter near zero can round to exactly 0 or 1. Clamping keeps
        # log v and log(1 - v) finite without moving draws that are representable.
        tiny = _tiny(sticks)
        sticks = sticks.clamp(tiny, 1 - torch.finfo(sticks.dtype).eps)
        log_rest = torch.log1p(-sticks).cumsum(-1)
        log_before = torch.cat([torch.zeros_like(log_rest[..., :1]), log_rest], dim=-1)
        log_weights = log_before + torch.cat([sticks.log(), torch.zeros_like(sticks[..., :1])], -1)
        weights = log_weights.exp()
        return weights.reshape(shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        tiny = _tiny(value)
        weights = value.clamp_min(tiny)
        # r_k = sum_{j>=k} w_j, summed from the tail so that small remainders stay accurate.
        remainders = weights.flip(-1).cumsum(-1).flip(-1)
        log_weights = weights.log()
        log_remainders = remainders.log()
        log_sticks = log_weights[..., :-1] - log_remainders[..., :-1]
        log_rests = log_remainders[..., 1:] - log_remainders[..., :-1]
        a, b = self.concentration1, self.concentration0
        log_beta = torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)
        terms = (a - 1) * log_sticks + (b - 1) * log_rests - log_beta - log_remainders[..., :-1]
        return terms.sum(-1)

    def entropy(self) -> torch.Tensor:
        # H[w] = H[v] + E[log |dw/dv|] = sum_k H[v_k] + sum_k E[log r_k],
        # with E[log r_k] = sum_{j<k} E[log(1 - v_j)].
        a, b = self.concentration1, self.concentration0
        log_rest = torch.digamma(b) - torch.digamma(a + b)
        expected_log_remainders = log_rest.cumsum(-1) - log_rest
        return (self.sticks.entropy() + expected_log_remainders).sum(-1)


class StickBreakingWeights(BetaStickBreaking):
    """Truncated stick-breaking prior of the Dirichlet process (``discount = 0``) or Pitman-Yor
    process (``0 <= discount < 1``) on the simplex of size ``truncation``.

    The sticks are ``v_k ~ Beta(1 - d, alpha + k d)`` for ``k = 1 .. truncation - 1`` and the last
    weight takes the remainder. Use it as the prior of the mixing weights of a mixture with an
    unknown number of components::

        weights = pyro.sample("weights", StickBreakingWeights(1.0, truncation=20))
        with pyro.plate("data", N):
            pyro.sample("obs", GaussianMixture(locs, scale, weights=weights), obs=data)

    Its density, mean and KL divergence are those of :class:`BetaStickBreaking`. Truncation 1 is
    the point mass on ``w = (1,)``, whose log density is 0.

    :param concentration: the concentration alpha > 0, a float or a tensor of batch shape.
    :param int truncation: the number of weights K >= 1.
    :param float discount: the Pitman-Yor discount d in [0, 1).
    :param bool validate_args: whether to check parameters and values against their constraints.
    """

    arg_constraints = {
        "concentration": constraints.positive,
        "concentration1": constraints.independent(constraints.positive, 1),
        "concentration0": constraints.independent(constraints.positive, 1),
    }

    def __init__(self, concentration, truncation: int, discount=0.0, validate_args=None):
        truncation = check_int("truncation", truncation, minimum=1)
        discount = check_interval("discount", discount, 0.0, 1.0)
        if not isinstance(concentration, torch.Tensor):
            concentration = torch.as_tensor(concentration, dtype=torch.get_default_dtype())
        if not bool((concentration > 0).all()) or not bool(torch.isfinite(concentration).all()):
            raise ValueError(
                f"concentration must be finite and in (0, inf), but got {concentration!r}."
            )
        self.concentration = concentration
        self.discount = discount
        index = torch.arange(1, truncation, dtype=concentration.dtype, device=concentration.device)
        concentration0 = concentration.unsqueeze(-1) + discount * index
        concentration1 = torch.full_like(concentration0, 1.0 - discount)
        super().__init__(concentration1, concentration0, validate_args=validate_args)

    @staticmethod
    def infer_shapes(concentration, truncation, discount=0.0):
        return concentration, torch.Size([truncation])

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(StickBreakingWeights, _instance)
        new = super().expand(batch_shape, _instance=new)
        new.concentration = self.concentration.expand(torch.Size(batch_shape))
        new.discount = self.discount
        return new


@register_kl(BetaStickBreaking, BetaStickBreaking)
def _kl_stick_breaking(p: BetaStickBreaking, q: BetaStickBreaking) -> torch.Tensor:
    if p.event_shape != q.event_shape:
        raise ValueError(
            f"KL divergence needs equal truncations, but got {p.truncation} and {q.truncation}."
        )
    return kl_divergence(p.sticks, q.sticks).sum(-1)


__all__ = ["BetaStickBreaking", "StickBreakingWeights"]
