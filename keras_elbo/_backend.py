"""Everything that differs between the Keras backends, in one place.

The layers compute with `keras.ops` and `keras.random` alone; what cannot be
written that way (run-time checks that stop training with a message) lives
here, one function each, with a branch per backend.

What each backend can check:

- TensorFlow: `CheckNumerics` and `Assert` raise at run time, in graph mode
  too, before the step's weight update; XLA (`jit_compile=True`) drops them.
- PyTorch: the step runs eagerly, so a check raises at once (it reads one
  boolean from the device: a small synchronisation per check).
- JAX: nothing can raise inside a jitted step; the checks are no-ops there
  (and raise eagerly outside `jit`).
"""

import sys

import keras

BACKEND = keras.backend.backend()


def _is_traced_jax(tensor):
    import jax

    return isinstance(tensor, jax.core.Tracer)


def check_finite(tensor, message):
    """`tensor`, raising at run time where the backend can if it holds NaN or
    Inf (see the module docstring). Use the returned tensor, so that the
    check stays in the graph."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.debugging.check_numerics(tensor, message)
    assert_condition(keras.ops.all(keras.ops.isfinite(tensor)), message)
    return tensor


def assert_condition(ok, message):
    """Raises, where the backend can, unless the boolean scalar `ok` holds.

    `message` is a string, or a list of strings and scalar tensors joined with
    spaces. In a TensorFlow graph it is the data of a `tf.debugging.Assert`
    (stateful: run in program order; XLA drops it). Eagerly (TensorFlow's
    eager mode, PyTorch, JAX outside `jit`) it raises at once, TensorFlow's
    `InvalidArgumentError` or a `ValueError`, with the numbers written
    `{:g}`. Inside `jax.jit` nothing can raise.
    """
    message = [message] if isinstance(message, str) else message
    if BACKEND == "tensorflow":
        import tensorflow as tf

        if not tf.executing_eagerly():
            tf.debugging.Assert(ok, message)
            return

        def error(text):
            return tf.errors.InvalidArgumentError(None, None, text)

    elif BACKEND == "jax" and _is_traced_jax(ok):
        return
    else:
        error = ValueError
    if not bool(keras.ops.convert_to_numpy(ok)):
        text = " ".join(
            part if isinstance(part, str) else f"{float(keras.ops.convert_to_numpy(part)):g}"
            for part in message
        )
        raise error(text.replace(" ;", ";"))


def finite_gate(tensors, message):
    """A float32 scalar 1.0 that raises at run time, before the step's weight
    update, if any of `tensors` holds NaN or Inf.

    Multiply the loss by it: the gradients, and so the optimizer's update,
    then depend on the check. (On TensorFlow a check whose output is unused
    runs, but is not ordered before the update.) Where nothing can raise
    (XLA, a jitted JAX step) it is a plain 1.0.
    """
    finite = keras.ops.all(keras.ops.stack([keras.ops.all(keras.ops.isfinite(t)) for t in tensors]))
    # log(1) = 0 passes the check; log(0) = -inf fails it with `message`.
    checked = check_finite(keras.ops.log(keras.ops.cast(finite, "float32")), message)
    return keras.ops.exp(checked)


def is_tf_dataset(x):
    """Whether `x` is a `tf.data.Dataset`, on any backend, without importing
    TensorFlow: a program that holds one has imported it."""
    if "tensorflow" not in sys.modules:
        return False
    import tensorflow as tf

    return isinstance(x, tf.data.Dataset)


def compiled(fn):
    """`fn` run as one compiled graph on TensorFlow; `fn` itself elsewhere.

    For numerical routines with long loops (`ops.fori_loop`): eager
    TensorFlow runs a loop's body op by op (a 200-step continued fraction
    costs ~0.3 s a call), while JAX compiles `fori_loop` already and
    PyTorch's eager ops are cheap. Inside a traced function (`fit`,
    `predict`) the graph is inlined. `fn` must take and return tensors.
    """
    if BACKEND != "tensorflow":
        return fn
    import tensorflow as tf

    return tf.function(fn, reduce_retracing=True, autograph=False)
