"""Special functions that `keras.ops` lacks, written in it, and the linear
algebra the Gaussians share.

`lgamma` (Stirling's series after a shift, float32-accurate), the
regularised incomplete beta function (a continued fraction with a fixed
number of iterations, for the Student's t CDF), `erfc` before Keras 3.15,
and bisection with a fixed iteration count for quantiles without a closed
form (mixtures): fixed work, so that they compile (XLA, `jax.jit`).
"""

import math

import numpy as np
from keras import ops

from keras_elbo.distributions._core import dtype_of

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def lgamma(x):
    """`log(Gamma(x))` for `x > 0` (`keras.ops` has no `lgamma`).

    Stirling's series to the `x**-7` term, after shifting `x < 8` up by 8 with
    `Gamma(x) = Gamma(x + 8) / (x (x + 1) ... (x + 7))`. At `x >= 8` the
    series' truncation error is below `1 / (1188 * 8**9) ~ 6e-12`, so the
    result is accurate to the round-off of its own terms (float32: an error
    below ~2e-6 times `max(1, |lgamma(x)|)`, the absolute part near the
    zeros x = 1, 2 where two terms of ~10 cancel; checked against
    `scipy.special.gammaln`).
    Lanczos' approximation is not used: its alternating coefficients cancel
    to ~1e-4 in float32.
    """
    small = x < 8.0
    z = ops.where(small, x + 8.0, x)
    # The product is taken on a safe input: (x + i) for a large x overflows.
    safe = ops.where(small, x, ops.ones_like(x))
    shift = safe
    for i in range(1, 8):
        shift = shift * (safe + float(i))
    r = 1.0 / z
    r2 = r * r
    series = r * (1.0 / 12 - r2 * (1.0 / 360 - r2 * (1.0 / 1260 - r2 / 1680)))
    stirling = (z - 0.5) * ops.log(z) - z + HALF_LOG_2PI + series
    return stirling - ops.where(small, ops.log(shift), ops.zeros_like(x))


_BETAINC_ITERATIONS = 200


def betainc(a, b, x, one_minus_x):
    """The regularised incomplete beta function `I_x(a, b)`, `a, b > 0`.

    The continued fraction of Numerical Recipes (`betacf`, modified Lentz),
    run for a fixed `_BETAINC_ITERATIONS` steps in `ops.fori_loop`, on the
    side where it converges fast: `I_x(a, b)` if `x < (a + 1) / (a + b + 2)`,
    else `1 - I_{1-x}(b, a)`. It converges in O(sqrt(max(a, b))) steps, so
    200 steps are ample for `a, b <= ~1e4`. `one_minus_x` is passed
    separately so that a caller can compute it without cancellation.
    """
    flip = x > (a + 1.0) / (a + b + 2.0)
    a, b = ops.where(flip, b, a), ops.where(flip, a, b)
    x, one_minus = ops.where(flip, one_minus_x, x), ops.where(flip, x, one_minus_x)
    tiny = float(np.finfo(dtype_of(x)).tiny) * 1e6

    def fix(v):
        return ops.where(ops.abs(v) < tiny, tiny, v)

    d = 1.0 / fix(1.0 - (a + b) * x / (a + 1.0))

    def step(m, state):
        c, d, h = state
        m = ops.cast(m + 1, dtype_of(x))
        numerator = m * (b - m) * x / ((a - 1.0 + 2.0 * m) * (a + 2.0 * m))
        d = 1.0 / fix(1.0 + numerator * d)
        c = fix(1.0 + numerator / c)
        h = h * d * c
        numerator = -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 1.0 + 2.0 * m))
        d = 1.0 / fix(1.0 + numerator * d)
        c = fix(1.0 + numerator / c)
        return c, d, h * d * c

    _, _, fraction = ops.fori_loop(0, _BETAINC_ITERATIONS, step, (ops.ones_like(x), d, d))
    log_front = (
        a * ops.log(x) + b * ops.log(one_minus) + lgamma(a + b) - lgamma(a) - lgamma(b) - ops.log(a)
    )
    value = ops.exp(log_front) * fraction
    return ops.where(flip, 1.0 - value, value)


_BISECTION_ITERATIONS = 64


def bisect(cdf, p, low, high):
    """The `x` in `[low, high]` with `cdf(x) = p`, elementwise, for a
    non-decreasing `cdf`, by `_BISECTION_ITERATIONS` halvings in
    `ops.fori_loop`: 64 halvings take any float32 bracket down to adjacent
    floats. No gradient flows through it."""
    p = p + ops.zeros_like(low)

    def step(_, state):
        low, high = state
        middle = 0.5 * low + 0.5 * high
        below = cdf(middle) < p
        return ops.where(below, middle, low), ops.where(below, high, middle)

    low, high = ops.fori_loop(0, _BISECTION_ITERATIONS, step, (low, high))
    return 0.5 * low + 0.5 * high


def erfc_rational(x):
    """`erfc(x)` by the Chebyshev fit of Press et al. ("Numerical Recipes",
    2nd ed., section 6.2, `erfcc`): relative error below 1.2e-7 for every
    x in exact arithmetic, tails included (`1 - erf(x)` loses them); in
    float32 the rounding of the exponent adds about `x**2 * 2**-23`."""
    a = ops.abs(x)
    t = 1.0 / (1.0 + 0.5 * a)
    poly = 0.17087277
    for c in (-0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806,
              0.09678418, 0.37409196, 1.00002368, -1.26551223):  # fmt: skip
        poly = c + t * poly
    tail = t * ops.exp(-ops.square(a) + poly)
    return ops.where(x >= 0, tail, 2.0 - tail)


# `keras.ops.erfc` exists from Keras 3.15; older Keras gets the fit above.
erfc = getattr(ops, "erfc", erfc_rational)


def log_abs_diagonal(matrix):
    """log|diagonal| of a batch of matrices, shape `(..., d)`."""
    return ops.log(ops.abs(ops.diagonal(matrix, axis1=-2, axis2=-1)))


def solve_lower(tril, rhs):
    """`tril^-1 @ rhs` for lower-triangular `tril` `(..., d, d)` and `rhs`
    `(..., d, m)`, broadcasting the batch axes (`keras.ops.solve_triangular`
    refuses operands whose batch axes differ, on every backend)."""
    tril = tril + ops.zeros_like(rhs[..., :1, :1])
    rhs = rhs + ops.zeros_like(tril[..., :, :1])
    return ops.solve_triangular(tril, rhs, lower=True)
