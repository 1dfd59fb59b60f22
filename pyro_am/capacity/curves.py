"""Capacity curves: the measured stored fraction against N per dimension, and its fits.

:func:`capacity_curve` runs the numerical check on uniform random patterns over a grid of D and N,
reads off N_max(D), compares it with the bound and fits ``log N_max = a + b D``.
:meth:`CapacityCurve.plot` draws the result.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from pyro_am._validation import check_int, check_interval
from pyro_am.capacity.geometry import _ball_radius, _bandwidth, _scalar, uniform_on_sphere
from pyro_am.capacity.random_patterns import capacity_lower_bound, certified_fraction
from pyro_am.capacity.stored import stored_patterns

logger = logging.getLogger(__name__)


# -- capacity curves -----------------------------------------------------------------------------
@dataclass
class CapacityCurve:
    """Stored fraction against N for several dimensions, from :func:`capacity_curve`.

    :ivar dims: dimensions D, shape (num_dims,).
    :ivar num_patterns: the grid of N, increasing, shape (num_sizes,).
    :ivar stored_fraction: mean stored fraction over the draws, shape
        (num_dims, num_sizes).
    :ivar stored_fraction_se: its standard error over the draws (0 for one draw).
    :ivar draws: number of pattern sets drawn per (D, N),
        ``max(trials, ceil(min_patterns / N))``.
    :ivar bound_fraction: expected certified fraction (:func:`certified_fraction`),
        a lower bound on the expected stored fraction, shape (num_dims, num_sizes).
    :ivar n_max: per D, the largest grid N at which, and at every smaller grid N, the
        mean stored fraction is at least ``1 - delta``; 0 when the smallest N already fails.
    :ivar censored: per D, no grid N failed, so the true ``n_max`` may be larger.
    :ivar bound_n_max: per D, :func:`capacity_lower_bound` (any integer N).
    :ivar fits: ``{"numerical": (a, b), "bound": (a, b)}`` of ``log N_max = a + b D``, fitted
        by least squares over the dimensions with ``N_max >= 1`` (and, for the numerical curve,
        not censored); NaN with fewer than two such dimensions.
    """

    dims: np.ndarray
    num_patterns: np.ndarray
    stored_fraction: np.ndarray
    stored_fraction_se: np.ndarray
    draws: np.ndarray
    bound_fraction: np.ndarray
    n_max: np.ndarray
    censored: np.ndarray
    bound_n_max: np.ndarray
    fits: dict
    bandwidth: float
    radius: float
    ball_radius: float
    delta: float
    trials: int
    min_patterns: int
    seed: int

    def rows(self) -> list[dict]:
        """Return one record per (D, N): draws, mean stored fraction, its standard error, bound."""
        records = []
        for i, dim in enumerate(self.dims):
            for j, count in enumerate(self.num_patterns):
                records.append(
                    {
                        "dim": int(dim),
                        "num_patterns": int(count),
                        "draws": int(self.draws[i, j]),
                        "stored_fraction": float(self.stored_fraction[i, j]),
                        "stored_fraction_se": float(self.stored_fraction_se[i, j]),
                        "bound_fraction": float(self.bound_fraction[i, j]),
                    }
                )
        return records

    def to_dict(self) -> dict:
        """Return every setting and result as JSON-serializable Python objects."""
        return {
            "bandwidth": self.bandwidth,
            "radius": self.radius,
            "ball_radius": self.ball_radius,
            "delta": self.delta,
            "trials": self.trials,
            "min_patterns": self.min_patterns,
            "seed": self.seed,
            "dims": self.dims.tolist(),
            "num_patterns": self.num_patterns.tolist(),
            "n_max": self.n_max.tolist(),
            "censored": self.censored.tolist(),
            "bound_n_max": self.bound_n_max.tolist(),
            "fits": {name: {"a": a, "b": b} for name, (a, b) in self.fits.items()},
            "rows": self.rows(),
        }

    def plot(self, path=None):
        """Draw the stored fraction against N and N_max against D; write a PNG if ``path``.

        :returns: the :class:`~matplotlib.figure.Figure`.
        """
        from pyro_am.plotting import new_figure, save_figure

        figure = new_figure(10.0, 4.0)
        fraction_axis, growth_axis = figure.subplots(1, 2)
        colors = [f"C{i % 10}" for i in range(len(self.dims))]
        for i, dim in enumerate(self.dims):
            fraction_axis.errorbar(
                self.num_patterns,
                self.stored_fraction[i],
                yerr=self.stored_fraction_se[i],
                fmt="o-",
                markersize=3,
                color=colors[i],
                label=f"D={dim}",
            )
            fraction_axis.plot(self.num_patterns, self.bound_fraction[i], "--", color=colors[i])
        fraction_axis.axhline(1.0 - self.delta, color="grey", linewidth=0.8)
        fraction_axis.set_xscale("log")
        fraction_axis.set_xlabel("number of patterns N")
        fraction_axis.set_ylabel("fraction stored (dashed: bound)")
        fraction_axis.legend(fontsize=8)

        for name, values, style, color in (
            ("numerical", self.n_max, "o", "C0"),
            ("bound", self.bound_n_max, "s", "C3"),
        ):
            shown = values >= 1
            growth_axis.plot(
                self.dims[shown], values[shown], style, color=color, label=f"{name} N_max"
            )
            a, b = self.fits[name]
            if math.isfinite(a) and math.isfinite(b):
                growth_axis.plot(
                    self.dims,
                    np.exp(a + b * self.dims),
                    "-",
                    color=color,
                    linewidth=0.8,
                    label=f"fit b={b:.3g}",
                )
        growth_axis.set_yscale("log")
        growth_axis.set_xlabel("dimension D")
        growth_axis.set_ylabel(f"N_max (stored fraction >= {1 - self.delta:g})")
        growth_axis.legend(fontsize=8)
        figure.suptitle(
            f"Gaussian KDE on the sphere: r={self.radius:g}, h={self.bandwidth:g}, "
            f"rho={self.ball_radius:g}, at least {self.trials} draws and {self.min_patterns} "
            "patterns per point",
            fontsize=10,
        )
        if path is not None:
            save_figure(figure, path)
        return figure


def fit_exponential_growth(dims, n_max, valid=None) -> tuple[float, float]:
    """Fit ``log N_max = a + b D`` by least squares over the entries with ``N_max >= 1``.

    :returns: ``(a, b)``, or ``(nan, nan)`` with fewer than two distinct usable dimensions.
    """
    dims = np.asarray(dims, dtype=np.float64)
    n_max = np.asarray(n_max, dtype=np.float64)
    usable = n_max >= 1 if valid is None else (n_max >= 1) & np.asarray(valid, dtype=bool)
    if np.unique(dims[usable]).size < 2:
        return math.nan, math.nan
    slope, intercept = np.polyfit(dims[usable], np.log(n_max[usable]), 1)
    return float(intercept), float(slope)


def _largest_passing(num_patterns: np.ndarray, mean_fraction: np.ndarray, delta: float):
    failing = np.nonzero(mean_fraction < 1.0 - delta)[0]
    if failing.size == 0:
        return int(num_patterns[-1]), True
    first = int(failing[0])
    return (int(num_patterns[first - 1]) if first > 0 else 0), False


def capacity_curve(
    dims,
    num_patterns,
    bandwidth: float,
    radius: float = 1.0,
    trials: int = 4,
    seed: int = 0,
    delta: float = 0.05,
    ball_radius: float | None = None,
    min_patterns: int = 200,
    num_perturbations: int = 4,
    max_steps: int = 500,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> CapacityCurve:
    """Measure the stored fraction of uniform random patterns against N, for each dimension.

    Each (D, N) draws ``max(trials, ceil(min_patterns / N))`` independent sets of N patterns
    uniformly on the sphere of radius ``radius`` and runs :func:`stored_patterns` on each, so small
    N, where one failure moves the fraction most, gets as many judged patterns as large N. All
    draws come from one generator seeded with ``seed``, so a call is reproducible on a device.

    :param dims: dimensions D >= 2.
    :param num_patterns: the grid of N, positive integers (sorted and deduplicated here).
    :param float bandwidth: kernel bandwidth h > 0, in the same units as ``radius``.
    :param float radius: the sphere's radius r.
    :param int trials: the minimum number of draws per (D, N).
    :param int seed: seed of the random generator.
    :param float delta: N_max is the largest N with a mean stored fraction of at least
        ``1 - delta``, in (0, 1).
    :param float ball_radius: rho; default ``h / 2``.
    :param int min_patterns: the minimum number of patterns judged per (D, N), over all draws.
    :param int num_perturbations: boundary starts per pattern in :func:`stored_patterns`.
    :param int max_steps: mean-shift steps per start.
    :param torch.dtype dtype: floating dtype of the patterns.
    :param device: device of the patterns.
    :param bool progress: show a tqdm progress bar over the draws.
    :returns: a :class:`CapacityCurve`.
    """
    dims = [_integer("dims", dim, minimum=2) for dim in dims]
    if not dims:
        raise ValueError("dims must contain at least one dimension >= 2, but it is empty.")
    sizes = sorted({_integer("num_patterns", count, minimum=1) for count in num_patterns})
    if not sizes:
        raise ValueError("num_patterns must contain at least one positive integer, but is empty.")
    bandwidth = _bandwidth(bandwidth)
    radius = _scalar("radius", radius)
    trials = check_int("trials", trials)
    min_patterns = check_int("min_patterns", min_patterns)
    seed = check_int("seed", seed, minimum=0)
    check_interval("delta", delta, 0.0, 1.0)
    if delta == 0.0:
        raise ValueError("delta must be in (0, 1), but got 0.0.")
    rho = _ball_radius(ball_radius, bandwidth)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, but got {dtype!r}.")

    draws = np.array(
        [[max(trials, math.ceil(min_patterns / count)) for count in sizes] for _ in dims],
        dtype=np.int64,
    )
    mean = np.zeros(draws.shape)
    standard_error = np.zeros(draws.shape)
    generator = torch.Generator(device=device or "cpu").manual_seed(seed)
    with tqdm(total=int(draws.sum()), disable=not progress, desc="capacity", leave=False) as bar:
        for i, dim in enumerate(dims):
            for j, count in enumerate(sizes):
                fractions = np.empty(draws[i, j])
                for draw in range(draws[i, j]):
                    patterns = uniform_on_sphere(count, dim, radius, generator, dtype, device)
                    verdict = stored_patterns(
                        patterns,
                        bandwidth,
                        ball_radius=rho,
                        num_perturbations=num_perturbations,
                        max_steps=max_steps,
                        generator=generator,
                    )
                    fractions[draw] = verdict.fraction
                    bar.update(1)
                mean[i, j] = fractions.mean()
                if fractions.size > 1:
                    standard_error[i, j] = fractions.std(ddof=1) / math.sqrt(fractions.size)

    sizes_array = np.asarray(sizes, dtype=np.int64)
    dims_array = np.asarray(dims, dtype=np.int64)
    n_max = np.zeros(len(dims), dtype=np.int64)
    censored = np.zeros(len(dims), dtype=bool)
    for i in range(len(dims)):
        n_max[i], censored[i] = _largest_passing(sizes_array, mean[i], delta)
    bound_fraction = np.array(
        [[certified_fraction(n, dim, bandwidth, radius, rho) for n in sizes] for dim in dims]
    )
    bound_n_max = np.array(
        [capacity_lower_bound(dim, bandwidth, radius, delta, rho) for dim in dims], dtype=np.int64
    )
    fits = {
        "numerical": fit_exponential_growth(dims_array, n_max, valid=~censored),
        "bound": fit_exponential_growth(dims_array, bound_n_max),
    }
    for dim, value, capped, bound in zip(dims, n_max, censored, bound_n_max, strict=True):
        logger.info(
            "capacity D=%d: N_max=%d%s, bound N_max=%d",
            dim,
            value,
            " (censored)" if capped else "",
            bound,
        )
    return CapacityCurve(
        dims=dims_array,
        num_patterns=sizes_array,
        stored_fraction=mean,
        stored_fraction_se=standard_error,
        draws=draws,
        bound_fraction=bound_fraction,
        n_max=n_max,
        censored=censored,
        bound_n_max=bound_n_max,
        fits=fits,
        bandwidth=bandwidth,
        radius=radius,
        ball_radius=rho,
        delta=float(delta),
        trials=trials,
        min_patterns=min_patterns,
        seed=seed,
    )


def _integer(name: str, value, minimum: int) -> int:
    return check_int(name, int(value) if isinstance(value, np.integer) else value, minimum=minimum)
