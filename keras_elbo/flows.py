"""Normalizing-flow posteriors: a Gaussian pushed through autoregressive flows.

`MADE` is the masked autoregressive network, `InverseAutoregressiveFlow` one
flow step built on it, `InverseAutoregressiveFlowDistribution` a base
distribution pushed through steps, and `FlowPosterior` the posterior layer
that chains them (Kingma et al., 2016, "Improved variational inference with
inverse autoregressive flow"). Written in `keras.ops`: every Keras backend.
"""

from collections.abc import Sequence
from itertools import pairwise

import keras
import numpy as np

from keras_elbo import _math, distributions
from keras_elbo.divergence import KLRegularizer
from keras_elbo.posteriors import Posterior

# Bound of the soft clamp on each step's log-scale: a step scales a dimension
# by a factor between exp(-5) and exp(5), so that one bad update cannot blow
# a sample (and the decoder's input) up to Inf.
LOG_SCALE_BOUND = 5.0


def made_degrees(event_size, hidden_units, reverse=False):
    """The degrees of MADE's inputs and hidden units (Germain et al., 2015).

    Input `j` has degree `order[j]` (1 to `event_size`, reversed when
    `reverse`); hidden units cycle through the degrees 1 to `event_size - 1`
    (0 when `event_size == 1`: they then see only the context). A unit sees
    the inputs of degree up to its own; output `i` sees the hidden units of
    degree below `order[i]`.
    """
    order = np.arange(1, event_size + 1)
    if reverse:
        order = order[::-1]
    span = max(1, event_size - 1)
    hidden = [np.arange(units) % span + min(1, event_size - 1) for units in hidden_units]
    return order, hidden


def _broadcast_shapes(a, b):
    """NumPy broadcasting of two shapes whose sizes may be `None` (unknown)."""
    rank = max(len(a), len(b))
    a, b = (1,) * (rank - len(a)) + a, (1,) * (rank - len(b)) + b
    return tuple(
        m if n == 1 else n if m == 1 or m is None else m for m, n in zip(a, b, strict=True)
    )


@keras.saving.register_keras_serializable(package="keras_elbo")
class MADE(keras.layers.Layer):
    """Masked autoregressive dense network: the shift and log-scale of a flow.

    Maps `z` of shape `(batch, d)` to `shift` and `log_scale`, each
    `(batch, d)`, such that output `i` depends only on the inputs that come
    before `i` in the ordering (left to right, or right to left with
    `reverse=True`): its Jacobian in `z` is strictly triangular. The first
    output in the ordering sees no input, so its shift and log-scale are
    learned constants. An optional `context` of shape `(batch, c)` enters the
    first hidden layer through an unmasked kernel, so every other output may
    depend on it. The output layer is
    zero-initialised: a fresh network returns zeros, and a flow step built on
    it starts as the identity. The masks are constants rebuilt in `build`
    from the shapes, not weights.

    Formula:

    ```python
    h = activation((z @ (W_0 * M_0)) + context @ C + b_0)
    h = activation(h @ (W_l * M_l) + b_l)                # l = 1, ..., L - 1
    shift, log_scale = split(h @ (W_L * M_L) + b_L)      # W_L, b_L start at 0
    ```

    Args:
        hidden_units: units of each hidden layer, a non-empty sequence of
            positive integers. Defaults to `(64,)`.
        activation: activation of the hidden layers. Defaults to `"elu"`.
        reverse: order the inputs right to left instead of left to right, so
            that consecutive flow steps alternate. Defaults to `False`.
        kernel_initializer: initializer of the hidden and context kernels.
            Defaults to `"glorot_uniform"`.

    Call arguments:
        inputs: `z`, of shape `(..., d)`.
        context: optional conditioning features of shape `(..., c)`,
            broadcastable against `inputs` but for the last axis. A network
            built with a context must be called with one.

    Returns:
        A tuple `(shift, log_scale)` of tensors shaped like `inputs`.

    Example:

    >>> import numpy as np
    >>> made = MADE(hidden_units=(16,))
    >>> shift, log_scale = made(np.ones((3, 4), "float32"))
    >>> tuple(shift.shape), float(np.abs(keras.ops.convert_to_numpy(log_scale)).max())
    ((3, 4), 0.0)

    Reference: Germain et al., 2015, "MADE: Masked autoencoder for
    distribution estimation".
    """

    def __init__(
        self,
        hidden_units: Sequence[int] = (64,),
        activation="elu",
        reverse: bool = False,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        units = _math.positive_integers("hidden_units", hidden_units)
        reverse = _math.boolean("reverse", reverse)
        self.hidden_units = units
        self.activation = _math.activation("activation", activation)
        self.reverse = reverse
        self.kernel_initializer = _math.initializer("kernel_initializer", kernel_initializer)

    def build(self, inputs_shape, context_shape=None):
        d = inputs_shape[-1]
        if d is None or (context_shape is not None and context_shape[-1] is None):
            raise ValueError(
                f"MADE '{self.name}' needs known last dimensions; received "
                f"inputs_shape={inputs_shape}, context_shape={context_shape}."
            )
        self.event_size = d
        order, hidden = made_degrees(d, self.hidden_units, self.reverse)
        # Masks in NumPy: they are a function of the shapes, so they need no
        # saving, and converting them at each call keeps them out of any
        # graph in which `build` may run.
        masks = [hidden[0][np.newaxis, :] >= order[:, np.newaxis]]
        masks += [b[np.newaxis, :] >= a[:, np.newaxis] for a, b in pairwise(hidden)]
        out = order[np.newaxis, :] > hidden[-1][:, np.newaxis]
        masks.append(np.concatenate([out, out], axis=1))  # shift, then log_scale
        self.masks = [m.astype("float32") for m in masks]
        sizes = [d, *self.hidden_units, 2 * d]
        self.kernels, self.biases = [], []
        for i, (n_in, n_out) in enumerate(pairwise(sizes)):
            last = i == len(sizes) - 2
            # The output layer starts at zero: each flow step starts as the
            # identity, so a fresh flow posterior is its Gaussian base.
            init = "zeros" if last else self.kernel_initializer
            name = "output" if last else f"hidden_{i}"
            self.kernels.append(self.add_weight((n_in, n_out), init, name=f"{name}_kernel"))
            self.biases.append(self.add_weight((n_out,), "zeros", name=f"{name}_bias"))
        self.context_kernel = None
        if context_shape is not None:
            self.context_kernel = self.add_weight(
                (context_shape[-1], self.hidden_units[0]),
                self.kernel_initializer,
                name="context_kernel",
            )
        self.built = True

    def call(self, inputs, context=None):
        if (context is None) != (self.context_kernel is None):
            raise ValueError(
                f"MADE '{self.name}' was built "
                f"{'with' if self.context_kernel is not None else 'without'} a "
                "context and must be called the same way."
            )
        h = inputs
        for i, (kernel, bias, mask) in enumerate(
            zip(self.kernels, self.biases, self.masks, strict=True)
        ):
            mask = keras.ops.convert_to_tensor(mask, dtype=kernel.dtype)
            h = keras.ops.matmul(h, kernel * mask) + bias
            if i == 0 and context is not None:
                h = h + keras.ops.matmul(context, self.context_kernel)
            if i < len(self.kernels) - 1:
                h = self.activation(h)
        d = self.event_size
        return h[..., :d], h[..., d:]

    def compute_output_shape(self, inputs_shape, context_shape=None):
        # Declared rather than traced: Keras then gives the symbolic outputs
        # the compute dtype (float16 under "mixed_float16"), as the eager call
        # returns; tracing `call` outside `__call__` reads the variables
        # uncast and would announce float32.
        batch = tuple(inputs_shape[:-1])
        if context_shape is not None:
            batch = _broadcast_shapes(batch, tuple(context_shape[:-1]))
        shape = (*batch, inputs_shape[-1])
        return shape, shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_units": list(self.hidden_units),
                "activation": keras.activations.serialize(self.activation),
                "reverse": self.reverse,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            }
        )
        return config


class InverseAutoregressiveFlow:
    """One inverse autoregressive flow step on vectors, in `keras.ops`.

    The forward map, the sampling direction, is one parallel pass of a `MADE`
    network over its input; the log-determinant of its triangular Jacobian is
    the sum of the log-scales. The inverse has to undo the dependence one
    dimension at a time: `d` passes of the network. So log q(z) of a flow's
    own samples is cheap (gathered along the sampling path, see
    `InverseAutoregressiveFlowDistribution`), and of any other point exact
    but `d` times slower.

    The log-scale is soft-clamped to `(-log_scale_bound, log_scale_bound)`
    with `tanh`: the step stays a smooth bijection, is still the identity
    where the network outputs zero, and cannot scale a dimension by more than
    `exp(log_scale_bound)`.

    Formula:

    ```python
    shift, raw = made(x, context)          # each depends on x[:i] only (ordering)
    log_scale = bound * tanh(raw / bound)
    y = x * exp(log_scale) + shift
    log_det_jacobian = sum(log_scale, axis=-1)
    ```

    Args:
        made: a `MADE` layer over `x`'s last axis.
        context: the context tensor the network is conditioned on, or `None`.
        log_scale_bound: positive bound of the soft clamp, or `None` for no
            clamp. Defaults to `LOG_SCALE_BOUND` (5.0).

    Example:

    >>> import numpy as np
    >>> made = MADE(hidden_units=(8,))
    >>> made.build((None, 3))
    >>> step = InverseAutoregressiveFlow(made)  # zero output layer: the identity
    >>> y, log_det = step.forward(np.array([[0.5, -1.0, 2.0]], "float32"))
    >>> keras.ops.convert_to_numpy(y).tolist(), keras.ops.convert_to_numpy(log_det).tolist()
    ([[0.5, -1.0, 2.0]], [0.0])

    Reference: Kingma et al., 2016, "Improved variational inference with
    inverse autoregressive flow".
    """

    def __init__(
        self,
        made: MADE,
        context=None,
        log_scale_bound: float | None = LOG_SCALE_BOUND,
    ):
        if not isinstance(made, MADE):
            raise _math.invalid_argument("made", "a keras_elbo.flows.MADE layer", made)
        if log_scale_bound is not None:
            log_scale_bound = _math.real("log_scale_bound", log_scale_bound, positive=True)
        self.made = made
        self.context = context
        self.log_scale_bound = log_scale_bound

    def shift_and_log_scale(self, x):
        """The step's `shift` and (clamped) `log_scale` at `x`."""
        shift, raw = self.made(x, context=self.context)
        if self.log_scale_bound is None:
            return shift, raw
        bound = self.log_scale_bound
        return shift, bound * keras.ops.tanh(raw / bound)

    def forward(self, x):
        """The sampling direction, one pass of the network.

        Args:
            x: a tensor of shape `(..., d)`.

        Returns:
            A tuple `(y, log_det_jacobian)`: `y` shaped like `x`, and
            log|det dy/dx| of shape `x.shape[:-1]`.
        """
        x = keras.ops.convert_to_tensor(x)
        shift, log_scale = self.shift_and_log_scale(x)
        return x * keras.ops.exp(log_scale) + shift, keras.ops.sum(log_scale, axis=-1)

    def inverse(self, y):
        """The inverse map, `d` passes of the network.

        Pass `k` gets the first `k` dimensions of the ordering right (each
        depends only on the ones before it), so `d` passes invert exactly;
        the log-scales of the last pass are then those at the exact `x`.

        Args:
            y: a tensor of shape `(..., d)`, `d` known.

        Returns:
            A tuple `(x, log_det_jacobian)`: `x` with `forward(x)[0] == y`,
            and log|det dx/dy| (minus the forward one at `x`), of shape
            `y.shape[:-1]`.
        """
        y = keras.ops.convert_to_tensor(y)
        d = y.shape[-1]
        if d is None:
            raise ValueError(
                f"InverseAutoregressiveFlow.inverse needs a known last dimension; "
                f"received a tensor of shape {tuple(y.shape)}."
            )
        x = keras.ops.zeros_like(y)
        for _ in range(d):
            shift, log_scale = self.shift_and_log_scale(x)
            x = (y - shift) * keras.ops.exp(-log_scale)
        return x, -keras.ops.sum(log_scale, axis=-1)


class InverseAutoregressiveFlowDistribution(distributions.Distribution):
    """A distribution on vectors pushed through inverse autoregressive flow steps.

    Sampling draws `z_0` from `base` and applies the steps in order; the
    change of variables gives log q(z_K) as the base log-density of `z_0`
    minus the log-determinants gathered on the way. The distribution
    remembers the last tensor `sample` returned with its log-density, so
    `log_prob` of that very tensor object is read back without an inverse
    pass (the Monte Carlo KL of a posterior layer evaluates log q at its own
    sample); any other tensor is inverted exactly, `d` passes of each step's
    network. Sampling is reparameterised when the base's is.

    No mean, standard deviation, entropy or closed-form KL: they have no
    closed form, so `KLRegularizer(mode="auto")` uses Monte Carlo (`"mc"`).
    `forward(base.mean())` is the flow of the base mean, a mode-like code.

    Formula:

    ```python
    z_0 = base.sample()
    z_k, log_det_k = flows[k - 1].forward(z_{k-1})        # k = 1, ..., K
    log_prob(z_K) = base.log_prob(z_0) - sum_k log_det_k
    ```

    Args:
        base: a `keras_elbo.distributions.Distribution` with one event axis
            of size `d` (typically a `MultivariateNormalDiag`).
        flows: a sequence of `InverseAutoregressiveFlow` steps over `d`
            dimensions, applied first to last.

    Example:

    >>> from keras_elbo.distributions import MultivariateNormalDiag
    >>> made = MADE(hidden_units=(8,))
    >>> made.build((None, 2))
    >>> q = InverseAutoregressiveFlowDistribution(
    ...     MultivariateNormalDiag([0.0, 0.0], [1.0, 1.0]), [InverseAutoregressiveFlow(made)]
    ... )
    >>> z = q.sample(3, seed=1)
    >>> tuple(z.shape), tuple(q.log_prob(z).shape)  # log q of z: no inverse pass
    ((3, 2), (3,))

    Reference: Kingma et al., 2016, "Improved variational inference with
    inverse autoregressive flow".
    """

    def __init__(
        self, base: distributions.Distribution, flows: Sequence[InverseAutoregressiveFlow]
    ):
        if not isinstance(base, distributions.Distribution) or len(base.event_shape) != 1:
            raise _math.invalid_argument(
                "base", "a keras_elbo.distributions.Distribution with one event axis", base
            )
        steps = tuple(flows) if isinstance(flows, Sequence) else None
        if steps is None or not all(isinstance(s, InverseAutoregressiveFlow) for s in steps):
            raise _math.invalid_argument(
                "flows", "a sequence of keras_elbo.flows.InverseAutoregressiveFlow steps", flows
            )
        self._base = base
        self._flows = steps
        self._last_sample = None  # (z, log q(z)) of the last `sample`

    @property
    def base(self) -> distributions.Distribution:
        """The distribution of `z_0`."""
        return self._base

    @property
    def flows(self) -> tuple:
        """The steps, in the order they are applied."""
        return self._flows

    @property
    def reparameterized(self) -> bool:
        return self._base.reparameterized

    @property
    def batch_shape(self) -> tuple:
        return self._base.batch_shape

    @property
    def event_shape(self) -> tuple:
        return self._base.event_shape

    @property
    def dtype(self) -> str:
        return self._base.dtype

    def forward(self, z0):
        """`z_0` through every step: `(z_K, sum of the forward log-determinants)`."""
        z, log_det = z0, 0.0
        for step in self._flows:
            z, step_log_det = step.forward(z)
            log_det = log_det + step_log_det
        return z, log_det

    def inverse(self, z):
        """`z_K` back through every step, last first: `(z_0, sum of the inverse
        log-determinants)`; `d` passes of each step's network."""
        log_det = 0.0
        for step in self._flows[::-1]:
            z, step_log_det = step.inverse(z)
            log_det = log_det + step_log_det
        return z, log_det

    def _sample(self, sample_shape, seed):
        z0 = self._base.sample(sample_shape, seed=seed)
        z, log_det = self.forward(z0)
        self._last_sample = (z, self._base.log_prob(z0) - log_det)
        return z

    def log_prob(self, x):
        """log q(x), summed over the event axis.

        Of the tensor the last `sample` returned (the same object), from the
        sampling path; of any other, by the exact inverse.
        """
        if self._last_sample is not None and x is self._last_sample[0]:
            return self._last_sample[1]
        x = keras.ops.convert_to_tensor(x)
        if keras.backend.standardize_dtype(x.dtype) != self.dtype:
            x = keras.ops.cast(x, self.dtype)
        z0, log_det = self.inverse(x)
        return self._base.log_prob(z0) + log_det

    def __copy__(self):
        # A copy forgets the remembered sample: a copy with other parameter
        # tensors (`distributions.stop_parameter_gradients`) must not read
        # back a log-density computed from the original's.
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__, _last_sample=None)
        return clone

    def mean(self):
        raise NotImplementedError(
            f"{type(self).__name__} has no closed-form mean. forward(base.mean())[0] "
            "pushes the base mean through the flow (what FlowPosterior(inference='mean') "
            "returns: a mode-like code, not E[z]); the mean of samples estimates E[z]."
        )


@keras.saving.register_keras_serializable(package="keras_elbo")
class FlowPosterior(Posterior):
    """A diagonal Gaussian q(z|x) refined by inverse autoregressive flows.

    The encoder head of a VAE with a richer posterior than a Gaussian. The
    layer projects its input to the location and scale of a diagonal
    Gaussian (as `GaussianPosterior` does), pushes it through `num_flows`
    `InverseAutoregressiveFlow` steps whose orderings alternate (q is an
    `InverseAutoregressiveFlowDistribution`), draws one reparameterised
    sample z, passes `z` and q to its `kl_regularizer`, and returns `z` as a
    tensor of shape `(batch, latent_dim)`. Runs on every Keras backend.

    log q(z) of the layer's own sample is the base log-density minus the
    log-determinants gathered along the sampling path, remembered by q: no
    inverse pass. q has no closed-form KL nor entropy, so
    `KLRegularizer(mode="auto")` uses Monte Carlo (`"mc"`), and
    `mode="analytic"` fails at model construction. Every step starts as the
    identity (zero-initialised output layers), so a fresh layer is its
    Gaussian base. With `context=True`, the layer's input (the encoder's
    features) also feeds the first hidden layer of every step, as in the IAF
    paper.

    Outside training the layer returns what `inference` says: a sample (the
    default), or with `"mean"` the base Gaussian's mean pushed through the
    flow, a deterministic code that is not E[z] (the flow is non-linear).

    Formula:

    ```python
    loc, scale = split(dense(x)); scale = softplus(scale) + min_scale
    z_0 = loc + scale * eps,  eps ~ N(0, I)
    z_k = z_{k-1} * exp(log_scale_k) + shift_k       # shift_k, log_scale_k = made_k(z_{k-1}, x)
    log q(z_K) = log N(z_0; loc, scale**2) - sum_k sum(log_scale_k)
    ```

    Args:
        latent_dim: size of z, a positive integer.
        num_flows: number of IAF steps, a positive integer. Defaults to `2`.
        hidden_units: hidden layer sizes of each step's `MADE`, a non-empty
            sequence of positive integers. Defaults to `(64,)`.
        context: feed the layer's input to every step. Defaults to `False`.
        kl_regularizer: a `KLRegularizer` (without `path_derivative`), or
            `None` for no KL term. Defaults to `None`.
        min_scale: positive floor of the base Gaussian's scales. Defaults to
            `1e-4`.
        inference: what the layer returns outside training, `"sample"` or
            `"mean"`. Defaults to `"sample"`.
        seed: seed of the layer's samples. Defaults to `None`.
        activation: activation of the `MADE` hidden layers. Defaults to
            `"elu"`.
        kernel_initializer: initializer of the projection's kernel and of the
            `MADE` hidden kernels. Defaults to `"glorot_uniform"`.

    Call arguments:
        inputs: features of shape `(batch, features)`.
        prior_inputs: the tensor c of a conditional prior p(z | c) held by
            the `kl_regularizer`; `None` otherwise.
        training: whether the call is in training mode.

    Returns:
        A tensor of shape `(batch, latent_dim)`: a sample of q(z|x), or with
        `inference="mean"` outside training the flow of the base mean.

    Example:

    >>> import numpy as np
    >>> x = keras.Input((8,))
    >>> reg = KLRegularizer(mode="auto")
    >>> z = FlowPosterior(2, num_flows=2, kl_regularizer=reg, seed=0)(x)
    >>> encoder = keras.Model(x, z)
    >>> tuple(encoder(np.zeros((3, 8), "float32")).shape)
    (3, 2)
    >>> len(encoder.losses)
    1

    Reference: Kingma et al., 2016, "Improved variational inference with
    inverse autoregressive flow".
    """

    def __init__(
        self,
        latent_dim: int,
        num_flows: int = 2,
        hidden_units: Sequence[int] = (64,),
        context: bool = False,
        kl_regularizer: KLRegularizer | None = None,
        min_scale: float = 1e-4,
        inference: str = "sample",
        seed: int | None = None,
        activation="elu",
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(
            latent_dim, kl_regularizer=kl_regularizer, inference=inference, seed=seed, **kwargs
        )
        num_flows = _math.integer("num_flows", num_flows)
        units = _math.positive_integers("hidden_units", hidden_units)
        context = _math.boolean("context", context)
        min_scale = _math.real("min_scale", min_scale, positive=True)
        if kl_regularizer is not None and kl_regularizer.path_derivative:
            # The path derivative evaluates log q with q's parameters behind
            # stop_gradient; a flow's parameters are the weights of its MADE
            # layers, which that cannot reach.
            raise _math.invalid_argument(
                "kl_regularizer", "a KLRegularizer with path_derivative=False", kl_regularizer
            )
        self.num_flows = num_flows
        self.hidden_units = units
        self.context = context
        self.min_scale = min_scale
        self.activation = _math.activation("activation", activation)
        self.kernel_initializer = _math.initializer("kernel_initializer", kernel_initializer)
        self.projection = keras.layers.Dense(
            2 * latent_dim,
            kernel_initializer=self.kernel_initializer,
            dtype=self.dtype_policy,
            name="projection",
        )
        # Flows compute in float32 whatever the policy (float64 under a
        # float64 floatx): log q(z) is a sum of their log-scales.
        self.flows = [
            MADE(
                units,
                activation=self.activation,
                reverse=k % 2 == 1,
                kernel_initializer=self.kernel_initializer,
                dtype=_math.density_dtype(),
                name=f"made_{k}",
            )
            for k in range(num_flows)
        ]

    def build_sublayers(self, input_shape):
        self.projection.build(input_shape)
        z_shape = (*input_shape[:-1], self.latent_dim)
        for made in self.flows:
            made.build(z_shape, input_shape if self.context else None)

    def distribution(self, inputs):
        """q(z|x) for a batch of inputs, an `InverseAutoregressiveFlowDistribution`
        (float32, or float64 under a float64 `floatx`) over a
        `MultivariateNormalDiag` base."""
        dtype = _math.density_dtype()
        params = keras.ops.cast(self.projection(inputs), dtype)
        params = _math.check_finite(params, self.name, "posterior parameters")
        d = self.latent_dim
        base = distributions.MultivariateNormalDiag(
            loc=params[..., :d], scale_diag=_math.positive_scale(params[..., d:], self.min_scale)
        )
        context = keras.ops.cast(inputs, dtype) if self.context else None
        steps = [InverseAutoregressiveFlow(made, context=context) for made in self.flows]
        return InverseAutoregressiveFlowDistribution(base, steps)

    def mean(self, q):
        """The base mean pushed through the flow (a mode-like code, not E[z])."""
        return q.forward(q.base.mean())[0]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_flows": self.num_flows,
                "hidden_units": list(self.hidden_units),
                "context": self.context,
                "min_scale": self.min_scale,
                "activation": keras.activations.serialize(self.activation),
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            }
        )
        return config
