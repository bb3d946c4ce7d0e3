"""Evaluation of trained latent-variable models: the ELBO and log p(x).

Both functions take a model built from this library's layers, an encoder
body, one posterior layer (`GaussianPosterior`) and a decoder, compiled with
a reconstruction loss from `keras_elbo.losses`. They split the model at the
posterior: the body gives the posterior's input features, the decoder maps
latent samples to the likelihood's parameters, and the compiled loss gives
-log p(x|z) per example.

The first axis is the batch. A posterior applied to a feature map gives a
latent map, q of batch shape `(batch, h, w)` and event shape `(latent_dim,)`
(the prior is that of one position, broadcast over positions): its KL and
log-densities are summed over every axis but the batch, as `KLRegularizer`
sums them.
"""

import math
import weakref

import keras
import numpy as np
from keras import ops

from keras_elbo import _backend, _math
from keras_elbo._base import batch_iterable, decoder_after, find_layers
from keras_elbo.divergence import draw
from keras_elbo.losses import is_reconstruction_loss
from keras_elbo.posteriors import Posterior


class _LatentModel:
    """The parts of a model that the estimators need, found once."""

    def __init__(self, model, likelihood):
        posteriors = find_layers(model, Posterior)
        if len(posteriors) != 1:
            raise ValueError(
                "Evaluation needs a model with exactly one posterior layer (such as "
                f"GaussianPosterior); model '{model.name}' has {len(posteriors)}."
            )
        self.posterior = posteriors[0]
        if self.posterior.kl_regularizer is None:
            raise ValueError(
                f"Posterior layer '{self.posterior.name}' has no kl_regularizer, so "
                "the model has no prior to evaluate against."
            )
        if self.posterior.kl_regularizer.conditional:
            raise NotImplementedError(
                f"Posterior layer '{self.posterior.name}' has a conditional prior "
                f"({type(self.posterior.kl_regularizer.prior).__name__}), which these "
                "estimators do not take yet (they split a one-input model at its "
                "posterior). `model.evaluate` of an ELBOModel logs the ELBO's terms "
                "(`neg_elbo`, `kl`, `reconstruction`), and ELBOModel(objective='iwae', "
                "num_samples=K) its importance-weighted bound (`neg_iwae`)."
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
        try:
            self.body = keras.Model(inputs, self.posterior.input)
            self.decoder = decoder_after(self.posterior, model)
        except ValueError as err:
            raise ValueError(
                f"Could not split model '{model.name}' at posterior "
                f"'{self.posterior.name}': evaluation needs a functional model whose "
                "output depends on its input only through the posterior's sample."
            ) from err
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

    def posterior_and_prior(self, x):
        q = self.posterior.distribution(self.body(x, training=False))
        prior = self.posterior.kl_regularizer.prior_distribution(q, self.posterior)
        return q, prior

    def log_likelihood(self, target, z):
        """log p(x|z) for samples z of shape `(S, B, *positions, d)`: `(S, B)`.

        The decoder sees the samples as one batch of `S * B` latents of the
        posterior's output shape (`(S * B, h, w, d)` for a latent map),
        sample-major, and the targets are tiled to match.
        """
        shape = ops.shape(z)
        num_samples, batch = shape[0], shape[1]
        params = self.decoder(ops.reshape(z, (-1, *shape[2:])), training=False)
        repeats = [num_samples] + [1] * (len(target.shape) - 1)
        log_lik = -ops.cast(self.nll(ops.tile(target, repeats), params), z.dtype)
        return ops.reshape(log_lik, (num_samples, batch))


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
        self.body, self.posterior, self.decoder = parts.body, parts.posterior, parts.decoder
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


def _data(x, batch_size, input_shape):
    """The batches of `x` as `(inputs, targets)` float32 NumPy pairs, and the
    number of batches (`None` if unknown).

    An array is its own target. A dataset's element is `x` (its own target),
    `(x, y)` or `(x, y, sample_weight)`; the weights are not used, since the
    results are per example.
    """
    if _backend.is_tf_dataset(x):
        return _dataset_batches(x, input_shape)
    iterable = batch_iterable(x)
    if iterable is not None:
        elements, steps = iterable
        return _checked_batches(elements, input_shape), steps
    try:
        array = np.asarray(x, dtype="float32")
    except (TypeError, ValueError) as err:
        raise TypeError(f"{_DATA_TYPES}. Received: x of type {type(x).__name__}") from err
    if array.ndim == 0 or array.shape[0] == 0:
        raise ValueError(
            f"`x` holds no examples: evaluation needs at least one. Received: x of "
            f"shape {array.shape}"
        )
    batches = (
        (array[start : start + batch_size],) * 2 for start in range(0, len(array), batch_size)
    )
    return batches, math.ceil(len(array) / batch_size)


def _input_and_target(element, types):
    """`(x, y)` of a dataset element (or its spec), each of one of `types`;
    `x` is its own target."""
    if isinstance(element, tuple):
        if not 1 <= len(element) <= 3:
            raise ValueError(f"{_DATA_TYPES}. Received: a dataset of {len(element)}-tuples")
        element = (element[0], element[1]) if len(element) > 1 else (element[0],) * 2
    else:
        element = (element, element)
    if not all(isinstance(part, types) for part in element):
        raise TypeError(f"{_DATA_TYPES}. Received: a dataset of {element!r}")
    return element


def _dataset_batches(dataset, input_shape):
    import tensorflow as tf

    specs = _input_and_target(dataset.element_spec, tf.TensorSpec)
    if specs[0].shape.rank is not None and specs[0].shape.rank == len(input_shape) - 1:
        raise ValueError(
            "The dataset `x` yields single examples of shape "
            f"{tuple(specs[0].shape)}, but the model takes batches of shape "
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
    batches = (
        tuple(np.asarray(part, dtype="float32") for part in _input_and_target(element, tf.Tensor))
        for element in dataset
    )
    return batches, cardinality if cardinality >= 0 else None


def _checked_batches(elements, input_shape):
    """`(x, y)` float32 pairs of batches from a `PyDataset`, generator or
    `DataLoader` (`_base.batch_iterable`), checked as they come."""
    for element in elements:
        x, y = _input_and_target(element, np.ndarray)
        if x.ndim == len(input_shape) - 1:
            raise ValueError(
                f"The data `x` yields single examples of shape {x.shape}, but the "
                f"model takes batches of shape {tuple(input_shape)}: yield batches."
            )
        yield np.asarray(x, dtype="float32"), np.asarray(y, dtype="float32")


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
) -> dict:
    """The ELBO per example, split into reconstruction and KL.

    Each example's reconstruction term is averaged over `num_samples` samples
    of q(z|x); the KL is computed as the model's `KLRegularizer` computes it
    (its `mode`; the closed form where one exists), summed over the positions
    of a latent map. Free bits and the KL weight do not enter: this is the
    true ELBO.

    Formula:

    ```python
    reconstruction = mean_s(-log p(x | z_s)),  z_s ~ q(z|x)
    elbo = -reconstruction - KL[q(z|x) || p(z)]
    ```

    Args:
        model: a model with one posterior layer, compiled with a
            `keras_elbo` reconstruction loss (or pass `likelihood`).
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

    Returns:
        A dict of NumPy arrays of shape `(n,)`, `"elbo"`, `"reconstruction"`
        (the negative expected log-likelihood) and `"kl"`, in nats per example.
    """
    num_samples = _math.integer("num_samples", num_samples)
    batch_size = _math.integer("batch_size", batch_size)
    estimators = _estimators(model, likelihood, seed)
    parts = estimators.parts
    batches, steps = _data(x, batch_size, parts.body.inputs[0].shape)
    regularizer = parts.posterior.kl_regularizer

    def elbo_terms(x, target, seed_generator):
        q, _ = parts.posterior_and_prior(x)
        z = draw(q, (num_samples,), seed_generator)
        reconstruction = -ops.mean(parts.log_likelihood(target, z), axis=0)
        # The KL's own sample, passed as the very tensor q returned: a slice of
        # z would miss a flow posterior's cache of log q(z).
        kl_sample = draw(q, (), seed_generator)
        kl = regularizer.kl_divergence(q, sample=kl_sample, posterior_layer=parts.posterior)
        # One KL per example: summed over the positions of a latent map.
        return reconstruction, _math.sum_event_dims(kl)

    step = estimators.function(("elbo", num_samples), lambda: elbo_terms)
    results = {"reconstruction": [], "kl": []}
    progbar = keras.utils.Progbar(steps, verbose=verbose)
    for i, batch in enumerate(batches):
        reconstruction, kl = step.predict_on_batch(batch)
        results["reconstruction"].append(reconstruction)
        results["kl"].append(kl)
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

    Args:
        model: a model with one posterior layer, compiled with a
            `keras_elbo` reconstruction loss (or pass `likelihood`).
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
    batches, steps = _data(x, batch_size, parts.body.inputs[0].shape)

    def chunk_function(count):
        def log_sum_of_weights(x, target, seed_generator):
            """logsumexp over `count` samples of the log-weights: `(B,)`."""
            q, p = parts.posterior_and_prior(x)
            z = draw(q, (count,), seed_generator)
            log_ratio = _math.sum_positions(p.log_prob(z) - q.log_prob(z))
            return ops.logsumexp(parts.log_likelihood(target, z) + log_ratio, axis=0)

        # Two per call at most (a chunk and the remainder); the shared seed
        # generator advances at each chunk: new samples each time.
        return estimators.function(("iw", count), lambda: log_sum_of_weights)

    estimates = []
    progbar = keras.utils.Progbar(steps, verbose=verbose)
    for i, batch in enumerate(batches):
        size = len(batch[0])
        if size > max_decoder_batch:
            raise _math.invalid_argument(
                "max_decoder_batch",
                f"an integer >= {size}, the size of a batch of the dataset `x` (each "
                "chunk decodes at least one sample of every example)",
                max_decoder_batch,
            )
        chunk = min(num_samples, max_decoder_batch // size)
        # Running log-sum-exp over chunks of samples, in float64.
        total = np.full(size, -np.inf)
        for start in range(0, num_samples, chunk):
            count = min(chunk, num_samples - start)
            log_sum = chunk_function(count).predict_on_batch(batch)
            total = np.logaddexp(total, np.asarray(log_sum, np.float64))
        estimates.append(total - math.log(num_samples))
        progbar.update(i + 1)
    if not estimates:
        raise _empty_dataset()
    return np.concatenate(estimates)
