"""Private numerical helpers shared by the layers: scale floors, seeds, checks."""

import math
import numbers
import zlib
from collections.abc import Sequence

import keras
import numpy as np

from keras_elbo import _backend


def positive_scale(raw, min_scale):
    """Maps an unconstrained tensor to a scale: `softplus(raw) + min_scale`.

    The floor keeps log-densities finite when an encoder drives a scale to zero.
    """
    return keras.ops.softplus(raw) + min_scale


def density_dtype():
    """The dtype of log-densities and KL: float64 under a float64 `floatx`,
    else float32 (also under a mixed-precision policy, whose float16 would
    overflow a KL of a few thousand nats)."""
    return "float64" if keras.config.floatx() == "float64" else "float32"


def inverse_positive_scale(scale, min_scale):
    """The `raw` value for which `positive_scale(raw, min_scale) == scale`."""
    y = float(scale) - float(min_scale)
    if y <= 0:
        raise ValueError(f"scale={scale} must exceed min_scale={min_scale}.")
    # softplus^{-1}(y) = log(expm1(y)), written stably for large y.
    return float(y + np.log(-np.expm1(-y)))


def seed_generator(seed, salt):
    """A `keras.random.SeedGenerator` for a layer given `seed`, salted.

    The salt (the drawing layer's class name) decorrelates layers built with
    the same integer seed: a posterior and its regularizer given `seed=1`
    would otherwise draw the same noise. `seed=None` draws a random seed.
    """
    if seed is not None:
        # A hash, not seed + salt: PyTorch's backend seeds each draw with
        # seed + counter, so neighbouring seeds would draw shifted copies.
        seed = zlib.crc32(f"{salt}:{seed}".encode()) % (2**31 - 1)
    return keras.random.SeedGenerator(seed)


def check_finite(tensor, layer_name, what):
    """`tensor`, raising at run time if it has NaN or Inf (where the backend
    can: `keras_elbo._backend`).

    The message names the layer and the parameters, so a bad input batch or a
    diverged encoder stops `fit` with a readable error instead of a NaN loss.
    (Names in backticks, not quotes: a TensorFlow graph's `Assert` prints
    quotes escaped.)
    """
    return _backend.check_finite(
        tensor,
        f"Layer `{layer_name}` received non-finite {what} (NaN or Inf). Check "
        "the input of the layer for NaN/Inf values and the learning rate for "
        "divergence",
    )


def sum_event_dims(values):
    """Sums a per-element tensor over every axis but the first (the batch)."""
    rank = len(values.shape)
    if rank <= 1:
        return values
    return keras.ops.sum(values, axis=tuple(range(1, rank)))


def sum_positions(values):
    """`(samples, batch, *positions)` log-densities summed over the positions
    of a latent map: `(samples, batch)`. Shared by the multi-sample objectives
    and the estimators of `keras_elbo.evaluation`."""
    rank = len(values.shape)
    return keras.ops.sum(values, axis=tuple(range(2, rank))) if rank > 2 else values


def invalid_argument(name, expected, value):
    """The ValueError every constructor raises for a bad argument."""
    return ValueError(
        f"Invalid value received for argument `{name}`. Expected {expected}. "
        f"Received: {name}={value!r}"
    )


# Argument checks shared by every constructor. Each returns the value as a
# plain Python type, accepts NumPy scalars, and refuses bools where a number is
# expected (`True` would silently mean 1).


def integer(name, value, minimum=1):
    """An integer of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise invalid_argument(name, expected, value)
    return int(value)


def real(name, value, positive=False, non_negative=False):
    """A finite number, also finite (and, if `positive`, non-zero) in float32.

    The layers compute in float32: 1e39 would be infinite there and 1e-50 zero,
    so both are refused here rather than becoming Inf or NaN later.
    """
    if positive:
        expected = "a positive number (above 1e-38, float32's smallest normal)"
    elif non_negative:
        expected = "a finite non-negative number"
    else:
        expected = "a finite number"
    expected += ", at most 3.4e38 (float32's largest)"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise invalid_argument(name, expected, value)
    value = float(value)
    if not (math.isfinite(value) and abs(value) <= _FLOAT32.max):
        raise invalid_argument(name, expected, value)
    if (positive and not value >= _FLOAT32.tiny) or (non_negative and value < 0):
        raise invalid_argument(name, expected, value)
    return value


def positive_integers(name, value, length=None):
    """A non-empty sequence (not a string) of positive integers, exactly
    `length` of them if given, returned as a tuple."""
    count = "a non-empty" if length is None else f"a {length}-item"
    is_sequence = isinstance(value, Sequence) and not isinstance(value, str | bytes)
    items = value if is_sequence else ()
    if (
        not items
        or (length is not None and len(items) != length)
        or any(isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 1 for i in items)
    ):
        raise invalid_argument(name, f"{count} sequence of positive integers", value)
    return tuple(int(item) for item in items)


def choice(name, value, choices):
    """One of `choices`."""
    if not isinstance(value, str) or value not in choices:
        raise invalid_argument(name, f"one of {choices}", value)
    return value


def boolean(name, value):
    """True or False (not a truthy string such as "False")."""
    if not isinstance(value, bool | np.bool_):
        raise invalid_argument(name, "True or False", value)
    return bool(value)


def seed(name, value):
    """None or an integer, as keras.random.SeedGenerator takes."""
    if value is None:
        return None
    return integer(name, value, minimum=0)


def activation(name, value):
    """A Keras activation: a name, a callable or None (linear)."""
    try:
        return keras.activations.get(value)
    except (ValueError, TypeError):
        raise invalid_argument(name, "a Keras activation (a name or a callable)", value) from None


def initializer(name, value):
    """A Keras initializer: a name, an instance or a config; None is Keras's
    default for a kernel, `"glorot_uniform"` (as in `keras.layers.Dense`)."""
    try:
        return keras.initializers.get("glorot_uniform" if value is None else value)
    except (ValueError, TypeError):
        expected = "a Keras initializer (a name, an instance, a config or None)"
        raise invalid_argument(name, expected, value) from None


_FLOAT32 = np.finfo(np.float32)
