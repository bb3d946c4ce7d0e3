"""Posterior layers: project features to q(z|x), sample it, hand it to the KL."""

import contextlib
import threading

import keras

from keras_elbo import _math
from keras_elbo._base import deserialize_nested
from keras_elbo._gaussian import COVARIANCES, gaussian, num_params
from keras_elbo.divergence import KLRegularizer, draw

INFERENCE_OUTPUTS = ("sample", "mean")


class MultiSampleDraws:
    """The samples that posteriors draw for a multi-sample objective or an
    estimator, recorded for the loss computed from them.

    `ELBOModel(num_samples=K)` sets one as the `multi_sample` of each of its
    posterior layers during its train and test steps. The first posterior
    called in the step (the top of a hierarchy) draws K samples of q(z|x)
    for each example and returns them as one batch of `K * batch` latents,
    sample-major (row `k * batch + b` is sample k of example b), so that the
    rest of the model runs once on all of them. Every posterior called after
    it in the step (the lower layers of a hierarchy, whose inputs are those
    `K * batch` rows) draws one sample per row: together they are K
    ancestral samples of the whole hierarchy. Each records its layer, q, the
    samples (`(K, batch, ...)` for the first, `(1, K * batch, ...)` for the
    others) and its prior's inputs, for the model's `compute_loss`, which
    runs in the same trace. Records are kept per thread: TensorFlow's
    `MirroredStrategy` traces its replicas in threads.

    Args:
        num_samples: K.
        add_kl: whether the posteriors' `KLRegularizer`s add their KL to the
            loss (the averaged ELBO) or only record it (the importance-
            weighted bound, which the model computes from the samples).
        seed_generator: the generator the draws use in place of each
            layer's own (the estimators'), or `None`.
    """

    def __init__(self, num_samples: int, add_kl: bool, seed_generator=None):
        self.num_samples = num_samples
        self.add_kl = add_kl
        self.seed_generator = seed_generator
        self._records = {}

    def samples_to_draw(self):
        """K for the first draw of this thread's step, 1 for the later ones."""
        return 1 if self._records.get(threading.get_ident()) else self.num_samples

    def record(self, layer, q, z, prior_inputs=None):
        self._records.setdefault(threading.get_ident(), []).append((layer, q, z, prior_inputs))

    def take(self):
        """This thread's records `(layer, q, z, prior_inputs)`, in the order
        drawn (an empty list if none); forgets them."""
        return self._records.pop(threading.get_ident(), [])


@contextlib.contextmanager
def drawing(posteriors, draws):
    """Has each of `posteriors` draw through `draws` (a `MultiSampleDraws`)
    for the duration, and on its own afterwards (also when the body raises).

    A layer reads it when Keras traces it: make the traced function inside
    the block.
    """
    for posterior in posteriors:
        posterior.multi_sample = draws
    try:
        yield draws
    finally:
        for posterior in posteriors:
            posterior.multi_sample = None


class Posterior(keras.layers.Layer):
    """Base class of posterior layers: subclasses implement `distribution`.

    It holds what every posterior layer does alike: it validates `latent_dim`,
    `kl_regularizer`, `inference` and `seed`; in `build` it asks the
    regularizer to check an example posterior (so a prior of the wrong size
    fails at model construction); in `call` it draws one seeded,
    reparameterised sample of `distribution(inputs)`, hands the sample and the
    distribution to the regularizer, and returns the sample in training, or
    the output `inference` names outside it. A subclass creates its sublayers
    in `__init__`, builds them in `build_sublayers`, returns q(z|x) from
    `distribution(inputs)` (event shape `(latent_dim,)`, float32), and may
    override `mean(q)`. A posterior with other outputs outside training
    lists them in the class attribute `inference_outputs` (its first is the
    default of its own constructor) and returns them from
    `inference_output(q)`; one whose output is not the sample's shape
    (`CategoricalPosterior(flatten=True)`) reshapes it in `format_output(z)`.

    Args:
        latent_dim: size of z, a positive integer.
        kl_regularizer: a `KLRegularizer`, or `None` for no KL term.
        inference: what the layer returns outside training, `"sample"` or
            `"mean"`.
        seed: seed of the layer's samples.
    """

    def __init__(
        self,
        latent_dim: int,
        kl_regularizer: KLRegularizer | None = None,
        inference: str = "sample",
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if kl_regularizer is not None and not isinstance(kl_regularizer, KLRegularizer):
            raise _math.invalid_argument(
                "kl_regularizer", "None or a keras_elbo.KLRegularizer", kl_regularizer
            )
        self.latent_dim = _math.integer("latent_dim", latent_dim)
        self.kl_regularizer = kl_regularizer
        if kl_regularizer is not None:
            kl_regularizer.attach(self)
        self.inference = _math.choice("inference", inference, self.inference_outputs)
        self.seed = _math.seed("seed", seed)
        self.seed_generator = _math.seed_generator(self.seed, type(self).__name__)
        self.multi_sample = None  # a MultiSampleDraws while ELBOModel steps

    def build(self, input_shape):
        if input_shape[-1] is None:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' needs a known last input "
                f"dimension; received input_shape={input_shape}."
            )
        self.build_sublayers(input_shape)
        if self.kl_regularizer is not None:
            # Its variables (the KL weight) exist once this layer is built, so
            # that `load_weights` and a subclassed model's `build` restore them.
            if not self.kl_regularizer.built:
                self.kl_regularizer.build()
            # Fail now, with the regularizer's own message, if it cannot handle
            # this posterior (a prior of another size, an impossible mode),
            # rather than from inside Keras's symbolic call. Unknown sizes
            # (the positions of a latent map) are taken as 1 here.
            shape = [1] + [1 if n is None else n for n in input_shape[1:]]
            example = self.distribution(keras.ops.zeros(shape, self.compute_dtype))
            self.kl_regularizer.check_posterior(example)
        self.built = True

    def build_sublayers(self, input_shape):
        """Builds the sublayers that map features to q's parameters."""

    def distribution(self, inputs):
        """q(z|x) for a batch of inputs, as a `keras_elbo.distributions`
        object (float32, or float64 under a float64 `floatx`:
        `_math.density_dtype()`)."""
        raise NotImplementedError

    # What `inference` may name: "sample", and the others `inference_output` gives.
    inference_outputs = INFERENCE_OUTPUTS
    # Whether q's `log_prob` scores the layer's samples (the importance-
    # weighted bound needs it; a relaxed sample of a discrete q is none of
    # its values), and whether the samples are a reparameterisation of q
    # (the doubly reparameterised gradient needs one).
    samples_have_log_prob = True
    reparameterized_samples = True

    def mean(self, q):
        """What the layer returns outside training with `inference="mean"`."""
        return q.mean()

    def inference_output(self, q):
        """What the layer returns outside training when `inference` is not
        `"sample"`: here the mean."""
        return self.mean(q)

    def format_output(self, z):
        """The layer's output from a sample, or an inference output, of q."""
        return z

    def call(self, inputs, prior_inputs=None, training=None):
        if prior_inputs is not None and self.kl_regularizer is None:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' received prior_inputs but has "
                "no kl_regularizer: give it KLRegularizer(prior=...) with a "
                "conditional prior such as keras_elbo.ConditionalGaussianPrior."
            )
        q = self.distribution(inputs)
        if self.multi_sample is not None:
            return self._draw_several(q, self.multi_sample, prior_inputs)
        # `draw`: a subclass's `distribution` may return a TFP one (TensorFlow).
        z = draw(q, (), self.seed_generator)
        if self.kl_regularizer is not None:
            z = self.kl_regularizer(z, posterior=q, prior_inputs=prior_inputs)
        if not training and self.inference != "sample":
            z = self.inference_output(q)
        return self.format_output(keras.ops.cast(z, self.compute_dtype))

    def _draw_several(self, q, multi_sample, prior_inputs):
        """K samples per example as one batch of `K * batch`, or one per row
        below the top of a hierarchy (see `MultiSampleDraws`)."""
        seed_generator = multi_sample.seed_generator
        if seed_generator is None:
            seed_generator = self.seed_generator
        z = draw(q, (multi_sample.samples_to_draw(),), seed_generator)
        if self.kl_regularizer is not None:
            self.kl_regularizer(
                z,
                posterior=q,
                prior_inputs=prior_inputs,
                add_to_loss=multi_sample.add_kl,
            )
        multi_sample.record(self, q, z, prior_inputs)
        shape = keras.ops.shape(z)
        return self.format_output(
            keras.ops.cast(keras.ops.reshape(z, (-1, *shape[2:])), self.compute_dtype)
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "latent_dim": self.latent_dim,
                "kl_regularizer": keras.saving.serialize_keras_object(self.kl_regularizer),
                "inference": self.inference,
                "seed": self.seed,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**deserialize_nested(config, "kl_regularizer"))


@keras.saving.register_keras_serializable(package="keras_elbo")
class GaussianPosterior(Posterior):
    """A Gaussian q(z|x) whose parameters are a dense projection of the input.

    The encoder head of a VAE. The layer maps its input to the location and
    scale of q(z|x), draws one reparameterised sample z (so gradients flow
    through it), passes `z` and q to its `kl_regularizer` (which adds the KL
    to the model's loss), and returns `z` as a plain tensor of shape
    `(batch, latent_dim)`.

    - `covariance="diag"`: q is a `MultivariateNormalDiag`; the scale of
      each dimension is `softplus(raw) + min_scale`.
    - `covariance="full"`: q is a `MultivariateNormalTriL`; the lower
      triangular scale has diagonal `softplus(raw) + min_scale` and free
      entries below it (`latent_dim * (latent_dim + 1) / 2` parameters).

    In training the layer returns a sample. Outside training (`predict`,
    `evaluate`, `training=False`) it returns what `inference` says: a sample
    (the default, so that `evaluate` reports an unbiased estimate of the
    ELBO) or the posterior mean (deterministic codes and reconstructions).
    The KL is added in both cases, from a sample.

    Args:
        latent_dim: size of z, a positive integer.
        covariance: `"diag"` or `"full"`. Defaults to `"diag"`.
        kl_regularizer: a `KLRegularizer`, or `None` for no KL term (an
            autoencoder with noisy codes). Defaults to `None`.
        min_scale: positive floor of the posterior's scales. Defaults to
            `1e-4`.
        inference: what the layer returns outside training, `"sample"` or
            `"mean"`. Defaults to `"sample"`.
        seed: seed of the layer's samples. Defaults to `None`.
        kernel_initializer: initializer of the projection's kernel.
            Defaults to `"glorot_uniform"`.

    Call arguments:
        inputs: features of shape `(batch, features)` (or `(batch, ...,
            features)`: a latent map, one q per position).
        prior_inputs: the tensor c of a conditional prior p(z | c) held by
            the `kl_regularizer` (`ConditionalGaussianPrior`), with the
            inputs' leading axes; `None` otherwise.
        training: whether the call is in training mode.

    Returns:
        A tensor of shape `(batch, latent_dim)`: a sample of q(z|x), or its
        mean outside training when `inference="mean"`.

    Example:

    >>> import numpy as np
    >>> x = keras.Input((8,))
    >>> z = GaussianPosterior(2, kl_regularizer=KLRegularizer(), seed=0)(x)
    >>> encoder = keras.Model(x, z)
    >>> tuple(encoder(np.zeros((3, 8), "float32")).shape)
    (3, 2)
    >>> len(encoder.losses)
    1

    Reference: Kingma & Welling, 2014, "Auto-encoding variational Bayes".
    """

    def __init__(
        self,
        latent_dim: int,
        covariance: str = "diag",
        kl_regularizer: KLRegularizer | None = None,
        min_scale: float = 1e-4,
        inference: str = "sample",
        seed: int | None = None,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(
            latent_dim, kl_regularizer=kl_regularizer, inference=inference, seed=seed, **kwargs
        )
        self.covariance = _math.choice("covariance", covariance, COVARIANCES)
        self.min_scale = _math.real("min_scale", min_scale, positive=True)
        self.kernel_initializer = _math.initializer("kernel_initializer", kernel_initializer)
        self.projection = keras.layers.Dense(
            num_params(self.latent_dim, self.covariance),
            kernel_initializer=self.kernel_initializer,
            dtype=self.dtype_policy,
            name="projection",
        )

    def build_sublayers(self, input_shape):
        if not self.projection.built:
            self.projection.build(input_shape)

    def distribution(self, inputs):
        """q(z|x) for a batch of inputs, a `keras_elbo.distributions`
        distribution (float32, or float64 under a float64 `floatx`)."""
        params = keras.ops.cast(self.projection(inputs), _math.density_dtype())
        params = _math.check_finite(params, self.name, "posterior parameters")
        return gaussian(params, self.latent_dim, self.covariance, self.min_scale)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "covariance": self.covariance,
                "min_scale": self.min_scale,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            }
        )
        return config
