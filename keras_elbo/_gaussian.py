"""Gaussians from a network's output: the parametrisation that posterior
layers, conditional priors and distribution outputs share."""

import keras
import numpy as np

from keras_elbo import _math
from keras_elbo import distributions as kd

COVARIANCES = ("diag", "full")


def fill_triangular(values, d):
    """A `(..., d, d)` lower-triangular matrix from `(..., d * (d + 1) / 2)` values.

    The entries are placed in the order of TFP's `tfp.math.fill_triangular`
    (so that models saved when this layer used TFP keep their meaning):
    `[1, 2, 3, 4, 5, 6]` gives `[[4, 0, 0], [6, 5, 0], [3, 2, 1]]`. One
    gather with a constant index map, on every backend.
    """
    m = d * (d + 1) // 2
    order = np.concatenate([np.arange(d, m), np.arange(m)[::-1]]).reshape(d, d)
    index = np.where(np.tril(np.ones((d, d), bool)), order, m)  # m: a zero
    padded = keras.ops.concatenate([values, keras.ops.zeros_like(values[..., :1])], axis=-1)
    return keras.ops.take(padded, keras.ops.convert_to_tensor(index), axis=-1)


def positive_scale_tril(raw, d, min_scale):
    """A `(..., d, d)` lower-triangular scale from `(..., d * (d + 1) / 2)`
    raw values: `fill_triangular` with the diagonal `softplus(raw) + min_scale`."""
    tril = fill_triangular(raw, d)
    # The diagonal replaced by its positive scale with a mask, not a
    # `set_diag`, whose gradient XLA cannot compile for a dynamic batch size
    # (issue 10, point 5).
    eye = keras.ops.eye(d, dtype=tril.dtype)
    diag = _math.positive_scale(keras.ops.diagonal(tril, axis1=-2, axis2=-1), min_scale)
    return tril * (1.0 - eye) + eye * diag[..., None, :]


def num_params(d, covariance):
    """How many values parametrise a `d`-dimensional Gaussian."""
    return 2 * d if covariance == "diag" else d + d * (d + 1) // 2


def gaussian(params, d, covariance, min_scale):
    """The Gaussian of `(..., num_params(d, covariance))` values: the first
    `d` its location; then `d` raw scales (`"diag"`: a
    `MultivariateNormalDiag` of scales `softplus(raw) + min_scale`) or the
    raw entries of a lower-triangular scale (`"full"`: a
    `MultivariateNormalTriL`, see `positive_scale_tril`)."""
    loc, raw = params[..., :d], params[..., d:]
    if covariance == "diag":
        return kd.MultivariateNormalDiag(loc, _math.positive_scale(raw, min_scale))
    return kd.MultivariateNormalTriL(loc, positive_scale_tril(raw, d, min_scale))
