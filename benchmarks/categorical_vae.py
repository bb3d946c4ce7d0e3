"""The categorical VAE of Jang et al. (2017) with each gradient estimator, on
statically binarized MNIST, at equal epochs.

The architecture of the authors' reference notebook
(github.com/ericjang/gumbel-softmax, `gumbel_softmax_vae_v2.ipynb`):
784-512-256 ReLU, 20 categorical variables of 10 classes, 256-512-784 ReLU,
a Bernoulli decoder, the uniform prior, Adam with learning rate 3e-4, batches
of 100, initial temperature 1. The models are identical but for the
estimator of `keras_elbo.CategoricalPosterior`:

  straight_through   one-hot samples, the softmax's gradient
  gumbel_softmax     relaxed samples at an annealed temperature (the decoder
                     reads points of the simplex)
  gumbel_hard        their argmax (one-hot), the relaxation's gradient

The temperature of the two Gumbel-softmax models falls as Jang et al.'s
schedule, `max(0.5, exp(-rate * step))`, through `TemperatureAnnealing`. The
KL term is the closed form between the categoricals and the uniform prior
(as the notebook's `kl_type='categorical'`).

Reported per model: the test -ELBO (`evaluate_elbo`, `--elbo-samples` draws of
the code per image) with its standard error over images, and, for the two
models whose codes are one-hot, the importance-weighted -log p(x)
(`--iw-samples`; the soft model's relaxed codes have no probability under
q). The soft model's -ELBO is its relaxed training objective: it bounds no
discrete model's likelihood, so it is not comparable with the other two.
Differences between models are paired over the same test images.

Differences from the paper: static binarization (the notebook binarizes the
grey-level images afresh at each step, dynamically), and budgets: the
notebook trains 50,000 steps of 100 (about 91 epochs of its 55,000 images).

    python -m benchmarks.categorical_vae --data ../shared/data/binarized_mnist.npz
    python -m benchmarks.categorical_vae --data ../shared/data/binarized_mnist.npz --quick
"""

import argparse
import datetime
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_elbo as ke  # noqa: E402
from benchmarks._common import load_mnist, paired_differences, write_results  # noqa: E402

PIXELS, NUM_VARIABLES, NUM_CLASSES = 784, 20, 10
# name: (estimator, hard)
MODELS = {
    "straight_through": ("straight_through", False),
    "gumbel_softmax": ("gumbel_softmax", False),
    "gumbel_hard": ("gumbel_softmax", True),
}


def build(estimator, hard, seed=0):
    """Jang et al.'s network; the same seed gives the same initial weights."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((PIXELS,))
    h = keras.layers.Dense(256, activation="relu")(keras.layers.Dense(512, activation="relu")(x))
    codes = ke.CategoricalPosterior(
        NUM_VARIABLES,
        NUM_CLASSES,
        estimator=estimator,
        hard=hard,
        flatten=True,
        kl_regularizer=ke.KLRegularizer(),
        seed=seed,
        name="codes",
    )(h)
    h = keras.layers.Dense(512, activation="relu")(
        keras.layers.Dense(256, activation="relu")(codes)
    )
    model = ke.ELBOModel(x, keras.layers.Dense(PIXELS)(h))
    model.compile(keras.optimizers.Adam(3e-4), ke.BernoulliNLL(from_logits=True))
    return model


def run(name, args, x_train, x_test):
    estimator, hard = MODELS[name]
    model = build(estimator, hard)
    callbacks = []
    if estimator == "gumbel_softmax":
        schedule = ke.ExponentialDecay(rate=args.anneal_rate, start=1.0, floor=0.5)
        callbacks.append(ke.TemperatureAnnealing(schedule, unit="step"))
    print(f"{name}: estimator={estimator!r}, hard={hard}", flush=True)
    start = time.perf_counter(), time.process_time()
    history = model.fit(
        x_train, x_train, batch_size=100, epochs=args.epochs, callbacks=callbacks, verbose=0
    ).history
    wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    elbo = ke.evaluate_elbo(
        model, x_test, num_samples=args.elbo_samples, batch_size=100, seed=1, verbose=0
    )["elbo"]
    result = {
        "train_loss": history["loss"][-1],
        "test_neg_elbo": float(-elbo.mean()),
        "test_neg_elbo_stderr": float(elbo.std(ddof=1) / np.sqrt(len(elbo))),
        "train_seconds": wall,
        "train_cpu_seconds": cpu,
    }
    if "temperature" in history:
        result["final_temperature"] = history["temperature"][-1]
    log_px = None
    if args.iw_samples and (estimator == "straight_through" or hard):
        log_px = ke.importance_weighted_log_likelihood(
            model, x_test, num_samples=args.iw_samples, batch_size=100, seed=2, verbose=0
        )
        result["test_nll"] = float(-log_px.mean())
        result["test_nll_stderr"] = float(log_px.std(ddof=1) / np.sqrt(len(log_px)))
    return elbo, log_px, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="binarized MNIST .npz")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--anneal-rate", type=float, default=1e-4, help="per step")
    parser.add_argument("--elbo-samples", type=int, default=10)
    parser.add_argument("--iw-samples", type=int, default=1000, help="0: no log p(x)")
    parser.add_argument("--test-subset", type=int, help="evaluate on N random test images")
    parser.add_argument("--models", default=",".join(MODELS), help=f"of {','.join(MODELS)}")
    parser.add_argument("--quick", action="store_true", help="1 epoch, K=50, 500 images")
    parser.add_argument("--output", default="benchmarks/results")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.iw_samples, args.test_subset = 1, 50, args.test_subset or 500
    x_train, x_test = load_mnist(args.data, args.test_subset)
    print(
        f"{datetime.date.today()}  {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Keras {keras.__version__} on {keras.backend.backend()}\n"
        f"budget: {args.epochs} epochs of {len(x_train)} images, batch 100, Adam 3e-4; "
        f"{len(x_test)} test images, {args.elbo_samples} ELBO samples, "
        f"K = {args.iw_samples} importance samples",
        flush=True,
    )
    results, elbos, log_pxs = {}, {}, {}
    for name in args.models.split(","):
        elbos[name], log_px, results[name] = run(name, args, x_train, x_test)
        if log_px is not None:
            log_pxs[name] = log_px
        r = results[name]
        print(
            f"{name:16s} test -ELBO {r['test_neg_elbo']:7.2f} (+/- {r['test_neg_elbo_stderr']:.2f})"
            f"  train {r['train_seconds']:.0f} s ({r['train_cpu_seconds']:.0f} s CPU)",
            flush=True,
        )
    print(
        f"\n| estimator | test -ELBO ({args.epochs} epochs) "
        f"| test -log p(x), K = {args.iw_samples} |"
    )
    print("|---|---|---|")
    for name, r in results.items():
        nll = f"{r['test_nll']:.2f} ± {r['test_nll_stderr']:.2f}" if "test_nll" in r else "-"
        print(f"| {name} | {r['test_neg_elbo']:.2f} ± {r['test_neg_elbo_stderr']:.2f} | {nll} |")
    names = list(log_pxs)
    paired_differences(
        log_pxs, results, [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    )
    write_results(args, results, "categorical_vae")


if __name__ == "__main__":
    main()
