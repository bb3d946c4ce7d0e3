"""Where a VAE's extra time goes: the posterior layer's cost, part by part.

The speed benchmark times whole epochs, where the machine's noise is larger
than the few percent that separate the variants. This one times one training
step (forward and backward) of the encoder head alone, at the speed
benchmark's sizes (batch 128, 256 features in, 32 latent dimensions), for:

  dense32          keras.layers.Dense(32): the plain autoencoder's code layer
  posterior        GaussianPosterior with no KL: the head, softplus, one sample
  analytic         ... with KLRegularizer(mode="analytic")
  mc1, mc16        ... with mode="mc", 1 and 16 samples
  mc_entropy16     ... with mode="mc_entropy", 16 samples
  normals_x1/x16   drawing 128 x 32 (x 16) normals alone, with the
                   reparameterisation z = loc + scale * eps: the noise's cost
  library_mc16     the 16-sample Monte Carlo KL alone, with this library's
                   distributions (as the regularizer computes it)
  tfp_mc16         the same with TFP distributions
  plain_tf_mc16    the same in plain TensorFlow ops: TFP's own overhead

interleaved over rounds, each a burst of steps, timed in process CPU time
with one TensorFlow thread (steadier than wall time on a shared machine); it
prints the median time per step and the difference to `dense32`.

    python -m benchmarks.kl_cost
"""

import argparse
import os
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402

import keras_elbo as ke  # noqa: E402
from benchmarks._ratios import interleaved_ms  # noqa: E402
from keras_elbo import distributions as kd  # noqa: E402
from keras_elbo.divergence import kl_estimate, standard_normal_like  # noqa: E402

tfd = tfp.distributions

BATCH, FEATURES, LATENT = 128, 256, 32


def layer_step(layer, h):
    layer(h, training=True)  # build

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            out = layer(h, training=True)
            loss = tf.reduce_sum(out)
            if layer.losses:
                loss += tf.add_n(layer.losses)
        return tape.gradient(loss, layer.trainable_variables)

    return step


def normals_step(num_samples):
    loc = tf.Variable(tf.zeros((BATCH, LATENT)))
    raw = tf.Variable(tf.zeros((BATCH, LATENT)))
    # A seed that changes each step, as the layers' do: with a constant seed,
    # TensorFlow folds the whole draw into a constant and times nothing.
    seed = tf.Variable([1, 2], dtype=tf.int32)
    shape = (num_samples, BATCH, LATENT) if num_samples > 1 else (BATCH, LATENT)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            eps = tf.random.stateless_normal(shape, seed=seed.assign_add([0, 1]))
            loss = tf.reduce_sum(loc + tf.nn.softplus(raw) * eps)
        return tape.gradient(loss, [loc, raw])

    return step


def mc_kl_step(num_samples, written_in):
    """The Monte Carlo KL of a diagonal Gaussian against N(0, I) alone, with
    TFP distributions (as the library computes it) or in plain TensorFlow."""
    loc = tf.Variable(tf.zeros((BATCH, LATENT)))
    raw = tf.Variable(tf.zeros((BATCH, LATENT)))
    seed = tf.Variable([1, 2], dtype=tf.int32)
    seed_generator = keras.random.SeedGenerator(1)
    prior = tfd.MultivariateNormalDiag(tf.zeros(LATENT), tf.ones(LATENT))
    half_log_2pi = 0.5 * np.log(2 * np.pi)

    def kl():
        scale = tf.nn.softplus(raw) + 1e-4
        step_seed = seed.assign_add([0, 1])
        if written_in == "tfp":
            q = tfd.MultivariateNormalDiag(loc, scale)
            z = q.sample(num_samples, seed=step_seed)
            return tf.reduce_mean(q.log_prob(z) - prior.log_prob(z), axis=0)
        if written_in == "keras_elbo":
            q = kd.MultivariateNormalDiag(loc, scale)
            z = q.sample(num_samples, seed=seed_generator)
            return kl_estimate(q, standard_normal_like(q), "mc", z)
        eps = tf.random.stateless_normal((num_samples, BATCH, LATENT), seed=step_seed)
        z = loc + scale * eps
        log_q = tf.reduce_sum(-0.5 * eps**2 - tf.math.log(scale) - half_log_2pi, axis=-1)
        log_p = tf.reduce_sum(-0.5 * z**2 - half_log_2pi, axis=-1)
        return tf.reduce_mean(log_q - log_p, axis=0)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(kl())
        return tape.gradient(loss, [loc, raw])

    return step


def posterior(mode=None, num_samples=1):
    regularizer = ke.KLRegularizer(mode=mode, num_samples=num_samples) if mode else None
    return ke.GaussianPosterior(LATENT, kl_regularizer=regularizer, seed=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=300, help="steps per burst")
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow threads (0: its choice)")
    args = parser.parse_args()
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    h = tf.constant(np.random.default_rng(0).normal(size=(BATCH, FEATURES)), tf.float32)
    steps = {
        "dense32": layer_step(keras.layers.Dense(LATENT), h),
        "posterior": layer_step(posterior(), h),
        "analytic": layer_step(posterior("analytic"), h),
        "mc1": layer_step(posterior("mc", 1), h),
        "mc16": layer_step(posterior("mc", 16), h),
        "mc_entropy16": layer_step(posterior("mc_entropy", 16), h),
        "normals_x1": normals_step(1),
        "normals_x16": normals_step(16),
        "library_mc16": mc_kl_step(16, "keras_elbo"),
        "tfp_mc16": mc_kl_step(16, "tfp"),
        "plain_tf_mc16": mc_kl_step(16, "plain"),
    }
    times = interleaved_ms(steps, args.rounds, args.steps)  # traced outside the timing
    base = statistics.median(times["dense32"])
    print(
        f"{os.cpu_count()} CPUs, TensorFlow {tf.__version__}, {args.threads or 'default'} "
        f"threads; batch {BATCH}, {FEATURES} -> {LATENT}; median of {args.rounds} rounds of "
        f"{args.steps} steps, process CPU time"
    )
    print(f"{'':14s} {'ms/step':>8s} {'- dense32':>10s}")
    for name, t in times.items():
        median = statistics.median(t)
        print(f"{name:14s} {median:8.3f} {median - base:+10.3f}")


if __name__ == "__main__":
    main()
