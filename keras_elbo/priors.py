"""Prior layers: Keras layers that own the parameters of a prior p(z).

Every prior layer has a `distribution()` method returning a TFP distribution
with event shape `(latent_dim,)`; `KLRegularizer` calls it at each step, so a
trainable prior trains with the model and its weights are saved with it.
"""

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from keras_elbo import _math

tfd = tfp.distributions


class Prior(keras.layers.Layer):
    """Base class of prior layers: a layer with a `distribution()` method.

    Subclass it for a prior of your own: create weights in `build` (called from
    `__init__`, since a prior takes no input), return a TFP distribution with
    event shape `(latent_dim,)` from `distribution()`, and list the constructor
    arguments in `get_config`.
    """

    def distribution(self):
        """Returns p(z) as a TFP distribution with event shape `(latent_dim,)`."""
        raise NotImplementedError

    def call(self, inputs=None):
        raise TypeError(
            f"{type(self).__name__} is not called on tensors: pass it as the "
            "`prior` of a KLRegularizer, or use `prior.distribution()`."
        )


@keras.saving.register_keras_serializable(package="keras_elbo")
class NormalPrior(Prior):
    """A fixed diagonal normal prior, `p(z) = N(loc, scale**2 * I)`.

    `KLRegularizer(prior=None)` already uses the standard normal; use this layer
    for another location or scale, in place of a hand-built
    `tfd.MultivariateNormalDiag`, so that the model saves to `.keras`.

    Args:
        latent_dim: size of z, a positive integer.
        loc: location shared by every dimension. Defaults to `0.0`.
        scale: standard deviation shared by every dimension, positive.
            Defaults to `1.0`.

    Returns (from `distribution()`):
        A `tfd.MultivariateNormalDiag` with event shape `(latent_dim,)`.

    Example:

    >>> prior = NormalPrior(4, scale=2.0)
    >>> tuple(prior.distribution().event_shape)
    (4,)
    >>> float(prior.distribution().stddev()[0])
    2.0
    """

    def __init__(self, latent_dim: int, loc: float = 0.0, scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise _math.invalid_argument("latent_dim", "a positive integer", latent_dim)
        if not scale > 0:
            raise _math.invalid_argument("scale", "a positive number", scale)
        self.latent_dim = latent_dim
        self.loc = float(loc)
        self.scale = float(scale)
        self.built = True

    def distribution(self):
        loc = tf.fill([self.latent_dim], tf.constant(self.loc, tf.float32))
        scale = tf.fill([self.latent_dim], tf.constant(self.scale, tf.float32))
        return tfd.MultivariateNormalDiag(loc=loc, scale_diag=scale)

    def get_config(self):
        config = super().get_config()
        config.update({"latent_dim": self.latent_dim, "loc": self.loc, "scale": self.scale})
        return config


@keras.saving.register_keras_serializable(package="keras_elbo")
class MixturePrior(Prior):
    """A learnable mixture of diagonal Gaussians as the prior p(z).

    A richer prior than N(0, I): the encoder's aggregate posterior is often
    multi-modal, and a mixture prior can follow it instead of pulling every code
    towards the origin. The layer owns the mixture logits, means and scales as
    weights; when it is the `prior` of a `KLRegularizer` inside a model, they
    train with the model (`trainable=True`) and are saved with it. There is no
    closed-form KL against a mixture, so `KLRegularizer(mode="auto")` estimates
    it by Monte Carlo.

    Formula:

    ```python
    p(z) = sum_k softmax(logits)[k] * N(z; loc[k], diag(scale[k]**2))
    scale = softplus(raw_scale) + min_scale
    ```

    Args:
        latent_dim: size of z, a positive integer.
        num_components: number of Gaussians K, a positive integer.
        trainable: whether the mixture's weights train. Defaults to `True`.
        min_scale: floor added to every component scale. Defaults to `1e-3`.
        init_scale: initial scale of every component. Defaults to `1.0`.
        init_loc_stddev: component means start as draws from
            `N(0, init_loc_stddev**2)`, so that the components differ.
            Defaults to `1.0`.
        seed: seed of that draw. Defaults to `None`.

    Returns (from `distribution()`):
        A `tfd.MixtureSameFamily` of `tfd.MultivariateNormalDiag` components
        with event shape `(latent_dim,)`.

    Example:

    >>> prior = MixturePrior(latent_dim=2, num_components=5, seed=0)
    >>> tuple(prior.distribution().event_shape)
    (2,)
    >>> [tuple(w.shape) for w in prior.weights]
    [(5,), (5, 2), (5, 2)]

    Reference: Dilokthanakul et al., 2016, "Deep unsupervised clustering with
    Gaussian mixture variational autoencoders".
    """

    def __init__(
        self,
        latent_dim: int,
        num_components: int,
        trainable: bool = True,
        min_scale: float = 1e-3,
        init_scale: float = 1.0,
        init_loc_stddev: float = 1.0,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(trainable=trainable, **kwargs)
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise _math.invalid_argument("latent_dim", "a positive integer", latent_dim)
        if not isinstance(num_components, int) or num_components < 1:
            raise _math.invalid_argument("num_components", "a positive integer", num_components)
        if not min_scale > 0:
            raise _math.invalid_argument("min_scale", "a positive number", min_scale)
        if not init_scale > min_scale:
            raise _math.invalid_argument(
                "init_scale", f"a number greater than min_scale={min_scale}", init_scale
            )
        if not init_loc_stddev >= 0:
            raise _math.invalid_argument(
                "init_loc_stddev", "a non-negative number", init_loc_stddev
            )
        self.latent_dim = latent_dim
        self.num_components = num_components
        self.min_scale = float(min_scale)
        self.init_scale = float(init_scale)
        self.init_loc_stddev = float(init_loc_stddev)
        self.seed = seed
        # The prior takes no input, so its weights are made now rather than on
        # a first call: `distribution()` works as soon as the layer exists.
        self.build()

    def build(self, input_shape=None):
        k, d = self.num_components, self.latent_dim
        self.logits = self.add_weight(shape=(k,), initializer="zeros", name="logits")
        self.loc = self.add_weight(
            shape=(k, d),
            initializer=keras.initializers.RandomNormal(
                stddev=self.init_loc_stddev, seed=self.seed
            ),
            name="loc",
        )
        self.raw_scale = self.add_weight(
            shape=(k, d),
            initializer=keras.initializers.Constant(
                _math.inverse_positive_scale(self.init_scale, self.min_scale)
            ),
            name="raw_scale",
        )
        self.built = True

    def distribution(self):
        scale = _math.positive_scale(tf.convert_to_tensor(self.raw_scale), self.min_scale)
        return tfd.MixtureSameFamily(
            mixture_distribution=tfd.Categorical(logits=tf.convert_to_tensor(self.logits)),
            components_distribution=tfd.MultivariateNormalDiag(
                loc=tf.convert_to_tensor(self.loc), scale_diag=scale
            ),
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "latent_dim": self.latent_dim,
                "num_components": self.num_components,
                "min_scale": self.min_scale,
                "init_scale": self.init_scale,
                "init_loc_stddev": self.init_loc_stddev,
                "seed": self.seed,
            }
        )
        return config
