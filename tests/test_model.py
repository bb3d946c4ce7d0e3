"""Whole models: fit, logged metrics, the ELBO's parts, save and load."""

import keras
import numpy as np
import pytest

import keras_elbo as ke
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
    return keras.Model(x, logits)


def compile_vae(model, jit_compile=False, loss=None):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=loss or ke.BernoulliNLL(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


class TestFit:
    @pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
    def test_loss_falls_and_kl_is_logged_once(self, jit_compile):
        model = compile_vae(make_vae(prior=ke.MixturePrior(LATENT, 4, seed=0)), jit_compile)
        h.assert_vae_trains_and_logs_kl_once(model)

    def test_evaluate_reports_each_metric_once(self):
        model = compile_vae(make_vae())
        results = model.evaluate(DATA, DATA, verbose=0)
        assert len(results) == len(model.metrics_names) == 2

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
        model = compile_vae(keras.Model(x, keras.layers.Dense(PIXELS)(z2)))
        history = model.fit(DATA, DATA, epochs=1, verbose=0).history
        assert sorted(history) == ["kl_a", "kl_b", "loss"]


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
