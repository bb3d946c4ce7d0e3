"""Distribution outputs: a model returns parameters, a loss reads them as a distribution.

The Keras 3 replacement for `tfp.layers`' distribution layers
(`IndependentNormal`, `MixtureNormal`, `OneHotCategorical`, ...), which
return a TFP distribution from a layer: Keras 3 layers may return tensors
only, and TFP has no JAX (current versions) or PyTorch substrate. Here the
model ends in a `Dense(Output.params_size(...))` layer and returns a tensor
of parameters; the output class is the loss given to `compile` (the negative
log-likelihood in nats per example, summed over event dimensions, averaged
over the batch by Keras) and turns those parameters into a
`keras_elbo.distributions` object for prediction:

```python
output = keras_elbo.IndependentNormal(event_shape=1)
model = keras.Sequential([..., keras.layers.Dense(output.params_size)])
model.compile(optimizer="adam", loss=output)
model.fit(x, y)
predictive = output.distribution(model.predict(x_new))
predictive.mean(), predictive.stddev(), predictive.quantile(0.95)
```

Every class computes in `keras.ops` (float32, or float64 under a float64
`floatx`) and runs on TensorFlow, JAX and PyTorch. Positive scales are
`softplus(raw) + min_scale`, as in `GaussianNLL` and the posterior layers
(TFP uses `softplus(raw)`, with no floor).
"""

import math
import numbers

import keras
from keras import ops

from keras_elbo import _math
from keras_elbo import distributions as kd
from keras_elbo._gaussian import positive_scale_tril
from keras_elbo.losses import UNIT_INTERVAL, Support, _cast_like, _checked_targets

# ---------------------------------------------------------------------------
# Private helpers.


def _event_shape(value, name="event_shape"):
    """`value` as a tuple: an int `n` is `(n,)`, `()` a scalar event."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1:
        return (int(value),)
    if isinstance(value, tuple | list) and len(value) == 0:
        return ()
    if isinstance(value, tuple | list):
        return _math.positive_integers(name, value)
    raise _math.invalid_argument(
        name, "a positive integer or a tuple of them (() for a scalar event)", value
    )


def _reshape(x, batch, shape):
    """`x` of shape `batch + (prod(shape),)` as `batch + shape`."""
    return ops.reshape(x, tuple(batch) + tuple(shape))


def _independent(distribution, event_shape):
    """`distribution` with its last `len(event_shape)` batch axes as event axes."""
    return kd.Independent(distribution, len(event_shape)) if event_shape else distribution


class _ParamsSize:
    """`params_size` on the class is TFP's static method (`Output.params_size(
    event_shape)`); on an instance it is the size for the instance's arguments."""

    def __get__(self, instance, owner):
        if instance is None:
            return owner._params_size
        return owner._params_size(**instance._size_arguments())


class _DistributionOutput(keras.losses.Loss):
    """Base class: the negative log-likelihood of a distribution whose
    parameters are `y_pred`, and the distribution itself.

    A subclass implements `_params_size` (a static method with TFP's
    signature), `_size_arguments` (its arguments on an instance),
    `_distribution(params)` (params already checked and cast) and
    `_target_shape` (the event shape of one target).
    """

    is_reconstruction_loss = True
    target_support = None  # a `keras_elbo.losses.Support` checked on the targets
    params_size = _ParamsSize()

    def _size_arguments(self):
        raise NotImplementedError

    @property
    def _target_shape(self):
        raise NotImplementedError

    def _checked_params(self, params):
        params = ops.cast(params, _math.density_dtype())
        width, expected = params.shape[-1] if len(params.shape) else None, self.params_size
        if not len(params.shape) or (width is not None and width != expected):
            arguments = ", ".join(f"{k}={v!r}" for k, v in self._size_arguments().items())
            name = type(self).__name__
            raise ValueError(
                f"{name}: the parameters (y_pred) must have {expected} entries on their "
                f"last axis, {name}.params_size({arguments}) = {expected}: end the model "
                f"with keras.layers.Dense({name}.params_size({arguments})). Received: "
                f"y_pred.shape={tuple(params.shape)}"
            )
        return params

    def distribution(self, params) -> kd.Distribution:
        """The distribution that the parameters `params` describe.

        Args:
            params: the model's output, shape `batch + (params_size,)`.

        Returns:
            A `keras_elbo.distributions.Distribution` with batch shape `batch`
            and this output's event shape.
        """
        return self._distribution(self._checked_params(params))

    def _targets(self, y_true, params):
        """`y_true` checked (finite, within `target_support` where given),
        cast like the parameters and reshaped to `batch + target shape`."""
        y = _cast_like(y_true, params)
        y = _checked_targets(y, type(self).__name__, self.target_support)
        batch, target = tuple(params.shape[:-1]), self._target_shape
        y_shape = tuple(y.shape)
        if None not in batch + y_shape and math.prod(y_shape) != math.prod(batch + target):
            raise ValueError(
                f"{type(self).__name__}: the targets (y_true) must hold one value of "
                f"event shape {target} per example, shape {batch + target} for parameters "
                f"(y_pred) of shape {tuple(params.shape)}. Received: y_true.shape={y_shape}"
            )
        return _reshape(y, ops.shape(params)[:-1], target)

    def call(self, y_true, y_pred):
        """The negative log-likelihood of each example, in nats, shape `(batch,)`."""
        params = self._checked_params(y_pred)
        log_prob = self._distribution(params).log_prob(self._targets(y_true, params))
        return _math.sum_event_dims(-log_prob)


# ---------------------------------------------------------------------------
# Elementwise families with an event shape.


class _IndependentOutput(_DistributionOutput):
    """Outputs of independent coordinates with event shape `event_shape`."""

    def __init__(self, event_shape, reduction, name, dtype):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.event_shape = _event_shape(event_shape)

    @property
    def _target_shape(self):
        return self.event_shape

    def _size_arguments(self):
        return {"event_shape": self.event_shape}

    def _split(self, params, count):
        """`count` parameter blocks of shape `batch + event_shape`."""
        n = math.prod(self.event_shape)
        batch = ops.shape(params)[:-1]
        return [
            _reshape(params[..., i * n : (i + 1) * n], batch, self.event_shape)
            for i in range(count)
        ]

    def get_config(self):
        return {**super().get_config(), "event_shape": self.event_shape}


@keras.saving.register_keras_serializable(package="keras_elbo")
class IndependentNormal(_IndependentOutput):
    """Independent normal outputs: regression with a learned (or fixed) noise scale.

    Replaces `tfp.layers.IndependentNormal`. With `scale=None` the model
    predicts a mean and a scale for every output (heteroscedastic
    regression): `params = [loc, raw]` along the last axis, each of size
    `prod(event_shape)`, `scale = softplus(raw) + min_scale`. With a fixed
    positive `scale`, `params = loc`.

    Formula:

    ```python
    loss = mean_over_batch(sum(0.5 * ((y - loc) / scale)**2 + log(scale)
                               + 0.5 * log(2 * pi), axis=events))
    ```

    `distribution(params)` is `Independent(Normal(loc, scale))` (a bare
    `Normal` for `event_shape=()`), with `mean`, `stddev`, `variance`,
    `sample`, `log_prob`, and per-coordinate `cdf` and `quantile`.

    Args:
        event_shape: the shape of one target, an int `n` (`(n,)`) or a tuple;
            `()` for scalar targets of shape `(batch,)`. Defaults to `1`.
        scale: a fixed positive standard deviation, or `None` to learn it.
            Defaults to `None`.
        min_scale: positive floor of a learned scale. Defaults to `1e-3`.
        reduction: Keras reduction over the batch. Defaults to
            `"sum_over_batch_size"` (the mean over examples).
        name: name of the loss.
        dtype: dtype of the loss's inputs; the log-density is computed in
            float32 (float64 under a float64 `floatx`).

    Example:

    >>> import numpy as np
    >>> output = IndependentNormal(event_shape=1)
    >>> IndependentNormal.params_size(1), output.params_size
    (2, 2)
    >>> params = np.zeros((4, 2), "float32")  # loc 0, scale softplus(0) + 1e-3
    >>> round(float(output(np.zeros((4, 1)), params)), 4)  # log(0.6941) + 0.5 * log(2 pi)
    0.5539
    >>> round(float(output.distribution(params).quantile(0.975)[0, 0]), 4)
    1.3605
    """

    def __init__(
        self,
        event_shape: int | tuple[int, ...] = 1,
        scale: float | None = None,
        min_scale: float = 1e-3,
        reduction: str = "sum_over_batch_size",
        name: str = "independent_normal",
        dtype=None,
    ):
        super().__init__(event_shape, reduction, name, dtype)
        self.scale = None if scale is None else _math.real("scale", scale, positive=True)
        self.min_scale = _math.real("min_scale", min_scale, positive=True)

    @staticmethod
    def _params_size(event_shape=1, scale=None):
        """The number of parameters: `2 * prod(event_shape)` with a learned
        scale, `prod(event_shape)` with a fixed `scale`."""
        n = math.prod(_event_shape(event_shape))
        return n if scale is not None else 2 * n

    def _size_arguments(self):
        arguments = super()._size_arguments()
        return arguments if self.scale is None else {**arguments, "scale": self.scale}

    def _distribution(self, params):
        if self.scale is not None:
            (loc,) = self._split(params, 1)
            return _independent(kd.Normal(loc, self.scale), self.event_shape)
        loc, raw = self._split(params, 2)
        scale = _math.positive_scale(raw, self.min_scale)
        return _independent(kd.Normal(loc, scale), self.event_shape)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "min_scale": self.min_scale}


@keras.saving.register_keras_serializable(package="keras_elbo")
class IndependentLogistic(_IndependentOutput):
    """Independent logistic outputs: regression with heavier tails than a normal.

    Replaces `tfp.layers.IndependentLogistic`. `params = [loc, raw]`, each
    of size `prod(event_shape)`, `scale = softplus(raw) + min_scale`;
    `distribution(params)` is `Independent(Logistic(loc, scale))`, with
    closed-form `cdf` and `quantile`.

    Formula:

    ```python
    z = (y - loc) / scale
    loss = mean_over_batch(sum(z + 2 * softplus(-z) + log(scale), axis=events))
    ```

    Args:
        event_shape: the shape of one target, an int `n` (`(n,)`) or a tuple.
            Defaults to `1`.
        min_scale: positive floor of the scale. Defaults to `1e-3`.
        reduction: Keras reduction over the batch. Defaults to
            `"sum_over_batch_size"` (the mean over examples).
        name: name of the loss.
        dtype: dtype of the loss's inputs; the log-density is computed in
            float32 (float64 under a float64 `floatx`).

    Example:

    >>> import numpy as np
    >>> output = IndependentLogistic(event_shape=3)
    >>> output.params_size
    6
    >>> tuple(output.distribution(np.zeros((5, 6))).sample(2, seed=0).shape)
    (2, 5, 3)
    """

    def __init__(
        self,
        event_shape: int | tuple[int, ...] = 1,
        min_scale: float = 1e-3,
        reduction: str = "sum_over_batch_size",
        name: str = "independent_logistic",
        dtype=None,
    ):
        super().__init__(event_shape, reduction, name, dtype)
        self.min_scale = _math.real("min_scale", min_scale, positive=True)

    @staticmethod
    def _params_size(event_shape=1):
        """`2 * prod(event_shape)`: locations and raw scales."""
        return 2 * math.prod(_event_shape(event_shape))

    def _distribution(self, params):
        loc, raw = self._split(params, 2)
        scale = _math.positive_scale(raw, self.min_scale)
        return _independent(kd.Logistic(loc, scale), self.event_shape)

    def get_config(self):
        return {**super().get_config(), "min_scale": self.min_scale}


@keras.saving.register_keras_serializable(package="keras_elbo")
class IndependentStudentT(_IndependentOutput):
    """Independent Student's t outputs: robust regression.

    TFP has no Student's t layer; this follows `tfp.layers`'
    `IndependentNormal`/`IndependentLogistic` pattern (the parameters split
    in blocks, then `Independent`): `params = [loc, raw_scale, raw_df]`, each
    of size `prod(event_shape)`, with
    `scale = softplus(raw_scale) + min_scale` and, when `df=None`, the degrees
    of freedom learned per output as `softplus(raw_df) + min_df`. The floor
    `min_df` (default 0.01) keeps the density finite when `df` is driven
    towards zero while letting the model reach the Cauchy (df = 1) and
    heavier tails; raise it to 1 or 2 if the predictive mean or variance must
    exist (they are NaN/inf for `df <= 1`/`df <= 2`). With a fixed positive
    `df`, `params = [loc, raw_scale]`.

    Formula:

    ```python
    z = (y - loc) / scale
    loss = mean_over_batch(sum(-lgamma((df + 1) / 2) + lgamma(df / 2)
                               + 0.5 * log(df * pi) + log(scale)
                               + 0.5 * (df + 1) * log1p(z**2 / df), axis=events))
    ```

    `distribution(params)` is `Independent(StudentT(df, loc, scale))`, with
    `cdf` (a continued fraction) and `quantile` (Newton's method on it; see
    `keras_elbo.distributions.StudentT`).

    Args:
        event_shape: the shape of one target, an int `n` (`(n,)`) or a tuple.
            Defaults to `1`.
        df: fixed positive degrees of freedom, or `None` to learn them.
            Defaults to `None`.
        min_scale: positive floor of the scale. Defaults to `1e-3`.
        min_df: positive floor of learned degrees of freedom. Defaults to
            `0.01`.
        reduction: Keras reduction over the batch. Defaults to
            `"sum_over_batch_size"` (the mean over examples).
        name: name of the loss.
        dtype: dtype of the loss's inputs; the log-density is computed in
            float32 (float64 under a float64 `floatx`).

    Example:

    >>> IndependentStudentT.params_size(2), IndependentStudentT(2, df=3.0).params_size
    (6, 4)
    """

    def __init__(
        self,
        event_shape: int | tuple[int, ...] = 1,
        df: float | None = None,
        min_scale: float = 1e-3,
        min_df: float = 0.01,
        reduction: str = "sum_over_batch_size",
        name: str = "independent_student_t",
        dtype=None,
    ):
        super().__init__(event_shape, reduction, name, dtype)
        self.df = None if df is None else _math.real("df", df, positive=True)
        self.min_scale = _math.real("min_scale", min_scale, positive=True)
        self.min_df = _math.real("min_df", min_df, positive=True)

    @staticmethod
    def _params_size(event_shape=1, df=None):
        """`3 * prod(event_shape)` with learned `df`, `2 * prod(event_shape)` with a fixed one."""
        n = math.prod(_event_shape(event_shape))
        return 2 * n if df is not None else 3 * n

    def _size_arguments(self):
        arguments = super()._size_arguments()
        return arguments if self.df is None else {**arguments, "df": self.df}

    def _distribution(self, params):
        if self.df is None:
            loc, raw_scale, raw_df = self._split(params, 3)
            df = _math.positive_scale(raw_df, self.min_df)
        else:
            loc, raw_scale = self._split(params, 2)
            df = self.df
        scale = _math.positive_scale(raw_scale, self.min_scale)
        return _independent(kd.StudentT(df, loc, scale), self.event_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "df": self.df,
            "min_scale": self.min_scale,
            "min_df": self.min_df,
        }


@keras.saving.register_keras_serializable(package="keras_elbo")
class IndependentBernoulli(_IndependentOutput):
    """Independent Bernoulli outputs: multi-label classification, binary pixels.

    Replaces `tfp.layers.IndependentBernoulli`. `params` are the logits, of
    size `prod(event_shape)`; targets lie in [0, 1] (a target outside, NaN or
    Inf stops `fit` with an error, as in `BernoulliNLL`). The loss equals
    `BernoulliNLL(from_logits=True)` on the same tensors.

    Formula:

    ```python
    loss = mean_over_batch(sum(softplus(logits) - y * logits, axis=events))
    ```

    Args:
        event_shape: the shape of one target, an int `n` (`(n,)`) or a tuple.
            Defaults to `1`.
        reduction: Keras reduction over the batch. Defaults to
            `"sum_over_batch_size"` (the mean over examples).
        name: name of the loss.
        dtype: dtype of the loss's inputs; the log-density is computed in
            float32 (float64 under a float64 `floatx`).

    Example:

    >>> import numpy as np
    >>> output = IndependentBernoulli(event_shape=(28, 28))
    >>> output.params_size
    784
    >>> round(float(output(np.ones((2, 28, 28)), np.zeros((2, 784)))), 2)  # 784 * log(2)
    543.43
    """

    target_support = UNIT_INTERVAL

    def __init__(
        self,
        event_shape: int | tuple[int, ...] = 1,
        reduction: str = "sum_over_batch_size",
        name: str = "independent_bernoulli",
        dtype=None,
    ):
        super().__init__(event_shape, reduction, name, dtype)

    @staticmethod
    def _params_size(event_shape=1):
        """`prod(event_shape)` logits."""
        return math.prod(_event_shape(event_shape))

    def _distribution(self, params):
        (logits,) = self._split(params, 1)
        return _independent(kd.Bernoulli(logits), self.event_shape)


@keras.saving.register_keras_serializable(package="keras_elbo")
class IndependentPoisson(_IndependentOutput):
    """Independent Poisson outputs: regression of counts.

    Replaces `tfp.layers.IndependentPoisson`. `params` are the log-rates, of
    size `prod(event_shape)` (TFP reads them as log-rates too). Targets are
    non-negative counts. As in TFP's `Poisson.log_prob`, a fractional target
    is scored by the same formula (`lgamma(y + 1)` in place of `log(y!)`),
    so that rates and averaged counts, as code written for `tfp.layers`
    passes them, keep working; a negative target stops `fit` with an error
    that names it (a NaN loss where nothing can raise: XLA, `jax.jit`).

    Formula:

    ```python
    loss = mean_over_batch(sum(exp(log_rate) - y * log_rate + lgamma(y + 1), axis=events))
    ```

    `distribution(params)` is `Independent(Poisson(log_rate))`, with `mean`,
    `stddev`, `variance` and `sample` (no `cdf` or `quantile`).

    Args:
        event_shape: the shape of one target, an int `n` (`(n,)`) or a tuple.
            Defaults to `1`.
        reduction: Keras reduction over the batch. Defaults to
            `"sum_over_batch_size"` (the mean over examples).
        name: name of the loss.
        dtype: dtype of the loss's inputs; the log-density is computed in
            float32 (float64 under a float64 `floatx`).

    Example:

    >>> import numpy as np
    >>> output = IndependentPoisson()
    >>> round(float(output(np.full((3, 1), 2.0), np.zeros((3, 1)))), 4)  # 1 + log(2)
    1.6931
    """

    target_support = Support(0.0, math.inf, "be non-negative counts")

    def __init__(
        self,
        event_shape: int | tuple[int, ...] = 1,
        reduction: str = "sum_over_batch_size",
        name: str = "independent_poisson",
        dtype=None,
    ):
        super().__init__(event_shape, reduction, name, dtype)

    @staticmethod
    def _params_size(event_shape=1):
        """`prod(event_shape)` log-rates."""
        return math.prod(_event_shape(event_shape))

    def _distribution(self, params):
        (log_rate,) = self._split(params, 1)
        return _independent(kd.Poisson(log_rate), self.event_shape)


# ---------------------------------------------------------------------------
# Multivariate and categorical families.


@keras.saving.register_keras_serializable(package="keras_elbo")
class MultivariateNormalTriL(_DistributionOutput):
    """A multivariate normal output with a full covariance: correlated targets.

    Replaces `tfp.layers.MultivariateNormalTriL`. `params = [loc, raw]`:
    `event_size` means, then `event_size * (event_size + 1) / 2` entries of
    the lower-triangular scale, placed in the order of TFP's
    `tfp.math.fill_triangular`, with the diagonal `softplus(raw) + min_scale`
    (the mapping of `GaussianPosterior(covariance="full")`; TFP's
    `FillScaleTriL` adds 1e-5 instead).

    Formula:

    ```python
    scale_tril = fill_triangular(raw) with diag -> softplus(diag) + min_scale
    z = solve_triangular(scale_tril, y - loc, lower=True)
    loss = mean_over_batch(0.5 * sum(z**2) + sum(log(diag(scale_tril)))
                           + 0.5 * event_size * log(2 * pi))
    ```

    Args:
        event_size: the size `d` of one target vector, a positive integer.
        min_scale: positive floor of the diagonal of the scale. Defaults to
            `1e-3`.
        reduction: Keras reduction over the batch. Defaults to
            `"sum_over_batch_size"` (the mean over examples).
        name: name of the loss.
        dtype: dtype of the loss's inputs; the log-density is computed in
            float32 (float64 under a float64 `floatx`).

    Example:

    >>> MultivariateNormalTriL.params_size(3)  # 3 + 3 * 4 / 2
    9
    """

    def __init__(
        self,
        event_size: int,
        min_scale: float = 1e-3,
        reduction: str = "sum_over_batch_size",
        name: str = "multivariate_normal_tril",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.event_size = _math.integer("event_size", event_size)
        self.min_scale = _math.real("min_scale", min_scale, positive=True)

    @staticmethod
    def _params_size(event_size):
        """`event_size + event_size * (event_size + 1) / 2`."""
        d = _math.integer("event_size", event_size)
        return d + d * (d + 1) // 2

    def _size_arguments(self):
        return {"event_size": self.event_size}

    @property
    def _target_shape(self):
        return (self.event_size,)

    def _distribution(self, params):
        d = self.event_size
        scale_tril = positive_scale_tril(params[..., d:], d, self.min_scale)
        return kd.MultivariateNormalTriL(params[..., :d], scale_tril)

    def get_config(self):
        return {
            **super().get_config(),
            "event_size": self.event_size,
            "min_scale": self.min_scale,
        }


@keras.saving.register_keras_serializable(package="keras_elbo")
class OneHotCategorical(_DistributionOutput):
    """A categorical output with one-hot targets: classification.

    Replaces `tfp.layers.OneHotCategorical`. `params` are `event_size`
    logits; targets are one-hot vectors (soft labels work too: the loss is
    then the cross-entropy). The loss equals Keras's
    `CategoricalCrossentropy(from_logits=True)`.

    Formula:

    ```python
    loss = mean_over_batch(-sum(y * log_softmax(logits)))
    ```

    Args:
        event_size: the number of classes, a positive integer.
        reduction: Keras reduction over the batch. Defaults to
            `"sum_over_batch_size"` (the mean over examples).
        name: name of the loss.
        dtype: dtype of the loss's inputs; the log-density is computed in
            float32 (float64 under a float64 `floatx`).

    Example:

    >>> import numpy as np
    >>> output = OneHotCategorical(event_size=4)
    >>> round(float(output(np.eye(4)[[0, 2]], np.zeros((2, 4)))), 4)  # log(4)
    1.3863
    """

    def __init__(
        self,
        event_size: int,
        reduction: str = "sum_over_batch_size",
        name: str = "one_hot_categorical",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.event_size = _math.integer("event_size", event_size)

    @staticmethod
    def _params_size(event_size):
        """`event_size` logits."""
        return _math.integer("event_size", event_size)

    def _size_arguments(self):
        return {"event_size": self.event_size}

    @property
    def _target_shape(self):
        return (self.event_size,)

    def _distribution(self, params):
        return kd.OneHotCategorical(params)

    def get_config(self):
        return {**super().get_config(), "event_size": self.event_size}


@keras.saving.register_keras_serializable(package="keras_elbo")
class Categorical(_DistributionOutput):
    """A categorical output with integer targets: classification.

    Replaces `tfp.layers.DistributionLambda(lambda t: tfd.Categorical(logits=t))`.
    `params` are `num_classes` logits; targets are integer labels, of shape
    `(batch,)` or `(batch, 1)`. A label outside `0 .. num_classes - 1`, or a
    fractional one, stops `fit` with an error that names it and the range
    (where nothing can raise, under XLA and `jax.jit`, the loss is NaN
    instead of a silent wrong value). The loss equals Keras's
    `SparseCategoricalCrossentropy(from_logits=True)`.

    Formula:

    ```python
    loss = mean_over_batch(-log_softmax(logits)[y])
    ```

    `distribution(params)` is a `keras_elbo.distributions.Categorical`, with
    `probs()`, `mode()`, `sample` (int32 labels) and `entropy`.

    Args:
        num_classes: the number of classes, a positive integer.
        reduction: Keras reduction over the batch. Defaults to
            `"sum_over_batch_size"` (the mean over examples).
        name: name of the loss.
        dtype: dtype of the loss's inputs; the log-density is computed in
            float32 (float64 under a float64 `floatx`).

    Example:

    >>> import numpy as np
    >>> output = Categorical(num_classes=4)
    >>> round(float(output(np.array([0, 3]), np.zeros((2, 4)))), 4)  # log(4)
    1.3863
    """

    def __init__(
        self,
        num_classes: int,
        reduction: str = "sum_over_batch_size",
        name: str = "categorical",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.num_classes = _math.integer("num_classes", num_classes)

    @staticmethod
    def _params_size(num_classes):
        """`num_classes` logits."""
        return _math.integer("num_classes", num_classes)

    def _size_arguments(self):
        return {"num_classes": self.num_classes}

    @property
    def target_support(self):
        last = self.num_classes - 1
        return Support(
            0.0,
            last,
            f"be integer class labels in 0 .. {last}",
            "; give Categorical(num_classes=...) the number of classes",
            integer=True,
        )

    @property
    def _target_shape(self):
        return ()

    def _distribution(self, params):
        return kd.Categorical(params)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


# ---------------------------------------------------------------------------
# Mixtures.


class _MixtureOutput(_IndependentOutput):
    """Mixtures of `num_components` components of one family over targets of
    shape `event_shape`: `params = [logits (K), locs (K * n), raw scales (K * n)]`."""

    component_family = None

    def __init__(self, num_components, event_shape, min_scale, reduction, name, dtype):
        super().__init__(event_shape, reduction, name, dtype)
        self.num_components = _math.integer("num_components", num_components)
        self.min_scale = _math.real("min_scale", min_scale, positive=True)

    @staticmethod
    def _params_size(num_components, event_shape=1):
        """`num_components * (1 + 2 * prod(event_shape))`: logits, locations, raw scales."""
        k = _math.integer("num_components", num_components)
        return k * (1 + 2 * math.prod(_event_shape(event_shape)))

    def _size_arguments(self):
        return {"num_components": self.num_components, "event_shape": self.event_shape}

    def _distribution(self, params):
        k, n = self.num_components, math.prod(self.event_shape)
        batch = ops.shape(params)[:-1]
        component_shape = (k,) + self.event_shape
        loc = _reshape(params[..., k : k + k * n], batch, component_shape)
        raw = _reshape(params[..., k + k * n :], batch, component_shape)
        scale = _math.positive_scale(raw, self.min_scale)
        components = _independent(self.component_family(loc, scale), self.event_shape)
        return kd.MixtureSameFamily(params[..., :k], components)

    def get_config(self):
        return {
            **super().get_config(),
            "num_components": self.num_components,
            "min_scale": self.min_scale,
        }


@keras.saving.register_keras_serializable(package="keras_elbo")
class MixtureNormal(_MixtureOutput):
    """A mixture of normals output: a mixture density network (Bishop, 1994).

    Replaces `tfp.layers.MixtureNormal`. For multimodal targets (inverse
    problems, several branches of `y` for one `x`): each component has its own
    weight, mean and scale, predicted per example.

    `params` has `num_components * (1 + 2 * n)` entries, `n =
    prod(event_shape)`, in this order: the `num_components` mixture logits,
    then the locations (`num_components * n`, component-major: component 0's
    `n` values first), then as many raw scales, `scale = softplus(raw) +
    min_scale`. TFP's layout differs after the logits (each component's
    locations and scales together), which matters only when porting trained
    weights: reorder the last Dense layer's columns.

    Formula:

    ```python
    w = softmax(logits)
    loss = mean_over_batch(-logsumexp(log(w) + sum(normal_log_prob(y, loc_k, scale_k),
                                                   axis=events)))
    ```

    `distribution(params)` is a `MixtureSameFamily` of `Independent(Normal)`
    components: `mean`, `stddev`/`variance` (law of total variance),
    `sample`, and per-coordinate `cdf` and `quantile` (by bisection).

    Args:
        num_components: the number of components `K`, a positive integer.
        event_shape: the shape of one target, an int `n` (`(n,)`) or a tuple.
            Defaults to `1`.
        min_scale: positive floor of the scales. Defaults to `1e-3`.
        reduction: Keras reduction over the batch. Defaults to
            `"sum_over_batch_size"` (the mean over examples).
        name: name of the loss.
        dtype: dtype of the loss's inputs; the log-density is computed in
            float32 (float64 under a float64 `floatx`).

    Example:

    >>> import numpy as np
    >>> MixtureNormal.params_size(2, event_shape=1)  # 2 logits, 2 locs, 2 raw scales
    6
    >>> params = np.array([[0.0, 0.0, -1.0, 1.0, 0.0, 0.0]], "float32")
    >>> dist = MixtureNormal(2).distribution(params)
    >>> round(float(dist.mean()[0, 0]), 4), round(float(dist.quantile(0.75)[0, 0]), 4)
    (0.0, 1.0034)
    """

    component_family = kd.Normal

    def __init__(
        self,
        num_components: int,
        event_shape: int | tuple[int, ...] = 1,
        min_scale: float = 1e-3,
        reduction: str = "sum_over_batch_size",
        name: str = "mixture_normal",
        dtype=None,
    ):
        super().__init__(num_components, event_shape, min_scale, reduction, name, dtype)


@keras.saving.register_keras_serializable(package="keras_elbo")
class MixtureLogistic(_MixtureOutput):
    """A mixture of logistics output: a mixture density network with heavier tails.

    Replaces `tfp.layers.MixtureLogistic`.

    `params` has `num_components * (1 + 2 * n)` entries, `n =
    prod(event_shape)`, in this order: the `num_components` mixture logits,
    then the locations (`num_components * n`, component-major: component 0's
    `n` values first), then as many raw scales, `scale = softplus(raw) +
    min_scale`. TFP's layout differs after the logits (each component's
    locations and scales together), which matters only when porting trained
    weights: reorder the last Dense layer's columns.

    Formula:

    ```python
    w = softmax(logits)
    loss = mean_over_batch(-logsumexp(log(w) + sum(logistic_log_prob(y, loc_k, scale_k),
                                                   axis=events)))
    ```

    `distribution(params)` is a `MixtureSameFamily` of `Independent(Logistic)`
    components, with `mean`, `stddev`, `variance`, `sample`, `cdf`, `quantile`.

    Args:
        num_components: the number of components `K`, a positive integer.
        event_shape: the shape of one target, an int `n` (`(n,)`) or a tuple.
            Defaults to `1`.
        min_scale: positive floor of the scales. Defaults to `1e-3`.
        reduction: Keras reduction over the batch. Defaults to
            `"sum_over_batch_size"` (the mean over examples).
        name: name of the loss.
        dtype: dtype of the loss's inputs; the log-density is computed in
            float32 (float64 under a float64 `floatx`).

    Example:

    >>> MixtureLogistic.params_size(3, event_shape=2), MixtureLogistic(3, 2).params_size
    (15, 15)
    """

    component_family = kd.Logistic

    def __init__(
        self,
        num_components: int,
        event_shape: int | tuple[int, ...] = 1,
        min_scale: float = 1e-3,
        reduction: str = "sum_over_batch_size",
        name: str = "mixture_logistic",
        dtype=None,
    ):
        super().__init__(num_components, event_shape, min_scale, reduction, name, dtype)


__all__ = [
    "Categorical",
    "IndependentBernoulli",
    "IndependentLogistic",
    "IndependentNormal",
    "IndependentPoisson",
    "IndependentStudentT",
    "MixtureLogistic",
    "MixtureNormal",
    "MultivariateNormalTriL",
    "OneHotCategorical",
]
