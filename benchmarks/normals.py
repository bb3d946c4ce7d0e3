"""What a standard normal draw costs: the backend's own against the library's.

`keras_elbo._backend.standard_normal` draws the library's normals (every
posterior's and Bayesian layer's noise). On TensorFlow it is the Box-Muller
transform of `keras.random.uniform` draws; on JAX and PyTorch it is
`keras.random.normal`. This times both ways on the backend that
`KERAS_BACKEND` selects, at the size of a sixteen-sample Monte Carlo KL of a
32-dimensional code over a batch of 128 (16 x 128 x 32 draws), compiled as
`fit` would run them (`tf.function` on TensorFlow, `jax.jit` on JAX, eager
on PyTorch), one thread, in process CPU time; the two ways interleaved over
rounds. It prints the median per call of each and their ratio.

    KERAS_BACKEND=tensorflow python -m benchmarks.normals
"""

import argparse
import os
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")

import keras  # noqa: E402

from benchmarks._ratios import interleaved_ms, one_thread  # noqa: E402
from keras_elbo import _backend  # noqa: E402

BACKEND = keras.backend.backend()
SHAPE = (16, 128, 32)


def callers():
    """`{name: call}`, each drawing SHAPE normals once per call, finished."""
    ways = {
        "keras.random.normal": lambda seed: keras.random.normal(SHAPE, seed=seed),
        "library": lambda seed: _backend.standard_normal(SHAPE, "float32", seed),
    }
    if BACKEND == "jax":
        import jax

        key = jax.random.PRNGKey(0)
        return {
            name: (lambda f: lambda: f(key).block_until_ready())(jax.jit(way))
            for name, way in ways.items()
        }
    generator = keras.random.SeedGenerator(0)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return {
            name: (lambda f: lambda: f(generator))(tf.function(way)) for name, way in ways.items()
        }
    return {name: (lambda f: lambda: f(generator))(way) for name, way in ways.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=300, help="calls per round and way")
    args = parser.parse_args(argv)
    one_thread(BACKEND)
    times = interleaved_ms(callers(), args.rounds, args.calls)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"{BACKEND}: {SHAPE} standard normals per call, median of {args.rounds} rounds")
    for name, median in medians.items():
        print(f"  {name:22s} {median:.3f} ms")
    ratio = medians["library"] / medians["keras.random.normal"]
    print(f"  library / keras.random.normal: {ratio:.2f}")


if __name__ == "__main__":
    main()
