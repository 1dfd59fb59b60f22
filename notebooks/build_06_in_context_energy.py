"""Write notebooks/06_in_context_energy.ipynb (stored without outputs; the tests execute it)."""

from pathlib import Path

from _notebook import write_notebook

CELLS = [
    (
        "markdown",
        """# In-context energies

An in-context energy `E(x | D)` is a transformer whose parameters stay fixed after pretraining on
many data sets: a new context set `D` reshapes the landscape without any fitting. This notebook
draws data sets from a family of Gaussian mixtures and pretrains a causal transformer energy by
contrastive divergence. It then watches the landscape sharpen as the context grows and samples it
by Langevin dynamics. Last, it compares the energy with an amortized Pyro guide, whose posterior
predictive is a normalized in-context energy. The documentation page is `docs/in_context.md`.

With `PYRO_AM_NOTEBOOK_SMALL=1` (as in the tests) every size is tiny and the models barely train;
the figures are only meaningful at full size.""",
    ),
    (
        "code",
        """import os

import matplotlib.pyplot as plt
import pyro
import torch
from pyro.infer import Predictive

from pyro_am.datasets import GaussianMixtureFamily, ShapesFamily
from pyro_am.models import AmortizedMixtureGuide, InContextEnergy
from pyro_am.models.amortized_training import fit_amortized_guide
from pyro_am.models.icl_evaluation import (
    evaluate_in_context,
    landscape,
    plot_landscapes,
    plot_metrics,
    plot_samples,
    sample_in_context,
)
from pyro_am.models.icl_training import CDConfig, train_in_context_energy

SMALL = os.environ.get("PYRO_AM_NOTEBOOK_SMALL") == "1"
width, depth, heads = (16, 1, 2) if SMALL else (64, 2, 4)
num_points = 8 if SMALL else 16
cd_steps = 20 if SMALL else 600
svi_steps = 20 if SMALL else 1500
num_datasets = 3 if SMALL else 16
torch.manual_seed(0)
pyro.set_rng_seed(0)""",
    ),
    (
        "markdown",
        """## Families of data sets

`GaussianMixtureFamily()` draws mixtures of 3 isotropic Gaussians in 2-D with means
`mu_k ~ N(0, 5^2 I)` and component std 0.33; `ShapesFamily` moves scikit-learn's moons, circles
and blobs by a random rotation, scale and shift. Either family can hold a finite number of
distinct data sets (`num_distinct`) or draw a new one every time.""",
    ),
    (
        "code",
        """generator = torch.Generator().manual_seed(0)
families = {
    "mixtures": GaussianMixtureFamily(),
    "moons": ShapesFamily("moons"),
    "circles": ShapesFamily("circles"),
    "blobs": ShapesFamily("blobs"),
}
figure, axes = plt.subplots(1, 4, figsize=(12, 3))
for axis, (name, family) in zip(axes, families.items(), strict=True):
    for points in family.sample_points(3, 200, generator):
        axis.scatter(points[:, 0], points[:, 1], s=3)
    axis.set_title(name)
    axis.set_aspect("equal")""",
    ),
    (
        "markdown",
        """## One pass scores every prefix

In causal mode, context token `i` attends to tokens `j <= i` and a query scored against the prefix
of length `p` attends to the context tokens `j < p` and to itself. One call returns
`E(x | x_<p)` for every `p = 0 .. n` at once, and changing `x_m` leaves every prefix with
`p <= m` unchanged.""",
    ),
    (
        "code",
        """model = InContextEnergy(dim=2, width=width, depth=depth, heads=heads, mode="causal")
family = GaussianMixtureFamily()
context = family.sample_points(2, 6, generator)
queries = torch.randn(2, 4, 2)
with torch.no_grad():
    energies = model(context, queries)
    changed = context.clone()
    changed[:, 3] += 5.0
    moved = model(changed, queries)
print("energies per (data set, prefix, query):", tuple(energies.shape))
print("largest change for p <= 3:", (moved[:, :4] - energies[:, :4]).abs().max().item())
print("smallest change for p > 3:", (moved[:, 4:] - energies[:, 4:]).abs().min().item())""",
    ),
    (
        "markdown",
        """## Contrastive-divergence pretraining

Each step draws a batch of data sets, runs Langevin chains on `E(. | x_<p)` for every prefix at
once (15 steps, step size 1, noise std 0.01, gradients clamped to [-1, 1], chains started from
`N(0, 6^2 I)`), and minimizes `mean E(x+) - mean E(x-) + 0.1 (mean E(x+)^2 + mean E(x-)^2)`.""",
    ),
    (
        "code",
        """config = CDConfig(steps=cd_steps, batch_size=16, num_points=num_points, progress=False)
result = train_in_context_energy(model, family, config)
figure, axis = plt.subplots(figsize=(6, 3))
axis.plot(result.history["positive_energy"], lw=0.8, label="mean E(x+ | D)")
axis.plot(result.history["negative_energy"], lw=0.8, label="mean E(x- | D)")
axis.set_xlabel("step")
axis.legend()""",
    ),
    (
        "markdown",
        """## The landscape sharpens around the context

The panels show `E(x | x_1 .. x_n)` on a grid for a held-out mixture, with the first n context
points in red. `n = 0` is the energy before any context.""",
    ),
    (
        "code",
        """# Causal training covers context sizes 0 .. num_points - 1.
largest = num_points - 1
held_out = family.sample(1, largest, torch.Generator().manual_seed(7))
points = held_out.points[0]
sizes = [0, 1, 2, 4, largest]
low, high = points.min().item() - 3, points.max().item() + 3
xs, ys, values = landscape(model, points, sizes, (low, high), resolution=30 if SMALL else 80)
plot_landscapes(xs, ys, values, points.numpy(), sizes)""",
    ),
    (
        "code",
        """samples = sample_in_context(model, points[None], sizes[1:], 200, config)[0]
plot_samples(samples.numpy(), points.numpy(), sizes[1:], (low, high))""",
    ),
    (
        "markdown",
        """## The amortized guide

`AmortizedMixtureGuide` is the probabilistic counterpart: a set encoder maps the context to the
variational parameters of a 3-component mixture memory, and SVI trains it across data sets. Its
`model` and `guide` are ordinary Pyro callables, so `Predictive` draws posterior predictive
points, and its S-draw predictive density integrates to one.""",
    ),
    (
        "code",
        """guide_options = dict(dim=2, num_components=3, prior_std=5.0, width=width, heads=heads)
amortized = AmortizedMixtureGuide(**guide_options)
fit_amortized_guide(
    amortized, family, steps=svi_steps, batch_size=16, max_points=num_points, progress=False
)
predictive = Predictive(amortized.model, guide=amortized.guide, num_samples=100, parallel=True)
draws = predictive(points[None], num_predictive=5)
print({name: tuple(value.shape) for name, value in draws.items()})

axis_grid = torch.linspace(low - 10, high + 10, 300)
grid = torch.cartesian_prod(axis_grid, axis_grid)
posterior = amortized.sample_posterior(points[None], num_samples=32)
density = amortized.predictive_log_prob(points[None], grid[None], draws=posterior).exp()
cell = (axis_grid[1] - axis_grid[0]).item() ** 2
print("integral of the predictive density on the grid:", density.sum().item() * cell)""",
    ),
    (
        "markdown",
        """## Sample quality and held-out NLL against the context size

On held-out mixtures, for the context sizes seen in training (n = 1 .. N - 1), the left panel
shows the squared energy distance between Langevin samples and draws from the true mixture, with
the distance between two true samples as a floor. The right panel shows the held-out NLL per point
of the amortized predictive beside the true mixture and a scikit-learn GMM fitted to the same n
points. That GMM needs n >= 3 and overfits small contexts.""",
    ),
    (
        "code",
        """metrics = evaluate_in_context(
    model,
    family,
    config,
    amortized,
    max_points=largest,
    num_datasets=num_datasets,
    num_samples=32 if SMALL else 128,
)
columns = (metrics["sizes"], metrics["energy_distance"], metrics["amortized_nll"])
for n, distance, nll in zip(*columns, strict=True):
    print(f"n={n:>2}: energy distance {distance:.3f}, amortized NLL {nll:.3f}")
plot_metrics(metrics)""",
    ),
]


if __name__ == "__main__":
    write_notebook(CELLS, Path(__file__).resolve().with_name("06_in_context_energy.ipynb"))
