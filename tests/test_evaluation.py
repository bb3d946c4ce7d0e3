"""ELBO and importance-weighted log p(x) on a linear Gaussian latent model.

p(z) = N(0, I), p(x|z) = N(z @ K + b, sigma**2 I): the marginal
p(x) = N(b, K.T @ K + sigma**2 I) and the ELBO of a Gaussian q are closed forms,
computed here in NumPy float64.
"""

import keras
import numpy as np
import pytest
import tensorflow_probability as tfp

import keras_elbo as ke
from tests import _helpers as h

D, LATENT, SIGMA = 5, 2, 0.5
RNG = np.random.default_rng(0)
K_DEC = RNG.normal(size=(LATENT, D))
B_DEC = RNG.normal(size=D)
X = RNG.multivariate_normal(B_DEC, K_DEC.T @ K_DEC + SIGMA**2 * np.eye(D), size=40)


def exact_posterior():
    """The exact q(z|x) = N((x - b) @ A, cov) of the linear Gaussian model."""
    cov = np.linalg.inv(np.eye(LATENT) + K_DEC @ K_DEC.T / SIGMA**2)
    return K_DEC.T @ cov / SIGMA**2, cov


def make_model(loc_shift=0.0, scale_factor=1.0):
    """The linear Gaussian model with a diagonal q, exact or made worse."""
    x = keras.Input((D,))
    posterior = ke.GaussianPosterior(
        LATENT, kl_regularizer=ke.KLRegularizer(), min_scale=1e-6, seed=0
    )
    decoder = keras.layers.Dense(D)
    model = keras.Model(x, decoder(posterior(x)))
    model.compile(loss=ke.GaussianNLL(scale=SIGMA))
    a, cov = exact_posterior()
    scale = np.sqrt(np.diag(cov)) * scale_factor
    raw_scale = np.log(np.expm1(scale - 1e-6))
    kernel = np.concatenate([a, np.zeros((D, LATENT))], axis=1)
    bias = np.concatenate([-B_DEC @ a + loc_shift, raw_scale])
    posterior.projection.set_weights([kernel, bias])
    decoder.set_weights([K_DEC, B_DEC])
    return model, (X - B_DEC) @ a + loc_shift, scale


def make_exact_full_covariance_model():
    min_scale = 1e-6
    x = keras.Input((D,))
    posterior = ke.GaussianPosterior(
        LATENT, covariance="full", kl_regularizer=ke.KLRegularizer(), min_scale=min_scale
    )
    decoder = keras.layers.Dense(D)
    model = keras.Model(x, decoder(posterior(x)))
    model.compile(loss=ke.GaussianNLL(scale=SIGMA))
    a, cov = exact_posterior()
    tril = np.linalg.cholesky(cov)
    raw_tril = tril.copy()
    np.fill_diagonal(raw_tril, np.log(np.expm1(np.diag(tril) - min_scale)))
    # The layer's layout of the triangle's entries is TFP's fill_triangular.
    raw = tfp.math.fill_triangular_inverse(raw_tril.astype("float32")).numpy()
    kernel = np.concatenate([a, np.zeros((D, raw.size))], axis=1)
    bias = np.concatenate([-B_DEC @ a, raw])
    posterior.projection.set_weights([kernel, bias])
    decoder.set_weights([K_DEC, B_DEC])
    return model


def true_log_px():
    cov = K_DEC.T @ K_DEC + SIGMA**2 * np.eye(D)
    diff = X - B_DEC
    _, logdet = np.linalg.slogdet(cov)
    maha = np.einsum("nd,de,ne->n", diff, np.linalg.inv(cov), diff)
    return -0.5 * (maha + logdet + D * np.log(2 * np.pi))


def elbo_closed_form(loc, scale):
    """E_q[log p(x|z)] - KL[q || p] for q = N(loc, diag(scale**2))."""
    mean = loc @ K_DEC + B_DEC
    trace = np.einsum("nj,jd->n", scale**2, K_DEC**2)
    expected_log_lik = -0.5 * (
        (np.sum((X - mean) ** 2, axis=1) + trace) / SIGMA**2 + D * np.log(2 * np.pi * SIGMA**2)
    )
    return expected_log_lik - h.kl_diag_normal(loc, scale)


class TestEvaluateELBO:
    def test_matches_closed_form_within_standard_error(self):
        model, loc, scale = make_model(loc_shift=0.3, scale_factor=1.5)
        n = 2000
        result = ke.evaluate_elbo(model, X, num_samples=n, seed=1, verbose=0)
        expected = elbo_closed_form(loc, np.broadcast_to(scale, loc.shape))
        np.testing.assert_allclose(result["kl"], h.kl_diag_normal(loc, scale), rtol=1e-4)
        # The reconstruction's spread per sample, measured from the estimate
        # of a second run: its standard error is spread / sqrt(n).
        np.testing.assert_allclose(result["elbo"], -result["reconstruction"] - result["kl"])
        tiled = np.tile(X, (30, 1))  # 30 one-sample estimates of each example
        single = ke.evaluate_elbo(model, tiled, seed=5, verbose=0)["elbo"].reshape(30, -1)
        std_err = np.std(single, axis=0, ddof=1) / np.sqrt(n)
        assert np.all(np.abs(result["elbo"] - expected) < 5 * std_err)

    def test_exact_full_covariance_posterior_gives_log_px(self):
        # With the exact q the ELBO is log p(x); its estimate (analytic KL,
        # sampled reconstruction) is within its standard error of it.
        model = make_exact_full_covariance_model()
        n = 2000
        elbo = ke.evaluate_elbo(model, X, num_samples=n, seed=2, verbose=0)["elbo"]
        single = ke.evaluate_elbo(model, np.tile(X, (30, 1)), seed=6, verbose=0)["elbo"]
        std_err = single.reshape(30, -1).std(axis=0, ddof=1) / np.sqrt(n)
        assert np.all(np.abs(elbo - true_log_px()) < 5 * std_err)


class TestImportanceWeighted:
    def test_exact_posterior_gives_log_px_without_noise(self):
        # With the exact q, log p(x|z) + log p(z) - log q(z|x) = log p(x) for
        # every z: every importance weight is the same, at any K.
        model = make_exact_full_covariance_model()
        iwae = ke.importance_weighted_log_likelihood(model, X, num_samples=7, verbose=0)
        np.testing.assert_allclose(iwae, true_log_px(), rtol=1e-4, atol=1e-4)

    def test_approaches_log_px_as_samples_grow(self):
        model, _, _ = make_model(loc_shift=0.4, scale_factor=1.4)
        truth = true_log_px()
        gaps = []
        for k in (1, 10, 100, 1000):
            estimate = ke.importance_weighted_log_likelihood(
                model, X, num_samples=k, batch_size=8, seed=k, verbose=0
            )
            gaps.append(np.mean(truth - estimate))
        assert gaps[0] > gaps[1] > gaps[2] > gaps[3] >= -0.01, gaps
        assert gaps[-1] < 0.02 * gaps[0], gaps

    def test_one_sample_is_the_elbo_in_expectation(self):
        model, loc, scale = make_model(loc_shift=0.3, scale_factor=1.5)
        tiled = np.tile(X, (60, 1))  # 60 independent runs over the data
        estimates = ke.importance_weighted_log_likelihood(
            model, tiled, num_samples=1, batch_size=40, seed=4, verbose=0
        )
        runs = estimates.reshape(60, -1).mean(axis=1)
        expected = elbo_closed_form(loc, np.broadcast_to(scale, loc.shape)).mean()
        assert abs(runs.mean() - expected) < 4 * runs.std(ddof=1) / np.sqrt(len(runs))

    def test_chunking_does_not_change_the_estimate(self):
        model, _, _ = make_model(loc_shift=0.4, scale_factor=1.4)
        kwargs = dict(num_samples=50, batch_size=4, seed=3, verbose=0)
        whole = ke.importance_weighted_log_likelihood(model, X, max_decoder_batch=400, **kwargs)
        chunked = ke.importance_weighted_log_likelihood(model, X, max_decoder_batch=28, **kwargs)
        # Different chunks draw different samples: the per-example
        # differences must average to zero within their standard error.
        diff = whole - chunked
        assert abs(diff.mean()) < 4 * diff.std(ddof=1) / np.sqrt(len(diff))


class TestErrors:
    def test_model_without_posterior(self):
        x = keras.Input((D,))
        model = keras.Model(x, keras.layers.Dense(D)(x))
        model.compile(loss=ke.GaussianNLL())
        with pytest.raises(ValueError, match="exactly one posterior"):
            ke.evaluate_elbo(model, X, verbose=0)

    def test_foreign_loss_needs_likelihood(self):
        model, _, _ = make_model()
        model.compile(loss="mse")
        with pytest.raises(ValueError, match="likelihood="):
            ke.importance_weighted_log_likelihood(model, X, num_samples=2, verbose=0)
        gaussian = ke.GaussianNLL(scale=SIGMA)
        estimate = ke.importance_weighted_log_likelihood(
            model, X, num_samples=2, likelihood=gaussian, verbose=0
        )
        assert estimate.shape == (len(X),)

    @pytest.mark.parametrize("num_samples", [0, 1.5, True])
    def test_bad_num_samples(self, num_samples):
        model, _, _ = make_model()
        with pytest.raises(ValueError, match="`num_samples`"):
            ke.evaluate_elbo(model, X, num_samples=num_samples, verbose=0)

    @pytest.mark.parametrize(
        "kwargs, argument",
        [
            ({"batch_size": 0}, "batch_size"),
            ({"batch_size": -1}, "batch_size"),
            ({"batch_size": 2.5}, "batch_size"),
            ({"max_decoder_batch": 10, "batch_size": 20}, "max_decoder_batch"),
            ({"max_decoder_batch": 100.0}, "max_decoder_batch"),
        ],
    )
    def test_bad_batch_sizes_are_named(self, kwargs, argument):
        model, _, _ = make_model()
        with pytest.raises(ValueError, match=f"`{argument}`"):
            ke.importance_weighted_log_likelihood(model, X, num_samples=2, verbose=0, **kwargs)
        if "max_decoder_batch" not in kwargs:
            with pytest.raises(ValueError, match=f"`{argument}`"):
                ke.evaluate_elbo(model, X, verbose=0, **kwargs)
