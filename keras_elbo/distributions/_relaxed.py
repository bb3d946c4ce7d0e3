"""Continuous relaxations of discrete variables (Maddison et al., 2017; Jang
et al., 2017): `RelaxedOneHotCategorical` (the Concrete or Gumbel-softmax
distribution) and `RelaxedBernoulli` (the binary Concrete)."""

from keras import ops

from keras_elbo.distributions._core import (
    Distribution,
    as_float,
    broadcast_batch,
    cast,
    check_rank,
    runtime_shape,
    static_shape,
    uniform_open,
)
from keras_elbo.distributions._special import lgamma


def _check_temperature(temperature):
    # A Python number is checked here; a tensor (an annealed variable) is
    # the caller's to keep positive: `TemperatureAnnealing` checks each
    # value it assigns.
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(
            "Invalid value received for argument `temperature`. Expected a positive "
            f"number. Received: temperature={temperature!r}"
        )


class _Relaxation(Distribution):
    """What the two relaxations share: a positive temperature and logits
    broadcast against each other over the batch (the logits' last
    `_event_ndims` axes are the event), and reparameterised samples."""

    reparameterized = True
    _shape_source = "_logits"

    def __init__(self, temperature, logits):
        _check_temperature(temperature)
        temperature, logits = as_float(temperature=temperature, logits=logits)
        if self._event_ndims:
            check_rank("logits", logits, 1, "a tensor of rank >= 1, shape batch_shape + (K,)")
        self._temperature, self._logits = broadcast_batch(
            temperature=(temperature, 0), logits=(logits, self._event_ndims)
        )

    @property
    def temperature(self):
        return self._temperature

    @property
    def logits(self):
        return self._logits


class RelaxedOneHotCategorical(_Relaxation):
    """The Concrete (Gumbel-softmax) distribution on the probability simplex.

    A point of the simplex of `K` classes, `softmax((logits + g) / temperature)`
    with `g` standard Gumbel noise: as `temperature -> 0` the draws become
    one-hot and their argmax is `Categorical(logits)` at every temperature.
    Sampling is reparameterised (the relaxation's point). Event shape `(K,)`,
    batch shape the broadcast of `logits.shape[:-1]` against `temperature`.

    Formula (the density of Maddison et al., 2017, eq. 10, with respect to
    the first `K - 1` coordinates; `t` the temperature):

    ```python
    sample() = softmax((logits + g) / t),  g = -log(-log(u)),  u ~ U(0, 1)
    log_prob(x) = (lgamma(K) + (K - 1) * log(t) + sum(logits - (t + 1) * log(x))
                   - K * logsumexp(logits - t * log(x)))
    ```

    The log-density of a sample is computed from the logarithm of the
    sample, kept from the draw: at low temperatures the smaller coordinates
    of a draw underflow to 0 in float32, where `log(x)` would be `-inf`.
    No closed-form mean or entropy.

    Args:
        temperature: the temperature, positive, broadcastable against
            `logits.shape[:-1]`.
        logits: unnormalised log-probabilities of the classes, shape
            `batch_shape + (K,)`.

    Example:

    >>> d = RelaxedOneHotCategorical(temperature=0.5, logits=[0.0, 0.0])
    >>> # At K = 2 the first coordinate is sigmoid(logistic noise / t): density
    >>> # 0.25 * t / (0.5 * 0.5) = t at 1/2.
    >>> round(float(d.log_prob([0.5, 0.5])), 4)  # log(0.5)
    -0.6931
    >>> tuple(d.sample(3, seed=0).shape)
    (3, 2)
    """

    _event_ndims = 1

    def _sample(self, sample_shape, seed):
        shape = sample_shape + runtime_shape(self._logits, self._temperature[..., None])
        gumbel = -ops.log(-ops.log(uniform_open(shape, self.dtype, seed)))
        log_sample = ops.log_softmax((self._logits + gumbel) / self._temperature[..., None])
        sample = ops.exp(log_sample)
        self._last_draw = (sample, log_sample)
        return sample

    def log_prob(self, x):
        log_x = self._own_noise(x)
        if log_x is None:
            log_x = ops.log(cast(x, self.dtype))
        k = static_shape(self._logits)[-1]
        t = self._temperature
        logits = self._logits
        return (
            lgamma(ops.full_like(t, float(k)))
            + (k - 1) * ops.log(t)
            + ops.sum(logits - (t[..., None] + 1.0) * log_x, axis=-1)
            - k * ops.logsumexp(logits - t[..., None] * log_x, axis=-1)
        )


class RelaxedBernoulli(_Relaxation):
    """The binary Concrete distribution on (0, 1): a relaxed `Bernoulli(logits)`.

    `sigmoid((logits + log(u) - log(1 - u)) / temperature)` with `u ~ U(0, 1)`:
    as `temperature -> 0` the draws become 0 or 1, and at every temperature a
    draw exceeds 1/2 with probability `sigmoid(logits)`. Sampling is
    reparameterised. Event shape `()`.

    Formula (Maddison et al., 2017, eq. 20 and appendix; `t` the temperature):

    ```python
    log_prob(y) = (log(t) + logits - (t + 1) * (log(y) + log(1 - y))
                   - 2 * logaddexp(logits - t * log(y), -t * log(1 - y)))
    ```

    As for `RelaxedOneHotCategorical`, the log-density of a sample reads the
    logit of the draw back instead of taking `log(y)` of a value that may
    have rounded to 0 or 1.

    Args:
        temperature: the temperature, positive, broadcastable against `logits`.
        logits: log-odds of the Bernoulli variable being relaxed.

    Example:

    >>> d = RelaxedBernoulli(temperature=1.0, logits=0.0)
    >>> # The logistic density 1/4 at logit 0, over dy / dlogit = 1/4 at y = 1/2.
    >>> round(float(d.log_prob(0.5)), 4)
    0.0
    """

    def _sample(self, sample_shape, seed):
        shape = sample_shape + runtime_shape(self._logits, self._temperature)
        u = uniform_open(shape, self.dtype, seed)
        logit = (self._logits + ops.log(u) - ops.log1p(-u)) / self._temperature
        sample = ops.sigmoid(logit)
        self._last_draw = (sample, logit)
        return sample

    def log_prob(self, x):
        logit = self._own_noise(x)
        if logit is None:
            x = cast(x, self.dtype)
            log_y, log_1my = ops.log(x), ops.log1p(-x)
        else:
            log_y, log_1my = -ops.softplus(-logit), -ops.softplus(logit)
        t = self._temperature
        return (
            ops.log(t)
            + self._logits
            - (t + 1.0) * (log_y + log_1my)
            - 2.0 * ops.logaddexp(self._logits - t * log_y, -t * log_1my)
        )
