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

    def distribution(self, posterior_layer=None):
        """Returns p(z) as a TFP distribution with event shape `(latent_dim,)`.

        Args:
            posterior_layer: the posterior layer whose KL uses this prior,
                passed by `KLRegularizer`. Most priors ignore it; a prior
                built from the model's own posterior (`VampPrior`) needs it.
        """
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

    def distribution(self, posterior_layer=None):
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

    def distribution(self, posterior_layer=None):
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


@keras.saving.register_keras_serializable(package="keras_elbo")
class VampPrior(Prior):
    """The VampPrior: a mixture of the model's own posteriors at pseudo-inputs.

    `p(z) = mean_k q(z | u_k)` over K learnable pseudo-inputs u_k that live in
    the data space: the prior the data would induce if it were K points,
    learned with the model. It closes much of the gap between the standard
    normal prior and the aggregate posterior (Tomczak & Welling, 2018, Table 1:
    on static binarized MNIST, test NLL 85.57 against about 88 with N(0, I)).

    It needs the model's encoder: give it the `encoder` body, the layer or
    sub-model that maps data to the posterior layer's input features, which
    the model also uses. The posterior layer whose `KLRegularizer` holds this
    prior passes itself at each call, so the pseudo-inputs go through the
    same body and posterior head as the data. The body is shared, not copied:
    saving and loading keep it one layer. There is no closed-form KL against
    it; `KLRegularizer(mode="auto")` estimates it by Monte Carlo.

    Formula:

    ```python
    u = activation(pseudo_inputs)                 # (K, *input_shape)
    p(z) = mean_k q(z | u_k) = mean_k posterior(encoder(u))[k].prob(z)
    ```

    Args:
        encoder: the layer or model from data to the posterior's features,
            shared with the model.
        num_components: number of pseudo-inputs K, a positive integer.
        input_shape: shape of one data example, e.g. `(784,)`.
        activation: applied to the pseudo-inputs, e.g. `"hard_sigmoid"` to
            keep them in [0, 1] like binary pixels. Defaults to `None`.
        pseudo_inputs_initializer: initializer of the pseudo-inputs. Defaults
            to `RandomNormal(mean=0.5, stddev=0.05)` (the paper's
            initialisation for binary data is close to this).
        seed: seed of that initializer when it is the default. Defaults to
            `None`.

    Example:

    >>> body = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    >>> from keras_elbo import GaussianPosterior, KLRegularizer
    >>> prior = VampPrior(body, num_components=3, input_shape=(6,), seed=0)
    >>> x = keras.Input((6,))
    >>> z = GaussianPosterior(2, kl_regularizer=KLRegularizer(prior=prior))(body(x))
    >>> tuple(prior.pseudo_inputs.shape)
    (3, 6)

    Reference: Tomczak & Welling, 2018, "VAE with a VampPrior".
    """

    def __init__(
        self,
        encoder: keras.layers.Layer,
        num_components: int,
        input_shape: tuple,
        activation=None,
        pseudo_inputs_initializer=None,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(encoder, keras.layers.Layer):
            raise _math.invalid_argument("encoder", "a Keras layer or model", encoder)
        if not isinstance(num_components, int) or num_components < 1:
            raise _math.invalid_argument("num_components", "a positive integer", num_components)
        input_shape = tuple(input_shape) if isinstance(input_shape, list | tuple) else input_shape
        if not (
            isinstance(input_shape, tuple)
            and input_shape
            and all(isinstance(n, int) and n > 0 for n in input_shape)
        ):
            raise _math.invalid_argument(
                "input_shape", "a tuple of positive integers, e.g. (784,)", input_shape
            )
        self.encoder = encoder
        self.num_components = num_components
        self.input_shape_ = input_shape
        self.activation = keras.activations.get(activation)
        self.seed = seed
        if pseudo_inputs_initializer is None:
            pseudo_inputs_initializer = keras.initializers.RandomNormal(
                mean=0.5, stddev=0.05, seed=seed
            )
        self.pseudo_inputs_initializer = keras.initializers.get(pseudo_inputs_initializer)
        self.build()

    def build(self, input_shape=None):
        self.pseudo_inputs = self.add_weight(
            shape=(self.num_components, *self.input_shape_),
            initializer=self.pseudo_inputs_initializer,
            name="pseudo_inputs",
        )
        self.built = True

    def distribution(self, posterior_layer=None):
        if posterior_layer is None or not callable(getattr(posterior_layer, "distribution", None)):
            raise ValueError(
                "VampPrior needs the posterior layer (with a `distribution(features)` "
                "method) that uses it: use it as the prior of the KLRegularizer of a "
                "keras_elbo posterior layer, which passes itself. Received: "
                f"posterior_layer={posterior_layer!r}"
            )
        u = self.activation(tf.convert_to_tensor(self.pseudo_inputs))
        components = posterior_layer.distribution(self.encoder(u))
        return tfd.MixtureSameFamily(
            mixture_distribution=tfd.Categorical(logits=tf.zeros([self.num_components])),
            components_distribution=components,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "encoder": keras.saving.serialize_keras_object(self.encoder),
                "num_components": self.num_components,
                "input_shape": self.input_shape_,
                "activation": keras.activations.serialize(self.activation),
                "pseudo_inputs_initializer": keras.initializers.serialize(
                    self.pseudo_inputs_initializer
                ),
                "seed": self.seed,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        return cls(**config)
