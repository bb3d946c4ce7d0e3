"""Calibration: whether predicted probabilities and intervals match outcomes.

What a user measures right after training a Bayesian network: the metrics
take the output of `predictive_moments` (a regression's predictive mean and
standard deviation, a classifier's mean probabilities) and the targets, and
return floats. The classification metrics are also Keras metrics for
`model.compile(metrics=[...])`, with one implementation (`keras.ops`, every
backend) behind both. Temperature scaling (Guo et al., 2017) is fitted on
held-out logits in NumPy.

Conventions: a classifier's `probabilities` are `(n, num_classes)` (softmax
outputs), or `(n,)` / `(n, 1)` probabilities of the positive class (sigmoid
outputs); labels are integers `(n,)` / `(n, 1)` or one-hot `(n, num_classes)`.
Regression values are `(n, ...)`: a Gaussian NLL is summed over the output
axes and averaged over examples (nats per example, as the library's losses);
coverage counts every scalar output.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_elbo import _math

DEFAULT_LEVELS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05, ..., 0.95


def _probabilities(y_pred, from_logits):
    """`(n, num_classes)` float32 probabilities; a `(n,)` or `(n, 1)` output
    is the positive class's probability of a binary classifier."""
    y_pred = ops.convert_to_tensor(y_pred, "float32")
    if len(y_pred.shape) == 1:
        y_pred = y_pred[:, None]
    if len(y_pred.shape) != 2:
        raise ValueError(
            "Expected probabilities of shape (n, num_classes), or (n,) / (n, 1) for the "
            f"positive class of a binary classifier. Received: shape {tuple(y_pred.shape)}"
        )
    if y_pred.shape[-1] == 1:
        p = ops.sigmoid(y_pred) if from_logits else y_pred
        return ops.concatenate([1.0 - p, p], axis=-1)
    return ops.softmax(y_pred, axis=-1) if from_logits else y_pred


def _labels(y_true, num_classes):
    """Integer labels `(n,)` from integer labels `(n,)` / `(n, 1)`, or from
    one-hot rows `(n, num_classes)` (their argmax)."""
    y_true = ops.convert_to_tensor(y_true)
    if len(y_true.shape) == 2 and y_true.shape[-1] == num_classes and num_classes > 1:
        return ops.cast(ops.argmax(y_true, axis=-1), "int32")
    return ops.cast(ops.reshape(y_true, (-1,)), "int32")


def _one_hot_labels(y_true, probabilities):
    """The labels as one-hot float32 rows of `probabilities`' classes."""
    num_classes = probabilities.shape[-1]
    return ops.one_hot(_labels(y_true, num_classes), num_classes, dtype="float32")


def _check_labels(y_true, n, num_classes):
    """Integer labels `(n,)` (NumPy) from `y_true`, checked: `n` of them, in
    `0..num_classes - 1`. (The functions check; the metrics, which run inside
    compiled steps, cannot.)"""
    y = np.asarray(y_true)
    one_hot = y.ndim == 2 and y.shape[-1] == num_classes and num_classes > 1
    labels = y.argmax(-1) if one_hot else y.reshape(-1)
    if len(labels) != n or np.any(labels != np.round(labels)):
        raise ValueError(
            f"Expected {n} integer labels (or one-hot rows of {num_classes}). Received: "
            f"y_true of shape {y.shape}"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"Expected labels in 0..{num_classes - 1}. Received: labels from "
            f"{labels.min():g} to {labels.max():g}"
        )
    return labels.astype(int)


def _checked(y_true, probabilities, from_logits):
    """Checks the functions' probabilities (in [0, 1] unless logits) and labels."""
    p = np.asarray(probabilities, dtype="float64")
    bad = not np.all(np.isfinite(p)) or (not from_logits and (p.min() < 0.0 or p.max() > 1.0))
    if bad:
        raise ValueError(
            "Expected finite probabilities in [0, 1] (pass from_logits=True for "
            f"logits). Received: values from {np.min(p):g} to {np.max(p):g}"
        )
    num_classes = 2 if p.ndim == 1 or p.shape[-1] == 1 else p.shape[-1]
    _check_labels(y_true, len(p), num_classes)


def _confidence_and_correct(y_true, y_pred, from_logits):
    """The top class's probability and whether it is the label, `(n,)` each."""
    p = _probabilities(y_pred, from_logits)
    labels = _labels(y_true, p.shape[-1])
    correct = ops.cast(ops.equal(ops.cast(ops.argmax(p, axis=-1), "int32"), labels), "float32")
    return ops.max(p, axis=-1), correct


def _bin_counts(confidence, correct, num_bins, sample_weight=None):
    """Per bin of confidence (equal widths, right-closed: `((b - 1) / M, b / M]`),
    the weight of its examples, the sum of their confidences and of their
    correct predictions: three `(num_bins,)` tensors."""
    index = ops.cast(ops.ceil(confidence * num_bins), "int32") - 1
    index = ops.clip(index, 0, num_bins - 1)
    weight = ops.ones_like(confidence) if sample_weight is None else sample_weight
    one_hot = ops.one_hot(index, num_bins, dtype="float32") * weight[:, None]
    return (
        ops.sum(one_hot, axis=0),
        ops.sum(one_hot * confidence[:, None], axis=0),
        ops.sum(one_hot * correct[:, None], axis=0),
    )


def _weights(sample_weight, n):
    if sample_weight is None:
        return None
    return ops.reshape(ops.cast(ops.convert_to_tensor(sample_weight), "float32"), (n,))


@keras.saving.register_keras_serializable(package="keras_elbo")
class ExpectedCalibrationError(keras.metrics.Metric):
    """Expected calibration error of a classifier's top-class probability.

    Predictions are grouped in `num_bins` equal-width bins of their
    confidence (the largest class probability); the ECE is the average, over
    bins weighted by their number of predictions, of the gap between the
    bin's accuracy and its mean confidence (Naeini et al., 2015; Guo et al.,
    2017). 0 for a calibrated classifier; at most 1. Accumulated over
    batches: the bins of the whole epoch, not an average of batches' ECEs.
    Bins are right-closed, as Guo et al. define them (TFP's
    `tfp.stats.expected_calibration_error` closes them on the left: the two
    differ only for confidences exactly on a bin edge).

    Formula:

    ```python
    conf = max_c(p);  correct = argmax_c(p) == label
    bin(conf) = b  where  (b - 1) / num_bins < conf <= b / num_bins
    ece = sum_b |sum_{i in b}(correct_i) - sum_{i in b}(conf_i)| / n
        = sum_b (n_b / n) * |accuracy_b - confidence_b|
    ```

    Args:
        num_bins: number of equal-width bins of [0, 1]. Defaults to `15`.
        from_logits: whether predictions are logits (softmax, or sigmoid for
            one output). Defaults to `False`.
        name: name of the metric. Defaults to `"expected_calibration_error"`.
        dtype: dtype of the result. Defaults to `None`.

    Example:

    >>> import numpy as np
    >>> ece = ExpectedCalibrationError(num_bins=2)
    >>> probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.1, 0.9]])
    >>> ece.update_state([0, 1, 1, 0], probabilities)
    >>> round(float(ece.result()), 4)  # bin (0.5, 1]: accuracy 0.75, confidence 0.8
    0.05

    Reference: Guo et al., 2017, "On calibration of modern neural networks".
    """

    def __init__(
        self,
        num_bins: int = 15,
        from_logits: bool = False,
        name: str = "expected_calibration_error",
        dtype=None,
    ):
        super().__init__(name=name, dtype=dtype)
        self.num_bins = _math.integer("num_bins", num_bins)
        self.from_logits = _math.boolean("from_logits", from_logits)
        self.counts, self.confidence_sums, self.correct_sums = (
            self.add_variable(shape=(self.num_bins,), initializer="zeros", name=part)
            for part in ("counts", "confidence_sums", "correct_sums")
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        confidence, correct = _confidence_and_correct(y_true, y_pred, self.from_logits)
        weight = _weights(sample_weight, ops.shape(confidence)[0])
        for variable, value in zip(
            (self.counts, self.confidence_sums, self.correct_sums),
            _bin_counts(confidence, correct, self.num_bins, weight),
            strict=True,
        ):
            variable.assign_add(ops.cast(value, variable.dtype))

    def result(self):
        gaps = ops.sum(ops.abs(self.correct_sums - self.confidence_sums))
        return gaps / ops.maximum(ops.sum(self.counts), 1e-12)

    def get_config(self):
        return {
            **super().get_config(),
            "num_bins": self.num_bins,
            "from_logits": self.from_logits,
        }


@keras.saving.register_keras_serializable(package="keras_elbo")
class BrierScore(keras.metrics.Mean):
    """The Brier score: the mean squared error of the class probabilities.

    Summed over classes, averaged over examples (Brier, 1950): 0 for certain
    and correct predictions, 2 at most (TFP's `tfp.stats.brier_score` is this
    minus 1). A binary classifier's one output
    (the positive class's probability) counts both classes, so its score is
    twice the one-output form `mean((p - y)**2)`.

    Formula:

    ```python
    brier = mean_i(sum_c((p_ic - onehot(label_i)_c)**2))
    ```

    Args:
        from_logits: whether predictions are logits. Defaults to `False`.
        name: name of the metric. Defaults to `"brier_score"`.
        dtype: dtype of the result. Defaults to `None`.

    Example:

    >>> import numpy as np
    >>> brier = BrierScore()
    >>> brier.update_state([0, 1], np.array([[0.9, 0.1], [0.5, 0.5]]))
    >>> round(float(brier.result()), 4)  # (0.01 + 0.01 + 0.25 + 0.25) / 2
    0.26
    """

    def __init__(self, from_logits: bool = False, name: str = "brier_score", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.from_logits = _math.boolean("from_logits", from_logits)

    def update_state(self, y_true, y_pred, sample_weight=None):
        p = _probabilities(y_pred, self.from_logits)
        one_hot = _one_hot_labels(y_true, p)
        per_example = ops.sum(ops.square(p - one_hot), axis=-1)
        weight = _weights(sample_weight, ops.shape(per_example)[0])
        super().update_state(per_example, sample_weight=weight)

    def get_config(self):
        return {**super().get_config(), "from_logits": self.from_logits}


def _one_batch(metric, y_true, probabilities, from_logits):
    _checked(y_true, probabilities, from_logits)
    metric.update_state(y_true, probabilities)
    return float(ops.convert_to_numpy(metric.result()))


def expected_calibration_error(
    y_true, probabilities, num_bins: int = 15, from_logits: bool = False
) -> float:
    """The ECE of `probabilities` against `y_true` (see
    `ExpectedCalibrationError`); for instance of `predictive_moments(...,
    task="classification")["probabilities"]`."""
    metric = ExpectedCalibrationError(num_bins, from_logits)
    return _one_batch(metric, y_true, probabilities, from_logits)


def brier_score(y_true, probabilities, from_logits: bool = False) -> float:
    """The Brier score of `probabilities` against `y_true` (see `BrierScore`)."""
    return _one_batch(BrierScore(from_logits), y_true, probabilities, from_logits)


def classification_nll(y_true, probabilities, from_logits: bool = False) -> float:
    """The mean negative log-probability of the labels, in nats.

    Probabilities are clipped below at `keras.config.epsilon()` (as Keras's
    crossentropy does), so that one confident mistake is a large number, not
    infinity.

    Formula:

    ```python
    nll = mean_i(-log(max(p_i[label_i], epsilon)))
    ```
    """
    _checked(y_true, probabilities, from_logits)
    p = _probabilities(probabilities, from_logits)
    one_hot = _one_hot_labels(y_true, p)
    p_label = ops.sum(p * one_hot, axis=-1)
    nll = -ops.log(ops.maximum(p_label, keras.config.epsilon()))
    return float(ops.convert_to_numpy(ops.mean(nll)))


def reliability_bins(y_true, probabilities, num_bins: int = 15, from_logits: bool = False) -> dict:
    """The bins of a reliability diagram (see `ExpectedCalibrationError`).

    Returns:
        A dict of float64 NumPy arrays of shape `(num_bins,)`: `"edges"` (the
        upper edge of each bin), `"count"`, `"confidence"` and `"accuracy"`
        (the bin's means; NaN for an empty bin).
    """
    _checked(y_true, probabilities, from_logits)
    num_bins = _math.integer("num_bins", num_bins)
    confidence, correct = _confidence_and_correct(y_true, probabilities, from_logits)
    count, confidence_sum, correct_sum = (
        np.asarray(ops.convert_to_numpy(t), "float64")
        for t in _bin_counts(confidence, correct, num_bins)
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "edges": np.arange(1, num_bins + 1) / num_bins,
            "count": count,
            "confidence": np.where(count > 0, confidence_sum / count, np.nan),
            "accuracy": np.where(count > 0, correct_sum / count, np.nan),
        }


def reliability_diagram(
    y_true, probabilities, num_bins: int = 15, from_logits: bool = False, ax=None
):
    """Plots a reliability diagram: each bin's accuracy against its
    confidence, with the diagonal of perfect calibration and the ECE in the
    title. Needs matplotlib (the `demo` extra).

    Args:
        y_true, probabilities, num_bins, from_logits: as
            `expected_calibration_error`.
        ax: a matplotlib `Axes` to draw on; a new figure's when `None`.

    Returns:
        The `Axes`: one bar per bin, of height the bin's accuracy (0 for an
        empty bin), its left edge at the bin's lower edge.
    """
    import matplotlib.pyplot as plt

    bins = reliability_bins(y_true, probabilities, num_bins, from_logits)
    ece = expected_calibration_error(y_true, probabilities, num_bins, from_logits)
    if ax is None:
        ax = plt.figure(figsize=(4, 4)).add_subplot()
    width = 1.0 / num_bins
    ax.bar(
        bins["edges"] - width,
        np.nan_to_num(bins["accuracy"]),
        width=width,
        align="edge",
        edgecolor="black",
        label="accuracy",
    )
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", label="calibrated")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="confidence",
        ylabel="accuracy",
        title=f"ECE = {ece:.3f} ({num_bins} bins)",
    )
    ax.legend(loc="upper left")
    return ax


def fit_temperature(logits, y_true, bounds=(1e-2, 1e2)) -> float:
    """Temperature scaling: the T that minimises the NLL of `softmax(logits / T)`.

    Fit it on held-out data (never the training set), then divide the
    model's logits by T, for instance with a final
    `keras.layers.Rescaling(1 / T)`: accuracy is unchanged, confidence is
    rescaled. The NLL is convex in `1 / T`, so bisection of its derivative
    (in float64 NumPy) finds the minimum within `bounds`; a bound is returned
    when the minimum lies beyond it (separable data, where the NLL falls
    forever as T shrinks).

    Formula:

    ```python
    nll(T) = mean_i(logsumexp(logits_i / T) - logits_i[label_i] / T)
    T = argmin_T nll(T)
    ```

    Args:
        logits: `(n, num_classes)` logits, or `(n,)` / `(n, 1)` logits of the
            positive class of a binary classifier.
        y_true: integer labels `(n,)` / `(n, 1)` or one-hot rows.
        bounds: the range of T searched. Defaults to `(1e-2, 1e2)`.

    Returns:
        T, a float.

    Example:

    >>> import numpy as np
    >>> logits = np.array([[4.0, 0.0], [4.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    >>> round(fit_temperature(logits, [0, 0, 1, 1]), 3)  # overconfident: T > 1
    3.641

    Reference: Guo et al., 2017, "On calibration of modern neural networks".
    """
    low, high = (_math.real("bounds", b, positive=True) for b in bounds)
    if not low < high:
        raise _math.invalid_argument("bounds", "(low, high) with 0 < low < high", bounds)
    logits = np.asarray(logits, dtype="float64")
    if logits.ndim == 1 or logits.shape[-1] == 1:
        logits = np.concatenate([np.zeros((len(logits), 1)), logits.reshape(-1, 1)], axis=-1)
    if logits.ndim != 2 or not np.all(np.isfinite(logits)):
        raise _math.invalid_argument(
            "logits", "finite logits of shape (n, num_classes), (n,) or (n, 1)", logits.shape
        )
    labels = _check_labels(y_true, len(logits), logits.shape[-1])
    label_logits = logits[np.arange(len(labels)), labels]

    def slope(beta):  # d nll / d beta, beta = 1 / T: increasing in beta
        scaled = beta * logits
        weights = np.exp(scaled - scaled.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        return float(np.mean((weights * logits).sum(-1) - label_logits))

    beta_low, beta_high = math.log(1.0 / high), math.log(1.0 / low)  # in log beta
    if slope(math.exp(beta_low)) >= 0:
        return float(high)
    if slope(math.exp(beta_high)) <= 0:
        return float(low)
    for _ in range(100):
        middle = 0.5 * (beta_low + beta_high)
        if slope(math.exp(middle)) < 0:
            beta_low = middle
        else:
            beta_high = middle
    return float(math.exp(-0.5 * (beta_low + beta_high)))


def _regression(y, mean, stddev):
    y, mean, stddev = (ops.convert_to_tensor(np.asarray(a, "float32")) for a in (y, mean, stddev))
    if not (tuple(y.shape) == tuple(mean.shape) == tuple(stddev.shape)) or len(y.shape) == 0:
        raise ValueError(
            "Expected y, mean and stddev of one shape (n, ...). Received: shapes "
            f"{tuple(y.shape)}, {tuple(mean.shape)}, {tuple(stddev.shape)}"
        )
    if not bool(ops.convert_to_numpy(ops.all(stddev > 0))):
        raise ValueError("Expected stddev > 0 everywhere (the predictive standard deviation).")
    return y, mean, stddev


def gaussian_predictive_nll(y, mean, stddev) -> float:
    """The negative log-likelihood of `y` under independent Gaussians
    `N(mean, stddev**2)`, in nats per example: summed over the output axes,
    averaged over examples. With `predictive_moments`' output, use the total
    standard deviation, `sqrt(stddev**2 + noise_scale**2)`.

    Formula:

    ```python
    nll = mean_i(sum_j(0.5 * ((y_ij - mean_ij) / stddev_ij)**2 + log(stddev_ij)
                       + 0.5 * log(2 * pi)))
    ```
    """
    y, mean, stddev = _regression(y, mean, stddev)
    terms = 0.5 * ops.square((y - mean) / stddev) + ops.log(stddev) + 0.5 * math.log(2 * math.pi)
    per_example = ops.sum(ops.reshape(terms, (ops.shape(terms)[0], -1)), axis=-1)
    return float(ops.convert_to_numpy(ops.mean(per_example)))


def interval_coverage(y, mean, stddev, levels=(0.5, 0.9, 0.95)) -> dict:
    """The fraction of targets inside the central Gaussian interval of each
    level: calibrated predictions cover a fraction `level` of them.

    Formula:

    ```python
    half_width(level) = stddev * sqrt(2) * erfinv(level)   # the (1 + level) / 2 quantile
    coverage(level) = mean_ij(|y_ij - mean_ij| <= half_width_ij(level))
    ```

    Returns:
        `{level: coverage}` for each level in (0, 1).
    """
    y, mean, stddev = _regression(y, mean, stddev)
    coverage = {}
    for level in levels:
        level = _math.real("levels", level, positive=True)
        if level >= 1:
            raise _math.invalid_argument("levels", "levels in (0, 1)", level)
        z = math.sqrt(2.0) * float(ops.convert_to_numpy(ops.erfinv(ops.convert_to_tensor(level))))
        inside = ops.cast(ops.abs(y - mean) <= z * stddev, "float32")
        coverage[level] = float(ops.convert_to_numpy(ops.mean(inside)))
    return coverage


def coverage_calibration_error(y, mean, stddev, levels=DEFAULT_LEVELS) -> float:
    """The mean absolute gap between the coverage of central intervals and
    their levels: 0 for calibrated Gaussian predictions; positive when the
    intervals are too narrow (overconfident) or too wide.

    Formula:

    ```python
    error = mean_over_levels(|coverage(level) - level|)   # levels 0.05, 0.10, ..., 0.95
    ```
    """
    coverage = interval_coverage(y, mean, stddev, levels)
    return float(np.mean([abs(covered - level) for level, covered in coverage.items()]))
