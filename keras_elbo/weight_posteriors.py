"""Posteriors over a Bayesian layer's weights: q(w) as an object.

A Bayesian layer (`keras_elbo.bayesian`) flattens its kernel and bias into
one vector of P parameters and asks its weight posterior for q(w), a Gaussian
with event shape `(P,)`: `MeanFieldWeights` (independent Gaussians, Bayes by
Backprop) or `FullCovarianceWeights` (one correlated Gaussian over a small
layer's weights). The objects hold the variables, are built by the layer
with P (`build_parameters`), and save with it.
"""

import keras
import numpy as np
from keras import ops

from keras_elbo import _math
from keras_elbo._gaussian import fill_triangular, positive_scale_tril
from keras_elbo.distributions import MultivariateNormalDiag, MultivariateNormalTriL

# Floor of the posterior's scales: keeps log q(w) finite if a scale collapses.
MIN_SCALE = 1e-6
DEFAULT_SCALE_INIT = 1e-2


def _scale_init(name, value):
    value = _math.real(name, value)
    if not value > MIN_SCALE:
        raise _math.invalid_argument(name, f"a number greater than {MIN_SCALE}", value)
    return value


class WeightPosterior(keras.layers.Layer):
    """Base class of q(w), the posterior over a Bayesian layer's P parameters.

    A small layer that holds q's variables and returns q from
    `distribution()`, with event shape `(P,)`. The Bayesian layer that uses
    it builds it with its number of parameters and the initial location
    (its kernel initializer's draw, zeros for the bias) through
    `build_parameters`. A subclass creates its variables in `build(shape)`
    (`shape = (P,)`, the location from `self.loc_initializer`) and sets the
    class attribute `factorized` to whether q is a product over the
    parameters (which Flipout and local reparameterisation need). Give each
    layer its own posterior object.

    Args:
        scale_init: initial standard deviation of every parameter, greater
            than 1e-6.
    """

    factorized = False

    def __init__(self, scale_init: float = DEFAULT_SCALE_INIT, **kwargs):
        super().__init__(**kwargs)
        self.scale_init = _scale_init("scale_init", scale_init)
        self.loc_initializer = keras.initializers.get("zeros")
        self._restored_by_layer = False

    def build_parameters(self, num_parameters: int, loc_initializer="zeros"):
        """Builds q over `num_parameters` parameters, its location drawn by
        `loc_initializer` (an initializer of shape `(num_parameters,)`)."""
        self.loc_initializer = keras.initializers.get(loc_initializer)
        self.build((num_parameters,))

    @property
    def num_parameters(self) -> int:
        """P, the size of q's event."""
        return int(self.loc.shape[0])

    def distribution(self):
        """q(w), a `keras_elbo.distributions` object with event shape `(P,)`."""
        raise NotImplementedError

    def load_own_variables(self, store):
        # A file written before q(w) moved into this layer holds its values in
        # the Bayesian layer's own store, which that layer has already loaded.
        if self._restored_by_layer and not list(store.keys()):
            return
        super().load_own_variables(store)

    def call(self, inputs=None):
        raise TypeError(
            f"{type(self).__name__} is not called on tensors: pass it as the "
            "`posterior` of a Bayesian layer, which builds it and calls "
            "`distribution()`."
        )

    def get_config(self):
        config = super().get_config()
        config["scale_init"] = self.scale_init
        return config


@keras.saving.register_keras_serializable(package="keras_elbo")
class MeanFieldWeights(WeightPosterior):
    """A mean-field Gaussian posterior over a Bayesian layer's weights.

    The default q(w) of `BayesianDense` and the convolutions (Blundell et
    al., 2015): independent Gaussians, one location and one scale per
    weight and bias, 2 * P variables. Works with every estimator. The
    replacement of `tfp.layers.default_mean_field_normal_fn` and of the
    `posterior_mean_field` functions given to `tfp.layers.DenseVariational`.

    Formula:

    ```python
    scale = softplus(raw_scale) + 1e-6
    q(w) = N(loc, diag(scale**2))        # loc, raw_scale: shape (P,)
    ```

    Args:
        scale_init: initial standard deviation of every parameter, greater
            than 1e-6. Defaults to `1e-2`.

    Returns (from `distribution()`):
        A `keras_elbo.distributions.MultivariateNormalDiag`, event shape
        `(P,)`, float32.

    Example:

    >>> from keras_elbo.bayesian import DenseVariational
    >>> layer = DenseVariational(2, posterior=MeanFieldWeights(scale_init=0.1))
    >>> layer.build((None, 3))
    >>> [tuple(w.shape) for w in layer.weight_posterior.weights]  # 3 * 2 + 2 = 8
    [(8,), (8,)]
    """

    factorized = True

    def build(self, input_shape):
        size = input_shape[-1]
        self.loc = self.add_weight(
            shape=(size,), initializer=self.loc_initializer, name="loc", autocast=False
        )
        raw = _math.inverse_positive_scale(self.scale_init, MIN_SCALE)
        self.raw_scale = self.add_weight(
            shape=(size,),
            initializer=keras.initializers.Constant(raw),
            name="raw_scale",
            autocast=False,
        )
        self.built = True

    def distribution(self):
        return MultivariateNormalDiag(self.loc, _math.positive_scale(self.raw_scale, MIN_SCALE))


@keras.saving.register_keras_serializable(package="keras_elbo")
class FullCovarianceWeights(WeightPosterior):
    """A Gaussian posterior with a full covariance over a small layer's weights.

    q(w) is one multivariate normal over all P weights and biases, with a
    lower-triangular scale (P * (P + 1) / 2 variables besides the P
    locations): it captures the correlations between weights that a
    mean-field posterior ignores, at a cost that grows as P**2 in memory and
    P**3 in compute, so it is meant for small layers (P up to a few
    hundred). The replacement of a `tfp.layers.MultivariateNormalTriL`
    posterior given to `tfp.layers.DenseVariational`. It needs the
    `"reparameterization"` estimator (one weight sample per call): Flipout
    and local reparameterisation perturb each weight independently. The KL
    against a `NormalPrior` (or the default N(0, I)) has a closed form.

    Formula:

    ```python
    L = fill_triangular(raw_scale_tril)      # (P, P), lower triangular
    L = tril(L, -1) + diag(softplus(diag(L)) + 1e-6)
    q(w) = N(loc, L @ L.T)
    ```

    Args:
        scale_init: initial standard deviation of every parameter (the
            initial L is `scale_init * I`), greater than 1e-6. Defaults to
            `1e-2`.

    Returns (from `distribution()`):
        A `keras_elbo.distributions.MultivariateNormalTriL`, event shape
        `(P,)`, float32.

    Example:

    >>> from keras_elbo.bayesian import DenseVariational
    >>> layer = DenseVariational(1, posterior=FullCovarianceWeights())
    >>> layer.build((None, 3))
    >>> [tuple(w.shape) for w in layer.weight_posterior.weights]  # P = 4, 4 * 5 / 2
    [(4,), (10,)]
    """

    factorized = False

    def build(self, input_shape):
        size = input_shape[-1]
        self.loc = self.add_weight(
            shape=(size,), initializer=self.loc_initializer, name="loc", autocast=False
        )
        # The entries of fill_triangular's input that land on the diagonal
        # start at softplus^-1(scale_init), the others at zero: L = scale_init * I.
        count = size * (size + 1) // 2
        positions = np.diagonal(
            keras.ops.convert_to_numpy(fill_triangular(np.arange(1.0, count + 1), size))
        )
        initial = np.zeros(count)
        initial[positions.astype(int) - 1] = _math.inverse_positive_scale(
            self.scale_init, MIN_SCALE
        )

        def raw_initializer(shape, dtype=None):
            return ops.convert_to_tensor(initial, dtype=dtype)

        self.raw_scale_tril = self.add_weight(
            shape=(count,), initializer=raw_initializer, name="raw_scale_tril", autocast=False
        )
        self.built = True

    def distribution(self):
        # The map of GaussianPosterior(covariance="full"), with this floor.
        scale_tril = positive_scale_tril(self.raw_scale_tril, self.num_parameters, MIN_SCALE)
        return MultivariateNormalTriL(self.loc, scale_tril)
