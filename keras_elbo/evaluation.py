"""Evaluation of trained latent-variable models: the ELBO and log p(x).

Both functions take a model built from this library's layers, an encoder
body, one posterior layer (`GaussianPosterior`) and a decoder, compiled with
a reconstruction loss from `keras_elbo.losses`. They split the model at the
posterior: the body gives the posterior's input features, the decoder maps
latent samples to the likelihood's parameters, and the compiled loss gives
-log p(x|z) per example.
"""

import math

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from keras_elbo import _math
from keras_elbo.losses import BernoulliNLL, GaussianNLL
from keras_elbo.posteriors import Posterior


class _LatentModel:
    """The parts of a model that the estimators need, found once."""

    def __init__(self, model, likelihood):
        layers = model._flatten_layers(include_self=False)
        posteriors = [layer for layer in layers if isinstance(layer, Posterior)]
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
        try:
            self.body = keras.Model(model.inputs, self.posterior.input)
            self.decoder = keras.Model(self.posterior.output, model.outputs)
        except ValueError as err:
            raise ValueError(
                f"Could not split model '{model.name}' at posterior "
                f"'{self.posterior.name}': evaluation needs a functional model whose "
                "output depends on its input only through the posterior's sample."
            ) from err
        if likelihood is None:
            likelihood = getattr(model, "loss", None)
            if not isinstance(likelihood, BernoulliNLL | GaussianNLL):
                raise ValueError(
                    "Pass `likelihood=`: a callable (y_true, y_pred) -> negative "
                    "log-likelihood per example. The model's compiled loss "
                    f"({likelihood!r}) is not a keras_elbo reconstruction loss."
                )
        self.nll = likelihood.call if isinstance(likelihood, keras.losses.Loss) else likelihood

    def posterior_and_prior(self, x):
        q = self.posterior.distribution(self.body(x, training=False))
        prior = self.posterior.kl_regularizer.prior_distribution(q, self.posterior)
        return q, prior

    def log_likelihood(self, x, z):
        """log p(x|z) for samples z of shape (S, B, d): shape (S, B)."""
        num_samples, batch = tf.shape(z)[0], tf.shape(z)[1]
        flat_z = tf.reshape(z, [-1, z.shape[-1]])
        params = self.decoder(flat_z, training=False)
        flat_x = tf.reshape(
            tf.broadcast_to(x[tf.newaxis], tf.concat([[num_samples], tf.shape(x)], 0)),
            tf.concat([[-1], tf.shape(x)[1:]], 0),
        )
        log_lik = -tf.cast(self.nll(flat_x, params), tf.float32)
        return tf.reshape(log_lik, [num_samples, batch])


def _batch_spec(x):
    """The input signature of one batch of `x`, of any batch size: each call of
    an evaluation function then traces its step once."""
    return tf.TensorSpec([None, *np.shape(x)[1:]], tf.float32)


_SEED_SPEC = tf.TensorSpec([2], tf.int32)


def _batches(x, batch_size):
    x = np.asarray(x, dtype="float32")
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size]


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
    (its `mode`; the closed form where one exists). Free bits and the KL
    weight do not enter: this is the true ELBO.

    Formula:

    ```python
    reconstruction = mean_s(-log p(x | z_s)),  z_s ~ q(z|x)
    elbo = -reconstruction - KL[q(z|x) || p(z)]
    ```

    Args:
        model: a model with one posterior layer, compiled with a
            `keras_elbo` reconstruction loss (or pass `likelihood`).
        x: the data, an array of shape `(n, ...)`.
        num_samples: samples of z per example. Defaults to `1`.
        batch_size: examples per step. Defaults to `100`.
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
    parts = _LatentModel(model, likelihood)
    seeds = keras.random.SeedGenerator(seed)
    regularizer = parts.posterior.kl_regularizer

    @tf.function(input_signature=[_batch_spec(x), _SEED_SPEC])
    def step(x, seed):
        q, _ = parts.posterior_and_prior(x)
        seed_z, seed_kl = tfp.random.split_seed(seed, n=2)
        z = q.sample(num_samples, seed=seed_z)
        reconstruction = -tf.reduce_mean(parts.log_likelihood(x, z), axis=0)
        # The KL's own sample, passed as the very tensor q returned: a slice of
        # z would miss TFP's bijector cache and invert a flow posterior.
        kl_sample = q.sample(seed=seed_kl)
        kl = regularizer.kl_divergence(q, sample=kl_sample, posterior_layer=parts.posterior)
        return reconstruction, kl

    results = {"reconstruction": [], "kl": []}
    progbar = keras.utils.Progbar(math.ceil(len(x) / batch_size), verbose=verbose)
    for i, batch in enumerate(_batches(x, batch_size)):
        reconstruction, kl = step(batch, _math.tfp_seed(seeds, "evaluation"))
        results["reconstruction"].append(reconstruction.numpy())
        results["kl"].append(kl.numpy())
        progbar.update(i + 1)
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
    memory stays bounded for `num_samples=5000` on any data set size.

    Formula:

    ```python
    log_w[k] = log p(x | z_k) + log p(z_k) - log q(z_k | x),  z_k ~ q(z|x)
    log_px = logsumexp(log_w) - log(num_samples)
    ```

    Args:
        model: a model with one posterior layer, compiled with a
            `keras_elbo` reconstruction loss (or pass `likelihood`).
        x: the data, an array of shape `(n, ...)`.
        num_samples: importance samples K per example. Defaults to `5000`.
        batch_size: examples per step. Defaults to `20`.
        max_decoder_batch: most latent samples decoded at once (samples per
            chunk times `batch_size`). Defaults to `20000`.
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
    # Each chunk decodes at least one sample of every example of a batch.
    max_decoder_batch = _math.integer("max_decoder_batch", max_decoder_batch, minimum=batch_size)
    parts = _LatentModel(model, likelihood)
    seeds = keras.random.SeedGenerator(seed)
    chunk = min(num_samples, max_decoder_batch // batch_size)

    @tf.function(input_signature=[_batch_spec(x), tf.TensorSpec([], tf.int32), _SEED_SPEC])
    def log_weights(x, count, seed):
        q, p = parts.posterior_and_prior(x)
        z = q.sample(count, seed=seed)
        return parts.log_likelihood(x, z) + p.log_prob(z) - q.log_prob(z)

    estimates = []
    progbar = keras.utils.Progbar(math.ceil(len(x) / batch_size), verbose=verbose)
    for i, batch in enumerate(_batches(x, batch_size)):
        # Running log-sum-exp over chunks of samples.
        total = tf.fill([len(batch)], -np.inf)
        for start in range(0, num_samples, chunk):
            count = min(chunk, num_samples - start)
            log_w = log_weights(batch, tf.constant(count), _math.tfp_seed(seeds, "evaluation"))
            total = tf.reduce_logsumexp(tf.concat([total[tf.newaxis], log_w], axis=0), axis=0)
        estimates.append((total - math.log(num_samples)).numpy())
        progbar.update(i + 1)
    return np.concatenate(estimates)
