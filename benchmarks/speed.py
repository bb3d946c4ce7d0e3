"""Training speed of a keras_elbo VAE against its floor and its alternatives.

The same MLP VAE (784-512-256-32-256-512-784, batch 128) on binarized MNIST:

  (a) keras_elbo, analytic KL          (b) keras_elbo, mc KL with 16 samples
  (c) the same network as a plain deterministic autoencoder in Keras 3: the floor
  (d) the same VAE with tfp.layers on tf_keras (IndependentNormal +
      KLDivergenceAddLoss + IndependentBernoulli), the Keras 2 way
  (e) the keras.io-style VAE: a hand-written train_step with the Gaussian KL
  (f) the same VAE as the shortest Keras 3 layer that does it: a Dense head,
      `keras.random.normal`, the closed-form KL through `add_loss`, and (c)'s
      loss (a floor for any VAE layer with that loss)
  (g) the plain autoencoder (c) with the posterior's code layer, Dense(64), of
      which it keeps half: what the wider head alone costs

Each variant trains one epoch at a time (or, with `--steps N`, N training steps
through the model's compiled train function, without `fit`'s per-call work),
the variants interleaved over `--rounds` rounds (in a rotated order each
round) so that machine noise hits all alike. Short bursts and many rounds give
the narrowest intervals: slow changes of the machine's speed cancel out.
Each goal's ratio, (a)/(c) <= 1.03, (b)/(c) <= 1.08, (a) no slower than (d)
and (e), is the median over rounds of the ratio of the two times measured in
the same round, with a 90% bootstrap interval over rounds: a goal is
"met" when the whole interval is below the bound, "MISSED" when it is above,
and "not resolved" when the machine's noise leaves the interval across it.
Then the cost of `mc` as num_samples grows (plot, against the plain
autoencoder in the same rounds, on epochs of 40 batches), and each variant's
memory: the resident set size of a fresh process, before the model is built
and at its peak while it trains one epoch (sampled every 2 ms).
`benchmarks/kl_cost.py` breaks the posterior layer's own cost into parts.

    python benchmarks/speed.py --data ../shared/data/binarized_mnist.npz
    python benchmarks/speed.py --quick   # synthetic data, small, a minute
    # the goals alone, in bursts of 10 steps on one thread (issue 17, point 19):
    python benchmarks/speed.py --data ../shared/data/binarized_mnist.npz \
        --threads 1 --clock cpu --variants abcdefg --goals-only --steps 10 --rounds 150
"""

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_elbo as ke  # noqa: E402

# Run as a script (`python benchmarks/...`): the repository root on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._ratios import paired_ratio  # noqa: E402
from keras_elbo import datasets  # noqa: E402

HIDDEN, LATENT, PIXELS = (512, 256), 32, 784


def load(path, quick):
    if path and not quick:
        return datasets.load_binarized_mnist(path)[0]
    rng = np.random.default_rng(0)
    return (rng.random((2560 if quick else 50000, PIXELS)) < 0.13).astype("float32")


def mlp(sizes, name):
    return keras.Sequential([keras.layers.Dense(n, activation="relu") for n in sizes], name=name)


def network(code):
    """The MLP of every Keras 3 variant, compiled with the same loss: the
    encoder, `code` (a callable from its features to the decoder's input),
    the decoder."""
    x = keras.Input((PIXELS,))
    z = code(mlp(HIDDEN, "encoder")(x))
    logits = keras.layers.Dense(PIXELS)(mlp(HIDDEN[::-1], "decoder")(z))
    model = keras.Model(x, logits)
    model.compile(optimizer="adam", loss=ke.BernoulliNLL(from_logits=True))
    return model


def keras_elbo_vae(mode, num_samples=1):
    reg = ke.KLRegularizer(mode=mode, num_samples=num_samples)
    return network(ke.GaussianPosterior(LATENT, kl_regularizer=reg))


def plain_autoencoder():
    return network(keras.layers.Dense(LATENT))


def wide_head_autoencoder():
    def code(features):
        return keras.ops.split(keras.layers.Dense(2 * LATENT)(features), 2, axis=-1)[0]

    return network(code)


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


class MinimalGaussianCode(keras.layers.Layer):
    """A VAE's code layer as a user would write it in Keras 3 without this
    library (no checks, no logged KL): variant (f)."""

    def __init__(self):
        super().__init__()
        self.params = keras.layers.Dense(2 * LATENT)
        self.seed = keras.random.SeedGenerator(0)

    def call(self, h):
        ops = keras.ops
        loc, raw = ops.split(self.params(h), 2, axis=-1)
        scale = ops.softplus(raw)
        kl = 0.5 * (ops.square(loc) + ops.square(scale) - 1.0) - ops.log(scale)
        self.add_loss(ops.mean(ops.sum(kl, axis=-1)))
        return loc + scale * keras.random.normal(ops.shape(loc), seed=self.seed)


def keras_layer_vae():
    return network(MinimalGaussianCode())


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
    "f_keras_layer_add_loss": keras_layer_vae,
    "g_autoencoder_wide_head": wide_head_autoencoder,
}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]  # set by --clock


def epoch_seconds(model, x, batch_size):
    start = clock()
    model.fit(x, x, batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
    return clock() - start


def step_timer(model, x, batch_size, steps):
    """A callable timing `steps` training steps of `model` (seconds): its
    compiled train function, one batch of `x` after another (`x` repeated),
    as `fit` calls it in an epoch, without `fit`'s own work per call (about
    70 ms of CPU time here: 5% of an epoch of 100 steps)."""
    data = tf.data.Dataset.from_tensor_slices((x, x))
    iterator = iter(data.batch(batch_size, drop_remainder=True).repeat().prefetch(2))
    model.make_train_function()  # tf_keras returns it, Keras 3 sets it only
    train_function = model.train_function

    def time_steps():
        start = clock()
        for _ in range(steps):
            train_function(iterator)
        return clock() - start

    time_steps()  # traced outside the timing
    return time_steps


def speed(x, rounds, batch_size, variants=tuple(VARIANTS), steps=0):
    """Per variant, one time per round: an epoch of `x` by `fit`, or with
    `steps`, that many training steps."""
    models = {name: VARIANTS[name]() for name in variants}
    for model in models.values():  # compile and warm up outside the timing
        model.fit(x[: 4 * batch_size], x[: 4 * batch_size], batch_size=batch_size, verbose=0)
    if steps:
        timers = {name: step_timer(model, x, batch_size, steps) for name, model in models.items()}
    else:
        timers = {
            name: (lambda model=model: epoch_seconds(model, x, batch_size))
            for name, model in models.items()
        }
    times = {name: [] for name in models}
    names = list(models)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timers[name]())
        if not steps or (r + 1) % 25 == 0 or r + 1 == rounds:
            print(
                f"round {r + 1}/{rounds}: "
                + "  ".join(f"{n[0]}={t[-1]:.3f}s" for n, t in times.items())
            )
    return {name: statistics.median(t) for name, t in times.items()}, times


def verdict(low, high, bound):
    if high <= bound:
        return "met"
    if low > bound:
        return f"MISSED by {100 * (low / bound - 1):.1f}% or more"
    return "not resolved: the interval straddles the bound (machine noise)"


def sample_sweep(x, batch_size, counts, rounds):
    """Time of `mc` with each num_samples over the plain autoencoder's, in the
    same round, each an epoch of `x` (a slice of the data: many short
    interleaved epochs give a tighter interval than a few long ones)."""
    models = {"floor": plain_autoencoder()}
    models.update({n: keras_elbo_vae("mc", n) for n in counts})
    for model in models.values():
        model.fit(x[: 4 * batch_size], x[: 4 * batch_size], batch_size=batch_size, verbose=0)
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(epoch_seconds(model, x, batch_size))
    result = {}
    for n in counts:
        ratio, low, high = result[n] = paired_ratio(times[n], times["floor"])
        print(f"  mc num_samples={n:<4d} {ratio:6.3f}  [{low:.3f}, {high:.3f}]")
    return result


def peak_memory(name, args):
    """Resident memory (MiB) of a fresh process training one epoch of `name`:
    before the model is built (TensorFlow and the data) and at its peak."""
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


def resident_mib():
    """The current resident set size of this process, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child_memory(name):
    args = parser().parse_args()
    x = load(args.data, args.quick)
    gc.collect()
    before = resident_mib()
    peak, done = [before], threading.Event()

    def sample():
        while not done.wait(0.002):
            peak[0] = max(peak[0], resident_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    epoch_seconds(VARIANTS[name](), x, args.batch_size)
    done.set()
    sampler.join()
    print(json.dumps({"peak_mib": max(peak[0], resident_mib()), "before_mib": before}))


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="binarized MNIST .npz (default: synthetic data)")
    p.add_argument("--quick", action="store_true", help="small synthetic data, few rounds")
    p.add_argument("--rounds", type=int, default=11, help="interleaved rounds (default 11)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--output", default="benchmarks/results", help="folder for JSON and plot")
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or the process's CPU time (steadier on a shared machine)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="TensorFlow's intra- and inter-op threads (default 0: TensorFlow's choice)",
    )
    p.add_argument(
        "--variants",
        default="abcde",
        help="letters of the variants to time (default abcde; the goals need a, b, c; "
        "f and g are the floors of the bursts of steps)",
    )
    p.add_argument(
        "--epoch-rows",
        type=int,
        default=0,
        help="train on the first N rows only (default: all): shorter epochs, more rounds",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=0,
        help="time N training steps per variant and round instead of an epoch by fit "
        "(default 0: epochs)",
    )
    p.add_argument(
        "--goals-only",
        action="store_true",
        help="time the variants only: no num_samples sweep, no memory",
    )
    return p


def main():
    global clock
    args = parser().parse_args()
    clock = CLOCKS[args.clock]
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    x = load(args.data, args.quick)
    if args.epoch_rows:
        x = x[: args.epoch_rows]
    rounds = 2 if args.quick else args.rounds
    variants = [name for name in VARIANTS if name[0] in args.variants]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}; {len(x)} examples, "
        f"batch {args.batch_size}, {rounds} interleaved rounds of "
        f"{f'{args.steps} steps' if args.steps else 'one epoch'} each; {args.clock} time, "
        f"{args.threads or 'default'} TensorFlow threads"
    )
    medians, times = speed(x, rounds, args.batch_size, variants, args.steps)
    unit = f"{args.steps} steps" if args.steps else "epoch"
    floor = "c_plain_autoencoder"
    print(
        f"\nmedian seconds per {unit}; time over the plain autoencoder (c)'s, the median "
        "of same-round ratios [90% bootstrap interval over rounds]:"
    )
    for name, t in medians.items():
        ratio = ""
        if floor in times and name != floor:
            ratio = "{:.3f} [{:.3f}, {:.3f}]".format(*paired_ratio(times[name], times[floor]))
        print(f"  {name:24s} {t:7.3f} s   {ratio}")
    goals = [
        ("(a)/(c) <= 1.03", "a_keras_elbo_analytic", "c_plain_autoencoder", 1.03),
        ("(b)/(c) <= 1.08", "b_keras_elbo_mc16", "c_plain_autoencoder", 1.08),
        ("(a)/(d) <= 1.00", "a_keras_elbo_analytic", "d_tfp_layers_tf_keras", 1.0),
        ("(a)/(e) <= 1.00", "a_keras_elbo_analytic", "e_keras_io_train_step", 1.0),
    ]
    print("\ngoals: median of same-round ratios [90% bootstrap interval over rounds]")
    results = {}
    for label, numerator, denominator, bound in goals:
        if numerator not in times or denominator not in times:
            continue
        ratio, low, high = paired_ratio(times[numerator], times[denominator])
        results[label] = {"ratio": ratio, "interval": [low, high], "bound": bound}
        print(f"  {label:16s} {ratio:.3f} [{low:.3f}, {high:.3f}]  {verdict(low, high, bound)}")
    print("other ratios:")
    for label, numerator, denominator in [
        (
            "(a)/(f): the library's layer over the shortest",
            "a_keras_elbo_analytic",
            "f_keras_layer_add_loss",
        ),
        ("(b)/(a): 15 more samples", "b_keras_elbo_mc16", "a_keras_elbo_analytic"),
    ]:
        if numerator in times and denominator in times:
            ratio, low, high = paired_ratio(times[numerator], times[denominator])
            results[label] = {"ratio": ratio, "interval": [low, high]}
            print(f"  {label:48s} {ratio:.3f} [{low:.3f}, {high:.3f}]")
    print(
        "  (a goal left unresolved is closer to its bound than this machine's noise; "
        "benchmarks/kl_cost.py times the posterior layer's parts per step, where the "
        "extra time is spent)"
    )
    if args.goals_only:
        write_json(args, {"medians": medians, "times": times, "goals": results})
        return
    counts = [1, 4, 16] if args.quick else [1, 2, 4, 8, 16, 32, 64, 128, 256]
    print("\nmc KL: epoch time over the plain autoencoder's, by num_samples")
    sweep = sample_sweep(
        x[: 40 * args.batch_size], args.batch_size, counts, rounds=2 if args.quick else 15
    )
    argv = list(sys.argv[1:])
    memory = {name: peak_memory(name, argv) for name in variants}
    print("\nresident memory of a fresh process training one epoch (MiB):")
    print(f"  {'':24s} {'before':>8s} {'peak':>8s} {'growth':>8s}")
    for name, m in memory.items():
        growth = m["peak_mib"] - m["before_mib"]
        print(f"  {name:24s} {m['before_mib']:8.0f} {m['peak_mib']:8.0f} {growth:8.0f}")
    write_json(
        args,
        {"medians": medians, "times": times, "goals": results, "sweep": sweep, "memory": memory},
    )
    plot_sweep(sweep, os.path.join(args.output, "mc_samples.png"))


def write_json(args, results):
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "speed.json")
    with open(path, "w") as f:
        machine = {"machine": platform.machine(), "cpus": os.cpu_count(), "args": vars(args)}
        json.dump({**machine, **results}, f, indent=1)
    print(f"wrote {path}")


def plot_sweep(sweep, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    counts = sorted(sweep)
    ratio = np.array([sweep[n][0] for n in counts])
    low = np.array([sweep[n][1] for n in counts])
    high = np.array([sweep[n][2] for n in counts])
    ax.errorbar(counts, ratio, yerr=[ratio - low, high - ratio], marker="o", capsize=3)
    ax.set(
        xscale="log",
        xlabel="mc num_samples",
        ylabel="epoch time / plain autoencoder",
        title="Cost of the Monte Carlo KL (median, 90% interval)",
    )
    ax.axhline(1.0, color="gray", lw=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
