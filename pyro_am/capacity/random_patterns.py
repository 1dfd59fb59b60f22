"""The bound for uniform random patterns: certified fractions, guaranteed N and growth in D.

Given ``x_i``, the cosines to the other patterns are independent, so the nearest-neighbour form
certifies a pattern with probability ``(1 - P(t >= s*))^(N - 1)``, ``s* = 1 - Delta* / r^2``.
:func:`certified_fraction` improves on it with a truncated Chernoff bound for the pairwise sums,
:func:`capacity_lower_bound` turns either into a guaranteed N, and
:func:`high_dimensional_ceiling` is the D-independent limit of the growth in D at fixed ``h / r``.
"""

from __future__ import annotations

import functools
import math
import sys

import numpy as np

from pyro_am._validation import check_int, check_interval
from pyro_am.capacity.bound import separation_threshold
from pyro_am.capacity.geometry import _ball_radius, _bandwidth, _scalar
from pyro_am.capacity.spherical_cap import inner_product_tail


def _uncertified_probability(num_patterns, dim, bandwidth, radius, ball_radius) -> float:
    threshold = separation_threshold(num_patterns, bandwidth, radius, ball_radius)
    return inner_product_tail(1.0 - threshold / radius**2, dim)


def nearest_certified_fraction(
    num_patterns: int, dim: int, bandwidth: float, radius: float, ball_radius: float | None = None
) -> float:
    """Return the expected fraction of N uniform patterns that the nearest-neighbour form certifies.

    Given ``x_i``, the cosines to the other N - 1 patterns are independent, so the probability that
    all stay below ``s* = 1 - Delta* / r^2`` is exactly ``(1 - P(t >= s*))^(N - 1)``.
    """
    num_patterns = check_int("num_patterns", num_patterns)
    if num_patterns == 1:
        return 1.0
    tail = _uncertified_probability(num_patterns, dim, bandwidth, radius, ball_radius)
    if tail >= 1.0:
        return 0.0
    return math.exp((num_patterns - 1) * math.log1p(-tail))


def growth_rate(
    num_patterns: int, bandwidth: float, radius: float, ball_radius: float | None = None
) -> float:
    """Return ``b = -log(1 - s*^2) / 2``, the rate in D at which the nearest-neighbour bound grows.

    Here ``s* = 1 - Delta*(N) / r^2``. For ``0 < s < 1`` the cosine's tail satisfies ``P(t >= s) <=
    (1 - s^2)^((D - 1) / 2) / (s (D - 1) B((D - 1) / 2, 1 / 2))``. So the guaranteed N grows at
    least like ``exp(b D)``, up to a factor polynomial in D, for as long as it stays below N. The
    rate falls as N grows. It is 0 when ``s* <= 0`` (no growth in D) and ``inf`` when ``Delta* =
    0``.
    """
    threshold = separation_threshold(num_patterns, bandwidth, radius, ball_radius)
    cosine = 1.0 - threshold / _scalar("radius", radius) ** 2
    if cosine <= 0.0:
        return 0.0
    if cosine >= 1.0:
        return math.inf
    return -0.5 * math.log1p(-(cosine**2))


def high_dimensional_ceiling(
    bandwidth: float, radius: float, ball_radius: float | None = None
) -> float:
    """Return ``1 + rho exp(beta r (r - rho)) / (r - rho)``, the most patterns stored as D -> inf.

    Take the point ``x = (1 - rho / r) x_i`` of ``B_i``. Its logits are ``beta r (r - rho)`` for
    ``x_i`` and ``beta (r - rho) r t_j`` for the others, and the cosines ``t_j`` of independent
    uniform patterns tend to 0 as D grows with N fixed. In that limit ``F(x) - x_i`` has a
    component ``-r (N - 1) / (exp(beta r (r - rho)) + N - 1)`` along ``x_i``, so ``F(B_i)`` lies in
    ``B_i`` only if N is at most this value. It does not depend on D, so at fixed ``h / r`` the
    capacity cannot grow exponentially in D without limit. ``inf`` when ``rho >= r``, and also
    when the value exceeds the float range (``h / r`` below about 0.04 at the default rho).
    """
    bandwidth = _bandwidth(bandwidth)
    radius = _scalar("radius", radius)
    rho = _ball_radius(ball_radius, bandwidth)
    if rho >= radius:
        return math.inf
    # Sum in log space, because exp(beta r (r - rho)) overflows a float at small h / r.
    log_excess = radius * (radius - rho) / bandwidth**2 + math.log(rho / (radius - rho))
    if log_excess > math.log(sys.float_info.max):
        return math.inf
    return 1.0 + math.exp(log_excess)


# Quadrature and Chernoff grids of the pairwise bound for random patterns.
_PANELS = 192
_NODES_PER_PANEL = 8
_INNER_RADII = tuple(2.0 ** (-0.5 * j) for j in range(12))
_CHERNOFF_SLOPES = np.logspace(-3.0, 7.0, 121)


@functools.lru_cache(maxsize=32)
def _pairwise_moments(dim: int, bandwidth: float, radius: float, rho: float):
    """Tabulate what the Chernoff bound of :func:`certified_fraction` needs, for one setting.

    The angle theta between two uniform patterns has density ``sin^(D-2) theta / B((D-1)/2,
    1/2)`` on ``[0, pi]``. The pairwise condition needs ``theta > theta_ball`` (``d > 2 rho``), so
    ``[theta_ball, pi]`` is split into panels with Gauss-Legendre nodes. For each panel start
    ``theta_k`` (a truncation ``t < s_k = cos theta_k``) and each slope lambda, this returns
    ``log E[exp(lambda Y) 1{t < s_k}]`` for ``Y = u(t) = d exp(-beta phi_rho(d))`` and for
    ``Y = v(t) = beta d^2 exp(-beta phi_rho'(d))`` at every inner radius rho', together with
    ``P(t >= s_k)``. Returns None when no two patterns can have disjoint balls (``rho >= r``).
    """
    cosine_ball = 1.0 - 2.0 * (rho / radius) ** 2
    if cosine_ball <= -1.0:
        return None
    beta = 1.0 / bandwidth**2
    theta_ball = math.acos(cosine_ball)
    edges = np.linspace(theta_ball, math.pi, _PANELS + 1)
    points, weights = np.polynomial.legendre.leggauss(_NODES_PER_PANEL)
    half = 0.5 * np.diff(edges)[:, None]
    theta = (edges[:-1, None] + half * (points[None, :] + 1.0)).reshape(-1)
    log_norm = math.lgamma(0.5 * (dim - 1)) + math.lgamma(0.5) - math.lgamma(0.5 * dim)
    log_weight = (
        np.log((half * weights[None, :]).reshape(-1)) + (dim - 2) * np.log(np.sin(theta)) - log_norm
    )
    distance = 2.0 * radius * np.sin(0.5 * theta)
    phi = 0.5 * distance**2

    def panel_suffix(log_terms):
        # log sum over all nodes from panel k to the last, for every k, along the first axis.
        per_panel = np.logaddexp.reduce(
            log_terms.reshape(_PANELS, _NODES_PER_PANEL, *log_terms.shape[1:]), axis=1
        )
        return np.logaddexp.accumulate(per_panel[::-1], axis=0)[::-1]

    slopes_image = _CHERNOFF_SLOPES / rho
    image_terms = distance * np.exp(-beta * (phi - rho * distance))
    log_image = panel_suffix(log_weight[:, None] + slopes_image[None, :] * image_terms[:, None])

    inner = rho * np.asarray(_INNER_RADII)
    lipschitz_terms = (
        beta
        * distance[:, None] ** 2
        * np.exp(-beta * (phi[:, None] - inner[None, :] * distance[:, None]))
    )
    log_lipschitz = panel_suffix(
        log_weight[:, None, None] + _CHERNOFF_SLOPES[None, None, :] * lipschitz_terms[:, :, None]
    )
    tails = np.array([inner_product_tail(math.cos(edge), dim) for edge in edges[:-1]])
    return tails, slopes_image, log_image, inner, log_lipschitz


def _pairwise_failure_bound(num_patterns: int, moments) -> float:
    """Bound P(the pairwise condition fails for one pattern) by truncation and Chernoff.

    For a truncation ``s_k``, an inner radius rho' and slopes lambda, mu >= 0::

        P(fail) <= P(max_j t_j >= s_k) + P(sum_j u_j 1{t_j < s_k} > rho')
                   + P(sum_j v_j 1{t_j < s_k} >= 1)
                <= 1 - (1 - p_k)^(N-1) + exp(-lambda rho') E[exp(lambda U)]^(N-1)
                   + exp(-mu) E[exp(mu V)]^(N-1)

    with ``U = u(t) 1{t < s_k}`` and ``V = v(t) 1{t < s_k}``. Below ``s_k`` every distance exceeds
    2 rho, ``A_i <= rho'`` makes the inner radius at most rho', and v grows with the inner radius,
    so the three events cover every failure. Every grid point gives a valid bound; this returns the
    smallest.
    """
    tails, slopes_image, log_image, inner, log_lipschitz = moments
    others = num_patterns - 1
    # A tail of exactly 1 (float rounding for a very negative s_k) makes that truncation useless;
    # its -inf logarithm is the right value there.
    with np.errstate(divide="ignore"):
        log_tails = np.log(tails)
        near = -np.expm1(others * np.log1p(-tails))
    log_mgf_image = np.logaddexp(log_tails[:, None], log_image)
    image_term = np.min(
        -slopes_image[None, None, :] * inner[None, :, None] + others * log_mgf_image[:, None, :],
        axis=-1,
    )
    log_mgf_lipschitz = np.logaddexp(log_tails[:, None, None], log_lipschitz)
    lipschitz_term = np.min(-_CHERNOFF_SLOPES + others * log_mgf_lipschitz, axis=-1)
    failure = (
        near[:, None]
        + np.exp(np.minimum(image_term, 0.0))
        + np.exp(np.minimum(lipschitz_term, 0.0))
    )
    return float(failure.min())


def certified_fraction(
    num_patterns: int, dim: int, bandwidth: float, radius: float, ball_radius: float | None = None
) -> float:
    """Return a lower bound on the expected fraction of N uniform patterns that are stored.

    It is the larger of two lower bounds on the probability that one pattern passes the pairwise
    condition of :func:`storage_bound`. The first is the exact probability of the nearest-neighbour
    form (:func:`nearest_certified_fraction`), which implies the pairwise one. The second is one
    minus the truncated Chernoff bound of the failure probability. Certified patterns are stored, so
    both bound the expected stored fraction from below. The Chernoff expectations are
    one-dimensional integrals over the angle, computed by composite Gauss-Legendre quadrature (192
    panels of 8 nodes).

    :param int num_patterns: N >= 1.
    :param int dim: D >= 2.
    :param float bandwidth: h > 0.
    :param float radius: r > 0.
    :param float ball_radius: rho > 0; default ``h / 2``.
    :returns: a float in [0, 1].
    """
    num_patterns = check_int("num_patterns", num_patterns)
    dim = check_int("dim", dim, minimum=2)
    bandwidth = _bandwidth(bandwidth)
    radius = _scalar("radius", radius)
    rho = _ball_radius(ball_radius, bandwidth)
    nearest = nearest_certified_fraction(num_patterns, dim, bandwidth, radius, rho)
    if num_patterns == 1:
        return nearest
    moments = _pairwise_moments(dim, bandwidth, radius, rho)
    if moments is None:
        return nearest
    return max(nearest, 1.0 - _pairwise_failure_bound(num_patterns, moments))


def all_certified_probability(
    num_patterns: int, dim: int, bandwidth: float, radius: float, ball_radius: float | None = None
) -> float:
    """Return a lower bound on P(every one of N uniform patterns is certified).

    It is the larger of the union bound over pairs for the nearest-neighbour form,
    ``1 - N (N - 1) / 2 P(t >= s*)``, and the union bound over patterns,
    ``1 - N (1 - certified_fraction)``.
    """
    num_patterns = check_int("num_patterns", num_patterns)
    tail = _uncertified_probability(num_patterns, dim, bandwidth, radius, ball_radius)
    pairs = 1.0 - 0.5 * num_patterns * (num_patterns - 1) * tail
    fraction = certified_fraction(num_patterns, dim, bandwidth, radius, ball_radius)
    return max(0.0, pairs, 1.0 - num_patterns * (1.0 - fraction))


def capacity_lower_bound(
    dim: int,
    bandwidth: float,
    radius: float,
    delta: float = 0.05,
    ball_radius: float | None = None,
    criterion: str = "fraction",
    max_patterns: int = 10**12,
) -> int:
    """Return the largest N that the bound guarantees for uniform random patterns.

    With ``criterion="fraction"`` it is the largest N whose bound on the expected stored fraction
    (:func:`certified_fraction`) is at least ``1 - delta``. With ``"all"`` it is the largest N whose
    bound on P(every pattern is certified) (:func:`all_certified_probability`) is at least
    ``1 - delta``. With ``"nearest"`` it is the largest N whose nearest-neighbour fraction
    (:func:`nearest_certified_fraction`) is at least ``1 - delta``, the closed form that the
    derivation analyses. All three decrease in N, so the search doubles N and then bisects. The
    result is capped at ``max_patterns``.
    """
    check_interval("delta", delta, 0.0, 1.0)
    if delta == 0.0:
        raise ValueError("delta must be in (0, 1), but got 0.0.")
    measures = {
        "fraction": certified_fraction,
        "all": all_certified_probability,
        "nearest": nearest_certified_fraction,
    }
    if criterion not in measures:
        raise ValueError(
            f"criterion must be 'fraction', 'all' or 'nearest', but got {criterion!r}."
        )
    measure = measures[criterion]

    def holds(count: int) -> bool:
        return measure(count, dim, bandwidth, radius, ball_radius) >= 1.0 - delta

    if not holds(1):
        return 0
    low, high = 1, 2
    while high <= max_patterns and holds(high):
        low, high = high, 2 * high
    if high > max_patterns:
        return max_patterns if holds(max_patterns) else _bisect(holds, low, max_patterns)
    return _bisect(holds, low, high)


def _bisect(holds, low: int, high: int) -> int:
    """Largest n in [low, high) with holds(n), given holds(low) and not holds(high)."""
    while high - low > 1:
        middle = (low + high) // 2
        if holds(middle):
            low = middle
        else:
            high = middle
    return low
