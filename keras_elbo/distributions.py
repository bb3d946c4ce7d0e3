"""Probability distributions written in `keras.ops`, for every Keras backend.

Small distribution objects with TensorFlow Probability's method names
(`sample`, `log_prob`, `mean`, `stddev`, `entropy`), computed with
`keras.ops` and `keras.random` only, so the same code runs on the TensorFlow,
JAX and PyTorch backends (TFP's JAX substrate breaks on current JAX, and
there is none for PyTorch). Closed-form KL divergences live in a table keyed
by the pair of types, looked up along the class hierarchy as in TFP's
`kullback_leibler.py`: `register_kl`, `kl_divergence`, `has_closed_form_kl`.

Parameters are float32 unless one of them is float64, in which case all are
float64 (on JAX only with `jax_enable_x64`). Float16 and bfloat16 parameters
(mixed precision) are computed in float32: a log-density or KL of a few
thousand nats overflows float16.

Special functions that `keras.ops` lacks are written here in it:
`log Gamma` (Stirling's series after a shift, float32-accurate) and the
regularised incomplete beta function (a continued fraction with a fixed number
of iterations, for the Student's t CDF). Quantiles without a closed form
(mixtures, Student's t) are found by bisection with a fixed iteration count,
so that they compile (XLA, `jax.jit`); they carry no gradient.

Randomness: `sample(..., seed=...)` takes a `keras.random.SeedGenerator`
(each call draws new noise), an integer (the same draws at each call) or None
(Keras's global generator, refused inside a compiled JAX function).
"""

import copy
import math
import numbers

import keras
import numpy as np
from keras import ops

from keras_elbo import _backend

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


# ---------------------------------------------------------------------------
# Private helpers.


def _invalid_argument(name, expected, received):
    """The constructor error, in `keras_elbo._math.invalid_argument`'s form.

    (`_math` imports TensorFlow; this module must not.)
    """
    return ValueError(
        f"Invalid value received for argument `{name}`. Expected {expected}. "
        f"Received: {name}={received}"
    )


def _as_float(**values):
    """Converts parameters to tensors of one float dtype, returned in order.

    float64 if any parameter is float64, else float32.
    """
    tensors = [ops.convert_to_tensor(value) for value in values.values()]
    dtype = "float64" if "float64" in {_dtype(t) for t in tensors} else "float32"
    return [_cast(t, dtype) for t in tensors]


def _is_constant(value, constant):
    """Whether `value` is a Python number or NumPy array (not a tensor) all
    of whose entries equal `constant`."""
    if not isinstance(value, (numbers.Real, np.ndarray)) or isinstance(value, bool):
        return False
    return bool(np.all(np.asarray(value) == constant))


def _dtype(tensor):
    return keras.backend.standardize_dtype(tensor.dtype)


def _cast(x, dtype):
    """`x` as a tensor of `dtype`, with no op when it already is one."""
    x = ops.convert_to_tensor(x)
    return x if _dtype(x) == dtype else ops.cast(x, dtype)


def _broadcast_batch(**params):
    """Broadcasts the batch axes of several parameters against each other.

    Each keyword is `name=(tensor, event_rank)`; the last `event_rank` axes
    are left alone. Returns the tensors in order. Done once at construction,
    so that the methods need no broadcasting logic of their own.
    """
    items = [(name, t, len(t.shape) - rank) for name, (t, rank) in params.items()]
    batch_shapes = [_shape(t)[:split] for _, t, split in items]
    if any(None in shape for shape in batch_shapes) and len(set(batch_shapes)) == 1:
        # The same static batch shape, unknown sizes at the same axes (the
        # batch of a traced call, as from one projection of the features):
        # left as they are, without the ops below in every training step.
        # Sampling takes the broadcast shape at run time (`_runtime_shape`).
        return [t for _, t, _ in items]
    if any(None in shape for shape in batch_shapes):
        # Unknown sizes (a symbolic batch axis on TensorFlow): let the ops
        # broadcast at run time, adding zeros of every parameter's batch shape.
        out = []
        for _, t, split in items:
            for _, other, other_split in items:
                zeros = ops.zeros_like(other[(Ellipsis,) + (0,) * (len(other.shape) - other_split)])
                for _ in range(len(t.shape) - split):
                    zeros = zeros[..., None]
                t = t + zeros
            out.append(t)
        return out
    try:
        batch = np.broadcast_shapes(*batch_shapes)
    except ValueError:
        name = items[-1][0]
        expected = "batch axes that broadcast against " + ", ".join(
            f"`{other}`'s {shape}"
            for (other, _, _), shape in zip(items[:-1], batch_shapes[:-1], strict=True)
        )
        raise _invalid_argument(
            name, expected, f"a tensor of shape {_shape(items[-1][1])}"
        ) from None
    out = []
    for _, t, split in items:
        target = batch + _shape(t)[split:]
        out.append(t if _shape(t) == target else ops.broadcast_to(t, target))
    return out


def _runtime_shape(tensor, *others):
    """`ops.shape(tensor)`, the batch and event shape of the samples to draw.
    Where a size is unknown, that of `tensor` broadcast against `others` (one
    operation, no gradient): `_broadcast_batch` leaves parameters of the same
    static shape as they are, and at run time one of them may still hold 1
    where another holds the batch."""
    if None not in _shape(tensor):
        return tuple(ops.shape(tensor))
    total = tensor
    for other in others:
        total = total + ops.zeros_like(other)
    return tuple(ops.shape(total))


def _shape(tensor):
    """The static shape as a tuple (ints, or None where unknown: TensorFlow's
    None, and JAX's symbolic dimensions while Keras infers output shapes)."""
    return tuple(n if isinstance(n, int) else None for n in tensor.shape)


def _check_rank(name, tensor, minimum, what):
    if len(tensor.shape) < minimum:
        raise _invalid_argument(name, what, f"a tensor of shape {_shape(tensor)}")


def _sample_shape(sample_shape):
    """`sample_shape` as a tuple of non-negative ints (an int is one axis)."""
    items = (sample_shape,) if isinstance(sample_shape, numbers.Integral) else sample_shape
    try:
        items = tuple(items)
    except TypeError:
        items = None
    if items is None or any(
        isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0 for n in items
    ):
        raise _invalid_argument(
            "sample_shape", "a non-negative integer or a tuple of them", repr(sample_shape)
        )
    return tuple(int(n) for n in items)


def _is_seed_integer(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def _check_seed(seed):
    if seed is None or isinstance(seed, keras.random.SeedGenerator):
        return seed
    if isinstance(seed, (tuple, list)) and len(seed) == 2 and all(map(_is_seed_integer, seed)):
        # TFP's stateless seed, a pair of integers: hashed into one (the same
        # pair gives the same draws here; not TFP's numbers).
        return int(np.random.SeedSequence([int(v) for v in seed]).generate_state(1)[0] >> 1)
    if not _is_seed_integer(seed):
        raise _invalid_argument(
            "seed",
            "None, a non-negative integer, a pair of them (TFP's stateless seeds) or a "
            "keras.random.SeedGenerator",
            repr(seed),
        )
    return int(seed)


def _seeds(seed, count):
    """`count` seeds for `count` independent draws from one `seed` argument.

    A `SeedGenerator` (or None, the global one) advances at each draw, so it
    serves every draw. An integer must not: the same integer gives the same
    random bits to each `keras.random` call, so the draws would be dependent
    (a mixture's component choice and its noise). Integers are spread by
    NumPy's `SeedSequence`, a hash of `(seed, i)`.
    """
    if not isinstance(seed, int):
        return [seed] * count
    return [int(np.random.SeedSequence([seed, i]).generate_state(1)[0] >> 1) for i in range(count)]


def _draw_categories(logits, sample_shape, seed):
    """Category indices (int32) drawn from `softmax(logits)` over the last
    axis, of shape `sample_shape + logits.shape[:-1]`."""
    num_categories = _shape(logits)[-1]
    count = math.prod(sample_shape)
    # keras.random.categorical takes 2-D logits (rows, K) and gives (rows, count).
    flat_logits = ops.reshape(logits, (-1, num_categories))
    index = keras.random.categorical(flat_logits, count, seed=seed, dtype="int32")
    return ops.reshape(ops.transpose(index), sample_shape + tuple(ops.shape(logits))[:-1])


def _log_abs_diagonal(matrix):
    """log|diagonal| of a batch of matrices, shape `(..., d)`."""
    return ops.log(ops.abs(ops.diagonal(matrix, axis1=-2, axis2=-1)))


def _solve_lower(tril, rhs):
    """`tril^-1 @ rhs` for lower-triangular `tril` `(..., d, d)` and `rhs`
    `(..., d, m)`, broadcasting the batch axes (`keras.ops.solve_triangular`
    refuses operands whose batch axes differ, on every backend)."""
    tril = tril + ops.zeros_like(rhs[..., :1, :1])
    rhs = rhs + ops.zeros_like(tril[..., :, :1])
    return ops.solve_triangular(tril, rhs, lower=True)


def _uniform_open(shape, dtype, seed):
    """Uniform draws in the open interval (0, 1): `log(u)` and `log1p(-u)` stay finite."""
    tiny = float(np.finfo(dtype).tiny)
    return keras.random.uniform(shape, minval=tiny, maxval=1.0, dtype=dtype, seed=seed)


def _lgamma(x):
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
    stirling = (z - 0.5) * ops.log(z) - z + _HALF_LOG_2PI + series
    return stirling - ops.where(small, ops.log(shift), ops.zeros_like(x))


_BETAINC_ITERATIONS = 200


def _betainc(a, b, x, one_minus_x):
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
    tiny = float(np.finfo(_dtype(x)).tiny) * 1e6

    def fix(v):
        return ops.where(ops.abs(v) < tiny, tiny, v)

    d = 1.0 / fix(1.0 - (a + b) * x / (a + 1.0))

    def step(m, state):
        c, d, h = state
        m = ops.cast(m + 1, _dtype(x))
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
        a * ops.log(x)
        + b * ops.log(one_minus)
        + _lgamma(a + b)
        - _lgamma(a)
        - _lgamma(b)
        - ops.log(a)
    )
    value = ops.exp(log_front) * fraction
    return ops.where(flip, 1.0 - value, value)


_BISECTION_ITERATIONS = 64


def _bisect(cdf, p, low, high):
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


# ---------------------------------------------------------------------------
# Distributions.


def _erfc_rational(x):
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
_erfc = getattr(ops, "erfc", _erfc_rational)


class Distribution:
    """Base class: a batch of probability distributions.

    A distribution has a `batch_shape` (independent distributions with
    different parameters) and an `event_shape` (the shape of one draw).
    `sample(sample_shape)` returns `sample_shape + batch_shape + event_shape`;
    `log_prob(x)` sums over the event axes and returns the broadcast of
    `x.shape[:-len(event_shape)]` against `batch_shape`.

    Subclasses implement `_sample(sample_shape, seed)` and whichever of
    `log_prob`, `mean`, `stddev`, `entropy`, `cdf`, `quantile` they can; the
    others raise `NotImplementedError` (`variance` is `stddev()**2` unless
    overridden). `reparameterized` (a class attribute) says whether
    gradients flow from samples back to the parameters.
    """

    reparameterized = False
    # `(sample, noise)` of the last reparameterised draw, where a subclass
    # keeps it (`Normal`, `MultivariateNormalTriL`): `log_prob` of that very
    # tensor reads the noise back (`_own_noise`) instead of recomputing it,
    # as TFP's bijector cache does.
    _last_draw = None

    def _own_noise(self, x):
        """The noise `x` was drawn from, if `x` is the tensor `_sample` last
        returned; else None."""
        if self._last_draw is not None and x is self._last_draw[0]:
            return self._last_draw[1]
        return None

    def sample(
        self,
        sample_shape: int | tuple[int, ...] = (),
        seed: int | keras.random.SeedGenerator | None = None,
    ):
        """Draws samples of shape `sample_shape + batch_shape + event_shape`.

        Args:
            sample_shape: an int or a tuple of ints, the leading axes of the
                result.
            seed: a `keras.random.SeedGenerator` (new draws at each call),
                an integer (the same draws at each call) or None (Keras's
                global generator, which Keras refuses inside a compiled JAX
                function: there, pass a generator held by the layer).

        Returns:
            A tensor of dtype `self.dtype`.
        """
        return self._sample(_sample_shape(sample_shape), _check_seed(seed))

    def _sample(self, sample_shape, seed):
        raise NotImplementedError(f"{type(self).__name__} does not implement `sample`.")

    def log_prob(self, x):
        """The log-density (or log-mass) of `x`, summed over the event axes."""
        raise NotImplementedError(f"{type(self).__name__} does not implement `log_prob`.")

    def mean(self):
        """The mean, of shape `batch_shape + event_shape`."""
        raise NotImplementedError(f"{type(self).__name__} does not implement `mean`.")

    def stddev(self):
        """The standard deviation of each coordinate, `batch_shape + event_shape`."""
        raise NotImplementedError(f"{type(self).__name__} does not implement `stddev`.")

    def variance(self):
        """The variance of each coordinate, `batch_shape + event_shape`."""
        return ops.square(self.stddev())

    def entropy(self):
        """The differential (or Shannon) entropy in nats, of shape `batch_shape`."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form entropy.")

    def cdf(self, x):
        """The cumulative distribution function `P(X <= x)` (scalar events;
        per coordinate for `Independent`)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement `cdf`.")

    def quantile(self, p):
        """The inverse of `cdf`: the `x` with `cdf(x) = p`, for `p` in (0, 1)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement `quantile`.")

    @property
    def batch_shape(self) -> tuple:
        """The shape of the batch of distributions, a tuple."""
        raise NotImplementedError

    @property
    def event_shape(self) -> tuple:
        """The shape of one draw, a tuple."""
        raise NotImplementedError

    @property
    def dtype(self) -> str:
        """The dtype of samples and densities, `"float32"` or `"float64"`."""
        raise NotImplementedError

    def __repr__(self):
        return (
            f"<{type(self).__name__} batch_shape={self.batch_shape} "
            f"event_shape={self.event_shape} dtype={self.dtype}>"
        )


class Normal(Distribution):
    """Elementwise normal distributions, `N(loc, scale**2)`; event shape `()`.

    Formula:

    ```python
    log_prob(x) = -0.5 * ((x - loc) / scale)**2 - log(scale) - 0.5 * log(2 * pi)
    entropy() = 0.5 + 0.5 * log(2 * pi) + log(scale)
    cdf(x) = 0.5 * erfc(-(x - loc) / (scale * sqrt(2)))
    quantile(p) = loc + scale * sqrt(2) * erfinv(2 * p - 1)
    sample() = loc + scale * eps,  eps ~ N(0, 1)   # reparameterised
    ```

    In float32, `2 * p - 1` rounds for `p` within ~1e-7 of 0 or 1, so
    quantiles of such extreme `p` lose accuracy (TFP's `ndtri` does better).

    Args:
        loc: the mean, a tensor broadcastable against `scale`.
        scale: the standard deviation, positive.

    Example:

    >>> d = Normal(loc=0.0, scale=2.0)
    >>> round(float(d.log_prob(0.0)), 4)  # -log(2) - 0.5 * log(2 * pi)
    -1.6121
    >>> tuple(Normal([0.0, 1.0], 1.0).sample(5, seed=1).shape)
    (5, 2)
    """

    reparameterized = True

    def __init__(self, loc, scale):
        # Given as constants 0 and 1 (the default prior): `log_prob` then
        # skips the shift and scaling of its argument.
        self._standard = _is_constant(loc, 0.0) and _is_constant(scale, 1.0)
        loc, scale = _as_float(loc=loc, scale=scale)
        self._loc, self._scale = _broadcast_batch(loc=(loc, 0), scale=(scale, 0))

    @property
    def loc(self):
        return self._loc

    @property
    def scale(self):
        return self._scale

    def _standardized(self, x):
        """`(x - loc) / scale`. For the tensor `_sample` last returned, the
        noise it was made from: the same value, and the same gradient (the
        total derivative of `(loc + scale * eps - loc) / scale` is zero),
        without two operations on every sample."""
        noise = self._own_noise(x)
        if noise is not None:
            return noise
        x = _cast(x, self.dtype)
        return x if self._standard else (x - self._loc) / self._scale

    def _log_scale(self):
        return ops.zeros_like(self._scale) if self._standard else ops.log(self._scale)

    @property
    def batch_shape(self) -> tuple:
        return _shape(self._loc)

    @property
    def event_shape(self) -> tuple:
        return ()

    @property
    def dtype(self) -> str:
        return _dtype(self._loc)

    def _sample(self, sample_shape, seed):
        shape = sample_shape + _runtime_shape(self._loc, self._scale)
        eps = _backend.standard_normal(shape, self.dtype, seed)
        sample = self._loc + self._scale * eps
        self._last_draw = (sample, eps)
        return sample

    def log_prob(self, x):
        z = self._standardized(x)
        # The constant terms on the parameters' shape, not the samples'.
        return -0.5 * ops.square(z) - (self._log_scale() + _HALF_LOG_2PI)

    def mean(self):
        return self._loc

    def stddev(self):
        return self._scale

    def entropy(self):
        return 0.5 + _HALF_LOG_2PI + ops.log(self._scale)

    def cdf(self, x):
        z = (_cast(x, self.dtype) - self._loc) / self._scale
        return 0.5 * _erfc(-z * math.sqrt(0.5))

    def quantile(self, p):
        p = _cast(p, self.dtype)
        return self._loc + self._scale * math.sqrt(2.0) * ops.erfinv(2.0 * p - 1.0)


class MultivariateNormalDiag(Distribution):
    """Gaussians with diagonal covariance, `N(loc, diag(scale_diag**2))`.

    Event shape `(d,)`: `log_prob` and `entropy` sum the `Normal` terms over
    the last axis. Sampling is reparameterised.

    Args:
        loc: the mean, shape `(..., d)`.
        scale_diag: the standard deviations, positive, broadcastable
            against `loc`, at least 1-D.

    Example:

    >>> d = MultivariateNormalDiag(loc=[0.0, 0.0], scale_diag=[1.0, 2.0])
    >>> round(float(d.entropy()), 4)  # 2 * (0.5 + 0.5 * log(2 * pi)) + log(2)
    3.531
    >>> tuple(d.sample((4, 3), seed=1).shape)
    (4, 3, 2)
    """

    reparameterized = True

    def __init__(self, loc, scale_diag):
        standard = _is_constant(loc, 0.0) and _is_constant(scale_diag, 1.0)
        loc, scale_diag = _as_float(loc=loc, scale_diag=scale_diag)
        _check_rank("loc", loc, 1, "a tensor of rank >= 1, shape (..., d)")
        _check_rank("scale_diag", scale_diag, 1, "a tensor of rank >= 1, shape (..., d)")
        # The event axis broadcasts too (a scalar scale for every coordinate).
        self._marginals = Normal(*_broadcast_batch(loc=(loc, 0), scale_diag=(scale_diag, 0)))
        self._marginals._standard = standard

    @property
    def loc(self):
        return self._marginals.loc

    @property
    def scale_diag(self):
        return self._marginals.scale

    @property
    def batch_shape(self) -> tuple:
        return self._marginals.batch_shape[:-1]

    @property
    def event_shape(self) -> tuple:
        return self._marginals.batch_shape[-1:]

    @property
    def dtype(self) -> str:
        return self._marginals.dtype

    def _sample(self, sample_shape, seed):
        return self._marginals._sample(sample_shape, seed)

    def log_prob(self, x):
        # The marginals' log-densities summed, with the sum taken before the
        # constant terms are added: on the parameters' shape, not on that of
        # many samples (the Monte Carlo KL's cost, benchmarks/kl_cost.py).
        z = self._marginals._standardized(x)
        constant = ops.sum(self._marginals._log_scale() + _HALF_LOG_2PI, axis=-1)
        return -0.5 * ops.sum(ops.square(z), axis=-1) - constant

    def mean(self):
        return self._marginals.mean()

    def stddev(self):
        return self._marginals.stddev()

    def covariance(self):
        """The (diagonal) covariance matrix, `batch_shape + (d, d)`."""
        variance = self.variance()
        return variance[..., None] * ops.eye(_shape(variance)[-1], dtype=self.dtype)

    def entropy(self):
        return ops.sum(self._marginals.entropy(), axis=-1)


class MultivariateNormalTriL(Distribution):
    """Gaussians `N(loc, scale_tril @ scale_tril.T)` with a lower-triangular scale.

    Only the lower triangle of `scale_tril` is read (as in TFP); its diagonal
    must be non-zero (the sign does not matter: `L` and `L` with a column
    negated give the same covariance). Event shape `(d,)`.

    Formula:

    ```python
    z = solve_triangular(scale_tril, x - loc, lower=True)
    log_prob(x) = -0.5 * sum(z**2) - sum(log(abs(diag(scale_tril)))) - 0.5 * d * log(2 * pi)
    entropy() = 0.5 * d * (1 + log(2 * pi)) + sum(log(abs(diag(scale_tril))))
    sample() = loc + scale_tril @ eps,  eps ~ N(0, I)   # reparameterised
    ```

    Args:
        loc: the mean, shape `(..., d)`.
        scale_tril: the Cholesky factor of the covariance, shape `(..., d, d)`.

    Example:

    >>> d = MultivariateNormalTriL(loc=[0.0, 0.0], scale_tril=[[1.0, 0.0], [1.0, 1.0]])
    >>> [round(float(s), 4) for s in d.stddev()]  # sqrt of diag(L @ L.T) = [1, 2]
    [1.0, 1.4142]
    >>> round(float(d.log_prob([0.0, 0.0])), 4)  # -log(2 * pi), det(L) = 1
    -1.8379
    """

    reparameterized = True

    def __init__(self, loc, scale_tril):
        loc, scale_tril = _as_float(loc=loc, scale_tril=scale_tril)
        _check_rank("loc", loc, 1, "a tensor of rank >= 1, shape (..., d)")
        expected = f"a tensor of shape (..., d, d) with d = {_shape(loc)[-1]} (from `loc`)"
        _check_rank("scale_tril", scale_tril, 2, expected)
        sizes = {_shape(loc)[-1], *_shape(scale_tril)[-2:]} - {None}
        if len(sizes) > 1:
            raise _invalid_argument(
                "scale_tril", expected, f"a tensor of shape {_shape(scale_tril)}"
            )
        self._loc, self._scale_tril = _broadcast_batch(
            loc=(loc, 1), scale_tril=(ops.tril(scale_tril), 2)
        )

    @property
    def loc(self):
        return self._loc

    @property
    def scale_tril(self):
        return self._scale_tril

    @property
    def batch_shape(self) -> tuple:
        return _shape(self._loc)[:-1]

    @property
    def event_shape(self) -> tuple:
        return _shape(self._loc)[-1:]

    @property
    def dtype(self) -> str:
        return _dtype(self._loc)

    def _sample(self, sample_shape, seed):
        shape = sample_shape + _runtime_shape(self._loc, self._scale_tril[..., 0])
        eps = _backend.standard_normal(shape, self.dtype, seed)
        sample = self._loc + ops.squeeze(ops.matmul(self._scale_tril, eps[..., None]), axis=-1)
        self._last_draw = (sample, eps)
        return sample

    def log_prob(self, x):
        # Of its own sample, the noise it was drawn from, not a triangular
        # solve, which loses every digit in float32 once the off-diagonal
        # entries of a large scale outgrow its diagonal (a Monte Carlo KL of
        # 102 weights then read -1e33 and training diverged). Same value and
        # gradient, as for `Normal`.
        z = self._own_noise(x)
        if z is None:
            diff = _cast(x, self.dtype) - self._loc
            z = _solve_lower(self._scale_tril, diff[..., None])[..., 0]
        d = self.event_shape[0]
        log_det = ops.sum(_log_abs_diagonal(self._scale_tril), axis=-1)
        return -0.5 * ops.sum(ops.square(z), axis=-1) - log_det - d * _HALF_LOG_2PI

    def mean(self):
        return self._loc

    def stddev(self):
        # Var(x_i) = (L @ L.T)_ii = sum_j L_ij**2.
        return ops.sqrt(self.variance())

    def variance(self):
        return ops.sum(ops.square(self._scale_tril), axis=-1)

    def covariance(self):
        """The covariance matrix `L @ L.T`, `batch_shape + (d, d)`."""
        return ops.matmul(self._scale_tril, ops.swapaxes(self._scale_tril, -1, -2))

    def entropy(self):
        d = self.event_shape[0]
        log_det = ops.sum(_log_abs_diagonal(self._scale_tril), axis=-1)
        return d * (0.5 + _HALF_LOG_2PI) + log_det


class MixtureSameFamily(Distribution):
    """A mixture of `K` distributions of one family, with weights `softmax(logits)`.

    The components are one distribution with batch shape `batch_shape + (K,)`
    (e.g. `MultivariateNormalDiag` with `loc` of shape `(..., K, d)`); the
    mixture has batch shape `batch_shape` and the components' event shape.

    Formula:

    ```python
    log_prob(x) = logsumexp(log_softmax(mixture_logits) + components.log_prob(x[..., None, :]))
    mean() = sum(w * mu_k),  w = softmax(mixture_logits)
    variance() = sum(w * (sigma_k**2 + (mu_k - mean())**2))   # law of total variance
    cdf(x) = sum(w * cdf_k(x))   # per coordinate
    ```

    `quantile(p)` inverts `cdf` by bisection between the smallest and the
    largest component quantile at `p` (the mixture's lies between them),
    so it needs components with `cdf` and `quantile` (`Normal`, `Logistic`,
    or `Independent` of them, whose coordinates are then treated marginally).

    Sampling draws a component index with `keras.random.categorical`, then a
    sample of that component. It is not reparameterisable through the
    component choice: gradients reach the chosen component's parameters but
    not `mixture_logits`. A Monte Carlo KL against a mixture prior (the use
    here) samples the posterior, not the mixture, so this does not bite.
    `entropy()` has no closed form and raises `NotImplementedError`.

    Args:
        mixture_logits: unnormalised log-weights, shape `batch_shape + (K,)`.
        components: a `Distribution` with batch shape `batch_shape + (K,)`.

    Example:

    >>> components = MultivariateNormalDiag(loc=[[-1.0], [1.0]], scale_diag=[[1.0], [1.0]])
    >>> d = MixtureSameFamily(mixture_logits=[0.0, 0.0], components=components)
    >>> [round(float(v), 4) for v in (d.mean()[0], d.stddev()[0])]  # 0, sqrt(1 + 1)
    [0.0, 1.4142]
    """

    reparameterized = False

    def __init__(self, mixture_logits, components):
        if not isinstance(components, Distribution):
            raise _invalid_argument(
                "components", "a keras_elbo.distributions.Distribution", repr(components)
            )
        logits = _cast(mixture_logits, components.dtype)
        target = components.batch_shape
        expected = (
            "a tensor of shape (K,) or batch_shape + (K,), broadcastable to the "
            f"components' batch shape {target} = batch_shape + (K,)"
        )
        _check_rank("mixture_logits", logits, 1, expected)
        if not target:
            raise _invalid_argument(
                "mixture_logits", expected, f"a tensor of shape {_shape(logits)}"
            )
        if None not in target + _shape(logits):
            # Logits shared by a batch of mixtures broadcast up to it; the
            # reverse (components shared by a batch of logits) would give
            # the batch the same component draws, so it is refused.
            try:
                broadcastable = np.broadcast_shapes(_shape(logits), target) == target
            except ValueError:
                broadcastable = False
            if not broadcastable:
                raise _invalid_argument(
                    "mixture_logits", expected, f"a tensor of shape {_shape(logits)}"
                )
            if _shape(logits) != target:
                logits = ops.broadcast_to(logits, target)
        self._logits = logits
        self._components = components

    @property
    def mixture_logits(self):
        return self._logits

    @property
    def components(self):
        return self._components

    @property
    def mixture_distribution(self):
        """TFP's name: the `Categorical` over the components."""
        return Categorical(self._logits)

    @property
    def components_distribution(self):
        """TFP's name for `components`."""
        return self._components

    @property
    def num_components(self):
        return _shape(self._logits)[-1]

    @property
    def batch_shape(self) -> tuple:
        return _shape(self._logits)[:-1]

    @property
    def event_shape(self) -> tuple:
        return self._components.event_shape

    @property
    def dtype(self) -> str:
        return self._components.dtype

    def _expand_weights(self, weights):
        """`batch_shape + (K,)` -> `batch_shape + (K,) + (1,) * event rank`."""
        for _ in self.event_shape:
            weights = weights[..., None]
        return weights

    def _sample(self, sample_shape, seed):
        choice_seed, component_seed = _seeds(seed, 2)
        num_components = self.num_components
        index = _draw_categories(self._logits, sample_shape, choice_seed)
        # Draw every component and keep the chosen one: K times the noise of
        # one draw, but one `keras.random` call and no gather.
        draws = self._components._sample(sample_shape, component_seed)
        one_hot = self._expand_weights(ops.one_hot(index, num_components, dtype=self.dtype))
        return ops.sum(one_hot * draws, axis=-1 - len(self.event_shape))

    def log_prob(self, x):
        x = _cast(x, self.dtype)
        # Insert the component axis before the event axes.
        x = ops.expand_dims(x, axis=-1 - len(self.event_shape))
        log_weights = ops.log_softmax(self._logits, axis=-1)
        return ops.logsumexp(log_weights + self._components.log_prob(x), axis=-1)

    def mean(self):
        weights = self._expand_weights(ops.softmax(self._logits, axis=-1))
        return ops.sum(weights * self._components.mean(), axis=-1 - len(self.event_shape))

    def variance(self):
        weights = self._expand_weights(ops.softmax(self._logits, axis=-1))
        axis = -1 - len(self.event_shape)
        means = self._components.mean()
        mean = ops.sum(weights * means, axis=axis)
        # The law of total variance with the spread of the means written as
        # squared deviations: no cancellation when the components coincide.
        spread = ops.square(means - ops.expand_dims(mean, axis))
        return ops.sum(weights * (self._components.variance() + spread), axis=axis)

    def stddev(self):
        return ops.sqrt(self.variance())

    def cdf(self, x):
        x = ops.expand_dims(_cast(x, self.dtype), axis=-1 - len(self.event_shape))
        weights = self._expand_weights(ops.softmax(self._logits, axis=-1))
        return ops.sum(weights * self._components.cdf(x), axis=-1 - len(self.event_shape))

    def quantile(self, p):
        axis = -1 - len(self.event_shape)
        # p broadcast to batch_shape + event_shape (or wider), then given a component axis.
        p = _cast(p, self.dtype) + ops.zeros_like(self.mean())
        component_quantiles = self._components.quantile(ops.expand_dims(p, axis))
        low = ops.min(component_quantiles, axis=axis)
        high = ops.max(component_quantiles, axis=axis)
        return _bisect(self.cdf, p, low, high)


class Bernoulli(Distribution):
    """Elementwise Bernoulli distributions, `P(x = 1) = sigmoid(logits)`.

    Event shape `()`. `log_prob` also takes `x` in `[0, 1]` (then it is minus
    the binary cross-entropy, as for a grey-level image). Samples are 0.0 and
    1.0 in `self.dtype`, not reparameterised.

    Formula:

    ```python
    log_prob(x) = x * logits - softplus(logits)
    entropy() = softplus(logits) - logits * sigmoid(logits)
    ```

    Args:
        logits: log-odds of a 1.

    Example:

    >>> d = Bernoulli(logits=0.0)
    >>> round(float(d.log_prob(1.0)), 4), round(float(d.mean()), 4)  # log(0.5), 0.5
    (-0.6931, 0.5)
    """

    reparameterized = False

    def __init__(self, logits):
        (self._logits,) = _as_float(logits=logits)

    @property
    def logits(self):
        return self._logits

    @property
    def batch_shape(self) -> tuple:
        return _shape(self._logits)

    @property
    def event_shape(self) -> tuple:
        return ()

    @property
    def dtype(self) -> str:
        return _dtype(self._logits)

    def _sample(self, sample_shape, seed):
        shape = sample_shape + tuple(ops.shape(self._logits))
        uniform = keras.random.uniform(shape, dtype=self.dtype, seed=seed)
        return ops.cast(ops.less(uniform, ops.sigmoid(self._logits)), self.dtype)

    def log_prob(self, x):
        return _cast(x, self.dtype) * self._logits - ops.softplus(self._logits)

    def mean(self):
        return ops.sigmoid(self._logits)

    def stddev(self):
        return ops.sqrt(ops.sigmoid(self._logits) * ops.sigmoid(-self._logits))

    def entropy(self):
        return ops.softplus(self._logits) - self._logits * ops.sigmoid(self._logits)


class Logistic(Distribution):
    """Elementwise logistic distributions with location `loc` and scale `scale`.

    Event shape `()`. A heavier-tailed alternative to `Normal` whose CDF is a
    sigmoid, so `cdf` and `quantile` are exact closed forms.

    Formula:

    ```python
    z = (x - loc) / scale
    log_prob(x) = -z - 2 * softplus(-z) - log(scale)
    cdf(x) = sigmoid(z)
    quantile(p) = loc + scale * (log(p) - log1p(-p))
    mean() = loc,  stddev() = scale * pi / sqrt(3)
    entropy() = log(scale) + 2
    sample() = quantile(u),  u ~ U(0, 1)   # reparameterised
    ```

    Args:
        loc: the location (mean, median), a tensor broadcastable against `scale`.
        scale: the scale, positive.

    Example:

    >>> d = Logistic(loc=0.0, scale=1.0)
    >>> round(float(d.log_prob(0.0)), 4), round(float(d.quantile(0.75)), 4)  # -log(4), log(3)
    (-1.3863, 1.0986)
    """

    reparameterized = True

    def __init__(self, loc, scale):
        loc, scale = _as_float(loc=loc, scale=scale)
        self._loc, self._scale = _broadcast_batch(loc=(loc, 0), scale=(scale, 0))

    @property
    def loc(self):
        return self._loc

    @property
    def scale(self):
        return self._scale

    @property
    def batch_shape(self) -> tuple:
        return _shape(self._loc)

    @property
    def event_shape(self) -> tuple:
        return ()

    @property
    def dtype(self) -> str:
        return _dtype(self._loc)

    def _sample(self, sample_shape, seed):
        u = _uniform_open(sample_shape + _runtime_shape(self._loc, self._scale), self.dtype, seed)
        return self._loc + self._scale * (ops.log(u) - ops.log1p(-u))

    def log_prob(self, x):
        z = (_cast(x, self.dtype) - self._loc) / self._scale
        return -z - 2.0 * ops.softplus(-z) - ops.log(self._scale)

    def mean(self):
        return self._loc

    def stddev(self):
        return self._scale * (math.pi / math.sqrt(3.0))

    def entropy(self):
        return ops.log(self._scale) + 2.0

    def cdf(self, x):
        return ops.sigmoid((_cast(x, self.dtype) - self._loc) / self._scale)

    def quantile(self, p):
        p = _cast(p, self.dtype)
        return self._loc + self._scale * (ops.log(p) - ops.log1p(-p))


_T_QUANTILE_STEPS = 12
_T_QUANTILE_MAX_STEP = 2.0


@_backend.compiled
def _student_t_tail_quantile(q, df):
    """The `s >= 0` with `G(s) = q` for the standard t's lower tail
    `G(s) = cdf(-s)`, `q <= 1/2` (see `StudentT.quantile`)."""
    tiny = float(np.finfo(_dtype(q)).tiny)
    log_q = ops.log(ops.maximum(q, tiny))
    # Normal quantile of the lower tail, then Cornish-Fisher in 1 / df.
    z = -math.sqrt(2.0) * ops.erfinv(2.0 * ops.minimum(q, 0.5) - 1.0)  # >= 0
    z2 = ops.square(z)
    cornish_fisher = (
        z
        + z * (z2 + 1.0) / (4.0 * df)
        + z * ((5.0 * z2 + 16.0) * z2 + 3.0) / (96.0 * ops.square(df))
    )
    # G(s) ~ c * df**((df - 1) / 2) * s**-df as s grows, with
    # c = Gamma((df + 1) / 2) / (sqrt(pi) * Gamma(df / 2)).
    log_c = _lgamma(0.5 * (df + 1.0)) - _lgamma(0.5 * df) - 0.5 * math.log(math.pi)
    tail = ops.exp((log_c + 0.5 * (df - 1.0) * ops.log(df) - log_q) / df)
    w = ops.log(ops.maximum(ops.maximum(cornish_fisher, tail), 1e-6))
    log_pdf_const = log_c - 0.5 * ops.log(df)

    def step(_, w):
        s = ops.exp(w)
        s2 = ops.square(s)
        g = 0.5 * _betainc(0.5 * df, 0.5 + ops.zeros_like(s), df / (df + s2), s2 / (df + s2))
        log_g = ops.log(ops.maximum(g, tiny))
        log_pdf = log_pdf_const - 0.5 * (df + 1.0) * ops.log1p(s2 / df)
        # d log G / dw = -s * pdf(s) / G(s).
        slope = -ops.exp(w + log_pdf - log_g)
        delta = (log_g - log_q) / ops.minimum(slope, -1e-12)
        return w - ops.clip(delta, -_T_QUANTILE_MAX_STEP, _T_QUANTILE_MAX_STEP)

    return ops.exp(ops.fori_loop(0, _T_QUANTILE_STEPS, step, w))


class StudentT(Distribution):
    """Elementwise Student's t distributions with `df` degrees of freedom.

    Event shape `()`. As in TFP (`allow_nan_stats=True`), `mean()` is NaN for
    `df <= 1` and `variance()` is infinite for `1 < df <= 2`, NaN for
    `df <= 1`.

    Formula:

    ```python
    z = (x - loc) / scale
    log_prob(x) = (lgamma((df + 1) / 2) - lgamma(df / 2) - 0.5 * log(df * pi)
                   - log(scale) - 0.5 * (df + 1) * log1p(z**2 / df))
    variance() = scale**2 * df / (df - 2)   # df > 2
    cdf(x) = 1 - 0.5 * betainc(df / 2, 1 / 2, df / (df + z**2))   # z >= 0; symmetric
    sample() = loc + scale * eps / sqrt(g / (df / 2)),  eps ~ N(0, 1),  g ~ Gamma(df / 2)
    ```

    `cdf` evaluates the regularised incomplete beta function by a continued
    fraction with a fixed number of iterations (`keras.ops` has none). Its
    absolute error is ~3e-6 for `df <= 30` and grows with `df` (~2e-5 at
    `df = 200`: float32 round-off of the `lgamma` terms of its prefactor);
    checked against `scipy.stats.t` for `df` in [0.5, 200]. For large `df`,
    a `Normal` is within ~1 / df of it anyway. `quantile` inverts `cdf` by
    Newton's method on the log of the tail (twelve `cdf` evaluations).
    Sampling is reparameterised in `loc` and
    `scale`, not in `df` (`keras.random.gamma` has no gradient on every
    backend), so `reparameterized` is False. `entropy` is not implemented
    (it needs the digamma function).

    Args:
        df: degrees of freedom, positive.
        loc: the location (the mean when `df > 1`).
        scale: the scale, positive.

    Example:

    >>> d = StudentT(df=1.0, loc=0.0, scale=1.0)  # the Cauchy distribution
    >>> round(float(d.log_prob(0.0)), 4), round(float(d.cdf(1.0)), 4)  # -log(pi), 0.75
    (-1.1447, 0.75)
    """

    reparameterized = False

    def __init__(self, df, loc, scale):
        df, loc, scale = _as_float(df=df, loc=loc, scale=scale)
        self._df, self._loc, self._scale = _broadcast_batch(
            df=(df, 0), loc=(loc, 0), scale=(scale, 0)
        )

    @property
    def df(self):
        return self._df

    @property
    def loc(self):
        return self._loc

    @property
    def scale(self):
        return self._scale

    @property
    def batch_shape(self) -> tuple:
        return _shape(self._loc)

    @property
    def event_shape(self) -> tuple:
        return ()

    @property
    def dtype(self) -> str:
        return _dtype(self._loc)

    def _sample(self, sample_shape, seed):
        normal_seed, gamma_seed = _seeds(seed, 2)
        shape = sample_shape + _runtime_shape(self._loc, self._scale, self._df)
        eps = _backend.standard_normal(shape, self.dtype, normal_seed)
        half_df = 0.5 * self._df
        alpha = ops.broadcast_to(half_df, shape)
        gamma = keras.random.gamma(shape, alpha, dtype=self.dtype, seed=gamma_seed)
        return self._loc + self._scale * eps * ops.sqrt(half_df / gamma)

    def log_prob(self, x):
        z = (_cast(x, self.dtype) - self._loc) / self._scale
        df = self._df
        return (
            _lgamma(0.5 * (df + 1.0))
            - _lgamma(0.5 * df)
            - 0.5 * ops.log(df * math.pi)
            - ops.log(self._scale)
            - 0.5 * (df + 1.0) * ops.log1p(ops.square(z) / df)
        )

    def mean(self):
        return ops.where(self._df > 1.0, self._loc, math.nan)

    def variance(self):
        df = self._df
        finite = ops.square(self._scale) * df / ops.where(df > 2.0, df - 2.0, 1.0)
        return ops.where(df > 2.0, finite, ops.where(df > 1.0, math.inf, math.nan))

    def stddev(self):
        return ops.sqrt(self.variance())

    def cdf(self, x):
        z = (_cast(x, self.dtype) - self._loc) / self._scale
        z2 = ops.square(z)
        df = self._df + ops.zeros_like(z)
        # x = df / (df + z**2) and 1 - x = z**2 / (df + z**2), both without cancellation.
        tail = 0.5 * _betainc(0.5 * df, 0.5 + ops.zeros_like(z), df / (df + z2), z2 / (df + z2))
        return ops.where(z < 0, tail, 1.0 - tail)

    def quantile(self, p):
        """The `x` with `cdf(x) = p`: Newton's method on the log of the tail.

        By symmetry it solves `G(s) = q` for the lower tail `G(s) = cdf(-s)`
        (standardised, `q = min(p, 1 - p)`), in `w = log(s)`, where the tail
        is nearly linear (`log G ~ -df * w` far out), from the larger of two
        starts: the Cornish-Fisher expansion of the normal quantile (good for
        large `df`, Abramowitz & Stegun 26.7.5) and the tail's power law
        (good for small `df`). `_T_QUANTILE_STEPS` steps, each of at most
        `_T_QUANTILE_MAX_STEP` in `w`; then `loc + scale * (+/- s)`.
        """
        p = _cast(p, self.dtype) + ops.zeros_like(self._loc)
        df = self._df + ops.zeros_like(p)
        q = ops.minimum(p, 1.0 - p)
        s = _student_t_tail_quantile(q, df)
        s = ops.where(q >= 0.5, ops.zeros_like(s), s)
        return self._loc + self._scale * ops.where(p < 0.5, -s, s)


_POISSON_INVERSION_TERMS = 40
_POISSON_SWITCH_RATE = 10.0
_POISSON_ATTEMPTS = 12


class Poisson(Distribution):
    """Elementwise Poisson distributions of counts with rate `exp(log_rate)`.

    Event shape `()`. `log_prob` is `-inf` at a negative `x`; at a fractional
    `x >= 0` it is the same formula, as in TFP (`lgamma(x + 1)` for `log(x!)`).
    Samples are counts as floats of `self.dtype`, not reparameterised.

    Formula:

    ```python
    log_prob(x) = x * log_rate - exp(log_rate) - lgamma(x + 1)
    mean() = variance() = exp(log_rate)
    ```

    Sampling (`keras.random` has no Poisson sampler), vectorised with fixed
    work so that it compiles: for `rate < 10`, inversion of the CDF summed
    over the counts 0..39 (`P(X >= 40) < 1e-12` there); for `rate >= 10`,
    Hoermann's transformed rejection (PTRS), 12 proposals in parallel, the
    first accepted kept (each is accepted with probability > 0.85, so all 12
    fail with probability < 1e-9; the last proposal is then kept). Exact up to
    these probabilities and float32 round-off, for rates up to ~1e7.

    Args:
        log_rate: the log of the rate (mean), any real tensor.

    Example:

    >>> d = Poisson(log_rate=0.0)
    >>> round(float(d.log_prob(2.0)), 4)  # log(exp(-1) / 2!)
    -1.6931
    """

    reparameterized = False

    def __init__(self, log_rate):
        (self._log_rate,) = _as_float(log_rate=log_rate)

    @property
    def log_rate(self):
        return self._log_rate

    @property
    def rate(self):
        return ops.exp(self._log_rate)

    @property
    def batch_shape(self) -> tuple:
        return _shape(self._log_rate)

    @property
    def event_shape(self) -> tuple:
        return ()

    @property
    def dtype(self) -> str:
        return _dtype(self._log_rate)

    def log_prob(self, x):
        # As TFP's Poisson: a fractional count is scored by the same formula
        # (lgamma(x + 1) for log(x!)); a negative one is outside the support.
        # (A NaN count stays NaN.)
        x = _cast(x, self.dtype)
        negative = x < 0
        safe = ops.where(negative, 0.0, x)
        value = safe * self._log_rate - ops.exp(self._log_rate) - _lgamma(safe + 1.0)
        return ops.where(negative, -math.inf, value)

    def mean(self):
        return self.rate

    def variance(self):
        return self.rate

    def stddev(self):
        return ops.exp(0.5 * self._log_rate)

    def _sample(self, sample_shape, seed):
        inversion_seed, rejection_seed = _seeds(seed, 2)
        shape = sample_shape + tuple(ops.shape(self._log_rate))
        log_rate = ops.broadcast_to(self._log_rate, shape)
        rate = ops.exp(log_rate)
        small = rate < _POISSON_SWITCH_RATE
        # Inversion: the count is the number of k with P(X <= k) < u.
        counts = ops.arange(_POISSON_INVERSION_TERMS, dtype=self.dtype)
        small_log_rate = ops.where(small, log_rate, 0.0)[..., None]
        log_pmf = counts * small_log_rate - ops.exp(small_log_rate) - _lgamma(counts + 1.0)
        u = _uniform_open(shape, self.dtype, inversion_seed)[..., None]
        by_inversion = ops.sum(ops.cast(ops.cumsum(ops.exp(log_pmf), axis=-1) < u, self.dtype), -1)
        by_rejection = self._transformed_rejection(
            ops.where(small, _POISSON_SWITCH_RATE, rate), shape, rejection_seed
        )
        return ops.where(small, by_inversion, by_rejection)

    def _transformed_rejection(self, rate, shape, seed):
        """PTRS (Hoermann, 1993, "The transformed rejection method for
        generating Poisson random variables"), for `rate >= 10`."""
        draws = keras.random.uniform((2, _POISSON_ATTEMPTS) + shape, dtype=self.dtype, seed=seed)
        u, v = draws[0] - 0.5, draws[1]
        rate = rate[None]
        log_rate = ops.log(rate)
        b = 0.931 + 2.53 * ops.sqrt(rate)
        a = -0.059 + 0.02483 * b
        inverse_alpha = 1.1239 + 1.1328 / (b - 3.4)
        v_r = 0.9277 - 3.6224 / (b - 2.0)
        us = 0.5 - ops.abs(u)
        k = ops.floor((2.0 * a / us + b) * u + rate + 0.43)
        quick = ops.logical_and(us >= 0.07, v <= v_r)
        safe_k = ops.maximum(k, 0.0)
        log_accept = ops.log(v * inverse_alpha / (a / ops.square(us) + b))
        accept_ratio = log_accept <= -rate + safe_k * log_rate - _lgamma(safe_k + 1.0)
        reject = ops.logical_or(k < 0, ops.logical_and(us < 0.013, v > us))
        accepted = ops.logical_or(quick, ops.logical_and(ops.logical_not(reject), accept_ratio))
        # The first accepted proposal, the last one if none is. (Any rule that
        # looks only at which proposals were accepted keeps the draw exact:
        # given that pattern, the accepted values are i.i.d. Poisson.)
        last = np.arange(_POISSON_ATTEMPTS) == _POISSON_ATTEMPTS - 1
        last = ops.convert_to_tensor(last.reshape((-1,) + (1,) * len(shape)))
        accepted = ops.cast(ops.logical_or(accepted, last), "int32")
        first = ops.logical_and(accepted > 0, ops.cumsum(accepted, axis=0) == 1)
        return ops.sum(ops.where(first, k, 0.0), axis=0)


class Categorical(Distribution):
    """Distributions over the integers `0 .. K - 1`, `P(x = k) = softmax(logits)[k]`.

    Event shape `()`, batch shape `logits.shape[:-1]`. `log_prob` takes
    integer class labels and is NaN at a label outside `0 .. K - 1` (rather
    than a silent wrong value). Samples are int32 labels. The distribution of
    a label has no meaningful `mean`; `probs()` and `mode()` give the class
    probabilities and the most probable class.

    Formula:

    ```python
    log_prob(x) = log_softmax(logits)[x]
    entropy() = -sum(softmax(logits) * log_softmax(logits))
    ```

    Args:
        logits: unnormalised log-probabilities, shape `batch_shape + (K,)`.

    Example:

    >>> d = Categorical(logits=[0.0, 0.0, 0.0, 0.0])
    >>> round(float(d.log_prob(2)), 4)  # log(1 / 4)
    -1.3863
    """

    reparameterized = False

    def __init__(self, logits):
        (logits,) = _as_float(logits=logits)
        _check_rank("logits", logits, 1, "a tensor of rank >= 1, shape batch_shape + (K,)")
        self._logits = logits

    @property
    def logits(self):
        return self._logits

    @property
    def num_categories(self):
        return _shape(self._logits)[-1]

    @property
    def batch_shape(self) -> tuple:
        return _shape(self._logits)[:-1]

    @property
    def event_shape(self) -> tuple:
        return ()

    @property
    def dtype(self) -> str:
        return _dtype(self._logits)

    def probs(self):
        """The class probabilities, `softmax(logits)`."""
        return ops.softmax(self._logits, axis=-1)

    def mode(self):
        """The most probable class, int32, of shape `batch_shape`."""
        return ops.cast(ops.argmax(self._logits, axis=-1), "int32")

    def _sample(self, sample_shape, seed):
        return _draw_categories(self._logits, sample_shape, seed)

    def log_prob(self, x):
        x = _cast(x, self.dtype)
        k = self.num_categories
        valid = ops.logical_and(ops.logical_and(x >= 0, x <= k - 1), ops.equal(x, ops.floor(x)))
        one_hot = ops.one_hot(ops.cast(ops.where(valid, x, 0.0), "int32"), k, dtype=self.dtype)
        value = ops.sum(one_hot * ops.log_softmax(self._logits, axis=-1), axis=-1)
        return ops.where(valid, value, math.nan)

    def entropy(self):
        log_probs = ops.log_softmax(self._logits, axis=-1)
        return -ops.sum(ops.exp(log_probs) * log_probs, axis=-1)


class OneHotCategorical(Distribution):
    """Categorical distributions over one-hot vectors of size `K`.

    Event shape `(K,)`. `log_prob` takes one-hot vectors (any vector `x` is
    accepted: the result is `sum(x * log_softmax(logits))`, minus the
    cross-entropy, as for soft labels). Samples are one-hot in `self.dtype`.

    Formula:

    ```python
    log_prob(x) = sum(x * log_softmax(logits))
    mean() = softmax(logits),  variance() = p * (1 - p)
    ```

    Args:
        logits: unnormalised log-probabilities, shape `batch_shape + (K,)`.

    Example:

    >>> d = OneHotCategorical(logits=[0.0, 0.0])
    >>> round(float(d.log_prob([0.0, 1.0])), 4), tuple(d.sample(3, seed=0).shape)
    (-0.6931, (3, 2))
    """

    reparameterized = False

    def __init__(self, logits):
        (logits,) = _as_float(logits=logits)
        _check_rank("logits", logits, 1, "a tensor of rank >= 1, shape batch_shape + (K,)")
        self._logits = logits

    @property
    def logits(self):
        return self._logits

    @property
    def batch_shape(self) -> tuple:
        return _shape(self._logits)[:-1]

    @property
    def event_shape(self) -> tuple:
        return _shape(self._logits)[-1:]

    @property
    def dtype(self) -> str:
        return _dtype(self._logits)

    def _sample(self, sample_shape, seed):
        index = _draw_categories(self._logits, sample_shape, seed)
        return ops.one_hot(index, self.event_shape[0], dtype=self.dtype)

    def log_prob(self, x):
        return ops.sum(_cast(x, self.dtype) * ops.log_softmax(self._logits, axis=-1), axis=-1)

    def mean(self):
        return ops.softmax(self._logits, axis=-1)

    def variance(self):
        p = ops.softmax(self._logits, axis=-1)
        return p * (1.0 - p)

    def stddev(self):
        return ops.sqrt(self.variance())

    def entropy(self):
        log_probs = ops.log_softmax(self._logits, axis=-1)
        return -ops.sum(ops.exp(log_probs) * log_probs, axis=-1)


class Independent(Distribution):
    """Reinterprets the last batch axes of a distribution as event axes.

    `Independent(Normal(loc, scale), 1)` with `loc` of shape `(..., d)` is a
    distribution over vectors of size d with independent coordinates: its
    `log_prob` and `entropy` sum the inner ones over the last axis; `mean`,
    `stddev`, `variance`, `cdf` and `quantile` are those of each coordinate. Used for
    per-dimension mixtures (`ScaleMixturePrior`) that are then one prior over
    vectors.

    Args:
        distribution: the inner `Distribution`.
        reinterpreted_batch_ndims: how many of its last batch axes become
            event axes, a positive integer. Defaults to `1`.

    Example:

    >>> d = Independent(Normal(loc=[0.0, 0.0, 0.0], scale=[1.0, 1.0, 1.0]))
    >>> d.batch_shape, d.event_shape
    ((), (3,))
    >>> round(float(d.log_prob([0.0, 0.0, 0.0])), 4)  # -3 * 0.5 * log(2 * pi)
    -2.7568
    """

    def __init__(self, distribution, reinterpreted_batch_ndims=1):
        if not isinstance(distribution, Distribution):
            raise _invalid_argument(
                "distribution", "a keras_elbo.distributions.Distribution", repr(distribution)
            )
        n = reinterpreted_batch_ndims
        if (
            isinstance(n, bool)
            or not isinstance(n, numbers.Integral)
            or not (1 <= n <= len(distribution.batch_shape))
        ):
            raise _invalid_argument(
                "reinterpreted_batch_ndims",
                f"an integer in [1, {len(distribution.batch_shape)}] (the inner batch rank)",
                repr(n),
            )
        self._distribution = distribution
        self._ndims = int(n)
        self.reparameterized = distribution.reparameterized

    @property
    def distribution(self):
        return self._distribution

    @property
    def reinterpreted_batch_ndims(self):
        return self._ndims

    @property
    def batch_shape(self) -> tuple:
        return self._distribution.batch_shape[: -self._ndims]

    @property
    def event_shape(self) -> tuple:
        return self._distribution.batch_shape[-self._ndims :] + self._distribution.event_shape

    @property
    def dtype(self) -> str:
        return self._distribution.dtype

    def _reduce(self, values):
        return ops.sum(values, axis=tuple(range(-self._ndims, 0)))

    def _sample(self, sample_shape, seed):
        return self._distribution.sample(sample_shape, seed=seed)

    def log_prob(self, x):
        return self._reduce(self._distribution.log_prob(x))

    def mean(self):
        return self._distribution.mean()

    def stddev(self):
        return self._distribution.stddev()

    def variance(self):
        return self._distribution.variance()

    def entropy(self):
        return self._reduce(self._distribution.entropy())

    def cdf(self, x):
        """The marginal CDF of each coordinate, `batch_shape + event_shape`
        (TFP's `Independent.cdf` is the joint: the product over the event
        axes of this)."""
        return self._distribution.cdf(x)

    def quantile(self, p):
        """The marginal quantile of each coordinate (for prediction
        intervals), `batch_shape + event_shape`."""
        return self._distribution.quantile(p)


def stop_parameter_gradients(dist):
    """A copy of `dist` with every parameter tensor behind `stop_gradient`.

    Nested distributions (mixture components, `Independent`'s inner one) are
    copied the same way. The values are unchanged; gradients then reach the
    parameters only through samples drawn elsewhere (the path-derivative
    estimator of `KLRegularizer`).
    """
    clone = copy.copy(dist)
    # A clone has drawn nothing: log q(z) of a sample of `dist` is computed
    # afresh, with the gradient through z alone.
    clone._last_draw = None
    for name, value in vars(dist).items():
        if isinstance(value, Distribution):
            setattr(clone, name, stop_parameter_gradients(value))
        elif ops.is_tensor(value) or isinstance(value, keras.Variable):
            setattr(clone, name, ops.stop_gradient(value))
    return clone


# ---------------------------------------------------------------------------
# KL divergences: a table keyed by the pair of types.

_KL_TABLE = {}


def register_kl(type_q: type, type_p: type):
    """Decorator registering `fn(q, p)` as the closed form of `KL(q || p)`.

    The arguments are in the order of `kl_divergence(q, p)`. A pair is
    registered once: a second registration is a `ValueError`. Subclasses
    inherit registrations (see `kl_divergence`).

    Args:
        type_q: the class of the first argument (the posterior).
        type_p: the class of the second argument (the prior).

    Returns:
        A decorator that registers its function and returns it unchanged.

    Example:

    >>> class Dirac(Distribution):
    ...     pass
    >>> @register_kl(Dirac, Dirac)
    ... def _kl_dirac_dirac(q, p):
    ...     return 0.0
    >>> kl_divergence(Dirac(), Dirac())
    0.0
    """
    for name, value in (("type_q", type_q), ("type_p", type_p)):
        if not isinstance(value, type):
            raise _invalid_argument(name, "a class", repr(value))

    def register(fn):
        key = (type_q, type_p)
        if key in _KL_TABLE:
            raise ValueError(
                f"KL({type_q.__name__} || {type_p.__name__}) is already registered, "
                f"to {_KL_TABLE[key].__name__}; a pair of types is registered once."
            )
        _KL_TABLE[key] = fn
        return fn

    return register


def _lookup_kl(type_q, type_p):
    """The registered function nearest along both class hierarchies.

    Distance is the sum of the two positions in the method resolution
    orders; at equal distance the first found (nearest in `type_q`) wins, as
    in TFP.
    """
    best, best_distance = None, None
    for distance_q, parent_q in enumerate(type_q.__mro__):
        for distance_p, parent_p in enumerate(type_p.__mro__):
            fn = _KL_TABLE.get((parent_q, parent_p))
            distance = distance_q + distance_p
            if fn is not None and (best is None or distance < best_distance):
                best, best_distance = fn, distance
    return best


def has_closed_form_kl(q: Distribution, p: Distribution) -> bool:
    """Whether `kl_divergence(q, p)` has a registered closed form.

    Example:

    >>> has_closed_form_kl(Normal(0.0, 1.0), Normal(0.0, 2.0))
    True
    >>> has_closed_form_kl(Normal(0.0, 1.0), Bernoulli(0.0))
    False
    """
    return _lookup_kl(type(q), type(p)) is not None


def kl_divergence(q: Distribution, p: Distribution):
    """The closed-form `KL(q || p) = E_q[log q(z) - log p(z)]`, of shape the batch.

    Looks the pair of types up in the table filled by `register_kl`, along
    both class hierarchies (a subclass of `Normal` uses the `Normal` form
    unless a nearer pair is registered).

    Args:
        q: a `Distribution` (the posterior).
        p: a `Distribution` (the prior), with the same event shape.

    Returns:
        The KL in nats, broadcast over both batch shapes.

    Raises:
        NotImplementedError: if no closed form is registered for the pair;
            estimate it by Monte Carlo instead.

    Example:

    >>> round(float(kl_divergence(Normal(1.0, 1.0), Normal(0.0, 1.0))), 4)  # 0.5 * 1**2
    0.5
    """
    fn = _lookup_kl(type(q), type(p))
    if fn is None:
        raise NotImplementedError(
            f"No closed-form KL divergence is registered for KL({type(q).__name__} || "
            f"{type(p).__name__}). Register one with keras_elbo.distributions.register_kl"
            f"({type(q).__name__}, {type(p).__name__}), or estimate it by Monte Carlo."
        )
    return fn(q, p)


@register_kl(Normal, Normal)
def _kl_normal_normal(q, p):
    """Elementwise; written as in distrax so it stays accurate when q is close to p:

    ```python
    log_ratio = log(q.scale) - log(p.scale)
    kl = 0.5 * ((q.loc - p.loc) / p.scale)**2 + 0.5 * expm1(2 * log_ratio) - log_ratio
    ```
    """
    p_shape, q_shape = _shape(p.loc), _shape(q.loc)
    broadcasts_into_q = len(p_shape) <= len(q_shape) and all(
        n == 1 or n == m for n, m in zip(p_shape[::-1], q_shape[::-1], strict=False)
    )
    if p._standard and broadcasts_into_q:  # N(0, 1), the default prior: no shift, no scaling
        log_ratio, z = ops.log(q.scale), q.loc
    else:
        log_ratio, z = ops.log(q.scale) - ops.log(p.scale), (q.loc - p.loc) / p.scale
    return 0.5 * ops.square(z) + 0.5 * ops.expm1(2.0 * log_ratio) - log_ratio


@register_kl(MultivariateNormalDiag, MultivariateNormalDiag)
def _kl_diag_diag(q, p):
    """The `Normal` KL summed over the event axis."""
    return ops.sum(_kl_normal_normal(q._marginals, p._marginals), axis=-1)


def _kl_gaussians(loc_q, trace, loc_p, solve_p, log_det_q, log_det_p, d):
    """`0.5 * (trace + |solve_p(loc_p - loc_q)|**2 - d + 2 * (log_det_p - log_det_q))`.

    `trace = tr(Sigma_p^-1 Sigma_q)`, `solve_p(v) = L_p^-1 v` (batched
    over the last axis of `v`), `log_det_* = log|det L_*|`.
    """
    mahalanobis = ops.sum(ops.square(solve_p(loc_p - loc_q)), axis=-1)
    return 0.5 * (trace + mahalanobis - d) + log_det_p - log_det_q


@register_kl(MultivariateNormalTriL, MultivariateNormalDiag)
def _kl_tril_diag(q, p):
    """`tr(Sigma_p^-1 Sigma_q) = sum((L_q / scale_p[:, None])**2)`; no solve needed."""
    scale_p = p.scale_diag
    trace = ops.sum(ops.square(q.scale_tril / scale_p[..., None]), axis=(-2, -1))
    return _kl_gaussians(
        q.loc,
        trace,
        p.loc,
        lambda v: v / scale_p,
        ops.sum(_log_abs_diagonal(q.scale_tril), axis=-1),
        ops.sum(ops.log(scale_p), axis=-1),
        q.event_shape[0],
    )


def _kl_to_tril(loc_q, tril_q, log_det_q, d, p):
    """KL to a `MultivariateNormalTriL` p: `tr = |L_p^-1 L_q|_F**2` by a triangular solve."""
    tril_p = p.scale_tril
    trace = ops.sum(ops.square(_solve_lower(tril_p, tril_q)), axis=(-2, -1))
    return _kl_gaussians(
        loc_q,
        trace,
        p.loc,
        lambda v: _solve_lower(tril_p, v[..., None])[..., 0],
        log_det_q,
        ops.sum(_log_abs_diagonal(tril_p), axis=-1),
        d,
    )


@register_kl(MultivariateNormalTriL, MultivariateNormalTriL)
def _kl_tril_tril(q, p):
    log_det_q = ops.sum(_log_abs_diagonal(q.scale_tril), axis=-1)
    return _kl_to_tril(q.loc, q.scale_tril, log_det_q, q.event_shape[0], p)


@register_kl(MultivariateNormalDiag, MultivariateNormalTriL)
def _kl_diag_tril(q, p):
    d = q.event_shape[0]
    # diag(scale_q) as a matrix: eye * scale_q broadcast along the rows.
    tril_q = ops.eye(d, dtype=q.dtype) * q.scale_diag[..., None, :]
    log_det_q = ops.sum(ops.log(q.scale_diag), axis=-1)
    return _kl_to_tril(q.loc, tril_q, log_det_q, d, p)


__all__ = [
    "Bernoulli",
    "Categorical",
    "Distribution",
    "Independent",
    "Logistic",
    "MixtureSameFamily",
    "MultivariateNormalDiag",
    "MultivariateNormalTriL",
    "Normal",
    "OneHotCategorical",
    "Poisson",
    "StudentT",
    "has_closed_form_kl",
    "kl_divergence",
    "register_kl",
]


@register_kl(Independent, Independent)
def _kl_independent(q, p):
    if q.reinterpreted_batch_ndims != p.reinterpreted_batch_ndims:
        raise NotImplementedError(
            "KL between Independent distributions of different reinterpreted_batch_ndims."
        )
    return q._reduce(kl_divergence(q.distribution, p.distribution))
