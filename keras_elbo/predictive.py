"""Predictive uncertainty: moments of a model's output over posterior samples."""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_elbo import _math
from keras_elbo.posteriors import Posterior

TASKS = ("regression", "classification")


def _stochastic_layers(model):
    """The layers of `model` (nested ones included) with an `inference` switch."""
    return [
        layer
        for layer in model._flatten_layers(include_self=True)
        if isinstance(getattr(layer, "inference", None), str)
    ]


class _Moments:
    """Running mean and sum of squared deviations over samples (axis 0), in
    float64, merged chunk by chunk (Chan et al.'s parallel form of Welford's
    update): no cancellation when the spread is small against the mean."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values):
        k = values.shape[0]
        mean = values.mean(axis=0)
        m2 = ((values - mean) ** 2).sum(axis=0)
        total = self.count + k
        delta = mean - self.mean
        self.mean = self.mean + delta * (k / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * k / total)
        self.count = total


def _probabilities(outputs, from_logits):
    """Class probabilities, float64: the last axis holds the classes, or one
    probability of the positive class (sigmoid output) when it has size 1."""
    if not from_logits:
        return outputs
    if outputs.shape[-1] == 1:
        return 0.5 * (1.0 + np.tanh(0.5 * outputs))  # sigmoid, without overflow
    shifted = outputs - outputs.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def _entropy(p):
    """-sum(p * log(p)) over the last axis (0 * log 0 = 0), in nats."""
    if p.shape[-1] == 1:
        p = np.concatenate([1.0 - p, p], axis=-1)
    p = np.clip(p, 0.0, 1.0)
    safe = np.where(p > 0, p, 1.0)
    return -np.sum(p * np.log(safe), axis=-1)


def predictive_moments(
    model: keras.Model,
    x,
    num_samples: int = 100,
    task: str = "regression",
    batch_size: int = 256,
    from_logits: bool = False,
    verbose: int = 0,
) -> dict:
    """Moments of the predictive distribution of a model over posterior samples.

    Runs `model` `num_samples` times on `x`, each time with fresh samples of
    its stochastic layers' weights or latents (`BayesianDense`,
    `BayesianConv2D`, `GaussianPosterior`, ...), and summarises the outputs.
    Every layer of the model (nested ones included) that has an `inference`
    attribute is switched to `inference="sample"` for the duration of the
    call, so that it samples even if it was built with `inference="mean"`,
    and switched back afterwards, also when the call fails. The model runs
    with `training=False`: dropout is off and batch normalization uses its
    moving statistics, so the spread comes from the posteriors alone. As in
    `predict`, each pass also updates the models' logged KL metrics.

    The passes are vectorised when every stochastic layer draws independent
    samples per example (only posterior layers such as `GaussianPosterior`):
    each batch of `x` is then tiled `num_samples` times into one call.
    Bayesian layers draw one weight sample per call, shared by the batch
    (Flipout too, up to signs), so with them the passes are separate calls,
    each over `x` in batches of `batch_size`.

    For regression the model's output is taken to be the prediction (for
    instance the mean of a `GaussianNLL` likelihood): `stddev` is the
    epistemic spread of that prediction over the posterior. Add the
    likelihood's own variance for the spread of new observations
    (`total_variance = stddev**2 + noise_scale**2`).

    Formula:

    ```python
    y_s = model(x) with weights / latents sampled from the posterior, s = 1..S
    # task="regression"
    mean = mean_s(y_s);  stddev = sqrt(sum_s((y_s - mean)**2) / (S - 1))
    # task="classification", p_s = y_s (or softmax / sigmoid of y_s)
    probabilities = mean_s(p_s)
    entropy = -sum_c(probabilities * log(probabilities))           # total
    mutual_information = entropy - mean_s(-sum_c(p_s * log(p_s)))  # epistemic
    ```

    Args:
        model: a Keras model with a single tensor output.
        x: the inputs, an array of shape `(n, ...)`.
        num_samples: number of passes S, at least 2. Defaults to `100`.
        task: `"regression"` or `"classification"`. For classification the
            model outputs class probabilities over its last axis (softmax),
            or one probability of the positive class (sigmoid) when the last
            axis has size 1. Defaults to `"regression"`.
        batch_size: examples of `x` per model call (times `num_samples` when
            the passes are vectorised). Defaults to `256`.
        from_logits: whether a classifier outputs logits instead of
            probabilities. Defaults to `False`.
        verbose: `1` shows a progress bar over the batches. Defaults to `0`.

    Returns:
        A dict of float64 NumPy arrays. Regression: `"mean"` and `"stddev"`,
        each of the model's output shape `(n, ...)`. Classification:
        `"probabilities"` (the mean probabilities, the output's shape),
        `"entropy"` (the predictive entropy in nats, shape `(n, ...)`
        without the class axis) and `"mutual_information"` (its epistemic
        part, between the prediction and the weights, same shape).

    Example:

    >>> import numpy as np
    >>> from keras_elbo.bayesian import BayesianDense
    >>> model = keras.Sequential([keras.Input((2,)), BayesianDense(1, seed=0)])
    >>> moments = predictive_moments(model, np.ones((5, 2)), num_samples=20)
    >>> tuple(moments["mean"].shape), tuple(moments["stddev"].shape)
    ((5, 1), (5, 1))
    >>> model.layers[0].inference  # restored
    'mean'

    Reference: Gal, 2016, "Uncertainty in deep learning" (section 3.3:
    predictive entropy and mutual information).
    """
    if not isinstance(model, keras.Model):
        raise _math.invalid_argument("model", "a Keras model", model)
    num_samples = _math.integer("num_samples", num_samples, minimum=2)
    task = _math.choice("task", task, TASKS)
    batch_size = _math.integer("batch_size", batch_size)
    from_logits = _math.boolean("from_logits", from_logits)
    x = np.asarray(x)
    if x.ndim < 1 or len(x) == 0:
        raise _math.invalid_argument("x", "an array of shape (n, ...) with n >= 1", x.shape)
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype("float32")

    stochastic = _stochastic_layers(model)
    # Tiling x is only right when each example gets its own samples.
    vectorised = all(isinstance(layer, Posterior) for layer in stochastic)
    saved = [(layer, layer.inference) for layer in stochastic]
    try:
        for layer in stochastic:
            layer.inference = "sample"
        # Traced after the switch: the layers read `inference` when traced.
        spec = tf.TensorSpec([None, *x.shape[1:]], tf.as_dtype(x.dtype))

        @tf.function(input_signature=[spec])
        def passes(batch):
            """Outputs of shape (k, b, ...): k = num_samples passes, or 1."""
            if vectorised:
                multiples = [num_samples] + [1] * (len(x.shape) - 1)
                outputs = model(tf.tile(batch, multiples), training=False)
            else:
                outputs = model(batch, training=False)
            if not tf.is_tensor(outputs):
                raise ValueError(
                    "predictive_moments needs a model with a single tensor output; "
                    f"model '{model.name}' returns {type(outputs).__name__}."
                )
            k = num_samples if vectorised else 1
            return tf.reshape(
                outputs, tf.concat([[k, tf.shape(batch)[0]], tf.shape(outputs)[1:]], 0)
            )

        steps = math.ceil(len(x) / batch_size)
        progbar = keras.utils.Progbar(steps, verbose=verbose)
        results = []
        for i, start in enumerate(range(0, len(x), batch_size)):
            batch = x[start : start + batch_size]
            results.append(_summarise(passes, batch, num_samples, vectorised, task, from_logits))
            progbar.update(i + 1)
    finally:
        for layer, inference in saved:
            layer.inference = inference
    return {key: np.concatenate([r[key] for r in results]) for key in results[0]}


def _summarise(passes, batch, num_samples, vectorised, task, from_logits):
    """The moments over `num_samples` passes of one batch."""
    calls = 1 if vectorised else num_samples
    if task == "regression":
        moments = _Moments()
        for _ in range(calls):
            moments.update(passes(batch).numpy().astype(np.float64))
        return {"mean": moments.mean, "stddev": np.sqrt(moments.m2 / (num_samples - 1))}
    total_probs, total_entropy = 0.0, 0.0
    for _ in range(calls):
        probs = _probabilities(passes(batch).numpy().astype(np.float64), from_logits)
        total_probs = total_probs + probs.sum(axis=0)
        total_entropy = total_entropy + _entropy(probs).sum(axis=0)
    probabilities = total_probs / num_samples
    entropy = _entropy(probabilities)
    # Clipped at zero: MI >= 0 exactly, float round-off can make it -1e-17.
    mutual_information = np.maximum(entropy - total_entropy / num_samples, 0.0)
    return {
        "probabilities": probabilities,
        "entropy": entropy,
        "mutual_information": mutual_information,
    }
