"""Gaussian mixture likelihood with the assignment marginalized in GEMM form.

For weights ``pi_k``, means ``mu_k`` and standard deviations ``s_k`` (one shared scalar, one per
component, or one per component and coordinate)::

    log p(x) = log sum_k pi_k N(x; mu_k, diag(s_k^2))
    r_k(x) = pi_k N(x; mu_k, diag(s_k^2)) / p(x)          (responsibilities)
    E[x] = sum_k pi_k mu_k,   Var[x]_d = sum_k pi_k (s_kd^2 + mu_kd^2) - E[x]_d^2

The log-likelihood is :class:`pyro_am.energies.GaussianMixtureEnergy`: the component log densities
are affine in ``[x, x^2]``, so every query is scored against every component by one matrix product
and one streamed log-sum-exp, instead of the (..., K, D) broadcast that
``MixtureSameFamily(Categorical, Independent(Normal))`` builds.
"""

from __future__ import annotations

import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution

from pyro_am.energies import GaussianMixtureEnergy


class GaussianMixture(TorchDistribution):
    """Mixture of diagonal Gaussians over ``R^D`` whose ``log_prob`` sums out the component.

    Use it as the observation site of a mixture memory model, where the memories are the component
    means and the assignment of each datum is marginalized rather than sampled::

        locs = pyro.param("locs", init_locs)
        with pyro.plate("data", len(data), subsample_size=256) as index:
            pyro.sample("obs", GaussianMixture(locs, scale), obs=data[index])

    It computes the same density as
    ``MixtureSameFamily(Categorical(logits), Independent(Normal(locs, scales), 1))``, and is faster
    because the squared distances are expanded in GEMM form (see
    :class:`~pyro_am.energies.GaussianMixtureEnergy`). Gradients flow to ``locs``, ``scales`` and
    ``logits`` (or ``weights``).

    .. note:: The parameters describe one mixture, so ``batch_shape`` is ``()`` at construction.
        :meth:`expand` (used by :class:`pyro.plate`) gives a larger batch shape that shares the same
        parameters. Batched parameters, for example one mixture per particle, are not supported.
        :meth:`sample` draws a discrete component first, so there is no ``rsample``.

    :param torch.Tensor locs: component means of shape (K, D).
    :param scales: component standard deviations, positive, of shape () (shared and isotropic),
        (K,) (isotropic per component) or (K, D) (diagonal per component).
    :param torch.Tensor logits: unnormalized log mixing weights of shape (K,).
    :param torch.Tensor weights: mixing weights of shape (K,), positive and summing to one. Give
        ``logits`` or ``weights``, not both; with neither the weights are uniform.
    :param int block_elements: the largest number of logits held at once while streaming; the
        default is that of :func:`pyro_am.streaming.softmax_statistics`.
    :param bool validate_args: whether to check the parameters and the values passed to
        :meth:`log_prob` against their constraints.
    """

    arg_constraints = {
        "locs": constraints.real,
        "scales": constraints.positive,
        "logits": constraints.real_vector,
    }
    support = constraints.real_vector
    has_rsample = False

    def __init__(
        self,
        locs,
        scales,
        logits=None,
        weights=None,
        *,
        block_elements: int | None = None,
        validate_args=None,
    ):
        if isinstance(locs, torch.Tensor) and locs.dim() != 2:
            raise ValueError(
                f"locs must have shape (num_components, dim), but has shape {tuple(locs.shape)}."
            )
        # The energy checks shapes and values of every argument and stores the normalized log
        # weights, so the distribution keeps a reference to it instead of copies of the checks.
        self._energy = GaussianMixtureEnergy(
            locs, scales, weights=weights, logits=logits, block_elements=block_elements
        )
        self.locs = self._energy.means
        self.scales = self._energy.scales
        self.logits = self._energy.log_weights
        super().__init__(torch.Size(), self.locs.shape[-1:], validate_args=validate_args)

    @staticmethod
    def infer_shapes(locs, scales, logits=None, weights=None):
        return torch.Size(), locs[-1:]

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(GaussianMixture, _instance)
        new._energy = self._energy
        new.locs = self.locs
        new.scales = self.scales
        new.logits = self.logits
        super(GaussianMixture, new).__init__(
            torch.Size(batch_shape), self.event_shape, validate_args=False
        )
        new._validate_args = self.__dict__.get("_validate_args")
        return new

    @property
    def energy(self) -> GaussianMixtureEnergy:
        """The :class:`~pyro_am.energies.GaussianMixtureEnergy` ``-log p(x)`` of this mixture."""
        return self._energy

    @property
    def num_components(self) -> int:
        return self.locs.shape[0]

    @property
    def weights(self) -> torch.Tensor:
        """Mixing weights of shape (K,), the softmax of :attr:`logits`."""
        return self.logits.exp()

    @property
    def component_scales(self) -> torch.Tensor:
        """Standard deviations broadcast to shape (K, D)."""
        scales = self.scales
        if scales.dim() == 1:
            scales = scales.unsqueeze(-1)
        return scales.expand_as(self.locs)

    @property
    def mean(self) -> torch.Tensor:
        mean = self.weights @ self.locs
        return mean.expand(self.batch_shape + self.event_shape)

    @property
    def variance(self) -> torch.Tensor:
        second_moment = self.weights @ (self.component_scales.square() + self.locs.square())
        variance = second_moment - (self.weights @ self.locs).square()
        return variance.expand(self.batch_shape + self.event_shape)

    def _result_shape(self, value: torch.Tensor) -> torch.Size:
        return torch.broadcast_shapes(value.shape[:-1], self.batch_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Compute ``log sum_k pi_k N(value; mu_k, diag(s_k^2))`` for value of shape (..., D)."""
        if self._validate_args:
            self._validate_sample(value)
        log_prob = self._energy.log_prob(value)
        return log_prob.expand(self._result_shape(value))

    def responsibilities(self, value: torch.Tensor) -> torch.Tensor:
        """Compute the posterior component probabilities ``p(z = k | value)``, of shape (..., K)."""
        if self._validate_args:
            self._validate_sample(value)
        responsibilities = self._energy.responsibilities(value)
        return responsibilities.expand(self._result_shape(value) + (self.num_components,))

    def sample(self, sample_shape=()) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            components = torch.distributions.Categorical(logits=self.logits).sample(shape[:-1])
            noise = torch.randn(shape, dtype=self.locs.dtype, device=self.locs.device)
            return self.locs[components] + self.component_scales[components] * noise


__all__ = ["GaussianMixture"]
