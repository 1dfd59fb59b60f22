"""DP memory: a Gaussian mixture memory with a truncated Dirichlet or Pitman-Yor process prior.

The generative model, with truncation K, concentration alpha and discount ``0 <= d < 1``::

    v_k ~ Beta(1 - d, alpha + k d),   k = 1 .. K-1,      w = stick_breaking(v)
    mu_k ~ N(m0, s0^2 I),   z_n ~ Categorical(w),   x_n ~ N(mu_{z_n}, s^2 I)  (or diag(s_d^2))

The variational family is ``q(v_k) = Beta(a_k, b_k)`` (sampled as the ``"weights"`` site through
:class:`~pyro_am.distributions.BetaStickBreaking`), ``q(mu_k) = N(m_k, diag(t_k^2))``, and the noise
scale ``s`` is a point estimate when it is learned. :meth:`DPMemory.fit` runs closed-form coordinate
ascent (``method="cavi"``, see :mod:`pyro_am.models._dp_cavi`) or Pyro SVI (``method="svi"``) on the
same parameters.

Memory creation follows the Chinese restaurant process: given counts n_k, a datum joins memory k
with weight ``(n_k - d) N(x; m_k, s^2 I)`` or opens a new memory with weight
``(alpha + d K) N(x; m0, (s^2 + s0^2) I)``, which defines the energy::

    E_crp(x) = -log[(alpha + d K) N(x; m0, (s^2 + s0^2) I) + sum_k (n_k - d) N(x; m_k, s^2 I)]
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import pyro_method

from pyro_am._validation import check_int, check_interval, check_positive
from pyro_am.distributions.mixture import GaussianMixture
from pyro_am.distributions.stick_breaking import BetaStickBreaking, StickBreakingWeights
from pyro_am.dynamics import retrieve
from pyro_am.energies import GaussianMixtureEnergy
from pyro_am.models import _dp_cavi as cavi
from pyro_am.models import _dp_crp, _dp_io
from pyro_am.models._dp_crp import CRPEnergy
from pyro_am.models._dp_fit import fit_cavi, fit_svi, load_checkpoint
from pyro_am.models._dp_io import atomic_save
from pyro_am.models._dp_parameters import DPMemoryParameters

logger = logging.getLogger(__name__)

COVARIANCES = ("isotropic", "diagonal")
ASSIGNMENTS = ("marginalized", "enumerated")
METHODS = ("cavi", "svi")
_instance_ids = itertools.count()
# Lloyd's iterations of the k-means initialization. The labelling only seeds coordinate ascent,
# which refines it, so it need not converge.
_LLOYD_ITERATIONS = 20


@dataclass
class DPFitResult:
    """Record of one :meth:`DPMemory.fit` run.

    :ivar elbo: the ELBO after every iteration. For CAVI it is the exact mean-field ELBO of the
        parameters after that iteration; for SVI it is the negative of the step's loss estimate.
    :ivar iterations: the total number of iterations, including those before a resume.
    :ivar converged: whether the relative ELBO change fell below ``tol``.
    :ivar num_created: memories created by growing the truncation.
    :ivar num_pruned: memories removed because their expected weight fell below the threshold.
    :ivar num_merged: memories removed by an accepted merge into another memory.
    :ivar events: one dict per structural change, with keys ``"iteration"``, ``"kind"``
        (``"created"``, ``"pruned"`` or ``"merged"``), ``"memory"`` (its index at that time) and
        ``"weight"`` (its expected weight). A merge also has ``"into"``, the index of the memory
        that absorbed it, and its weight is that memory's weight after the merge.
    :ivar method: ``"cavi"``, ``"svi"`` or ``"stream"`` (:meth:`DPMemory.fit_stream`).
    :ivar wall_time: seconds spent in this call.
    """

    elbo: list = field(default_factory=list)
    iterations: int = 0
    converged: bool = False
    num_created: int = 0
    num_pruned: int = 0
    num_merged: int = 0
    events: list = field(default_factory=list)
    method: str = "cavi"
    wall_time: float = 0.0


class DPMemory(DPMemoryParameters):
    """Gaussian mixture memory with a truncated stick-breaking (DP or Pitman-Yor) prior.

    The memories are the posterior means of the mixture components, and the number in use is
    learned. Coordinate ascent removes memories whose expected weight falls below
    ``prune_threshold``, proposes a new memory while the last memory has more than
    ``grow_threshold`` of the weight, and proposes merges of close memories when the ELBO stalls.
    Births and merges are kept only if they raise the ELBO. :meth:`log_predictive` is the
    posterior predictive density under the variational posterior, not a plug-in estimate.
    :meth:`model` and :meth:`guide` are Pyro callables for SVI, :class:`pyro.infer.Predictive` and
    autoguides (the assignment is marginalized, so every latent site is continuous)::

        memory = DPMemory(dim=2, truncation=20)
        result = memory.fit(data, method="cavi")
        memory.num_memories, memory.memories, memory.weights
        memory.retrieve(noisy_queries).states

    Each instance registers its parameters under its own name (``memory.name``), so two instances
    in one process never share entries of Pyro's parameter store.

    :param int dim: dimension D of the data.
    :param int truncation: initial number of memories K >= 1.
    :param float concentration: alpha > 0.
    :param float discount: Pitman-Yor discount d in [0, 1); 0 is the Dirichlet process.
    :param prior_mean: m0, a float or a tensor of shape (D,).
    :param prior_scale: s0 > 0, a float or a tensor of shape (D,).
    :param scale: noise standard deviation s. None learns it as a point estimate; a float or a
        tensor of shape (D,) (diagonal covariance) fixes it.
    :param str covariance: ``"isotropic"`` (one s) or ``"diagonal"`` (one s_d per coordinate).
    :param bool per_memory_scale: learn one noise scale per memory (like scikit-learn's
        ``"spherical"`` and ``"diag"`` covariances) instead of one shared by all memories.
    :param tuple scale_prior: ``(nu, sigma0)``: a conjugate Gamma prior on each learned
        precision worth ``nu`` pseudo-data with squared residual ``sigma0^2`` per coordinate
        (see :mod:`pyro_am.models._dp_cavi`). The default is ``(0, 1)`` (no prior) for a shared
        scale and ``(D, 1)`` per memory, where a memory with few data needs it. A memory with no
        data has variance ``sigma0^2``, so set ``sigma0`` to the data's scale.
    :param str assignment: ``"marginalized"`` sums z out in the likelihood; ``"enumerated"`` samples
        z with parallel enumeration, for :class:`~pyro.infer.TraceEnum_ELBO`.
    :param float grow_threshold: grow the truncation while the last expected weight exceeds this.
    :param float prune_threshold: remove memories whose expected weight falls below this.
    :param int max_truncation: the largest truncation that growth may reach.
    :param str name: prefix of the parameter names; a unique one is chosen when None.
    """

    def __init__(
        self,
        dim: int,
        truncation: int = 20,
        concentration: float = 1.0,
        discount: float = 0.0,
        prior_mean=0.0,
        prior_scale=1.0,
        scale=None,
        covariance: str = "isotropic",
        per_memory_scale: bool = False,
        scale_prior=None,
        assignment: str = "marginalized",
        grow_threshold: float = 1e-2,
        prune_threshold: float = 1e-3,
        max_truncation: int = 200,
        name: str | None = None,
    ):
        super().__init__(name=name if name is not None else f"dp_memory_{next(_instance_ids)}")
        self.dim = check_int("dim", dim, minimum=1)
        truncation = check_int("truncation", truncation, minimum=1)
        self.max_truncation = check_int("max_truncation", max_truncation, minimum=truncation)
        self.concentration = float(check_positive("concentration", concentration))
        self.discount = float(check_interval("discount", discount, 0.0, 1.0))
        self.grow_threshold = float(check_interval("grow_threshold", grow_threshold, 0.0, 1.0))
        self.prune_threshold = float(check_interval("prune_threshold", prune_threshold, 0.0, 1.0))
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}, but got {covariance!r}.")
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment must be one of {ASSIGNMENTS}, but got {assignment!r}.")
        self.covariance = covariance
        self.assignment = assignment
        self.per_memory_scale = bool(per_memory_scale)
        if scale_prior is None:
            scale_prior = (float(self.dim), 1.0) if self.per_memory_scale else (0.0, 1.0)
        if not (isinstance(scale_prior, (tuple, list)) and len(scale_prior) == 2):
            raise ValueError(f"scale_prior must be a pair (nu, sigma0), but got {scale_prior!r}.")
        pseudo_count = float(check_positive("scale_prior[0]", scale_prior[0], allow_zero=True))
        if self.per_memory_scale and pseudo_count == 0:
            raise ValueError(
                "scale_prior[0] must be positive with per_memory_scale=True, because a memory "
                "with one datum would otherwise get zero variance."
            )
        self.scale_prior = (pseudo_count, float(check_positive("scale_prior[1]", scale_prior[1])))

        self.register_buffer("prior_mean", self._vector("prior_mean", prior_mean))
        prior_scale = self._vector("prior_scale", prior_scale)
        if not bool((prior_scale > 0).all()):
            raise ValueError(f"prior_scale must be positive, but got {prior_scale.tolist()}.")
        self.register_buffer("prior_scale", prior_scale)
        self.learn_scale = scale is None
        if scale is not None and self.per_memory_scale:
            raise ValueError("per_memory_scale=True learns the scales, so scale must be None.")
        if scale is not None:
            self.register_buffer("fixed_scale", self._fixed_scale(scale))
        self.register_buffer("memory_counts", torch.zeros(truncation, dtype=torch.float64))
        self._write_posterior(self._prior_draw(truncation, torch.get_default_dtype()))

    # -- Pyro model and guide --------------------------------------------------------------------
    @pyro_method
    def model(self, data=None, subsample_size=None, num_data=None):
        """Pyro model: the stick-breaking prior, the memories, and the observed data.

        :param torch.Tensor data: observations of shape (N, D); None samples them.
        :param int subsample_size: the minibatch size of the ``"data"`` plate.
        :param int num_data: N when ``data`` is None.
        """
        loc = self.memory_loc
        dtype, device = loc.dtype, loc.device
        if data is not None:
            num_data = data.shape[0]
            if data.dtype != dtype:
                raise TypeError(
                    f"data has dtype {data.dtype} but the parameters have dtype {dtype}; call "
                    "memory.initialize(data) or memory.to(data.dtype) first."
                )
        elif num_data is None:
            raise ValueError("pass data, or num_data to sample data from the model.")
        truncation = self.truncation
        concentration = torch.tensor(self.concentration, dtype=dtype, device=device)
        weights = pyro.sample(
            "weights", StickBreakingWeights(concentration, truncation, self.discount)
        )
        if weights.dim() > 1 and weights.shape[:-1].numel() == 1:
            # Predictive replays guide draws with singleton batch dimensions.
            weights = weights.reshape(truncation)
        prior_mean = self.prior_mean.to(loc)
        prior_scale = self.prior_scale.to(loc)
        with pyro.plate("memories", truncation, dim=-1):
            memories = pyro.sample(
                "locs",
                dist.Normal(prior_mean, prior_scale).expand([truncation, self.dim]).to_event(1),
            )
        scale = self._noise_scale()
        prior = self._prior(loc)
        if self.learn_scale and prior.variance_pseudo_count > 0:
            pyro.factor("scale_prior", prior.variance_log_prior(scale.square()))
        full_scale = self._to_internal(scale).expand(truncation, self.dim)
        with pyro.plate("data", num_data, subsample_size=subsample_size, dim=-1) as index:
            batch = data
            if data is not None and subsample_size is not None and subsample_size < num_data:
                batch = data.index_select(0, index.to(data.device))
            if self.assignment == "marginalized":
                scales = scale if scale.dim() <= 1 and not self._diagonal_shared else full_scale
                logits = weights.clamp_min(torch.finfo(dtype).tiny).log()
                pyro.sample("obs", GaussianMixture(memories, scales, logits=logits), obs=batch)
            else:
                assignment = pyro.sample(
                    "assignment", dist.Categorical(weights), infer={"enumerate": "parallel"}
                )
                component = dist.Normal(memories[assignment], full_scale[assignment])
                pyro.sample("obs", component.to_event(1), obs=batch)

    @pyro_method
    def guide(self, data=None, subsample_size=None, num_data=None):
        """Mean-field guide: Beta sticks and independent diagonal Gaussian memories."""
        sticks = BetaStickBreaking(self.stick_concentration1, self.stick_concentration0)
        pyro.sample("weights", sticks)
        with pyro.plate("memories", self.truncation, dim=-1):
            pyro.sample("locs", dist.Normal(self.memory_loc, self.memory_scale).to_event(1))

    # -- fitting ---------------------------------------------------------------------------------
    def initialize(self, data, seed: int | None = None) -> None:
        """Initialize the parameters from k-means++ and Lloyd's iterations on ``data``.

        The k-means labels are taken as one-hot responsibilities and one coordinate-ascent global
        step turns them into sticks, memory posteriors and (when learned) the noise variance.
        """
        from pyro_am.models._kmeans import kmeans_plus_plus, lloyd

        data = self._check_data("data", data)
        if data.shape[0] < 2:
            # The initial noise variance is the data's spread, which one datum does not have.
            raise ValueError(
                f"data must contain at least 2 data to initialize the memories, but has "
                f"{data.shape[0]}; pass more data, or use partial_fit to add data one at a time."
            )
        generator = torch.Generator(device=data.device)
        generator.manual_seed(int(torch.randint(2**62, ()).item()) if seed is None else seed)
        truncation = min(self.truncation, data.shape[0])
        centres = kmeans_plus_plus(data, truncation, generator=generator)
        _, labels = lloyd(data, centres, max_iter=_LLOYD_ITERATIONS)
        variance = self._initial_variance(self._prior(data), truncation)
        posterior = cavi.hard_assignment_posterior(
            data, labels, truncation, variance, self._prior(data)
        )
        self._write_posterior(posterior)
        self.memory_counts = torch.bincount(labels, minlength=truncation).to(data)

    def fit(
        self,
        data,
        method: str = "cavi",
        max_iter: int = 200,
        tol: float = 1e-6,
        lr: float = 0.05,
        num_particles: int = 1,
        batch_size: int | None = None,
        progress: bool = True,
        checkpoint: str | None = None,
        checkpoint_every: int = 10,
        resume: bool = False,
        seed: int | None = None,
        warm_start: bool = False,
        distributed: bool = False,
    ) -> DPFitResult:
        """Fit the variational posterior to ``data`` by coordinate ascent or SVI.

        :param data: observations of shape (N, D): a tensor (its dtype is kept) or a NumPy array
            (converted to float64).
        :param str method: ``"cavi"`` (closed-form coordinate ascent with memory creation and
            pruning) or ``"svi"`` (Pyro SVI with Adam on the marginalized ELBO; the truncation
            stays fixed).
        :param int max_iter: the total number of iterations, counting those done before a resume.
        :param float tol: stop when the relative ELBO change falls below ``tol`` (CAVI) or when
            the relative change of the mean ELBO over the last 50 steps does (SVI).
        :param float lr: Adam learning rate (SVI).
        :param int num_particles: ELBO particles per SVI step.
        :param int batch_size: SVI minibatch size (the ``"data"`` plate's subsample size).
        :param bool progress: show a tqdm progress bar.
        :param str checkpoint: path of a checkpoint written atomically every ``checkpoint_every``
            iterations and at the end.
        :param bool resume: continue from ``checkpoint`` when it exists.
        :param int seed: seeds the initialization and SVI.
        :param bool warm_start: start from the current parameters instead of k-means.
        :param bool distributed: fit data split across the ranks of the default
            ``torch.distributed`` process group. Every rank calls ``fit`` with its own block as
            ``data`` and the same other arguments, the sufficient statistics (CAVI) or gradients
            (SVI) are all-reduced, and every rank ends with the memory that one process fits to
            the blocks concatenated in rank order. Rank 0 writes the checkpoints. See
            :mod:`pyro_am.models._dp_parallel`. NOTE: the k-means initialization gathers every
            block on every rank, so for data that do not fit in one process use
            :meth:`fit_stream` (which takes ``group``) instead.
        :returns: a :class:`DPFitResult`.
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, but got {method!r}.")
        data = self._check_data("data", data)
        max_iter = check_int("max_iter", max_iter, minimum=0)
        checkpoint_every = check_int("checkpoint_every", checkpoint_every, minimum=1)
        num_particles = check_int("num_particles", num_particles, minimum=1)
        if batch_size is not None:
            batch_size = check_int("batch_size", batch_size, minimum=1)
        if not (isinstance(tol, (int, float)) and tol >= 0):
            raise ValueError(f"tol must be a non-negative float, but got {tol!r}.")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a positive float, but got {lr!r}.")
        if resume and checkpoint is None:
            raise ValueError("resume=True needs a checkpoint path.")

        if distributed:
            from pyro_am.models._dp_parallel import fit_parallel

            start = time.perf_counter()
            result = fit_parallel(
                self,
                data,
                method,
                seed=seed,
                max_iter=max_iter,
                tol=float(tol),
                lr=float(lr),
                num_particles=num_particles,
                batch_size=batch_size,
                warm_start=warm_start,
                progress=progress,
                checkpoint=checkpoint,
                checkpoint_every=checkpoint_every,
                resume=resume,
            )
            result.wall_time = time.perf_counter() - start
            return result
        state = None
        if resume:
            state = load_checkpoint(self, checkpoint, method)
        if state is None:
            if seed is not None:
                pyro.set_rng_seed(seed)
            if warm_start:
                self._match_dtype(data)
            else:
                self.initialize(data, seed=seed)
        options = dict(
            max_iter=max_iter,
            tol=float(tol),
            progress=progress,
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
            state=state,
        )
        start = time.perf_counter()
        if method == "cavi":
            result = fit_cavi(self, data, **options)
        else:
            result = fit_svi(
                self,
                data,
                lr=float(lr),
                num_particles=num_particles,
                batch_size=batch_size,
                **options,
            )
        result.wall_time = time.perf_counter() - start
        return result

    def cavi_elbo(self, data) -> float:
        """Compute the mean-field ELBO of the current parameters, with q(z) at its optimum."""
        data = self._check_data("data", data, like=self.memory_loc.detach())
        posterior = self._posterior()
        step = cavi.local_step(data, data.square(), posterior)
        return float(step.log_normalizers.sum() + cavi.global_terms(posterior, self._prior(data)))

    # -- streaming -------------------------------------------------------------------------------
    def fit_stream(self, source, batch_size: int | None = None, **options) -> DPFitResult:
        """Fit the variational posterior by streaming natural-gradient SVI over minibatches.

        Each step runs the CAVI local step on one batch, blends the batch's statistics, scaled
        by ``N / |batch|``, into running whole-data statistics with step size
        ``rho_t = (t + tau)^(-kappa)``, and applies the closed-form global step. This is
        natural-gradient SVI on the sticks and memories. Pruning, births and merges act on the
        running statistics. The model, the schedule and the moves are described in
        :mod:`pyro_am.models._dp_stream`. Under ``torch.distributed`` every rank calls it with
        the same arguments and ends with the same memory.

        :param source: an array, ``numpy.memmap`` or tensor of shape (N, D); a ``.npy`` path, a
            folder of ``.npy`` files or a list of paths; or an iterable of batches such as a
            :class:`torch.utils.data.DataLoader` (see :func:`pyro_am.minibatches.minibatches`).
        :param int batch_size: rows per batch for array and file sources.
        :param options: ``num_data`` (N, needed for an iterable without a sized ``.dataset``),
            ``num_epochs`` (passes over the source, default 1), ``max_steps`` (total steps,
            counting those before a resume), ``step_size_offset`` (tau >= 0, default 1.0),
            ``step_size_exponent`` (kappa in [0, 1], default 0.7; (0.5, 1] converges and 0
            replaces the memory by each batch's CAVI step), ``shuffle`` (visit the blocks of an
            array or file source in a new order every epoch, default True), ``seed`` (seeds the
            initialization on the first batch and the block order), ``warm_start`` (start from
            the current parameters), ``init_size`` (rows of the first batch that seed k-means;
            None uses all of it), ``dtype`` and ``device`` (of the batches and the fit; None
            keeps the source's), ``progress``, ``checkpoint``, ``checkpoint_every`` (steps),
            ``resume`` and ``group`` (the process group).
        :returns: a :class:`DPFitResult` with ``method="stream"``. Its ``elbo`` holds, for each
            step, the batch estimate of the ELBO of the parameters before that step.
        """
        from pyro_am.models._dp_stream_fit import fit_stream

        start = time.perf_counter()
        result = fit_stream(self, source, batch_size=batch_size, **options)
        result.wall_time = time.perf_counter() - start
        return result

    def partial_fit(self, batch) -> torch.Tensor:
        """Absorb a batch of data one datum at a time by the Chinese restaurant rule.

        Each datum x joins the memory k that maximizes ``(n_k - d) N(x; m_k, s^2 I)`` or, when
        ``(alpha + d K) N(x; m0, (s^2 + s0^2) I)`` is larger, creates a memory initialized at
        ``(s0^2 x + s^2 m0) / (s0^2 + s^2)``. The count and the Gaussian posterior of the chosen
        memory are then updated in closed form, and the sticks are refitted to the counts after
        the batch. On a memory that has seen no data, the first datum creates the first memory.

        NOTE: the noise variance stays at its current value, learned by :meth:`fit` or fixed.
        Streaming does not update it, because a variance estimated from the first few data
        collapses. A memory created here with ``per_memory_scale=True`` gets variance
        ``sigma0^2`` from ``scale_prior``.

        :param batch: data of shape (B, D).
        :returns: the index of the memory each datum joined, shape (B,), int64.
        """
        return _dp_crp.partial_fit(self, batch)

    # -- prediction ------------------------------------------------------------------------------
    def predictive(self) -> GaussianMixture:
        """Return the variational posterior predictive mixture.

        Its density is ``sum_k E[w_k] N(x; m_k, diag(s^2 + t_k^2))``.

        This is exact under q: the mean over q(mu_k) of ``N(x; mu_k, s^2)`` is
        ``N(x; m_k, s^2 + t_k^2)``, and the mixture is linear in the weights.
        """
        posterior = self._posterior()
        scales = (posterior.variance + posterior.memory_scale.square()).sqrt()
        logits = posterior.sticks().mean.clamp_min(torch.finfo(scales.dtype).tiny).log()
        return GaussianMixture(posterior.memory_loc, scales, logits=logits)

    def assign(self, x) -> torch.Tensor:
        """Compute the responsibilities of the memories for x under :meth:`predictive`, (..., K)."""
        return self.predictive().responsibilities(self._check_query(x))

    def log_predictive(self, x) -> torch.Tensor:
        """Compute the posterior predictive log density of x (see :meth:`predictive`), (...)."""
        return self.predictive().log_prob(self._check_query(x))

    def energy(self, new_memory: bool = False) -> GaussianMixtureEnergy:
        """Return the memory's energy.

        :param bool new_memory: False gives the plug-in mixture energy
            ``-log sum_k E[w_k] N(x; m_k, s^2 I)``; True gives :class:`CRPEnergy`, which adds the
            new-memory attractor and weighs the memories by their counts.
        """
        if new_memory:
            return _dp_crp.crp_energy(self)
        posterior = self._posterior()
        scale = self._to_public(posterior.variance.sqrt())
        if self._diagonal_shared:
            scale = scale.expand(self.truncation, self.dim)
        logits = posterior.sticks().mean.clamp_min(torch.finfo(scale.dtype).tiny).log()
        return GaussianMixtureEnergy(posterior.memory_loc, scale, logits=logits)

    def retrieve(self, x, mask=None, **kwargs):
        """Run :func:`pyro_am.retrieve` on :meth:`energy` from the queries x."""
        return retrieve(self.energy(), self._check_query(x), mask=mask, **kwargs)

    # -- persistence -----------------------------------------------------------------------------
    def config(self) -> dict:
        """Return the constructor arguments, enough to rebuild an unfitted copy."""
        return _dp_io.config(self)

    def state(self) -> dict:
        """Return the configuration, the variational parameters and the counts as one dict."""
        return _dp_io.state(self)

    def load_state(self, state: dict) -> None:
        """Set the variational parameters and counts from :meth:`state`'s output."""
        _dp_io.load_state(self, state)

    def save(self, path) -> None:
        """Write the memory to ``path`` with :func:`torch.save`, atomically."""
        atomic_save(self.state(), path)

    @classmethod
    def load(cls, path, name: str | None = None) -> DPMemory:
        """Read a memory written by :meth:`save`."""
        state = torch.load(path, weights_only=True)
        memory = cls(**state["config"], name=name)
        memory.load_state(state)
        return memory


__all__ = ["CRPEnergy", "DPFitResult", "DPMemory"]
