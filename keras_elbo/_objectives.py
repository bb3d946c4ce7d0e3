"""The multi-sample objectives, written once over per-sample log-weights.

`ELBOModel` (the importance-weighted bound in training, DReG) and the
estimators of `keras_elbo.evaluation` (`importance_weighted_log_likelihood`)
compute the same quantities from the same records of K ancestral samples of
a model's posteriors (`posteriors.MultiSampleDraws`): each layer's
`log p(z_l | ...) - log q(z_l | ...)` (`log_density_ratios`), the log-weight
`log p(x | z_k) + sum_l ratio_l` (`log_weights`, each ratio optionally
tempered by its KL weight) and the bound `log mean_k exp(log_w)`
(`importance_weighted_bound`). All arrays are `(K, batch)`, sample-major, in
`_math.density_dtype()`.
"""

import math

from keras import ops

from keras_elbo import _math


def log_density_ratios(records):
    """log p(z) - log q(z) of each record `(layer, q, z, prior_inputs)` of a
    `MultiSampleDraws`, per sample and example.

    Returns a list of `(kl_regularizer, log_ratio)`, one per record in the
    order drawn, `log_ratio` of shape `(K, batch)` (summed over the positions
    of a latent map; a lower layer's `K * batch` rows of one sample each
    reshaped sample-major). Summed over the records they are the latent part
    of the log-weight of K ancestral samples of a hierarchy.
    """
    top_z = records[0][2]
    num_samples, batch = ops.shape(top_z)[0], ops.shape(top_z)[1]
    dtype = _math.density_dtype()
    ratios = []
    for layer, q, z, prior_inputs in records:
        # (Every layer has a regularizer: `ELBOModel` checks it when compiled
        # with objective="iwae", the estimators when they split the model.)
        regularizer = layer.kl_regularizer
        p = regularizer.prior_distribution(q, prior_inputs=prior_inputs)
        ratio = ops.cast(_math.sum_positions(p.log_prob(z) - q.log_prob(z)), dtype)
        # A lower layer's rows must be the K * batch rows that the top drew.
        ratios.append((regularizer, ops.reshape(ratio, (num_samples, batch))))
    return ratios


def log_weights(log_likelihood, ratios, tempered=False):
    """`log p(x | z_k) + sum_l ratio_l`: the log importance weight of each of
    K samples, `(K, batch)`.

    Args:
        log_likelihood: `(K, batch)` log p(x | z_k).
        ratios: `log_density_ratios`' list.
        tempered: multiply each layer's ratio by its regularizer's
            `kl_weight` (the warm-up of the bound in training).
    """
    dtype = _math.density_dtype()
    log_w = ops.cast(log_likelihood, dtype)
    for regularizer, ratio in ratios:
        if tempered:
            ratio = ops.cast(regularizer.kl_weight, dtype) * ratio
        log_w = log_w + ratio
    return log_w


def importance_weighted_bound(log_w):
    """`log (1/K) sum_k exp(log_w[k])` per example, `(batch,)`: the bound of
    Burda et al. (2016) for K samples (the ELBO's estimate at K = 1).

    >>> import numpy as np
    >>> log_w = np.log(np.array([[1.0], [3.0]], "float32"))  # K = 2, batch 1
    >>> bound = ops.convert_to_numpy(importance_weighted_bound(log_w))
    >>> round(float(bound[0]), 4)  # log 2
    0.6931
    """
    num_samples = log_w.shape[0]  # static: K is a Python integer
    return ops.logsumexp(log_w, axis=0) - math.log(num_samples)


def normalized_weights(log_w):
    """The self-normalised importance weights `softmax_k(log_w)`, `(K, batch)`,
    without gradient (ones at K = 1)."""
    if log_w.shape[0] == 1:  # (Keras warns of a softmax over an axis of size 1.)
        return ops.ones_like(log_w)
    return ops.stop_gradient(ops.softmax(log_w, axis=0))
