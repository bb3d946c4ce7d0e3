"""Reconstruction losses against NumPy log-likelihoods, in nats per example."""

import keras
import numpy as np
import pytest

import keras_elbo as ke
from tests import _helpers as h

RNG = np.random.default_rng(0)


def bernoulli_nll_numpy(x, logits):
    logits = logits.astype(np.float64)
    log_p, log_1mp = -np.logaddexp(0, -logits), -np.logaddexp(0, logits)
    nll = -(x * log_p + (1 - x) * log_1mp)
    return nll.reshape(len(x), -1).sum(axis=1)


class TestBernoulliNLL:
    def test_zero_logits_give_pixels_times_log2(self):
        x = (RNG.random((4, 784)) < 0.5).astype("float32")
        per_example = ke.bernoulli_nll(x, np.zeros_like(x), from_logits=True)
        np.testing.assert_allclose(per_example, 784 * np.log(2.0), rtol=1e-6)

    @pytest.mark.parametrize("shape", [(6, 10), (6, 4, 4, 1)], ids=["flat", "image"])
    def test_logits_match_numpy_and_sum_over_all_event_axes(self, shape):
        x = (RNG.random(shape) < 0.3).astype("float32")
        logits = RNG.normal(scale=3.0, size=shape).astype("float32")
        expected = bernoulli_nll_numpy(x, logits)
        np.testing.assert_allclose(
            ke.bernoulli_nll(x, logits, from_logits=True), expected, rtol=1e-5
        )
        loss = ke.BernoulliNLL(from_logits=True)
        np.testing.assert_allclose(float(loss(x, logits)), expected.mean(), rtol=1e-5)

    def test_probabilities_match_numpy(self):
        x = (RNG.random((5, 7)) < 0.5).astype("float32")
        logits = RNG.normal(size=(5, 7))
        probs = (1 / (1 + np.exp(-logits))).astype("float32")
        np.testing.assert_allclose(
            ke.BernoulliNLL()(x, probs), bernoulli_nll_numpy(x, logits).mean(), rtol=1e-4
        )

    def test_sample_weight(self):
        x = np.ones((2, 3), "float32")
        logits = np.array([[0.0] * 3, [1.0] * 3], "float32")
        per_example = bernoulli_nll_numpy(x, logits)
        value = ke.BernoulliNLL(from_logits=True)(x, logits, sample_weight=np.array([1.0, 0.0]))
        np.testing.assert_allclose(float(value), per_example[0] / 2, rtol=1e-6)

    def test_config_round_trip(self):
        loss = ke.BernoulliNLL(from_logits=True, name="recon")
        clone = ke.BernoulliNLL.from_config(loss.get_config())
        assert clone.get_config() == loss.get_config() and clone.from_logits


class TestGaussianNLL:
    def test_fixed_scale_matches_numpy(self):
        x = RNG.normal(size=(5, 6)).astype("float32")
        loc = RNG.normal(size=(5, 6)).astype("float32")
        expected = -h.diag_normal_logpdf(x, loc, 0.7)
        np.testing.assert_allclose(ke.gaussian_nll(x, loc, scale=0.7), expected, rtol=1e-5)
        np.testing.assert_allclose(ke.GaussianNLL(scale=0.7)(x, loc), expected.mean(), rtol=1e-5)

    def test_learned_scale_matches_numpy(self):
        x = RNG.normal(size=(5, 6)).astype("float32")
        y_pred = RNG.normal(size=(5, 12)).astype("float32")
        scale = h.softplus(y_pred[:, 6:].astype(np.float64)) + 1e-3
        expected = -h.diag_normal_logpdf(x, y_pred[:, :6], scale)
        np.testing.assert_allclose(
            ke.GaussianNLL(scale=None)(x, y_pred), expected.mean(), rtol=1e-5
        )

    def test_learned_scale_needs_twice_the_outputs(self):
        with pytest.raises(ValueError, match="twice"):
            ke.GaussianNLL(scale=None)(np.zeros((2, 3)), np.zeros((2, 3)))

    @pytest.mark.parametrize(
        "kwargs, argument", [({"scale": 0.0}, "scale"), ({"min_scale": -1.0}, "min_scale")]
    )
    def test_bad_argument_names_it(self, kwargs, argument):
        with pytest.raises(ValueError, match=f"`{argument}`"):
            ke.GaussianNLL(**kwargs)

    def test_config_round_trip(self):
        loss = ke.GaussianNLL(scale=None, min_scale=0.01)
        assert ke.GaussianNLL.from_config(loss.get_config()).get_config() == loss.get_config()


def test_losses_are_keras_losses():
    assert isinstance(ke.BernoulliNLL(), keras.losses.Loss)
    assert isinstance(ke.GaussianNLL(), keras.losses.Loss)
