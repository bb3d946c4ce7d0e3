"""Prior layers: densities against NumPy, weights, errors, configs."""

import numpy as np
import pytest

import keras_elbo as ke
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
        np.testing.assert_allclose(prior.distribution().log_prob(z), expected, rtol=1e-5)

    def test_initial_scale_and_distinct_components(self):
        prior = ke.MixturePrior(2, num_components=5, init_scale=0.5, seed=1)
        comps = prior.distribution().components_distribution
        np.testing.assert_allclose(comps.stddev(), 0.5, rtol=1e-5)
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


def test_prior_is_not_called_on_tensors():
    with pytest.raises(TypeError, match="distribution"):
        ke.MixturePrior(2, 2)(np.zeros((1, 2), "float32"))
