"""Prior layers: Keras layers that own the parameters of a prior p(z).

Every prior layer has a `distribution()` method returning a `keras_elbo.distributions` object
with event shape `(latent_dim,)`; `KLRegularizer` calls it at each step, so a
trainable prior trains with the model and its weights are saved with it. A
conditional prior (`ConditionalPrior`: `ConditionalGaussianPrior`,
`ConditionalMixturePrior`) computes p(z | c) from tensors of the model, the
`prior_inputs` its posterior layer is called with: `distribution(prior_inputs)`.
"""

import math

import keras

from keras_elbo import _gaussian, _math
from keras_elbo import distributions as kd
from keras_elbo._base import deserialize_nested


class Prior(keras.layers.Layer):
    """Base class of prior layers: a layer with a `distribution()` method.

    Subclass it for a prior of your own: create weights in `build` (called from
    `__init__`, since a prior takes no input), return a `keras_elbo.distributions` object with
    event shape `(latent_dim,)` from `distribution()`, and list the constructor
    arguments in `get_config`. A prior whose size should follow the posterior
    it is used with stores `latent_dim = None`: `KLRegularizer` then sets the
    attribute to the posterior's event size before its first
    `distribution()` call.
    """

    def distribution(self, posterior_layer=None):
        """Returns p(z) as a `keras_elbo.distributions` object with event shape `(latent_dim,)`.

        Args:
            posterior_layer: the posterior layer whose KL uses this prior,
                passed by `KLRegularizer`. Most priors ignore it; a prior
                built from the model's own posterior (`VampPrior`) needs it.
        """
        raise NotImplementedError

    # Whether `distribution` takes the `prior_inputs` of each call.
    conditional = False

    def call(self, inputs=None):
        raise TypeError(
            f"{type(self).__name__} is not called on tensors: pass it as the "
            "`prior` of a KLRegularizer, or use `prior.distribution()`."
        )


def _features_shape(prior_inputs):
    """The shape a conditional prior builds for: only the last axis known (a
    traced batch axis may be a backend's symbolic dimension, which a saved
    build config cannot hold)."""
    shape = tuple(prior_inputs.shape)
    if not shape or shape[-1] is None:
        raise ValueError(
            "A conditional prior needs prior_inputs with a known last axis (the "
            f"features of c); received a tensor of shape {shape}."
        )
    return (None,) * (len(shape) - 1) + (int(shape[-1]),)


class ConditionalPrior(Prior):
    """Base class of conditional priors: p(z | c) computed from tensors of the model.

    A conditional prior is the `prior` of a `KLRegularizer`; its posterior
    layer is called with the prior's inputs as well,
    `posterior(features, prior_inputs=c)` (or, for a layer of your own,
    `kl_regularizer(z, posterior=q, prior_inputs=c)`), and the regularizer
    asks `distribution(c)` for p(z | c) at every call: one distribution per
    example, with the posterior's batch shape. `c` is any tensor the model
    computes (a label's embedding for a conditional VAE, features of the
    latent above for a hierarchical one, a recurrent state for a sequential
    one), and gradients flow through the prior into the network that made it.

    Subclass it: create the sublayers that map `c` to the prior's parameters
    in `__init__` (they build on the first call), return a
    `keras_elbo.distributions` object with event shape `(latent_dim,)` and
    batch shape `c.shape[:-1]` from `distribution(prior_inputs)`, and list
    the constructor arguments in `get_config`.
    """

    conditional = True

    @property
    def event_shape(self) -> tuple:
        """The event shape of p(z | c), `(latent_dim,)` unless overridden: the
        posterior's must be the same (checked when the posterior builds)."""
        return (self.latent_dim,)

    def distribution(self, prior_inputs, posterior_layer=None):
        """Returns p(z | prior_inputs), a `keras_elbo.distributions` object with
        event shape `(latent_dim,)` and batch shape `prior_inputs.shape[:-1]`."""
        raise NotImplementedError


class _ProjectedPrior(ConditionalPrior):
    """A conditional prior whose parameters are a `Dense` projection of its
    inputs: the projection, build, finite check and config its subclasses
    share. A subclass calls `_make_projection(units)` in `__init__` and makes
    its distribution from `_params(prior_inputs)`."""

    def __init__(self, kernel_initializer, **kwargs):
        super().__init__(**kwargs)
        self.kernel_initializer = _math.initializer("kernel_initializer", kernel_initializer)

    def _make_projection(self, units):
        self.projection = keras.layers.Dense(
            units,
            kernel_initializer=self.kernel_initializer,
            dtype=self.dtype_policy,
            name="projection",
        )

    def build(self, input_shape):
        if not self.projection.built:
            self.projection.build(input_shape)
        self.built = True

    def _params(self, prior_inputs):
        """The projection of `prior_inputs`, in the density dtype, checked finite."""
        if not self.built:
            self.build(_features_shape(prior_inputs))
        params = keras.ops.cast(self.projection(prior_inputs), _math.density_dtype())
        return _math.check_finite(params, self.name, "prior parameters")

    def get_config(self):
        config = super().get_config()
        config["kernel_initializer"] = keras.initializers.serialize(self.kernel_initializer)
        return config


class _ProjectedContinuousPrior(_ProjectedPrior):
    """A projected prior over `latent_dim` reals with a `min_scale`."""

    def __init__(self, latent_dim, min_scale, kernel_initializer, **kwargs):
        super().__init__(kernel_initializer, **kwargs)
        self.latent_dim = _math.integer("latent_dim", latent_dim)
        self.min_scale = _math.real("min_scale", min_scale, positive=True)

    def get_config(self):
        config = super().get_config()
        config.update({"latent_dim": self.latent_dim, "min_scale": self.min_scale})
        return config


@keras.saving.register_keras_serializable(package="keras_elbo")
class ConditionalGaussianPrior(_ProjectedContinuousPrior):
    """A Gaussian prior p(z | c) whose parameters are a dense projection of `c`.

    The prior of a conditional VAE (Sohn et al., 2015: p(z | y) from the
    label), of the lower layers of a hierarchical VAE (p(z_1 | z_2), Burda et
    al., 2016; Sonderby et al., 2016) and of a sequential latent model
    (p(z_t | h_t), Chung et al., 2015; Hafner et al., 2019). Parametrised as
    `GaussianPosterior` is: the first `latent_dim` outputs of a `Dense`
    projection of `c` are the location, the rest the scales (`"diag"`,
    `softplus(raw) + min_scale`) or a lower-triangular scale (`"full"`). The
    KL against a Gaussian posterior (diagonal or full) is then the closed
    form, per example, with gradients into both networks.

    Use it as the `prior` of the `KLRegularizer` of a posterior layer called
    with `prior_inputs=c` (a tensor of shape `(batch, ..., features)` whose
    leading axes are the posterior's batch axes).

    Formula:

    ```python
    params = Dense(num_params)(c)
    p(z | c) = N(params[:d], diag(softplus(params[d:]) + min_scale)**2)   # "diag"
    ```

    Args:
        latent_dim: size of z, a positive integer.
        covariance: `"diag"` or `"full"`. Defaults to `"diag"`.
        min_scale: positive floor of the prior's scales. Defaults to `1e-4`.
        kernel_initializer: initializer of the projection's kernel.
            Defaults to `"glorot_uniform"`.

    Returns (from `distribution(c)`):
        A `MultivariateNormalDiag` (`"diag"`) or `MultivariateNormalTriL`
        (`"full"`) with batch shape `c.shape[:-1]`, event shape `(latent_dim,)`.

    Example:

    >>> import numpy as np
    >>> from keras_elbo import GaussianPosterior, KLRegularizer
    >>> x, label = keras.Input((6,)), keras.Input((3,))
    >>> prior = ConditionalGaussianPrior(2)
    >>> posterior = GaussianPosterior(2, kl_regularizer=KLRegularizer(prior=prior), seed=0)
    >>> z = posterior(x, prior_inputs=label)
    >>> encoder = keras.Model([x, label], z)
    >>> tuple(encoder([np.zeros((4, 6)), np.eye(3)[[0, 1, 2, 0]]]).shape)
    (4, 2)
    >>> tuple(prior.distribution(np.eye(3)[:2]).batch_shape)
    (2,)

    Reference: Sohn et al., 2015, "Learning structured output representation
    using deep conditional generative models".
    """

    def __init__(
        self,
        latent_dim: int,
        covariance: str = "diag",
        min_scale: float = 1e-4,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(latent_dim, min_scale, kernel_initializer, **kwargs)
        self.covariance = _math.choice("covariance", covariance, _gaussian.COVARIANCES)
        self._make_projection(_gaussian.num_params(self.latent_dim, self.covariance))

    def distribution(self, prior_inputs, posterior_layer=None):
        params = self._params(prior_inputs)
        return _gaussian.gaussian(params, self.latent_dim, self.covariance, self.min_scale)

    def get_config(self):
        return {**super().get_config(), "covariance": self.covariance}


@keras.saving.register_keras_serializable(package="keras_elbo")
class ConditionalMixturePrior(_ProjectedContinuousPrior):
    """A mixture of diagonal Gaussians p(z | c) whose weights, locations and
    scales are a dense projection of `c`.

    A multi-modal conditional prior: the context selects and places the
    modes (the mixture density networks of Bishop, 1994, as a prior). There
    is no closed-form KL against a mixture: `KLRegularizer(mode="auto")`
    estimates it by Monte Carlo.

    Formula:

    ```python
    logits, loc, raw = split(Dense(K + 2 * K * d)(c))   # (K,), (K, d), (K, d)
    p(z | c) = sum_k softmax(logits)[k] * N(z; loc[k], diag(softplus(raw[k]) + min_scale)**2)
    ```

    Args:
        latent_dim: size of z, a positive integer.
        num_components: number of Gaussians K, a positive integer.
        min_scale: positive floor of every component scale. Defaults to
            `1e-3`.
        kernel_initializer: initializer of the projection's kernel.
            Defaults to `"glorot_uniform"`.

    Returns (from `distribution(c)`):
        A `MixtureSameFamily` of `MultivariateNormalDiag` components with
        batch shape `c.shape[:-1]` and event shape `(latent_dim,)`.

    Example:

    >>> import numpy as np
    >>> prior = ConditionalMixturePrior(latent_dim=2, num_components=3)
    >>> p = prior.distribution(np.ones((4, 5), "float32"))
    >>> tuple(p.batch_shape), tuple(p.event_shape)
    ((4,), (2,))
    """

    def __init__(
        self,
        latent_dim: int,
        num_components: int,
        min_scale: float = 1e-3,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(latent_dim, min_scale, kernel_initializer, **kwargs)
        self.num_components = _math.integer("num_components", num_components)
        k, d = self.num_components, self.latent_dim
        self._make_projection(k + 2 * k * d)

    def distribution(self, prior_inputs, posterior_layer=None):
        params = self._params(prior_inputs)
        k, d = self.num_components, self.latent_dim
        batch = keras.ops.shape(params)[:-1]
        logits = params[..., :k]
        loc = keras.ops.reshape(params[..., k : k + k * d], (*batch, k, d))
        raw = keras.ops.reshape(params[..., k + k * d :], (*batch, k, d))
        components = kd.MultivariateNormalDiag(loc, _math.positive_scale(raw, self.min_scale))
        return kd.MixtureSameFamily(logits, components)

    def get_config(self):
        return {**super().get_config(), "num_components": self.num_components}


# Floor of a learned prior scale: keeps log p(z) finite if it collapses.
_TRAINED_MIN_SCALE = 1e-6


def _check_latent_dim(latent_dim):
    """Validates a `latent_dim` that may be `None` (set from the posterior)."""
    return None if latent_dim is None else _math.integer("latent_dim", latent_dim)


def _known_input_shape(layer):
    """The shape of one input example of a layer or model, if it is known."""
    try:
        shape = layer.input_shape if isinstance(layer, keras.Model) else None
    except (AttributeError, ValueError):
        return None
    if isinstance(shape, tuple) and all(isinstance(n, int) for n in shape[1:]):
        return tuple(shape[1:])
    return None


def _known_latent_dim(prior):
    """`prior.latent_dim`, or a clear error while it is still `None`."""
    if prior.latent_dim is None:
        raise ValueError(
            f"{type(prior).__name__} '{prior.name}' has latent_dim=None: its size is "
            "set from the posterior by the KLRegularizer it is the prior of, when the "
            "layer using it is built. Give latent_dim to use it on its own."
        )
    return prior.latent_dim


@keras.saving.register_keras_serializable(package="keras_elbo")
class NormalPrior(Prior):
    """A diagonal normal prior, `p(z) = N(loc, scale**2 * I)`, fixed or learned.

    `KLRegularizer(prior=None)` already uses the standard normal; use this layer
    for another location or scale, in place of a hand-built
    `MultivariateNormalDiag`, so that the model saves to `.keras`. With
    `trainable_loc=True` (and/or `trainable_scale=True`) the location (scale)
    of each dimension is a weight, starting at `loc` (`scale`), learned with
    the model (empirical Bayes): the trainable prior of `tfp.layers`'
    `DenseVariational` examples (`VariableLayer` + `Normal(loc=t, scale=1)`)
    is `NormalPrior(trainable_loc=True)`.

    With `latent_dim=None` the prior takes the size of the posterior it is
    used with: `KLRegularizer.check_posterior` (called when the posterior or
    Bayesian layer is built) sets `latent_dim` to the posterior's event size,
    and the config then records that size (a trainable prior makes its
    weights then). This is how a weight prior is given to `BayesianDense`,
    whose number of weights is known only once its input shape is:
    `BayesianDense(8, prior=NormalPrior(scale=0.5))`. Such a prior then
    belongs to one layer: do not share it between layers of different sizes.

    Args:
        latent_dim: size of z, a positive integer, or `None` to take the
            posterior's size. Defaults to `None`.
        loc: location of every dimension (the initial one if trainable).
            Defaults to `0.0`.
        scale: standard deviation of every dimension, positive (the initial
            one if trainable). Defaults to `1.0`.
        trainable_loc: learn the location of each dimension. Defaults to
            `False`.
        trainable_scale: learn the scale of each dimension (as
            `softplus(raw) + 1e-6`). Defaults to `False`.

    Returns (from `distribution()`):
        A `keras_elbo.distributions.MultivariateNormalDiag` with event shape
        `(latent_dim,)`.

    Example:

    >>> prior = NormalPrior(4, scale=2.0)
    >>> tuple(prior.distribution().event_shape)
    (4,)
    >>> float(prior.distribution().stddev()[0])
    2.0
    >>> [w.name for w in NormalPrior(4, trainable_loc=True).trainable_weights]
    ['loc']
    """

    def __init__(
        self,
        latent_dim: int | None = None,
        loc: float = 0.0,
        scale: float = 1.0,
        trainable_loc: bool = False,
        trainable_scale: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.latent_dim = _check_latent_dim(latent_dim)
        self.loc = _math.real("loc", loc)
        self.scale = _math.real("scale", scale, positive=True)
        self.trainable_loc = _math.boolean("trainable_loc", trainable_loc)
        self.trainable_scale = _math.boolean("trainable_scale", trainable_scale)
        self.loc_weight = self.raw_scale_weight = None
        # A fixed prior has no weights; a trainable one makes them as soon as
        # its size is known (now, or when the regularizer sets it).
        if self.latent_dim is not None or not (trainable_loc or trainable_scale):
            self.build()

    def build(self, input_shape=None):
        d = self.latent_dim
        if self.trainable_loc:
            self.loc_weight = self.add_weight(
                shape=(d,), initializer=keras.initializers.Constant(self.loc), name="loc"
            )
        if self.trainable_scale:
            raw = _math.inverse_positive_scale(self.scale, _TRAINED_MIN_SCALE)
            self.raw_scale_weight = self.add_weight(
                shape=(d,), initializer=keras.initializers.Constant(raw), name="raw_scale"
            )
        self.built = True

    def distribution(self, posterior_layer=None):
        latent_dim = _known_latent_dim(self)
        if not self.built:
            self.build()
        dtype = _math.density_dtype()
        loc = keras.ops.full((latent_dim,), self.loc, dtype=dtype)
        scale = keras.ops.full((latent_dim,), self.scale, dtype=dtype)
        if self.loc_weight is not None:
            loc = keras.ops.cast(self.loc_weight, dtype)
        if self.raw_scale_weight is not None:
            raw = keras.ops.cast(self.raw_scale_weight, dtype)
            scale = _math.positive_scale(raw, _TRAINED_MIN_SCALE)
        return kd.MultivariateNormalDiag(loc, scale)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "latent_dim": self.latent_dim,
                "loc": self.loc,
                "scale": self.scale,
                "trainable_loc": self.trainable_loc,
                "trainable_scale": self.trainable_scale,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_elbo")
class ScaleMixturePrior(Prior):
    """The scale mixture prior of Bayes by Backprop, independent per dimension.

    Each dimension (each weight of a Bayesian layer) independently follows a
    mixture of two zero-mean normals, a wide one and a narrow one: heavier
    tails than a single normal, with much of its mass near zero, so that
    unneeded weights are pulled towards zero while needed ones may grow.
    There is no closed-form KL against it: `KLRegularizer(mode="auto")`
    estimates it by Monte Carlo (`"mc_entropy"` for a Gaussian posterior).

    As for `NormalPrior`, `latent_dim=None` takes the size of the posterior
    it is used with (set by `KLRegularizer.check_posterior` at build time).

    Formula:

    ```python
    p(w) = prod_i(
        mixture_weight * N(w[i]; 0, scale1**2)
        + (1 - mixture_weight) * N(w[i]; 0, scale2**2)
    )
    ```

    Args:
        latent_dim: number of dimensions, a positive integer, or `None` to
            take the posterior's size. Defaults to `None`.
        mixture_weight: weight `pi` of the first component, in (0, 1).
            Defaults to `0.5`.
        scale1: standard deviation of the first component, positive.
            Defaults to `1.0`.
        scale2: standard deviation of the second component, positive.
            Defaults to `exp(-6)` (about 0.0025), one of the paper's settings.

    Returns (from `distribution()`):
        An `Independent` of a `MixtureSameFamily` of two `Normal`
        per dimension, with event shape `(latent_dim,)`.

    Example:

    >>> prior = ScaleMixturePrior(3)
    >>> tuple(prior.distribution().event_shape)
    (3,)
    >>> round(float(prior.distribution().stddev()[0]), 4)  # sqrt(0.5 * 1 + 0.5 * e**-12)
    0.7071

    Reference: Blundell et al., 2015, "Weight uncertainty in neural networks".
    """

    def __init__(
        self,
        latent_dim: int | None = None,
        mixture_weight: float = 0.5,
        scale1: float = 1.0,
        scale2: float = math.exp(-6),
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.latent_dim = _check_latent_dim(latent_dim)
        self.mixture_weight = _math.real("mixture_weight", mixture_weight, positive=True)
        if not self.mixture_weight < 1:
            raise _math.invalid_argument("mixture_weight", "a number in (0, 1)", mixture_weight)
        self.scale1 = _math.real("scale1", scale1, positive=True)
        self.scale2 = _math.real("scale2", scale2, positive=True)
        self.built = True

    def distribution(self, posterior_layer=None):
        shape = [_known_latent_dim(self), 2]
        dtype = _math.density_dtype()
        weights = [self.mixture_weight, 1.0 - self.mixture_weight]
        logits = keras.ops.broadcast_to(keras.ops.log(keras.ops.array(weights, dtype)), shape)
        scales = keras.ops.broadcast_to(keras.ops.array([self.scale1, self.scale2], dtype), shape)
        mixture = kd.MixtureSameFamily(logits, kd.Normal(keras.ops.zeros(shape, dtype), scales))
        return kd.Independent(mixture, reinterpreted_batch_ndims=1)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "latent_dim": self.latent_dim,
                "mixture_weight": self.mixture_weight,
                "scale1": self.scale1,
                "scale2": self.scale2,
            }
        )
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
        A `MixtureSameFamily` of `MultivariateNormalDiag` components
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
        latent_dim = _math.integer("latent_dim", latent_dim)
        num_components = _math.integer("num_components", num_components)
        min_scale = _math.real("min_scale", min_scale, positive=True)
        init_scale = _math.real("init_scale", init_scale, positive=True)
        init_loc_stddev = _math.real("init_loc_stddev", init_loc_stddev, non_negative=True)
        if not init_scale > min_scale:
            raise _math.invalid_argument(
                "init_scale", f"a number greater than min_scale={min_scale}", init_scale
            )
        self.latent_dim = latent_dim
        self.num_components = num_components
        self.min_scale = min_scale
        self.init_scale = init_scale
        self.init_loc_stddev = init_loc_stddev
        self.seed = _math.seed("seed", seed)
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
        dtype = _math.density_dtype()
        scale = _math.positive_scale(keras.ops.cast(self.raw_scale, dtype), self.min_scale)
        return kd.MixtureSameFamily(
            keras.ops.cast(self.logits, dtype),
            kd.MultivariateNormalDiag(keras.ops.cast(self.loc, dtype), scale),
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
        num_components = _math.integer("num_components", num_components)
        input_shape = tuple(input_shape) if isinstance(input_shape, list | tuple) else input_shape
        if not (
            isinstance(input_shape, tuple)
            and input_shape
            and all(isinstance(n, int) and n > 0 for n in input_shape)
        ):
            raise _math.invalid_argument(
                "input_shape", "a tuple of positive integers, e.g. (784,)", input_shape
            )
        expected = _known_input_shape(encoder)
        if expected is not None and expected != input_shape:
            raise _math.invalid_argument(
                "input_shape", f"the encoder's input shape {expected}", input_shape
            )
        self.encoder = encoder
        self.num_components = num_components
        self.input_shape_ = input_shape
        self.activation = _math.activation("activation", activation)
        self.seed = _math.seed("seed", seed)
        if pseudo_inputs_initializer is None:
            pseudo_inputs_initializer = keras.initializers.RandomNormal(
                mean=0.5, stddev=0.05, seed=seed
            )
        self.pseudo_inputs_initializer = _math.initializer(
            "pseudo_inputs_initializer", pseudo_inputs_initializer
        )
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
                "method) that uses it: use it as the prior of the KLRegularizer of one "
                "keras_elbo posterior layer (a regularizer shared by several cannot "
                "tell which), or call `distribution(posterior_layer=...)`. Received: "
                f"posterior_layer={posterior_layer!r}"
            )
        u = self.activation(keras.ops.convert_to_tensor(self.pseudo_inputs))
        components = posterior_layer.distribution(self.encoder(u))
        return kd.MixtureSameFamily(
            keras.ops.zeros((self.num_components,), components.dtype), components
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
        return cls(**deserialize_nested(config, "encoder"))
