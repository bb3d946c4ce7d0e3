"""Reconstruction losses: negative log-likelihoods in nats per example.

Each loss sums -log p(x|z) over an example's event dimensions (pixels,
features) and Keras averages the result over the batch. Given to `compile`
next to a `KLRegularizer`, it makes the model's `loss` the negative ELBO in
nats per example. Keras's `binary_crossentropy` averages over pixels instead,
which under-weights the reconstruction by the number of pixels.
"""

import math
import typing

import keras
from keras import ops

from keras_elbo import _backend, _math

_LOG_2PI = math.log(2.0 * math.pi)


class Support(typing.NamedTuple):
    """The values a likelihood's targets may take, for `_checked_targets`:
    the closed interval `[low, high]`, of whole numbers where `integer`.

    `requirement` completes "the targets (y_true) must ..."; `hint` says
    what to do.
    """

    low: float
    high: float
    requirement: str
    hint: str = ""
    integer: bool = False


UNIT_INTERVAL = Support(
    0.0, 1.0, "lie in [0, 1]", "; scale the data to [0, 1] (divide 8-bit images by 255)"
)


def _range(tensor):
    """The smallest and the largest value of `tensor`, two scalars;
    `(inf, -inf)` if it is empty.

    Two reductions serve the range checks below: elementwise comparisons and
    `all` would each make a pass over the batch, and on TensorFlow without
    XLA each pass is a kernel of its own. (Not for NaN: XLA's CPU `min` and
    `max` may skip a NaN, as TensorFlow configures it; `isfinite` finds it.)
    """
    return ops.min(tensor, initial=math.inf), ops.max(tensor, initial=-math.inf)


def _nan_unless(ok, tensor):
    """`tensor`, or NaN everywhere unless the boolean scalar `ok` holds: where
    nothing can raise (XLA, `jax.jit`), a refused batch gives a NaN loss."""
    return tensor + ops.cast(ops.where(ok, 0.0, math.nan), tensor.dtype)


def _checked_targets(y_true, loss_name, support=None):
    """`y_true`, checked at run time to be finite (and within `support`).

    A NaN target would make the loss NaN, and the NaN weights of the next
    step would be blamed on the first layer that checks its input; a target
    outside the likelihood's support (outside [0, 1] for a Bernoulli, a
    label beyond the classes) would give a meaningless, or infinite, value.
    Both stop here with an error that names the loss and the cause (see
    `_backend.assert_condition`): on TensorFlow an `InvalidArgumentError`,
    at once in eager mode and in a `tf.function` (`fit`) before the step
    updates any weight; on PyTorch, and on JAX outside `jit`, a `ValueError`
    at once. Where nothing can raise, under XLA (`jit_compile=True`) and
    inside `jax.jit` (JAX's `fit` by default), the targets of such a batch
    are all NaN, so that the loss is NaN instead of a plausible wrong
    number.
    """
    finite = ops.all(ops.isfinite(y_true))
    _backend.assert_condition(
        finite,
        [
            f"{loss_name}: the targets (y_true) contain NaN or Inf. Remove or impute "
            "them (check the data pipeline) before training"
        ],
    )
    if support is None:
        return _nan_unless(finite, y_true)
    low, high = _range(y_true)
    # An empty batch is within any support: its range (inf, -inf) is.
    within = ops.logical_and(low >= support.low, high <= support.high)
    if support.integer:
        within = ops.logical_and(within, ops.all(ops.equal(y_true, ops.floor(y_true))))
    # Checked only when every target is finite: a NaN is reported as such.
    message = [
        f"{loss_name}: the targets (y_true) must {support.requirement}, but they range from",
        low,
        "to",
        high,
    ]
    _backend.assert_condition(
        ops.logical_or(within, ops.logical_not(finite)),
        message + [support.hint] if support.hint else message,
    )
    return _nan_unless(ops.logical_and(finite, within), y_true)


def _cast_like(y_true, y_pred):
    return ops.cast(y_true, keras.backend.standardize_dtype(y_pred.dtype))


def _matched_targets(y_true, y_pred, loss_name, learned_scale=False):
    """`y_true` with the rank of `y_pred`, refused unless the shapes match.

    As Keras's own losses do, a target with one axis fewer than `y_pred`
    gets a last axis (`(n,)` against `(n, 1)`) and one with an extra last
    axis of size 1 loses it. Every other difference raises a `ValueError`
    that names both shapes: broadcasting `(n, 1)` targets against `(n, 64)`
    outputs would silently give a loss of the wrong size (and `(n,)` against
    `(n, 1)` an outer product). With `learned_scale` `y_pred`'s last axis is
    twice the target's (means, then raw scales). Checked on the static
    shapes, at trace time; unknown sizes (or ranks) pass.
    """
    try:
        received, got = tuple(y_true.shape), tuple(y_pred.shape)
    except ValueError:  # a TensorFlow graph retraced with shapes of unknown rank
        return y_true
    true_rank, pred_rank = len(received), len(got)
    if true_rank + 1 == pred_rank:
        y_true = ops.expand_dims(y_true, -1)
    elif true_rank == pred_rank + 1 and y_true.shape[-1] == 1 and not learned_scale:
        y_true = ops.squeeze(y_true, -1)
    expected = tuple(y_true.shape)
    if learned_scale and expected and expected[-1] is not None:
        expected = expected[:-1] + (2 * expected[-1],)
    if len(expected) != len(got) or any(
        a is not None and b is not None and a != b for a, b in zip(expected, got, strict=True)
    ):
        what = "the same shape"
        if learned_scale:
            what += ", but for y_pred's last axis, twice y_true's"
        raise ValueError(
            f"{loss_name}: the targets (y_true) and the predictions (y_pred) must have "
            f"{what} (one value per target). Received: y_true.shape={received}, "
            f"y_pred.shape={got}"
        )
    return y_true


def _checked_probabilities(y_pred, loss_name):
    """`y_pred`, checked at run time to lie in [0, 1] (as `_checked_targets`
    checks targets; where nothing can raise, such a batch gives NaN).

    Clipping them instead would score a prediction of 1.5 for a target 1 as a
    perfect fit: a decoder that lacks its sigmoid would train to a
    meaningless loss.
    """
    # Without a gradient: eager JAX differentiates the loss with tracers.
    values = ops.stop_gradient(y_pred)
    low, high = _range(values)
    valid = ops.logical_and(ops.all(ops.isfinite(values)), ops.logical_and(low >= 0, high <= 1))
    _backend.assert_condition(
        valid,
        [
            f"{loss_name}(from_logits=False): the predictions (y_pred) must be "
            "probabilities in [0, 1], but they range from",
            low,
            "to",
            high,
            "; end the decoder with a sigmoid, or pass logits with from_logits=True",
        ],
    )
    return _nan_unless(valid, y_pred)


def bernoulli_nll(y_true, y_pred, from_logits=False):
    """Bernoulli negative log-likelihood, summed over each example's events.

    Formula:

    ```python
    p = sigmoid(y_pred) if from_logits else y_pred
    loss = -sum(y_true * log(p) + (1 - y_true) * log(1 - p), axis=events)
    ```

    Args:
        y_true: targets in [0, 1], shape `(batch, ...)`.
        y_pred: logits (`from_logits=True`) or probabilities, same shape.
        from_logits: whether `y_pred` holds logits. Logits are more stable.

    Returns:
        The negative log-likelihood of each example, shape `(batch,)`.

    Raises:
        ValueError: when the shapes of `y_true` and `y_pred` differ (beyond
            one trailing axis of size 1, as Keras's losses allow).
        InvalidArgumentError: (TensorFlow; `ValueError` on PyTorch and JAX)
            at run time, in `fit` too, if `y_true` holds NaN, Inf or a value
            outside [0, 1], such as raw 8-bit pixels, or, with
            `from_logits=False`, if `y_pred` holds a value outside [0, 1]
            (it is not clipped: a decoder without its sigmoid). Where nothing can raise,
            under XLA (`jit_compile=True`) and inside `jax.jit` (JAX's `fit`
            unless `jit_compile=False`), the loss is NaN instead.
    """
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = _matched_targets(ops.convert_to_tensor(y_true), y_pred, "BernoulliNLL")
    y_true = _checked_targets(_cast_like(y_true, y_pred), "BernoulliNLL", UNIT_INTERVAL)
    if from_logits:
        # max(l, 0) - l * x + log(1 + exp(-|l|)): no overflow for any logit l.
        nll = ops.relu(y_pred) - y_pred * y_true + ops.log1p(ops.exp(-ops.abs(y_pred)))
    else:
        eps = keras.config.epsilon()
        p = ops.clip(_checked_probabilities(y_pred, "BernoulliNLL"), eps, 1.0 - eps)
        nll = -(y_true * ops.log(p) + (1.0 - y_true) * ops.log1p(-p))
    return _math.sum_event_dims(nll)


def gaussian_nll(y_true, y_pred, scale=1.0, min_scale=1e-3):
    """Gaussian negative log-likelihood, summed over each example's events.

    With a fixed `scale`, `y_pred` is the mean. With `scale=None` the scale is
    learned: the last axis of `y_pred` is twice as long as `y_true`'s and
    holds the mean followed by a raw scale, mapped to
    `softplus(raw) + min_scale`.

    Formula:

    ```python
    loss = sum(0.5 * ((y_true - loc) / scale)**2 + log(scale)
               + 0.5 * log(2 * pi), axis=events)
    ```

    Args:
        y_true: targets, shape `(batch, ..., d)`.
        y_pred: mean, shape `(batch, ..., d)`; or, with `scale=None`, mean and
            raw scale concatenated, shape `(batch, ..., 2 * d)`.
        scale: the fixed standard deviation, or `None` to read it from
            `y_pred`.
        min_scale: floor of a learned scale.

    Returns:
        The negative log-likelihood of each example, shape `(batch,)`.

    Raises:
        ValueError: when the shapes of `y_true` and `y_pred` differ (beyond
            one trailing axis of size 1, as Keras's losses allow; with
            `scale=None` `y_pred`'s last axis is twice `y_true`'s).
        InvalidArgumentError: (TensorFlow; `ValueError` on PyTorch and JAX)
            at run time, in `fit` too, if `y_true` holds NaN or Inf. Where
            nothing can raise, under XLA (`jit_compile=True`) and inside
            `jax.jit` (JAX's `fit` unless `jit_compile=False`), the loss is
            NaN instead.
    """
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = _matched_targets(
        ops.convert_to_tensor(y_true),
        y_pred,
        "GaussianNLL" if scale is not None else "GaussianNLL(scale=None) (mean and raw scale)",
        learned_scale=scale is None,
    )
    y_true = _checked_targets(_cast_like(y_true, y_pred), "GaussianNLL")
    if scale is None:
        d = y_true.shape[-1]
        loc, raw = y_pred[..., :d], y_pred[..., d:]
        scale = _math.positive_scale(raw, min_scale)
        log_scale = ops.log(scale)
    else:
        loc = y_pred
        log_scale = math.log(scale)
    nll = 0.5 * ops.square((y_true - loc) / scale) + log_scale + 0.5 * _LOG_2PI
    return _math.sum_event_dims(nll)


@keras.saving.register_keras_serializable(package="keras_elbo")
class BernoulliNLL(keras.losses.Loss):
    """Bernoulli negative log-likelihood of binary data, in nats per example.

    The reconstruction term of a VAE on binary (or [0, 1]) data: the decoder
    outputs one logit (or probability) per pixel. Summed over pixels and
    averaged over the batch, unlike `keras.losses.BinaryCrossentropy`, which
    averages over pixels. The targets must lie in [0, 1] (divide 8-bit images
    by 255): a target outside, NaN or Inf stops `fit` with an error that says
    so (see `bernoulli_nll`).

    Formula:

    ```python
    p = sigmoid(y_pred) if from_logits else y_pred
    loss = mean_over_batch(-sum(y_true * log(p) + (1 - y_true) * log(1 - p)))
    ```

    Args:
        from_logits: whether `y_pred` holds logits. Defaults to `False`.
        reduction: Keras reduction over the batch. Defaults to
            `"sum_over_batch_size"` (the mean over examples).
        name: name of the loss. Defaults to `"bernoulli_nll"`.
        dtype: dtype of the computation. Defaults to float32 (also under a
            mixed-precision policy).

    Example:

    >>> import numpy as np
    >>> loss = BernoulliNLL(from_logits=True)
    >>> round(float(loss(np.ones((2, 784)), np.zeros((2, 784)))), 2)  # 784 * log(2)
    543.43
    """

    def __init__(
        self,
        from_logits: bool = False,
        reduction: str = "sum_over_batch_size",
        name: str = "bernoulli_nll",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = _math.boolean("from_logits", from_logits)

    def call(self, y_true, y_pred):
        return bernoulli_nll(y_true, y_pred, from_logits=self.from_logits)

    def get_config(self):
        return {**super().get_config(), "from_logits": self.from_logits}


@keras.saving.register_keras_serializable(package="keras_elbo")
class GaussianNLL(keras.losses.Loss):
    """Gaussian negative log-likelihood of real-valued data, in nats per example.

    With a fixed `scale` (default 1.0) the decoder outputs the mean. With
    `scale=None` the decoder also learns the scale of each output: its last
    layer has twice as many units as the data, the means followed by raw
    scales (`softplus(raw) + min_scale`). A NaN or Inf target stops `fit`
    with an error that says so (see `gaussian_nll`).

    Formula:

    ```python
    loss = mean_over_batch(sum(0.5 * ((y_true - loc) / scale)**2 + log(scale)
                               + 0.5 * log(2 * pi)))
    ```

    Args:
        scale: the fixed standard deviation (positive), or `None` to learn it
            from `y_pred`. Defaults to `1.0`.
        min_scale: positive floor of a learned scale. Defaults to `1e-3`.
        reduction: Keras reduction over the batch. Defaults to
            `"sum_over_batch_size"` (the mean over examples).
        name: name of the loss. Defaults to `"gaussian_nll"`.
        dtype: dtype of the computation. Defaults to float32.

    Example:

    >>> import numpy as np
    >>> loss = GaussianNLL(scale=1.0)
    >>> round(float(loss(np.zeros((2, 3)), np.zeros((2, 3)))), 4)  # 3 * 0.5 * log(2 pi)
    2.7568
    """

    def __init__(
        self,
        scale: float | None = 1.0,
        min_scale: float = 1e-3,
        reduction: str = "sum_over_batch_size",
        name: str = "gaussian_nll",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.scale = None if scale is None else _math.real("scale", scale, positive=True)
        self.min_scale = _math.real("min_scale", min_scale, positive=True)

    def call(self, y_true, y_pred):
        return gaussian_nll(y_true, y_pred, scale=self.scale, min_scale=self.min_scale)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "min_scale": self.min_scale}


def is_reconstruction_loss(loss) -> bool:
    """Whether `loss.call(y_true, y_pred)` returns -log p(y|z) per example.

    True of this module's losses, of `keras_elbo.outputs`, and of a
    `keras.losses.Loss` of one's own that sets the class attribute
    `is_reconstruction_loss = True`. The estimators that need each example's
    log-likelihood (evaluation, `ELBOModel(objective="iwae")`) check it.
    """
    return isinstance(loss, keras.losses.Loss) and (
        isinstance(loss, (BernoulliNLL, GaussianNLL))
        or getattr(loss, "is_reconstruction_loss", False) is True
    )
