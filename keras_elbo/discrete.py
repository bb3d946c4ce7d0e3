"""Discrete latent variables: categorical and Bernoulli posteriors whose
samples carry a gradient (straight-through or Gumbel-softmax), and their priors.

A discrete sample has no reparameterisation: the layers here return a sample
whose forward value is discrete (or relaxed) and whose backward pass is that
of a differentiable surrogate:

```python
straight_through:       z = one_hot(k) + p - stop_gradient(p),   k ~ Categorical(p)
gumbel_softmax:         z = y = softmax((logits + g) / temperature),  g ~ Gumbel(0, 1)
gumbel_softmax, hard:   z = one_hot(argmax(y)) + y - stop_gradient(y)
```

(Bengio et al., 2013; Jang et al., 2017; Maddison et al., 2017; the
straight-through form with `unimix` as in Hafner et al., 2023, DreamerV3.)
For Bernoulli latents the relaxation is the binary Concrete
(`keras_elbo.distributions.RelaxedBernoulli`) and `argmax` is `y > 1/2`.

The KL term is that of the discrete distributions (the posterior's
categorical or Bernoulli against the prior's), in closed form, so
`KLRegularizer(mode="auto")` uses the exact KL. A Monte Carlo mode scores
the returned sample with the categorical log-probabilities: exact for the
hard estimators, a relaxation for the soft Gumbel-softmax.
"""

import keras
import numpy as np
from keras import ops

from keras_elbo import _math
from keras_elbo import distributions as kd
from keras_elbo.divergence import KLRegularizer
from keras_elbo.posteriors import Posterior
from keras_elbo.priors import Prior, _ProjectedPrior

ESTIMATORS = ("straight_through", "gumbel_softmax")
INFERENCE_OUTPUTS = ("mode", "probs", "sample")


def relaxed_samples_error(what, posterior):
    """The error of an importance-weighted bound over a posterior's relaxed samples."""
    return ValueError(
        f"{what}: posterior '{posterior.name}' returns soft Gumbel-softmax samples, "
        "points of the simplex (or of (0, 1)) that its categorical (Bernoulli) q gives "
        "no probability, so they cannot be importance-weighted. Use "
        "estimator='straight_through' or hard=True (discrete samples of the same q)."
    )


def _forward_backward(forward, backward):
    """`forward` in the forward pass, the gradient of `backward` in the backward."""
    return forward + backward - ops.stop_gradient(backward)


class _WithGradient:
    """Samples of a discrete family that carry the estimator's gradient.

    Mixed into `OneHotCategorical` and `Bernoulli`, whose `log_prob`,
    `entropy` and closed-form KL it keeps (the posterior handed to the
    `KLRegularizer` is the discrete q). Straight-through: a discrete sample
    with the gradient of the probabilities (`_probs`). Gumbel-softmax: a
    sample of the relaxation (`_relaxation`), or with `hard` its rounding
    (`_rounded`) with the relaxation's gradient.
    """

    reparameterized = True

    def __init__(self, logits, estimator, temperature, hard):
        super().__init__(logits)
        self._estimator = estimator
        self._temperature = temperature
        self._hard = hard

    def _sample(self, sample_shape, seed):
        if self._estimator == "straight_through":
            return _forward_backward(super()._sample(sample_shape, seed), self._probs())
        y = self._relaxation()._sample(sample_shape, seed)
        return _forward_backward(self._rounded(y), y) if self._hard else y


class _OneHotCategoricalWithGradient(_WithGradient, kd.OneHotCategorical):
    """A `OneHotCategorical` whose samples carry the estimator's gradient."""

    def _probs(self):
        return ops.softmax(self._logits, axis=-1)

    def _relaxation(self):
        return kd.RelaxedOneHotCategorical(self._temperature, self._logits)

    def _rounded(self, y):
        return ops.one_hot(ops.argmax(y, axis=-1), self.event_shape[-1], dtype=self.dtype)


class _BernoulliWithGradient(_WithGradient, kd.Bernoulli):
    """A `Bernoulli` whose samples carry the estimator's gradient."""

    def _probs(self):
        return ops.sigmoid(self._logits)

    def _relaxation(self):
        return kd.RelaxedBernoulli(self._temperature, self._logits)

    def _rounded(self, y):
        return ops.cast(y > 0.5, self.dtype)


def _unimix(value):
    value = _math.real("unimix", value, non_negative=True)
    if value >= 1.0:
        raise _math.invalid_argument("unimix", "a number in [0, 1)", value)
    return value


def _mixed_with_uniform(logits, unimix):
    """The logits of `(1 - unimix) * softmax(logits) + unimix / K` (K the last axis)."""
    if not unimix:
        return logits
    num_classes = logits.shape[-1]
    return ops.log((1.0 - unimix) * ops.softmax(logits, axis=-1) + unimix / num_classes)


class _DiscretePosterior(Posterior):
    """What the categorical and Bernoulli posteriors share: the projection,
    the estimator's settings, the temperature variable and the outputs."""

    inference_outputs = INFERENCE_OUTPUTS
    reparameterized_samples = False

    @property
    def samples_have_log_prob(self):
        """Whether the samples are one-hot (bits): not so for the soft
        Gumbel-softmax, whose relaxed samples q gives no probability."""
        return self.estimator == "straight_through" or self.hard

    def __init__(
        self,
        size,
        estimator,
        temperature,
        hard,
        unimix,
        kl_regularizer,
        inference,
        seed,
        kernel_initializer,
        **kwargs,
    ):
        super().__init__(
            size, kl_regularizer=kl_regularizer, inference=inference, seed=seed, **kwargs
        )
        self.estimator = _math.choice("estimator", estimator, ESTIMATORS)
        self.temperature = _math.real("temperature", temperature, positive=True)
        self.hard = _math.boolean("hard", hard)
        self.unimix = _unimix(unimix)
        self.kernel_initializer = _math.initializer("kernel_initializer", kernel_initializer)
        self.projection = keras.layers.Dense(
            size,
            kernel_initializer=self.kernel_initializer,
            dtype=self.dtype_policy,
            name="projection",
        )

    def build_sublayers(self, input_shape):
        if not self.projection.built:
            self.projection.build(input_shape)
        if self.estimator == "gumbel_softmax" and not hasattr(self, "temperature_variable"):
            # A variable, so that `TemperatureAnnealing` can lower it during
            # training (and a saved model keeps the value it reached).
            self.temperature_variable = self.add_weight(
                shape=(),
                initializer=keras.initializers.Constant(self.temperature),
                trainable=False,
                dtype=_math.density_dtype(),
                name="temperature",
            )

    def _logits(self, inputs):
        logits = ops.cast(self.projection(inputs), _math.density_dtype())
        return _math.check_finite(logits, self.name, "posterior parameters")

    def _temperature(self):
        if self.estimator != "gumbel_softmax":
            return None
        return ops.cast(self.temperature_variable, _math.density_dtype())

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "estimator": self.estimator,
                "temperature": self.temperature,
                "hard": self.hard,
                "unimix": self.unimix,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_elbo")
class CategoricalPosterior(_DiscretePosterior):
    """A posterior of `num_variables` categorical latents of `num_classes` classes.

    The encoder head of a categorical VAE (Jang et al., 2017) or of the
    stochastic state of a DreamerV2/V3 world model (32 variables of 32
    classes). The layer projects its input to the logits of q(z|x), one
    categorical per variable, draws a one-hot sample whose gradient is that
    of the `estimator`, hands it and q to its `kl_regularizer` (the KL
    between categoricals, in closed form), and returns it.

    - `estimator="straight_through"`: the forward value is a one-hot sample,
      the backward pass the gradient of the class probabilities
      (`one_hot + p - stop_gradient(p)`; Bengio et al., 2013).
    - `estimator="gumbel_softmax"`: the Concrete relaxation
      `softmax((logits + g) / temperature)` (Jang et al., 2017; Maddison
      et al., 2017); with `hard=True` its argmax as a one-hot vector in the
      forward pass and the relaxation's gradient in the backward pass. The
      temperature is a non-trainable variable `temperature_variable`, which
      `TemperatureAnnealing` lowers during training.
    - `unimix`: the class probabilities are mixed with the uniform,
      `(1 - unimix) * softmax(logits) + unimix / num_classes` (DreamerV3
      uses 0.01), so that no class's probability, and no KL, collapses.

    In training the layer returns the sample. Outside training it returns
    what `inference` says: the most probable class of each variable as a
    one-hot vector (`"mode"`, the default), the class probabilities
    (`"probs"`) or a sample (`"sample"`). The KL is added in each case.

    Args:
        num_variables: the number of categorical variables, a positive integer.
        num_classes: the classes of each, an integer >= 2.
        estimator: `"straight_through"` or `"gumbel_softmax"`. Defaults to
            `"straight_through"`.
        temperature: the Gumbel-softmax temperature at the start, positive.
            Defaults to `1.0` (read by `"gumbel_softmax"` only).
        hard: whether the Gumbel-softmax sample is made one-hot in the
            forward pass. Defaults to `False` (read by `"gumbel_softmax"` only).
        unimix: the weight of the uniform mixed into q, in [0, 1). Defaults
            to `0.0`.
        flatten: whether the output is `(batch, num_variables * num_classes)`
            rather than `(batch, num_variables, num_classes)`. Defaults to
            `False`.
        kl_regularizer: a `KLRegularizer` (its prior a `CategoricalPrior`,
            uniform by default when `prior=None`), or `None` for no KL term.
        inference: `"mode"`, `"probs"` or `"sample"`. Defaults to `"mode"`.
        seed: seed of the layer's samples. Defaults to `None`.
        kernel_initializer: initializer of the projection's kernel.
            Defaults to `"glorot_uniform"`.

    Call arguments:
        inputs: features of shape `(batch, features)`.
        training: whether the call is in training mode.

    Returns:
        A tensor of shape `(batch, num_variables, num_classes)` (or
        flattened): one-hot samples in training.

    Example:

    >>> import numpy as np
    >>> x = keras.Input((8,))
    >>> posterior = CategoricalPosterior(4, 3, kl_regularizer=KLRegularizer(), seed=0)
    >>> encoder = keras.Model(x, posterior(x))
    >>> codes = encoder(np.ones((2, 8), "float32"))
    >>> tuple(codes.shape), float(keras.ops.sum(codes))  # one-hot modes: 2 * 4 ones
    ((2, 4, 3), 8.0)

    Reference: Jang, Gu & Poole, 2017, "Categorical reparameterization with
    Gumbel-softmax"; Hafner et al., 2023, "Mastering diverse domains
    through world models" (DreamerV3).
    """

    def __init__(
        self,
        num_variables: int,
        num_classes: int,
        estimator: str = "straight_through",
        temperature: float = 1.0,
        hard: bool = False,
        unimix: float = 0.0,
        flatten: bool = False,
        kl_regularizer: KLRegularizer | None = None,
        inference: str = "mode",
        seed: int | None = None,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        num_variables = _math.integer("num_variables", num_variables)
        num_classes = _math.integer("num_classes", num_classes, minimum=2)
        super().__init__(
            num_variables * num_classes,
            estimator,
            temperature,
            hard,
            unimix,
            kl_regularizer,
            inference,
            seed,
            kernel_initializer,
            **kwargs,
        )
        self.num_variables = num_variables
        self.num_classes = num_classes
        self.flatten = _math.boolean("flatten", flatten)

    def _class_logits(self, inputs):
        logits = self._logits(inputs)
        if len(logits.shape) != 2:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' takes inputs of shape (batch, "
                f"features); received a tensor of shape {tuple(inputs.shape)}."
            )
        logits = ops.reshape(logits, (-1, self.num_variables, self.num_classes))
        return _mixed_with_uniform(logits, self.unimix)

    def distribution(self, inputs):
        """q(z|x): an `Independent` of one-hot categoricals over the variables,
        event shape `(num_variables, num_classes)`."""
        inner = _OneHotCategoricalWithGradient(
            self._class_logits(inputs), self.estimator, self._temperature(), self.hard
        )
        return kd.Independent(inner, 1)

    def inference_output(self, q):
        logits = q.distribution.logits
        if self.inference == "probs":
            return ops.softmax(logits, axis=-1)
        return ops.one_hot(ops.argmax(logits, axis=-1), self.num_classes, dtype=q.dtype)

    def format_output(self, z):
        if not self.flatten:
            return z
        return ops.reshape(z, (-1, self.num_variables * self.num_classes))

    def get_config(self):
        config = super().get_config()
        del config["latent_dim"]  # num_variables * num_classes: the two are the arguments
        config.update(
            {
                "num_variables": self.num_variables,
                "num_classes": self.num_classes,
                "flatten": self.flatten,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_elbo")
class BernoulliPosterior(_DiscretePosterior):
    """A posterior of `latent_dim` binary latents (binary codes, sigmoid belief nets).

    The Bernoulli counterpart of `CategoricalPosterior`: the layer projects
    its input to the logits of q(z|x), independent Bernoullis, draws a
    sample whose gradient is that of the `estimator`, hands it and q to its
    `kl_regularizer` (the KL between Bernoullis, in closed form) and returns
    it, of shape `(batch, latent_dim)`.

    - `estimator="straight_through"`: the forward value is a sample in
      {0, 1}, the backward pass the gradient of `sigmoid(logits)`.
    - `estimator="gumbel_softmax"`: the binary Concrete relaxation
      `sigmoid((logits + log(u) - log(1 - u)) / temperature)` (Maddison et
      al., 2017); with `hard=True`, `y > 1/2` in the forward pass and the
      relaxation's gradient in the backward pass.
    - `unimix`: `p = (1 - unimix) * sigmoid(logits) + unimix / 2`.

    Outside training: the most probable value of each bit (`"mode"`, the
    default), the probabilities (`"probs"`) or a sample (`"sample"`).

    Args:
        latent_dim: the number of bits, a positive integer.
        estimator: `"straight_through"` or `"gumbel_softmax"`. Defaults to
            `"straight_through"`.
        temperature: the relaxation's temperature at the start, positive.
            Defaults to `1.0` (read by `"gumbel_softmax"` only).
        hard: whether the relaxed sample is rounded in the forward pass.
            Defaults to `False`.
        unimix: the weight of the uniform mixed into q, in [0, 1). Defaults
            to `0.0`.
        kl_regularizer: a `KLRegularizer` (its prior a `BernoulliPrior`, or
            `Bernoulli(1/2)` bits when `prior=None`), or `None`.
        inference: `"mode"`, `"probs"` or `"sample"`. Defaults to `"mode"`.
        seed: seed of the layer's samples. Defaults to `None`.
        kernel_initializer: initializer of the projection's kernel.
            Defaults to `"glorot_uniform"`.

    Example:

    >>> import numpy as np
    >>> x = keras.Input((8,))
    >>> bits = BernoulliPosterior(6, kl_regularizer=KLRegularizer(), seed=0)(x)
    >>> tuple(keras.Model(x, bits)(np.ones((2, 8), "float32")).shape)
    (2, 6)

    Reference: Maddison, Mnih & Teh, 2017, "The Concrete distribution".
    """

    def __init__(
        self,
        latent_dim: int,
        estimator: str = "straight_through",
        temperature: float = 1.0,
        hard: bool = False,
        unimix: float = 0.0,
        kl_regularizer: KLRegularizer | None = None,
        inference: str = "mode",
        seed: int | None = None,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        latent_dim = _math.integer("latent_dim", latent_dim)
        super().__init__(
            latent_dim,
            estimator,
            temperature,
            hard,
            unimix,
            kl_regularizer,
            inference,
            seed,
            kernel_initializer,
            **kwargs,
        )

    def _bit_logits(self, inputs):
        logits = self._logits(inputs)
        if self.unimix:
            probs = (1.0 - self.unimix) * ops.sigmoid(logits) + 0.5 * self.unimix
            logits = ops.log(probs) - ops.log1p(-probs)
        return logits

    def distribution(self, inputs):
        """q(z|x): an `Independent` of Bernoullis, event shape `(latent_dim,)`."""
        inner = _BernoulliWithGradient(
            self._bit_logits(inputs), self.estimator, self._temperature(), self.hard
        )
        return kd.Independent(inner, 1)

    def inference_output(self, q):
        logits = q.distribution.logits
        if self.inference == "probs":
            return ops.sigmoid(logits)
        return ops.cast(logits > 0.0, q.dtype)


def _learned_logits(layer, shape, learned):
    """Zero logits (the uniform distribution): a trainable weight if `learned`,
    else a NumPy constant."""
    if not learned:
        return np.zeros(shape, _math.density_dtype())
    return layer.add_weight(shape=shape, initializer="zeros", name="logits")


@keras.saving.register_keras_serializable(package="keras_elbo")
class CategoricalPrior(Prior):
    """The prior of `CategoricalPosterior`: independent categoricals, uniform or learned.

    `learned=False` is the uniform prior of a categorical VAE (Jang et al.,
    2017), against which the KL of each variable is `log(num_classes) -
    H[q]`. `learned=True` gives each variable free logits, trained with the
    model (initialised uniform). For a prior computed from other tensors of
    the model, as in world models, see the conditional priors.

    Args:
        num_variables: the number of categorical variables, a positive integer.
        num_classes: the classes of each, an integer >= 2.
        learned: whether the logits are trainable weights. Defaults to `False`.

    Example:

    >>> p = CategoricalPrior(4, 3).distribution()
    >>> p.event_shape, round(float(p.log_prob(np.eye(3)[[0, 1, 2, 0]])), 4)  # 4 * log(1/3)
    ((4, 3), -4.3944)
    """

    def __init__(self, num_variables: int, num_classes: int, learned: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.num_variables = _math.integer("num_variables", num_variables)
        self.num_classes = _math.integer("num_classes", num_classes, minimum=2)
        self.learned = _math.boolean("learned", learned)
        self.build()

    def build(self, input_shape=None):
        if self.built:
            return
        self.logits = _learned_logits(self, (self.num_variables, self.num_classes), self.learned)
        self.built = True

    def distribution(self, posterior_layer=None):
        logits = ops.cast(self.logits, _math.density_dtype())
        return kd.Independent(kd.OneHotCategorical(logits), 1)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_variables": self.num_variables,
                "num_classes": self.num_classes,
                "learned": self.learned,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_elbo")
class BernoulliPrior(Prior):
    """The prior of `BernoulliPosterior`: independent bits, `Bernoulli(1/2)` or learned.

    Args:
        latent_dim: the number of bits, a positive integer.
        learned: whether the logits are trainable weights (initialised at
            0, probability 1/2). Defaults to `False`.

    Example:

    >>> p = BernoulliPrior(3).distribution()
    >>> round(float(p.log_prob([0.0, 1.0, 1.0])), 4)  # 3 * log(1/2)
    -2.0794
    """

    def __init__(self, latent_dim: int, learned: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.latent_dim = _math.integer("latent_dim", latent_dim)
        self.learned = _math.boolean("learned", learned)
        self.build()

    def build(self, input_shape=None):
        if self.built:
            return
        self.logits = _learned_logits(self, (self.latent_dim,), self.learned)
        self.built = True

    def distribution(self, posterior_layer=None):
        logits = ops.cast(self.logits, _math.density_dtype())
        return kd.Independent(kd.Bernoulli(logits), 1)

    def get_config(self):
        config = super().get_config()
        config.update({"latent_dim": self.latent_dim, "learned": self.learned})
        return config


@keras.saving.register_keras_serializable(package="keras_elbo")
class ConditionalCategoricalPrior(_ProjectedPrior):
    """Categorical priors p(z | c) whose logits are a dense projection of `c`.

    The prior of the stochastic state of a DreamerV2/V3 world model, computed
    from the recurrent state (`p(z_t | h_t)`, Hafner et al., 2021, 2023), or
    of a conditional categorical VAE. Use it as the `prior` of the
    `KLRegularizer` of a `CategoricalPosterior` called with `prior_inputs=c`:
    the KL is the closed form between categoricals, with gradients into both
    networks (and `KLRegularizer(balance=0.8, free_nats=1.0)` gives
    DreamerV3's balancing and free nats).

    Formula:

    ```python
    logits = reshape(Dense(num_variables * num_classes)(c), (..., num_variables, num_classes))
    p = (1 - unimix) * softmax(logits) + unimix / num_classes
    ```

    Args:
        num_variables: the number of categorical variables, a positive integer.
        num_classes: the classes of each, an integer >= 2.
        unimix: the weight of the uniform mixed into p, in [0, 1). Defaults
            to `0.0`.
        kernel_initializer: initializer of the projection's kernel.
            Defaults to `"glorot_uniform"`.

    Example:

    >>> import numpy as np
    >>> prior = ConditionalCategoricalPrior(4, 3)
    >>> p = prior.distribution(np.zeros((2, 5), "float32"))
    >>> p.batch_shape, p.event_shape
    ((2,), (4, 3))
    """

    def __init__(
        self,
        num_variables: int,
        num_classes: int,
        unimix: float = 0.0,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(kernel_initializer, **kwargs)
        self.num_variables = _math.integer("num_variables", num_variables)
        self.num_classes = _math.integer("num_classes", num_classes, minimum=2)
        self.unimix = _unimix(unimix)
        self._make_projection(self.num_variables * self.num_classes)

    @property
    def event_shape(self) -> tuple:
        return (self.num_variables, self.num_classes)

    def distribution(self, prior_inputs, posterior_layer=None):
        logits = self._params(prior_inputs)
        shape = tuple(ops.shape(logits))[:-1] + (self.num_variables, self.num_classes)
        logits = _mixed_with_uniform(ops.reshape(logits, shape), self.unimix)
        return kd.Independent(kd.OneHotCategorical(logits), 1)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_variables": self.num_variables,
                "num_classes": self.num_classes,
                "unimix": self.unimix,
            }
        )
        return config
