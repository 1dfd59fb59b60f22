"""Write notebooks/04_kde_capacity.ipynb (stored without outputs; the tests execute it)."""

from pathlib import Path

from _notebook import write_notebook

CELLS = [
    (
        "markdown",
        """# How many patterns does a Gaussian KDE store?

N patterns lie on the sphere of radius r in R^D, and the KDE with bandwidth h retrieves by mean
shift, which on the sphere is the modern Hopfield update with beta = 1 / h^2. A pattern is stored
when the map has one attracting fixed point within rho = h / 2 of it, its ball of radius rho is
mapped into itself, and the balls of distinct patterns are disjoint. This notebook checks the
Hopfield identity, compares the numerical verdict with the contraction bound on single memories,
draws capacity curves, fits log N_max = a + b D, and looks at the ceiling that stops the growth
in D at fixed h / r. The derivation is in `docs/kde_capacity.md`. Set
`PYRO_AM_NOTEBOOK_SMALL=1` to run it at a reduced size.""",
    ),
    (
        "code",
        """import os

import matplotlib.pyplot as plt
import torch

from pyro_am import DenseAMEnergy, GaussianKDEEnergy
from pyro_am.capacity import (
    capacity_curve,
    capacity_lower_bound,
    certified_fraction,
    growth_rate,
    high_dimensional_ceiling,
    nearest_certified_fraction,
    storage_bound,
    stored_patterns,
    uniform_on_sphere,
)

SMALL = os.environ.get("PYRO_AM_NOTEBOOK_SMALL") == "1"
dims = [2, 4, 8] if SMALL else [2, 4, 8, 16, 32]
grid = (
    [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    if SMALL
    else [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
)
trials, min_patterns = (2, 30) if SMALL else (4, 200)
large_dims = [8, 32, 128] if SMALL else [8, 16, 32, 64, 128, 256]
bandwidth, radius = 1 / 3, 1.0
generator = torch.Generator().manual_seed(0)""",
    ),
    (
        "markdown",
        """## Mean shift on the sphere is the Hopfield update

Expanding `|x - x_n|^2 = |x|^2 - 2 x.x_n + r^2` leaves logits `x.x_n / h^2` plus terms that do not
depend on n, so the softmax weights, and hence the two maps, agree for any query x.""",
    ),
    (
        "code",
        """memories = uniform_on_sphere(50, 6, radius, generator)
queries = 2 * torch.randn(100, 6, generator=generator, dtype=torch.float64)
kde_step = GaussianKDEEnergy(memories, bandwidth).fixed_point(queries)
hopfield_step = DenseAMEnergy(memories, 1 / bandwidth**2).fixed_point(queries)
print("largest difference between the two maps:", float((kde_step - hopfield_step).abs().max()))""",
    ),
    (
        "markdown",
        """## The numerical verdict and the bound on one memory

`stored_patterns` iterates the map from every pattern and from random points on its ball's
boundary, all at once. `storage_bound` certifies a pattern from its distances to the others. A
certified pattern must be stored; the converse need not hold, and the gap shows how conservative
the bound is.""",
    ),
    (
        "code",
        """for dim, count in ((8, 6), (16, 12), (32, 24)):
    patterns = uniform_on_sphere(count, dim, radius, generator)
    verdict = stored_patterns(patterns, bandwidth, radius, generator=generator)
    bound = storage_bound(patterns, bandwidth, radius)
    violations = int((bound.certified & ~verdict.stored).sum())
    print(
        f"D={dim:>2} N={count:>2}: stored {int(verdict.stored.sum()):>2}, "
        f"certified {int(bound.certified.sum()):>2} "
        f"(nearest-neighbour form {int(bound.certified_nearest.sum()):>2}), "
        f"certified but not stored: {violations}"
    )""",
    ),
    (
        "markdown",
        """## Capacity curves

For each D and N, `capacity_curve` draws pattern sets uniformly on the sphere and records the
stored fraction; N_max(D) is the largest grid N at which it stays at least 1 - delta = 0.95. The
dashed lines are the bound's lower bound on the expected stored fraction.""",
    ),
    (
        "code",
        """curve = capacity_curve(
    dims,
    grid,
    bandwidth,
    radius,
    trials=trials,
    min_patterns=min_patterns,
    seed=0,
    progress=False,
)
curve.plot()
plt.show()
for dim, n_max, censored, bound in zip(
    curve.dims, curve.n_max, curve.censored, curve.bound_n_max, strict=True
):
    print(f"D={dim:>2}: N_max={n_max}{'+' if censored else ''}, bound N_max={bound}")""",
    ),
    (
        "markdown",
        """## The slope b of log N_max = a + b D

`curve.fits` contains least-squares fits of `log N_max = a + b D` to the numerical N_max and to the
bound's N_max. `growth_rate(N)` is the rate `-log(1 - s*^2) / 2` of the nearest-neighbour bound at
N, where `s* = 1 - Delta*(N) / r^2`. It falls as N grows, so the growth in D slows down.""",
    ),
    (
        "code",
        """for name, (a, b) in curve.fits.items():
    print(f"{name:>9}: a = {a:.3f}, b = {b:.4f}")
for count in (2, 8, 32, 128):
    print(f"growth_rate({count}) = {growth_rate(count, bandwidth, radius):.4f}")
for dim in dims:
    print(
        f"D={dim:>2}: certified_fraction(8) = {certified_fraction(8, dim, bandwidth, radius):.3f}, "
        f"nearest form {nearest_certified_fraction(8, dim, bandwidth, radius):.3f}"
    )""",
    ),
    (
        "markdown",
        """## The ceiling at fixed h / r

At the point `(1 - rho / r) x_i` of the ball, a pattern competes with N - 1 nearly orthogonal
others once D is large, and the map sends that point outside the ball when N exceeds
`1 + rho exp(beta r (r - rho)) / (r - rho)`, whatever D is. The bound's N_max flattens in the same
way. Exponential growth in D at fixed h / r therefore stops. It continues for all D only if
(r / h)^2 grows at least linearly in D.""",
    ),
    (
        "code",
        """ceiling = high_dimensional_ceiling(bandwidth, radius)
print(f"D -> inf ceiling at h = r / 3: {ceiling:.1f}")
bounds = [capacity_lower_bound(dim, bandwidth, radius) for dim in large_dims]
nearest = [capacity_lower_bound(dim, bandwidth, radius, criterion="nearest") for dim in large_dims]
figure, axis = plt.subplots(figsize=(5, 3.5))
axis.plot(large_dims, bounds, "s-", label="bound N_max (pairwise, Chernoff)")
axis.plot(large_dims, nearest, "o-", label="bound N_max (nearest neighbour)")
axis.axhline(ceiling, color="grey", label="D -> inf ceiling")
axis.set_xscale("log", base=2)
axis.set_yscale("log")
axis.set_xlabel("dimension D")
axis.legend(fontsize=8)
plt.show()""",
    ),
]


if __name__ == "__main__":
    write_notebook(CELLS, Path(__file__).resolve().with_name("04_kde_capacity.ipynb"))
