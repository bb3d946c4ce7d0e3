"""Discrete families: `Bernoulli`, `Poisson`, `Categorical`, `OneHotCategorical`,
and the closed-form KL divergences of the Bernoulli and categorical ones."""

import math

import keras
import numpy as np
from keras import ops

from keras_elbo.distributions._core import (
    Distribution,
    as_float,
    cast,
    check_rank,
    draw_categories,
    split_seed,
    static_shape,
    uniform_open,
)
from keras_elbo.distributions._kl import register_kl
from keras_elbo.distributions._special import lgamma


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
    _shape_source = "_logits"

    def __init__(self, logits):
        (self._logits,) = as_float(logits=logits)

    @property
    def logits(self):
        return self._logits

    def _sample(self, sample_shape, seed):
        shape = sample_shape + tuple(ops.shape(self._logits))
        uniform = keras.random.uniform(shape, dtype=self.dtype, seed=seed)
        return ops.cast(ops.less(uniform, ops.sigmoid(self._logits)), self.dtype)

    def log_prob(self, x):
        return cast(x, self.dtype) * self._logits - ops.softplus(self._logits)

    def mean(self):
        return ops.sigmoid(self._logits)

    def stddev(self):
        return ops.sqrt(ops.sigmoid(self._logits) * ops.sigmoid(-self._logits))

    def entropy(self):
        return ops.softplus(self._logits) - self._logits * ops.sigmoid(self._logits)


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
    _shape_source = "_log_rate"

    def __init__(self, log_rate):
        (self._log_rate,) = as_float(log_rate=log_rate)

    @property
    def log_rate(self):
        return self._log_rate

    @property
    def rate(self):
        return ops.exp(self._log_rate)

    def log_prob(self, x):
        # As TFP's Poisson: a fractional count is scored by the same formula
        # (lgamma(x + 1) for log(x!)); a negative one is outside the support.
        # (A NaN count stays NaN.)
        x = cast(x, self.dtype)
        negative = x < 0
        safe = ops.where(negative, 0.0, x)
        value = safe * self._log_rate - ops.exp(self._log_rate) - lgamma(safe + 1.0)
        return ops.where(negative, -math.inf, value)

    def mean(self):
        return self.rate

    def variance(self):
        return self.rate

    def stddev(self):
        return ops.exp(0.5 * self._log_rate)

    def _sample(self, sample_shape, seed):
        inversion_seed, rejection_seed = split_seed(seed, 2)
        shape = sample_shape + tuple(ops.shape(self._log_rate))
        log_rate = ops.broadcast_to(self._log_rate, shape)
        rate = ops.exp(log_rate)
        small = rate < _POISSON_SWITCH_RATE
        # Inversion: the count is the number of k with P(X <= k) < u.
        counts = ops.arange(_POISSON_INVERSION_TERMS, dtype=self.dtype)
        small_log_rate = ops.where(small, log_rate, 0.0)[..., None]
        log_pmf = counts * small_log_rate - ops.exp(small_log_rate) - lgamma(counts + 1.0)
        u = uniform_open(shape, self.dtype, inversion_seed)[..., None]
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
        accept_ratio = log_accept <= -rate + safe_k * log_rate - lgamma(safe_k + 1.0)
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
    _shape_source = "_logits"

    def __init__(self, logits):
        (logits,) = as_float(logits=logits)
        check_rank("logits", logits, 1, "a tensor of rank >= 1, shape batch_shape + (K,)")
        self._logits = logits

    @property
    def logits(self):
        return self._logits

    @property
    def num_categories(self):
        return static_shape(self._logits)[-1]

    @property
    def batch_shape(self) -> tuple:
        return static_shape(self._logits)[:-1]

    @property
    def event_shape(self) -> tuple:
        return ()

    def probs(self):
        """The class probabilities, `softmax(logits)`."""
        return ops.softmax(self._logits, axis=-1)

    def mode(self):
        """The most probable class, int32, of shape `batch_shape`."""
        return ops.cast(ops.argmax(self._logits, axis=-1), "int32")

    def _sample(self, sample_shape, seed):
        return draw_categories(self._logits, sample_shape, seed)

    def log_prob(self, x):
        x = cast(x, self.dtype)
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
    _shape_source = "_logits"
    _event_ndims = 1

    def __init__(self, logits):
        (logits,) = as_float(logits=logits)
        check_rank("logits", logits, 1, "a tensor of rank >= 1, shape batch_shape + (K,)")
        self._logits = logits

    @property
    def logits(self):
        return self._logits

    def _sample(self, sample_shape, seed):
        index = draw_categories(self._logits, sample_shape, seed)
        return ops.one_hot(index, self.event_shape[0], dtype=self.dtype)

    def log_prob(self, x):
        return ops.sum(cast(x, self.dtype) * ops.log_softmax(self._logits, axis=-1), axis=-1)

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


def _kl_softmax(q_logits, p_logits):
    """`sum(q * (log q - log p))` over the last axis, from logits."""
    q_classes, p_classes = static_shape(q_logits)[-1], static_shape(p_logits)[-1]
    if None not in (q_classes, p_classes) and q_classes != p_classes:
        raise ValueError(
            f"The KL divergence between categorical distributions needs the same number "
            f"of classes; received {q_classes} (q) and {p_classes} (p)."
        )
    log_q = ops.log_softmax(q_logits, axis=-1)
    log_p = ops.log_softmax(p_logits, axis=-1)
    return ops.sum(ops.exp(log_q) * (log_q - log_p), axis=-1)


@register_kl(Categorical, Categorical)
@register_kl(OneHotCategorical, OneHotCategorical)
def _kl_categorical_categorical(q, p):
    """`sum(softmax(q.logits) * (log_softmax(q.logits) - log_softmax(p.logits)))`:
    the same for labels and for one-hot vectors."""
    return _kl_softmax(q.logits, cast(p.logits, q.dtype))


@register_kl(Bernoulli, Bernoulli)
def _kl_bernoulli_bernoulli(q, p):
    """From the logits `a` (q) and `b` (p), with `log(sigmoid(a)) = -softplus(-a)`:

    ```python
    kl = sigmoid(a) * (softplus(-b) - softplus(-a)) + sigmoid(-a) * (softplus(b) - softplus(a))
    ```
    """
    a, b = q.logits, cast(p.logits, q.dtype)
    return ops.sigmoid(a) * (ops.softplus(-b) - ops.softplus(-a)) + ops.sigmoid(-a) * (
        ops.softplus(b) - ops.softplus(a)
    )
