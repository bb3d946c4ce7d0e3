"""Bayesian layers: a mean-field Gaussian posterior over a layer's weights.

Bayes by Backprop (Blundell et al., 2015) as drop-in Keras layers. Each layer
holds q(w), a diagonal Gaussian over all its P weights and biases (flattened
into one vector), draws weights from it, and hands q and the sample to its own
`KLRegularizer`, which adds `kl_weight * KL[q(w) || p(w)]` to the model's loss.
Written in `keras.ops` and `keras.random`: the layers run on the TensorFlow,
JAX and PyTorch backends; the same seed gives the same draws within a backend
(not across backends).
"""

import math

import keras
from keras import ops

from keras_elbo import _math
from keras_elbo._base import deserialize_nested
from keras_elbo.distributions import MultivariateNormalDiag
from keras_elbo.divergence import KLRegularizer
from keras_elbo.priors import Prior

ESTIMATORS = ("reparameterization", "flipout")
INFERENCE_OUTPUTS = ("mean", "sample")
# Floor of the posterior's scales: keeps log q(w) finite if a scale collapses.
MIN_SCALE = 1e-6


class BayesianLayer(keras.layers.Layer):
    """Base class of the Bayesian layers: the posterior q(w), its KL, sampling.

    A subclass gives the shapes of its kernel and bias in `build` (through
    `build_posterior`) and the linear map of its kernel in `linear`; this
    class owns the loc and raw-scale variables, the `KLRegularizer` (whose
    KL `ELBOModel` logs as `f"{name}_kl"`), and the choice of output: mean weights,
    one shared weight sample (`"reparameterization"`), or Flipout.

    Args:
        activation: activation of the output. Defaults to `None`.
        use_bias: whether the layer has a bias. Defaults to `True`.
        prior: p(w): `None` (standard normal), or a prior layer with
            `latent_dim=None` or the layer's number of parameters.
        kl_weight: multiplier of the KL, normally `1 / N` for N training
            examples.
        estimator: `"reparameterization"` or `"flipout"`.
        inference: `"mean"` or `"sample"`: the weights used outside training.
        posterior_scale_init: initial standard deviation of every weight.
        seed: seed of the weight samples and Flipout signs.
        kernel_initializer: initializer of the kernel's posterior mean.
    """

    def __init__(
        self,
        activation=None,
        use_bias: bool = True,
        prior: Prior | None = None,
        kl_weight: float = 1.0,
        estimator: str = "reparameterization",
        inference: str = "mean",
        posterior_scale_init: float = 1e-2,
        seed: int | None = None,
        kernel_initializer="glorot_uniform",
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
        kl_weight = _math.real("kl_weight", kl_weight, non_negative=True)
        estimator = _math.choice("estimator", estimator, ESTIMATORS)
        inference = _math.choice("inference", inference, INFERENCE_OUTPUTS)
        posterior_scale_init = _math.real("posterior_scale_init", posterior_scale_init)
        if not posterior_scale_init > MIN_SCALE:
            raise _math.invalid_argument(
                "posterior_scale_init", f"a number greater than {MIN_SCALE}", posterior_scale_init
            )
        seed = _math.seed("seed", seed)
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias
        self.prior = prior
        self.kl_weight = kl_weight
        self.estimator = estimator
        self.inference = inference
        self.posterior_scale_init = posterior_scale_init
        self.seed = seed
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.seed_generator = _math.seed_generator(seed, type(self).__name__)
        # The KL goes through the library's regularizer (closed form for a
        # normal prior, Monte Carlo on the layer's own sample otherwise). It
        # is rebuilt from these arguments on loading, not serialized itself.
        self.kl_regularizer = KLRegularizer(
            prior=prior,
            weight=kl_weight,
            seed=seed,
            metric_name=f"{self.name}_kl",
            name="kl_regularizer",
        )

    def build_posterior(self, kernel_shape, bias_shape):
        """Creates q(w)'s variables and checks the prior against q."""
        raw_init = keras.initializers.Constant(
            _math.inverse_positive_scale(self.posterior_scale_init, MIN_SCALE)
        )
        # autocast=False: under mixed precision q(w) and its KL stay float32;
        # only the sampled weights are cast to the compute dtype.
        self.kernel_loc = self.add_weight(
            shape=kernel_shape,
            initializer=self.kernel_initializer,
            name="kernel_loc",
            autocast=False,
        )
        self.kernel_raw_scale = self.add_weight(
            shape=kernel_shape, initializer=raw_init, name="kernel_raw_scale", autocast=False
        )
        self.bias_loc = self.bias_raw_scale = None
        if self.use_bias:
            self.bias_loc = self.add_weight(
                shape=bias_shape, initializer="zeros", name="bias_loc", autocast=False
            )
            self.bias_raw_scale = self.add_weight(
                shape=bias_shape, initializer=raw_init, name="bias_raw_scale", autocast=False
            )
        self._kernel_shape = tuple(kernel_shape)
        self.kl_regularizer.build()
        # Fails now, at model construction, for a prior of another size or a
        # mode without an estimator; fills a prior's latent_dim=None with P.
        self.kl_regularizer.check_posterior(self.posterior())

    @property
    def num_parameters(self) -> int:
        """P, the number of weights and biases q(w) is a distribution over."""
        count = math.prod(self.kernel_loc.shape)
        return count + (math.prod(self.bias_loc.shape) if self.use_bias else 0)

    def posterior(self) -> MultivariateNormalDiag:
        """q(w): a `keras_elbo.distributions.MultivariateNormalDiag` over the
        P flattened parameters (the kernel, row-major, then the bias), in
        float32; batch shape `()`, event shape `(P,)`."""
        locs, raws = [self.kernel_loc], [self.kernel_raw_scale]
        if self.use_bias:
            locs.append(self.bias_loc)
            raws.append(self.bias_raw_scale)
        loc = ops.concatenate([ops.reshape(v, (-1,)) for v in locs], axis=0)
        raw = ops.concatenate([ops.reshape(v, (-1,)) for v in raws], axis=0)
        return MultivariateNormalDiag(loc, _math.positive_scale(raw, MIN_SCALE))

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
        else:
            outputs = self._flipout(inputs, q.mean(), w - q.mean())
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

        def signs(size):
            bits = keras.random.randint((*leading, size), 0, 2, seed=self.seed_generator)
            return ops.cast(2 * bits - 1, dtype)

        sign_in = signs(self._kernel_shape[-2])
        sign_out = signs(self._kernel_shape[-1])
        perturbation = self._affine(inputs * sign_in, kernel_delta, bias_delta) * sign_out
        return self._affine(inputs, *self._split(mean)) + perturbation

    def get_config(self):
        config = super().get_config()
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
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**deserialize_nested(config, "prior"))


@keras.saving.register_keras_serializable(package="keras_elbo")
class BayesianDense(BayesianLayer):
    """A densely connected layer with a Gaussian posterior over its weights.

    `Dense` for Bayes by Backprop (Blundell et al., 2015). The kernel and the
    bias have a mean-field Gaussian posterior q(w) = N(loc, diag(scale**2))
    over all P = input_dim * units (+ units) parameters, flattened into one
    vector. At each call the layer draws weights from q, adds
    `kl_weight * KL[q(w) || p(w)]` to the model's loss through its own
    `KLRegularizer` (whose unweighted KL `keras_elbo.ELBOModel` logs as
    `f"{name}_kl"`), and returns `activation(x @ kernel + bias)`. In training
    the weights are sampled by `estimator`; outside training `inference`
    decides. `keras_elbo.predictive.predictive_moments` gives the predictive
    mean and uncertainty of a model made of such layers.

    Formula:

    ```python
    # w: the P weights and biases; s_in, s_out: random signs per example
    scale = softplus(raw_scale) + 1e-6
    q(w) = N(loc, diag(scale**2))
    # training, "reparameterization": one sample shared by the batch
    w = loc + scale * eps;  y = activation(x @ kernel(w) + bias(w))
    # training, "flipout": dw = w - loc, decorrelated per example
    y = activation(x @ kernel(loc) + bias(loc)
                   + ((x * s_in) @ kernel(dw) + bias(dw)) * s_out)
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
            sample). Leave their `latent_dim=None`: the layer sets it to P
            when built. Give each layer its own prior layer.
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
            shared by the batch) or `"flipout"` (a pseudo-independent
            perturbation per example, Wen et al., 2018: lower-variance
            gradients for about twice the compute). Defaults to
            `"reparameterization"`.
        inference: the weights used outside training: `"mean"` (the
            posterior mean: deterministic predictions) or `"sample"` (a fresh
            sample at each call, drawn by `estimator`). The KL is added in
            both cases, so that `evaluate` reports the training objective.
            Defaults to `"mean"`.
        posterior_scale_init: initial posterior standard deviation of every
            parameter, greater than 1e-6. Small, so that the layer starts as
            an ordinary layer of the same initialisation and learns how
            uncertain each weight may be. Defaults to `1e-2`.
        seed: seed of the weight samples and Flipout signs. Defaults to
            `None`.
        kernel_initializer: initializer of the kernel's posterior mean (the
            bias's starts at zero). Defaults to `"glorot_uniform"`.

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
    weight perturbations on mini-batches".
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
        posterior_scale_init: float = 1e-2,
        seed: int | None = None,
        kernel_initializer="glorot_uniform",
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
            **kwargs,
        )
        self.units = units

    def build(self, input_shape):
        if len(input_shape) < 2 or input_shape[-1] is None:
            raise ValueError(
                f"BayesianDense '{self.name}' needs inputs of rank 2 or more with a "
                f"known last dimension; received input_shape={input_shape}."
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


def _pair(value, name):
    """A positive int `n` as `(n, n)`, or a pair of positive ints, as a tuple."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    return _math.positive_integers(name, value, length=2)


@keras.saving.register_keras_serializable(package="keras_elbo")
class BayesianConv2D(BayesianLayer):
    """A 2-D convolution with a Gaussian posterior over its kernel and bias.

    `Conv2D` for Bayes by Backprop, as `BayesianDense` is `Dense`: a
    mean-field Gaussian q(w) over the P = kh * kw * in_channels * filters
    (+ filters) parameters, `kl_weight * KL[q(w) || p(w)]` added through the
    layer's own `KLRegularizer` (logged as `f"{name}_kl"`), weights sampled by
    `estimator` in training and chosen by `inference` outside it.
    Channels-last inputs only. With `"flipout"` the random signs are drawn
    per example and channel (`s_in` over input channels, `s_out` over
    filters) and shared by the spatial positions, as in Wen et al., 2018.

    Formula:

    ```python
    q(w) = N(loc, diag((softplus(raw_scale) + 1e-6)**2))
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
        kernel_size: height and width of the kernel, an integer or a pair.
        strides: strides of the convolution, an integer or a pair.
            Defaults to `1`.
        padding: `"valid"` or `"same"`. Defaults to `"valid"`.
        dilation_rate: dilation of the kernel, an integer or a pair.
            Defaults to `1`.
        activation: activation of the output. Defaults to `None`.
        use_bias: whether the layer has a bias. Defaults to `True`.
        prior: p(w), as in `BayesianDense`. Defaults to `None` (N(0, I)).
        kl_weight: multiplier of the KL, `1 / N` for N training examples,
            as in `BayesianDense`. Defaults to `1.0`.
        estimator: `"reparameterization"` or `"flipout"`. Defaults to
            `"reparameterization"`.
        inference: `"mean"` or `"sample"`, the weights used outside
            training. Defaults to `"mean"`.
        posterior_scale_init: initial posterior standard deviation of every
            parameter. Defaults to `1e-2`.
        seed: seed of the weight samples and Flipout signs. Defaults to
            `None`.
        kernel_initializer: initializer of the kernel's posterior mean.
            Defaults to `"glorot_uniform"`.

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

    References: Blundell et al., 2015, "Weight uncertainty in neural
    networks"; Wen et al., 2018, "Flipout: efficient pseudo-independent
    weight perturbations on mini-batches".
    """

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
        posterior_scale_init: float = 1e-2,
        seed: int | None = None,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        filters = _math.integer("filters", filters)
        kernel_size = _pair(kernel_size, "kernel_size")
        strides = _pair(strides, "strides")
        dilation_rate = _pair(dilation_rate, "dilation_rate")
        padding = _math.choice("padding", padding, ("valid", "same"))
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
            **kwargs,
        )
        self.filters = filters
        self.kernel_size = kernel_size
        self.strides = strides
        self.padding = padding
        self.dilation_rate = dilation_rate

    def build(self, input_shape):
        if len(input_shape) != 4 or input_shape[-1] is None:
            raise ValueError(
                f"BayesianConv2D '{self.name}' needs inputs of shape (batch, height, "
                f"width, channels) with known channels; received input_shape={input_shape}."
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
            input_shape[1:3], self.kernel_size, self.strides, self.dilation_rate, strict=True
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
