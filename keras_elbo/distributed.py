"""Training one model in several worker processes.

Data-parallel training copies one model to every worker, random-generator
states included: PyTorch's `DistributedDataParallel` broadcasts every
parameter of rank 0 (a Keras `SeedGenerator`'s state is one), and workers
built with the same `keras.utils.set_random_seed` start from the same seeds
anyway. Each worker would then draw the same posterior noise for its own
examples: the gradient stays unbiased, but the workers' samples are not
independent, so the run averages fewer noise draws than it has examples.
`fold_in_seeds` gives each worker its own stream. README, "Scaling out".

(TensorFlow's strategies need no call: there the library folds the replica's
index into each seed it draws with inside a replica's step,
`_backend.replica_seed`.)
"""

import hashlib

import keras
import numpy as np

from keras_elbo import _math

# The name Keras gives the state variable of every `keras.random.SeedGenerator`
# (Keras 3.9 to 3.15): `Variable.name` is public, the layers' lists of their
# generators are not.
_SEED_STATE = "seed_generator_state"


def _mixed(seed: int, value: int) -> int:
    """A seed in [0, 2**31) that depends on both numbers (a hash, so that
    nearby values give unrelated seeds)."""
    digest = hashlib.blake2b(f"{seed},{value}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") >> 1


def fold_in_seeds(model: keras.Layer, value: int) -> int:
    """Re-seeds every random generator of `model` with `value` folded in.

    Call it in each worker after the weights are synchronised, with the
    worker's rank (on PyTorch; TensorFlow's strategies fold each replica's
    index in themselves), or after restoring a backup, with the epoch the
    run resumes at: Keras saves no generator states (`save_weights` and
    `BackupAndRestore` neither), so a resumed run would otherwise draw the
    noise of its first steps again. Every `keras.random.SeedGenerator` that
    the model's layers hold (posterior and Bayesian layers, dropout) gets a
    new seed mixed from its own and `value`, its draw counter unchanged.
    Workers then draw different noise, and a run stays reproducible: the
    same values give the same streams.

    Args:
        model: a Keras layer or model, built (its generators exist).
        value: a non-negative integer, distinct for each worker (its rank)
            or for each start of a resumed run (its first epoch).

    Returns:
        The number of generators re-seeded.

    Example:

    >>> import keras
    >>> import keras_elbo as ke
    >>> x = keras.Input((4,))
    >>> model = keras.Model(x, ke.GaussianPosterior(2, seed=0)(x))
    >>> ke.fold_in_seeds(model, 1)
    1
    """
    value = _math.integer("value", value, minimum=0)
    states = [v for v in model.variables if v.name == _SEED_STATE]
    for state in states:
        current = keras.ops.convert_to_numpy(state.value)
        seed, counter = int(current[0]), current[1]
        state.assign(np.array([_mixed(seed, value), counter], dtype=current.dtype))
    return len(states)
