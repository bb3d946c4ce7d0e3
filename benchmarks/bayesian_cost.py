"""The cost of Bayesian layers: a training step against the deterministic layer's.

On the backend Keras runs on (`KERAS_BACKEND`), one-layer models trained one
batch at a time (`train_on_batch`: forward, backward, SGD update; mean
squared error), in process CPU time with one thread, interleaved over rounds
in an order rotated each round, each round a burst of steps per model:

  dense                 keras.layers.Dense(512) on 512 features, batch 256
  bayes_reparam         keras_elbo.BayesianDense(512), estimator="reparameterization"
  bayes_flipout         ... estimator="flipout"
  bayes_local           ... estimator="local_reparameterization"
  conv                  keras.layers.Conv2D(32, 3) on 32x32x32 inputs, batch 32
  bconv_reparam         keras_elbo.BayesianConv2D(32, 3), "reparameterization"
  bconv_flipout         ... "flipout"

and, where installed, the same sizes with

  proba_*               keras-proba's DenseReparameterization, DenseFlipout,
                        DenseLocalReparameterization, Conv2DReparameterization,
                        Conv2DFlipout (Keras 3, this backend; a Bayesian
                        kernel, a deterministic bias)
  tfp_*                 TFP's tfp.layers.DenseReparameterization,
                        DenseFlipout, DenseLocalReparameterization,
                        Convolution2DReparameterization, Convolution2DFlipout
                        on tf_keras (Keras 2; TensorFlow only)

Each dense row's ratio is to `dense` in the same round, each convolution's to
`conv`: the median over rounds with a 90% bootstrap interval.

    KERAS_BACKEND=jax python -m benchmarks.bayesian_cost
"""

import argparse
import importlib.util
import os
import platform
import time

BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
if BACKEND == "jax":  # one thread, set before JAX starts
    os.environ.setdefault(
        "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    )
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_elbo as ke  # noqa: E402
from benchmarks._ratios import one_thread, paired_ratio  # noqa: E402

DENSE_BATCH, FEATURES = 256, 512
CONV_BATCH, SIDE, CHANNELS, FILTERS = 32, 32, 32, 32


def keras3_model(layer, input_shape):
    model = keras.Sequential([keras.Input(input_shape), layer])
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    return model


def tf_keras_model(layer, input_shape):
    import tf_keras

    model = tf_keras.Sequential([tf_keras.layers.InputLayer(input_shape), layer])
    model.compile(optimizer=tf_keras.optimizers.SGD(1e-3), loss="mse")
    return model


DENSE_SHAPE, CONV_SHAPE = (FEATURES,), (SIDE, SIDE, CHANNELS)
SHAPES = {"dense": DENSE_SHAPE, "conv": CONV_SHAPE}
PROBA_LAYERS = {
    "proba_reparam": "DenseReparameterization",
    "proba_flipout": "DenseFlipout",
    "proba_local": "DenseLocalReparameterization",
    "proba_conv_reparam": "Conv2DReparameterization",
    "proba_conv_flipout": "Conv2DFlipout",
}
TFP_LAYERS = {
    "tfp_reparam": "DenseReparameterization",
    "tfp_flipout": "DenseFlipout",
    "tfp_local": "DenseLocalReparameterization",
    "tfp_conv_reparam": "Convolution2DReparameterization",
    "tfp_conv_flipout": "Convolution2DFlipout",
}


def _kind(name):
    return "conv" if "conv" in name else "dense"


def _peer(layer_class, kind):
    """A peer library's layer of the benchmark's sizes (its own defaults)."""
    return layer_class(FILTERS, 3) if kind == "conv" else layer_class(FEATURES)


def variants():
    """`{name: (build, kind)}`, kind `"dense"` or `"conv"`: what is timed."""
    out = {
        "dense": (lambda: keras3_model(keras.layers.Dense(FEATURES), DENSE_SHAPE), "dense"),
        "conv": (lambda: keras3_model(keras.layers.Conv2D(FILTERS, 3), CONV_SHAPE), "conv"),
    }
    for short, estimator in [
        ("reparam", "reparameterization"),
        ("flipout", "flipout"),
        ("local", "local_reparameterization"),
    ]:
        out[f"bayes_{short}"] = (
            lambda e=estimator: keras3_model(
                ke.BayesianDense(FEATURES, estimator=e, seed=0), DENSE_SHAPE
            ),
            "dense",
        )
        if short != "local":
            out[f"bconv_{short}"] = (
                lambda e=estimator: keras3_model(
                    ke.BayesianConv2D(FILTERS, 3, estimator=e, seed=0), CONV_SHAPE
                ),
                "conv",
            )
    if importlib.util.find_spec("keras_proba") is not None:
        import keras_proba.layers as kp

        for name, class_name in PROBA_LAYERS.items():
            layer_class, kind = getattr(kp, class_name), _kind(name)
            out[name] = (lambda c=layer_class, k=kind: keras3_model(_peer(c, k), SHAPES[k]), kind)
    if BACKEND == "tensorflow" and importlib.util.find_spec("tf_keras") is not None:
        import tensorflow_probability as tfp

        for name, class_name in TFP_LAYERS.items():
            layer_class, kind = getattr(tfp.layers, class_name), _kind(name)
            out[name] = (lambda c=layer_class, k=kind: tf_keras_model(_peer(c, k), SHAPES[k]), kind)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20, help="training steps per burst")
    args = parser.parse_args()
    one_thread(BACKEND)
    rng = np.random.default_rng(0)
    data = {
        "dense": (rng.normal(size=(DENSE_BATCH, FEATURES)).astype("float32"),) * 2,
        "conv": (
            rng.normal(size=(CONV_BATCH, *CONV_SHAPE)).astype("float32"),
            rng.normal(size=(CONV_BATCH, SIDE - 2, SIDE - 2, FILTERS)).astype("float32"),
        ),
    }
    models = {}
    for name, (build, kind) in variants().items():
        print(f"building {name}", flush=True)
        models[name] = (build(), kind)
        for _ in range(2):  # trace and compile outside the timing
            models[name][0].train_on_batch(*data[kind])
    names, times = list(models), {name: [] for name in models}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            model, kind = models[name]
            start = time.process_time()
            for _ in range(args.steps):
                model.train_on_batch(*data[kind])
            times[name].append((time.process_time() - start) / args.steps * 1e3)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    print(
        f"\n{platform.machine()}, {os.cpu_count()} CPUs, one thread; Keras {keras.__version__} "
        f"on {BACKEND}; {args.rounds} rounds of {args.steps} steps, process CPU time"
    )
    print(f"{'':20s} {'ms/step':>8s}  ratio to its deterministic layer [90% interval]")
    for name, (_, kind) in models.items():
        median = float(np.median(times[name]))
        if name == kind:
            print(f"{name:20s} {median:8.2f}  -")
            continue
        ratio, low, high = paired_ratio(times[name], times[kind])
        print(f"{name:20s} {median:8.2f}  {ratio:.2f} [{low:.2f}, {high:.2f}]")


if __name__ == "__main__":
    main()
