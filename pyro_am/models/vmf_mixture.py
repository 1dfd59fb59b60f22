"""Von Mises-Fisher mixture memories on the unit sphere, their retrieval, and EM fitting.

With mean directions ``mu_k`` (unit vectors in R^D), concentrations ``kappa_k >= 0`` and mixing
weights ``pi_k``, the energy of a point ``x`` on the sphere S^{D-1} is the negative log density of
the mixture with respect to surface measure::

    E(x) = -log sum_k pi_k C_D(kappa_k) exp(kappa_k mu_k.x)
    r_k(x) = softmax_k(log pi_k + log C_D(kappa_k) + kappa_k mu_k.x)      (responsibilities)
    F(x) = normalize(sum_k r_k(x) kappa_k mu_k)                           (fixed-point map)

The logits are affine in ``x``, so by Jensen ``-E(y) >= sum_k r_k(x) l_k(y) + H(r(x))`` with
equality at ``y = x``. On the sphere the bound is maximized by ``F(x)``, so E never increases along
the fixed-point map. Projected gradient steps ``x <- normalize(x - eta (I - x x^T) grad E)``
with backtracking also never increase E.

:class:`VMFMixture` fits the mixture to data by EM (A. Banerjee, I. S. Dhillon, J. Ghosh and
S. Sra, "Clustering on the unit hypersphere using von Mises-Fisher distributions", JMLR 6, 2005).
The M-step sets ``mu_k = s_k / |s_k|`` with ``s_k = sum_n r_nk x_n``, ``pi_k = N_k / N`` and solves
``A_D(kappa_k) = rbar_k = |s_k| / N_k`` from the start ``rbar (D - rbar^2) / (1 - rbar^2)`` by
Newton steps with ``A_D'(kappa) = 1 - A_D^2 - (D - 1) A_D / kappa``. Each step of exact EM
never decreases the log-likelihood.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile

import torch
from tqdm.auto import tqdm

from pyro_am._validation import (
    as_float_tensor,
    check_finite,
    check_int,
    check_memories,
    check_positive,
)
from pyro_am.distributions.von_mises_fisher import log_vmf_normalizer, mean_resultant_length
from pyro_am.dynamics import RetrievalResult, retrieve
from pyro_am.energies import Energy
from pyro_am.models._kmeans import kmeans_plus_plus

logger = logging.getLogger(__name__)

SPHERE_METHODS = ("fixed_point", "gradient")
_MAX_BACKTRACKS = 30


def _unit_tolerance(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


def _check_unit_rows(name: str, tensor: torch.Tensor) -> torch.Tensor:
    deviation = (tensor.detach().norm(dim=-1) - 1).abs()
    if bool((deviation > _unit_tolerance(tensor.dtype) * math.sqrt(tensor.shape[-1])).any()):
        raise ValueError(
            f"{name} must have rows of unit norm, but a row has norm off by "
            f"{deviation.max().item():.3g}; divide each row by its norm first."
        )
    return tensor


def _log_mixing_weights(weights, logits, num_components, like) -> torch.Tensor:
    if weights is not None and logits is not None:
        raise ValueError("pass either weights or logits to VMFMixtureEnergy, not both.")
    if logits is not None:
        logits = check_finite("logits", as_float_tensor("logits", logits, like=like))
        if logits.shape != (num_components,):
            raise ValueError(
                f"logits must have shape ({num_components},), but has {tuple(logits.shape)}."
            )
        return torch.log_softmax(logits, dim=-1)
    if weights is None:
        return torch.full(
            (num_components,), -math.log(num_components), dtype=like.dtype, device=like.device
        )
    weights = as_float_tensor("weights", weights, like=like)
    if weights.shape != (num_components,):
        raise ValueError(
            f"weights must have shape ({num_components},), but has {tuple(weights.shape)}."
        )
    check_positive("weights", weights.detach())
    total = float(weights.detach().sum())
    if abs(total - 1.0) > (1e-10 if like.dtype == torch.float64 else 1e-5):
        raise ValueError(f"weights must sum to one, but sum to {total}; normalize them first.")
    return weights.log()


class VMFMixtureEnergy(Energy):
    """Negative log density of a von Mises-Fisher mixture on the unit sphere S^{D-1}.

    ``E(x) = -log sum_k pi_k C_D(kappa_k) exp(kappa_k mu_k.x)`` for unit ``x``; :meth:`log_prob`
    is ``-E``, exact with respect to surface measure. The formula extends to any ``x``, but only
    on the sphere is it a density, and off the sphere it is unbounded below. Retrieve with
    :func:`retrieve_on_sphere`, or with :func:`~pyro_am.dynamics.retrieve` and
    ``method="fixed_point"`` from unit queries, because :meth:`fixed_point` returns unit vectors.
    The shared ``gradient`` and ``langevin`` methods leave the sphere.

    :param torch.Tensor mean_directions: unit vectors mu_k of shape (K, D), D >= 2.
    :param concentrations: kappa_k >= 0, a scalar or a tensor of shape (K,).
    :param weights: mixing weights of shape (K,), positive and summing to one. Give ``weights``
        or ``logits`` (normalized by softmax), not both; with neither the weights are uniform.
    :param int block_elements: the largest number of logits held at once while streaming.
    """

    has_fixed_point = True
    has_log_prob = True

    def __init__(
        self, mean_directions, concentrations, weights=None, logits=None, block_elements=None
    ):
        mean_directions = check_memories("mean_directions", mean_directions)
        super().__init__(mean_directions, block_elements)
        num_components, dim = self.memories.shape
        if dim < 2:
            raise ValueError(f"mean_directions must have dimension D >= 2, but has D = {dim}.")
        _check_unit_rows("mean_directions", self.memories)
        concentrations = as_float_tensor("concentrations", concentrations, like=self.memories)
        if concentrations.shape not in ((), (1,), (num_components,)):
            raise ValueError(
                f"concentrations must have shape () or ({num_components},), but has shape "
                f"{tuple(concentrations.shape)}."
            )
        check_positive("concentrations", concentrations.detach(), allow_zero=True)
        self.concentrations = concentrations.reshape(-1).expand(num_components)
        self.log_weights = _log_mixing_weights(weights, logits, num_components, self.memories)

    @property
    def mean_directions(self) -> torch.Tensor:
        return self.memories

    @property
    def weights(self) -> torch.Tensor:
        return self.log_weights.exp()

    @property
    def default_step_size(self) -> float:
        # The inverse of the largest concentration: the scale on which the energy changes.
        return 1.0 / max(float(self.concentrations.detach().max()), 1.0)

    def _logit_parts(self, x):
        bias = self.log_weights + log_vmf_normalizer(self.dim, self.concentrations)
        return x, self._values(), bias

    def _values(self):
        return self.concentrations.unsqueeze(-1) * self.memories

    def _energy(self, x):
        return -self._statistics(x, with_values=False).logsumexp()

    def _energy_and_grad(self, x):
        statistics = self._statistics(x, with_values=True)
        return -statistics.logsumexp(), -statistics.mean()

    def _grad(self, x):
        return -self._statistics(x, with_values=True).mean()

    def _fixed_point(self, x):
        mean = self._statistics(x, with_values=True).mean()
        return mean / mean.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(mean.dtype).tiny)

    def _log_prob(self, x):
        return -self._energy(x)


def retrieve_on_sphere(
    energy: Energy,
    x0: torch.Tensor,
    method: str = "fixed_point",
    max_steps: int = 100,
    tol: float = 1e-6,
    step_size: float | None = None,
    return_trajectory: bool = False,
) -> RetrievalResult:
    """Run retrieval dynamics on the unit sphere from the directions of ``x0``.

    ``fixed_point`` applies the energy's fixed-point map (which for :class:`VMFMixtureEnergy`
    returns unit vectors) through :func:`~pyro_am.dynamics.retrieve`. ``gradient`` takes projected
    Riemannian gradient steps ``x <- normalize(x - eta (I - x x^T) grad E(x))`` and halves ``eta``
    per query until E does not increase (growing it by 1.5 after an accepted step).

    :param Energy energy: the energy, for example a :class:`VMFMixtureEnergy`.
    :param torch.Tensor x0: initial states of shape (..., D), nonzero; they are normalized first.
    :param str method: ``"fixed_point"`` or ``"gradient"``.
    :param int max_steps: the maximum number of updates per query.
    :param float tol: a query stops once its largest coordinate change is below ``tol``.
    :param float step_size: initial gradient step size; defaults to ``energy.default_step_size``.
    :param bool return_trajectory: also return every intermediate state.
    :returns: a :class:`~pyro_am.dynamics.RetrievalResult`.
    """
    if not isinstance(energy, Energy):
        raise TypeError(f"energy must be a pyro_am Energy, but got {type(energy).__name__}.")
    if method not in SPHERE_METHODS:
        raise ValueError(f"method must be one of {SPHERE_METHODS}, but got {method!r}.")
    x, batch_shape = energy._flatten(x0, "x0")
    check_finite("x0", x)
    norms = x.norm(dim=-1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("x0 contains a zero vector, which has no direction on the sphere.")
    x = (x / norms).reshape(*batch_shape, energy.dim)
    if method == "fixed_point":
        return retrieve(
            energy,
            x,
            "fixed_point",
            max_steps=max_steps,
            tol=tol,
            return_trajectory=return_trajectory,
        )

    max_steps = check_int("max_steps", max_steps, minimum=0)
    check_positive("tol", tol, allow_zero=True)
    step_size = energy.default_step_size if step_size is None else step_size
    check_positive("step_size", step_size)
    with torch.no_grad():
        flat = x.reshape(-1, energy.dim).clone()
        states, steps, converged, trajectory = _projected_gradient(
            energy, flat, max_steps, tol, step_size, return_trajectory
        )
        energies = energy._energy(states)
    if trajectory is not None:
        trajectory = torch.stack(trajectory).reshape(-1, *batch_shape, energy.dim)
    return RetrievalResult(
        states=states.reshape(*batch_shape, energy.dim),
        energies=energies.reshape(batch_shape),
        steps=steps.reshape(batch_shape),
        converged=converged.reshape(batch_shape),
        trajectory=trajectory,
    )


def _projected_gradient(energy, x, max_steps, tol, step_size, keep):
    num_queries = x.shape[0]
    steps = torch.zeros(num_queries, dtype=torch.long, device=x.device)
    converged = torch.zeros(num_queries, dtype=torch.bool, device=x.device)
    eta = torch.full((num_queries,), float(step_size), dtype=x.dtype, device=x.device)
    value, grad = energy._energy_and_grad(x)
    trajectory = [x.clone()] if keep else None
    active = torch.arange(num_queries, device=x.device)
    for _ in range(max_steps):
        if active.numel() == 0:
            break
        point, current, gradient = x[active], value[active], grad[active]
        tangent = gradient - (gradient * point).sum(-1, keepdim=True) * point
        step = eta[active]
        candidate, candidate_value, candidate_grad = point.clone(), current.clone(), gradient
        pending = torch.ones(active.numel(), dtype=torch.bool, device=x.device)
        for _ in range(_MAX_BACKTRACKS):
            index = pending.nonzero(as_tuple=True)[0]
            trial = point[index] - step[index].unsqueeze(-1) * tangent[index]
            trial = trial / trial.norm(dim=-1, keepdim=True)
            trial_value, trial_grad = energy._energy_and_grad(trial)
            accepted = trial_value <= current[index]
            candidate[index[accepted]] = trial[accepted]
            candidate_value[index[accepted]] = trial_value[accepted]
            candidate_grad[index[accepted]] = trial_grad[accepted]
            pending[index[accepted]] = False
            step[index[~accepted]] *= 0.5
            if not bool(pending.any()):
                break
        change = (candidate - point).abs().amax(dim=-1)
        x[active], value[active], grad[active] = candidate, candidate_value, candidate_grad
        eta[active] = torch.where(pending, step, step * 1.5)
        steps[active] += 1
        done = change <= tol
        converged[active[done]] = True
        active = active[~done]
        if keep:
            trajectory.append(x.clone())
    return x, steps, converged, trajectory


def spherical_kmeans(
    x: torch.Tensor,
    num_clusters: int,
    max_iter: int = 100,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster unit vectors by spherical k-means (cosine similarity, unit centroids).

    Seeds by k-means++ (on the sphere, squared distance is ``2 - 2 cos``), then alternates
    ``labels = argmax_k c_k.x`` and ``c_k = normalize(sum of its points)`` until the labels stop
    changing. A centroid that loses all its points keeps its position.

    :param torch.Tensor x: unit vectors of shape (N, D).
    :param int num_clusters: K, at most N.
    :returns: ``(centroids, labels)`` of shapes (K, D) and (N,).
    """
    x = check_memories("x", x)
    num_clusters = check_int("num_clusters", num_clusters, minimum=1, maximum=x.shape[0])
    centroids = kmeans_plus_plus(x, num_clusters, generator=generator)
    labels = (x @ centroids.T).argmax(-1)
    for _ in range(max_iter):
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        norms = sums.norm(dim=-1, keepdim=True)
        centroids = torch.where(norms > 0, sums / norms.clamp_min(1e-300), centroids)
        updated = (x @ centroids.T).argmax(-1)
        if bool((updated == labels).all()):
            break
        labels = updated
    return centroids, labels


def solve_concentration(
    dim: int, resultant_length: torch.Tensor, num_newton_steps: int = 10, max_concentration=1e5
) -> torch.Tensor:
    """Solve ``A_D(kappa) = rbar`` for kappa: Banerjee's start, then Newton steps.

    The start ``rbar (D - rbar^2) / (1 - rbar^2)`` is within a few percent for moderate D; Newton
    on ``A_D(kappa) - rbar`` with ``A_D' = 1 - A_D^2 - (D - 1) A_D / kappa`` then converges
    quadratically. The result is clamped to ``[0, max_concentration]``.

    :param int dim: the ambient dimension D.
    :param torch.Tensor resultant_length: rbar in [0, 1), any shape.
    """
    rbar = resultant_length.clamp(0.0, 1.0 - torch.finfo(resultant_length.dtype).eps)
    kappa = rbar * (dim - rbar.square()) / (1 - rbar.square())
    kappa = kappa.clamp(max=max_concentration)
    for _ in range(num_newton_steps):
        positive = kappa > 0
        safe = torch.where(positive, kappa, torch.ones_like(kappa))
        length = mean_resultant_length(dim, safe)
        slope = 1 - length.square() - (dim - 1) * length / safe
        update = safe - (length - rbar) / slope.clamp_min(torch.finfo(kappa.dtype).tiny)
        # A_D is concave, so a Newton step from above the root lands below it, and later steps
        # rise to it monotonically. The floor keeps a far overshoot from reaching zero.
        update = torch.maximum(update, 0.1 * safe).clamp(max=max_concentration)
        kappa = torch.where(positive, update, kappa)
    return kappa


class VMFMixture:
    """Mixture of von Mises-Fisher distributions fitted by EM, usable as a memory on the sphere.

    After :meth:`fit`, the memory is :meth:`energy` (a :class:`VMFMixtureEnergy`), whose minima
    near the mean directions are the stored patterns; :meth:`predict` assigns points to the
    component of largest responsibility and :meth:`assign` returns the responsibilities.

    :param int num_components: K.
    :param int max_iter: the maximum number of EM iterations.
    :param float tol: stop when the mean log-likelihood per datum rises by less than ``tol``.
    :param int num_newton_steps: Newton steps per concentration update.
    :param float max_concentration: upper bound on every kappa_k (a cluster of identical points
        would otherwise drive it to infinity).
    :param float min_weight: a component whose weight falls below this is re-seeded at the worst
        explained datum, with the event logged.
    :param int seed: seed of the k-means++ initialization.
    :param bool progress: show a tqdm progress bar over the EM iterations.

    :ivar mean_directions_: (K, D) unit vectors.
    :ivar concentrations_: (K,) kappa.
    :ivar weights_: (K,) mixing weights.
    :ivar log_likelihood_history_: mean log-likelihood per datum after each E-step.
    """

    def __init__(
        self,
        num_components: int,
        max_iter: int = 200,
        tol: float = 1e-9,
        num_newton_steps: int = 10,
        max_concentration: float = 1e5,
        min_weight: float = 1e-8,
        seed: int | None = None,
        progress: bool = False,
    ):
        self.num_components = check_int("num_components", num_components)
        self.max_iter = check_int("max_iter", max_iter, minimum=0)
        self.tol = check_positive("tol", tol, allow_zero=True)
        self.num_newton_steps = check_int("num_newton_steps", num_newton_steps, minimum=0)
        self.max_concentration = check_positive("max_concentration", max_concentration)
        self.min_weight = check_positive("min_weight", min_weight, allow_zero=True)
        self.seed = seed
        self.progress = progress
        self.mean_directions_ = None
        self.concentrations_ = None
        self.weights_ = None
        self.log_likelihood_history_: list[float] = []
        self.converged_ = False
        self.n_iter_ = 0

    # -- data and parameters ---------------------------------------------------------------------
    def _check_data(self, name: str, x) -> torch.Tensor:
        x = check_memories(name, x)
        if x.shape[1] < 2:
            raise ValueError(f"{name} must have dimension D >= 2, but has D = {x.shape[1]}.")
        if self.mean_directions_ is not None and x.shape[1] != self.mean_directions_.shape[1]:
            raise ValueError(
                f"{name} has dimension {x.shape[1]}, but the mixture was fitted in dimension "
                f"{self.mean_directions_.shape[1]}."
            )
        return _check_unit_rows(name, x)

    def _require_fitted(self) -> None:
        if self.mean_directions_ is None:
            raise ValueError("this VMFMixture is not fitted yet; call fit(x) first.")

    def energy(self) -> VMFMixtureEnergy:
        """Build the :class:`VMFMixtureEnergy` of the fitted mixture."""
        self._require_fitted()
        return VMFMixtureEnergy(
            self.mean_directions_, self.concentrations_, logits=self.weights_.log()
        )

    def _log_joint(self, x, mean_directions, concentrations, log_weights) -> torch.Tensor:
        dim = x.shape[1]
        bias = log_weights + log_vmf_normalizer(dim, concentrations)
        return torch.addmm(bias, x, (concentrations.unsqueeze(-1) * mean_directions).T)

    def log_likelihood(self, x) -> torch.Tensor:
        """Compute the log density of each row of ``x`` under the fitted mixture, shape (N,)."""
        self._require_fitted()
        x = self._check_data("x", x)
        log_weights = self.weights_.log()
        log_joint = self._log_joint(x, self.mean_directions_, self.concentrations_, log_weights)
        return torch.logsumexp(log_joint, dim=-1)

    def assign(self, x) -> torch.Tensor:
        """Compute the responsibilities ``p(z = k given x_n)``, shape (N, K)."""
        self._require_fitted()
        x = self._check_data("x", x)
        log_weights = self.weights_.log()
        log_joint = self._log_joint(x, self.mean_directions_, self.concentrations_, log_weights)
        return torch.softmax(log_joint, dim=-1)

    def predict(self, x) -> torch.Tensor:
        """Assign each row of ``x`` to its most responsible component, shape (N,), int64."""
        return self.assign(x).argmax(-1)

    # -- EM --------------------------------------------------------------------------------------
    def _initialize(self, x: torch.Tensor) -> None:
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=x.device).manual_seed(self.seed)
        _, labels = spherical_kmeans(x, self.num_components, generator=generator)
        responsibilities = torch.nn.functional.one_hot(labels, self.num_components).to(x.dtype)
        # A little mass on every component keeps an empty k-means cluster alive.
        responsibilities = 0.99 * responsibilities + 0.01 / self.num_components
        self._m_step(x, responsibilities)

    def _m_step(self, x: torch.Tensor, responsibilities: torch.Tensor) -> None:
        counts = responsibilities.sum(0)
        sums = responsibilities.T @ x
        lengths = sums.norm(dim=-1)
        self.weights_ = counts / counts.sum()
        self.mean_directions_ = sums / lengths.clamp_min(torch.finfo(x.dtype).tiny).unsqueeze(-1)
        resultant = lengths / counts.clamp_min(torch.finfo(x.dtype).tiny)
        self.concentrations_ = solve_concentration(
            x.shape[1], resultant, self.num_newton_steps, self.max_concentration
        )

    def _reseed_small_components(self, x: torch.Tensor, log_density: torch.Tensor) -> None:
        small = (self.weights_ < self.min_weight).nonzero(as_tuple=True)[0]
        if small.numel() == 0:
            return
        worst = log_density.argsort()[: small.numel()]
        for component, datum in zip(small.tolist(), worst.tolist(), strict=True):
            logger.warning(
                "vMF EM: component %d has weight %.3g < min_weight; re-seeded at datum %d",
                component,
                float(self.weights_[component]),
                datum,
            )
        self.mean_directions_[small] = x[worst]
        self.concentrations_[small] = self.concentrations_.max()
        self.weights_[small] = self.min_weight
        self.weights_ = self.weights_ / self.weights_.sum()

    def fit(self, x, checkpoint=None, resume: bool = False) -> VMFMixture:
        """Fit the mixture to unit vectors ``x`` of shape (N, D) by EM.

        :param torch.Tensor x: data on the unit sphere; the parameters follow its dtype and device.
        :param checkpoint: optional path; the parameters are written there atomically (temporary
            file, then rename) every 10 iterations and at the end.
        :param bool resume: start from ``checkpoint`` if that file exists instead of initializing.
        :returns: self.
        :raises RuntimeError: if the log-likelihood or a parameter becomes NaN or infinite; the
            parameters before that iteration are kept and the message names the iteration.
        """
        x = check_memories("x", x)
        if x.shape[0] < self.num_components:
            raise ValueError(
                f"x must have at least num_components = {self.num_components} rows, but has "
                f"{x.shape[0]}."
            )
        start = 0
        if resume and checkpoint is not None and os.path.exists(checkpoint):
            start = self.load_checkpoint(checkpoint, like=x)
            logger.info("vMF EM resumed from %s at iteration %d", checkpoint, start)
        else:
            self.mean_directions_ = None
            x = self._check_data("x", x)
            self._initialize(x)
            self.log_likelihood_history_ = []
        x = self._check_data("x", x)

        self.converged_ = False
        for iteration in tqdm(
            range(start, self.max_iter), disable=not self.progress, desc="vMF EM"
        ):
            previous = (self.mean_directions_, self.concentrations_, self.weights_)
            log_joint = self._log_joint(x, *previous[:2], previous[2].log())
            log_density = torch.logsumexp(log_joint, dim=-1)
            value = float(log_density.mean())
            if not math.isfinite(value):
                raise RuntimeError(
                    f"vMF EM stopped at iteration {iteration}: the log-likelihood is {value}; "
                    "the parameters before that iteration were kept."
                )
            self.log_likelihood_history_.append(value)
            self.n_iter_ = iteration + 1

            self._m_step(x, torch.softmax(log_joint, dim=-1))
            parameters = (self.mean_directions_, self.concentrations_, self.weights_)
            if not all(bool(torch.isfinite(t).all()) for t in parameters):
                self.mean_directions_, self.concentrations_, self.weights_ = previous
                raise RuntimeError(
                    f"vMF EM stopped at iteration {iteration}: the M-step produced NaN or "
                    "infinite parameters; the parameters before that iteration were kept."
                )
            self._reseed_small_components(x, log_density)

            if checkpoint is not None and (iteration + 1) % 10 == 0:
                self.save_checkpoint(checkpoint)
            history = self.log_likelihood_history_
            if len(history) > 1 and abs(history[-1] - history[-2]) < self.tol:
                self.converged_ = True
                break
        if checkpoint is not None:
            self.save_checkpoint(checkpoint)
        logger.info(
            "vMF EM: %d iterations, mean log-likelihood %.6g, converged=%s",
            self.n_iter_,
            self.log_likelihood_history_[-1] if self.log_likelihood_history_ else float("nan"),
            self.converged_,
        )
        return self

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, path) -> None:
        """Write the parameters and the fit history to ``path`` atomically."""
        self._require_fitted()
        state = {
            "mean_directions": self.mean_directions_.cpu(),
            "concentrations": self.concentrations_.cpu(),
            "weights": self.weights_.cpu(),
            "n_iter": self.n_iter_,
            "log_likelihood_history": list(self.log_likelihood_history_),
        }
        directory = os.path.dirname(os.path.abspath(path))
        handle, temporary = tempfile.mkstemp(dir=directory, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                torch.save(state, stream)
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise

    def load_checkpoint(self, path, like: torch.Tensor | None = None) -> int:
        """Load parameters written by :meth:`save_checkpoint`; returns the iteration reached.

        :param torch.Tensor like: a tensor whose dtype and device the parameters take.
        """
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["mean_directions"].shape[0] != self.num_components:
            raise ValueError(
                f"checkpoint {os.fspath(path)!r} contains {state['mean_directions'].shape[0]} "
                f"components, but this model has num_components = {self.num_components}."
            )
        options = {} if like is None else {"dtype": like.dtype, "device": like.device}
        self.mean_directions_ = state["mean_directions"].to(**options)
        self.concentrations_ = state["concentrations"].to(**options)
        self.weights_ = state["weights"].to(**options)
        self.n_iter_ = int(state["n_iter"])
        self.log_likelihood_history_ = list(state["log_likelihood_history"])
        return self.n_iter_


__all__ = [
    "SPHERE_METHODS",
    "VMFMixture",
    "VMFMixtureEnergy",
    "retrieve_on_sphere",
    "solve_concentration",
    "spherical_kmeans",
]
