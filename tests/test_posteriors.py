"""GaussianPosterior: parameters, sampling statistics, inference output, errors."""

import keras
import numpy as np
import pytest

import keras_elbo as ke
from keras_elbo import _math
from tests import _helpers as h

X = np.random.default_rng(0).normal(size=(3, 5)).astype("float32")


def built_posterior(latent_dim=4, **kwargs):
    layer = ke.GaussianPosterior(latent_dim, **kwargs)
    layer.build(X.shape)
    return layer


def numpy_params(layer, x):
    kernel, bias = (w.numpy().astype(np.float64) for w in layer.projection.weights)
    params = x.astype(np.float64) @ kernel + bias
    return params[:, : layer.latent_dim], params[:, layer.latent_dim :]


class TestParameters:
    def test_diag_loc_and_scale_match_numpy_projection(self):
        layer = built_posterior(min_scale=1e-3)
        q = layer.distribution(X)
        loc, raw = numpy_params(layer, X)
        np.testing.assert_allclose(h.numpy(q.mean()), loc, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(h.numpy(q.stddev()), h.softplus(raw) + 1e-3, rtol=1e-5)

    def test_full_covariance_is_lower_triangular_with_floored_diagonal(self):
        d = 4
        layer = built_posterior(d, covariance="full", min_scale=0.01)
        assert layer.projection.units == d + d * (d + 1) // 2
        q = layer.distribution(X)
        tril = h.numpy(q.scale_tril)
        np.testing.assert_array_equal(np.triu(tril, k=1), 0.0)
        assert np.all(np.diagonal(tril, axis1=-2, axis2=-1) > 0.01)
        # The marginal standard deviations are those of the covariance L L^T.
        cov = tril @ np.swapaxes(tril, -1, -2)
        std = np.sqrt(np.diagonal(cov, axis1=-2, axis2=-1))
        np.testing.assert_allclose(h.numpy(q.stddev()), std, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            h.numpy(q.mean()), numpy_params(layer, X)[0], rtol=1e-5, atol=1e-6
        )

    @pytest.mark.parametrize("covariance", ["diag", "full"])
    def test_added_kl_matches_numpy_closed_form(self, covariance):
        reg = ke.KLRegularizer(mode="analytic")
        layer = built_posterior(covariance=covariance, kl_regularizer=reg)
        layer(X)
        q = layer.distribution(X)
        if covariance == "full":
            tril = h.numpy(q.scale_tril)
        else:
            tril = np.stack([np.diag(row) for row in h.numpy(q.stddev())])
        expected = h.kl_full_normal(h.numpy(q.mean()), tril).mean()
        np.testing.assert_allclose(float(layer.losses[0]), expected, rtol=1e-5)


class TestSampling:
    @pytest.mark.parametrize("covariance", ["diag", "full"])
    def test_sample_moments_match_distribution(self, covariance):
        n = 20000
        layer = built_posterior(2, covariance=covariance, seed=1)
        x = np.repeat(X[:1], n, axis=0)
        z = h.numpy(layer(x, training=True))
        q = layer.distribution(X[:1])
        loc, std = h.numpy(q.mean())[0], h.numpy(q.stddev())[0]
        assert np.all(np.abs(z.mean(0) - loc) < 4 * std / np.sqrt(n))
        # The sample standard deviation has standard error std / sqrt(2 n).
        assert np.all(np.abs(z.std(0) - std) < 4 * std / np.sqrt(2 * n))

    @pytest.mark.parametrize("covariance", ["diag", "full"])
    def test_sample_is_reparameterised(self, covariance):
        # d sum(z**2) / d params through the layer's own sampling path, on
        # every backend: the gradient reaches every parameter.
        layer = built_posterior(covariance=covariance, seed=1)
        grads = h.weight_gradients(
            lambda: keras.ops.sum(layer(X, training=True) ** 2), layer.trainable_weights
        )
        assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in grads)

    def test_layers_with_same_seed_draw_different_noise(self):
        # A posterior and its regularizer given the same integer seed share a
        # SeedGenerator stream; the per-layer salt must still separate them.
        def draws(generator):
            return h.numpy(keras.random.normal((8,), seed=generator))

        np.testing.assert_array_equal(
            draws(keras.random.SeedGenerator(1)), draws(keras.random.SeedGenerator(1))
        )
        salted = [
            draws(_math.seed_generator(1, salt)) for salt in ("GaussianPosterior", "KLRegularizer")
        ]
        assert not np.array_equal(salted[0], salted[1])

    def test_same_seed_same_samples(self):
        a, b = built_posterior(seed=3), built_posterior(seed=3)
        b.set_weights(a.get_weights())
        np.testing.assert_array_equal(h.numpy(a(X, training=True)), h.numpy(b(X, training=True)))
        assert not np.array_equal(a(X, training=True), a(X, training=True))


class TestInference:
    def test_mean_at_inference(self):
        layer = built_posterior(inference="mean")
        np.testing.assert_allclose(
            h.numpy(layer(X, training=False)), numpy_params(layer, X)[0], atol=1e-5
        )
        assert not np.allclose(h.numpy(layer(X, training=True)), h.numpy(layer(X, training=False)))

    def test_sample_at_inference_by_default(self):
        layer = built_posterior()
        assert not np.array_equal(
            h.numpy(layer(X, training=False)), h.numpy(layer(X, training=False))
        )

    def test_kl_added_at_inference_too(self):
        layer = built_posterior(inference="mean", kl_regularizer=ke.KLRegularizer())
        layer(X, training=False)
        assert len(layer.losses) == 1


class TestErrors:
    @pytest.mark.parametrize(
        "kwargs, argument",
        [
            ({"latent_dim": 0}, "latent_dim"),
            ({"latent_dim": 2.0}, "latent_dim"),
            ({"latent_dim": True}, "latent_dim"),
            ({"latent_dim": 2, "covariance": "banded"}, "covariance"),
            ({"latent_dim": 2, "min_scale": 0.0}, "min_scale"),
            ({"latent_dim": 2, "inference": "mode"}, "inference"),
            ({"latent_dim": 2, "kl_regularizer": "kl"}, "kl_regularizer"),
        ],
        ids=lambda v: str(v),
    )
    def test_bad_argument_names_it(self, kwargs, argument):
        with pytest.raises(ValueError, match=f"`{argument}`"):
            ke.GaussianPosterior(**kwargs)

    def test_non_finite_input_raises_naming_the_layer(self):
        # Eager calls raise on every backend.
        layer = built_posterior(name="encoder_q")
        bad = X.copy()
        bad[1, 2] = np.nan
        with pytest.raises(h.run_time_error(), match="encoder_q.*non-finite"):
            layer(bad)

    def test_non_finite_batch_stops_fit_before_weights_change(self):
        x = keras.Input((5,))
        z = ke.GaussianPosterior(2, kl_regularizer=ke.KLRegularizer(), name="q")(x)
        model = keras.Model(x, keras.layers.Dense(5)(z))
        model.compile("adam", ke.GaussianNLL())
        before = [w.copy() for w in model.get_weights()]
        bad = np.repeat(X, 4, axis=0)
        bad[0, 0] = np.inf
        if h.BACKEND == "jax":
            # Documented: nothing can raise inside a jitted JAX step; the
            # loss of the bad batch is not finite, for TerminateOnNaN to see.
            history = model.fit(bad, bad, epochs=1, batch_size=12, verbose=0).history
            assert not np.isfinite(history["loss"][0])
            return
        with pytest.raises(h.run_time_error(), match="`q`.*non-finite"):
            model.fit(bad, bad, epochs=1, batch_size=12, verbose=0)
        for b, a in zip(before, model.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)

    def test_analytic_with_mixture_prior_fails_at_model_construction(self):
        reg = ke.KLRegularizer(prior=ke.MixturePrior(2, num_components=3), mode="analytic")
        with pytest.raises(ValueError, match="mode='mc'"):
            ke.GaussianPosterior(2, kl_regularizer=reg)(keras.Input((5,)))


def test_config_round_trip():
    layer = ke.GaussianPosterior(
        3,
        covariance="full",
        kl_regularizer=ke.KLRegularizer(prior=ke.NormalPrior(3, scale=2.0), mode="mc"),
        min_scale=1e-3,
        inference="mean",
        seed=4,
        kernel_initializer="he_normal",
    )
    clone = h.config_round_trip(layer)
    assert clone.kl_regularizer.prior.scale == 2.0


class TestLatentMaps:
    """Issue 10, point 2a: a posterior on a feature map returns a latent map,
    whose KL is summed over positions (nats per example)."""

    @pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 6, 5)], ids=["image", "sequence"])
    def test_added_kl_is_summed_over_positions(self, shape):
        x = np.random.default_rng(1).normal(size=shape).astype("float32")
        layer = ke.GaussianPosterior(
            3, kl_regularizer=ke.KLRegularizer(mode="analytic"), min_scale=1e-3
        )
        z = layer(x)
        assert tuple(z.shape) == (*shape[:-1], 3)
        flat = x.reshape(-1, shape[-1])
        loc, raw = numpy_params(layer, flat)
        per_position = h.kl_diag_normal(loc, h.softplus(raw) + 1e-3)
        expected = per_position.reshape(shape[0], -1).sum(axis=1).mean()
        np.testing.assert_allclose(float(layer.losses[0]), expected, rtol=1e-5)


class TestBuildCreatesTheKLWeight:
    """Issue 10, point 3: every variable exists after `build`."""

    def test_build_creates_the_regularizers_weight(self):
        layer = built_posterior(kl_regularizer=ke.KLRegularizer(weight=0.5))
        assert float(layer.kl_regularizer.kl_weight.numpy()) == 0.5

    @pytest.mark.parametrize("how", ["save", "weights"])
    def test_annealed_weight_survives_in_a_subclassed_model(self, how, tmp_path):
        @keras.saving.register_keras_serializable(package="tests")
        class Encoder(keras.Model):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self.posterior = ke.GaussianPosterior(2, kl_regularizer=ke.KLRegularizer())

            def build(self, input_shape):
                self.posterior.build(input_shape)

            def call(self, x):
                return self.posterior(x)

        model = Encoder()
        model.build((None, 5))
        model.posterior.kl_regularizer.kl_weight.assign(0.25)
        if how == "save":
            model.save(tmp_path / "m.keras")
            loaded = keras.saving.load_model(tmp_path / "m.keras")
        else:
            model.save_weights(tmp_path / "m.weights.h5")
            loaded = Encoder()
            loaded.build((None, 5))
            loaded.load_weights(tmp_path / "m.weights.h5")
        assert float(loaded.posterior.kl_regularizer.kl_weight.numpy()) == 0.25


@pytest.mark.slow
class TestFullCovarianceUnderXLA:
    """Issue 10, point 5: a dynamic batch size under jit_compile=True."""

    @pytest.mark.skipif(h.BACKEND != "tensorflow", reason="XLA with tf.data: TensorFlow's")
    def test_fit_with_a_short_last_batch_and_tf_data(self):
        import tensorflow as tf

        keras.utils.set_random_seed(0)
        x = keras.Input((5,))
        reg = ke.KLRegularizer(mode="analytic")
        z = ke.GaussianPosterior(3, covariance="full", kl_regularizer=reg, seed=1)(x)
        model = ke.ELBOModel(x, keras.layers.Dense(5)(z))
        model.compile("adam", ke.GaussianNLL(), jit_compile=True)
        data = np.random.default_rng(0).normal(size=(10, 5)).astype("float32")
        history = model.fit(data, data, batch_size=4, epochs=2, verbose=0).history
        dataset = tf.data.Dataset.from_tensor_slices((data, data)).batch(3)
        history_ds = model.fit(dataset, epochs=1, verbose=0).history
        assert np.all(np.isfinite(history["loss"] + history_ds["loss"]))
