"""Other continuous families: `Logistic` and `StudentT`."""

import math

import keras
import numpy as np
from keras import ops

from keras_elbo import _backend
from keras_elbo.distributions._core import LocationScale, dtype_of, split_seed, uniform_open
from keras_elbo.distributions._special import betainc, lgamma


class Logistic(LocationScale):
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

    def __init__(self, loc, scale):
        super().__init__(loc, scale)

    def _standard_sample(self, shape, seed):
        return self._standard_quantile(uniform_open(shape, self.dtype, seed))

    def _log_unnormalized(self, z):
        return -z - 2.0 * ops.softplus(-z)

    def _log_normalizer(self):
        return 0.0

    def stddev(self):
        return self._scale * (math.pi / math.sqrt(3.0))

    def entropy(self):
        return ops.log(self._scale) + 2.0

    def _standard_cdf(self, z):
        return ops.sigmoid(z)

    def _standard_quantile(self, p):
        return ops.log(p) - ops.log1p(-p)


_T_QUANTILE_STEPS = 12
_T_QUANTILE_MAX_STEP = 2.0


@_backend.compiled
def _student_t_tail_quantile(q, df):
    """The `s >= 0` with `G(s) = q` for the standard t's lower tail
    `G(s) = cdf(-s)`, `q <= 1/2` (see `StudentT.quantile`)."""
    tiny = float(np.finfo(dtype_of(q)).tiny)
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
    log_c = lgamma(0.5 * (df + 1.0)) - lgamma(0.5 * df) - 0.5 * math.log(math.pi)
    tail = ops.exp((log_c + 0.5 * (df - 1.0) * ops.log(df) - log_q) / df)
    w = ops.log(ops.maximum(ops.maximum(cornish_fisher, tail), 1e-6))
    log_pdf_const = log_c - 0.5 * ops.log(df)

    def step(_, w):
        s = ops.exp(w)
        s2 = ops.square(s)
        g = 0.5 * betainc(0.5 * df, 0.5 + ops.zeros_like(s), df / (df + s2), s2 / (df + s2))
        log_g = ops.log(ops.maximum(g, tiny))
        log_pdf = log_pdf_const - 0.5 * (df + 1.0) * ops.log1p(s2 / df)
        # d log G / dw = -s * pdf(s) / G(s).
        slope = -ops.exp(w + log_pdf - log_g)
        delta = (log_g - log_q) / ops.minimum(slope, -1e-12)
        return w - ops.clip(delta, -_T_QUANTILE_MAX_STEP, _T_QUANTILE_MAX_STEP)

    return ops.exp(ops.fori_loop(0, _T_QUANTILE_STEPS, step, w))


class StudentT(LocationScale):
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
        super().__init__(loc, scale, df=df)

    @property
    def df(self):
        return self._df

    def _standard_sample(self, shape, seed):
        normal_seed, gamma_seed = split_seed(seed, 2)
        eps = _backend.standard_normal(shape, self.dtype, normal_seed)
        half_df = 0.5 * self._df
        alpha = ops.broadcast_to(half_df, shape)
        gamma = keras.random.gamma(shape, alpha, dtype=self.dtype, seed=gamma_seed)
        return eps * ops.sqrt(half_df / gamma)

    def _log_unnormalized(self, z):
        return -0.5 * (self._df + 1.0) * ops.log1p(ops.square(z) / self._df)

    def _log_normalizer(self):
        df = self._df
        return 0.5 * ops.log(df * math.pi) + lgamma(0.5 * df) - lgamma(0.5 * (df + 1.0))

    def mean(self):
        return ops.where(self._df > 1.0, self._loc, math.nan)

    def variance(self):
        df = self._df
        finite = ops.square(self._scale) * df / ops.where(df > 2.0, df - 2.0, 1.0)
        return ops.where(df > 2.0, finite, ops.where(df > 1.0, math.inf, math.nan))

    def stddev(self):
        return ops.sqrt(self.variance())

    def _standard_cdf(self, z):
        z2 = ops.square(z)
        df = self._df + ops.zeros_like(z)
        # x = df / (df + z**2) and 1 - x = z**2 / (df + z**2), both without cancellation.
        tail = 0.5 * betainc(0.5 * df, 0.5 + ops.zeros_like(z), df / (df + z2), z2 / (df + z2))
        return ops.where(z < 0, tail, 1.0 - tail)

    def _standard_quantile(self, p):
        """Newton's method on the log of the tail.

        By symmetry it solves `G(s) = q` for the lower tail `G(s) = cdf(-s)`
        (standardised, `q = min(p, 1 - p)`), in `w = log(s)`, where the tail
        is nearly linear (`log G ~ -df * w` far out), from the larger of two
        starts: the Cornish-Fisher expansion of the normal quantile (good for
        large `df`, Abramowitz & Stegun 26.7.5) and the tail's power law
        (good for small `df`). `_T_QUANTILE_STEPS` steps, each of at most
        `_T_QUANTILE_MAX_STEP` in `w`; then `+/- s`.
        """
        p = p + ops.zeros_like(self._loc)
        df = self._df + ops.zeros_like(p)
        q = ops.minimum(p, 1.0 - p)
        s = _student_t_tail_quantile(q, df)
        s = ops.where(q >= 0.5, ops.zeros_like(s), s)
        return ops.where(p < 0.5, -s, s)
