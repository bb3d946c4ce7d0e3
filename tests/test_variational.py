"""Pluggable variational layers: weight posteriors as objects, DenseVariational."""

import keras
import numpy as np
import pytest

import keras_elbo as ke
from keras_elbo.bayesian import (
    BayesianDense,
    DenseVariational,
)
from keras_elbo.weight_posteriors import (
    MIN_SCALE,
    FullCovarianceWeights,
    MeanFieldWeights,
)
from tests import _helpers as h
from tests.test_bayesian import numpy_posterior, repeated_calls, spread_posterior

RNG = np.random.default_rng(0)
X = RNG.normal(size=(3, 4)).astype("float32")


def test_numpy_fill_triangular_is_tfps_documented_order():
    expected = [[4, 0, 0], [6, 5, 0], [3, 2, 1]]
    np.testing.assert_array_equal(h.numpy_fill_triangular(np.arange(1, 7), 3), expected)


def spread_full_covariance(layer, seed=1):
    """Random loc and lower-triangular scale entries; returns (loc, L) in
    float64, L computed in NumPy from the raw entries."""
    rng = np.random.default_rng(seed)
    posterior = layer.weight_posterior
    size = posterior.num_parameters
    loc = rng.normal(size=size)
    raw = 0.3 * rng.normal(size=size * (size + 1) // 2)
    posterior.loc.assign(loc.astype("float32"))
    posterior.raw_scale_tril.assign(raw.astype("float32"))
    tril = h.numpy_fill_triangular(raw.astype("float32").astype(np.float64), size)
    diag = h.softplus(np.diagonal(tril)) + MIN_SCALE
    return loc, np.tril(tril, -1) + np.diag(diag)


def mean_field_kl(layer, prior_scale=1.0):
    k_loc, k_scale, b_loc, b_scale = numpy_posterior(layer)
    loc = np.concatenate([k_loc.ravel(), b_loc])
    scale = np.concatenate([k_scale.ravel(), b_scale])
    return float(h.kl_diag_normal(loc, scale, prior_scale=prior_scale))


class TestWeightPosteriors:
    @pytest.mark.parametrize("scale_init", [1e-2, 0.3])
    def test_initial_scales(self, scale_init):
        for posterior in (MeanFieldWeights(scale_init), FullCovarianceWeights(scale_init)):
            layer = DenseVariational(2, posterior=posterior)
            layer.build((None, 3))
            q = layer.posterior()
            assert tuple(q.event_shape) == (8,)
            np.testing.assert_allclose(h.numpy(q.stddev()), scale_init, rtol=1e-5)
        # The full covariance starts diagonal: L = scale_init * I.
        np.testing.assert_allclose(h.numpy(q.scale_tril), scale_init * np.eye(8), rtol=1e-5)

    def test_initial_loc_is_the_kernel_initializer_and_zero_bias(self):
        layer = DenseVariational(
            3, posterior=FullCovarianceWeights(), kernel_initializer="ones", use_bias=True
        )
        layer.build((None, 2))
        np.testing.assert_array_equal(h.numpy(layer.posterior().mean()), [1.0] * 6 + [0.0] * 3)

    @pytest.mark.parametrize(
        "prior, prior_scale", [(None, 1.0), (ke.NormalPrior(scale=0.5), 0.5)], ids=["N01", "s0.5"]
    )
    def test_mean_field_exact_kl_is_the_closed_form(self, prior, prior_scale):
        layer = DenseVariational(3, prior=prior, kl_weight=0.1, kl_use_exact=True, seed=0)
        layer.build((None, 4))
        spread_posterior(layer)
        layer(X, training=True)
        kl = mean_field_kl(layer, prior_scale)  # NumPy, over all P = 15 parameters
        np.testing.assert_allclose(float(h.numpy(layer.kl_regularizer.last_kl)), kl, rtol=1e-5)
        np.testing.assert_allclose(float(h.numpy(layer.losses[0])), 0.1 * kl, rtol=1e-5)

    def test_full_covariance_exact_kl_is_the_closed_form(self):
        layer = DenseVariational(
            2, posterior=FullCovarianceWeights(), kl_weight=0.1, kl_use_exact=True, seed=0
        )
        layer.build((None, 3))
        loc, tril = spread_full_covariance(layer)
        layer(X[:, :3], training=True)
        kl = float(h.kl_full_normal(loc, tril))  # trace and slogdet, P = 8
        np.testing.assert_allclose(float(h.numpy(layer.kl_regularizer.last_kl)), kl, rtol=1e-5)
        np.testing.assert_allclose(float(h.numpy(layer.losses[0])), 0.1 * kl, rtol=1e-5)

    @pytest.mark.parametrize("covariance", ["mean_field", "full"])
    def test_sampled_kl_is_unbiased(self, covariance):
        # kl_use_exact=False: log q(w) - log p(w) on each call's weight
        # sample. Its mean over n calls is within 4 standard errors
        # (std / sqrt(n), the calls independent) of the NumPy closed form.
        n = 400
        full = covariance == "full"
        posterior = FullCovarianceWeights() if full else MeanFieldWeights()
        layer = DenseVariational(2, posterior=posterior, kl_use_exact=False, seed=5)
        layer.build((None, 3))
        if full:
            exact = float(h.kl_full_normal(*spread_full_covariance(layer)))
        else:
            spread_posterior(layer)
            exact = mean_field_kl(layer)
        q = layer.posterior()
        assert layer.kl_regularizer.method(q, layer.kl_regularizer.prior_distribution(q)) == "mc"
        estimates = repeated_calls(layer, X[:, :3], n)[1]
        assert np.std(estimates) > 0  # sampled, not the closed form
        tol = 4 * estimates.std(ddof=1) / np.sqrt(n)
        assert abs(estimates.mean() - exact) < tol, (estimates.mean(), exact, tol)

    def test_full_covariance_outputs_have_the_covariance_of_q(self):
        # With w ~ N(m, L L^T) shared by the batch, y = A w for the fixed
        # matrix A mapping the flat weights to the outputs of the batch, so
        # Cov(y) = A L L^T A^T, including the covariance between examples.
        # Each entry of the covariance is checked within 4 standard errors
        # of the mean of the products (y_a - mu_a)(y_b - mu_b) (centred at
        # the true mean).
        n = 2000
        layer = DenseVariational(2, posterior=FullCovarianceWeights(), seed=3)
        layer.build((None, 3))
        loc, tril = spread_full_covariance(layer)
        x = X[:2, :3].astype(np.float64)
        # y[r, j] = sum_i x[r, i] w[i * 2 + j] + w[6 + j], flattened to (4,).
        a = np.zeros((2, 2, 8))
        for j in range(2):
            a[:, j, j:6:2] = x
            a[:, j, 6 + j] = 1.0
        a = a.reshape(4, 8)
        mean, cov = a @ loc, a @ tril @ tril.T @ a.T
        outputs = repeated_calls(layer, X[:2, :3], n)[0].reshape(n, 4)
        centred = outputs - mean
        products = centred[:, :, None] * centred[:, None, :]
        se = products.std(0, ddof=1) / np.sqrt(n)
        np.testing.assert_array_less(np.abs(products.mean(0) - cov), 4 * se)
        np.testing.assert_array_less(
            np.abs(outputs.mean(0) - mean), 4 * outputs.std(0, ddof=1) / np.sqrt(n)
        )


def regression_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=(n, 1)).astype("float32")
    y = (2.0 * x - 1.0 + 0.1 * rng.normal(size=x.shape)).astype("float32")
    return x, y


class TestDenseVariational:
    @pytest.mark.parametrize("covariance", ["mean_field", "full"])
    def test_trains_on_a_tiny_regression_and_its_kl_is_the_closed_form(self, covariance):
        x, y = regression_data()
        posterior = FullCovarianceWeights() if covariance == "full" else MeanFieldWeights()
        layer = DenseVariational(
            1, posterior=posterior, kl_weight=1 / len(x), kl_use_exact=True, seed=0
        )
        keras.utils.set_random_seed(0)
        model = ke.ELBOModel(inputs := keras.Input((1,)), layer(inputs))
        model.compile(keras.optimizers.Adam(0.1), ke.GaussianNLL(scale=0.1))
        before = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
        # 60 full-batch steps in one epoch (epochs cost more than steps).
        steps = 60
        model.fit(np.tile(x, (steps, 1)), np.tile(y, (steps, 1)), batch_size=len(x), verbose=0)
        after = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
        assert after < 0.1 * before, (before, after)
        loc = h.numpy(layer.posterior().mean())
        np.testing.assert_allclose(loc, [2.0, -1.0], atol=0.2)  # kernel, bias
        model(x, training=True)  # an eager call leaves the losses on the layer
        if covariance == "full":
            q = layer.posterior()
            kl = float(h.kl_full_normal(h.numpy(q.mean()), h.numpy(q.scale_tril)))
        else:
            kl = mean_field_kl(layer)
        np.testing.assert_allclose(float(h.numpy(layer.kl_regularizer.last_kl)), kl, rtol=1e-5)
        np.testing.assert_allclose(float(h.numpy(model.losses[0])), kl / len(x), rtol=1e-5)

    def test_samples_outside_training_by_default_as_tfp(self):
        layer = DenseVariational(2, seed=0)
        first, second = (h.numpy(layer(X)) for _ in range(2))
        assert not np.allclose(first, second)
        layer = DenseVariational(2, inference="mean", seed=0)
        np.testing.assert_array_equal(h.numpy(layer(X)), h.numpy(layer(X)))

    def test_is_bayesian_dense_under_tfps_argument_names(self):
        layer = DenseVariational(3, kl_weight=None, kl_use_exact=False)
        assert isinstance(layer, BayesianDense)
        assert (layer.kl_mode, layer.kl_weight, layer.inference) == ("mc", 1.0, "sample")
        assert DenseVariational(3, kl_use_exact=True).kl_mode == "auto"

    def test_config_is_the_constructor_arguments(self):
        layer = DenseVariational(
            3,
            posterior=FullCovarianceWeights(scale_init=0.1),
            prior=ke.NormalPrior(scale=0.5),
            kl_use_exact=True,
            activation="tanh",
            seed=2,
        )
        config = layer.get_config()
        arguments = {
            "units",
            "posterior",
            "prior",
            "kl_weight",
            "kl_use_exact",
            "activation",
            "use_bias",
            "estimator",
            "inference",
            "seed",
            "kernel_initializer",
        }
        assert arguments <= set(config)
        assert not {"posterior_scale_init", "kl_mode"} & set(config)
        assert config["kl_weight"] is None
        clone = h.config_round_trip(layer)
        assert isinstance(clone.weight_posterior, FullCovarianceWeights)
        assert clone.weight_posterior.scale_init == 0.1

    def test_exact_kl_falls_back_to_monte_carlo_without_a_closed_form(self):
        # TFP raises here; the layer's regularizer uses mode="auto".
        layer = DenseVariational(2, prior=ke.ScaleMixturePrior(), kl_use_exact=True, seed=0)
        layer(X, training=True)
        q = layer.posterior()
        method = layer.kl_regularizer.method(q, layer.kl_regularizer.prior_distribution(q))
        assert method == "mc_entropy"
        assert np.isfinite(float(h.numpy(layer.losses[0])))


class TestFilesWrittenBefore:
    @pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "no-bias"])
    def test_weights_held_by_the_layer_itself_load(self, use_bias):
        # Before the posterior objects, BayesianDense held kernel_loc,
        # kernel_raw_scale, bias_loc and bias_raw_scale (in that order, of
        # the kernel's and bias's shapes) as its own variables.
        layer = BayesianDense(3, use_bias=use_bias)
        layer.build((None, 4))
        rng = np.random.default_rng(3)
        arrays = [rng.normal(size=(4, 3)), rng.normal(size=(4, 3))]
        if use_bias:
            arrays += [rng.normal(size=3), rng.normal(size=3)]
        layer.load_own_variables({str(i): a.astype("float32") for i, a in enumerate(arrays)})
        layer.weight_posterior.load_own_variables({})  # its entry in such a file is empty
        posterior = layer.weight_posterior
        np.testing.assert_allclose(
            h.numpy(posterior.loc), np.concatenate([a.ravel() for a in arrays[0::2]]), rtol=1e-6
        )
        np.testing.assert_allclose(
            h.numpy(posterior.raw_scale),
            np.concatenate([a.ravel() for a in arrays[1::2]]),
            rtol=1e-6,
        )

    def test_a_store_of_another_size_is_refused(self):
        layer = BayesianDense(3)
        layer.build((None, 4))
        with pytest.raises(ValueError, match="expected 0 variables"):
            layer.load_own_variables({str(i): np.zeros(3) for i in range(3)})
        with pytest.raises(ValueError, match="expected 2 variables"):
            layer.weight_posterior.load_own_variables({})  # not restored by the layer

    @pytest.mark.parametrize("cls", [BayesianDense, ke.BayesianConv2D])
    def test_configs_without_posterior_and_kl_mode_load(self, cls):
        args = {"units": 2} if cls is BayesianDense else {"filters": 2, "kernel_size": 3}
        config = cls(**args, posterior_scale_init=0.05, seed=1).get_config()
        del config["posterior"], config["kl_mode"]
        layer = cls.from_config(config)
        assert isinstance(layer.weight_posterior, MeanFieldWeights)
        assert layer.weight_posterior.scale_init == 0.05 and layer.kl_mode == "auto"


class TestErrors:
    @pytest.mark.parametrize("estimator", ["flipout", "local_reparameterization"])
    def test_full_covariance_refuses_estimators_that_need_a_factorised_posterior(self, estimator):
        with pytest.raises(ValueError, match="`estimator`.*factorised.*MeanFieldWeights"):
            DenseVariational(2, posterior=FullCovarianceWeights(), estimator=estimator)
        with pytest.raises(ValueError, match="`estimator`.*factorised"):
            ke.BayesianConv1D(2, 3, posterior=FullCovarianceWeights(), estimator="flipout")

    def test_unknown_estimator_lists_the_estimators(self):
        with pytest.raises(ValueError, match="`estimator`.*local_reparameterization"):
            DenseVariational(2, estimator="local")

    @pytest.mark.parametrize(
        "kwargs, argument",
        [
            ({"posterior": "mean_field"}, "posterior"),
            ({"posterior": ke.NormalPrior()}, "posterior"),
            ({"kl_use_exact": "yes"}, "kl_use_exact"),
            ({"kl_weight": -1.0}, "kl_weight"),
            ({"prior": "normal"}, "prior"),
        ],
        ids=lambda v: str(v),
    )
    def test_bad_argument_names_it(self, kwargs, argument):
        with pytest.raises(ValueError, match=f"`{argument}`"):
            DenseVariational(2, **kwargs)

    @pytest.mark.parametrize("cls", [MeanFieldWeights, FullCovarianceWeights])
    @pytest.mark.parametrize("scale_init", [0.0, 1e-7, -1.0, "small"])
    def test_bad_scale_init(self, cls, scale_init):
        with pytest.raises(ValueError, match="`scale_init`"):
            cls(scale_init=scale_init)

    def test_scale_init_belongs_to_the_posterior_object(self):
        with pytest.raises(ValueError, match="`posterior_scale_init`.*posterior's own"):
            BayesianDense(2, posterior=MeanFieldWeights(), posterior_scale_init=0.1)

    def test_a_posterior_shared_by_layers_of_another_size_is_refused(self):
        posterior = MeanFieldWeights()
        DenseVariational(2, posterior=posterior).build((None, 3))
        with pytest.raises(ValueError, match="built for 8 parameters.*has 10.*its own"):
            DenseVariational(2, posterior=posterior).build((None, 4))

    def test_a_posterior_is_not_called_on_tensors(self):
        with pytest.raises(TypeError, match="`posterior` of a Bayesian layer"):
            MeanFieldWeights()(X)
