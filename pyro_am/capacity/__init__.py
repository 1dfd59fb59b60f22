"""Memory capacity of a Gaussian kernel density estimate with patterns on a sphere.

Patterns ``x_1 .. x_N`` lie on the sphere ``|x_n| = r`` in R^D and the KDE has bandwidth h. Its
mean-shift map is ``F(x) = sum_n softmax_n(-|x - x_n|^2 / (2 h^2)) x_n``. Because every ``|x_n|^2``
equals ``r^2``, the logits differ from ``beta x . x_n`` (``beta = 1 / h^2``) by a term that does
not depend on n, so F is the modern Hopfield update with inverse temperature ``beta``.

Storage. With the ball ``B_i = {x : |x - x_i| <= rho}`` (by default ``rho = h / 2``), pattern i is
stored when the balls of distinct patterns are disjoint (``2 rho < d_i``, the distance from x_i to
its nearest other pattern), F maps B_i into itself, and all starts in B_i converge to one fixed
point ``x_i*`` of F inside B_i. :func:`stored_patterns` checks this numerically.

Sufficient condition (:func:`storage_bound`; the derivation is in the "KDE capacity" page of the
docs). With ``phi_rho(d) = d^2 / 2 - rho d``, the softmax weight of pattern j anywhere in B_i is at
most ``exp(-beta phi_rho(d_ij))``. Pattern i is stored if::

    d_i > 2 rho,    A_i = sum_j d_ij exp(-beta phi_rho(d_ij)) <= rho,
    L_i = beta sum_j d_ij^2 exp(-beta phi_A_i(d_ij)) < 1

The second makes F map B_i into the ball of radius A_i, and the third bounds the Jacobian
``beta Cov_w(x_n)`` there, so F is a contraction of that ball and Banach's theorem gives ``x_i*``.
Replacing every ``d_ij`` by the worst distance in ``[d_i, 2r]`` gives a form that depends only on
the separation ``Delta_i = r^2 - max_{j != i} x_i . x_j = d_i^2 / 2``, N, r and h; it holds
exactly when ``Delta_i`` exceeds a threshold ``Delta*(N)`` (:func:`separation_threshold`).

Random patterns. For patterns uniform on the sphere, the cosine ``t`` between two of them has
density proportional to ``(1 - t^2)^((D - 3) / 2)`` and tail ``P(t >= s) = I_{1 - s^2}((D - 1) / 2,
1 / 2) / 2`` for ``s >= 0`` (I is the regularized incomplete beta function). Given ``x_i``, the
other cosines are independent, so the nearest-neighbour form certifies a pattern with probability
exactly ``(1 - P(t >= s*))^(N-1)``, ``s* = 1 - Delta* / r^2``
(:func:`nearest_certified_fraction`). :func:`certified_fraction` improves on it with a truncated
Chernoff bound for the pairwise sums, and :func:`capacity_lower_bound` turns either into a
guaranteed N. :func:`high_dimensional_ceiling` is the D-independent limit that stops the growth in
D at fixed ``h / r``.

Submodules: :mod:`~pyro_am.capacity.geometry` (patterns on the sphere, separations),
:mod:`~pyro_am.capacity.stored` (the numerical check), :mod:`~pyro_am.capacity.bound` (the
sufficient condition), :mod:`~pyro_am.capacity.spherical_cap` (the cosine's tail),
:mod:`~pyro_am.capacity.random_patterns` (the bound for random patterns) and
:mod:`~pyro_am.capacity.curves` (capacity curves and their fits). Everything listed in
``__all__`` is importable from this package.
"""

from pyro_am.capacity.bound import StorageBound, separation_threshold, storage_bound
from pyro_am.capacity.curves import CapacityCurve, capacity_curve, fit_exponential_growth
from pyro_am.capacity.geometry import (
    check_on_sphere,
    default_ball_radius,
    nearest_neighbour_distances,
    separations,
    uniform_on_sphere,
)
from pyro_am.capacity.random_patterns import (
    all_certified_probability,
    capacity_lower_bound,
    certified_fraction,
    growth_rate,
    high_dimensional_ceiling,
    nearest_certified_fraction,
)
from pyro_am.capacity.spherical_cap import inner_product_tail, regularized_incomplete_beta
from pyro_am.capacity.stored import StoredPatterns, stored_patterns

__all__ = [
    "CapacityCurve",
    "StorageBound",
    "StoredPatterns",
    "all_certified_probability",
    "capacity_curve",
    "capacity_lower_bound",
    "certified_fraction",
    "check_on_sphere",
    "default_ball_radius",
    "fit_exponential_growth",
    "growth_rate",
    "high_dimensional_ceiling",
    "inner_product_tail",
    "nearest_certified_fraction",
    "nearest_neighbour_distances",
    "regularized_incomplete_beta",
    "separation_threshold",
    "separations",
    "storage_bound",
    "stored_patterns",
    "uniform_on_sphere",
]
