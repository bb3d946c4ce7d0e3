"""Everything that differs between the Keras backends, in one place.

The layers compute with `keras.ops` and `keras.random` alone; what cannot be
written that way (run-time checks that stop training with a message) lives
here, one function each, with a branch per backend.

What each backend can check:

- TensorFlow: `Assert` raises at run time, in graph mode too, before the
  step's weight update (the checked tensors depend on it). XLA
  (`jit_compile=True`) would drop it, with a warning per `Assert`: inside a
  function XLA compiles, none is made.
- PyTorch: the step runs eagerly, so a check raises at once (it reads one
  boolean from the device: a small synchronisation per check).
- JAX: nothing can raise inside a jitted step; the checks are no-ops there
  (and raise eagerly outside `jit`).
"""

import contextlib
import math
import sys

import keras

BACKEND = keras.backend.backend()


def _is_traced_jax(tensor):
    import jax

    return isinstance(tensor, jax.core.Tracer)


def _tf_mode():
    """Where TensorFlow is adding ops: `"eager"` (a check raises at once),
    `"graph"` (a traced function: an `Assert` runs in it) or `"xla"` (a
    function XLA compiles, which would drop an `Assert` with a warning)."""
    import tensorflow as tf

    if tf.executing_eagerly():
        return "eager"
    try:  # TensorFlow's own test, private: without it the checks stay
        from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext
    except ImportError:
        return "graph"
    return "xla" if GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()) else "graph"


def check_finite(tensor, message):
    """`tensor`, raising at run time where the backend can if it holds NaN or
    Inf (see the module docstring). Use the returned tensor, so that the
    check stays in the graph."""
    return _checked(tensor, keras.ops.all(keras.ops.isfinite(tensor)), message)


def _checked(tensor, ok, message):
    """`tensor`, which raises `message` at run time unless `ok` holds.

    In a TensorFlow graph, an `Assert` that the returned tensor depends on
    (so that the gradients, and the updates, wait for it; a `CheckNumerics`
    would also do, but appends "Tensor had Inf values" to the message, even
    for a NaN). Elsewhere `assert_condition`.
    """
    mode = _tf_mode() if BACKEND == "tensorflow" else None
    if mode == "xla":
        return tensor
    if mode == "graph":
        import tensorflow as tf

        with tf.control_dependencies([tf.debugging.Assert(ok, [message])]):
            return tf.identity(tensor)
    assert_condition(ok, message)
    return tensor


def assert_condition(ok, message):
    """Raises, where the backend can, unless the boolean scalar `ok` holds.

    `message` is a string, or a list of strings and scalar tensors joined with
    spaces. In a TensorFlow graph it is the data of a `tf.debugging.Assert`
    (stateful: run in program order; none under XLA). Eagerly (TensorFlow's
    eager mode, PyTorch, JAX outside `jit`) it raises at once, TensorFlow's
    `InvalidArgumentError` or a `ValueError`, with the numbers written
    `{:g}`. Inside `jax.jit` nothing can raise.
    """
    message = [message] if isinstance(message, str) else message
    if BACKEND == "tensorflow":
        import tensorflow as tf

        mode = _tf_mode()
        if mode == "graph":
            tf.debugging.Assert(ok, message)
        if mode != "eager":
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


def all_finite(tensors):
    """A boolean scalar: whether every one of `tensors` is free of NaN and Inf."""
    return keras.ops.all(keras.ops.stack([keras.ops.all(keras.ops.isfinite(t)) for t in tensors]))


def finite_gate(tensors, message):
    """A float32 scalar 1.0 that raises at run time, before the step's weight
    update, if any of `tensors` holds NaN or Inf.

    Multiply the loss by it: the gradients, and so the optimizer's update,
    then depend on the check. Where nothing can raise (XLA, a jitted JAX
    step) it is NaN for a bad batch, so that the loss is NaN (not 0: XLA
    turns a product with a 0/1 gate into a select).
    """
    finite = all_finite(tensors)
    gate = keras.ops.where(finite, 1.0, float("nan"))
    return _checked(keras.ops.cast(gate, "float32"), finite, message)


@contextlib.contextmanager
def checked_before(tensors, message):
    """In a TensorFlow graph, every op made in the block runs after a check
    that `tensors` are finite, which raises `message` otherwise.

    Around a whole train step it orders the check before the optimizer's
    step counter too, which depends on no gradient (`finite_gate` alone
    spares the weights but lets `iterations` advance). Elsewhere (eager
    execution, XLA, JAX, PyTorch) it does nothing: `finite_gate` serves
    there. (XLA could not lift the optimizer's variables out of the block.)
    """
    if BACKEND == "tensorflow" and _tf_mode() == "graph":
        import tensorflow as tf

        check = tf.debugging.Assert(all_finite(tensors), [message])
        with tf.control_dependencies([check]):
            yield
        return
    yield


def standard_normal(shape, dtype, seed):
    """Standard normal draws of `shape` (static sizes or scalar tensors), as
    `keras.random.normal(shape, dtype=dtype, seed=seed)`.

    On TensorFlow by the Box-Muller transform of `keras.random.uniform`
    draws: TensorFlow's own normal kernel evaluates its logarithms and
    sines one number at a time, Eigen's vectorised ops several at once
    (16 x 128 x 32 draws, the noise of a sixteen-sample Monte Carlo KL, in a
    `tf.function` on one thread: 0.63 times the time of
    `keras.random.normal`, 2026-12-04; `benchmarks/normals.py`). On JAX and
    PyTorch the backend's own normals are the faster (the transform took
    1.6 and 2 times as long there) and serve. The draws are computed in
    float32 (float64 for a float64 `dtype`) and cast: a float16 uniform
    would cut the tails at 3.9 standard deviations.
    """
    if BACKEND != "tensorflow":
        return keras.random.normal(shape, dtype=dtype, seed=seed)
    import tensorflow as tf

    ops = keras.ops
    working = "float64" if keras.backend.standardize_dtype(dtype) == "float64" else "float32"
    size = tf.reduce_prod(tf.stack([tf.cast(n, "int32") for n in shape])) if shape else 1
    pairs = (size + 1) // 2
    uniform = keras.random.uniform((2, pairs), dtype=working, seed=seed)
    # uniform < 1, so the radius is finite; 0 gives a radius of 0.
    radius = ops.sqrt(-2.0 * ops.log1p(-uniform[0]))
    angle = (2.0 * math.pi) * uniform[1]
    draws = ops.concatenate([radius * ops.cos(angle), radius * ops.sin(angle)], axis=0)
    return ops.cast(ops.reshape(draws[:size], shape), dtype)


class _ReplicaSeedGenerator(keras.random.SeedGenerator):
    """A `SeedGenerator` that gives another's seeds with a replica's index
    folded in: what `replica_seed` hands to `keras.random` inside one
    replica's step. It owns no state (its `__init__` skips the parent's,
    which would make a variable): drawing advances `generator`, and
    `keras.random` asks a `SeedGenerator` for nothing but `next()`."""

    def __init__(self, generator, replica_id):  # not the parent's: no state variable
        self.generator = generator
        self.replica_id = replica_id

    def next(self, ordered=True):
        import tensorflow as tf

        seed = self.generator.next(ordered=ordered)
        # Into int32 as Keras's TensorFlow backend does (stateless ops take
        # int32 seeds on every device), then hashed with the replica index.
        pair = tf.cast(tf.math.floormod(seed, tf.int32.max - 1), "int32")
        folded = tf.random.experimental.stateless_fold_in(pair, self.replica_id)
        return tf.cast(folded, seed.dtype)


def replica_seed(seed):
    """The seed to draw with in this replica of a TensorFlow distribution
    strategy: `seed` itself, except in one replica's step of a strategy with
    several replicas in sync, where a `SeedGenerator` is handed on with the
    replica's index folded into every seed it gives.

    A strategy mirrors a generator's state like any variable, so without this
    every replica would draw the same noise for its own examples: the two
    replicas of a `MirroredStrategy`, or the workers of a
    `MultiWorkerMirroredStrategy`. The gradient would stay unbiased, but a
    global batch would average fewer independent draws than it has examples.
    Integer seeds (the same draws at each call, by request) and other
    backends are left alone; on PyTorch, `fold_in_seeds` does the same for
    `DistributedDataParallel` workers.
    """
    if BACKEND != "tensorflow" or not isinstance(seed, keras.random.SeedGenerator):
        return seed
    import tensorflow as tf

    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return seed
    context = tf.distribute.get_replica_context()
    if context.num_replicas_in_sync == 1 or isinstance(seed, _ReplicaSeedGenerator):
        return seed
    return _ReplicaSeedGenerator(seed, context.replica_id_in_sync_group)


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
