"""Test log-likelihood on statically binarized MNIST, beside the published tables.

Four VAEs with the architecture of Burda et al. (2016, "Importance weighted
autoencoders", one stochastic layer: 784-200-200-50, tanh, Bernoulli decoder),
differing only in prior or posterior:

  normal    N(0, I) prior, diagonal Gaussian posterior
  mixture   a learned mixture of 10 Gaussians as the prior
  vamp      a VampPrior with 500 pseudo-inputs (Tomczak & Welling, 2018)
  iaf       N(0, I) prior, a posterior with 2 IAF steps (Kingma et al., 2016)

Each trains with Adam (batch 100, learning rate 1e-3, KL warm-up over the
first third of the epochs) for `--epochs`, then reports the test ELBO and the
importance-weighted estimate of log p(x) with `--iw-samples` samples (the
tables use 5000), printed next to the published figures and their budgets.

    python -m benchmarks.likelihood --data ../shared/data/binarized_mnist.npz
    python -m benchmarks.likelihood --data ../shared/data/binarized_mnist.npz --quick
"""

import argparse
import datetime
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_elbo as ke  # noqa: E402
from benchmarks._common import load_mnist, paired_differences, write_results  # noqa: E402
from keras_elbo.flows import FlowPosterior  # noqa: E402

HIDDEN, LATENT, PIXELS = 200, 50, 784

# Published test NLL (nats, lower is better) on statically binarized MNIST.
PUBLISHED = {
    "normal": (
        88.71,
        "VAE, 784-200-200-50 tanh, k=1; Burda et al. 2016, app. D (3280 epochs, batch 20)",
    ),
    "vamp": (
        85.57,
        "VampPrior K=500, z=40, 2x300 gated layers; Tomczak & Welling 2018, Table 1 "
        "(up to 2000 epochs, batch 100)",
    ),
    "iaf": (
        89.9,
        "diagonal-Gaussian baseline of the flows paper; Rezende & Mohamed 2015 (the IAF "
        "paper reports no static-MNIST MLP figure)",
    ),
}


def body(name):
    return keras.Sequential(
        [
            keras.Input((PIXELS,)),
            keras.layers.Dense(HIDDEN, activation="tanh"),
            keras.layers.Dense(HIDDEN, activation="tanh"),
        ],
        name=name,
    )


def build(kind, num_pseudo_inputs, seed=0):
    keras.utils.set_random_seed(seed)
    encoder = body("encoder")
    prior = {
        "normal": None,
        "iaf": None,
        "mixture": ke.MixturePrior(LATENT, 10, seed=seed),
        "vamp": ke.VampPrior(
            encoder, num_pseudo_inputs, (PIXELS,), activation="hard_sigmoid", seed=seed
        ),
    }[kind]
    regularizer = ke.KLRegularizer(prior=prior, seed=seed)
    if kind == "iaf":
        posterior = FlowPosterior(
            LATENT, num_flows=2, context=True, kl_regularizer=regularizer, seed=seed
        )
    else:
        posterior = ke.GaussianPosterior(LATENT, kl_regularizer=regularizer, seed=seed)
    x = keras.Input((PIXELS,))
    z = posterior(encoder(x))
    h = keras.layers.Dense(HIDDEN, activation="tanh")(z)
    h = keras.layers.Dense(HIDDEN, activation="tanh")(h)
    model = keras.Model(x, keras.layers.Dense(PIXELS)(h), name=kind)
    model.compile(keras.optimizers.Adam(1e-3), ke.BernoulliNLL(from_logits=True))
    return model


def run(kind, args, x_train, x_test):
    model = build(kind, 50 if args.quick else 500)
    warmup = ke.KLAnnealing(ke.LinearWarmup(max(1, args.epochs // 3)), unit="epoch")
    start = time.perf_counter()
    history = model.fit(
        x_train, x_train, batch_size=100, epochs=args.epochs, callbacks=[warmup], verbose=0
    ).history
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    elbo = ke.evaluate_elbo(model, x_test, num_samples=10, batch_size=500, seed=1, verbose=0)
    log_px = ke.importance_weighted_log_likelihood(
        model, x_test, num_samples=args.iw_samples, seed=2, verbose=args.verbose
    )
    return log_px, {
        "train_loss": history["loss"][-1],
        "test_elbo": float(elbo["elbo"].mean()),
        "test_kl": float(elbo["kl"].mean()),
        "test_log_px": float(log_px.mean()),
        "test_log_px_stderr": float(log_px.std(ddof=1) / np.sqrt(len(log_px))),
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - start,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="binarized MNIST .npz")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--iw-samples", type=int, default=5000)
    parser.add_argument("--test-subset", type=int, help="evaluate on the first N test images")
    parser.add_argument("--models", default="normal,mixture,vamp,iaf")
    parser.add_argument("--quick", action="store_true", help="2 epochs, K=100, 1000 images")
    parser.add_argument("--verbose", type=int, default=0)
    parser.add_argument("--output", default="benchmarks/results")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.iw_samples, args.test_subset = 2, 100, args.test_subset or 1000
    x_train, x_test = load_mnist(args.data, args.test_subset)
    print(
        f"{datetime.date.today()}  {platform.machine()}, {os.cpu_count()} CPUs, "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}\n"
        f"budget: {args.epochs} epochs, batch 100, Adam 1e-3, KL warm-up over "
        f"{max(1, args.epochs // 3)} epochs; {len(x_test)} test images, "
        f"K = {args.iw_samples} importance samples"
    )
    results, per_image = {}, {}
    for kind in args.models.split(","):
        per_image[kind], results[kind] = run(kind, args, x_train, x_test)
        r = results[kind]
        print(
            f"{kind:8s} test ELBO {r['test_elbo']:8.2f}  log p(x) {r['test_log_px']:8.2f} "
            f"(+/- {r['test_log_px_stderr']:.2f})  KL {r['test_kl']:5.2f}  "
            f"train {r['train_seconds']:6.0f} s  eval {r['eval_seconds']:6.0f} s",
            flush=True,
        )
    print("\n| model | test -ELBO | test NLL (ours) | published NLL | published setting |")
    print("|---|---|---|---|---|")
    for kind, r in results.items():
        published, setting = PUBLISHED.get(kind, (None, "no published figure for this setting"))
        cell = f"{published:.2f}" if published else "-"
        print(f"| {kind} | {-r['test_elbo']:.2f} | {-r['test_log_px']:.2f} | {cell} | {setting} |")
    kinds = list(results)
    paired_differences(per_image, results, [(kinds[0], kind) for kind in kinds[1:]])
    write_results(args, results, "likelihood")


if __name__ == "__main__":
    main()
