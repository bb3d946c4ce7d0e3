"""Reliability: mixed precision, XLA, several devices, old configs, backends, seeds."""

import functools
import json
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

import keras_elbo as ke
from tests import _helpers as h

pytestmark = pytest.mark.slow  # whole trainings, subprocesses (README: Tests)

PIXELS = 12
DATA = (np.random.default_rng(0).random((64, PIXELS)) < 0.3).astype("float32")


def every_layer_vae(seed=0):
    """A model with every public layer: diag and full posteriors, the mixture,
    normal and Vamp priors, a KL warm-up-able regularizer, both losses' kind."""
    keras.utils.set_random_seed(seed)
    body = keras.Sequential(
        [keras.Input((PIXELS,)), keras.layers.Dense(16, activation="relu")], name="body"
    )
    x = keras.Input((PIXELS,))
    h1 = body(x)
    z1 = ke.GaussianPosterior(
        3,
        kl_regularizer=ke.KLRegularizer(prior=ke.MixturePrior(3, 4, seed=seed), metric_name="kl1"),
        seed=seed,
    )(h1)
    z2 = ke.GaussianPosterior(
        2,
        covariance="full",
        kl_regularizer=ke.KLRegularizer(prior=ke.NormalPrior(2, scale=2.0), metric_name="kl2"),
        seed=seed + 1,
    )(h1)
    vamp = ke.VampPrior(body, 3, (PIXELS,), activation="hard_sigmoid", seed=seed)
    z3 = ke.GaussianPosterior(
        2, kl_regularizer=ke.KLRegularizer(prior=vamp, metric_name="kl3"), seed=seed + 2
    )(h1)
    z = keras.layers.Concatenate()([z1, z2, z3])
    logits = keras.layers.Dense(PIXELS)(keras.layers.Dense(16, activation="relu")(z))
    # Cast to float32 before the loss, as Keras recommends for mixed precision.
    logits = keras.layers.Activation("linear", dtype="float32")(logits)
    model = ke.ELBOModel(x, logits)
    model.compile(keras.optimizers.Adam(1e-2), ke.BernoulliNLL(from_logits=True))
    return model


@pytest.fixture(params=["mixed_float16", "mixed_bfloat16"])
def mixed_policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


class TestMixedPrecision:
    def test_every_layer_trains(self, mixed_policy):
        model = every_layer_vae()
        posterior = model.layers[2]
        assert posterior.compute_dtype == mixed_policy.split("_")[1]
        assert posterior.kl_regularizer.compute_dtype == "float32"
        history = model.fit(DATA, DATA, epochs=3, batch_size=16, verbose=0).history
        assert all(np.all(np.isfinite(v)) for v in history.values())
        assert history["loss"][-1] < history["loss"][0]

    def test_kl_beyond_float16_range_stays_finite_and_exact(self, mixed_policy):
        # loc = 400 in 4 dimensions: KL = 4 * 0.5 * 400**2 = 320000, far past
        # float16's largest value (65504): computed in float32 it is exact.
        layer = ke.GaussianPosterior(4, kl_regularizer=ke.KLRegularizer(mode="analytic"))
        layer.build((None, 3))
        kernel = np.zeros((3, 8), "float32")
        bias = np.concatenate([np.full(4, 400.0), np.full(4, np.log(np.expm1(1.0)))])
        layer.projection.set_weights([kernel, bias.astype("float32")])
        layer(np.zeros((2, 3), "float32"))
        expected = h.kl_diag_normal(np.full(4, 400.0), np.ones(4) + layer.min_scale)
        np.testing.assert_allclose(float(layer.losses[0]), expected, rtol=1e-4)


class TestXLA:
    def test_same_loss_with_and_without_jit_within_monte_carlo_noise(self):
        # TensorFlow's stateless samplers draw other (equally distributed)
        # numbers under XLA for the same seed, so the same weights give the
        # same loss in distribution: compare means of repeated evaluations.
        model = every_layer_vae(seed=3)
        model.fit(DATA, DATA, epochs=1, batch_size=16, verbose=0)
        weights = model.get_weights()
        results = {}
        for jit_compile in (False, True):
            clone = every_layer_vae(seed=3)
            clone.set_weights(weights)
            clone.compile(loss=ke.BernoulliNLL(from_logits=True), jit_compile=jit_compile)
            results[jit_compile] = np.array(
                [clone.evaluate(DATA, DATA, batch_size=64, verbose=0)[0] for _ in range(20)]
            )
        a, b = results[False], results[True]
        std_err = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
        assert abs(a.mean() - b.mean()) < 4 * std_err, (a.mean(), b.mean(), std_err)

    def test_every_layer_trains_under_jit(self):
        model = every_layer_vae(seed=3)
        model.compile(
            keras.optimizers.Adam(1e-2), ke.BernoulliNLL(from_logits=True), jit_compile=True
        )
        history = model.fit(DATA, DATA, epochs=3, batch_size=16, verbose=0).history
        assert all(np.all(np.isfinite(v)) for v in history.values())
        assert history["loss"][-1] < history["loss"][0]

    @pytest.mark.skipif(h.BACKEND != "tensorflow", reason="TensorFlow graphs and Asserts")
    def test_no_assert_is_made_for_xla_to_drop(self):
        # XLA drops an Assert with a warning ("Ignoring Assert operator"), so
        # none is made inside a function XLA compiles; the graph keeps them.
        import tensorflow as tf

        model = every_layer_vae(seed=3)
        loss = ke.BernoulliNLL(from_logits=True)

        def asserts(jit_compile):
            step = tf.function(lambda x: loss(x, model(x, training=True)), jit_compile=jit_compile)
            graph = step.get_concrete_function(tf.TensorSpec((None, PIXELS))).graph
            return [op.name for op in graph.get_operations() if op.type == "Assert"]

        assert len(asserts(jit_compile=False)) >= 4  # three posteriors, the targets
        assert asserts(jit_compile=True) == []


class TestReproducibility:
    def test_same_seeds_same_loss_sequence(self):
        runs = [
            every_layer_vae(seed=5).fit(DATA, DATA, epochs=2, batch_size=16, verbose=0).history
            for _ in range(2)
        ]
        assert runs[0] == runs[1]


class TestOldConfigs:
    def test_config_without_newer_arguments_loads_with_defaults(self, tmp_path):
        model = every_layer_vae()
        model.fit(DATA, DATA, epochs=1, batch_size=16, verbose=0)
        path = tmp_path / "model.keras"
        model.save(path)
        # Rewrite the archive as an older keras_elbo would have: without the
        # arguments added since the first release.
        newer = {"free_bits", "path_derivative", "metric_name", "inference"}

        def strip(node):
            if isinstance(node, dict):
                return {k: strip(v) for k, v in node.items() if k not in newer}
            if isinstance(node, list):
                return [strip(v) for v in node]
            return node

        old = tmp_path / "old.keras"
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(old, "w") as dst:
            for item in src.infolist():
                data = src.read(item.filename)
                if item.filename == "config.json":
                    config = json.loads(data)
                    assert "free_bits" in json.dumps(config)
                    data = json.dumps(strip(config)).encode()
                dst.writestr(item, data)
        loaded = keras.saving.load_model(old)
        regularizers = [
            layer.kl_regularizer for layer in loaded.layers if hasattr(layer, "kl_regularizer")
        ]
        assert [r.free_bits for r in regularizers] == [0.0, 0.0, 0.0]
        assert [r.metric_name for r in regularizers] == [None, None, None]
        for a, b in zip(model.weights, loaded.weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def run_python(code, **env):
    import os

    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env},
        timeout=300,
    )


# A VAE whose loss is deterministic, its three training steps' losses and KLs:
# the distributed tests compare them with a single device's.
DETERMINISTIC_VAE = """
def build(**objective):
    keras.utils.set_random_seed(0)
    x = keras.Input((8,))
    posterior = ke.GaussianPosterior(
        3, kl_regularizer=ke.KLRegularizer(prior=ke.MixturePrior(3, 4, seed=0)), min_scale=1e-7)
    model = ke.ELBOModel(
        x, keras.layers.Dense(8)(posterior(keras.layers.Dense(16)(x))), **objective)
    model.compile(keras.optimizers.SGD(0.1), ke.BernoulliNLL(from_logits=True))
    # A posterior scale of 1e-7 makes z = loc: the ELBO is then deterministic
    # (mc_entropy uses the exact entropy; z - loc is below the float32
    # resolution of loc), so the two runs' ELBO terms must agree exactly. The
    # importance-weighted bound is not: its log q(z) is of the noise drawn
    # (read back from the sample), -|eps|^2 / 2 up to a constant.
    kernel, bias = posterior.projection.get_weights()
    kernel[:, 3:] = 0.0
    bias[3:] = -30.0
    posterior.projection.set_weights([kernel, bias])
    return model

data = (np.random.default_rng(0).random((32, 8)) < 0.4).astype("float32")
def losses(model, keys=("loss", "kl"), sample_weight=None):
    logs = [model.train_on_batch(data, data, sample_weight=sample_weight, return_dict=True)
            for _ in range(3)]
    return [[float(step[key]) for key in keys] for step in logs]

"""


MIRRORED = (
    """
import json
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, keras_elbo as ke
"""
    + DETERMINISTIC_VAE
    + """
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
print("REPLICAS", strategy.num_replicas_in_sync)
keys = {"": ("loss", "kl", "reconstruction", "neg_elbo"),
        "_IWAE": ("loss", "kl", "reconstruction", "neg_elbo", "neg_iwae")}
for name, objective in [("", {}), ("_IWAE", {"objective": "iwae", "num_samples": 3})]:
    single = losses(build(**objective), keys[name])
    with strategy.scope():
        mirrored_model = build(**objective)
    print("SINGLE" + name, single)
    print("MIRRORED" + name, losses(mirrored_model, keys[name]))
# Weighted (each replica traces its step in a thread of its own).
weights = np.random.default_rng(1).choice([0.0, 1.0, 2.0], size=len(data)).astype("float32")
print("SINGLE_W", losses(build(), keys[""], weights))
with strategy.scope():
    mirrored_model = build()
print("MIRRORED_W", losses(mirrored_model, keys[""], weights))

# The importance-weighted bound of the first step at 16 noise states, on one
# device: its spread. (train_on_batch hands each replica the whole batch, and
# each replica draws its own noise.)
iwae = build(objective="iwae", num_samples=3)
posterior = next(layer for layer in iwae.layers if isinstance(layer, ke.GaussianPosterior))
spread = []
for state in range(16):
    posterior.seed_generator.state.assign(np.array([state, 0], "int64"))
    spread.append(float(iwae.test_on_batch(data, data, return_dict=True)["loss"]))
print("SPREAD_IWAE", json.dumps(spread))

# Each replica's noise, for the same rows (issue 20): the strategy mirrors the
# seed states, so without the replica's index folded in the replicas would
# draw the same. A posterior, and a Bayesian layer's two direct draws.
with strategy.scope():
    inputs = keras.Input((4,))
    noisy = keras.Model(inputs, [
        ke.GaussianPosterior(2, seed=3)(inputs),
        ke.BayesianDense(2, estimator="local_reparameterization", seed=4)(inputs),
        ke.BayesianDense(2, estimator="flipout", seed=5)(inputs)])
rows = tf.data.Dataset.from_tensors(np.ones((2 * 512, 4), "float32"))
draw = tf.function(lambda b: strategy.run(lambda b: noisy(b, training=True), args=(b,)))
for batch in strategy.experimental_distribute_dataset(rows):
    draws = [[r.numpy().tolist() for r in strategy.experimental_local_results(out)]
             for out in draw(batch)]
print("DRAWS", json.dumps(draws))
"""
)


@functools.cache
def mirrored_run():
    """The MIRRORED script's run, shared by the tests that read it."""
    return run_python(MIRRORED)


def mirrored_lines():
    """The lines the MIRRORED script printed, by their first word."""
    result = mirrored_run()
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)


class TestMirroredStrategy:
    def test_two_replicas_give_the_single_device_loss(self):
        lines = mirrored_lines()
        assert lines["REPLICAS"] == "2"
        # The KL neither counted twice nor divided by the replicas: per-step
        # losses, KL and the logged parts (and so the updates between steps)
        # agree to round-off; for the ELBO, and for the ELBO terms logged
        # beside the importance-weighted bound (whose gradient does not
        # depend on the noise here: the K samples are equal).
        single = np.asarray(json.loads(lines["SINGLE"]))
        np.testing.assert_allclose(json.loads(lines["MIRRORED"]), single, rtol=1e-5)
        # With sample weights (each example's KL weighed too).
        weighted = np.asarray(json.loads(lines["SINGLE_W"]))
        np.testing.assert_allclose(json.loads(lines["MIRRORED_W"]), weighted, rtol=1e-5)
        assert not np.allclose(weighted, single)
        single = np.asarray(json.loads(lines["SINGLE_IWAE"]))
        mirrored = np.asarray(json.loads(lines["MIRRORED_IWAE"]))
        np.testing.assert_allclose(mirrored[:, 1:4], single[:, 1:4], rtol=1e-5)
        np.testing.assert_array_equal(mirrored[:, 0], mirrored[:, 4])  # loss = neg_iwae
        # The bound itself is of the noise drawn: the mirrored step's is the
        # mean of the two replicas' (each the whole batch, its own noise), so
        # within a few standard errors of one device's mean over 16 draws.
        spread = np.asarray(json.loads(lines["SPREAD_IWAE"]))
        stderr = spread.std(ddof=1) * np.sqrt(1 / len(spread) + 1 / 2)
        assert abs(mirrored[0, 0] - spread.mean()) < 5 * stderr, (mirrored[0, 0], spread)

    def test_replicas_draw_their_own_noise(self):
        # The same 512 rows on each replica. Independent draws correlate
        # across replicas within a few 1/sqrt(512) = 0.044 of zero, per
        # output unit; the same noise on both would give 1.
        lines = mirrored_lines()
        for name, (first, second) in zip(
            ("posterior", "local", "flipout"), json.loads(lines["DRAWS"]), strict=True
        ):
            first, second = np.asarray(first), np.asarray(second)
            assert first.shape == second.shape == (512, 2), name
            for unit in range(2):
                r = np.corrcoef(first[:, unit], second[:, unit])[0, 1]
                assert abs(r) < 5 / np.sqrt(512), (name, unit, r)


class TestFloat64:
    """Issue 10, point 11: a float64 floatx trains, with the KL in float64."""

    @pytest.fixture
    def float64(self):
        keras.config.set_floatx("float64")
        yield
        keras.config.set_floatx("float32")

    def test_vae_trains_and_kl_is_float64_exact(self, float64):
        keras.utils.set_random_seed(0)
        x = keras.Input((PIXELS,))
        posterior = ke.GaussianPosterior(
            3, covariance="full", kl_regularizer=ke.KLRegularizer(mode="analytic"), seed=1
        )
        model = ke.ELBOModel(x, keras.layers.Dense(PIXELS)(posterior(x)))
        model.compile(keras.optimizers.Adam(1e-2), ke.BernoulliNLL(from_logits=True))
        history = model.fit(DATA, DATA, epochs=2, batch_size=16, verbose=0).history
        assert np.all(np.isfinite(history["loss"]))
        q = posterior.distribution(DATA.astype("float64"))
        assert q.dtype == "float64" and posterior.kl_regularizer.last_kl.dtype == "float64"
        posterior(DATA.astype("float64"))
        expected = h.kl_full_normal(h.numpy(q.mean()), h.numpy(q.scale_tril)).mean()
        # float64 throughout: agreement to ~1e-12, far beyond float32's 1e-7.
        np.testing.assert_allclose(float(posterior.losses[0]), expected, rtol=1e-10)


DATA_PARALLEL = (
    """
import json, os
flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = flags + " --xla_force_host_platform_device_count=2"
import jax, numpy as np, keras, keras_elbo as ke
"""
    + DETERMINISTIC_VAE
    + """
single = losses(build())
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
parallel = losses(build())
print("DEVICES", len(jax.devices()))
print("SINGLE", json.dumps(single))
print("PARALLEL", json.dumps(parallel))
"""
)


class TestJaxDataParallel:
    def test_two_devices_give_the_single_device_loss_and_kl(self):
        result = run_python(DATA_PARALLEL, KERAS_BACKEND="jax")
        assert result.returncode == 0, result.stderr[-3000:]
        lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
        assert lines["DEVICES"] == "2"
        single, parallel = json.loads(lines["SINGLE"]), json.loads(lines["PARALLEL"])
        # The global batch of 32 split over two devices: per-step loss and KL
        # (and so the updates between steps) agree to float32 round-off.
        np.testing.assert_allclose(parallel, single, rtol=1e-5)
