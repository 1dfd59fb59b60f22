"""Variational memory: a Gaussian mixture whose E-step is a free-energy flow on assignment logits.

The model, for data x_1 .. x_N in R^D and K memories::

    z_n ~ Categorical(pi),    x_n | z_n ~ N(mu_z, s_z^2 I)     (s shared or one per memory)

Each datum has assignment logits v_n, ``q_n = softmax(v_n)``, and free energy
``F(q_n; x_n) = sum_k q_nk (log q_nk - l_nk)`` with ``l_nk = log pi_k + log N(x_n; mu_k, s_k^2 I)``.
Since ``F = -log p(x_n) + KL(q_n || p(z_n | x_n))``, the sum over n is the negative ELBO. The E-step
runs T steps of the flow of :mod:`pyro_am.models.flow`, from a uniform q or, with warm starts, from
the datum's logits of the previous call. The M-step takes gradient steps (Adam, through
:class:`pyro.infer.SVI`) or applies the closed-form maximizer of the ELBO with q fixed::

    N_k = sum_n q_nk,   pi_k = N_k / N,   mu_k = sum_n q_nk x_n / N_k,
    s_k^2 = sum_n q_nk |x_n - mu_k|^2 / (D N_k)    (shared: sum over k, divided by D N)

Both make generalized EM: each E-step lowers F (the flow never increases it) and each exact M-step
lowers it too, so the ELBO never decreases along the closed-form fit. The flow's fixed point is the
exact posterior, so a converged fit is a fixed point of exact EM. The exact reference for the ELBO
enumerates z in the model (:meth:`VariationalMemory.model` with
:meth:`VariationalMemory.exact_guide` and :class:`pyro.infer.TraceEnum_ELBO`), which gives
``sum_n log p(x_n)``.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import tempfile

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, TraceEnum_ELBO
from pyro.nn import PyroModule, PyroParam, pyro_method
from tqdm.auto import tqdm

from pyro_am._validation import check_finite, check_int, check_positive
from pyro_am.dynamics import RetrievalResult, retrieve
from pyro_am.energies import GaussianMixtureEnergy
from pyro_am.models._kmeans import best_kmeans_plus_plus, lloyd, squared_distances
from pyro_am.models.flow import FlowResult, assignment_flow, check_flow_arguments, free_energy

logger = logging.getLogger(__name__)

SCALES = ("shared", "per_memory")
M_STEPS = ("closed_form", "gradient")
INITS = ("kmeans", "kmeans++")
_INSTANCE_COUNTER = itertools.count()


def _fast_log_joint(x, squared_norms, locs, log_weights, variances):
    """Compute ``GaussianMixtureEnergy.component_log_likelihoods`` for (N, D) data, unchecked.

    The fit loop calls this once per iteration; building an energy there would repeat its argument
    checks, each of which synchronizes with the device.
    """
    dim = x.shape[-1]
    distances = (squared_norms.unsqueeze(-1) - 2.0 * x @ locs.T + locs.square().sum(-1)).clamp_min(
        0.0
    )
    return (
        log_weights - 0.5 * dim * torch.log(2 * math.pi * variances) - 0.5 * distances / variances
    )


def _as_data(name: str, value, like: torch.Tensor | None = None) -> torch.Tensor:
    """Convert array-like data of shape (N, D) to a tensor: numpy keeps its float dtype."""
    if isinstance(value, torch.Tensor):
        tensor = value
    else:
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be numeric, but has dtype {array.dtype}.")
        tensor = torch.as_tensor(array if array.dtype.kind == "f" else array.astype(np.float64))
        if like is not None:
            tensor = tensor.to(dtype=like.dtype, device=like.device)
    if not torch.is_floating_point(tensor):
        tensor = tensor.to(torch.float64 if like is None else like.dtype)
    if tensor.dim() != 2:
        raise ValueError(f"{name} must have shape (N, D), but has shape {tuple(tensor.shape)}.")
    return check_finite(name, tensor)


class VariationalMemory(PyroModule):
    """Gaussian mixture memory fitted by generalized variational EM with a flow E-step.

    It is a :class:`~pyro.nn.PyroModule`, so :meth:`model` and :meth:`guide` work with
    :class:`pyro.infer.SVI` and :class:`pyro.infer.TraceEnum_ELBO` (the guide's categorical site is
    enumerated, so the ELBO is exact under q). It also offers a scikit-learn style
    :meth:`fit` / :meth:`predict` for clustering, and :meth:`retrieve` for denoising and completion
    on the learned memories. Each instance scopes its parameters under its own name in Pyro's
    parameter store, so two instances never share parameters.

    :param int num_memories: number of memories (mixture components) K >= 1.
    :param int dim: dimension D of the data.
    :param str scale: ``"shared"`` (one isotropic scale) or ``"per_memory"`` (one isotropic scale
        per memory, scikit-learn's ``covariance_type="spherical"``).
    :param int flow_steps: number of flow steps T >= 1 in each E-step.
    :param float flow_step_size: step size eta of the flow; in (0, 1] for the mirror scheme.
    :param str flow_scheme: ``"mirror"`` or ``"euler"`` (see :mod:`pyro_am.models.flow`).
    :param bool warm_start: start each datum's flow from its logits of the previous call, stored by
        datum index, instead of from uniform.
    :param str m_step: ``"closed_form"`` (exact EM M-step) or ``"gradient"`` (Adam on the free
        energy through :class:`pyro.infer.SVI`), used by :meth:`fit`.
    :param int max_iter: the maximum number of EM iterations (or gradient steps) in :meth:`fit`.
    :param float tol: :meth:`fit` stops once the ELBO per datum changes by less than ``tol``
        between iterations (scikit-learn's ``GaussianMixture`` uses the same rule and 1e-3).
    :param float learning_rate: Adam learning rate of the gradient M-step.
    :param str init: ``"kmeans"`` (k-means++ seeding followed by Lloyd's iterations; the initial
        parameters are the M-step of the k-means labels) or ``"kmeans++"`` (seeding only).
    :param int init_restarts: number of k-means++ seedings drawn. The one with the lowest sum of
        squared distances to the nearest centre is kept (and refined by Lloyd's iterations).
    :param float reg_variance: added to each variance in the closed-form M-step, which keeps a
        memory holding one datum from collapsing (scikit-learn's ``reg_covar``).
    :param int seed: seed of the initialization.
    :param bool progress: show a progress bar in :meth:`fit`.
    :param torch.Tensor init_locs: optional initial memories (K, D); their dtype and device become
        the parameters'. The default draws standard normal memories in the default dtype.
    :param str name: name scoping the parameters in Pyro's parameter store; unique by default.
    """

    def __init__(
        self,
        num_memories: int,
        dim: int,
        scale: str = "shared",
        flow_steps: int = 10,
        flow_step_size: float = 0.5,
        flow_scheme: str = "mirror",
        warm_start: bool = True,
        m_step: str = "closed_form",
        max_iter: int = 100,
        tol: float = 1e-3,
        learning_rate: float = 0.05,
        init: str = "kmeans",
        init_restarts: int = 5,
        reg_variance: float = 1e-6,
        seed: int = 0,
        progress: bool = False,
        init_locs: torch.Tensor | None = None,
        name: str | None = None,
    ):
        super().__init__(name or f"variational_memory_{next(_INSTANCE_COUNTER)}")
        self.num_memories = check_int("num_memories", num_memories, minimum=1)
        self.dim = check_int("dim", dim, minimum=1)
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, but got {scale!r}.")
        if m_step not in M_STEPS:
            raise ValueError(f"m_step must be one of {M_STEPS}, but got {m_step!r}.")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, but got {init!r}.")
        self.flow_steps, self.flow_step_size = check_flow_arguments(
            flow_steps, flow_step_size, flow_scheme
        )
        self.flow_scheme = flow_scheme
        self.scale = scale
        self.warm_start = bool(warm_start)
        self.m_step = m_step
        self.max_iter = check_int("max_iter", max_iter, minimum=1)
        self.tol = check_positive("tol", tol, allow_zero=True)
        self.learning_rate = check_positive("learning_rate", learning_rate)
        self.init = init
        self.init_restarts = check_int("init_restarts", init_restarts, minimum=1)
        self.reg_variance = check_positive("reg_variance", reg_variance, allow_zero=True)
        self.seed = check_int("seed", seed, minimum=0)
        self.progress = bool(progress)

        if init_locs is None:
            generator = torch.Generator().manual_seed(self.seed)
            init_locs = torch.randn(num_memories, dim, generator=generator)
        else:
            init_locs = _as_data("init_locs", init_locs)
            if init_locs.shape != (num_memories, dim):
                raise ValueError(
                    f"init_locs must have shape ({num_memories}, {dim}), "
                    f"but has shape {tuple(init_locs.shape)}."
                )
        scale_shape = () if scale == "shared" else (num_memories,)
        self._set_parameters(
            init_locs,
            init_locs.new_zeros(num_memories),
            init_locs.new_ones(scale_shape),
        )
        self._stored_logits: torch.Tensor | None = None
        self.elbo_history_: list[float] = []
        self.n_iter_ = 0
        self.converged_ = False

    # -- parameters ------------------------------------------------------------------------------
    def _set_parameters(self, locs, mixture_logits, scales) -> None:
        self.locs = PyroParam(locs.detach().clone(), constraints.real)
        self.mixture_logits = PyroParam(mixture_logits.detach().clone(), constraints.real)
        self.scales = PyroParam(scales.detach().clone(), constraints.positive)

    def _parameters_snapshot(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            self.locs.detach().clone(),
            self.mixture_logits.detach().clone(),
            (self.scales.detach().clone()),
        )

    def energy(self) -> GaussianMixtureEnergy:
        """Return ``-log p(x)`` of the current mixture as a detached GaussianMixtureEnergy."""
        return GaussianMixtureEnergy(
            self.locs.detach(), self.scales.detach(), logits=self.mixture_logits.detach()
        )

    def _check_data(self, name: str, data) -> torch.Tensor:
        data = _as_data(name, data, like=self.locs)
        if data.shape[-1] != self.dim:
            raise ValueError(
                f"{name} must have shape (N, {self.dim}) to match dim={self.dim}, "
                f"but has shape {tuple(data.shape)}."
            )
        if data.dtype != self.locs.dtype or data.device != self.locs.device:
            raise TypeError(
                f"{name} has dtype {data.dtype} on {data.device}, but the memories have dtype "
                f"{self.locs.dtype} on {self.locs.device}; convert the data or call initialize()."
            )
        return data

    def log_joint(self, data: torch.Tensor) -> torch.Tensor:
        """Compute ``l_nk = log pi_k + log N(x_n; mu_k, s_k^2 I)``, (N, K), differentiably."""
        energy = GaussianMixtureEnergy(self.locs, self.scales, logits=self.mixture_logits)
        return energy.component_log_likelihoods(data)

    # -- E-step ----------------------------------------------------------------------------------
    def reset_assignments(self) -> None:
        """Forget the stored per-datum logits, so the next flow starts from uniform."""
        self._stored_logits = None

    def flow(
        self,
        data: torch.Tensor,
        index: torch.Tensor | None = None,
        steps: int | None = None,
        warm_start: bool | None = None,
        log_joint: torch.Tensor | None = None,
    ) -> FlowResult:
        """Run the E-step flow for ``data`` and store the resulting logits under ``index``.

        :param torch.Tensor data: data of shape (N, D).
        :param torch.Tensor index: datum indices of shape (N,) under which the logits are stored
            for warm starts; the default is ``arange(N)``.
        :param int steps: number of flow steps; the default is ``flow_steps``.
        :param bool warm_start: overrides the instance's ``warm_start``.
        :param torch.Tensor log_joint: precomputed log joints (N, K); computed when None.
        :returns: a :class:`~pyro_am.models.flow.FlowResult` (no gradients).
        """
        data = self._check_data("data", data)
        num_data = data.shape[0]
        if index is None:
            index = torch.arange(num_data, device=data.device)
        elif index.shape != (num_data,):
            raise ValueError(
                f"index must have shape ({num_data},), but has shape {tuple(index.shape)}."
            )
        if log_joint is None:
            with torch.no_grad():
                log_joint = self.log_joint(data)
        warm = self.warm_start if warm_start is None else warm_start
        init = None
        if warm and self._stored_logits is not None:
            # Indices never seen before read zero logits, which is the uniform start.
            self._grow_storage(int(index.max()) + 1, log_joint)
            init = self._stored_logits[index]
        result = assignment_flow(
            log_joint,
            init,
            steps=steps or self.flow_steps,
            step_size=self.flow_step_size,
            scheme=self.flow_scheme,
        )
        self._store_logits(index, result.log_q)
        return result

    def _grow_storage(self, needed: int, like: torch.Tensor) -> None:
        """Make the stored logits hold at least ``needed`` rows of ``like``'s dtype and K."""
        stored = self._stored_logits
        same_kind = (
            stored is not None
            and stored.shape[-1] == like.shape[-1]
            and stored.dtype == like.dtype
            and stored.device == like.device
        )
        if not same_kind:
            self._stored_logits = like.new_zeros(needed, like.shape[-1])
        elif len(stored) < needed:
            padding = stored.new_zeros(needed - len(stored), stored.shape[-1])
            self._stored_logits = torch.cat([stored, padding])

    def _store_logits(self, index, log_q) -> None:
        self._grow_storage(int(index.max()) + 1, log_q)
        self._stored_logits[index] = log_q

    # -- Pyro model and guides -------------------------------------------------------------------
    @pyro_method
    def model(self, data: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """The mixture with the assignment as a latent site ``"assignment"`` in plate ``"data"``.

        The site is marked for parallel enumeration, so with :meth:`exact_guide` and
        :class:`~pyro.infer.TraceEnum_ELBO` it is summed out exactly. ``index`` is unused here and
        accepted so that model and guide share a signature.
        """
        data = self._check_data("data", data)
        locs, scales = self.locs, self.scales
        with pyro.plate("data", data.shape[0]):
            assignment = pyro.sample(
                "assignment",
                dist.Categorical(logits=self.mixture_logits),
                infer={"enumerate": "parallel"},
            )
            scale = scales if scales.dim() == 0 else scales[assignment].unsqueeze(-1)
            pyro.sample("obs", dist.Normal(locs[assignment], scale).to_event(1), obs=data)

    def make_guide(self, steps: int | None = None, warm_start: bool | None = None):
        """Return a guide whose assignment logits come from ``steps`` flow steps.

        The logits are computed from the current (detached) model parameters, so the guide has no
        parameters of its own: the ELBO's gradient reaches the memories, weights and scales with q
        held fixed, which is the generalized EM M-step.
        """

        def guide(data: torch.Tensor, index: torch.Tensor | None = None) -> None:
            result = self.flow(data, index, steps=steps, warm_start=warm_start)
            with pyro.plate("data", data.shape[0]):
                pyro.sample(
                    "assignment",
                    dist.Categorical(logits=result.log_q),
                    infer={"enumerate": "parallel"},
                )

        return guide

    @pyro_method
    def guide(self, data: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """The flow guide with the instance's ``flow_steps`` and ``warm_start``."""
        self.make_guide()(data, index)

    @pyro_method
    def exact_guide(self, data: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """An empty guide: with :meth:`model` and TraceEnum_ELBO the assignment is summed out."""

    @pyro_method
    def free_energy(
        self, data: torch.Tensor, log_q: torch.Tensor | None = None, index=None
    ) -> torch.Tensor:
        """Compute ``sum_n F(q_n; x_n)``, the negative ELBO, differentiable in the parameters.

        :param torch.Tensor log_q: assignment log probabilities (N, K), held fixed; when None they
            come from :meth:`flow`.
        """
        data = self._check_data("data", data)
        log_joint = self.log_joint(data)
        if log_q is None:
            log_q = self.flow(data, index, log_joint=log_joint.detach()).log_q
        return free_energy(log_q.detach(), log_joint).sum()

    # -- fitting ---------------------------------------------------------------------------------
    def initialize(self, data) -> VariationalMemory:
        """Set the parameters from k-means on ``data`` (seeded by ``seed``), in its dtype."""
        data = _as_data("data", data)
        self._check_sizes(data)
        locs, log_weights, variances = self._initial_parameters(data)
        self._set_parameters(locs, log_weights, variances.sqrt())
        self.reset_assignments()
        return self

    def _initial_parameters(self, data):
        """Return (locs, log weights, variances): the M-step of the k-means labels of ``data``."""
        generator = torch.Generator(device=data.device).manual_seed(self.seed)
        with torch.no_grad():
            centres = best_kmeans_plus_plus(data, self.num_memories, self.init_restarts, generator)
            if self.init == "kmeans":
                centres, _ = lloyd(data, centres)
            labels = squared_distances(data, centres).argmin(-1)
            q = torch.nn.functional.one_hot(labels, self.num_memories).to(data.dtype)
            return self._closed_form_m_step(data, data.square().sum(-1), q, fallback_locs=centres)

    def _check_sizes(self, data: torch.Tensor) -> None:
        if data.shape[-1] != self.dim:
            raise ValueError(
                f"X must have shape (N, {self.dim}) to match dim={self.dim}, "
                f"but has shape {tuple(data.shape)}."
            )
        if self.num_memories > data.shape[0]:
            raise ValueError(
                f"num_memories must be at most the number of data, {data.shape[0]}, "
                f"but is {self.num_memories}."
            )

    def _closed_form_m_step(self, data, squared_norms, q, fallback_locs):
        """Maximize the ELBO over weights, means and variances with q fixed."""
        num_data, dim = data.shape
        counts = q.sum(0)
        safe_counts = counts + 10 * torch.finfo(data.dtype).eps
        log_weights = torch.log(safe_counts / safe_counts.sum())

        # A memory with no mass keeps its previous mean instead of collapsing to 0 / 0.
        locs = (q.T @ data) / safe_counts.unsqueeze(-1)
        locs = torch.where(counts.unsqueeze(-1) > 0, locs, fallback_locs)

        # sum_n q_nk |x_n - mu_k|^2 = sum_n q_nk |x_n|^2 - N_k |mu_k|^2, in GEMM form.
        spread = (q.T @ squared_norms - counts * locs.square().sum(-1)).clamp_min(0.0)
        if self.scale == "shared":
            variances = spread.sum() / (num_data * dim) + self.reg_variance
        else:
            variances = spread / (safe_counts * dim) + self.reg_variance
        return locs, log_weights, variances

    def fit(self, X, checkpoint=None, resume: bool = False) -> VariationalMemory:
        """Fit the memories to ``X`` by generalized EM.

        :param X: data of shape (N, D), an array or a tensor; a tensor's dtype and device are kept,
            numpy float arrays keep their precision.
        :param checkpoint: optional path; the parameters are written there atomically (temporary
            file, then rename) every 10 iterations and at the end.
        :param bool resume: start from ``checkpoint`` if that file exists instead of initializing.
        :returns: self. ``elbo_history_`` holds the ELBO per datum of every iteration.
        :raises RuntimeError: if the ELBO or a parameter becomes NaN or infinite; the parameters of
            the last finite iteration are kept and the message names the iteration.
        """
        data = _as_data("X", X)
        self._check_sizes(data)
        start, initial = 0, None
        if resume and checkpoint is not None and os.path.exists(checkpoint):
            start = self.load_checkpoint(checkpoint)
            logger.info("resumed from %s at iteration %d", checkpoint, start)
        elif self.m_step == "closed_form":
            # The closed-form loop runs on plain tensors and writes the parameters at the end.
            initial = self._initial_parameters(data)
            self.reset_assignments()
            self.elbo_history_ = []
        else:
            self.initialize(data)
            self.elbo_history_ = []
        if self.m_step == "closed_form":
            self._fit_closed_form(data, start, checkpoint, initial)
        else:
            self._fit_gradient(self._check_data("X", data), start, checkpoint)
        if checkpoint is not None:
            self.save_checkpoint(checkpoint)
        self.labels_ = self.predict(data)
        return self

    def fit_stream(self, source, batch_size: int | None = None, **options) -> VariationalMemory:
        """Fit the memories by stepwise (online) EM over minibatches that need not fit in memory.

        Each step runs the flow E-step on one batch, blends the batch's averaged sufficient
        statistics into running averages with step size ``rho_t = (t + tau)^(-kappa)``, and
        applies the closed-form M-step to them (see :mod:`pyro_am.models._vm_stream`). The first
        batch initializes the memories by k-means unless ``warm_start=True``.

        :param source: an array, ``numpy.memmap`` or tensor of shape (N, D); a ``.npy`` path, a
            folder of ``.npy`` files or a list of paths; or an iterable of batches such as a
            :class:`torch.utils.data.DataLoader` (see :func:`pyro_am.minibatches.minibatches`).
        :param int batch_size: rows per batch for array and file sources.
        :param options: ``num_epochs`` (default 1), ``max_steps``, ``step_size_offset`` (tau,
            default 1.0), ``step_size_exponent`` (kappa in [0, 1], default 0.7), ``shuffle``
            (default True), ``seed`` (block order), ``warm_start``, ``dtype`` and ``device``
            (of the batches; None keeps the source's), ``checkpoint``,
            ``checkpoint_every``, ``resume`` and ``group`` (a ``torch.distributed`` group).
        :returns: self. ``elbo_history_`` holds each batch's ELBO per datum before its step.
        :raises RuntimeError: if the ELBO or a parameter becomes NaN or infinite; the parameters
            of the last finite step are kept.
        """
        from pyro_am.models._vm_stream import fit_stream

        return fit_stream(self, source, batch_size=batch_size, **options)

    def _fit_closed_form(self, data, start, checkpoint, initial=None) -> None:
        num_data = data.shape[0]
        squared_norms = data.square().sum(-1)
        if initial is None:
            data = self._check_data("X", data)
            locs, log_weights, scales = self._parameters_snapshot()
            variances = scales.square()
        else:
            locs, log_weights, variances = initial
        # Attributes of a PyroModule are slow to set, so the loop keeps its state in locals.
        history = self.elbo_history_
        log_q = None
        converged = False
        completed = start
        iterations = range(start, self.max_iter)
        for iteration in tqdm(iterations, disable=not self.progress, desc="variational EM"):
            log_joint = _fast_log_joint(data, squared_norms, locs, log_weights, variances)
            flow = assignment_flow(
                log_joint,
                log_q if self.warm_start else None,
                steps=self.flow_steps,
                step_size=self.flow_step_size,
                scheme=self.flow_scheme,
                validate=False,
            )
            elbo = -float(flow.free_energy.sum()) / num_data
            if not math.isfinite(elbo):
                self._stop_on_nan(iteration, elbo, locs, log_weights, variances)
            log_q = flow.log_q
            history.append(elbo)
            completed = iteration + 1
            new_locs, new_log_weights, new_variances = self._closed_form_m_step(
                data, squared_norms, log_q.exp(), fallback_locs=locs
            )
            finite = all(bool(torch.isfinite(t).all()) for t in (new_locs, new_variances))
            if not finite:
                self._stop_on_nan(iteration, elbo, locs, log_weights, variances)
            locs, log_weights, variances = new_locs, new_log_weights, new_variances
            if checkpoint is not None and completed % 10 == 0:
                self.n_iter_ = completed
                self._set_parameters(locs, log_weights, variances.sqrt())
                self.save_checkpoint(checkpoint)
            if len(history) > 1 and abs(history[-1] - history[-2]) < self.tol:
                converged = True
                break
        self.n_iter_ = completed
        self.converged_ = converged
        self._set_parameters(locs, log_weights, variances.sqrt())
        if log_q is not None:
            self._store_logits(torch.arange(num_data, device=data.device), log_q)
        logger.info(
            "variational EM: %d iterations, ELBO per datum %.6g, converged=%s",
            completed,
            history[-1] if history else math.nan,
            converged,
        )

    def _stop_on_nan(self, iteration, elbo, locs, log_weights, variances):
        self.n_iter_ = iteration
        self.converged_ = False
        self._set_parameters(locs, log_weights, variances.sqrt())
        raise RuntimeError(
            f"fit stopped at iteration {iteration}: the ELBO or the updated parameters are not "
            f"finite (ELBO per datum {elbo}); the parameters before that iteration were kept."
        )

    def _fit_gradient(self, data, start, checkpoint) -> None:
        num_data = data.shape[0]
        index = torch.arange(num_data, device=data.device)

        def loss(model, guide, data, index):
            return self.free_energy(data, index=index) / num_data

        svi = SVI(self.model, self.guide, pyro.optim.Adam({"lr": self.learning_rate}), loss=loss)
        self.converged_ = False
        iterations = range(start, self.max_iter)
        for iteration in tqdm(iterations, disable=not self.progress, desc="variational EM (Adam)"):
            snapshot = self._parameters_snapshot()
            value = float(svi.step(data, index))
            parameters_finite = all(
                bool(torch.isfinite(t).all()) for t in self._current_parameters()
            )
            if not (math.isfinite(value) and parameters_finite):
                locs, logits, scales = snapshot
                self._stop_on_nan(iteration, -value, locs, logits, scales.square())
            self.elbo_history_.append(-value)
            self.n_iter_ = iteration + 1
            if checkpoint is not None and (iteration + 1) % 10 == 0:
                self.save_checkpoint(checkpoint)
            history = self.elbo_history_
            if len(history) > 1 and abs(history[-1] - history[-2]) < self.tol:
                self.converged_ = True
                break

    def _current_parameters(self):
        return self.locs.detach(), self.mixture_logits.detach(), self.scales.detach()

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, path) -> None:
        """Write the parameters and the fit history to ``path`` atomically."""
        locs, logits, scales = self._current_parameters()
        state = {
            "locs": locs.cpu(),
            "mixture_logits": logits.cpu(),
            "scales": scales.cpu(),
            "scale": self.scale,
            "n_iter": self.n_iter_,
            "elbo_history": list(self.elbo_history_),
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

    def load_checkpoint(self, path) -> int:
        """Load parameters written by :meth:`save_checkpoint`; returns the iteration reached."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["scale"] != self.scale or tuple(state["locs"].shape) != (
            self.num_memories,
            self.dim,
        ):
            raise ValueError(
                f"checkpoint {os.fspath(path)!r} holds memories of shape "
                f"{tuple(state['locs'].shape)} with scale={state['scale']!r}, which does not "
                f"match this model ({self.num_memories}, {self.dim}) with scale={self.scale!r}."
            )
        device = self.locs.device
        self._set_parameters(
            state["locs"].to(device), state["mixture_logits"].to(device), state["scales"].to(device)
        )
        self.elbo_history_ = list(state["elbo_history"])
        self.n_iter_ = int(state["n_iter"])
        self.reset_assignments()
        return self.n_iter_

    # -- clustering and retrieval ----------------------------------------------------------------
    def assign(self, X, exact: bool = False) -> torch.Tensor:
        """Compute assignment probabilities q (N, K) after ``flow_steps`` flow steps from uniform.

        :param bool exact: return the exact posterior ``softmax(l)`` instead.
        """
        data = self._check_data("X", X)
        with torch.no_grad():
            log_joint = self.log_joint(data)
        if exact:
            return torch.softmax(log_joint, dim=-1)
        result = assignment_flow(
            log_joint, steps=self.flow_steps, step_size=self.flow_step_size, scheme=self.flow_scheme
        )
        return result.log_q.exp()

    def predict(self, X):
        """Return the most probable memory of each datum; a numpy array for numpy input."""
        if self.flow_scheme == "mirror":
            # From uniform q the mirror flow gives log q_T = (1 - (1 - eta)^T) l + const, which
            # orders the memories as l does, so the flow's argmax is the posterior's.
            data = self._check_data("X", X)
            with torch.no_grad():
                labels = self.log_joint(data).argmax(-1)
        else:
            labels = self.assign(X).argmax(-1)
        return labels if isinstance(X, torch.Tensor) else labels.cpu().numpy()

    def fit_predict(self, X, **kwargs):
        """Fit to ``X`` and return its labels."""
        return self.fit(X, **kwargs).predict(X)

    def score(self, X) -> float:
        """Return the mean log-likelihood ``(1/N) sum_n log p(x_n)`` under the fitted mixture."""
        data = self._check_data("X", X)
        return float(self.energy().log_prob(data).mean())

    def retrieve(self, x, mask=None, **kwargs) -> RetrievalResult:
        """Denoise or complete ``x`` by :func:`pyro_am.retrieve` on the learned mixture energy.

        :param x: queries of shape (..., D).
        :param mask: optional boolean tensor, True where a coordinate is observed and clamped.
        :param kwargs: passed to :func:`pyro_am.retrieve` (``method``, ``max_steps``, ``tol``, ...).
        """
        if not isinstance(x, torch.Tensor):
            x = _as_data("x", np.atleast_2d(x), like=self.locs)
        return retrieve(self.energy(), x, mask=mask, **kwargs)


def elbo_gap_table(
    memory: VariationalMemory, data: torch.Tensor, steps=(1, 2, 4, 8, 16, 32)
) -> list[dict]:
    """Tabulate the ELBO of the T-step flow guide against the exact marginal likelihood.

    Both ELBOs are computed by :class:`pyro.infer.TraceEnum_ELBO`: the exact one with
    :meth:`VariationalMemory.exact_guide` (z summed out in the model, which gives
    ``sum_n log p(x_n)``), the flow one with a guide that runs T flow steps from uniform q (no warm
    start) and is enumerated under q. The gap equals ``sum_n KL(q_n || p(z_n | x_n)) >= 0``.

    :returns: one dict per T with keys ``steps``, ``elbo``, ``exact``, ``gap`` and
        ``gap_per_datum``.
    """
    data = memory._check_data("data", data)
    objective = TraceEnum_ELBO(max_plate_nesting=1)
    with torch.no_grad():
        exact = -objective.loss(memory.model, memory.exact_guide, data)
        rows = []
        for num_steps in steps:
            num_steps = check_int("steps", num_steps, minimum=1)
            guide = memory.make_guide(steps=num_steps, warm_start=False)
            elbo = -objective.loss(memory.model, guide, data)
            gap = exact - elbo
            rows.append(
                {
                    "steps": num_steps,
                    "elbo": elbo,
                    "exact": exact,
                    "gap": gap,
                    "gap_per_datum": gap / data.shape[0],
                }
            )
    memory.reset_assignments()
    return rows


__all__ = ["VariationalMemory", "elbo_gap_table"]
