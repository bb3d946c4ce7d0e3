"""Bayesian layers: a posterior over a layer's weights, sampled at each call.

Bayes by Backprop (Blundell et al., 2015) as drop-in Keras layers. Each layer
holds q(w), a Gaussian over all its P weights and biases (flattened into one
vector, the kernel row-major then the bias), draws weights from it, and hands
q and the sample to its own `KLRegularizer`, which adds
`kl_weight * KL[q(w) || p(w)]` to the model's loss. q(w) is an object of its
own (`MeanFieldWeights`, the default, or `FullCovarianceWeights`, in
`keras_elbo.weight_posteriors`), as the prior is (`keras_elbo.priors`).
Written in `keras.ops` and `keras.random`: the layers run on the TensorFlow,
JAX and PyTorch backends; the same seed gives the same draws within a
backend (not across backends).
"""

import math

import keras
import numpy as np
from keras import ops

from keras_elbo import _backend, _math
from keras_elbo._base import deserialize_nested
from keras_elbo.divergence import MODES, KLRegularizer
from keras_elbo.priors import Prior
from keras_elbo.weight_posteriors import (
    DEFAULT_SCALE_INIT,
    MeanFieldWeights,
    WeightPosterior,
    _scale_init,
)

ESTIMATORS = ("reparameterization", "flipout", "local_reparameterization")
# Estimators that perturb each weight independently: valid for a factorised q(w) only.
FACTORISED_ESTIMATORS = ("flipout", "local_reparameterization")
INFERENCE_OUTPUTS = ("mean", "sample")


class BayesianLayer(keras.layers.Layer):
    """Base class of the Bayesian layers: the posterior q(w), its KL, sampling.

    A subclass gives the shapes of its kernel and bias in `build` (through
    `build_posterior`) and the linear map of its kernel in `linear`; this
    class owns q(w) (`weight_posterior`, a `WeightPosterior`), the
    `KLRegularizer` (whose KL `ELBOModel` logs as `f"{name}_kl"`), and the
    choice of output: mean weights, one shared weight sample
    (`"reparameterization"`), Flipout, or local reparameterisation.

    Args:
        activation: activation of the output. Defaults to `None`.
        use_bias: whether the layer has a bias. Defaults to `True`.
        prior: p(w): `None` (standard normal), or a prior layer with
            `latent_dim=None` or the layer's number of parameters.
        kl_weight: multiplier of the KL, normally `1 / N` for N training
            examples.
        estimator: `"reparameterization"`, `"flipout"` or
            `"local_reparameterization"`.
        inference: `"mean"` or `"sample"`: the weights used outside training.
        posterior_scale_init: initial standard deviation of every weight of
            the default posterior.
        seed: seed of the weight samples and of the estimators' noise.
        kernel_initializer: initializer of the kernel's posterior mean.
        posterior: q(w): `None` (`MeanFieldWeights(posterior_scale_init)`)
            or a `WeightPosterior`.
        kl_mode: the `mode` of the layer's `KLRegularizer`: `"auto"`,
            `"analytic"`, `"mc"` or `"mc_entropy"`.
    """

    def __init__(
        self,
        activation=None,
        use_bias: bool = True,
        prior: Prior | None = None,
        kl_weight: float = 1.0,
        estimator: str = "reparameterization",
        inference: str = "mean",
        posterior_scale_init: float = DEFAULT_SCALE_INIT,
        seed: int | None = None,
        kernel_initializer="glorot_uniform",
        posterior: WeightPosterior | None = None,
        kl_mode: str = "auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        use_bias = _math.boolean("use_bias", use_bias)
        if prior is not None and not isinstance(prior, Prior):
            raise _math.invalid_argument(
                "prior",
                "None or a prior layer (e.g. keras_elbo.NormalPrior(scale=0.5) or "
                "keras_elbo.ScaleMixturePrior())",
                prior,
            )
        if posterior is not None and not isinstance(posterior, WeightPosterior):
            raise _math.invalid_argument(
                "posterior",
                "None or a weight posterior (keras_elbo.MeanFieldWeights() or "
                "keras_elbo.FullCovarianceWeights())",
                posterior,
            )
        kl_weight = _math.real("kl_weight", kl_weight, non_negative=True)
        estimator = _math.choice("estimator", estimator, ESTIMATORS)
        inference = _math.choice("inference", inference, INFERENCE_OUTPUTS)
        posterior_scale_init = _scale_init("posterior_scale_init", posterior_scale_init)
        if posterior is not None and posterior_scale_init != DEFAULT_SCALE_INIT:
            raise _math.invalid_argument(
                "posterior_scale_init",
                f"its default {DEFAULT_SCALE_INIT} when `posterior` is given (set the "
                "posterior's own scale_init)",
                posterior_scale_init,
            )
        if estimator in FACTORISED_ESTIMATORS and posterior is not None:
            if not posterior.factorized:
                raise _math.invalid_argument(
                    "estimator",
                    f"'reparameterization' with a {type(posterior).__name__} posterior: "
                    f"{estimator!r} perturbs each weight independently, which is valid "
                    "only for a factorised (mean-field) posterior such as "
                    "keras_elbo.MeanFieldWeights",
                    estimator,
                )
        kl_mode = _math.choice("kl_mode", kl_mode, MODES)
        seed = _math.seed("seed", seed)
        self.activation = _math.activation("activation", activation)
        self.use_bias = use_bias
        self.prior = prior
        self.kl_weight = kl_weight
        self.estimator = estimator
        self.inference = inference
        self.posterior_scale_init = posterior_scale_init
        self.seed = seed
        self.kernel_initializer = _math.initializer("kernel_initializer", kernel_initializer)
        self.kl_mode = kl_mode
        # None in the config when the default: the posterior is then rebuilt
        # from `posterior_scale_init` on loading, as files written before
        # `posterior` existed expect.
        self._default_posterior = posterior is None
        if posterior is None:
            posterior = MeanFieldWeights(scale_init=posterior_scale_init, name="posterior")
        self.weight_posterior = posterior
        self.seed_generator = _math.seed_generator(seed, type(self).__name__)
        # The KL goes through the library's regularizer (closed form for a
        # normal prior, Monte Carlo on the layer's own sample otherwise). It
        # is rebuilt from these arguments on loading, not serialized itself.
        self.kl_regularizer = KLRegularizer(
            prior=prior,
            mode=kl_mode,
            weight=kl_weight,
            seed=seed,
            metric_name=f"{self.name}_kl",
            name="kl_regularizer",
        )

    def build_posterior(self, kernel_shape, bias_shape):
        """Builds q(w) over the kernel and bias and checks the prior against q."""
        self._kernel_shape = tuple(kernel_shape)
        size = math.prod(kernel_shape) + (math.prod(bias_shape) if self.use_bias else 0)
        posterior = self.weight_posterior
        if not posterior.built:

            def initial_loc(shape, dtype=None):
                kernel = self.kernel_initializer(self._kernel_shape, dtype=dtype)
                parts = [ops.reshape(kernel, (-1,))]
                if self.use_bias:
                    parts.append(ops.zeros((math.prod(bias_shape),), dtype=dtype))
                return ops.concatenate(parts, axis=0)

            posterior.build_parameters(size, initial_loc)
        elif posterior.num_parameters != size:
            raise ValueError(
                f"The posterior '{posterior.name}' of '{self.name}' is built for "
                f"{posterior.num_parameters} parameters, but this layer has {size}: "
                "give each Bayesian layer its own posterior object."
            )
        self.kl_regularizer.build()
        # Fails now, at model construction, for a prior of another size or a
        # mode without an estimator; fills a prior's latent_dim=None with P.
        self.kl_regularizer.check_posterior(self.posterior())

    @property
    def num_parameters(self) -> int:
        """P, the number of weights and biases q(w) is a distribution over."""
        return self.weight_posterior.num_parameters

    @property
    def kernel_shape(self) -> tuple:
        """The shape of the kernel (known once the layer is built)."""
        return self._kernel_shape

    def posterior(self):
        """q(w): a `keras_elbo.distributions` object over the P flattened
        parameters (the kernel, row-major, then the bias), in float32; batch
        shape `()`, event shape `(P,)`."""
        return self.weight_posterior.distribution()

    def _split(self, flat):
        """The kernel and bias (or None) held in a flat parameter vector."""
        size = math.prod(self._kernel_shape)
        kernel = ops.reshape(flat[:size], self._kernel_shape)
        bias = flat[size:] if self.use_bias else None
        return kernel, bias

    def linear(self, inputs, kernel):
        """The layer's linear map of `inputs` by `kernel` (no bias)."""
        raise NotImplementedError

    def _affine(self, inputs, kernel, bias):
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        outputs = self.linear(inputs, ops.cast(kernel, dtype))
        if bias is not None:
            outputs = outputs + ops.cast(bias, dtype)
        return outputs

    def call(self, inputs, training=None):
        inputs = ops.convert_to_tensor(inputs)
        q = self.posterior()
        w = q.sample(seed=self.seed_generator)
        # One KL per call, on the call's weight sample (used by Monte Carlo
        # modes; the closed form ignores it). Added outside training too, so
        # that `evaluate` reports the training objective.
        w = self.kl_regularizer(w, posterior=q)
        if not training and self.inference == "mean":
            outputs = self._affine(inputs, *self._split(q.mean()))
        elif self.estimator == "reparameterization":
            outputs = self._affine(inputs, *self._split(w))
        elif self.estimator == "flipout":
            outputs = self._flipout(inputs, q.mean(), w - q.mean())
        else:
            outputs = self._local_reparameterization(inputs, q)
        return self.activation(outputs)

    def _flipout(self, inputs, mean, delta):
        # Wen et al., 2018: example n sees the perturbation delta * (s_in
        # s_out^T) with its own random signs; since delta is symmetric about
        # zero, each example's weights are still distributed as q, but the
        # examples of a batch are decorrelated (a shared sample makes them
        # all move together), which lowers the gradient's variance.
        kernel_delta, bias_delta = self._split(delta)
        # One sign per example and channel, shared by the other axes (the
        # positions of an image, the middle axes of a sequence).
        leading = (ops.shape(inputs)[0],) + (1,) * (len(inputs.shape) - 2)
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        seed = _backend.replica_seed(self.seed_generator)

        def signs(size):
            bits = keras.random.randint((*leading, size), 0, 2, seed=seed)
            return ops.cast(2 * bits - 1, dtype)

        sign_in = signs(self._kernel_shape[-2])
        sign_out = signs(self._kernel_shape[-1])
        perturbation = self._affine(inputs * sign_in, kernel_delta, bias_delta) * sign_out
        return self._affine(inputs, *self._split(mean)) + perturbation

    def _local_reparameterization(self, inputs, q):
        # Kingma et al., 2015: with independent weights, each pre-activation
        # y_j = sum_i x_i w_ij + b_j is Gaussian given x, with mean
        # x @ loc + b_loc and variance x**2 @ scale**2 + b_scale**2: sample it
        # directly, one independent draw per example and unit. The variance
        # is computed in float32 (float16 would overflow x**2).
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        mean = self._affine(inputs, *self._split(q.mean()))
        kernel_var, bias_var = self._split(ops.square(q.stddev()))
        x = ops.cast(inputs, keras.backend.standardize_dtype(kernel_var.dtype))
        var = self.linear(ops.square(x), kernel_var)
        if bias_var is not None:
            var = var + bias_var
        # sqrt's gradient is infinite at 0 (an all-zero input without a bias):
        # take 0 there, through a where on both sides.
        positive = var > 0
        stddev = ops.where(positive, ops.sqrt(ops.where(positive, var, ops.ones_like(var))), 0.0)
        seed = _backend.replica_seed(self.seed_generator)
        eps = _backend.standard_normal(ops.shape(stddev), stddev.dtype, seed)
        return mean + ops.cast(stddev * eps, dtype)

    def load_own_variables(self, store):
        # Files written before q(w) became the `weight_posterior` sublayer
        # hold its variables here: kernel loc, kernel raw scale, then the
        # bias's, each of the kernel's or bias's shape.
        count = len(list(store.keys()))
        if count == 0:
            return
        if count != (4 if self.use_bias else 2) or not isinstance(
            self.weight_posterior, MeanFieldWeights
        ):
            super().load_own_variables(store)  # raises Keras's own mismatch error
            return
        values = [np.asarray(store[str(i)]).reshape(-1) for i in range(count)]
        self.weight_posterior.loc.assign(np.concatenate(values[0::2]))
        self.weight_posterior.raw_scale.assign(np.concatenate(values[1::2]))
        self.weight_posterior._restored_by_layer = True

    def get_config(self):
        config = super().get_config()
        posterior = None if self._default_posterior else self.weight_posterior
        config.update(
            {
                "activation": keras.activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "prior": keras.saving.serialize_keras_object(self.prior),
                "kl_weight": self.kl_weight,
                "estimator": self.estimator,
                "inference": self.inference,
                "posterior_scale_init": self.posterior_scale_init,
                "seed": self.seed,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "posterior": keras.saving.serialize_keras_object(posterior),
                "kl_mode": self.kl_mode,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        # "posterior" is absent from configs written before it existed.
        return cls(
            **deserialize_nested(config, *(k for k in ("prior", "posterior") if k in config))
        )


@keras.saving.register_keras_serializable(package="keras_elbo")
class BayesianDense(BayesianLayer):
    """A densely connected layer with a Gaussian posterior over its weights.

    `Dense` for Bayes by Backprop (Blundell et al., 2015). The kernel and the
    bias have a Gaussian posterior q(w) over all P = input_dim * units
    (+ units) parameters, flattened into one vector: mean-field,
    N(loc, diag(scale**2)), by default, or any `posterior` object
    (`FullCovarianceWeights` for a full covariance). At each call the layer
    draws weights from q, adds `kl_weight * KL[q(w) || p(w)]` to the model's
    loss through its own `KLRegularizer` (whose unweighted KL
    `keras_elbo.ELBOModel` logs as `f"{name}_kl"`), and returns
    `activation(x @ kernel + bias)`. In training the weights are sampled by
    `estimator`; outside training `inference` decides.
    `keras_elbo.predictive.predictive_moments` gives the predictive mean and
    uncertainty of a model made of such layers. `DenseVariational` is this
    layer under `tfp.layers.DenseVariational`'s argument names.

    Formula:

    ```python
    # w: the P weights and biases; s_in, s_out: random signs per example
    scale = softplus(raw_scale) + 1e-6
    q(w) = N(loc, diag(scale**2))                 # the default posterior
    # training, "reparameterization": one sample shared by the batch
    w = loc + scale * eps;  y = activation(x @ kernel(w) + bias(w))
    # training, "flipout": dw = w - loc, decorrelated per example
    y = activation(x @ kernel(loc) + bias(loc)
                   + ((x * s_in) @ kernel(dw) + bias(dw)) * s_out)
    # training, "local_reparameterization": the pre-activations sampled
    y = activation(x @ kernel(loc) + bias(loc)
                   + sqrt(x**2 @ kernel(scale)**2 + bias(scale)**2) * eps)
    # outside training, inference="mean"
    y = activation(x @ kernel(loc) + bias(loc))
    loss += kl_weight * KL[q(w) || p(w)]          # once per call
    # with kl_weight = 1 / N (N training examples), the epoch's loss is
    # mean_n(-log p(y_n | x_n, w)) + KL[q || p] / N  =  -ELBO / N
    ```

    Args:
        units: output size, a positive integer.
        activation: activation of the output. Defaults to `None`.
        use_bias: whether the layer has a bias. Defaults to `True`.
        prior: p(w), a prior layer over the P parameters. `None` (the
            default) is N(0, I), with a closed-form KL. `NormalPrior(scale=s)`
            gives N(0, s**2 I) (closed form), `ScaleMixturePrior()` the scale
            mixture of Blundell et al. (Monte Carlo KL on the call's weight
            sample), `MixturePrior(P, num_components)` a trainable mixture.
            Leave `latent_dim=None` where the prior allows it: the layer sets
            it to P when built. Give each layer its own prior layer.
        kl_weight: non-negative multiplier of the KL in the loss. Use
            `1 / N`, N the number of training examples: the KL is a term of
            the whole data set's ELBO, while Keras averages the likelihood
            loss over each batch, so the model's loss is then the negative
            ELBO of the data set divided by N (Graves, 2011; Blundell et al.,
            2015). Held in the non-trainable variable
            `kl_regularizer.kl_weight`, which a callback may anneal:
            `KLAnnealing` sets it to its schedule's value, so a schedule for
            a Bayesian network should end at `1 / N`. Defaults to `1.0`.
        estimator: `"reparameterization"` (one weight sample per call,
            shared by the batch), `"flipout"` (a pseudo-independent
            perturbation per example, Wen et al., 2018: lower-variance
            gradients for about twice the compute) or
            `"local_reparameterization"` (each example's pre-activations
            sampled from their Gaussian, Kingma et al., 2015: independent
            noise per example for the compute of two matmuls; inputs of rank
            2 only). The last two need a factorised posterior (the default
            `MeanFieldWeights`). Defaults to `"reparameterization"`.
        inference: the weights used outside training: `"mean"` (the
            posterior mean: deterministic predictions) or `"sample"` (a fresh
            sample at each call, drawn by `estimator`). The KL is added in
            both cases, so that `evaluate` reports the training objective.
            Defaults to `"mean"`.
        posterior_scale_init: initial posterior standard deviation of every
            parameter of the default posterior, greater than 1e-6. Small, so
            that the layer starts as an ordinary layer of the same
            initialisation and learns how uncertain each weight may be.
            Leave it at its default when giving `posterior` (set that
            object's `scale_init`). Defaults to `1e-2`.
        seed: seed of the weight samples and of the estimators' noise.
            Defaults to `None`.
        kernel_initializer: initializer of the kernel's posterior mean (the
            bias's starts at zero). Defaults to `"glorot_uniform"`.
        posterior: q(w), a `WeightPosterior` object: `MeanFieldWeights()`
            or `FullCovarianceWeights()`, one per layer. `None` (the default)
            is `MeanFieldWeights(scale_init=posterior_scale_init)`.
        kl_mode: how the layer's `KLRegularizer` computes the KL: `"auto"`
            (the closed form where one is registered, else Monte Carlo),
            `"analytic"`, `"mc"` (log q(w) - log p(w) on the call's weight
            sample) or `"mc_entropy"`. Defaults to `"auto"`.

    Call arguments:
        inputs: a tensor of shape `(batch, ..., input_dim)`.
        training: whether the call is in training mode.

    Returns:
        A tensor of shape `(batch, ..., units)`.

    Example:

    >>> import numpy as np
    >>> layer = BayesianDense(3, kl_weight=1 / 1000, seed=0)
    >>> tuple(layer(np.ones((2, 4), "float32")).shape)
    (2, 3)
    >>> layer.num_parameters  # 4 * 3 weights + 3 biases
    15
    >>> len(layer.losses)
    1

    References: Blundell et al., 2015, "Weight uncertainty in neural
    networks"; Wen et al., 2018, "Flipout: efficient pseudo-independent
    weight perturbations on mini-batches"; Kingma et al., 2015,
    "Variational dropout and the local reparameterization trick".
    """

    def __init__(
        self,
        units: int,
        activation=None,
        use_bias: bool = True,
        prior: Prior | None = None,
        kl_weight: float = 1.0,
        estimator: str = "reparameterization",
        inference: str = "mean",
        posterior_scale_init: float = DEFAULT_SCALE_INIT,
        seed: int | None = None,
        kernel_initializer="glorot_uniform",
        posterior: WeightPosterior | None = None,
        kl_mode: str = "auto",
        **kwargs,
    ):
        units = _math.integer("units", units)
        super().__init__(
            activation=activation,
            use_bias=use_bias,
            prior=prior,
            kl_weight=kl_weight,
            estimator=estimator,
            inference=inference,
            posterior_scale_init=posterior_scale_init,
            seed=seed,
            kernel_initializer=kernel_initializer,
            posterior=posterior,
            kl_mode=kl_mode,
            **kwargs,
        )
        self.units = units

    def build(self, input_shape):
        if len(input_shape) < 2 or input_shape[-1] is None:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' needs inputs of rank 2 or more "
                f"with a known last dimension; received input_shape={input_shape}."
            )
        if self.estimator == "local_reparameterization" and len(input_shape) != 2:
            # The positions of a sequence share the weights: independent
            # noise per position would not be a draw of the network.
            raise ValueError(
                f"{type(self).__name__} '{self.name}' with "
                "estimator='local_reparameterization' needs inputs of shape "
                "(batch, input_dim): the positions of a longer input share the "
                "weights, which independent noise per pre-activation does not "
                f"represent. Use estimator='flipout'. Received input_shape={input_shape}."
            )
        self.build_posterior((input_shape[-1], self.units), (self.units,))
        self.built = True

    def linear(self, inputs, kernel):
        return ops.matmul(inputs, kernel)  # broadcasts over leading axes

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        config = super().get_config()
        config["units"] = self.units
        return config


@keras.saving.register_keras_serializable(package="keras_elbo")
class DenseVariational(BayesianDense):
    """`BayesianDense` under the arguments of `tfp.layers.DenseVariational`.

    The migration target of `tfp.layers.DenseVariational(units,
    make_posterior_fn, make_prior_fn, kl_weight, kl_use_exact)`: the
    posterior and the prior are objects instead of functions, so the model
    saves to `.keras` with no code in its config. Like TFP's layer it draws
    one weight sample per call and, by default, also outside training
    (`inference="sample"`), so that calling a model again gives another
    prediction; the KL is `log q(w) - log p(w)` on that sample unless
    `kl_use_exact=True`.

    From TFP to this layer:

    - `make_posterior_fn=posterior_mean_field`: `posterior=MeanFieldWeights()`;
    - a `MultivariateNormalTriL` posterior: `posterior=FullCovarianceWeights()`;
    - `make_prior_fn` of a fixed N(0, 1): `prior=None` (or `NormalPrior()`);
    - a trainable prior: `prior=MixturePrior(P, num_components=1)`;
    - `kl_use_exact=True`: the closed form where one exists.

    Args:
        units: output size, a positive integer.
        posterior: q(w), `MeanFieldWeights()` or `FullCovarianceWeights()`
            (one object per layer). `None` (the default) is
            `MeanFieldWeights()`.
        prior: p(w), a prior layer, as in `BayesianDense`. `None` (the
            default) is N(0, I).
        kl_weight: multiplier of the KL, `1 / N` for N training examples;
            `None` (the default, as in TFP) is 1.
        kl_use_exact: `False` (the default, as in TFP): the KL is estimated
            by Monte Carlo on the call's weight sample (`kl_mode="mc"`).
            `True`: the closed form where one is registered (a normal
            prior), else a Monte Carlo estimate (`kl_mode="auto"`; TFP raises
            instead).
        activation: activation of the output. Defaults to `None`.
        use_bias: whether the layer has a bias. Defaults to `True`.
        estimator: `"reparameterization"` (TFP's, the default),
            `"flipout"` or `"local_reparameterization"` (these two with a
            `MeanFieldWeights` posterior only).
        inference: the weights used outside training, `"sample"` (the
            default, as in TFP) or `"mean"`.
        seed: seed of the weight samples. Defaults to `None`.
        kernel_initializer: initializer of the kernel's posterior mean.
            Defaults to `"glorot_uniform"`.

    Call arguments:
        inputs: a tensor of shape `(batch, ..., input_dim)`.
        training: whether the call is in training mode.

    Returns:
        A tensor of shape `(batch, ..., units)`.

    Example:

    >>> import numpy as np
    >>> from keras_elbo.weight_posteriors import FullCovarianceWeights
    >>> layer = DenseVariational(
    ...     2, posterior=FullCovarianceWeights(), kl_weight=1 / 100, kl_use_exact=True, seed=0
    ... )
    >>> tuple(layer(np.ones((5, 3), "float32")).shape)
    (5, 2)
    >>> layer.num_parameters  # 3 * 2 weights + 2 biases, one Gaussian over all 8
    8

    Reference: Blundell et al., 2015, "Weight uncertainty in neural networks".
    """

    def __init__(
        self,
        units: int,
        posterior: WeightPosterior | None = None,
        prior: Prior | None = None,
        kl_weight: float | None = None,
        kl_use_exact: bool = False,
        activation=None,
        use_bias: bool = True,
        estimator: str = "reparameterization",
        inference: str = "sample",
        seed: int | None = None,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        kl_use_exact = _math.boolean("kl_use_exact", kl_use_exact)
        super().__init__(
            units,
            activation=activation,
            use_bias=use_bias,
            prior=prior,
            kl_weight=1.0 if kl_weight is None else kl_weight,
            estimator=estimator,
            inference=inference,
            seed=seed,
            kernel_initializer=kernel_initializer,
            posterior=posterior,
            kl_mode="auto" if kl_use_exact else "mc",
            **kwargs,
        )
        self.kl_use_exact = kl_use_exact
        self._kl_weight_argument = kl_weight

    def get_config(self):
        config = super().get_config()
        # BayesianDense's arguments that this layer sets itself.
        del config["posterior_scale_init"], config["kl_mode"]
        config["kl_weight"] = self._kl_weight_argument
        config["kl_use_exact"] = self.kl_use_exact
        return config


def _tuple(value, name, rank):
    """A positive int `n` as `(n,) * rank`, or `rank` positive ints, as a tuple."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * rank
    return _math.positive_integers(name, value, length=rank)


class BayesianConv(BayesianLayer):
    """Base class of the Bayesian convolutions: `rank` is 1, 2 or 3.

    `Conv1D`, `Conv2D` and `Conv3D` for Bayes by Backprop, as `BayesianDense`
    is `Dense`: a Gaussian q(w) over the P = prod(kernel_size) *
    in_channels * filters (+ filters) parameters (mean-field by default),
    `kl_weight * KL[q(w) || p(w)]` added through the layer's own
    `KLRegularizer` (logged as `f"{name}_kl"`), weights sampled by
    `estimator` in training and chosen by `inference` outside it.
    Channels-last inputs only. With `"flipout"` the random signs are drawn
    per example and channel (`s_in` over input channels, `s_out` over
    filters) and shared by the spatial positions, as in Wen et al., 2018.
    Local reparameterisation is refused: the positions of an input share the
    kernel, so their pre-activations are correlated, which independent noise
    per position does not represent (TFP offers it for dense layers only).

    Formula:

    ```python
    q(w) = N(loc, diag((softplus(raw_scale) + 1e-6)**2))   # default posterior
    # training, "reparameterization": w ~ q, shared by the batch
    y = activation(conv(x, kernel(w)) + bias(w))
    # training, "flipout": dw = w - loc
    y = activation(conv(x, kernel(loc)) + bias(loc)
                   + (conv(x * s_in, kernel(dw)) + bias(dw)) * s_out)
    # outside training, inference="mean"
    y = activation(conv(x, kernel(loc)) + bias(loc))
    loss += kl_weight * KL[q(w) || p(w)]          # kl_weight = 1 / N
    ```

    Args:
        filters: number of output channels, a positive integer.
        kernel_size: size of the kernel, an integer or `rank` integers.
        strides: strides of the convolution, an integer or `rank` integers.
            Defaults to `1`.
        padding: `"valid"` or `"same"`. Defaults to `"valid"`.
        dilation_rate: dilation of the kernel, an integer or `rank`
            integers. Defaults to `1`.
        activation: activation of the output. Defaults to `None`.
        use_bias: whether the layer has a bias. Defaults to `True`.
        prior: p(w), as in `BayesianDense`. Defaults to `None` (N(0, I)).
        kl_weight: multiplier of the KL, `1 / N` for N training examples,
            as in `BayesianDense`. Defaults to `1.0`.
        estimator: `"reparameterization"` or `"flipout"` (with a factorised
            posterior). Defaults to `"reparameterization"`.
        inference: `"mean"` or `"sample"`, the weights used outside
            training. Defaults to `"mean"`.
        posterior_scale_init: initial posterior standard deviation of every
            parameter of the default posterior. Defaults to `1e-2`.
        seed: seed of the weight samples and Flipout signs. Defaults to
            `None`.
        kernel_initializer: initializer of the kernel's posterior mean.
            Defaults to `"glorot_uniform"`.
        posterior: q(w), as in `BayesianDense`. Defaults to `None`
            (`MeanFieldWeights(scale_init=posterior_scale_init)`).
        kl_mode: the KL's mode, as in `BayesianDense`. Defaults to `"auto"`.

    Call arguments:
        inputs: a tensor of shape `(batch, *spatial, channels)`, with
            `rank` spatial axes.
        training: whether the call is in training mode.

    Returns:
        A tensor of shape `(batch, *new_spatial, filters)`.

    References: Blundell et al., 2015, "Weight uncertainty in neural
    networks"; Wen et al., 2018, "Flipout: efficient pseudo-independent
    weight perturbations on mini-batches".
    """

    rank = None  # the number of spatial axes, set by each subclass
    spatial_names = ()  # their names, for error messages

    def __init__(
        self,
        filters: int,
        kernel_size,
        strides=1,
        padding: str = "valid",
        dilation_rate=1,
        activation=None,
        use_bias: bool = True,
        prior: Prior | None = None,
        kl_weight: float = 1.0,
        estimator: str = "reparameterization",
        inference: str = "mean",
        posterior_scale_init: float = DEFAULT_SCALE_INIT,
        seed: int | None = None,
        kernel_initializer="glorot_uniform",
        posterior: WeightPosterior | None = None,
        kl_mode: str = "auto",
        **kwargs,
    ):
        filters = _math.integer("filters", filters)
        kernel_size = _tuple(kernel_size, "kernel_size", self.rank)
        strides = _tuple(strides, "strides", self.rank)
        dilation_rate = _tuple(dilation_rate, "dilation_rate", self.rank)
        padding = _math.choice("padding", padding, ("valid", "same"))
        if max(strides) > 1 and max(dilation_rate) > 1:
            # As keras.layers.Conv*D: the convolution ops take one or the other.
            raise _math.invalid_argument(
                "dilation_rate",
                f"1 when strides > 1 (strides={strides}): a convolution is either "
                "strided or dilated",
                dilation_rate,
            )
        if estimator == "local_reparameterization":
            raise _math.invalid_argument(
                "estimator",
                "'reparameterization' or 'flipout': local reparameterisation is for "
                "dense layers (the positions of a convolution share the kernel, which "
                "independent noise per output does not represent)",
                estimator,
            )
        super().__init__(
            activation=activation,
            use_bias=use_bias,
            prior=prior,
            kl_weight=kl_weight,
            estimator=estimator,
            inference=inference,
            posterior_scale_init=posterior_scale_init,
            seed=seed,
            kernel_initializer=kernel_initializer,
            posterior=posterior,
            kl_mode=kl_mode,
            **kwargs,
        )
        self.filters = filters
        self.kernel_size = kernel_size
        self.strides = strides
        self.padding = padding
        self.dilation_rate = dilation_rate

    def build(self, input_shape):
        if len(input_shape) != self.rank + 2 or input_shape[-1] is None:
            axes = ", ".join(("batch", *self.spatial_names, "channels"))
            raise ValueError(
                f"{type(self).__name__} '{self.name}' needs inputs of rank "
                f"{self.rank + 2}, shape ({axes}), with known channels; received "
                f"input_shape={input_shape}."
            )
        kernel_shape = (*self.kernel_size, input_shape[-1], self.filters)
        self.build_posterior(kernel_shape, (self.filters,))
        self.built = True

    def linear(self, inputs, kernel):
        return ops.conv(
            inputs,
            kernel,
            strides=self.strides,
            padding=self.padding,
            data_format="channels_last",
            dilation_rate=self.dilation_rate,
        )

    def compute_output_shape(self, input_shape):
        spatial = []
        for n, k, s, d in zip(
            input_shape[1:-1], self.kernel_size, self.strides, self.dilation_rate, strict=True
        ):
            if n is None:
                spatial.append(None)
            elif self.padding == "same":
                spatial.append(-(-n // s))
            else:
                spatial.append((n - d * (k - 1) - 1) // s + 1)
        return (input_shape[0], *spatial, self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "padding": self.padding,
                "dilation_rate": self.dilation_rate,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_elbo")
class BayesianConv1D(BayesianConv):
    """A 1-D convolution with a Gaussian posterior over its kernel and bias.

    `Conv1D` for Bayes by Backprop: see `BayesianConv` for the formula and
    the arguments (`kernel_size`, `strides`, `dilation_rate`: an integer or
    one integer in a tuple). Replaces `tfp.layers.Convolution1DReparameterization`
    (`estimator="reparameterization"`) and `tfp.layers.Convolution1DFlipout`
    (`estimator="flipout"`).

    Call arguments:
        inputs: a tensor of shape `(batch, steps, channels)`.
        training: whether the call is in training mode.

    Returns:
        A tensor of shape `(batch, new_steps, filters)`.

    Example:

    >>> import numpy as np
    >>> layer = BayesianConv1D(4, 3, padding="same", estimator="flipout", seed=0)
    >>> tuple(layer(np.ones((2, 10, 3), "float32"), training=True).shape)
    (2, 10, 4)
    >>> layer.num_parameters  # 3 * 3 * 4 weights + 4 biases
    40
    """

    rank = 1
    spatial_names = ("steps",)


@keras.saving.register_keras_serializable(package="keras_elbo")
class BayesianConv2D(BayesianConv):
    """A 2-D convolution with a Gaussian posterior over its kernel and bias.

    `Conv2D` for Bayes by Backprop: see `BayesianConv` for the formula and
    the arguments (`kernel_size`, `strides`, `dilation_rate`: an integer or
    a pair). Replaces `tfp.layers.Convolution2DReparameterization`
    (`estimator="reparameterization"`) and `tfp.layers.Convolution2DFlipout`
    (`estimator="flipout"`).

    Call arguments:
        inputs: a tensor of shape `(batch, height, width, channels)`.
        training: whether the call is in training mode.

    Returns:
        A tensor of shape `(batch, new_height, new_width, filters)`.

    Example:

    >>> import numpy as np
    >>> layer = BayesianConv2D(4, 3, padding="same", seed=0)
    >>> tuple(layer(np.ones((2, 8, 8, 3), "float32")).shape)
    (2, 8, 8, 4)
    >>> layer.num_parameters  # 3 * 3 * 3 * 4 weights + 4 biases
    112
    """

    rank = 2
    spatial_names = ("height", "width")


@keras.saving.register_keras_serializable(package="keras_elbo")
class BayesianConv3D(BayesianConv):
    """A 3-D convolution with a Gaussian posterior over its kernel and bias.

    `Conv3D` for Bayes by Backprop: see `BayesianConv` for the formula and
    the arguments (`kernel_size`, `strides`, `dilation_rate`: an integer or
    three). Replaces `tfp.layers.Convolution3DReparameterization`
    (`estimator="reparameterization"`) and `tfp.layers.Convolution3DFlipout`
    (`estimator="flipout"`).

    Call arguments:
        inputs: a tensor of shape `(batch, depth, height, width, channels)`.
        training: whether the call is in training mode.

    Returns:
        A tensor of shape `(batch, new_depth, new_height, new_width, filters)`.

    Example:

    >>> import numpy as np
    >>> layer = BayesianConv3D(2, 2, seed=0)
    >>> tuple(layer(np.ones((1, 4, 4, 4, 3), "float32")).shape)
    (1, 3, 3, 3, 2)
    >>> layer.num_parameters  # 2 * 2 * 2 * 3 * 2 weights + 2 biases
    50
    """

    rank = 3
    spatial_names = ("depth", "height", "width")
