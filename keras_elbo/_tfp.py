"""TensorFlow Probability interop, on the TensorFlow backend only.

The library's own distributions (`keras_elbo.distributions`) run on every
backend. On TensorFlow, users' TFP distributions are still accepted as a
prior and as the `posterior=` handed to `KLRegularizer`. TFP is never
imported here unless the user's program already did (a TFP object can only
exist then), so `import keras_elbo` does not load it.
"""

import sys

import keras

from keras_elbo import distributions as kd


def loaded():
    """Whether TFP has been imported by the program, on the TF backend."""
    return keras.backend.backend() == "tensorflow" and "tensorflow_probability" in sys.modules


def tfd():
    import tensorflow_probability as tfp

    return tfp.distributions


def is_distribution(obj):
    """Whether `obj` is a TFP distribution (without importing TFP)."""
    return loaded() and isinstance(obj, tfd().Distribution)


def to_library(dist):
    """The `keras_elbo.distributions` equivalent of a TFP Gaussian, else `dist`.

    So that the closed-form KL table also serves TFP's Normal,
    MultivariateNormalDiag, MultivariateNormalTriL and Independent(Normal)
    (with one reinterpreted axis). Anything else is returned as it is and
    handled through its `log_prob`, `sample` and `entropy`.
    """
    if not is_distribution(dist):
        return dist
    d = tfd()
    if type(dist) is d.Normal:
        return kd.Normal(dist.loc, dist.scale)
    if type(dist) is d.MultivariateNormalDiag:
        return kd.MultivariateNormalDiag(dist.mean(), dist.stddev())
    if type(dist) is d.MultivariateNormalTriL:
        return kd.MultivariateNormalTriL(dist.loc, dist.scale.to_dense())
    if (
        type(dist) is d.Independent
        and type(dist.distribution) is d.Normal
        and len(dist.event_shape) == 1
    ):
        inner = dist.distribution
        return kd.MultivariateNormalDiag(inner.loc, inner.scale)
    return dist


def kl_divergence(q, p):
    """TFP's registered KL between two TFP distributions (NotImplementedError
    where none is)."""
    return tfd().kl_divergence(q, p)


def sample(dist, sample_shape, seed_generator):
    """`dist.sample(sample_shape)` for a TFP distribution, seeded from a Keras
    `SeedGenerator` (int64 state; TFP's stateless samplers want int32)."""
    import tensorflow as tf
    import tensorflow_probability as tfp

    from keras_elbo import _backend

    seed_generator = _backend.replica_seed(seed_generator)
    seed = tfp.random.sanitize_seed(tf.cast(seed_generator.next(), tf.int32))
    return dist.sample(sample_shape, seed=seed)


def stop_parameter_gradients(dist):
    """A TFP distribution with every parameter behind `tf.stop_gradient`."""
    import tensorflow as tf

    return tf.nest.map_structure(tf.stop_gradient, dist, expand_composites=True)


def standard_normal_like(q):
    """TFP's N(0, I) with the event shape and dtype of the TFP distribution
    `q`: a multivariate normal for multivariate-normal posteriors (TFP
    registers no KL between `MultivariateNormalTriL` and
    `Independent(Normal)`), else an `Independent(Normal)`."""
    import tensorflow as tf

    d = tfd()
    event_shape = q.event_shape
    if isinstance(q, d.MultivariateNormalLinearOperator):
        return d.MultivariateNormalDiag(loc=tf.zeros(event_shape, q.dtype))
    normal = d.Normal(tf.zeros(event_shape, q.dtype), tf.ones(event_shape, q.dtype))
    return d.Independent(normal, reinterpreted_batch_ndims=len(event_shape))
