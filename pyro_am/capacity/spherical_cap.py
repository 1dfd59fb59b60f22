"""The tail of the cosine between two uniform unit vectors, the area of a spherical cap.

For uniform u, v in R^D, ``P(u . v >= s) = I_{1 - s^2}((D - 1) / 2, 1 / 2) / 2`` for ``s >= 0``,
with I the regularized incomplete beta function, evaluated here by its continued fraction.
"""

from __future__ import annotations

import math

from pyro_am._validation import check_int, check_interval, check_positive

_BETAINC_MAX_TERMS = 10_000
_BETAINC_TINY = 1e-300


# -- spherical-cap tail --------------------------------------------------------------------------
def _betainc_fraction(a: float, b: float, x: float) -> float:
    """Evaluate the continued fraction of ``I_x(a, b)`` by the modified Lentz method.

    The fraction is ``1 / (1 + d_1 / (1 + d_2 / (1 + ...)))`` with
    ``d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m))`` and
    ``d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1))``. It converges fast for
    ``x < (a + 1) / (a + b + 2)``; the caller uses the symmetry ``I_x(a, b) = 1 - I_{1-x}(b, a)``
    otherwise.
    """

    def guard(value: float) -> float:
        return value if abs(value) > _BETAINC_TINY else _BETAINC_TINY

    # Lentz's method keeps the ratios c = A_n / A_{n-1} and d = B_{n-1} / B_n of successive
    # convergents A_n / B_n, so the fraction is the running product of c * d.
    c = 1.0
    d = 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    value = d
    for m in range(1, _BETAINC_MAX_TERMS):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for coefficient in (even, odd):
            d = 1.0 / guard(1.0 + coefficient * d)
            c = guard(1.0 + coefficient / c)
            value *= c * d
        if abs(c * d - 1.0) < 1e-15:
            return value
    raise ArithmeticError(f"the incomplete beta fraction did not converge for a={a}, b={b}, x={x}.")


def regularized_incomplete_beta(a: float, b: float, x: float, complement: float | None = None):
    """Compute ``I_x(a, b) = B(x; a, b) / B(a, b)`` in float64, to about 1e-14 relative accuracy.

    :param float a: first shape parameter, > 0.
    :param float b: second shape parameter, > 0.
    :param float x: the upper limit, in [0, 1].
    :param float complement: ``1 - x`` if known more accurately than by subtraction.
    :returns: a float.
    """
    check_positive("a", a)
    check_positive("b", b)
    check_interval("x", x, 0.0, 1.0, closed_high=True)
    complement = 1.0 - x if complement is None else float(complement)
    if x == 0.0 or complement == 0.0:
        return 0.0 if x == 0.0 else 1.0
    log_front = (
        a * math.log(x)
        + b * math.log(complement)
        + math.lgamma(a + b)
        - math.lgamma(a)
        - math.lgamma(b)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betainc_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betainc_fraction(b, a, complement) / b


def inner_product_tail(threshold: float, dim: int) -> float:
    """Return ``P(u . v >= threshold)`` for independent uniform unit vectors u, v in R^dim.

    The cosine has density proportional to ``(1 - t^2)^((dim - 3) / 2)`` on [-1, 1], whose tail is
    ``I_{1 - s^2}((dim - 1) / 2, 1 / 2) / 2`` for ``s >= 0`` (the area of a spherical cap) and one
    minus the mirrored tail for ``s < 0``.
    """
    dim = check_int("dim", dim, minimum=2)
    threshold = float(threshold)
    if threshold >= 1.0:
        return 0.0
    if threshold <= -1.0:
        return 1.0
    square = threshold * threshold
    cap = 0.5 * regularized_incomplete_beta(0.5 * (dim - 1), 0.5, 1.0 - square, complement=square)
    return cap if threshold >= 0.0 else 1.0 - cap
