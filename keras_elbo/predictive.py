"""Predictive uncertainty: moments of a model's output over posterior samples."""

import math

import keras
import numpy as np
from keras import ops

from keras_elbo import _backend, _math
from keras_elbo._base import batch_iterable, sampling, stochastic_layers
from keras_elbo.posteriors import Posterior

TASKS = ("regression", "classification")


def _input_rank(model):
    """The rank of the model's one input, batch axis included, if known."""
    try:
        inputs = model.inputs  # unset in a subclassed or unbuilt model
    except (AttributeError, ValueError):
        return None
    return len(inputs[0].shape) if inputs and len(inputs) == 1 else None


def _as_input(batch):
    """A batch of inputs as a NumPy array passed to the model: floats as
    float32."""
    batch = np.asarray(batch)
    return batch.astype("float32") if np.issubdtype(batch.dtype, np.floating) else batch


def _input_batches(model, x, batch_size):
    """The inputs `x` in batches: `(steps, batches)`, with `steps` the number
    of batches (`None` if unknown) and `batches` an iterable of NumPy arrays.

    `x` is what `Model.evaluate` takes as inputs: an array of shape `(n,
    ...)`, cut in batches of `batch_size`, or batches (a batched
    `tf.data.Dataset`, a `keras.utils.PyDataset`, a generator, a PyTorch
    `DataLoader`) each `x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)`, of
    which only `x` is used.
    """
    if _backend.is_tf_dataset(x):
        import tensorflow as tf

        x_spec = keras.utils.unpack_x_y_sample_weight(x.element_spec)[0]
        if not isinstance(x_spec, tf.TensorSpec) or x_spec.shape.rank in (None, 0):
            raise _math.invalid_argument(
                "x",
                "a batched tf.data.Dataset whose elements are x, (x, y) or (x, y, "
                "sample_weight), with x one tensor of shape (batch, ...)",
                f"a dataset of element_spec {x.element_spec}",
            )
        rank = _input_rank(model)
        if rank == x_spec.shape.rank + 1:
            raise _math.invalid_argument(
                "x",
                f"a batched tf.data.Dataset (model '{model.name}' takes inputs of rank "
                f"{rank}, batch axis included): call `dataset.batch(batch_size)`",
                f"a dataset of element_spec {x.element_spec}",
            )
        cardinality = int(x.cardinality())
        if cardinality == 0:
            raise _math.invalid_argument("x", "at least one example", x)
        steps = cardinality if cardinality > 0 else None
        batches = (_as_input(keras.utils.unpack_x_y_sample_weight(e)[0]) for e in x)
        return steps, batches
    iterable = batch_iterable(x)
    if iterable is not None:
        elements, steps = iterable
        return steps, _checked_inputs(elements, model)
    x = np.asarray(x)
    if x.ndim < 1 or len(x) == 0:
        expected = "at least one example: an array of shape (n, ...) with n >= 1"
        raise _math.invalid_argument("x", expected, f"an array of shape {x.shape}")
    x = _as_input(x)
    batches = (x[start : start + batch_size] for start in range(0, len(x), batch_size))
    return math.ceil(len(x) / batch_size), batches


def _checked_inputs(elements, model):
    """The `x` of each batch of a `PyDataset`, generator or `DataLoader`
    (`_base.batch_iterable`), checked as it comes."""
    rank = _input_rank(model)
    for element in elements:
        x = keras.utils.unpack_x_y_sample_weight(element)[0]
        if not isinstance(x, np.ndarray):
            raise _math.invalid_argument(
                "x", "batches whose x is one array of shape (batch, ...)", f"a batch x of {x!r}"
            )
        if rank is not None and x.ndim == rank - 1:
            raise _math.invalid_argument(
                "x",
                f"batches (model '{model.name}' takes inputs of rank {rank}, batch axis included)",
                f"a single example of shape {x.shape}",
            )
        yield _as_input(x)


class _Passes(keras.Model):
    """Outputs of `model` on a batch, shape `(k, batch, ...)`: `num_samples`
    passes in one call of the batch tiled `num_samples` times (vectorised),
    or one pass.

    Called through `predict_on_batch`, which runs it as Keras runs a model's
    own predict step on each backend: a `tf.function` on TensorFlow,
    `jax.jit` on JAX (the layers' seed generators' states threaded through
    the call and written back, so that each call draws new samples), eagerly
    under `no_grad` on PyTorch; with XLA where the model's `jit_compile` says
    so. The model is not changed: its own predict function is left alone.
    """

    def __init__(self, model, num_samples, vectorised):
        # float32 inputs stay float32 under a mixed-precision policy.
        super().__init__(dtype="float32", name="predictive_passes")
        self.inner = model
        self.num_samples = num_samples if vectorised else 1
        self.jit_compile = model.jit_compile
        # A built model needs no eager call to build this one.
        self.built = model.built

    def call(self, batch):
        k, size = self.num_samples, ops.shape(batch)[0]
        if k > 1:
            batch = ops.tile(batch, [k] + [1] * (len(batch.shape) - 1))
        outputs = self.inner(batch, training=False)
        if keras.tree.is_nested(outputs):
            raise ValueError(
                "predictive_moments needs a model with a single tensor output; "
                f"model '{self.inner.name}' returns {type(outputs).__name__}."
            )
        return ops.reshape(outputs, (k, size, *ops.shape(outputs)[1:]))


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


# Machine epsilon of the float types a model may output, by name (NumPy has
# no `finfo` for bfloat16).
_EPSILON = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}


def _check_probabilities(outputs, model_name):
    """Raises `ValueError` unless `outputs` (one pass, NumPy, in the model's
    output dtype) hold probabilities: within [0, 1], and along a class axis
    of size C > 1, rows summing to 1.

    A softmax computed in floating point, `exp(x - max) / sum(exp(x - max))`,
    has rows summing to 1 within about (C + 3) round-offs of eps / 2 (the
    exponentials, the sum of C terms, the division); the check allows
    (C + 8) * eps, twice that and then some, which logits all but never meet.
    """
    fix = (
        "If the model outputs logits, add a softmax (a sigmoid for one output) "
        "as its last activation, or pass from_logits=True."
    )
    if outputs.size == 0:
        return
    if not np.all(np.isfinite(outputs)):
        raise ValueError(
            f"predictive_moments(task='classification'): model '{model_name}' returned NaN or Inf."
        )
    low, high = float(outputs.min()), float(outputs.max())
    if low < 0 or high > 1:
        raise ValueError(
            f"predictive_moments(task='classification', from_logits=False) expects "
            f"probabilities, but model '{model_name}' returned values from {low:g} to "
            f"{high:g}. {fix}"
        )
    classes = outputs.shape[-1]
    if classes > 1:
        error = np.abs(outputs.astype(np.float64).sum(axis=-1) - 1.0)
        tolerance = (classes + 8) * _EPSILON.get(outputs.dtype.name, _EPSILON["float32"])
        if error.max() > tolerance:
            raise ValueError(
                f"predictive_moments(task='classification', from_logits=False) expects "
                f"class probabilities that sum to 1 over the last axis, but rows of "
                f"model '{model_name}' sum to 1 +- {error.max():.3g} (allowed: "
                f"{tolerance:.2g}). {fix}"
            )


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
    moving statistics, so the spread comes from the posteriors alone.

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
        x: the inputs, as `Model.evaluate` takes them: an array of shape
            `(n, ...)`, or batches (a batched `tf.data.Dataset`, on any
            backend where TensorFlow is installed; a `keras.utils.PyDataset`;
            a generator; a PyTorch `DataLoader`) each `x`, `(x, y)` or
            `(x, y, sample_weight)`, of which only `x` is used (its batches
            replace `batch_size`).
        num_samples: number of passes S, at least 2. Defaults to `100`.
        task: `"regression"` or `"classification"`. For classification the
            model outputs class probabilities over its last axis (softmax),
            or one probability of the positive class (sigmoid) when the last
            axis has size 1. Defaults to `"regression"`.
        batch_size: examples of an array `x` per model call (times
            `num_samples` when the passes are vectorised). Defaults to `256`.
        from_logits: whether a classifier outputs logits instead of
            probabilities. With `False`, outputs that are not probabilities
            (below 0, above 1, or rows not summing to 1) raise a
            `ValueError`. Defaults to `False`.
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
    steps, batches = _input_batches(model, x, batch_size)

    stochastic = stochastic_layers(model)
    # Tiling x is only right when each example gets its own samples.
    vectorised = all(isinstance(layer, Posterior) for layer in stochastic)
    with sampling(stochastic):
        # Made after the switch: the layers read `inference` when traced.
        passes = _Passes(model, num_samples, vectorised)
        progbar = keras.utils.Progbar(steps, verbose=verbose)
        results = []
        for i, batch in enumerate(batches):
            results.append(
                _summarise(passes, batch, num_samples, vectorised, task, from_logits, model.name)
            )
            progbar.update(i + 1)
    if not results:  # a dataset of unknown length that held nothing
        raise _math.invalid_argument("x", "at least one example", x)
    return {key: np.concatenate([r[key] for r in results]) for key in results[0]}


def _summarise(passes, batch, num_samples, vectorised, task, from_logits, model_name):
    """The moments over `num_samples` passes of one batch."""
    calls = 1 if vectorised else num_samples
    if task == "regression":
        moments = _Moments()
        for _ in range(calls):
            moments.update(passes.predict_on_batch(batch).astype(np.float64))
        return {"mean": moments.mean, "stddev": np.sqrt(moments.m2 / (num_samples - 1))}
    total_probs, total_entropy = 0.0, 0.0
    for _ in range(calls):
        outputs = passes.predict_on_batch(batch)
        if not from_logits:
            _check_probabilities(outputs, model_name)
        probs = _probabilities(outputs.astype(np.float64), from_logits)
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
