"""ArviZ ``InferenceData`` from Pyro's variational and MCMC results.

Given draws ``theta^(s)``, s = 1 .. S, from a posterior (a fitted guide, or the chains of
:class:`pyro.infer.MCMC`), the conversion fills these groups::

    posterior             theta^(s), dims (chain, draw, *site dims)
    log_likelihood        log p(x_n | theta^(s)) for every observation n, so that az.loo and
                          az.waic can estimate the expected log predictive density
    observed_data         x
    posterior_predictive  x_rep^(s) ~ p(x | theta^(s))        (optional)
    sample_stats          MCMC only: diverging and lp = log p(x, theta^(s)) per draw
    vi_trace              VI only: the ELBO per iteration, dim ``iteration``

A guide's draws form one chain. The log likelihood is read from the observed sites of the model
traced at each draw, so for a mixture whose assignment is summed out in the likelihood (as with
:class:`~pyro_am.distributions.GaussianMixture`) it is the mixture density of each point. For a
model whose discrete sites are sampled rather than summed out, pass ``log_likelihood_fn``.

The groups are built with :func:`arviz.from_dict`. ArviZ 0.x takes one keyword argument per group
and ArviZ 1.x one mapping from group names to variables; :func:`_from_dict` chooses by signature.
The ELBO trace has no (chain, draw) dims, which ``from_dict`` requires of every group it builds,
so it is attached afterwards as its own group.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import Predictive
from pyro.poutine.util import site_is_factor, site_is_subsample

from pyro_am._validation import check_finite, check_int

logger = logging.getLogger(__name__)

LogLikelihoodFn = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def import_arviz():
    """Import ArviZ without its import-time ``FutureWarning`` about the 1.0 refactor."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="\\s*ArviZ is undergoing", category=FutureWarning)
        import arviz

    return arviz


def _to_numpy(value: torch.Tensor) -> np.ndarray:
    return value.detach().cpu().numpy()


def _from_dict(groups: dict[str, dict], coords, dims, attrs):
    arviz = import_arviz()
    groups = {name: variables for name, variables in groups.items() if variables}
    if "posterior" in inspect.signature(arviz.from_dict).parameters:
        return arviz.from_dict(**groups, coords=coords, dims=dims, attrs=attrs)
    # NOTE: the ArviZ 1.x call follows its documented signature; it is not run by the tests,
    # which use the installed ArviZ 0.23.
    return arviz.from_dict(groups, coords=coords, dims=dims, attrs=attrs)


def _attach_group(inference_data, name: str, dataset) -> None:
    if hasattr(inference_data, "add_groups"):
        inference_data.add_groups({name: dataset})
    else:
        import xarray

        inference_data[name] = xarray.DataTree(dataset)


def elbo_trace_dataset(elbo: Sequence[float]):
    """Build an ``xarray.Dataset`` with variable ``elbo`` over dim ``iteration``."""
    import xarray

    values = np.asarray([float(value) for value in elbo], dtype=np.float64)
    return xarray.Dataset(
        {"elbo": ("iteration", values)}, coords={"iteration": np.arange(values.size)}
    )


# -- traces --------------------------------------------------------------------------------------
def _single_trace(model, model_args, model_kwargs, draws: Mapping[str, torch.Tensor] | None):
    conditioned = model if not draws else poutine.condition(model, draws)
    with torch.no_grad(), poutine.block():
        return poutine.trace(conditioned).get_trace(*model_args, **model_kwargs)


def _observed_sites(trace) -> dict[str, torch.Tensor]:
    # Call it on an unconditioned trace: poutine.condition marks conditioned latents as observed.
    # pyro.factor sites are observed sites too, but they carry no data.
    return {
        name: site["value"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and site["is_observed"]
        and not site_is_factor(site)
        and not name.startswith("_")
    }


def _latent_sites(trace) -> dict[str, torch.Tensor]:
    return {
        name: site["value"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site_is_subsample(site)
        and not site["infer"].get("is_auxiliary", False)
    }


def _draw(draws: Mapping[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    return {name: value[index] for name, value in draws.items()}


def _reshape_draws(samples, shapes, num_draws: int) -> dict[str, torch.Tensor]:
    # Predictive pads each site with singleton plate dims; reshape to (S, *single-trace shape).
    return {
        name: samples[name].reshape((num_draws,) + tuple(shape)) for name, shape in shapes.items()
    }


def draw_from_guide(guide, model_args=(), model_kwargs=None, num_samples: int = 500, parallel=True):
    """Draw ``num_samples`` joint samples of every latent site of ``guide``.

    :param callable guide: a Pyro guide (an autoguide or a function with ``pyro.sample`` sites).
    :param tuple model_args: positional arguments of the model and guide.
    :param dict model_kwargs: keyword arguments of the model and guide.
    :param int num_samples: number of draws S.
    :param bool parallel: draw all samples in one vectorized pass, which needs every batch
        dimension of the guide declared by a :class:`pyro.plate`. False traces the guide S times.
    :returns: a dict from site name to a tensor of shape (S, *site shape).
    """
    model_kwargs = {} if model_kwargs is None else model_kwargs
    num_samples = check_int("num_samples", num_samples)
    shapes = {
        name: value.shape
        for name, value in _latent_sites(
            _single_trace(guide, model_args, model_kwargs, None)
        ).items()
    }
    predictive = Predictive(guide, num_samples=num_samples, parallel=parallel)
    samples = predictive(*model_args, **model_kwargs)
    return _reshape_draws(samples, shapes, num_samples)


def pointwise_log_likelihood(
    model, draws: Mapping[str, torch.Tensor], model_args=(), model_kwargs=None, parallel=True
) -> dict[str, torch.Tensor]:
    """Compute ``log p(x_n | theta^(s))`` at every observed site for every draw.

    The model is traced with its latent sites conditioned on each draw, and each observed site's
    distribution scores its value. With ``parallel`` the draws are vectorized under an outer plate
    (as :meth:`pyro.infer.Predictive.get_vectorized_trace` does), which needs every batch dimension
    declared by a :class:`pyro.plate` and distributions that accept batched parameters.

    :param callable model: the Pyro model.
    :param dict draws: site name to tensor of shape (S, *site shape).
    :returns: observed site name to tensor of shape (S, *site batch shape).
    """
    model_kwargs = {} if model_kwargs is None else model_kwargs
    num_draws = next(iter(draws.values())).shape[0]
    observed_names = _observed_sites(_single_trace(model, model_args, model_kwargs, None))
    reference = _single_trace(model, model_args, model_kwargs, _draw(draws, 0))
    batch_shapes = {name: reference.nodes[name]["fn"].batch_shape for name in observed_names}

    if parallel:
        predictive = Predictive(model, posterior_samples=dict(draws), parallel=True)
        with torch.no_grad(), poutine.block():
            trace = predictive.get_vectorized_trace(*model_args, **model_kwargs)
        values = {
            name: trace.nodes[name]["fn"].log_prob(trace.nodes[name]["value"])
            for name in batch_shapes
        }
        return _reshape_draws(values, batch_shapes, num_draws)

    values = {name: [] for name in batch_shapes}
    for index in range(num_draws):
        trace = _single_trace(model, model_args, model_kwargs, _draw(draws, index))
        for name in batch_shapes:
            site = trace.nodes[name]
            values[name].append(site["fn"].log_prob(site["value"]))
    return {name: torch.stack(stack) for name, stack in values.items()}


def log_joint(model, draws, model_args=(), model_kwargs=None) -> torch.Tensor:
    """Compute ``lp = log p(x, theta^(s))`` summed over every site of the model, shape (S,)."""
    model_kwargs = {} if model_kwargs is None else model_kwargs
    num_draws = next(iter(draws.values())).shape[0]
    totals = []
    for index in range(num_draws):
        trace = _single_trace(model, model_args, model_kwargs, _draw(draws, index))
        totals.append(trace.log_prob_sum())
    return torch.stack(totals)


def sample_posterior_predictive(
    model, draws, observed_names, model_args=(), model_kwargs=None, parallel=True
) -> dict[str, torch.Tensor]:
    """Sample ``x_rep^(s) ~ p(x | theta^(s))`` at the observed sites, one replicate per draw.

    :func:`pyro.poutine.uncondition` turns the observed sites into sampled ones, so the model
    needs no separate prediction mode.
    """
    model_kwargs = {} if model_kwargs is None else model_kwargs
    num_draws = next(iter(draws.values())).shape[0]
    reference = _single_trace(model, model_args, model_kwargs, _draw(draws, 0))
    shapes = {name: reference.nodes[name]["value"].shape for name in observed_names}
    predictive = Predictive(
        poutine.uncondition(model),
        posterior_samples=dict(draws),
        return_sites=list(observed_names),
        parallel=parallel,
    )
    with poutine.block():
        samples = predictive(*model_args, **model_kwargs)
    return _reshape_draws(samples, shapes, num_draws)


# -- conversions ---------------------------------------------------------------------------------
def _chain_major(values: Mapping[str, torch.Tensor], num_chains: int) -> dict[str, np.ndarray]:
    return {
        name: _to_numpy(value).reshape((num_chains, -1) + tuple(value.shape[1:]))
        for name, value in values.items()
    }


def _library_attrs(method: str) -> dict:
    return {
        "inference_library": "pyro",
        "inference_library_version": pyro.__version__,
        "method": method,
    }


def _build(
    model,
    draws,
    num_chains,
    model_args,
    model_kwargs,
    *,
    dims,
    coords,
    method,
    log_likelihood_fn,
    posterior_predictive,
    parallel,
    sample_stats=None,
):
    observed = _observed_sites(_single_trace(model, model_args, model_kwargs, None))
    if not observed:
        raise ValueError(
            "model has no observed sample site (pyro.sample(..., obs=...)); pass the data "
            "in model_args or model_kwargs so that the likelihood can be evaluated."
        )

    if log_likelihood_fn is None:
        log_likelihood = pointwise_log_likelihood(model, draws, model_args, model_kwargs, parallel)
    else:
        log_likelihood = log_likelihood_fn(draws)
    groups = {
        "posterior": _chain_major(draws, num_chains),
        "log_likelihood": _chain_major(log_likelihood, num_chains),
        "observed_data": {name: _to_numpy(value) for name, value in observed.items()},
        "sample_stats": sample_stats,
    }
    if posterior_predictive:
        replicates = sample_posterior_predictive(
            model, draws, list(observed), model_args, model_kwargs, parallel
        )
        groups["posterior_predictive"] = _chain_major(replicates, num_chains)
    return _from_dict(groups, coords=coords, dims=dims, attrs=_library_attrs(method))


def from_guide(
    model,
    guide,
    model_args=(),
    model_kwargs=None,
    *,
    num_samples: int = 500,
    dims: Mapping[str, Sequence[str]] | None = None,
    coords: Mapping[str, Sequence] | None = None,
    elbo: Sequence[float] | None = None,
    posterior_predictive: bool = False,
    parallel: bool = True,
    log_likelihood_fn: LogLikelihoodFn | None = None,
    method: str = "svi",
):
    """Convert a fitted guide into ``InferenceData``, its draws forming one chain.

    Example with an autoguide fitted by SVI::

        guide = AutoNormal(model)
        losses = [svi.step(data) for _ in range(1000)]
        idata = from_guide(model, guide, (data,), elbo=[-loss for loss in losses],
                           dims={"obs": ["observation"]})
        arviz.loo(idata)

    :param callable model: the Pyro model; its observed sites give ``observed_data`` and
        ``log_likelihood``.
    :param callable guide: the fitted guide; its latent sites give ``posterior``.
    :param tuple model_args: positional arguments of model and guide, including the data.
    :param dict model_kwargs: keyword arguments of model and guide.
    :param int num_samples: number of posterior draws S.
    :param dict dims: site name to the names of its dims after (chain, draw), for example
        ``{"locs": ["memory", "dim"]}``. An observed site's log likelihood takes the leading dims.
    :param dict coords: dim name to coordinate values.
    :param elbo: the ELBO per iteration of the fit, stored in group ``vi_trace``.
    :param bool posterior_predictive: also sample one replicate of the data per draw.
    :param bool parallel: vectorize over draws, which needs every batch dim of the model in a
        plate and distributions that take batched parameters. False loops over draws.
    :param callable log_likelihood_fn: maps the draws (site to tensor of shape (S, ...)) to
        observed site name to pointwise log likelihood of shape (S, N); use it when the model's
        observed sites condition on sampled discrete sites.
    :param str method: recorded in the attrs as the inference method.
    :returns: an :class:`arviz.InferenceData`.
    """
    model_kwargs = {} if model_kwargs is None else dict(model_kwargs)
    draws = draw_from_guide(guide, model_args, model_kwargs, num_samples, parallel)
    inference_data = _build(
        model,
        draws,
        1,
        model_args,
        model_kwargs,
        dims=dims,
        coords=coords,
        method=method,
        log_likelihood_fn=log_likelihood_fn,
        posterior_predictive=posterior_predictive,
        parallel=parallel,
    )
    if elbo is not None:
        _attach_group(inference_data, "vi_trace", elbo_trace_dataset(elbo))
    return inference_data


def _mcmc_sample_stats(mcmc, lp: torch.Tensor, num_chains: int, num_draws: int) -> dict:
    diverging = np.zeros((num_chains, num_draws), dtype=bool)
    divergences = mcmc.diagnostics().get("divergences", {})
    for chain, key in enumerate(sorted(divergences)):
        diverging[chain, np.asarray(divergences[key], dtype=np.int64)] = True
    return {"diverging": diverging, "lp": _to_numpy(lp).reshape(num_chains, num_draws)}


def from_mcmc(
    mcmc,
    model_args=None,
    model_kwargs=None,
    *,
    dims: Mapping[str, Sequence[str]] | None = None,
    coords: Mapping[str, Sequence] | None = None,
    posterior_predictive: bool = False,
    parallel: bool = True,
    log_likelihood_fn: LogLikelihoodFn | None = None,
):
    """Convert a finished :class:`pyro.infer.MCMC` run into ``InferenceData``.

    ``posterior`` comes from ``mcmc.get_samples(group_by_chain=True)``; ``sample_stats`` contains
    ``diverging`` (from ``mcmc.diagnostics()``) and ``lp``, the log joint density at each draw.
    The acceptance rate of each chain and the kernel's final step size go to the attrs of
    ``sample_stats``, because Pyro records neither per draw.

    :param pyro.infer.MCMC mcmc: a run whose kernel was built from a model (HMC or NUTS).
    :param tuple model_args: the model's positional arguments; by default those of ``mcmc.run``.
    :param dict model_kwargs: the model's keyword arguments; by default those of ``mcmc.run``.
    :returns: an :class:`arviz.InferenceData`.

    The other parameters are those of :func:`from_guide`.
    """
    model = getattr(mcmc.kernel, "model", None)
    if model is None:
        raise ValueError(
            "mcmc.kernel has no model (it was built from a potential_fn); build the kernel "
            "from a Pyro model so that the likelihood can be traced."
        )
    # MCMC.run stores its arguments as _args and _kwargs; Pyro has no public accessor for them.
    model_args = tuple(mcmc._args if model_args is None else model_args)
    model_kwargs = dict((mcmc._kwargs or {}) if model_kwargs is None else model_kwargs)

    by_chain = mcmc.get_samples(group_by_chain=True)
    num_chains, num_draws = next(iter(by_chain.values())).shape[:2]
    draws = {name: value.reshape((-1,) + value.shape[2:]) for name, value in by_chain.items()}
    lp = log_joint(model, draws, model_args, model_kwargs)
    sample_stats = _mcmc_sample_stats(mcmc, lp, num_chains, num_draws)

    inference_data = _build(
        model,
        draws,
        num_chains,
        model_args,
        model_kwargs,
        dims=dims,
        coords=coords,
        method=type(mcmc.kernel).__name__.lower(),
        log_likelihood_fn=log_likelihood_fn,
        posterior_predictive=posterior_predictive,
        parallel=parallel,
        sample_stats=sample_stats,
    )
    diagnostics = mcmc.diagnostics()
    acceptance = diagnostics.get("acceptance rate", {})
    stats_attrs = inference_data.sample_stats.attrs
    stats_attrs["acceptance_rate"] = [float(acceptance[key]) for key in sorted(acceptance)]
    step_size = getattr(mcmc.kernel, "step_size", None)
    if step_size is not None:
        # With chains run one after another in this process, this is the last chain's value.
        stats_attrs["final_step_size"] = float(step_size)
    return inference_data


def _noise_scale_dims(memory) -> list[str]:
    """Name the dims of ``memory.scale``: (), (D,), (K,) or (K, D) by the memory's settings."""
    per_memory = getattr(memory, "per_memory_scale", False)
    diagonal = memory.covariance == "diagonal"
    return (["memory"] if per_memory else []) + (["dim"] if diagonal else [])


def _full_noise_scale(noise_scale: torch.Tensor, dims: list[str], shape) -> torch.Tensor:
    """Broadcast a noise scale with the given dims to the (K, D) shape of the memories."""
    if dims == ["memory"]:
        noise_scale = noise_scale.unsqueeze(-1)
    return noise_scale.expand(shape)


def _mixture_log_likelihood(data: torch.Tensor, scales: torch.Tensor):
    from pyro_am.distributions import GaussianMixture

    def log_likelihood(draws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weights, memories = draws["weights"], draws["locs"]
        tiny = torch.finfo(weights.dtype).tiny
        values = []
        for index in range(weights.shape[0]):
            mixture = GaussianMixture(
                memories[index], scales, logits=weights[index].clamp_min(tiny).log()
            )
            values.append(mixture.log_prob(data))
        return {"obs": torch.stack(values)}

    return log_likelihood


def to_inference_data(
    memory,
    data,
    *,
    num_samples: int = 200,
    fit_result=None,
    posterior_predictive: bool = True,
    feature_names: Sequence[str] | None = None,
    seed: int | None = None,
):
    """Convert a fitted :class:`~pyro_am.models.DPMemory` into ``InferenceData``.

    ``posterior`` contains the guide's sites ``weights`` (dims chain, draw, memory) and ``locs``,
    the memories (chain, draw, memory, dim). ``log_likelihood["obs"]`` is the mixture density
    ``log sum_k w_k N(x_n; mu_k, s^2)`` of each point at each draw, with the assignment summed out
    whatever the memory's ``assignment`` setting. The noise scale s is a point estimate, so it is
    stored in ``constant_data`` rather than drawn, with dims ``memory`` when each memory has its
    own scale and ``dim`` for a diagonal covariance. With ``fit_result`` the ELBO trace goes to
    group ``vi_trace``, whose attrs record the method, iterations, convergence and the numbers of
    memories created, pruned and merged.

    :param memory: a fitted :class:`~pyro_am.models.DPMemory`.
    :param data: the observations, shape (N, D), converted to the memory's dtype and device.
    :param int num_samples: number of draws S from the guide.
    :param fit_result: the :class:`~pyro_am.models.DPFitResult` of the fit, optional.
    :param bool posterior_predictive: also draw one replicate of the data per draw.
    :param feature_names: coordinate labels of dim ``dim``; by default 0 .. D - 1.
    :param int seed: seeds the draws.
    :returns: an :class:`arviz.InferenceData`.
    """
    like = memory.memory_loc.detach()
    if not isinstance(data, torch.Tensor):
        data = torch.as_tensor(np.asarray(data), dtype=like.dtype)
    data = data.to(like)
    if data.dim() != 2 or data.shape[1] != memory.dim or data.shape[0] < 1:
        raise ValueError(
            f"data must have shape (num_data, {memory.dim}) with num_data >= 1 to match the "
            f"memory, but has shape {tuple(data.shape)}."
        )
    check_finite("data", data)
    if feature_names is not None and len(feature_names) != memory.dim:
        raise ValueError(
            f"feature_names must have {memory.dim} entries, but has {len(feature_names)}."
        )
    if seed is not None:
        pyro.set_rng_seed(seed)

    noise_scale = memory.scale.detach().to(like)
    scale_dims = _noise_scale_dims(memory)
    full_scale = _full_noise_scale(noise_scale, scale_dims, (memory.truncation, memory.dim))
    coords = {
        "memory": np.arange(memory.truncation),
        "dim": np.asarray(feature_names) if feature_names is not None else np.arange(memory.dim),
        "observation": np.arange(data.shape[0]),
    }
    dims = {
        "weights": ["memory"],
        "locs": ["memory", "dim"],
        "obs": ["observation", "dim"],
        "noise_scale": scale_dims,
    }
    draws = draw_from_guide(memory.guide, (data,), num_samples=num_samples, parallel=False)
    groups = {
        "posterior": _chain_major(draws, 1),
        "log_likelihood": _chain_major(_mixture_log_likelihood(data, full_scale)(draws), 1),
        "observed_data": {"obs": _to_numpy(data)},
        "constant_data": {"noise_scale": _to_numpy(noise_scale)},
    }
    if posterior_predictive:
        replicates = sample_posterior_predictive(
            memory.model, draws, ["obs"], (data,), parallel=False
        )
        groups["posterior_predictive"] = _chain_major(replicates, 1)
    method = fit_result.method if fit_result is not None else "cavi"
    inference_data = _from_dict(groups, coords=coords, dims=dims, attrs=_library_attrs(method))

    if fit_result is not None:
        trace = elbo_trace_dataset(fit_result.elbo)
        trace.attrs.update(
            {
                "method": fit_result.method,
                "iterations": int(fit_result.iterations),
                "converged": int(bool(fit_result.converged)),
                "num_created": int(fit_result.num_created),
                "num_pruned": int(fit_result.num_pruned),
                "num_merged": int(fit_result.num_merged),
            }
        )
        _attach_group(inference_data, "vi_trace", trace)
    return inference_data
