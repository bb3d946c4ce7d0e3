"""Evaluation of trained latent-variable models: the ELBO and log p(x).

Both functions take a functional model built from this library's layers,
an encoder body, a posterior layer (`GaussianPosterior`) and a decoder,
compiled with a reconstruction loss from `keras_elbo.losses`. They split the
model at the posterior: the body gives the posterior's input features (and a
conditional prior's inputs), the decoder maps latent samples (and, for a
model of several inputs, the other inputs it reads, repeated per sample) to
the likelihood's parameters, and the compiled loss gives -log p(x|z) per
example.

A model of several posteriors is a top-down hierarchy: the posterior whose
inputs depend on no other's samples is split at, and the others, inside the
decoder, each draw one sample per row of theirs (per sample of the layers
above), so that every sample is drawn ancestrally. Their KLs, given the
samples above, enter the ELBO, and their log p(z_l | ...) - log q(z_l | ...)
the importance weights.

The first axis is the batch. A posterior applied to a feature map gives a
latent map, q of batch shape `(batch, h, w)` and event shape `(latent_dim,)`
(the prior is that of one position, broadcast over positions): its KL and
log-densities are summed over every axis but the batch, as `KLRegularizer`
sums them.
"""

import functools
import math
import weakref

import keras
import numpy as np
from keras import ops

from keras_elbo import _backend, _math
from keras_elbo import _objectives as objectives
from keras_elbo._base import (
    batch_iterable,
    features_and_prior_inputs,
    find_layers,
    reads_inputs_past_posteriors,
    split_at,
)
from keras_elbo.discrete import relaxed_samples_error
from keras_elbo.divergence import draw
from keras_elbo.losses import is_reconstruction_loss
from keras_elbo.posteriors import MultiSampleDraws, Posterior, drawing


class _LatentModel:
    """The parts of a model that the estimators need, found once."""

    def __init__(self, model, likelihood):
        posteriors = find_layers(model, Posterior)
        if not posteriors:
            raise ValueError(
                "Evaluation needs a model with a posterior layer (such as "
                f"GaussianPosterior); model '{model.name}' has none."
            )
        for posterior in posteriors:
            if posterior.kl_regularizer is None:
                raise ValueError(
                    f"Posterior layer '{posterior.name}' has no kl_regularizer, so "
                    "the model has no prior to evaluate it against."
                )
        try:
            inputs = model.inputs
        except AttributeError:  # a subclassed model has no graph to split
            inputs = None
        if not inputs:
            raise ValueError(
                f"Evaluation splits a model at its posterior layer, so it needs a "
                f"functional model (built from keras.Input); model '{model.name}' "
                f"({type(model).__name__}) is subclassed. Build the same layers "
                "functionally, or evaluate with `model.evaluate` (ELBOModel logs the "
                "single-sample ELBO's parts)."
            )
        self.num_inputs = len(inputs)
        self.posterior_layer, self.body, self.decoder, self.decoder_reads_inputs = split_at(
            posteriors, model
        )
        self.lower = [p for p in posteriors if p is not self.posterior_layer]
        if len(inputs) == 1 and reads_inputs_past_posteriors(posteriors, model):
            # The decoder would see the target itself.
            raise ValueError(
                f"Could not split model '{model.name}' at posterior "
                f"'{self.posterior_layer.name}': evaluation needs a functional model whose "
                "output depends on its input only through the posteriors' samples."
            )
        if likelihood is None:
            likelihood = getattr(model, "loss", None)
            if not is_reconstruction_loss(likelihood):
                raise ValueError(
                    "Pass `likelihood=`: a callable (y_true, y_pred) -> negative "
                    "log-likelihood per example. The model's compiled loss "
                    f"({likelihood!r}) is not a keras_elbo reconstruction loss (a "
                    "keras.losses.Loss of your own whose `call` returns it can say so "
                    "with the class attribute `is_reconstruction_loss = True`)."
                )
        self.nll = likelihood.call if isinstance(likelihood, keras.losses.Loss) else likelihood
        # The estimators run as the model's own predict function does.
        self.jit_compile = model.jit_compile

    def posterior(self, x):
        """q(z|x) of a batch (the top posterior's), and a conditional prior's
        inputs (else None)."""
        features, prior_inputs = features_and_prior_inputs(self.body(x, training=False))
        return self.posterior_layer.distribution(features), prior_inputs

    def log_likelihood(self, x, target, z, seed_generator):
        """log p(x|z) for samples z of shape `(S, B, *positions, d)`: `(S, B)`,
        and the records of the lower posteriors' draws (`MultiSampleDraws`;
        none for a model of one posterior).

        The decoder sees the samples as one batch of `S * B` latents of the
        posterior's output shape (`(S * B, h, w, d)` for a latent map),
        sample-major, and the targets (and the inputs a decoder reads) are
        tiled to match. The lower posteriors of a hierarchy draw one sample
        per row from `seed_generator`.
        """
        shape = ops.shape(z)
        num_samples, batch = shape[0], shape[1]

        def tiled(t):
            return ops.tile(t, [num_samples] + [1] * (len(t.shape) - 1))

        latents = self.posterior_layer.format_output(ops.reshape(z, (-1, *shape[2:])))
        draws = MultiSampleDraws(1, add_kl=False, seed_generator=seed_generator)
        with drawing(self.lower, draws):
            if self.decoder_reads_inputs:
                inputs = [tiled(t) for t in keras.tree.flatten(x)]
                params = self.decoder([latents, *inputs], training=False)
            else:
                params = self.decoder(latents, training=False)
        log_lik = -ops.cast(self.nll(tiled(target), params), z.dtype)
        return ops.reshape(log_lik, (num_samples, batch)), draws.take()


class _Estimators:
    """What the estimators build for one model, kept between calls.

    A new compiled function at each call would retrace on TensorFlow (which
    warns after five) and recompile on JAX. One per model, likelihood (the
    compiled loss when `None`: a new `compile` gives a new one) and
    `jit_compile`; its `_BatchFunction`s share one seed generator, set from
    the call's `seed` by `reseed`.
    """

    def __init__(self, model, likelihood):
        self.parts = _LatentModel(model, likelihood)
        self.seed_generator = _math.seed_generator(None, "evaluation")
        self._functions = {}

    def reseed(self, seed):
        start = _math.seed_generator(seed, "evaluation").state.value
        self.seed_generator.state.assign(start)

    def function(self, key, make_fn):
        """The `_BatchFunction` of `make_fn()` (a `fn(x, target,
        seed_generator)`), made the first time `key` is asked for."""
        if key not in self._functions:
            self._functions[key] = _BatchFunction(self.parts, make_fn(), self.seed_generator)
        return self._functions[key]


_ESTIMATORS = weakref.WeakKeyDictionary()  # model -> {key: _Estimators}


def _estimators(model, likelihood, seed):
    """The model's `_Estimators` for `likelihood`, reseeded from `seed`."""
    loss = likelihood if likelihood is not None else getattr(model, "loss", None)
    # The parts hold `loss` (its `call`), so its id is not reused while cached.
    key = (id(loss), model.jit_compile)
    per_model = _ESTIMATORS.setdefault(model, {})
    if key not in per_model:
        per_model[key] = _Estimators(model, likelihood)
    per_model[key].reseed(seed)
    return per_model[key]


class _BatchFunction(keras.Model):
    """`fn(x, target, seed_generator)` on one batch, as a model to predict with.

    `predict_on_batch` runs it as Keras runs a model's own predict step on
    each backend: a `tf.function` on TensorFlow, `jax.jit` on JAX (with the
    seed generator's state threaded through the call and written back, so
    that each call draws new samples), eagerly under `no_grad` on PyTorch;
    with XLA where the model's `jit_compile` says so. The layers `fn` uses
    are attributes, so that their variables are the function's.
    """

    def __init__(self, parts, fn, seed_generator):
        # float32 inputs stay float32 under a mixed-precision policy.
        super().__init__(dtype="float32", name=fn.__name__)
        self.body, self.posterior, self.decoder = parts.body, parts.posterior_layer, parts.decoder
        self.seed_generator = seed_generator
        self.fn = fn
        self.jit_compile = parts.jit_compile
        # Its layers are built (the model is): no eager call to build it,
        # which would draw samples outside the compiled function.
        self.built = True

    def call(self, inputs):
        x, target = inputs
        return self.fn(x, target, self.seed_generator)


_DATA_TYPES = (
    "`x` must be a NumPy array (or array-like) of shape `(n, ...)`, or batches as "
    "Model.evaluate takes them (a batched tf.data.Dataset, a keras.utils.PyDataset, a "
    "generator or a PyTorch DataLoader) yielding `x`, `(x, y)` or `(x, y, sample_weight)`"
)


def _data(x, batch_size, input_shape, y=None, num_inputs=1):
    """The batches of `x` as `(inputs, targets)` float32 NumPy pairs, and the
    number of batches (`None` if unknown).

    An array is its own target unless `y` is given. A model of `num_inputs`
    > 1 inputs takes `x` as a list of arrays and needs `y`. A dataset's
    element is `x` (its own target), `(x, y)` or `(x, y, sample_weight)`
    (`x` a tuple of arrays for several inputs); the weights are not used,
    since the results are per example.
    """
    if _backend.is_tf_dataset(x):
        return _dataset_batches(x, input_shape)
    iterable = batch_iterable(x)
    if iterable is not None:
        elements, steps = iterable
        return _checked_batches(elements, input_shape), steps
    if num_inputs > 1:
        if not isinstance(x, (list, tuple)) or len(x) != num_inputs:
            raise TypeError(
                f"The model takes {num_inputs} inputs: give `x` as a list of "
                f"{num_inputs} arrays (or batches of such tuples with their targets). "
                f"Received: x of type {type(x).__name__}"
            )
        if y is None:
            raise ValueError(
                f"The model takes {num_inputs} inputs: give the likelihood's target "
                "as `y=` (no input is the target by default)."
            )
        arrays = [_float_array(part, "x") for part in x]
    else:
        arrays = [_float_array(x, "x")]
    target = arrays[0] if y is None else _float_array(y, "y")
    sizes = {len(a) for a in arrays} | {len(target)}
    if len(sizes) > 1:
        raise ValueError(
            f"The inputs and the target hold different numbers of examples: {sorted(sizes)}."
        )

    def inputs(start):
        parts = [a[start : start + batch_size] for a in arrays]
        return parts if num_inputs > 1 else parts[0]

    batches = (
        (inputs(start), target[start : start + batch_size])
        for start in range(0, len(target), batch_size)
    )
    return batches, math.ceil(len(target) / batch_size)


def _float_array(x, name):
    try:
        array = np.asarray(x, dtype="float32")
    except (TypeError, ValueError) as err:
        raise TypeError(f"{_DATA_TYPES}. Received: {name} of type {type(x).__name__}") from err
    if array.ndim == 0 or array.shape[0] == 0:
        raise ValueError(
            f"`{name}` holds no examples: evaluation needs at least one. Received: "
            f"{name} of shape {array.shape}"
        )
    return array


def _is_inputs(x, types):
    """Whether `x` is one input of `types` or a list or tuple of them."""
    if isinstance(x, (list, tuple)):
        return bool(x) and all(isinstance(part, types) for part in x)
    return isinstance(x, types)


def _input_and_target(element, types):
    """`(x, y)` of a dataset element (or its spec), `y` of one of `types` and
    `x` too or a tuple of them (several inputs); one `x` is its own target."""
    if isinstance(element, tuple):
        if not 1 <= len(element) <= 3:
            raise ValueError(f"{_DATA_TYPES}. Received: a dataset of {len(element)}-tuples")
        if len(element) == 1:
            element = (element[0], element[0])
        else:
            element = (element[0], element[1])
    else:
        element = (element, element)
    x, y = element
    if not (_is_inputs(x, types) and isinstance(y, types)):
        raise TypeError(f"{_DATA_TYPES}. Received: a dataset of {element!r}")
    return x, y


def _first_input(x):
    return x[0] if isinstance(x, (list, tuple)) else x


def _numpy_inputs(x):
    if isinstance(x, (list, tuple)):
        return [np.asarray(part, dtype="float32") for part in x]
    return np.asarray(x, dtype="float32")


def _dataset_batches(dataset, input_shape):
    import tensorflow as tf

    specs = _input_and_target(dataset.element_spec, tf.TensorSpec)
    first = _first_input(specs[0])
    if first.shape.rank is not None and first.shape.rank == len(input_shape) - 1:
        raise ValueError(
            "The dataset `x` yields single examples of shape "
            f"{tuple(first.shape)}, but the model takes batches of shape "
            f"{tuple(input_shape)}: batch it first, `x.batch(batch_size)`."
        )
    cardinality = int(dataset.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            "The dataset `x` is infinite (`repeat()`): give it a finite number of "
            "batches, e.g. `x.take(steps)`."
        )
    if cardinality == 0:
        raise ValueError("The dataset `x` holds no examples: evaluation needs at least one.")

    def batch(element):
        x, y = _input_and_target(element, tf.Tensor)
        return _numpy_inputs(x), np.asarray(y, dtype="float32")

    return (batch(element) for element in dataset), cardinality if cardinality >= 0 else None


def _checked_batches(elements, input_shape):
    """`(x, y)` float32 pairs of batches from a `PyDataset`, generator or
    `DataLoader` (`_base.batch_iterable`), checked as they come."""
    for element in elements:
        x, y = _input_and_target(element, np.ndarray)
        first = _first_input(x)
        if first.ndim == len(input_shape) - 1:
            raise ValueError(
                f"The data `x` yields single examples of shape {first.shape}, but the "
                f"model takes batches of shape {tuple(input_shape)}: yield batches."
            )
        yield _numpy_inputs(x), np.asarray(y, dtype="float32")


def _same_size(batches):
    """Each `(inputs, target)` batch with its number of examples, a batch
    smaller than the first (the last of an array) padded to the first's size
    with copies of its last example, whose results the caller drops: the
    compiled functions then see one shape (TensorFlow would retrace and
    JAX recompile for the last batch)."""
    first = None
    for batch in batches:
        size = len(_first_input(batch[0]))
        first = size if first is None else first
        if size < first:
            batch = keras.tree.map_structure(functools.partial(_padded, rows=first), batch)
        yield batch, size


def _padded(array, rows):
    """`array` with copies of its last row appended, to `rows` rows."""
    return np.concatenate([array, np.repeat(array[-1:], rows - len(array), axis=0)])


def _empty_dataset():
    return ValueError("The dataset `x` yielded no batches: evaluation needs at least one.")


def evaluate_elbo(
    model: keras.Model,
    x,
    num_samples: int = 1,
    batch_size: int = 100,
    likelihood=None,
    seed: int | None = None,
    verbose: int = 1,
    y=None,
) -> dict:
    """The ELBO per example, split into reconstruction and KL.

    Each example's reconstruction term is averaged over `num_samples` samples
    of q(z|x); the KL is computed as the model's `KLRegularizer` computes it
    (its `mode`; the closed form where one exists), summed over the positions
    of a latent map. In a hierarchy the KL is the sum over the layers, each
    lower layer's averaged over the `num_samples` samples of the layers
    above it. Free bits and the KL weight do not enter: this is the true
    ELBO.

    Formula:

    ```python
    reconstruction = mean_s(-log p(x | z_s)),  z_s ~ q(z|x)
    elbo = -reconstruction - KL[q(z|x) || p(z)]
    ```

    Args:
        model: a functional model with a posterior layer (or a top-down
            hierarchy of them), compiled with a `keras_elbo`
            reconstruction loss (or pass `likelihood`).
        x: the data: an array of shape `(n, ...)`, which is also the target
            of the likelihood, or batches as `Model.evaluate` takes them (a
            batched `tf.data.Dataset`, on any backend where TensorFlow is
            installed; a `keras.utils.PyDataset`; a generator; a PyTorch
            `DataLoader`), each `x`, `(x, y)` or `(x, y, sample_weight)`
            (target `y` where given; the weights are not used).
        num_samples: samples of z per example. Defaults to `1`.
        batch_size: examples per step of an array (a dataset keeps its
            own batches). Defaults to `100`.
        likelihood: a callable `(y_true, y_pred) -> -log p` per example, used
            in place of the compiled loss. Defaults to `None`.
        seed: seed of the samples. Defaults to `None`.
        verbose: `1` shows a progress bar. Defaults to `1`.
        y: the likelihood's target when `x` is an array (or, for a model of
            several inputs such as a conditional VAE's `[image, label]`, a
            list of arrays, which then needs `y`). Defaults to `None`: `x` is
            its own target.

    Returns:
        A dict of NumPy arrays of shape `(n,)`, `"elbo"`, `"reconstruction"`
        (the negative expected log-likelihood) and `"kl"`, in nats per example.
    """
    num_samples = _math.integer("num_samples", num_samples)
    batch_size = _math.integer("batch_size", batch_size)
    estimators = _estimators(model, likelihood, seed)
    parts = estimators.parts
    batches, steps = _data(x, batch_size, parts.body.inputs[0].shape, y, parts.num_inputs)
    regularizer = parts.posterior_layer.kl_regularizer

    def elbo_terms(x, target, seed_generator):
        q, prior_inputs = parts.posterior(x)
        z = draw(q, (num_samples,), seed_generator)
        log_lik, lower = parts.log_likelihood(x, target, z, seed_generator)
        reconstruction = -ops.mean(log_lik, axis=0)
        # The KL's own sample, passed as the very tensor q returned: a slice of
        # z would miss a flow posterior's cache of log q(z).
        kl_sample = draw(q, (), seed_generator)
        # One KL per example, summed over the positions of a latent map.
        kl = regularizer.kl_divergence(q, sample=kl_sample, prior_inputs=prior_inputs)
        # A lower layer's KL, given each of the samples above it: averaged
        # over those samples (its rows are the `(S, B)` samples, sample-major).
        for layer, q_l, z_l, prior_inputs_l in lower:
            kl_l = layer.kl_regularizer.kl_divergence(q_l, sample=z_l, prior_inputs=prior_inputs_l)
            kl = kl + ops.mean(ops.reshape(kl_l, (num_samples, -1)), axis=0)
        return reconstruction, kl

    step = estimators.function(("elbo", num_samples), lambda: elbo_terms)
    results = {"reconstruction": [], "kl": []}
    progbar = keras.utils.Progbar(steps, verbose=verbose)
    for i, (batch, size) in enumerate(_same_size(batches)):
        reconstruction, kl = step.predict_on_batch(batch)
        results["reconstruction"].append(reconstruction[:size])
        results["kl"].append(kl[:size])
        progbar.update(i + 1)
    if not results["kl"]:
        raise _empty_dataset()
    out = {key: np.concatenate(values) for key, values in results.items()}
    out["elbo"] = -out["reconstruction"] - out["kl"]
    return out


def importance_weighted_log_likelihood(
    model: keras.Model,
    x,
    num_samples: int = 5000,
    batch_size: int = 20,
    max_decoder_batch: int = 20000,
    likelihood=None,
    seed: int | None = None,
    verbose: int = 1,
    y=None,
) -> np.ndarray:
    """Importance-weighted estimate of log p(x) per example (Burda et al., 2016).

    The number that published VAE tables report as the test log-likelihood.
    It is a lower bound of log p(x) in expectation that rises with
    `num_samples`, equals the ELBO in expectation at `num_samples=1`, and
    reaches log p(x) as `num_samples` grows. Samples are drawn in chunks so
    that the decoder never sees more than `max_decoder_batch` rows at once:
    memory stays bounded for `num_samples=5000` on any data set size. Each
    chunk draws new samples. For a latent map, log p(z) and log q(z|x) are
    summed over its positions.

    Formula:

    ```python
    log_w[k] = log p(x | z_k) + log p(z_k) - log q(z_k | x),  z_k ~ q(z|x)
    log_px = logsumexp(log_w) - log(num_samples)
    ```

    In a hierarchy `z_k` is drawn ancestrally through every posterior and
    `log_w[k]` sums every layer's `log p(z_l,k | ...) - log q(z_l,k | ...)`.

    Args:
        model: a functional model with a posterior layer (or a top-down
            hierarchy of them), compiled with a `keras_elbo`
            reconstruction loss (or pass `likelihood`).
        x: the data: an array of shape `(n, ...)`, which is also the target
            of the likelihood, or batches as `Model.evaluate` takes them (a
            batched `tf.data.Dataset`, on any backend where TensorFlow is
            installed; a `keras.utils.PyDataset`; a generator; a PyTorch
            `DataLoader`), each `x`, `(x, y)` or `(x, y, sample_weight)`
            (target `y` where given; the weights are not used).
        num_samples: importance samples K per example. Defaults to `5000`.
        batch_size: examples per step of an array (a dataset keeps its
            own batches). Defaults to `20`.
        max_decoder_batch: most latent samples decoded at once (samples per
            chunk times the batch size), at least the batch size. Defaults
            to `20000`.
        likelihood: a callable `(y_true, y_pred) -> -log p` per example, used
            in place of the compiled loss. Defaults to `None`.
        seed: seed of the samples. Defaults to `None`.
        verbose: `1` shows a progress bar. Defaults to `1`.
        y: the likelihood's target when `x` is an array (or, for a model of
            several inputs such as a conditional VAE's `[image, label]`, a
            list of arrays, which then needs `y`). Defaults to `None`: `x` is
            its own target.

    Returns:
        A NumPy array of shape `(n,)`: the estimate of log p(x) for each
        example, in nats. Its mean is the figure of the tables.
    """
    num_samples = _math.integer("num_samples", num_samples)
    batch_size = _math.integer("batch_size", batch_size)
    # Each chunk decodes at least one sample of every example of a batch (a
    # dataset's batches are checked as they come).
    in_batches = _backend.is_tf_dataset(x) or batch_iterable(x) is not None
    max_decoder_batch = _math.integer(
        "max_decoder_batch", max_decoder_batch, minimum=1 if in_batches else batch_size
    )
    estimators = _estimators(model, likelihood, seed)
    parts = estimators.parts
    for posterior in (parts.posterior_layer, *parts.lower):
        if not posterior.samples_have_log_prob:
            raise relaxed_samples_error("importance_weighted_log_likelihood", posterior)
    batches, steps = _data(x, batch_size, parts.body.inputs[0].shape, y, parts.num_inputs)

    def chunk_function(count):
        def chunk_bound(x, target, seed_generator):
            """The bound of `count` samples of the log-weights: `(B,)`."""
            q, prior_inputs = parts.posterior(x)
            z = draw(q, (count,), seed_generator)
            log_lik, lower = parts.log_likelihood(x, target, z, seed_generator)
            records = [(parts.posterior_layer, q, z, prior_inputs), *lower]
            ratios = objectives.log_density_ratios(records)
            return objectives.importance_weighted_bound(objectives.log_weights(log_lik, ratios))

        # Two per call at most (a chunk and the remainder); the shared seed
        # generator advances at each chunk: new samples each time.
        return estimators.function(("iw", count), lambda: chunk_bound)

    estimates = []
    progbar = keras.utils.Progbar(steps, verbose=verbose)
    for i, (batch, size) in enumerate(_same_size(batches)):
        rows = len(_first_input(batch[0]))
        if rows > max_decoder_batch:
            raise _math.invalid_argument(
                "max_decoder_batch",
                f"an integer >= {rows}, the size of a batch of the dataset `x` (each "
                "chunk decodes at least one sample of every example)",
                max_decoder_batch,
            )
        chunk = min(num_samples, max_decoder_batch // rows)
        # Running log-sum-exp over chunks of samples, in float64.
        total = np.full(rows, -np.inf)
        for start in range(0, num_samples, chunk):
            count = min(chunk, num_samples - start)
            bound = np.asarray(chunk_function(count).predict_on_batch(batch), np.float64)
            total = np.logaddexp(total, bound + math.log(count))  # log sum_k w_k
        estimates.append(total[:size] - math.log(num_samples))
        progbar.update(i + 1)
    if not estimates:
        raise _empty_dataset()
    return np.concatenate(estimates)
