"""Whole models: fit, logged metrics, the ELBO's parts, save and load."""

import keras
import numpy as np
import pytest

import keras_elbo as ke
from keras_elbo import distributions as kd
from tests import _helpers as h

PIXELS, LATENT, DATA = h.TOY_PIXELS, 3, h.TOY_DATA


def make_vae(prior=None, covariance="diag", mode="auto", num_samples=1, inference="sample"):
    keras.utils.set_random_seed(0)
    x = keras.Input((PIXELS,))
    hidden = keras.layers.Dense(32, activation="relu")(x)
    reg = ke.KLRegularizer(prior=prior, mode=mode, num_samples=num_samples, seed=1)
    z = ke.GaussianPosterior(
        LATENT, covariance=covariance, kl_regularizer=reg, inference=inference, seed=2
    )(hidden)
    logits = keras.layers.Dense(PIXELS)(keras.layers.Dense(32, activation="relu")(z))
    return ke.ELBOModel(x, logits)


def compile_vae(model, jit_compile="auto", loss=None):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=loss or ke.BernoulliNLL(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


class TestFit:
    @pytest.mark.parametrize("jit_compile", h.JIT_MODES, ids=lambda jit: f"jit_compile={jit}")
    def test_loss_falls_and_kl_is_logged_once(self, jit_compile):
        model = compile_vae(make_vae(prior=ke.MixturePrior(LATENT, 4, seed=0)), jit_compile)
        h.assert_vae_trains_and_logs_kl_once(model)

    def test_evaluate_reports_each_metric_once(self):
        model = compile_vae(make_vae())
        results = model.evaluate(DATA, DATA, verbose=0)
        assert model.metrics_names == ["loss", "kl", "reconstruction", "neg_elbo"]
        assert len(results) == 4

    def test_mixture_prior_weights_train(self):
        prior = ke.MixturePrior(LATENT, 4, seed=0)
        model = compile_vae(make_vae(prior=prior, num_samples=4))
        before = [w.numpy().copy() for w in prior.weights]
        model.fit(DATA, DATA, epochs=1, batch_size=32, verbose=0)
        assert all(not np.allclose(b, w) for b, w in zip(before, prior.weights, strict=True))

    def test_two_regularizers_log_two_metrics(self):
        x = keras.Input((PIXELS,))
        z1 = ke.GaussianPosterior(2, kl_regularizer=ke.KLRegularizer(metric_name="kl_a"))(x)
        z2 = ke.GaussianPosterior(2, kl_regularizer=ke.KLRegularizer(metric_name="kl_b"))(z1)
        model = compile_vae(ke.ELBOModel(x, keras.layers.Dense(PIXELS)(z2)))
        history = model.fit(DATA, DATA, epochs=1, verbose=0).history
        assert sorted(history) == ["kl_a", "kl_b", "loss", "neg_elbo", "reconstruction"]


class TestELBO:
    def test_logged_kl_equals_numpy_closed_form(self):
        model = compile_vae(make_vae(mode="analytic"))
        # 128 rows in batches of 48: a short last batch of 32 must weigh less.
        logged = model.evaluate(DATA, DATA, batch_size=48, return_dict=True, verbose=0)["kl"]
        posterior = model.layers[2]
        q = posterior.distribution(model.layers[1](DATA))
        expected = h.kl_diag_normal(q.mean(), q.stddev()).mean()
        np.testing.assert_allclose(logged, expected, rtol=1e-5)

    def test_loss_is_reconstruction_plus_weighted_kl(self):
        # Same seeds -> same samples: the loss difference between two weights
        # is exactly the difference of weight times the logged KL.
        model = compile_vae(make_vae(prior=ke.MixturePrior(LATENT, 4, seed=0), mode="mc"))
        regularizer = model.layers[2].kl_regularizer
        seed_states = [
            g.state.numpy() for g in (model.layers[2].seed_generator, regularizer.seed_generator)
        ]

        def evaluate(weight):
            regularizer.kl_weight.assign(weight)
            for g, s in zip(
                (model.layers[2].seed_generator, regularizer.seed_generator),
                seed_states,
                strict=True,
            ):
                g.state.assign(s)
            return model.evaluate(DATA, DATA, batch_size=128, return_dict=True, verbose=0)

        at_one, at_three = evaluate(1.0), evaluate(3.0)
        np.testing.assert_allclose(at_one["kl"], at_three["kl"], rtol=1e-6)
        np.testing.assert_allclose(at_three["loss"] - at_one["loss"], 2.0 * at_one["kl"], rtol=1e-4)


MODELS = {
    "diag-mixture-bernoulli": lambda: compile_vae(
        make_vae(prior=ke.MixturePrior(LATENT, 4, seed=0), num_samples=2, inference="mean")
    ),
    "full-normal-gaussian": lambda: compile_vae(
        make_vae(prior=ke.NormalPrior(LATENT, scale=2.0), covariance="full", inference="mean"),
        loss=ke.GaussianNLL(scale=0.5),
    ),
    "diag-default-learned-scale": lambda: compile_vae(
        _learned_scale_vae(), loss=ke.GaussianNLL(scale=None)
    ),
}


def _learned_scale_vae():
    x = keras.Input((PIXELS,))
    z = ke.GaussianPosterior(LATENT, kl_regularizer=ke.KLRegularizer(), inference="mean")(x)
    return keras.Model(x, keras.layers.Dense(2 * PIXELS)(z))


@pytest.mark.slow
class TestSaveLoad:
    @pytest.mark.parametrize("use_custom_objects", [False, True], ids=["registered", "custom"])
    @pytest.mark.parametrize("name", sorted(MODELS))
    def test_round_trip(self, name, use_custom_objects, tmp_path, monkeypatch):
        model = MODELS[name]()
        model.fit(DATA, DATA, epochs=1, batch_size=32, verbose=0)
        loaded = h.save_and_load(model, tmp_path / "m.keras", use_custom_objects, monkeypatch)
        for a, b in zip(model.weights, loaded.weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        # inference="mean": predictions are deterministic and must agree.
        np.testing.assert_allclose(
            model.predict(DATA, verbose=0), loaded.predict(DATA, verbose=0), rtol=1e-5, atol=1e-5
        )
        assert type(loaded.loss) is type(model.loss)
        # The loaded model trains on.
        loaded.fit(DATA, DATA, epochs=1, batch_size=32, verbose=0)

    def test_annealed_kl_weight_survives_save(self, tmp_path):
        model = MODELS["diag-mixture-bernoulli"]()
        model.layers[2].kl_regularizer.kl_weight.assign(0.125)
        loaded = keras.saving.load_model(_saved(model, tmp_path))
        assert float(loaded.layers[2].kl_regularizer.kl_weight.numpy()) == 0.125

    def test_reloaded_loss_agrees_within_monte_carlo_noise(self, tmp_path):
        model = MODELS["diag-mixture-bernoulli"]()
        model.fit(DATA, DATA, epochs=2, batch_size=32, verbose=0)
        loaded = keras.saving.load_model(_saved(model, tmp_path))
        # Per-batch losses of both models over many repeats: their means
        # differ by Monte Carlo noise only, sized by the standard error.
        a = [model.evaluate(DATA, DATA, batch_size=128, verbose=0)[0] for _ in range(10)]
        b = [loaded.evaluate(DATA, DATA, batch_size=128, verbose=0)[0] for _ in range(10)]
        std_err = np.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b))
        assert abs(np.mean(a) - np.mean(b)) < 4 * std_err + 1e-6, (a, b)


def _saved(model, tmp_path):
    path = tmp_path / "model.keras"
    model.save(path)
    return path


def _two_posterior_model(name_a=None, name_b=None):
    x = keras.Input((PIXELS,))
    reg_a = ke.KLRegularizer(mode="analytic", metric_name=name_a)
    reg_b = ke.KLRegularizer(mode="analytic", metric_name=name_b)
    z1 = ke.GaussianPosterior(2, kl_regularizer=reg_a, name="encoder_z1", seed=3)(x)
    z2 = ke.GaussianPosterior(2, kl_regularizer=reg_b, name="encoder_z2", seed=4)(z1)
    return ke.ELBOModel(x, keras.layers.Dense(PIXELS)(z2))


def _closed_form_kl(posterior, features):
    q = posterior.distribution(features)
    return h.kl_diag_normal(q.mean(), q.stddev()).mean()


class TestELBOModelLogs:
    """Issue 10, points 6, 7 and 14: each KL logged once under its own name,
    and the negative ELBO at weight 1 beside the weighted loss."""

    def test_default_names_differ_and_each_kl_is_logged(self):
        model = compile_vae(_two_posterior_model())
        logs = model.evaluate(DATA, DATA, batch_size=128, return_dict=True, verbose=0)
        assert sorted(logs) == [
            "encoder_z1_kl",
            "encoder_z2_kl",
            "loss",
            "neg_elbo",
            "reconstruction",
        ]
        # Both KLs, each against its NumPy closed form (the first posterior's
        # input is the data, the second's a sample: read back through a
        # sub-model with the same seeds would differ, so only the first is
        # checked exactly; the second must be positive and differ from it).
        first = model.get_layer("encoder_z1")
        np.testing.assert_allclose(logs["encoder_z1_kl"], _closed_form_kl(first, DATA), rtol=1e-5)
        assert logs["encoder_z2_kl"] > 0 and logs["encoder_z2_kl"] != logs["encoder_z1_kl"]

    def test_colliding_names_are_refused_at_compile(self):
        with pytest.raises(ValueError, match="give each KLRegularizer its own `metric_name`"):
            compile_vae(_two_posterior_model("kl", "kl"))
        with pytest.raises(ValueError, match="'loss'"):
            compile_vae(_two_posterior_model("loss", None))

    def test_custom_layer_calling_the_regularizer_is_logged_once(self):

        class MyPosterior(keras.layers.Layer):
            # Not a `Posterior`: a layer of the user's own, as the README invites.
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self.projection = keras.layers.Dense(2 * LATENT)
                self.kl_regularizer = ke.KLRegularizer(mode="analytic")
                self.seed_generator = keras.random.SeedGenerator(1)

            def call(self, x):
                params = self.projection(x)
                q = kd.MultivariateNormalDiag(
                    params[:, :LATENT], keras.ops.softplus(params[:, LATENT:]) + 1e-3
                )
                return self.kl_regularizer(q.sample(seed=self.seed_generator), posterior=q)

        x = keras.Input((PIXELS,))
        layer = MyPosterior()
        model = compile_vae(ke.ELBOModel(x, keras.layers.Dense(PIXELS)(layer(x))))
        logs = model.evaluate(DATA, DATA, batch_size=128, return_dict=True, verbose=0)
        assert model.metrics_names.count("kl") == 1
        assert len(model.evaluate(DATA, DATA, verbose=0)) == len(model.metrics_names) == 4
        params = h.numpy(layer.projection(DATA))
        expected = h.kl_diag_normal(params[:, :LATENT], h.softplus(params[:, LATENT:]) + 1e-3)
        np.testing.assert_allclose(logs["kl"], expected.mean(), rtol=1e-5)

    def test_neg_elbo_is_the_loss_at_weight_one_without_free_bits(self):
        keras.utils.set_random_seed(0)
        x = keras.Input((PIXELS,))
        reg = ke.KLRegularizer(mode="analytic", weight=0.25, free_bits=0.5)
        posterior = ke.GaussianPosterior(LATENT, kl_regularizer=reg, seed=2)
        model = compile_vae(ke.ELBOModel(x, keras.layers.Dense(PIXELS)(posterior(x))))
        logs = model.evaluate(DATA, DATA, batch_size=128, return_dict=True, verbose=0)
        q = posterior.distribution(DATA)
        loc, std = h.numpy(q.mean()), h.numpy(q.stddev())
        kl_j = 0.5 * (loc**2 + std**2 - 1 - 2 * np.log(std))
        kl_j = kl_j.astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(logs["kl"], kl_j.sum(), rtol=1e-5)
        # loss = reconstruction + 0.25 * sum_j max(0.5, kl_j); neg_elbo has
        # the KL at weight 1 and no free bits.
        penalty = 0.25 * np.maximum(kl_j, 0.5).sum()
        np.testing.assert_allclose(logs["loss"], logs["reconstruction"] + penalty, rtol=1e-5)
        np.testing.assert_allclose(logs["neg_elbo"], logs["reconstruction"] + kl_j.sum(), rtol=1e-5)

    def test_neg_elbo_is_monitorable_during_annealing(self):
        model = compile_vae(make_vae(mode="analytic"))
        stop = keras.callbacks.EarlyStopping(monitor="val_neg_elbo", mode="min", patience=50)
        annealing = ke.KLAnnealing(ke.LinearWarmup(4))
        history = model.fit(
            DATA,
            DATA,
            epochs=3,
            batch_size=32,
            validation_data=(DATA, DATA),
            callbacks=[annealing, stop],
            verbose=0,
        ).history
        for prefix in ("", "val_"):
            assert len(history[f"{prefix}neg_elbo"]) == 3
        # Annealed: the weighted loss is below the negative ELBO.
        assert all(
            loss < neg for loss, neg in zip(history["loss"], history["neg_elbo"], strict=True)
        )
        assert stop.best == min(history["val_neg_elbo"])

    def test_subclassed_model(self):
        class VAE(ke.ELBOModel):
            # make_vae's architecture, subclassed.
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self.encoder = keras.layers.Dense(32, activation="relu")
                self.posterior = ke.GaussianPosterior(
                    LATENT, kl_regularizer=ke.KLRegularizer(seed=1), seed=2
                )
                self.hidden = keras.layers.Dense(32, activation="relu")
                self.decoder = keras.layers.Dense(PIXELS)

            def call(self, x):
                return self.decoder(self.hidden(self.posterior(self.encoder(x))))

        keras.utils.set_random_seed(0)
        model = compile_vae(VAE())
        h.assert_vae_trains_and_logs_kl_once(model)


class TestNonFiniteInputs:
    """Issue 10, point 1: a NaN input row under a ReLU encoder."""

    @staticmethod
    def _relu_vae(model_class):
        keras.utils.set_random_seed(0)
        x = keras.Input((PIXELS,))
        hidden = keras.layers.Dense(32, activation="relu")(x)
        z = ke.GaussianPosterior(LATENT, kl_regularizer=ke.KLRegularizer(), seed=2)(hidden)
        return compile_vae(model_class(x, keras.layers.Dense(PIXELS)(z)))

    @staticmethod
    def _bad_data():
        bad = DATA.copy()
        bad[5, 3] = np.nan
        return bad

    @pytest.mark.skipif(h.BACKEND != "tensorflow", reason="oneDNN's fused Dense + ReLU")
    def test_plain_model_corrupts_its_weights_silently(self):
        # Why ELBOModel checks the inputs: the posterior's own check does not
        # fire (oneDNN's fused Dense + ReLU maps NaN to 0 on the forward pass,
        # where it is on), yet the encoder kernel's gradient is NaN.
        import tensorflow as tf

        model = self._relu_vae(keras.Model)
        try:
            model.fit(self._bad_data(), DATA, epochs=1, batch_size=128, verbose=0)
        except tf.errors.InvalidArgumentError as error:
            # Without the fusion (it depends on the CPU and the TensorFlow
            # build) the NaN reaches the posterior, whose check fires.
            assert "received non-finite posterior" in str(error)
            pytest.skip("this CPU's TensorFlow does not fuse Dense + ReLU")
        assert np.isnan(model.layers[1].kernel.numpy()).any()

    def test_elbo_model_stops_before_any_update(self):
        model = self._relu_vae(ke.ELBOModel)
        before = [w.numpy().copy() for w in model.trainable_weights]
        if h.BACKEND == "jax":
            # Documented: nothing can raise inside a jitted JAX step.
            history = model.fit(self._bad_data(), DATA, epochs=1, batch_size=128, verbose=0)
            assert not np.isfinite(history.history["loss"][0])
            return
        # With oneDNN (TensorFlow) the posterior sees no NaN: ELBOModel's input
        # check stops the step; elsewhere the posterior's own check may come first.
        message = "inputs of this batch contain NaN or Inf|received non-finite posterior"
        with pytest.raises(h.run_time_error(), match=message) as info:
            model.fit(self._bad_data(), DATA, epochs=1, batch_size=128, verbose=0)
        # Issue 17, point 12: TensorFlow's CheckNumerics appended "Tensor had
        # Inf values", also for a NaN; the message is now ours alone.
        assert "Tensor had" not in str(info.value)
        for b, w in zip(before, model.trainable_weights, strict=True):
            np.testing.assert_array_equal(b, w.numpy())
        # Issue 17, point 5: nor does the step counter advance (on TensorFlow
        # it did, shifting step-based KLAnnealing).
        assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 0


class TestInferenceMeanIsStillTheELBO:
    """Issue 17, point 1: with `inference="mean"` (posterior or Bayesian
    layer), `evaluate` logged the reconstruction at the posterior mean as
    "neg_elbo", below -log p(x) on a trained VAE. `ELBOModel.evaluate` now
    samples whatever `inference` says; `predict` still returns the mean.

    A linear-Gaussian decoder makes the expected reconstruction a closed
    form: for z ~ N(m, diag(s**2)) and x ~ N(W z + b, I),
    E[-log p(x|z)] = 0.5 * |x - W m - b|**2 + 0.5 * sum((W s)**2) + P/2 log(2 pi),
    which exceeds the value at the mean by 0.5 * sum((W s)**2).
    """

    def test_logged_reconstruction_is_the_expectation_over_q(self):
        n, features, latent, pixels = 2000, 4, 2, 5
        keras.utils.set_random_seed(0)
        x = keras.Input((features,))
        posterior = ke.GaussianPosterior(
            latent, kl_regularizer=ke.KLRegularizer(), inference="mean", seed=5
        )
        decoder = keras.layers.Dense(pixels)
        model = ke.ELBOModel(x, decoder(posterior(x)))
        model.compile(optimizer="sgd", loss=ke.GaussianNLL(scale=1.0))
        rng = np.random.default_rng(6)
        data = np.repeat(rng.normal(size=(4, features)), n // 4, axis=0).astype("float32")
        targets = rng.normal(size=(n, pixels)).astype("float32")
        logs = model.evaluate(data, targets, batch_size=500, verbose=0, return_dict=True)

        q = posterior.distribution(data)
        loc, scale = h.numpy(q.mean()), h.numpy(q.stddev())
        kernel, bias = (h.numpy(w) for w in decoder.weights)
        residual = targets - loc @ kernel - bias
        at_mean = 0.5 * np.sum(residual**2, axis=1) + 0.5 * pixels * h.LOG_2PI
        spread = 0.5 * np.sum((scale[:, :, None] * kernel[None]) ** 2, axis=(1, 2))
        expected = np.mean(at_mean + spread)
        # Standard error of the logged mean over n independent draws, from a
        # NumPy Monte Carlo of the per-example reconstruction.
        eps = rng.normal(size=(200, n, latent))
        draws = 0.5 * np.sum((residual - (eps * scale) @ kernel) ** 2, axis=-1)
        std_err = np.sqrt(np.mean(np.var(draws, axis=0)) / n)
        assert spread.mean() > 10 * std_err  # the bug's size is detectable
        assert abs(logs["reconstruction"] - expected) < 4 * std_err, (logs, expected, std_err)
        kl = h.kl_diag_normal(loc, scale).mean()
        np.testing.assert_allclose(logs["kl"], kl, rtol=1e-5)
        assert abs(logs["neg_elbo"] - (expected + kl)) < 4 * std_err
        # `predict` and the layer's setting are unchanged.
        assert posterior.inference == "mean"
        np.testing.assert_allclose(
            model.predict(data[:4], verbose=0), loc[:4] @ kernel + bias, rtol=1e-5, atol=1e-5
        )


class TestJitCompileIsSavedAsGiven:
    """Issue 17, point 4: Keras saved `jit_compile` resolved for the saving
    backend ("auto" is True on JAX), so a file saved on JAX turned XLA on
    under TensorFlow (the run-time checks silently off) and torch.compile
    under PyTorch. `ELBOModel` saves the argument as given."""

    @pytest.mark.parametrize("jit_compile", ["auto", False], ids=["auto", "off"])
    def test_saved_and_restored(self, jit_compile, tmp_path):
        import json
        import zipfile

        model = compile_vae(make_vae(), jit_compile=jit_compile)
        model.fit(DATA, DATA, epochs=1, batch_size=64, verbose=0)
        model.save(tmp_path / "m.keras")
        config = json.loads(zipfile.ZipFile(tmp_path / "m.keras").read("config.json"))
        assert config["compile_config"]["jit_compile"] == jit_compile
        loaded = keras.saving.load_model(tmp_path / "m.keras")
        # Resolved again on loading, as this backend resolves it.
        assert loaded.jit_compile == model.jit_compile
        assert loaded.get_compile_config()["jit_compile"] == jit_compile


def test_a_functional_model_prints_as_elbo_model(tmp_path):
    # Issue 17, point 12: a loaded model's type printed as the private
    # `_FunctionalELBOModel`.
    model = compile_vae(make_vae())
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    for m in (model, loaded):
        assert isinstance(m, ke.ELBOModel)
        assert repr(type(m)) == "<class 'keras_elbo.model.ELBOModel'>"


class TestOptimizerBuiltBeforeTheTrainFunction:
    """`ELBOModel` builds its optimizer before the train function is traced
    (TensorFlow would otherwise trace it twice), but only where every layer
    is built: variables a layer creates at its first call must reach the
    optimizer."""

    def test_built_model_gets_its_optimizer_built_first(self):
        model = compile_vae(make_vae())
        assert not model.optimizer.built
        model.make_train_function()
        assert model.optimizer.built
        variables = {id(v) for v in model.trainable_variables}
        assert len(model.optimizer.variables) > len(variables)  # slots for each

    def test_layer_built_at_its_first_call_trains(self):
        # A conditional prior inside an RNN cell whose `build` builds the
        # posterior but not the prior: the prior's projection is created in
        # the first step (notebook 06's state-space cell did this).
        class Cell(keras.layers.Layer):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self.state_size = 2
                self.output_size = 2
                self.prior = ke.ConditionalGaussianPrior(2)
                self.posterior = ke.GaussianPosterior(
                    2, kl_regularizer=ke.KLRegularizer(prior=self.prior), seed=0
                )

            def build(self, input_shape):
                self.posterior.build((None, 2 + input_shape[-1]))

            def call(self, inputs, states):
                h = states[0]
                z = self.posterior(keras.ops.concatenate([h, inputs], -1), prior_inputs=h)
                return z, [keras.ops.tanh(z)]

        x = keras.Input((3, 1))
        outputs = keras.layers.Dense(1)(
            keras.layers.RNN(Cell(), return_sequences=True, unroll=True)(x)
        )
        model = ke.ELBOModel(x, outputs)
        model.compile(keras.optimizers.Adam(1e-2), ke.GaussianNLL(scale=1.0))
        data = np.random.default_rng(0).normal(size=(8, 3, 1)).astype("float32")
        history = model.fit(data, data, epochs=1, batch_size=4, verbose=0).history
        assert np.all(np.isfinite(history["loss"]))
        kernel = next(w for w in model.trainable_weights if "conditional_gaussian_prior" in w.path)
        before = keras.ops.convert_to_numpy(kernel).copy()
        model.fit(data, data, epochs=1, batch_size=4, verbose=0)
        assert not np.allclose(keras.ops.convert_to_numpy(kernel), before)  # it trains
