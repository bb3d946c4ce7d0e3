"""VAE against IWAE, one and two stochastic layers, on statically binarized
MNIST, at equal epochs.

Burda et al. (2016), "Importance weighted autoencoders", one stochastic layer:
784-200-200-50 with tanh, Bernoulli decoder, N(0, I) prior, diagonal Gaussian
posterior. Models identical but for the training objective of
`keras_elbo.ELBOModel`:

  vae      objective="elbo", num_samples=1
  iwae5    objective="iwae", num_samples=5
  iwae50   objective="iwae", num_samples=50

and their two-stochastic-layer architecture (`vae_2l`, `iwae5_2l`): generative
z2 (50) -> 50-50 tanh -> z1 (100) -> 100-100 tanh -> x, p(z1 | z2) a diagonal
Gaussian of the 50-unit features of z2 (`ConditionalGaussianPrior`). Their
inference network was bottom-up, q(z1 | x) then q(z2 | z1); here it is top-down,
as `keras_elbo` hierarchies are (the lower KL needs its prior's inputs when the
lower posterior draws): x -> 100-100 tanh (features d1) -> 50-50 tanh -> q(z2 |
x), then q(z1 | x, z2) from [d1, the features of z2 that p(z1 | z2) reads], as
in the Ladder VAE (Sønderby et al., 2016), with the weights of that
generative path shared.

Each trains with Adam (batch 100, learning rate 1e-3, no KL warm-up) for
`--epochs` from the same initial weights, then the test log-likelihood is
estimated with `--iw-samples` importance samples (the tables use 5000) on the
same test images for every model: each difference between two models is
reported with its paired standard error. Published (Burda et al., 2016, 3280
epochs), one layer, appendix D, static binarization: test NLL 88.71 / 87.63 /
87.10 (VAE / IWAE k = 5 / k = 50); two layers, main text Table 1 (its one-layer
rows, 86.76 / 85.54 / 84.78, are about 2 nats better than the static ones of
appendix D: dynamic binarization): 85.33 / 83.89 / 82.90. Figures as quoted by
the nbip/IWAE README, which reproduces them.

Runs on any Keras backend (JAX is fastest on a CPU):

    KERAS_BACKEND=jax python -m benchmarks.iwae --data ../shared/data/binarized_mnist.npz
    KERAS_BACKEND=jax python -m benchmarks.iwae --data ../shared/data/binarized_mnist.npz --quick
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

HIDDEN, LATENT, PIXELS = 200, 50, 784
# name: (objective, num_samples, stochastic layers)
MODELS = {
    "vae": ("elbo", 1, 1),
    "iwae5": ("iwae", 5, 1),
    "iwae50": ("iwae", 50, 1),
    "vae_2l": ("elbo", 1, 2),
    "iwae5_2l": ("iwae", 5, 2),
}
DEFAULT_MODELS = "vae,iwae5,iwae50"
# Test NLL and where it comes from (see the module's docstring).
PUBLISHED = {
    "vae": (88.71, "static"),
    "iwae5": (87.63, "static"),
    "iwae50": (87.10, "static"),
    "vae_2l": (85.33, "dynamic"),
    "iwae5_2l": (83.89, "dynamic"),
}


def dense(units, x):
    return keras.layers.Dense(units, activation="tanh")(x)


def build(objective, num_samples, layers=1, seed=0):
    """The network of Burda et al. with one or two stochastic layers; the same
    seed gives the same initial weights."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((PIXELS,))
    if layers == 1:
        h = dense(HIDDEN, dense(HIDDEN, x))
        z = ke.GaussianPosterior(LATENT, kl_regularizer=ke.KLRegularizer(seed=seed), seed=seed)(h)
        logits = keras.layers.Dense(PIXELS)(dense(HIDDEN, dense(HIDDEN, z)))
    else:
        d1 = dense(100, dense(100, x))
        z2 = ke.GaussianPosterior(50, kl_regularizer=ke.KLRegularizer(seed=seed), seed=seed)(
            dense(50, dense(50, d1))
        )
        g = dense(50, dense(50, z2))  # the features of z2 that p(z1 | z2) reads
        lower = ke.KLRegularizer(prior=ke.ConditionalGaussianPrior(100), seed=seed + 1)
        z1 = ke.GaussianPosterior(100, kl_regularizer=lower, seed=seed + 1)(
            keras.layers.Concatenate()([d1, g]), prior_inputs=g
        )
        logits = keras.layers.Dense(PIXELS)(dense(100, dense(100, z1)))
    model = ke.ELBOModel(x, logits, objective=objective, num_samples=num_samples)
    model.compile(keras.optimizers.Adam(1e-3), ke.BernoulliNLL(from_logits=True))
    return model


class EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = (time.perf_counter(), time.process_time())

    def on_epoch_end(self, epoch, logs=None):
        wall, cpu = time.perf_counter() - self.start[0], time.process_time() - self.start[1]
        self.times = [*getattr(self, "times", []), (wall, cpu)]
        print(
            f"  epoch {epoch + 1}: loss {logs['loss']:.2f}  {wall:.1f} s ({cpu:.1f} s CPU)",
            flush=True,
        )


def run(name, args, x_train, x_test):
    objective, k, layers = MODELS[name]
    model = build(objective, k, layers)
    timer = EpochTimer()
    print(
        f"{name}: objective={objective!r}, num_samples={k}, {layers} stochastic layer(s)",
        flush=True,
    )
    history = model.fit(
        x_train, x_train, batch_size=100, epochs=args.epochs, callbacks=[timer], verbose=0
    ).history
    start = time.perf_counter()
    log_px = ke.importance_weighted_log_likelihood(
        model, x_test, num_samples=args.iw_samples, batch_size=100, seed=2, verbose=0
    )
    times = np.array(timer.times)
    return log_px, {
        "train_loss": history["loss"][-1],
        "test_log_px": float(log_px.mean()),
        "test_log_px_stderr": float(log_px.std(ddof=1) / np.sqrt(len(log_px))),
        "epoch_seconds_median": float(np.median(times[:, 0])),
        "epoch_cpu_seconds_median": float(np.median(times[:, 1])),
        "eval_seconds": time.perf_counter() - start,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="binarized MNIST .npz")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iw-samples", type=int, default=5000)
    parser.add_argument("--test-subset", type=int, help="evaluate on N random test images")
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"of {','.join(MODELS)}")
    parser.add_argument("--quick", action="store_true", help="1 epoch, K=100, 500 images")
    parser.add_argument("--output", default="benchmarks/results")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.iw_samples, args.test_subset = 1, 100, args.test_subset or 500
    x_train, x_test = load_mnist(args.data, args.test_subset)
    print(
        f"{datetime.date.today()}  {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Keras {keras.__version__} on {keras.backend.backend()}\n"
        f"budget: {args.epochs} epochs, batch 100, Adam 1e-3; {len(x_test)} test "
        f"images, K = {args.iw_samples} importance samples",
        flush=True,
    )
    results, per_image = {}, {}
    for name in args.models.split(","):
        per_image[name], results[name] = run(name, args, x_train, x_test)
        r = results[name]
        print(
            f"{name:7s} test NLL {-r['test_log_px']:7.2f} (+/- {r['test_log_px_stderr']:.2f})"
            f"  epoch {r['epoch_seconds_median']:.1f} s "
            f"({r['epoch_cpu_seconds_median']:.1f} s CPU)  eval {r['eval_seconds']:.0f} s",
            flush=True,
        )
    print(
        f"\n| model | test NLL, ours (K = {args.iw_samples}) | epoch (s) "
        "| published NLL (3280 epochs; binarization) |"
    )
    print("|---|---|---|---|")
    for name, r in results.items():
        published, binarization = PUBLISHED[name]
        print(
            f"| {name} | {-r['test_log_px']:.2f} ± {r['test_log_px_stderr']:.2f} "
            f"| {r['epoch_seconds_median']:.1f} | {published:.2f} ({binarization}) |"
        )
    names = list(results)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    paired_differences(per_image, results, pairs)
    write_results(args, results, "iwae")


if __name__ == "__main__":
    main()
