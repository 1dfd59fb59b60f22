"""An amortized variational guide: a set encoder maps a context to a mixture memory's posterior.

The memory model for one data set ``D = (x_1 .. x_n)`` is a K-component isotropic Gaussian
mixture::

    mu_k ~ N(0, prior_std^2 I),   w ~ p(w),   s_k ~ LogNormal(scale_loc, scale_std)
    x_i | mu, w, s ~ sum_k w_k N(mu_k, s_k^2 I)

with ``p(w) = Dirichlet(concentration 1_K)`` (``weights_prior="dirichlet"``) or the truncated
stick-breaking prior of a Dirichlet process with concentration alpha (``"stick_breaking"``,
:class:`~pyro_am.distributions.StickBreakingWeights`), which lets the posterior leave components
unused. The guide is::

    q(mu, w, s | D) = prod_k N(mu_k; a_k, diag(b_k^2)) q(w) prod_k LogNormal(s_k; e_k, f_k)

with ``q(w) = Dirichlet(c)`` or ``BetaStickBreaking(c1, c0)``. All its parameters come from one
permutation-invariant :class:`~pyro_am.models.set_encoder.SetEncoder` ``g_phi(D)``, trained by SVI
on many data sets at once, so a new context gets its posterior in one forward pass. Each posterior
mean ``a_k`` is the mean of the context points weighted by seed k's pooling attention plus a
learned correction, which gives the encoder a head start at locating the clusters.

The posterior predictive is a normalized in-context energy. For S guide draws ``theta_s``::

    p_S(x | D) = (1/S) sum_s p(x | theta_s)

is a mixture of S K-component Gaussian mixtures, so it integrates to one for every S and every set
of draws. As S grows it tends to the guide's predictive ``E_q[p(x | theta)]``.
"""

from __future__ import annotations

import logging
import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_am._validation import check_finite, check_int, check_positive
from pyro_am.distributions import BetaStickBreaking, StickBreakingWeights
from pyro_am.models.set_encoder import SetEncoder

logger = logging.getLogger(__name__)

WEIGHTS_PRIORS = ("dirichlet", "stick_breaking")


class NonFiniteGuideError(RuntimeError):
    """The encoder produced NaN or infinite variational parameters."""


class AmortizedMixtureGuide:
    """Amortized SVI for a Gaussian mixture memory across many data sets.

    Train it on a family of data sets, then read the posterior or the predictive of any context::

        amortized = AmortizedMixtureGuide(dim=2, num_components=3, prior_std=5.0)
        fit_amortized_guide(amortized, GaussianMixtureFamily(), steps=2000)
        log_density = amortized.predictive_log_prob(context, queries)     # (B, m)

    :meth:`model` and :meth:`guide` are a Pyro model and guide: both take ``context`` of shape
    (B, n, D) and an optional ``num_predictive``, and work with :class:`pyro.infer.SVI` and
    :class:`pyro.infer.Predictive`. Their latent sites are ``locs`` (B, 1, K, D), ``weights``
    (B, 1, K) and ``scales`` (B, 1, K), inside a plate ``datasets`` at dim -2. The context is the
    observed site ``obs``. With ``num_predictive = m > 0`` the model also draws m new points per
    data set at the site ``predictive`` (B, m, D), and
    ``Predictive(model, guide=guide, num_samples=S)(context, num_predictive=m)`` returns posterior
    predictive draws.

    :param int dim: point dimension D.
    :param int num_components: K, the number of components (the truncation for stick breaking).
    :param float prior_std: prior standard deviation of each mean.
    :param str weights_prior: ``"dirichlet"`` or ``"stick_breaking"``.
    :param float concentration: the Dirichlet concentration, or alpha of the stick-breaking prior.
    :param float scale_loc: location of the LogNormal prior on each component std (log units).
    :param float scale_std: scale of that LogNormal prior.
    :param int width: encoder width.
    :param int heads: encoder attention heads.
    :param int depth: encoder self-attention blocks.
    :param str name: prefix of the encoder's parameters in Pyro's parameter store.
    """

    def __init__(
        self,
        dim: int = 2,
        num_components: int = 3,
        prior_std: float = 5.0,
        weights_prior: str = "dirichlet",
        concentration: float = 1.0,
        scale_loc: float = math.log(0.5),
        scale_std: float = 1.0,
        width: int = 64,
        heads: int = 4,
        depth: int = 2,
        name: str = "amortized_mixture",
    ):
        self.dim = check_int("dim", dim)
        self.num_components = check_int("num_components", num_components)
        self.prior_std = float(check_positive("prior_std", prior_std))
        if weights_prior not in WEIGHTS_PRIORS:
            raise ValueError(
                f"weights_prior must be one of {WEIGHTS_PRIORS}, but got {weights_prior!r}."
            )
        if weights_prior == "stick_breaking" and self.num_components < 2:
            raise ValueError(
                f"num_components must be >= 2 for stick breaking, but got {num_components}."
            )
        self.weights_prior = weights_prior
        self.concentration = float(check_positive("concentration", concentration))
        if not math.isfinite(scale_loc):
            raise ValueError(f"scale_loc must be finite, but got {scale_loc!r}.")
        self.scale_loc = float(scale_loc)
        self.scale_std = float(check_positive("scale_std", scale_std))
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, but got {name!r}.")
        self.name = name
        self.config = {
            "dim": self.dim,
            "num_components": self.num_components,
            "prior_std": self.prior_std,
            "weights_prior": weights_prior,
            "concentration": self.concentration,
            "scale_loc": self.scale_loc,
            "scale_std": self.scale_std,
            "width": width,
            "heads": heads,
            "depth": depth,
            "name": name,
        }
        # Per component: mean (D), log std of the mean (D), two weight parameters (the Dirichlet
        # concentration, or the two Beta parameters of this component's stick), and the location
        # and log scale of the LogNormal law of the component std.
        self.encoder = SetEncoder(dim, num_components, 2 * dim + 4, width, heads, depth)
        self.history: list[float] = []

    # -- state -----------------------------------------------------------------------------------
    def state(self) -> dict:
        """Return the constructor arguments, the encoder's parameters and the ELBO history."""
        encoder = {k: v.detach().cpu() for k, v in self.encoder.state_dict().items()}
        return {"config": dict(self.config), "encoder": encoder, "history": list(self.history)}

    @classmethod
    def from_state(cls, state: dict, device="cpu") -> AmortizedMixtureGuide:
        """Rebuild a guide from :meth:`state`, with the stored dtype, on ``device``."""
        guide = cls(**state["config"])
        guide.encoder.load_state_dict(state["encoder"])
        dtype = next(iter(state["encoder"].values())).dtype
        guide.encoder.to(dtype=dtype, device=device).eval()
        guide.history = list(state.get("history", []))
        return guide

    def to(self, *args, **kwargs) -> AmortizedMixtureGuide:
        """Move the encoder, as :meth:`torch.nn.Module.to`; returns ``self``."""
        self.encoder.to(*args, **kwargs)
        return self

    # -- variational parameters ------------------------------------------------------------------
    def _check_context(self, context):
        if not isinstance(context, torch.Tensor):
            raise TypeError(f"context must be a torch.Tensor, but got {type(context).__name__}.")
        if context.dim() != 3 or context.shape[-1] != self.dim or context.shape[1] < 1:
            raise ValueError(
                f"context must have shape (B, n, {self.dim}) with n >= 1, but has shape "
                f"{tuple(context.shape)}."
            )
        parameter = next(self.encoder.parameters())
        if context.dtype != parameter.dtype or context.device != parameter.device:
            raise ValueError(
                f"context has dtype {context.dtype} on {context.device}, but the encoder has "
                f"dtype {parameter.dtype} on {parameter.device}; move one of them with .to()."
            )
        return check_finite("context", context)

    def variational_parameters(self, context: torch.Tensor) -> dict:
        """Compute the guide's parameters for each data set of ``context`` (B, n, D).

        :returns: a dict with ``loc`` and ``scale`` (B, K, D) of the means, ``scale_loc`` and
            ``scale_scale`` (B, K) of the component stds, and either ``concentration`` (B, K) of
            the Dirichlet or ``concentration1``, ``concentration0`` (B, K - 1) of the sticks.
        """
        context = self._check_context(context)
        features, pooling_weights = self.encoder(context)
        if not bool(torch.isfinite(features).all()):
            raise NonFiniteGuideError(
                "the encoder produced NaN or infinite variational parameters; check the context's "
                "scale and the learning rate."
            )
        dim = self.dim
        softplus = nn.functional.softplus
        # Each posterior mean starts at the mean of the points that its seed attends to. The
        # encoder adds a correction in units of the prior std, which moves a component that the
        # context does not inform towards the prior mean. Posterior scales are in units of the
        # prior std too, and the floors keep them positive.
        pooled_mean = pooling_weights @ context
        parameters = {
            "loc": pooled_mean + self.prior_std * features[..., :dim],
            "scale": self.prior_std * softplus(features[..., dim : 2 * dim] - 3.0) + 1e-4,
            "scale_loc": self.scale_loc + features[..., 2 * dim + 2],
            "scale_scale": softplus(features[..., 2 * dim + 3] - 2.0) + 1e-4,
        }
        first = features[..., 2 * dim].clamp(-10.0, 10.0).exp() + 1e-3
        if self.weights_prior == "dirichlet":
            parameters["concentration"] = first
        else:
            second = features[..., 2 * dim + 1].clamp(-10.0, 10.0).exp() + 1e-3
            parameters["concentration1"] = first[..., :-1]
            parameters["concentration0"] = second[..., :-1]
        return parameters

    def _weights_prior(self, like: torch.Tensor):
        if self.weights_prior == "dirichlet":
            return dist.Dirichlet(like.new_full((self.num_components,), self.concentration))
        return StickBreakingWeights(like.new_tensor(self.concentration), self.num_components)

    def _weights_posterior(self, parameters: dict):
        if self.weights_prior == "dirichlet":
            return dist.Dirichlet(parameters["concentration"])
        return BetaStickBreaking(parameters["concentration1"], parameters["concentration0"])

    @staticmethod
    def _likelihood(locs, weights, scales):
        components = dist.Normal(locs, scales.unsqueeze(-1)).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(probs=weights), components)

    # -- Pyro program ----------------------------------------------------------------------------
    def model(self, context: torch.Tensor, num_predictive: int = 0):
        """Run the mixture memory model for a batch of data sets observed at ``context`` (B, n, D).

        :param int num_predictive: new points per data set to draw at the site ``predictive``.
        """
        batch, num_points, dim = context.shape
        num_predictive = check_int("num_predictive", num_predictive, minimum=0)
        zeros = context.new_zeros((self.num_components, dim))
        log_scale = context.new_full((self.num_components,), self.scale_loc)
        with pyro.plate("datasets", batch, dim=-2):
            locs = pyro.sample("locs", dist.Normal(zeros, self.prior_std).to_event(2))
            weights = pyro.sample("weights", self._weights_prior(context))
            scales = pyro.sample("scales", dist.LogNormal(log_scale, self.scale_std).to_event(1))
            likelihood = self._likelihood(locs, weights, scales)
            with pyro.plate("points", num_points, dim=-1):
                pyro.sample("obs", likelihood, obs=context)
            if num_predictive:
                with pyro.plate("new_points", num_predictive, dim=-1):
                    pyro.sample("predictive", likelihood)

    def guide(self, context: torch.Tensor, num_predictive: int = 0):
        """Sample every latent site from the encoder's posterior for ``context`` (B, n, D).

        ``num_predictive`` is accepted so that the guide takes the model's arguments, and unused.
        """
        pyro.module(self.name, self.encoder)
        parameters = self.variational_parameters(context)
        parameters = {name: value.unsqueeze(1) for name, value in parameters.items()}
        with pyro.plate("datasets", context.shape[0], dim=-2):
            pyro.sample("locs", dist.Normal(parameters["loc"], parameters["scale"]).to_event(2))
            pyro.sample("weights", self._weights_posterior(parameters))
            scale_dist = dist.LogNormal(parameters["scale_loc"], parameters["scale_scale"])
            pyro.sample("scales", scale_dist.to_event(1))

    # -- posterior and predictive ----------------------------------------------------------------
    def sample_posterior(self, context: torch.Tensor, num_samples: int) -> dict:
        """Draw ``num_samples`` guide draws of (locs, weights, scales) per data set.

        Draws use the global torch random state (seed it with :func:`pyro.set_rng_seed`).

        :returns: a dict with ``locs`` (S, B, K, D), ``weights`` (S, B, K) and ``scales``
            (S, B, K), detached.
        """
        num_samples = check_int("num_samples", num_samples)
        sample_shape = torch.Size([num_samples])
        with torch.no_grad():
            parameters = self.variational_parameters(context)
            locs = dist.Normal(parameters["loc"], parameters["scale"]).sample(sample_shape)
            weights = self._weights_posterior(parameters).sample(sample_shape)
            scale_dist = dist.LogNormal(parameters["scale_loc"], parameters["scale_scale"])
            scales = scale_dist.sample(sample_shape)
        return {"locs": locs, "weights": weights, "scales": scales}

    def predictive_log_prob(
        self,
        context: torch.Tensor,
        queries: torch.Tensor,
        num_samples: int = 64,
        draws: dict | None = None,
    ) -> torch.Tensor:
        """Compute ``log p_S(queries | context)`` of the S-draw posterior predictive, shape (B, m).

        ``p_S(x | D) = (1/S) sum_s sum_k w_sk N(x; mu_sk, s_sk^2 I)`` is a normalized density for
        any fixed draws, so one call with all queries scores them under the same density. As an
        estimate of the exact predictive ``E_q[p(x | theta)]`` its log is biased low (Jensen), and
        the bias shrinks as S grows.

        :param torch.Tensor context: shape (B, n, D).
        :param torch.Tensor queries: shape (B, m, D), same dtype and device as the encoder.
        :param int num_samples: S, used when ``draws`` is None.
        :param dict draws: the output of :meth:`sample_posterior`, to reuse fixed draws.
        """
        if not isinstance(queries, torch.Tensor):
            raise TypeError(f"queries must be a torch.Tensor, but got {type(queries).__name__}.")
        if queries.dim() != 3 or queries.shape[-1] != self.dim:
            raise ValueError(
                f"queries must have shape (B, m, {self.dim}), but has shape {tuple(queries.shape)}."
            )
        check_finite("queries", queries)
        if draws is None:
            draws = self.sample_posterior(context, num_samples)
        if draws["locs"].shape[1] != queries.shape[0]:
            raise ValueError(
                f"queries has {queries.shape[0]} data sets, but the posterior draws have "
                f"{draws['locs'].shape[1]}; pass one row of queries per context."
            )
        count = draws["locs"].shape[0]
        tiny = torch.finfo(queries.dtype).tiny
        log_weights = draws["weights"].clamp_min(tiny).log().unsqueeze(-2)
        scales = draws["scales"].unsqueeze(-2)
        locs = draws["locs"]
        # Squared distances in GEMM form: (S, B, m, K).
        squared = (
            queries.square().sum(-1, keepdim=True)
            - 2.0 * queries @ locs.transpose(-1, -2)
            + locs.square().sum(-1).unsqueeze(-2)
        ).clamp_min(0.0)
        component = (
            -0.5 * squared / scales.square()
            - self.dim * scales.log()
            - 0.5 * self.dim * math.log(2.0 * math.pi)
        )
        per_draw = torch.logsumexp(log_weights + component, dim=-1)
        return torch.logsumexp(per_draw, dim=0) - math.log(count)

    def energy(self, context, queries, num_samples: int = 64, draws=None) -> torch.Tensor:
        """Return the normalized in-context energy ``-log p_S(queries | context)``, shape (B, m)."""
        return -self.predictive_log_prob(context, queries, num_samples, draws)


__all__ = ["WEIGHTS_PRIORS", "AmortizedMixtureGuide", "NonFiniteGuideError"]
