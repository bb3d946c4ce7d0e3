"""Distributions built from others: `MixtureSameFamily` and `Independent`."""

import numbers

import numpy as np
from keras import ops

from keras_elbo.distributions._core import (
    Distribution,
    cast,
    check_rank,
    draw_categories,
    invalid_argument,
    split_seed,
    static_shape,
)
from keras_elbo.distributions._discrete import Categorical
from keras_elbo.distributions._kl import kl_divergence, register_kl
from keras_elbo.distributions._special import bisect


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

    >>> from keras_elbo.distributions import MultivariateNormalDiag
    >>> components = MultivariateNormalDiag(loc=[[-1.0], [1.0]], scale_diag=[[1.0], [1.0]])
    >>> d = MixtureSameFamily(mixture_logits=[0.0, 0.0], components=components)
    >>> [round(float(v), 4) for v in (d.mean()[0], d.stddev()[0])]  # 0, sqrt(1 + 1)
    [0.0, 1.4142]
    """

    reparameterized = False

    def __init__(self, mixture_logits, components):
        if not isinstance(components, Distribution):
            raise invalid_argument(
                "components", "a keras_elbo.distributions.Distribution", repr(components)
            )
        logits = cast(mixture_logits, components.dtype)
        target = components.batch_shape
        expected = (
            "a tensor of shape (K,) or batch_shape + (K,), broadcastable to the "
            f"components' batch shape {target} = batch_shape + (K,)"
        )
        check_rank("mixture_logits", logits, 1, expected)
        if not target:
            raise invalid_argument(
                "mixture_logits", expected, f"a tensor of shape {static_shape(logits)}"
            )
        if None not in target + static_shape(logits):
            # Logits shared by a batch of mixtures broadcast up to it; the
            # reverse (components shared by a batch of logits) would give
            # the batch the same component draws, so it is refused.
            try:
                broadcastable = np.broadcast_shapes(static_shape(logits), target) == target
            except ValueError:
                broadcastable = False
            if not broadcastable:
                raise invalid_argument(
                    "mixture_logits", expected, f"a tensor of shape {static_shape(logits)}"
                )
            if static_shape(logits) != target:
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
        return static_shape(self._logits)[-1]

    @property
    def batch_shape(self) -> tuple:
        return static_shape(self._logits)[:-1]

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
        choice_seed, component_seed = split_seed(seed, 2)
        num_components = self.num_components
        index = draw_categories(self._logits, sample_shape, choice_seed)
        # Draw every component and keep the chosen one: K times the noise of
        # one draw, but one `keras.random` call and no gather.
        draws = self._components._sample(sample_shape, component_seed)
        one_hot = self._expand_weights(ops.one_hot(index, num_components, dtype=self.dtype))
        return ops.sum(one_hot * draws, axis=-1 - len(self.event_shape))

    def log_prob(self, x):
        x = cast(x, self.dtype)
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
        x = ops.expand_dims(cast(x, self.dtype), axis=-1 - len(self.event_shape))
        weights = self._expand_weights(ops.softmax(self._logits, axis=-1))
        return ops.sum(weights * self._components.cdf(x), axis=-1 - len(self.event_shape))

    def quantile(self, p):
        axis = -1 - len(self.event_shape)
        # p broadcast to batch_shape + event_shape (or wider), then given a component axis.
        p = cast(p, self.dtype) + ops.zeros_like(self.mean())
        component_quantiles = self._components.quantile(ops.expand_dims(p, axis))
        low = ops.min(component_quantiles, axis=axis)
        high = ops.max(component_quantiles, axis=axis)
        return bisect(self.cdf, p, low, high)


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

    >>> from keras_elbo.distributions import Normal
    >>> d = Independent(Normal(loc=[0.0, 0.0, 0.0], scale=[1.0, 1.0, 1.0]))
    >>> d.batch_shape, d.event_shape
    ((), (3,))
    >>> round(float(d.log_prob([0.0, 0.0, 0.0])), 4)  # -3 * 0.5 * log(2 * pi)
    -2.7568
    """

    def __init__(self, distribution, reinterpreted_batch_ndims=1):
        if not isinstance(distribution, Distribution):
            raise invalid_argument(
                "distribution", "a keras_elbo.distributions.Distribution", repr(distribution)
            )
        n = reinterpreted_batch_ndims
        if (
            isinstance(n, bool)
            or not isinstance(n, numbers.Integral)
            or not (1 <= n <= len(distribution.batch_shape))
        ):
            raise invalid_argument(
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


@register_kl(Independent, Independent)
def _kl_independent(q, p):
    if q.reinterpreted_batch_ndims != p.reinterpreted_batch_ndims:
        raise NotImplementedError(
            "KL between Independent distributions of different reinterpreted_batch_ndims."
        )
    return q._reduce(kl_divergence(q.distribution, p.distribution))
