"""Independent references and public-API test helpers.

The references are written in NumPy float64 from the textbook formulas, not
from TFP, so that they check the library rather than repeat it.
"""

import keras
import numpy as np
import pytest
from scipy.special import logsumexp

import keras_elbo as ke

LOG_2PI = np.log(2.0 * np.pi)


def softplus(x):
    return np.logaddexp(0.0, x)


def kl_diag_normal(loc, scale, prior_loc=0.0, prior_scale=1.0):
    """KL[N(loc, diag(scale**2)) || N(prior_loc, prior_scale**2 I)], summed over the last axis."""
    loc, scale = numpy(loc), numpy(scale)
    ratio = (scale / prior_scale) ** 2
    return 0.5 * np.sum(
        ratio + ((loc - prior_loc) / prior_scale) ** 2 - 1.0 - np.log(ratio), axis=-1
    )


def kl_full_normal(loc, scale_tril):
    """KL[N(loc, L L^T) || N(0, I)] per batch element, via trace and slogdet."""
    loc, tril = numpy(loc), numpy(scale_tril)
    cov = tril @ np.swapaxes(tril, -1, -2)
    d = loc.shape[-1]
    _, logdet = np.linalg.slogdet(cov)
    return 0.5 * (np.trace(cov, axis1=-2, axis2=-1) + np.sum(loc**2, -1) - d - logdet)


def numpy_fill_triangular(values, d):
    """TFP's `fill_triangular`, as its source writes it: the tail of the
    values, then all of them reversed, reshaped and cut to the lower
    triangle ([1, ..., 6] gives [[4, 0, 0], [6, 5, 0], [3, 2, 1]])."""
    m = len(values)
    return np.tril(np.concatenate([values[m - (d * d - m) :], values[::-1]]).reshape(d, d))


def diag_normal_logpdf(z, loc, scale):
    """log N(z; loc, diag(scale**2)) summed over the last axis."""
    z, loc, scale = (numpy(a) for a in (z, loc, scale))
    return np.sum(-0.5 * ((z - loc) / scale) ** 2 - np.log(scale) - 0.5 * LOG_2PI, axis=-1)


def mixture_logpdf(z, logits, locs, scales):
    """Log-density of a mixture of diagonal Gaussians at z (..., d), by logsumexp."""
    z = numpy(z)[..., None, :]  # (..., 1, d) against (K, d)
    logits = numpy(logits)
    log_w = logits - logsumexp(logits)
    return logsumexp(log_w + diag_normal_logpdf(z, locs, scales), axis=-1)


# A toy binary data set for whole-model tests: 16 pixels, each on with
# probability 0.3. Coding them at probability 0.5 costs 16 log 2 = 11.1 nats;
# their entropy is 16 * H(0.3) = 9.8 nats, so a VAE that learns drops below 10.5.
TOY_PIXELS = 16
TOY_DATA = (np.random.default_rng(0).random((128, TOY_PIXELS)) < 0.3).astype("float32")
TOY_LEARNED_NATS = 10.5


def assert_vae_trains_and_logs_kl_once(model):
    """Fits a compiled `ELBOModel` VAE on `TOY_DATA` for 8 epochs: it logs
    `loss`, `kl`, `reconstruction` and `neg_elbo` only, the loss falls below
    `TOY_LEARNED_NATS`, and the model has one KL metric and one added loss."""
    history = model.fit(TOY_DATA, TOY_DATA, epochs=8, batch_size=32, verbose=0).history
    assert sorted(history) == ["kl", "loss", "neg_elbo", "reconstruction"]
    losses = history["loss"]
    assert losses[0] > losses[-1] and losses[-1] < TOY_LEARNED_NATS, losses
    assert model.metrics_names.count("kl") == 1
    model(TOY_DATA[:2])  # JAX records layer losses in eager calls only
    assert len(model.losses) == 1


def config_round_trip(obj):
    """Rebuilds `obj` from its config and checks that the config is unchanged."""
    config = obj.get_config()
    clone = type(obj).from_config(config)
    assert clone.get_config() == config
    return clone


def save_and_load(model, path, use_custom_objects, monkeypatch=None, user_objects=None):
    """Saves `model` to `path` (.keras) and loads it back.

    With `use_custom_objects`, the library's classes are first removed from
    Keras's global registry (through `monkeypatch`), so the load succeeds only
    if `keras_elbo.custom_objects()` is complete; without it, the load relies
    on the registration done at import. `user_objects`, a test's own classes
    by registered name (`{"tests>Name": Name}`), are then removed too and
    passed along with the library's, as a user passes their classes.
    """
    model.save(path)
    if not use_custom_objects:
        return keras.saving.load_model(path)
    user_objects = user_objects or {}
    registry = keras.saving.get_custom_objects()
    for key in [k for k in registry if k.startswith("keras_elbo>") or k in user_objects]:
        monkeypatch.delitem(registry, key)
    return keras.saving.load_model(path, custom_objects={**ke.custom_objects(), **user_objects})


BACKEND = keras.backend.backend()
# (major, minor) of the running Keras: CI runs the suite on the declared floor too.
KERAS_VERSION = tuple(int(part) for part in keras.__version__.split(".")[:2])

# `jit_compile` values worth testing a whole fit with, per backend: graph and
# XLA on TensorFlow; JAX's compiled step (eager JAX is slow); PyTorch eager
# (jit_compile=True is torch.compile: minutes per model).
JIT_MODES = {"tensorflow": [False, True], "jax": [True], "torch": [False]}.get(BACKEND, [False])


def numpy(x):
    """A backend tensor, variable or array as a float64 NumPy array."""
    if isinstance(x, int | float | np.ndarray | np.generic | list | tuple):
        return np.asarray(x, dtype=np.float64)
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.stop_gradient(x)), dtype=np.float64)


def gradients(fn, *arrays):
    """Gradients of `sum(fn(*tensors))` w.r.t. each array, on the active backend.

    `fn` is written in `keras.ops` and receives backend tensors. An argument
    the result does not depend on gets zeros.
    """
    if BACKEND == "jax":
        import jax

        argnums = tuple(range(len(arrays)))
        grads = jax.grad(lambda *a: keras.ops.sum(fn(*a)), argnums=argnums)(
            *map(jax.numpy.asarray, arrays)
        )
        return [np.asarray(g, np.float64) for g in grads]
    if BACKEND == "torch":
        import torch

        tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
        keras.ops.sum(fn(*tensors)).backward()
        return [
            np.zeros(np.shape(a)) if t.grad is None else t.grad.numpy().astype(np.float64)
            for a, t in zip(arrays, tensors, strict=True)
        ]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        tensors = [tf.constant(a) for a in arrays]
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            total = keras.ops.sum(fn(*tensors))
        grads = tape.gradient(total, tensors, unconnected_gradients="zero")
        return [g.numpy().astype(np.float64) for g in grads]
    pytest.skip(f"no gradient helper for the {BACKEND} backend")


def run_time_error():
    """The exception a failed run-time check raises on this backend
    (`keras_elbo._backend`): TensorFlow's InvalidArgumentError, else
    ValueError."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.errors.InvalidArgumentError
    return ValueError


def compiled(fn):
    """`fn` compiled where run-time checks cannot raise: XLA on TensorFlow,
    `jax.jit` on JAX (skips on PyTorch, where the checks always raise)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    if BACKEND == "jax":
        import jax

        return jax.jit(fn)
    pytest.skip(f"nothing compiles the checks away on {BACKEND}: they raise")


def weight_gradients(loss_fn, variables):
    """Gradients of the scalar `loss_fn()` w.r.t. Keras variables, as NumPy
    arrays, on TensorFlow and PyTorch (JAX differentiates pure functions only:
    the test is skipped there)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn()
        return [numpy(g) for g in tape.gradient(loss, [v.value for v in variables])]
    if BACKEND == "torch":
        for v in variables:
            v.value.grad = None
        loss_fn().backward()
        return [v.value.grad.numpy().astype(np.float64) for v in variables]
    pytest.skip(f"gradients of layer variables are not taken this way on {BACKEND}")
