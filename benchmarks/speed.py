"""Training speed of a keras_elbo VAE against its floor and its alternatives.

The same MLP VAE (784-512-256-32-256-512-784, batch 128) on binarized MNIST:

  (a) keras_elbo, analytic KL          (b) keras_elbo, mc KL with 16 samples
  (c) the same network as a plain deterministic autoencoder in Keras 3: the floor
  (d) the same VAE with tfp.layers on tf_keras (IndependentNormal +
      KLDivergenceAddLoss + IndependentBernoulli), the Keras 2 way
  (e) the keras.io-style VAE: a hand-written train_step with the Gaussian KL

Each variant trains one epoch at a time, the variants interleaved over
`--rounds` rounds so that machine noise hits all alike; the median epoch time of
each is reported, with the ratios of the goals (a)/(c) <= 1.03, (b)/(c) <= 1.08,
(a) no slower than (d) and (e). Then the cost of `mc` as num_samples grows
(plot), and each variant's peak memory (resident set size of a fresh process).

    python benchmarks/speed.py --data ../shared/data/binarized_mnist.npz
    python benchmarks/speed.py --quick   # synthetic data, small, a minute
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_elbo as ke  # noqa: E402
from keras_elbo import datasets  # noqa: E402

HIDDEN, LATENT, PIXELS = (512, 256), 32, 784


def load(path, quick):
    if path and not quick:
        return datasets.load_binarized_mnist(path)[0]
    rng = np.random.default_rng(0)
    return (rng.random((2560 if quick else 50000, PIXELS)) < 0.13).astype("float32")


def mlp(sizes, name):
    return keras.Sequential([keras.layers.Dense(n, activation="relu") for n in sizes], name=name)


def keras_elbo_vae(mode, num_samples=1):
    x = keras.Input((PIXELS,))
    reg = ke.KLRegularizer(mode=mode, num_samples=num_samples)
    z = ke.GaussianPosterior(LATENT, kl_regularizer=reg)(mlp(HIDDEN, "encoder")(x))
    logits = keras.layers.Dense(PIXELS)(mlp(HIDDEN[::-1], "decoder")(z))
    model = keras.Model(x, logits)
    model.compile(optimizer="adam", loss=ke.BernoulliNLL(from_logits=True))
    return model


def plain_autoencoder():
    x = keras.Input((PIXELS,))
    code = keras.layers.Dense(LATENT)(mlp(HIDDEN, "encoder")(x))
    logits = keras.layers.Dense(PIXELS)(mlp(HIDDEN[::-1], "decoder")(code))
    model = keras.Model(x, logits)
    model.compile(optimizer="adam", loss=ke.BernoulliNLL(from_logits=True))
    return model


def tfp_layers_vae():
    """The Keras 2 way, on tf_keras: a benchmark-only comparison."""
    import tensorflow_probability as tfp
    import tf_keras

    tfpl, tfd = tfp.layers, tfp.distributions
    prior = tfd.Independent(tfd.Normal(tf.zeros(LATENT), 1.0), 1)
    layers = [tf_keras.layers.InputLayer((PIXELS,))]
    layers += [tf_keras.layers.Dense(n, activation="relu") for n in HIDDEN]
    layers += [
        tf_keras.layers.Dense(tfpl.IndependentNormal.params_size(LATENT)),
        tfpl.IndependentNormal(LATENT),
        tfpl.KLDivergenceAddLoss(prior, weight=1.0),
    ]
    layers += [tf_keras.layers.Dense(n, activation="relu") for n in HIDDEN[::-1]]
    layers += [tf_keras.layers.Dense(PIXELS), tfpl.IndependentBernoulli(PIXELS)]
    model = tf_keras.Sequential(layers)
    model.compile(optimizer="adam", loss=lambda x, rv_x: -rv_x.log_prob(x))
    return model


class KerasIoVAE(keras.Model):
    """The keras.io VAE example's pattern: a custom train_step, KL by hand."""

    def __init__(self):
        super().__init__()
        self.encoder = mlp(HIDDEN, "encoder")
        self.params = keras.layers.Dense(2 * LATENT)
        self.decoder = keras.Sequential([mlp(HIDDEN[::-1], "decoder"), keras.layers.Dense(PIXELS)])
        self.seed = keras.random.SeedGenerator(0)
        self.loss_tracker = keras.metrics.Mean(name="loss")

    def call(self, x):
        loc, log_var = tf.split(self.params(self.encoder(x)), 2, axis=-1)
        z = loc + tf.exp(0.5 * log_var) * keras.random.normal(tf.shape(loc), seed=self.seed)
        return self.decoder(z), loc, log_var

    def train_step(self, data):
        x = data[0] if isinstance(data, tuple) else data
        with tf.GradientTape() as tape:
            logits, loc, log_var = self(x)
            recon = tf.reduce_sum(
                tf.nn.sigmoid_cross_entropy_with_logits(labels=x, logits=logits), axis=1
            )
            kl = -0.5 * tf.reduce_sum(1 + log_var - loc**2 - tf.exp(log_var), axis=1)
            loss = tf.reduce_mean(recon + kl)
        grads = tape.gradient(loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights, strict=True))
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    @property
    def metrics(self):
        return [self.loss_tracker]


def keras_io_vae():
    model = KerasIoVAE()
    model.compile(optimizer="adam")
    return model


VARIANTS = {
    "a_keras_elbo_analytic": lambda: keras_elbo_vae("analytic"),
    "b_keras_elbo_mc16": lambda: keras_elbo_vae("mc", 16),
    "c_plain_autoencoder": plain_autoencoder,
    "d_tfp_layers_tf_keras": tfp_layers_vae,
    "e_keras_io_train_step": keras_io_vae,
}


def epoch_seconds(model, x, batch_size):
    start = time.perf_counter()
    model.fit(x, x, batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
    return time.perf_counter() - start


def speed(x, rounds, batch_size):
    models = {name: make() for name, make in VARIANTS.items()}
    for model in models.values():  # compile and warm up outside the timing
        model.fit(x[: 4 * batch_size], x[: 4 * batch_size], batch_size=batch_size, verbose=0)
    times = {name: [] for name in models}
    for r in range(rounds):
        for name, model in models.items():
            times[name].append(epoch_seconds(model, x, batch_size))
        print(
            f"round {r + 1}/{rounds}: "
            + "  ".join(f"{n[0]}={t[-1]:.2f}s" for n, t in times.items())
        )
    return {name: statistics.median(t) for name, t in times.items()}, times


def sample_sweep(x, batch_size, counts):
    result = {}
    for n in counts:
        model = keras_elbo_vae("mc", n)
        model.fit(x[: 4 * batch_size], x[: 4 * batch_size], batch_size=batch_size, verbose=0)
        result[n] = statistics.median(epoch_seconds(model, x, batch_size) for _ in range(2))
        print(f"mc num_samples={n}: {result[n]:.2f} s/epoch")
    return result


def peak_memory(name, args):
    """Peak resident memory (MiB) of a fresh process training one epoch, and
    its growth over the process's peak before the model was built (TensorFlow
    and the data alone take about a GiB)."""
    code = (
        f"import sys; sys.argv = ['speed'] + {args!r}; import benchmarks.speed as s; "
        f"s.child_memory({name!r})"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def child_memory(name):
    args = parser().parse_args()
    x = load(args.data, args.quick)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    epoch_seconds(VARIANTS[name](), x, args.batch_size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": peak / 1024, "before_mib": before / 1024}))


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="binarized MNIST .npz (default: synthetic data)")
    p.add_argument("--quick", action="store_true", help="small synthetic data, few rounds")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--output", default="benchmarks/results", help="folder for JSON and plot")
    return p


def main():
    args = parser().parse_args()
    x = load(args.data, args.quick)
    rounds = 2 if args.quick else args.rounds
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}; {len(x)} examples, "
        f"batch {args.batch_size}, {rounds} interleaved rounds"
    )
    medians, times = speed(x, rounds, args.batch_size)
    floor = medians["c_plain_autoencoder"]
    print("\nmedian seconds per epoch, and ratio to the plain autoencoder (c):")
    for name, t in medians.items():
        print(f"  {name:24s} {t:7.2f} s   {t / floor:5.3f}")
    goals = [
        ("(a)/(c) <= 1.03", medians["a_keras_elbo_analytic"] / floor, 1.03),
        ("(b)/(c) <= 1.08", medians["b_keras_elbo_mc16"] / floor, 1.08),
        (
            "(a)/(d) <= 1.00",
            medians["a_keras_elbo_analytic"] / medians["d_tfp_layers_tf_keras"],
            1.0,
        ),
        (
            "(a)/(e) <= 1.00",
            medians["a_keras_elbo_analytic"] / medians["e_keras_io_train_step"],
            1.0,
        ),
    ]
    print("\ngoals:")
    for label, ratio, bound in goals:
        verdict = "met" if ratio <= bound else f"MISSED by {100 * (ratio / bound - 1):.1f}%"
        print(f"  {label:16s} measured {ratio:.3f}  {verdict}")
    counts = [1, 4, 16] if args.quick else [1, 2, 4, 8, 16, 32, 64, 128, 256]
    sweep = sample_sweep(x, args.batch_size, counts)
    argv = [a for a in sys.argv[1:]]
    memory = {name: peak_memory(name, argv) for name in VARIANTS}
    print("\npeak resident memory of a fresh process training one epoch (MiB):")
    print(f"  {'':24s} {'peak':>8s} {'growth':>8s}")
    for name, m in memory.items():
        print(f"  {name:24s} {m['peak_mib']:8.0f} {m['peak_mib'] - m['before_mib']:8.0f}")
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "speed.json"), "w") as f:
        json.dump(
            {"medians": medians, "times": times, "sweep": sweep, "memory": memory}, f, indent=1
        )
    plot_sweep(sweep, floor, os.path.join(args.output, "mc_samples.png"))


def plot_sweep(sweep, floor, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    counts = sorted(sweep)
    ax.plot(counts, [sweep[n] / floor for n in counts], marker="o")
    ax.set(
        xscale="log",
        xlabel="mc num_samples",
        ylabel="epoch time / plain autoencoder",
        title="Cost of the Monte Carlo KL",
    )
    ax.axhline(1.0, color="gray", lw=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
