"""The `Distribution` base class, the location-scale base, and the helpers
every family uses: parameter conversion and broadcasting, shapes, seeds.

(This package must not import TensorFlow: it runs on every backend.)
"""

import copy
import math
import numbers

import keras
import numpy as np
from keras import ops

from keras_elbo import _backend


def invalid_argument(name, expected, received):
    """The constructor error, in `keras_elbo._math.invalid_argument`'s form.

    (`_math` imports TensorFlow; this package must not.)
    """
    return ValueError(
        f"Invalid value received for argument `{name}`. Expected {expected}. "
        f"Received: {name}={received}"
    )


def dtype_of(tensor):
    return keras.backend.standardize_dtype(tensor.dtype)


def cast(x, dtype):
    """`x` as a tensor of `dtype`, with no op when it already is one."""
    x = ops.convert_to_tensor(x)
    return x if dtype_of(x) == dtype else ops.cast(x, dtype)


def as_float(**values):
    """Converts parameters to tensors of one float dtype, returned in order.

    float64 if any parameter is float64, else float32.
    """
    tensors = [ops.convert_to_tensor(value) for value in values.values()]
    dtype = "float64" if "float64" in {dtype_of(t) for t in tensors} else "float32"
    return [cast(t, dtype) for t in tensors]


def is_constant(value, constant):
    """Whether `value` is a Python number or NumPy array (not a tensor) all
    of whose entries equal `constant`."""
    if not isinstance(value, (numbers.Real, np.ndarray)) or isinstance(value, bool):
        return False
    return bool(np.all(np.asarray(value) == constant))


def static_shape(tensor):
    """The static shape as a tuple (ints, or None where unknown: TensorFlow's
    None, and JAX's symbolic dimensions while Keras infers output shapes)."""
    return tuple(n if isinstance(n, int) else None for n in tensor.shape)


def check_rank(name, tensor, minimum, what):
    if len(tensor.shape) < minimum:
        raise invalid_argument(name, what, f"a tensor of shape {static_shape(tensor)}")


def broadcast_batch(**params):
    """Broadcasts the batch axes of several parameters against each other.

    Each keyword is `name=(tensor, event_rank)`; the last `event_rank` axes
    are left alone. Returns the tensors in order. Done once at construction,
    so that the methods need no broadcasting logic of their own.
    """
    items = [(name, t, len(t.shape) - rank) for name, (t, rank) in params.items()]
    batch_shapes = [static_shape(t)[:split] for _, t, split in items]
    if any(None in shape for shape in batch_shapes) and len(set(batch_shapes)) == 1:
        # The same static batch shape, unknown sizes at the same axes (the
        # batch of a traced call, as from one projection of the features):
        # left as they are, without the ops below in every training step.
        # Sampling takes the broadcast shape at run time (`runtime_shape`).
        return [t for _, t, _ in items]
    if any(None in shape for shape in batch_shapes):
        # Unknown sizes (a symbolic batch axis on TensorFlow): let the ops
        # broadcast at run time, adding zeros of every parameter's batch shape.
        out = []
        for _, t, split in items:
            for _, other, other_split in items:
                zeros = ops.zeros_like(other[(Ellipsis,) + (0,) * (len(other.shape) - other_split)])
                for _ in range(len(t.shape) - split):
                    zeros = zeros[..., None]
                t = t + zeros
            out.append(t)
        return out
    try:
        batch = np.broadcast_shapes(*batch_shapes)
    except ValueError:
        name = items[-1][0]
        expected = "batch axes that broadcast against " + ", ".join(
            f"`{other}`'s {shape}"
            for (other, _, _), shape in zip(items[:-1], batch_shapes[:-1], strict=True)
        )
        raise invalid_argument(
            name, expected, f"a tensor of shape {static_shape(items[-1][1])}"
        ) from None
    out = []
    for _, t, split in items:
        target = batch + static_shape(t)[split:]
        out.append(t if static_shape(t) == target else ops.broadcast_to(t, target))
    return out


def runtime_shape(tensor, *others):
    """`ops.shape(tensor)`, the batch and event shape of the samples to draw.
    Where a size is unknown, that of `tensor` broadcast against `others` (one
    operation, no gradient): `broadcast_batch` leaves parameters of the same
    static shape as they are, and at run time one of them may still hold 1
    where another holds the batch."""
    if None not in static_shape(tensor):
        return tuple(ops.shape(tensor))
    total = tensor
    for other in others:
        total = total + ops.zeros_like(other)
    return tuple(ops.shape(total))


def as_sample_shape(sample_shape):
    """`sample_shape` as a tuple of non-negative ints (an int is one axis)."""
    items = (sample_shape,) if isinstance(sample_shape, numbers.Integral) else sample_shape
    try:
        items = tuple(items)
    except TypeError:
        items = None
    if items is None or any(
        isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0 for n in items
    ):
        raise invalid_argument(
            "sample_shape", "a non-negative integer or a tuple of them", repr(sample_shape)
        )
    return tuple(int(n) for n in items)


def _is_seed_integer(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def check_seed(seed):
    if seed is None or isinstance(seed, keras.random.SeedGenerator):
        return seed
    if isinstance(seed, (tuple, list)) and len(seed) == 2 and all(map(_is_seed_integer, seed)):
        # TFP's stateless seed, a pair of integers: hashed into one (the same
        # pair gives the same draws here; not TFP's numbers).
        return int(np.random.SeedSequence([int(v) for v in seed]).generate_state(1)[0] >> 1)
    if not _is_seed_integer(seed):
        raise invalid_argument(
            "seed",
            "None, a non-negative integer, a pair of them (TFP's stateless seeds) or a "
            "keras.random.SeedGenerator",
            repr(seed),
        )
    return int(seed)


def split_seed(seed, count):
    """`count` seeds for `count` independent draws from one `seed` argument.

    A `SeedGenerator` (or None, the global one) advances at each draw, so it
    serves every draw. An integer must not: the same integer gives the same
    random bits to each `keras.random` call, so the draws would be dependent
    (a mixture's component choice and its noise). Integers are spread by
    NumPy's `SeedSequence`, a hash of `(seed, i)`.
    """
    if not isinstance(seed, int):
        return [seed] * count
    return [int(np.random.SeedSequence([seed, i]).generate_state(1)[0] >> 1) for i in range(count)]


def uniform_open(shape, dtype, seed):
    """Uniform draws in the open interval (0, 1): `log(u)` and `log1p(-u)` stay finite."""
    tiny = float(np.finfo(dtype).tiny)
    return keras.random.uniform(shape, minval=tiny, maxval=1.0, dtype=dtype, seed=seed)


def draw_categories(logits, sample_shape, seed):
    """Category indices (int32) drawn from `softmax(logits)` over the last
    axis, of shape `sample_shape + logits.shape[:-1]`."""
    num_categories = static_shape(logits)[-1]
    count = math.prod(sample_shape)
    # keras.random.categorical takes 2-D logits (rows, K) and gives (rows, count).
    flat_logits = ops.reshape(logits, (-1, num_categories))
    index = keras.random.categorical(flat_logits, count, seed=seed, dtype="int32")
    return ops.reshape(ops.transpose(index), sample_shape + tuple(ops.shape(logits))[:-1])


class Distribution:
    """Base class: a batch of probability distributions.

    A distribution has a `batch_shape` (independent distributions with
    different parameters) and an `event_shape` (the shape of one draw).
    `sample(sample_shape)` returns `sample_shape + batch_shape + event_shape`;
    `log_prob(x)` sums over the event axes and returns the broadcast of
    `x.shape[:-len(event_shape)]` against `batch_shape`.

    Subclasses implement `_sample(sample_shape, seed)` and whichever of
    `log_prob`, `mean`, `stddev`, `entropy`, `cdf`, `quantile` they can; the
    others raise `NotImplementedError` (`variance` is `stddev()**2` unless
    overridden). `reparameterized` (a class attribute) says whether
    gradients flow from samples back to the parameters. `batch_shape`,
    `event_shape` and `dtype` are read from the attribute named by the class
    attribute `_shape_source`, a parameter of shape `batch_shape +
    event_shape` whose last `_event_ndims` axes are the event; a subclass
    without such a parameter overrides the three properties.
    """

    reparameterized = False
    _shape_source = None
    _event_ndims = 0
    # `(sample, noise)` of the last reparameterised draw, where a subclass
    # keeps it (the location-scale families, `MultivariateNormalTriL`):
    # `log_prob` of that very tensor reads the noise back (`_own_noise`)
    # instead of recomputing it, as TFP's bijector cache does.
    _last_draw = None

    def _own_noise(self, x):
        """The noise `x` was drawn from, if `x` is the tensor `_sample` last
        returned; else None."""
        if self._last_draw is not None and x is self._last_draw[0]:
            return self._last_draw[1]
        return None

    def sample(
        self,
        sample_shape: int | tuple[int, ...] = (),
        seed: int | keras.random.SeedGenerator | None = None,
    ):
        """Draws samples of shape `sample_shape + batch_shape + event_shape`.

        Args:
            sample_shape: an int or a tuple of ints, the leading axes of the
                result.
            seed: a `keras.random.SeedGenerator` (new draws at each call),
                an integer (the same draws at each call) or None (Keras's
                global generator, which Keras refuses inside a compiled JAX
                function: there, pass a generator held by the layer).

        Returns:
            A tensor of dtype `self.dtype`.
        """
        seed = _backend.replica_seed(check_seed(seed))
        return self._sample(as_sample_shape(sample_shape), seed)

    def _sample(self, sample_shape, seed):
        raise NotImplementedError(f"{type(self).__name__} does not implement `sample`.")

    def log_prob(self, x):
        """The log-density (or log-mass) of `x`, summed over the event axes."""
        raise NotImplementedError(f"{type(self).__name__} does not implement `log_prob`.")

    def mean(self):
        """The mean, of shape `batch_shape + event_shape`."""
        raise NotImplementedError(f"{type(self).__name__} does not implement `mean`.")

    def stddev(self):
        """The standard deviation of each coordinate, `batch_shape + event_shape`."""
        raise NotImplementedError(f"{type(self).__name__} does not implement `stddev`.")

    def variance(self):
        """The variance of each coordinate, `batch_shape + event_shape`."""
        return ops.square(self.stddev())

    def entropy(self):
        """The differential (or Shannon) entropy in nats, of shape `batch_shape`."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form entropy.")

    def cdf(self, x):
        """The cumulative distribution function `P(X <= x)` (scalar events;
        per coordinate for `Independent`)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement `cdf`.")

    def quantile(self, p):
        """The inverse of `cdf`: the `x` with `cdf(x) = p`, for `p` in (0, 1)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement `quantile`.")

    def _shape_parameter(self):
        if self._shape_source is None:
            raise NotImplementedError(
                f"{type(self).__name__} sets no `_shape_source`: it overrides "
                "`batch_shape`, `event_shape` and `dtype`."
            )
        return getattr(self, self._shape_source)

    @property
    def batch_shape(self) -> tuple:
        """The shape of the batch of distributions, a tuple."""
        shape = static_shape(self._shape_parameter())
        return shape[: len(shape) - self._event_ndims]

    @property
    def event_shape(self) -> tuple:
        """The shape of one draw, a tuple."""
        shape = static_shape(self._shape_parameter())
        return shape[len(shape) - self._event_ndims :]

    @property
    def dtype(self) -> str:
        """The dtype of samples and densities, `"float32"` or `"float64"`."""
        return dtype_of(self._shape_parameter())

    def __repr__(self):
        return (
            f"<{type(self).__name__} batch_shape={self.batch_shape} "
            f"event_shape={self.event_shape} dtype={self.dtype}>"
        )


class LocationScale(Distribution):
    """Elementwise `loc + scale * X` for the standard variable `X` of a family.

    What `Normal`, `Logistic` and `StudentT` share: the parameters broadcast
    once, `x -> z = (x - loc) / scale` (read back from the noise for the
    tensor last sampled), and

    ```python
    sample() = loc + scale * standard_sample()   # reparameterised in loc, scale
    log_prob(x) = log_unnormalized(z) - log_normalizer() - log(scale)
    cdf(x) = standard_cdf(z),  quantile(p) = loc + scale * standard_quantile(p)
    ```

    A family gives `_standard_sample(shape, seed)`, `_log_unnormalized(z)`
    (on the samples' shape), `_log_normalizer()` (on the parameters' shape:
    the constant terms are added once per distribution, not per sample) and,
    where it has them, `_standard_cdf(z)` and `_standard_quantile(p)`.
    Other parameters of the family (`StudentT`'s `df`) are keywords of
    `__init__`, broadcast with `loc` and `scale` and kept as `_<name>`.
    """

    reparameterized = True
    _shape_source = "_loc"

    def __init__(self, loc, scale, **shape_parameters):
        # Given as constants 0 and 1 (the default prior): `z` is `x` itself,
        # without the shift and scaling of every sample.
        self._standard = is_constant(loc, 0.0) and is_constant(scale, 1.0)
        self._parameter_names = (*shape_parameters, "loc", "scale")
        values = as_float(**shape_parameters, loc=loc, scale=scale)
        tensors = broadcast_batch(
            **{name: (t, 0) for name, t in zip(self._parameter_names, values, strict=True)}
        )
        for name, tensor in zip(self._parameter_names, tensors, strict=True):
            setattr(self, "_" + name, tensor)

    @property
    def loc(self):
        return self._loc

    @property
    def scale(self):
        return self._scale

    def _standardized(self, x):
        """`(x - loc) / scale`. For the tensor `_sample` last returned, the
        noise it was made from: the same value, and the same gradient (the
        total derivative of `(loc + scale * eps - loc) / scale` is zero),
        without two operations on every sample."""
        noise = self._own_noise(x)
        if noise is not None:
            return noise
        x = cast(x, self.dtype)
        return x if self._standard else (x - self._loc) / self._scale

    def _log_scale(self):
        return ops.zeros_like(self._scale) if self._standard else ops.log(self._scale)

    def _sample(self, sample_shape, seed):
        parameters = [getattr(self, "_" + name) for name in self._parameter_names]
        shape = sample_shape + runtime_shape(self._loc, *parameters)
        noise = self._standard_sample(shape, seed)
        sample = self._loc + self._scale * noise
        self._last_draw = (sample, noise)
        return sample

    def log_prob(self, x):
        z = self._standardized(x)
        return self._log_unnormalized(z) - (self._log_scale() + self._log_normalizer())

    def mean(self):
        return self._loc

    def cdf(self, x):
        return self._standard_cdf(self._standardized(x))

    def quantile(self, p):
        return self._loc + self._scale * self._standard_quantile(cast(p, self.dtype))

    def _standard_sample(self, shape, seed):
        raise NotImplementedError(f"{type(self).__name__} does not implement `sample`.")

    def _standard_cdf(self, z):
        raise NotImplementedError(f"{type(self).__name__} does not implement `cdf`.")

    def _standard_quantile(self, p):
        raise NotImplementedError(f"{type(self).__name__} does not implement `quantile`.")


def stop_parameter_gradients(dist):
    """A copy of `dist` with every parameter tensor behind `stop_gradient`.

    Nested distributions (mixture components, `Independent`'s inner one) are
    copied the same way. The values are unchanged; gradients then reach the
    parameters only through samples drawn elsewhere (the path-derivative
    estimator of `KLRegularizer`).
    """
    clone = copy.copy(dist)
    # A clone has drawn nothing: log q(z) of a sample of `dist` is computed
    # afresh, with the gradient through z alone.
    clone._last_draw = None
    for name, value in vars(dist).items():
        if isinstance(value, Distribution):
            setattr(clone, name, stop_parameter_gradients(value))
        elif ops.is_tensor(value) or isinstance(value, keras.Variable):
            setattr(clone, name, ops.stop_gradient(value))
    return clone
