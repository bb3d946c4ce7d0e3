"""Prior layers: densities against NumPy, weights, errors, configs."""

import keras
import numpy as np
import pytest

import keras_elbo as ke
from keras_elbo import distributions as kd
from keras_elbo.priors import ScaleMixturePrior
from tests import _helpers as h


class TestMixturePrior:
    def test_log_prob_matches_numpy_logsumexp(self):
        rng = np.random.default_rng(0)
        prior = ke.MixturePrior(3, num_components=4, min_scale=1e-2, seed=0)
        prior.logits.assign(rng.normal(size=4).astype("float32"))
        prior.raw_scale.assign(rng.normal(size=(4, 3)).astype("float32"))
        z = rng.normal(scale=2.0, size=(10, 3)).astype("float32")
        scales = h.softplus(prior.raw_scale.numpy()) + 1e-2
        expected = h.mixture_logpdf(z, prior.logits.numpy(), prior.loc.numpy(), scales)
        np.testing.assert_allclose(h.numpy(prior.distribution().log_prob(z)), expected, rtol=1e-5)

    def test_initial_scale_and_distinct_components(self):
        prior = ke.MixturePrior(2, num_components=5, init_scale=0.5, seed=1)
        comps = prior.distribution().components
        np.testing.assert_allclose(h.numpy(comps.stddev()), 0.5, rtol=1e-5)
        assert len({tuple(row) for row in prior.loc.numpy()}) == 5

    def test_trainable_flag(self):
        assert len(ke.MixturePrior(2, 3).trainable_weights) == 3
        frozen = ke.MixturePrior(2, 3, trainable=False)
        assert not frozen.trainable_weights and len(frozen.non_trainable_weights) == 3

    @pytest.mark.parametrize(
        "kwargs, argument",
        [
            ({"latent_dim": 0, "num_components": 2}, "latent_dim"),
            ({"latent_dim": 2, "num_components": 0}, "num_components"),
            ({"latent_dim": 2, "num_components": 2, "min_scale": 0.0}, "min_scale"),
            ({"latent_dim": 2, "num_components": 2, "init_scale": 1e-4}, "init_scale"),
            ({"latent_dim": 2, "num_components": 2, "init_loc_stddev": -1.0}, "init_loc_stddev"),
        ],
        ids=lambda v: str(v),
    )
    def test_bad_argument_names_it(self, kwargs, argument):
        with pytest.raises(ValueError, match=f"`{argument}`"):
            ke.MixturePrior(**kwargs)

    def test_config_round_trip(self):
        h.config_round_trip(ke.MixturePrior(3, 4, trainable=False, min_scale=0.01, seed=2))


class TestNormalPrior:
    def test_moments(self):
        p = ke.NormalPrior(3, loc=-1.0, scale=0.5).distribution()
        np.testing.assert_allclose(p.mean(), [-1.0] * 3)
        np.testing.assert_allclose(p.stddev(), [0.5] * 3)
        z = np.array([[0.1, -0.2, 0.3]], "float32")
        np.testing.assert_allclose(p.log_prob(z), h.diag_normal_logpdf(z, -1.0, 0.5), rtol=1e-6)

    @pytest.mark.parametrize(
        "kwargs, argument",
        [({"latent_dim": 0}, "latent_dim"), ({"latent_dim": 2, "scale": 0.0}, "scale")],
        ids=lambda v: str(v),
    )
    def test_bad_argument_names_it(self, kwargs, argument):
        with pytest.raises(ValueError, match=f"`{argument}`"):
            ke.NormalPrior(**kwargs)

    def test_config_round_trip(self):
        h.config_round_trip(ke.NormalPrior(3, loc=1.0, scale=2.0))

    def test_trainable_prior_starts_at_loc_and_scale(self):
        prior = ke.NormalPrior(3, loc=-1.0, scale=0.5, trainable_loc=True, trainable_scale=True)
        assert [w.name for w in prior.trainable_weights] == ["loc", "raw_scale"]
        p = prior.distribution()
        np.testing.assert_allclose(h.numpy(p.mean()), [-1.0] * 3)
        np.testing.assert_allclose(h.numpy(p.stddev()), [0.5] * 3, rtol=1e-6)
        assert ke.NormalPrior(3).trainable_weights == []
        with pytest.raises(ValueError, match="`trainable_loc`"):
            ke.NormalPrior(3, trainable_loc="yes")

    def test_trainable_prior_of_a_bayesian_layer_learns_and_its_kl_is_the_closed_form(self):
        # latent_dim=None: the weights are made when the layer sets the size.
        prior = ke.NormalPrior(trainable_loc=True, trainable_scale=True)
        layer = ke.DenseVariational(1, prior=prior, kl_weight=1 / 64, kl_use_exact=True, seed=0)
        assert not prior.built
        rng = np.random.default_rng(0)
        x = rng.normal(size=(64, 3)).astype("float32")
        y = (x @ np.array([[1.0], [2.0], [-1.0]]) + 0.5).astype("float32")
        inputs = keras.Input((3,))
        model = ke.ELBOModel(inputs, layer(inputs))
        assert prior.latent_dim == 4 and len(prior.trainable_weights) == 2
        model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
        before = [h.numpy(w) for w in prior.trainable_weights]
        model.fit(x, y, epochs=3, batch_size=16, verbose=0)
        for start, weight in zip(before, prior.trainable_weights, strict=True):
            assert np.abs(h.numpy(weight) - start).max() > 1e-3  # learned
        # KL[q(w) || p(w)] of the last step against NumPy, at the learned prior.
        q = layer.weight_posterior.distribution()
        p = prior.distribution()
        expected = np.sum(
            h.kl_diag_normal(q.loc, q.scale_diag, h.numpy(p.loc), h.numpy(p.scale_diag))
        )
        kl = h.numpy(layer.kl_regularizer.kl_divergence(q))
        np.testing.assert_allclose(kl, expected, rtol=1e-5)


def test_prior_is_not_called_on_tensors():
    with pytest.raises(TypeError, match="distribution"):
        ke.MixturePrior(2, 2)(np.zeros((1, 2), "float32"))


def vamp_vae(num_components=3, seed=0):
    """A VAE whose encoder body is shared with its VampPrior."""
    keras.utils.set_random_seed(seed)
    body = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)], name="body")
    prior = ke.VampPrior(body, num_components=num_components, input_shape=(6,), seed=seed)
    posterior = ke.GaussianPosterior(
        2, kl_regularizer=ke.KLRegularizer(prior=prior, seed=1), inference="mean", seed=2
    )
    x = keras.Input((6,))
    model = ke.ELBOModel(x, keras.layers.Dense(6)(posterior(body(x))))
    model.compile(keras.optimizers.Adam(1e-2), ke.BernoulliNLL(from_logits=True))
    return model, body, prior, posterior


VAMP_DATA = (np.random.default_rng(1).random((64, 6)) < 0.4).astype("float32")


class TestVampPrior:
    def test_log_prob_is_mean_of_posteriors_at_pseudo_inputs(self):
        model, body, prior, posterior = vamp_vae()
        w_body, b_body = (w.numpy().astype(np.float64) for w in body.weights)
        w_proj, b_proj = (w.numpy().astype(np.float64) for w in posterior.projection.weights)
        params = (prior.pseudo_inputs.numpy() @ w_body + b_body) @ w_proj + b_proj
        locs, scales = params[:, :2], h.softplus(params[:, 2:]) + posterior.min_scale
        z = np.random.default_rng(2).normal(size=(7, 2)).astype("float32")
        expected = h.mixture_logpdf(z, np.zeros(3), locs, scales)
        actual = prior.distribution(posterior_layer=posterior).log_prob(z)
        np.testing.assert_allclose(h.numpy(actual), expected, rtol=1e-5)

    def test_trains_pseudo_inputs_with_monte_carlo_kl(self):
        model, body, prior, posterior = vamp_vae()
        regularizer = posterior.kl_regularizer
        q = posterior.distribution(body(VAMP_DATA))
        assert regularizer.method(q, prior.distribution(posterior)) == "mc_entropy"
        before = prior.pseudo_inputs.numpy().copy()
        history = model.fit(VAMP_DATA, VAMP_DATA, epochs=2, batch_size=16, verbose=0).history
        assert np.all(np.isfinite(history["loss"])) and "kl" in history
        assert not np.allclose(before, prior.pseudo_inputs.numpy())

    @pytest.mark.parametrize("use_custom_objects", [False, True], ids=["registered", "custom"])
    def test_save_load_keeps_the_body_shared(self, use_custom_objects, tmp_path, monkeypatch):
        model, *_ = vamp_vae()
        model.fit(VAMP_DATA, VAMP_DATA, epochs=1, batch_size=16, verbose=0)
        loaded = h.save_and_load(model, tmp_path / "vamp.keras", use_custom_objects, monkeypatch)
        body = loaded.get_layer("body")
        posterior = next(
            layer for layer in loaded.layers if isinstance(layer, ke.GaussianPosterior)
        )
        prior = posterior.kl_regularizer.prior
        assert isinstance(prior, ke.VampPrior) and prior.encoder is body
        for a, b in zip(model.weights, loaded.weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_allclose(
            model.predict(VAMP_DATA, verbose=0),
            loaded.predict(VAMP_DATA, verbose=0),
            rtol=1e-5,
            atol=1e-6,
        )

    def test_evaluation_functions_accept_it(self):
        model, *_ = vamp_vae()
        iwae = ke.importance_weighted_log_likelihood(model, VAMP_DATA, num_samples=4, verbose=0)
        elbo = ke.evaluate_elbo(model, VAMP_DATA, verbose=0)["elbo"]
        assert iwae.shape == elbo.shape == (64,) and np.all(np.isfinite(iwae))

    def test_needs_the_posterior_layer(self):
        _, _, prior, _ = vamp_vae()
        with pytest.raises(ValueError, match="posterior layer"):
            prior.distribution()

    def test_regularizer_knows_its_posterior_layer(self, tmp_path):
        # The prior's mixture is the posterior layer's q at the pseudo-inputs,
        # found through the regularizer that the layer holds (also after a
        # save and load, where the layer is a new object).
        model, _, prior, posterior = vamp_vae()
        regularizer = posterior.kl_regularizer
        assert regularizer.holder() is posterior
        q = posterior.distribution(np.zeros((1, 4), "float32"))
        expected = prior.distribution(posterior_layer=posterior).log_prob(np.zeros((1, 2)))
        actual = regularizer.prior_distribution(q).log_prob(np.zeros((1, 2)))
        np.testing.assert_allclose(h.numpy(actual), h.numpy(expected), rtol=1e-6)
        # Passing the layer, as before it was found (notebook 03 does).
        passed = regularizer.prior_distribution(q, posterior).log_prob(np.zeros((1, 2)))
        np.testing.assert_allclose(h.numpy(passed), h.numpy(expected), rtol=1e-6)
        loaded = h.save_and_load(model, tmp_path / "vamp.keras", use_custom_objects=False)
        loaded_posterior = loaded.get_layer(posterior.name)
        assert loaded_posterior.kl_regularizer.holder() is loaded_posterior

    def test_regularizer_shared_by_two_posteriors_is_refused(self):
        # A VampPrior built from "the" posterior cannot tell which of two.
        body = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
        prior = ke.VampPrior(body, num_components=2, input_shape=(6,), seed=0)
        regularizer = ke.KLRegularizer(prior=prior, seed=1)
        first = ke.GaussianPosterior(2, kl_regularizer=regularizer)
        second = ke.GaussianPosterior(2, kl_regularizer=regularizer)
        assert regularizer.holder() is None and first is not second
        with pytest.raises(ValueError, match="shared by several"):
            second(keras.Input((4,)))

    @pytest.mark.parametrize(
        "kwargs, argument",
        [
            ({"encoder": "body", "num_components": 2, "input_shape": (6,)}, "encoder"),
            ({"num_components": 0, "input_shape": (6,)}, "num_components"),
            ({"num_components": 2, "input_shape": (0,)}, "input_shape"),
            ({"num_components": 2, "input_shape": 6}, "input_shape"),
        ],
        ids=lambda v: str(v),
    )
    def test_bad_argument_names_it(self, kwargs, argument):
        kwargs.setdefault("encoder", keras.layers.Dense(2))
        with pytest.raises(ValueError, match=f"`{argument}`"):
            ke.VampPrior(**kwargs)


class TestScaleMixturePrior:
    def test_log_prob_matches_numpy_logaddexp(self):
        prior = ScaleMixturePrior(5, mixture_weight=0.3, scale1=1.5, scale2=0.01)
        w = np.random.default_rng(0).normal(scale=0.5, size=(7, 5)).astype("float32")
        w[0, :2] = [0.0, 1e-3]  # where the narrow component dominates
        w64 = w.astype(np.float64)
        log_normal = [-0.5 * (w64 / s) ** 2 - np.log(s) - 0.5 * h.LOG_2PI for s in (1.5, 0.01)]
        per_weight = np.logaddexp(np.log(0.3) + log_normal[0], np.log(0.7) + log_normal[1])
        np.testing.assert_allclose(
            prior.distribution().log_prob(w), per_weight.sum(axis=-1), rtol=1e-5
        )

    def test_defaults_are_blundell_et_al(self):
        prior = ScaleMixturePrior(2)
        assert (prior.mixture_weight, prior.scale1, prior.scale2) == (0.5, 1.0, np.exp(-6))
        variance = 0.5 * 1.0 + 0.5 * np.exp(-12)
        np.testing.assert_allclose(
            h.numpy(prior.distribution().stddev()) ** 2, [variance] * 2, rtol=1e-5
        )

    def test_latent_dim_none_takes_the_posterior_size(self):
        prior = ScaleMixturePrior()
        q = kd.MultivariateNormalDiag(np.zeros(6, "float32"), np.full(6, 0.1, "float32"))
        regularizer = ke.KLRegularizer(prior=prior)
        regularizer.check_posterior(q)
        assert prior.latent_dim == 6 and prior.get_config()["latent_dim"] == 6
        # No closed form against the mixture: Monte Carlo with q's exact entropy.
        assert regularizer.method(q, prior.distribution()) == "mc_entropy"

    def test_latent_dim_none_used_alone_says_what_to_do(self):
        with pytest.raises(ValueError, match="latent_dim=None.*Give latent_dim"):
            ScaleMixturePrior().distribution()

    @pytest.mark.parametrize(
        "kwargs, argument",
        [
            ({"latent_dim": 0}, "latent_dim"),
            ({"latent_dim": 2.0}, "latent_dim"),
            ({"mixture_weight": 0.0}, "mixture_weight"),
            ({"mixture_weight": 1.0}, "mixture_weight"),
            ({"mixture_weight": "half"}, "mixture_weight"),
            ({"scale1": 0.0}, "scale1"),
            ({"scale2": -1.0}, "scale2"),
            ({"scale2": None}, "scale2"),
        ],
        ids=lambda v: str(v),
    )
    def test_bad_argument_names_it(self, kwargs, argument):
        with pytest.raises(ValueError, match=f"`{argument}`"):
            ScaleMixturePrior(**kwargs)

    @pytest.mark.parametrize("latent_dim", [None, 4], ids=["size-from-posterior", "fixed-size"])
    def test_config_round_trip(self, latent_dim):
        clone = h.config_round_trip(
            ScaleMixturePrior(latent_dim, mixture_weight=0.25, scale1=2.0, scale2=0.1)
        )
        assert clone.latent_dim == latent_dim and clone.scale1 == 2.0


class TestNormalPriorOfPosteriorSize:
    def test_latent_dim_none_is_filled_by_check_posterior(self):
        prior = ke.NormalPrior(scale=2.0)
        assert prior.latent_dim is None and prior.get_config()["latent_dim"] is None
        q = kd.MultivariateNormalDiag(np.ones(3, "float32"), np.ones(3, "float32"))
        regularizer = ke.KLRegularizer(prior=prior)
        regularizer.check_posterior(q)
        assert prior.latent_dim == 3 and prior.get_config()["latent_dim"] == 3
        assert regularizer.method(q, prior.distribution()) == "analytic"

    def test_gaussian_posterior_fills_it_at_build(self):
        prior = ke.NormalPrior(scale=0.5)
        ke.GaussianPosterior(4, kl_regularizer=ke.KLRegularizer(prior=prior))(keras.Input((3,)))
        assert prior.latent_dim == 4

    def test_posterior_without_one_event_axis_is_refused(self):
        q = kd.Independent(kd.Normal(np.zeros((2, 3), "float32"), 1.0), 2)
        with pytest.raises(ValueError, match="one axis.*latent_dim"):
            ke.KLRegularizer(prior=ke.NormalPrior()).check_posterior(q)

    @pytest.mark.parametrize(
        "kwargs, argument",
        [({"latent_dim": True}, "latent_dim"), ({"loc": "0"}, "loc"), ({"scale": -1}, "scale")],
        ids=lambda v: str(v),
    )
    def test_bad_argument_names_it(self, kwargs, argument):
        with pytest.raises(ValueError, match=f"`{argument}`"):
            ke.NormalPrior(**kwargs)
