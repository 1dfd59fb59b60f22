"""Evaluation of in-context energies on held-out Gaussian mixture data sets, for n = 1 .. N.

Three measurements, each against the context size n:

* **Energy landscapes** ``E(x | x_1 .. x_n)`` on a grid, which should sharpen around the context's
  clusters as n grows.
* **Sample quality**: the squared energy distance between Langevin samples ``X`` from the learned
  ``E(. | D_n)`` and samples ``Y`` from the true mixture::

      ED^2(X, Y) = 2 E|X - Y| - E|X - X'| - E|Y - Y'|

  (V-statistic over all pairs, Euclidean norm). It is zero exactly when the laws agree. The
  distance between two independent true samples of the same sizes is reported as a noise floor.
* **Held-out NLL** per point of new draws from the true mixture under the amortized guide's
  posterior predictive, beside the true mixture's NLL and a scikit-learn ``GaussianMixture``
  (spherical covariances, ``reg_covar``) fitted to the same n context points. A mixture of K
  components cannot be fitted to fewer than K points, so for n < K the fitted GMM's NLL is None.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SklearnGaussianMixture

from pyro_am._validation import check_int, check_positive
from pyro_am.families import GaussianMixtureFamily
from pyro_am.models.icl_negatives import initial_chains
from pyro_am.models.icl_training import CDConfig
from pyro_am.models.in_context import InContextEnergy
from pyro_am.plotting import new_figure

logger = logging.getLogger(__name__)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Compute the squared energy distance (V-statistic) between samples ``x`` and ``y``.

    :param torch.Tensor x: shape (..., n, D).
    :param torch.Tensor y: shape (..., m, D), broadcastable with ``x`` in the batch dims.

    :returns: shape (...).
    """
    cross = torch.cdist(x, y).mean(dim=(-1, -2))
    within_x = torch.cdist(x, x).mean(dim=(-1, -2))
    within_y = torch.cdist(y, y).mean(dim=(-1, -2))
    return 2.0 * cross - within_x - within_y


def sample_in_context(
    model: InContextEnergy,
    context: torch.Tensor,
    sizes,
    num_samples: int,
    config: CDConfig,
    generator: torch.Generator | None = None,
    langevin_steps: int | None = None,
) -> torch.Tensor:
    """Draw Langevin samples from ``E(. | x_1 .. x_n)`` for each context size n in ``sizes``.

    Chains start from the training initial law and run the training sampler (``langevin_steps``
    overrides the number of steps). A causal model samples every size in one batched run. A set
    model encodes each prefix separately.

    :param torch.Tensor context: shape (B, N, D).
    :returns: shape (B, len(sizes), num_samples, D).
    """
    batch, _, dim = context.shape
    sizes = torch.as_tensor(list(sizes), dtype=torch.long, device=context.device)
    steps = config.langevin_steps if langevin_steps is None else langevin_steps
    shape = (batch, sizes.numel(), num_samples, dim)
    start = initial_chains(shape, config, generator, context.dtype, context.device)
    options = {
        "steps": steps,
        "step_size": config.step_size,
        "temperature": config.temperature,
        "grad_clamp": config.grad_clamp,
        "generator": generator,
    }
    if model.mode == "causal":
        return model.langevin(context, start, prefix_lengths=sizes, **options)
    samples = [
        model.langevin(context[:, : int(n)], start[:, i], **options) for i, n in enumerate(sizes)
    ]
    return torch.stack(samples, dim=1)


def landscape(
    model: InContextEnergy, context: torch.Tensor, sizes, limits, resolution: int = 80
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compute ``E(x | x_1 .. x_n)`` on a square grid for one 2-D context of shape (N, 2).

    :param limits: ``(low, high)`` of both axes.
    :returns: the grid axes ``xs``, ``ys`` (resolution,) and the energies
        (len(sizes), resolution, resolution), rows indexed by y.
    """
    if model.dim != 2:
        raise ValueError(f"landscapes need a 2-D model, but the model has dim={model.dim}.")
    resolution = check_int("resolution", resolution, minimum=2)
    axis = torch.linspace(limits[0], limits[1], resolution, dtype=context.dtype)
    grid_y, grid_x = torch.meshgrid(axis, axis, indexing="ij")
    points = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1).to(context.device)
    sizes = list(sizes)
    with torch.no_grad():
        if model.mode == "causal":
            lengths = torch.as_tensor(sizes, device=context.device)
            queries = points.expand(1, len(sizes), -1, -1)
            energies = model.query_energy(model.encode_context(context[None]), queries, lengths)[0]
        else:
            energies = torch.stack(
                [model(context[None, :n], points[None])[0] for n in sizes], dim=0
            )
    energies = energies.reshape(len(sizes), resolution, resolution).cpu().numpy()
    return axis.numpy(), axis.numpy(), energies


def amortized_nll(amortized, points, test, sizes, seed: int = 0, num_samples: int = 64) -> list:
    """Compute the held-out NLL per point of the amortized predictive given the first n points.

    The guide draws come from a random state seeded by ``seed`` inside
    :func:`torch.random.fork_rng`, so the global random state is left as it was.

    :param torch.Tensor points: contexts of shape (B, N, D).
    :param torch.Tensor test: held-out points of shape (B, m, D).
    """
    parameter = next(amortized.encoder.parameters())
    points = points.to(dtype=parameter.dtype, device=parameter.device)
    test = test.to(dtype=parameter.dtype, device=parameter.device)
    devices = [parameter.device] if parameter.device.type == "cuda" else []
    values = []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for n in sizes:
            log_density = amortized.predictive_log_prob(points[:, :n], test, num_samples)
            values.append(float(-log_density.mean()))
    return values


def fitted_gmm_nll(context: np.ndarray, test: np.ndarray, num_components: int, reg_covar, seed):
    """Compute the held-out NLL per point of a spherical sklearn GMM fitted to ``context``.

    :returns: the NLL, or None when the context has fewer points than components.
    """
    if context.shape[0] < num_components:
        return None
    gmm = SklearnGaussianMixture(
        num_components, covariance_type="spherical", reg_covar=reg_covar, random_state=seed
    )
    # EM on a handful of points often stops at max_iter; the baseline is reported either way.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        gmm.fit(context)
    if caught:
        logger.debug("GMM on %d context points did not converge", context.shape[0])
    return float(-gmm.score(test))


def evaluate_in_context(
    model: InContextEnergy,
    family,
    config: CDConfig,
    amortized=None,
    max_points: int = 24,
    num_datasets: int = 16,
    num_samples: int = 64,
    num_test: int = 200,
    reg_covar: float = 1e-3,
    seed: int = 1234,
    langevin_steps: int | None = None,
) -> dict:
    """Score ``model`` (and ``amortized`` if given) on held-out data sets for n = 1 .. max_points.

    :param family: a :class:`~pyro_am.families.GaussianMixtureFamily`; held-out data sets are
        drawn with a generator seeded by ``seed``, distinct from the training stream.
    :param CDConfig config: the sampler settings used in training.
    :param amortized: an :class:`~pyro_am.models.amortized.AmortizedMixtureGuide` or None.
    :returns: a dict of lists indexed like ``sizes``: ``energy_distance`` and its standard error
        ``energy_distance_sem`` (over data sets), ``energy_distance_floor``,
        ``amortized_nll``, ``true_nll`` and ``gmm_nll`` (None where undefined), plus the settings.
    """
    if not isinstance(family, GaussianMixtureFamily):
        raise TypeError(
            "family must be a GaussianMixtureFamily, whose true density scores the samples, "
            f"but got {type(family).__name__}."
        )
    if family.dim != model.dim:
        raise ValueError(
            f"family has dimension {family.dim}, but the model has dimension {model.dim}."
        )
    max_points = check_int("max_points", max_points)
    num_datasets = check_int("num_datasets", num_datasets, minimum=2)
    check_positive("reg_covar", reg_covar)
    parameter = next(model.parameters())
    dtype, device = parameter.dtype, parameter.device
    generator = torch.Generator().manual_seed(seed)
    batch = family.sample(num_datasets, max_points, generator)
    truth = batch.sample(num_samples, generator)
    floor = batch.sample(num_samples, generator)
    test = batch.sample(num_test, generator)
    context = batch.points.to(dtype=dtype, device=device)
    sizes = list(range(1, max_points + 1))

    langevin_generator = torch.Generator(device=device).manual_seed(seed + 1)
    samples = sample_in_context(
        model, context, sizes, num_samples, config, langevin_generator, langevin_steps
    )
    distances = energy_distance(samples.cpu().to(truth.dtype), truth.unsqueeze(1))
    floor_distance = float(energy_distance(floor, truth).mean())
    result = {
        "sizes": sizes,
        "energy_distance": distances.mean(0).tolist(),
        "energy_distance_sem": (distances.std(0) / math.sqrt(num_datasets)).tolist(),
        "energy_distance_floor": floor_distance,
        "true_nll": float(-batch.log_prob(test).mean()),
        "settings": {
            "num_datasets": num_datasets,
            "num_samples": num_samples,
            "num_test": num_test,
            "reg_covar": reg_covar,
            "gmm_covariance_type": "spherical",
            "langevin_steps": config.langevin_steps if langevin_steps is None else langevin_steps,
            "seed": seed,
        },
    }

    points, test_np = batch.points.cpu().numpy(), test.cpu().numpy()
    result["gmm_nll"] = []
    for n in sizes:
        values = [
            fitted_gmm_nll(points[b, :n], test_np[b], family.num_components, reg_covar, seed)
            for b in range(num_datasets)
        ]
        result["gmm_nll"].append(None if values[0] is None else float(np.mean(values)))

    if amortized is not None:
        result["amortized_nll"] = amortized_nll(amortized, batch.points, test, sizes, seed)
    logger.info(
        "in-context evaluation: energy distance %.4g at n=1, %.4g at n=%d (floor %.4g)",
        result["energy_distance"][0],
        result["energy_distance"][-1],
        max_points,
        floor_distance,
    )
    return result


# -- figures -------------------------------------------------------------------------------------
def plot_landscapes(xs, ys, energies, context: np.ndarray, sizes, title_prefix="n"):
    """Draw one energy panel per context size, with that prefix of the context on top."""
    figure = new_figure(2.6 * len(sizes), 2.7)
    axes = figure.subplots(1, len(sizes), squeeze=False)[0]
    for ax, values, n in zip(axes, energies, sizes, strict=True):
        ax.contourf(xs, ys, values - values.min(), levels=20, cmap="viridis")
        ax.scatter(context[:n, 0], context[:n, 1], s=10, c="red", edgecolors="white", lw=0.4)
        ax.set_title(f"{title_prefix} = {n}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    return figure


def plot_samples(samples: np.ndarray, context: np.ndarray, sizes, limits):
    """Draw Langevin samples (len(sizes), S, 2) for each context size over the context points."""
    figure = new_figure(2.6 * len(sizes), 2.7)
    axes = figure.subplots(1, len(sizes), squeeze=False)[0]
    for ax, points, n in zip(axes, samples, sizes, strict=True):
        ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.5, label="samples")
        ax.scatter(context[:n, 0], context[:n, 1], s=12, c="red", label="context")
        ax.set_xlim(*limits)
        ax.set_ylim(*limits)
        ax.set_title(f"n = {n}", fontsize=9)
        ax.set_aspect("equal")
    axes[0].legend(fontsize=7, loc="lower left")
    return figure


def plot_metrics(result: dict):
    """Draw the energy distance and the held-out NLLs against the context size."""
    figure = new_figure(9.0, 3.2)
    left, right = figure.subplots(1, 2)
    sizes = np.asarray(result["sizes"])
    mean = np.asarray(result["energy_distance"])
    sem = np.asarray(result["energy_distance_sem"])
    left.plot(sizes, mean, marker=".", label="EBM Langevin samples")
    left.fill_between(sizes, mean - sem, mean + sem, alpha=0.3)
    left.axhline(result["energy_distance_floor"], color="gray", ls="--", label="true vs true")
    left.set_xlabel("context size n")
    left.set_ylabel("squared energy distance to truth")
    left.legend(fontsize=8)

    right.axhline(result["true_nll"], color="black", ls="--", label="true mixture")
    gmm = [(n, v) for n, v in zip(sizes, result["gmm_nll"], strict=True) if v is not None]
    if gmm:
        right.plot(*zip(*gmm, strict=True), marker=".", label="sklearn GMM on context")
    if "amortized_nll" in result:
        right.plot(sizes, result["amortized_nll"], marker=".", label="amortized predictive")
    right.set_xlabel("context size n")
    right.set_ylabel("held-out NLL per point")
    values = [result["true_nll"], *result.get("amortized_nll", [])]
    right.set_ylim(min(values) - 0.5, max(values) + 1.0)
    right.legend(fontsize=8)
    return figure


__all__ = [
    "amortized_nll",
    "energy_distance",
    "evaluate_in_context",
    "fitted_gmm_nll",
    "landscape",
    "plot_landscapes",
    "plot_metrics",
    "plot_samples",
    "sample_in_context",
]
