"""KLRegularizer: closed forms, Monte Carlo accuracy, mode choice, errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import keras_elbo as ke
from tests import _helpers as h

tfd = tfp.distributions

RNG = np.random.default_rng(0)
LOC = RNG.normal(size=(5, 4)).astype("float32")
SCALE = np.exp(RNG.normal(scale=0.5, size=(5, 4))).astype("float32")


def diag_posterior(loc=LOC, scale=SCALE):
    return tfd.MultivariateNormalDiag(loc=loc, scale_diag=scale)


def random_tril(batch, d, rng):
    tril = np.tril(rng.normal(scale=0.3, size=(batch, d, d)))
    idx = np.arange(d)
    tril[:, idx, idx] = np.exp(rng.normal(scale=0.3, size=(batch, d)))
    return tril.astype("float32")


def mixture_prior(d=4, k=3, seed=1):
    prior = ke.MixturePrior(d, num_components=k, seed=seed)
    rng = np.random.default_rng(seed)
    prior.logits.assign(rng.normal(size=k).astype("float32"))
    prior.raw_scale.assign(rng.normal(scale=0.5, size=(k, d)).astype("float32"))
    return prior


def added_loss(reg, posterior, sample=None):
    sample = posterior.sample(seed=(1, 2)) if sample is None else sample
    reg(sample, posterior=posterior)
    assert len(reg.losses) == 1
    return float(reg.losses[0])


class TestAnalytic:
    def test_diag_equals_numpy_closed_form(self):
        reg = ke.KLRegularizer(mode="analytic")
        expected = h.kl_diag_normal(LOC, SCALE).mean()
        np.testing.assert_allclose(added_loss(reg, diag_posterior()), expected, rtol=1e-5)

    def test_full_covariance_equals_numpy_trace_and_slogdet(self):
        tril = random_tril(5, 4, np.random.default_rng(3))
        q = tfd.MultivariateNormalTriL(loc=LOC, scale_tril=tril)
        reg = ke.KLRegularizer(mode="analytic")
        expected = h.kl_full_normal(LOC, tril).mean()
        np.testing.assert_allclose(added_loss(reg, q), expected, rtol=1e-5)

    def test_normal_prior_layer_of_other_scale(self):
        reg = ke.KLRegularizer(prior=ke.NormalPrior(4, loc=0.5, scale=2.0), mode="analytic")
        expected = h.kl_diag_normal(LOC, SCALE, prior_loc=0.5, prior_scale=2.0).mean()
        np.testing.assert_allclose(added_loss(reg, diag_posterior()), expected, rtol=1e-5)

    def test_independent_normal_posterior_gets_independent_default_prior(self):
        # A user's own posterior layer may build Independent(Normal): the
        # default prior must match its type so that the closed form is found.
        q = tfd.Independent(tfd.Normal(LOC, SCALE), reinterpreted_batch_ndims=1)
        reg = ke.KLRegularizer(mode="analytic")
        expected = h.kl_diag_normal(LOC, SCALE).mean()
        np.testing.assert_allclose(added_loss(reg, q), expected, rtol=1e-5)

    def test_mixture_prior_raises_clear_error(self):
        reg = ke.KLRegularizer(prior=mixture_prior(), mode="analytic")
        with pytest.raises(ValueError, match="mode='mc'") as err:
            added_loss(reg, diag_posterior())
        assert "MultivariateNormalDiag" in str(err.value)
        assert "MixtureSameFamily" in str(err.value)


class TestMonteCarlo:
    def test_agrees_with_closed_form_within_standard_error(self):
        n = 4000
        reg = ke.KLRegularizer(mode="mc", num_samples=n, seed=7)
        estimate = added_loss(reg, diag_posterior())
        # Standard error of the batch-mean of n-sample means, from the
        # log-ratio's spread measured in NumPy on independent draws.
        eps = np.random.default_rng(11).normal(size=(n, *LOC.shape))
        z = LOC + SCALE * eps
        log_ratio = h.diag_normal_logpdf(z, LOC, SCALE) - h.diag_normal_logpdf(z, 0.0, 1.0)
        std_err = log_ratio.mean(axis=1).std() / np.sqrt(n)
        expected = h.kl_diag_normal(LOC, SCALE).mean()
        assert abs(estimate - expected) < 4 * std_err, (estimate, expected, std_err)

    def test_gradient_agrees_with_closed_form_gradient(self):
        # KL[N(m, s**2) || N(0, 1)] per dimension has d/dm = m and
        # d/ds = s - 1/s. The reparameterised per-sample gradients are
        # z = m + s*e (std s) and -1/s + z*e (std sqrt(m**2 + 2 s**2)).
        n = 4000
        loc = tf.Variable(LOC[:1])
        scale = tf.Variable(SCALE[:1])
        reg = ke.KLRegularizer(mode="mc", num_samples=n, seed=3)
        with tf.GradientTape() as tape:
            q = tfd.MultivariateNormalDiag(loc=loc, scale_diag=scale)
            reg(q.sample(seed=(0, 1)), posterior=q)
            kl = reg.losses[0]
        g_loc, g_scale = (g.numpy() for g in tape.gradient(kl, [loc, scale]))
        m, s = LOC[:1].astype(np.float64), SCALE[:1].astype(np.float64)
        assert np.all(np.abs(g_loc - m) < 4 * s / np.sqrt(n))
        assert np.all(np.abs(g_scale - (s - 1 / s)) < 4 * np.sqrt(m**2 + 2 * s**2) / np.sqrt(n))

    def test_single_sample_reuses_the_given_sample(self):
        q = diag_posterior()
        z = q.sample(seed=(4, 5))
        reg = ke.KLRegularizer(mode="mc", num_samples=1)
        expected = np.mean(h.diag_normal_logpdf(z, LOC, SCALE) - h.diag_normal_logpdf(z, 0, 1))
        np.testing.assert_allclose(added_loss(reg, q, sample=z), expected, rtol=1e-5)

    def test_mixture_prior_matches_numpy_logsumexp_reference(self):
        prior = mixture_prior()
        n = 4000
        reg = ke.KLRegularizer(prior=prior, mode="auto", num_samples=n, seed=5)
        estimate = added_loss(reg, diag_posterior())
        eps = np.random.default_rng(12).normal(size=(n, *LOC.shape))
        z = LOC + SCALE * eps
        scales = h.softplus(prior.raw_scale.numpy()) + prior.min_scale
        log_ratio = h.diag_normal_logpdf(z, LOC, SCALE) - h.mixture_logpdf(
            z, prior.logits.numpy(), prior.loc.numpy(), scales
        )
        std_err = log_ratio.mean(axis=1).std() / np.sqrt(n)
        # The reference's own Monte Carlo error adds the same variance again.
        tol = 4 * np.sqrt(2) * std_err
        assert abs(estimate - log_ratio.mean()) < tol, (estimate, log_ratio.mean(), tol)


class TestAuto:
    def test_uses_closed_form_for_normal_prior(self):
        # Exact to float precision, and the same on every call: no sampling.
        reg = ke.KLRegularizer(mode="auto", num_samples=1)
        first = added_loss(reg, diag_posterior())
        second = added_loss(reg, diag_posterior())
        expected = h.kl_diag_normal(LOC, SCALE).mean()
        np.testing.assert_allclose([first, second], [expected, expected], rtol=1e-5)

    def test_uses_monte_carlo_for_mixture_prior(self):
        reg = ke.KLRegularizer(prior=mixture_prior(), mode="auto", num_samples=2, seed=0)
        q = diag_posterior()
        values = {added_loss(reg, q) for _ in range(3)}
        assert len(values) == 3  # fresh samples each call


class TestWeight:
    def test_weight_scales_added_loss(self):
        expected = h.kl_diag_normal(LOC, SCALE).mean()
        reg = ke.KLRegularizer(weight=2.5)
        np.testing.assert_allclose(added_loss(reg, diag_posterior()), 2.5 * expected, rtol=1e-5)
        reg.kl_weight.assign(0.25)
        np.testing.assert_allclose(added_loss(reg, diag_posterior()), 0.25 * expected, rtol=1e-5)

    def test_kl_weight_is_a_non_trainable_variable(self):
        reg = ke.KLRegularizer(weight=0.5)
        added_loss(reg, diag_posterior())
        assert reg.kl_weight in reg.non_trainable_weights
        assert not reg.trainable_weights


class TestErrors:
    @pytest.mark.parametrize(
        "kwargs, argument",
        [
            ({"mode": "exact"}, "mode"),
            ({"num_samples": 0}, "num_samples"),
            ({"num_samples": 2.5}, "num_samples"),
            ({"num_samples": True}, "num_samples"),
            ({"weight": -1.0}, "weight"),
            ({"weight": "1"}, "weight"),
            ({"prior": "normal"}, "prior"),
        ],
        ids=lambda v: str(v),
    )
    def test_bad_argument_names_it(self, kwargs, argument):
        with pytest.raises(ValueError, match=f"`{argument}`"):
            ke.KLRegularizer(**kwargs)

    def test_prior_of_other_size_is_rejected_at_model_construction(self):
        x = keras.Input((6,))
        reg = ke.KLRegularizer(prior=ke.MixturePrior(3, num_components=2))
        with pytest.raises(ValueError, match=r"event shape \(3,\).*\(4,\).*latent_dim"):
            ke.GaussianPosterior(4, kl_regularizer=reg)(x)

    def test_call_without_posterior_distribution(self):
        with pytest.raises(TypeError, match="posterior=q"):
            ke.KLRegularizer()(tf.zeros((2, 3)))

    def test_tfp_prior_trains_but_save_names_the_layer_to_use(self, tmp_path):
        prior = tfd.MultivariateNormalDiag(loc=tf.zeros(2), scale_diag=2.0 * tf.ones(2))
        x = keras.Input((3,))
        z = ke.GaussianPosterior(2, kl_regularizer=ke.KLRegularizer(prior=prior), seed=0)(x)
        model = keras.Model(x, keras.layers.Dense(3)(z))
        model.compile("adam", ke.GaussianNLL())
        data = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
        history = model.fit(data, data, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
        with pytest.raises(ValueError, match="NormalPrior.*MixturePrior"):
            model.save(tmp_path / "model.keras")


class TestSerialization:
    def test_config_round_trip_with_mixture_prior(self):
        reg = ke.KLRegularizer(
            prior=ke.MixturePrior(4, num_components=3, seed=2),
            mode="mc",
            num_samples=8,
            weight=0.5,
            seed=3,
            metric_name="kl_top",
        )
        clone = h.config_round_trip(reg)
        assert isinstance(clone.prior, ke.MixturePrior)
        assert clone.prior.num_components == 3


NARROW = (np.array([0.5, -0.3, 0.2, 1.0]), np.linspace(0.1, 0.5, 4))  # a trained VAE's q
NEAR_PRIOR = (np.array([0.1, -0.1, 0.05, 0.0]), np.linspace(0.9, 1.1, 4))


def one_sample_estimates(mode, regime, path_derivative=False, repeats=300):
    """One-sample KL estimates against a mixture prior and their gradients
    with respect to q's location and scale: `repeats` independent copies of
    one posterior in a batch, so that one call gives every estimate."""
    loc = tf.Variable(np.tile(regime[0], (repeats, 1)).astype("float32"))
    scale = tf.Variable(np.tile(regime[1], (repeats, 1)).astype("float32"))
    prior = ke.MixturePrior(4, num_components=5, init_loc_stddev=0.3, seed=1)
    reg = ke.KLRegularizer(prior=prior, mode=mode, path_derivative=path_derivative)
    with tf.GradientTape() as tape:
        q = tfd.MultivariateNormalDiag(loc=loc, scale_diag=scale)
        values = reg.kl_divergence(q, sample=q.sample(seed=(7, 0)))
        total = tf.reduce_sum(values)  # rows are independent: per-row gradients
    grads = tf.concat(tape.gradient(total, [loc, scale]), axis=-1)
    return values.numpy().astype(np.float64), grads.numpy().astype(np.float64)


def variance_ratio(a, b):
    """var(a) / var(b), summed over columns for gradients."""
    return np.var(a, axis=0, ddof=1).sum() / np.var(b, axis=0, ddof=1).sum()


class TestVarianceReduction:
    # With 300 samples each, the F-test's 1% point for a ratio of two
    # variances is about 1.31: a ratio above 2 (or below 0.5) is no chance.

    def test_mc_entropy_lowers_value_variance_for_narrow_posterior(self):
        v_mc, _ = one_sample_estimates("mc", NARROW)
        v_ent, _ = one_sample_estimates("mc_entropy", NARROW)
        assert variance_ratio(v_mc, v_ent) > 2  # measured 4.4
        # Both unbiased: their means agree within four standard errors.
        assert abs(v_mc.mean() - v_ent.mean()) < 4 * np.sqrt((v_mc.var() + v_ent.var()) / len(v_mc))

    @pytest.mark.parametrize("regime", [NARROW, NEAR_PRIOR], ids=["narrow", "near-prior"])
    def test_mc_entropy_gradient_equals_mc_gradient_sample_by_sample(self, regime):
        # For a location-scale q, log q(loc + scale * e) = -e**2/2 - log(scale)
        # - const: its reparameterised gradient is already exact, so replacing
        # it by the entropy changes the value's variance, not the gradient's.
        _, g_mc = one_sample_estimates("mc", regime)
        _, g_ent = one_sample_estimates("mc_entropy", regime)
        np.testing.assert_allclose(g_mc, g_ent, rtol=1e-4, atol=1e-4)

    def test_path_derivative_lowers_gradient_variance_near_prior(self):
        v_mc, g_mc = one_sample_estimates("mc", NEAR_PRIOR)
        v_stl, g_stl = one_sample_estimates("mc", NEAR_PRIOR, path_derivative=True)
        # Same value: "mc" reads log q from TFP's cache of the sampled noise,
        # the path derivative recomputes (z - loc) / scale; they differ by
        # float32 round-off of log-densities of size ~5 (ulp ~5e-7).
        np.testing.assert_allclose(v_mc, v_stl, rtol=0, atol=1e-5)
        assert variance_ratio(g_mc, g_stl) > 2  # measured 17

    def test_path_derivative_raises_gradient_variance_for_narrow_posterior(self):
        # The documented trade-off: far from the prior, dropping the score
        # term leaves the path term's noise uncancelled.
        _, g_mc = one_sample_estimates("mc", NARROW)
        _, g_stl = one_sample_estimates("mc", NARROW, path_derivative=True)
        assert variance_ratio(g_mc, g_stl) < 0.5  # measured 0.01


class TestFreeBits:
    def test_loss_clamps_each_dimension_and_metric_stays_true_kl(self):
        lam = 0.5
        per_dim = h.kl_diag_normal(LOC[..., None], SCALE[..., None]).mean(axis=0)  # (4,)
        assert np.any(per_dim < lam) and np.any(per_dim > lam)  # both cases occur
        reg = ke.KLRegularizer(free_bits=lam, mode="analytic")
        loss = added_loss(reg, diag_posterior())
        np.testing.assert_allclose(loss, np.maximum(per_dim, lam).sum(), rtol=1e-5)
        np.testing.assert_allclose(reg.last_kl.numpy(), per_dim.sum(), rtol=1e-5)

    def test_clamped_dimensions_get_no_gradient(self):
        lam = 0.5
        per_dim = h.kl_diag_normal(LOC[..., None], SCALE[..., None]).mean(axis=0)
        loc, scale = tf.Variable(LOC), tf.Variable(SCALE)
        reg = ke.KLRegularizer(free_bits=lam, mode="analytic")
        with tf.GradientTape() as tape:
            q = tfd.MultivariateNormalDiag(loc=loc, scale_diag=scale)
            reg(q.sample(seed=(0, 0)), posterior=q)
            loss = reg.losses[0]
        g_loc = tape.gradient(loss, loc).numpy()
        np.testing.assert_array_equal(g_loc[:, per_dim < lam], 0.0)
        assert np.all(np.abs(g_loc[:, per_dim > lam]).sum(axis=0) > 0)

    def test_monte_carlo_per_dimension_matches_numpy(self):
        q = diag_posterior()
        z = q.sample(seed=(3, 3))
        reg = ke.KLRegularizer(free_bits=0.3, mode="mc")
        per_dim = (
            h.diag_normal_logpdf(z.numpy()[..., None], LOC[..., None], SCALE[..., None])
            - h.diag_normal_logpdf(z.numpy()[..., None], 0.0, 1.0)
        ).mean(axis=0)
        loss = added_loss(reg, q, sample=z)
        np.testing.assert_allclose(loss, np.maximum(per_dim, 0.3).sum(), rtol=1e-5, atol=1e-6)

    def test_non_factorised_kl_is_clamped_as_a_whole(self):
        tril = random_tril(5, 4, np.random.default_rng(3))
        q = tfd.MultivariateNormalTriL(loc=LOC, scale_tril=tril)
        kl = h.kl_full_normal(LOC, tril).mean()
        for lam, expected in ((0.1, kl), (kl, 4 * kl)):  # threshold lam * latent_dim
            reg = ke.KLRegularizer(free_bits=float(lam), mode="analytic")
            np.testing.assert_allclose(added_loss(reg, q), max(expected, 4 * lam), rtol=1e-5)


class TestNewArgumentErrors:
    @pytest.mark.parametrize(
        "kwargs, argument",
        [({"free_bits": -0.1}, "free_bits"), ({"path_derivative": 1}, "path_derivative")],
        ids=lambda v: str(v),
    )
    def test_bad_argument_names_it(self, kwargs, argument):
        with pytest.raises(ValueError, match=f"`{argument}`"):
            ke.KLRegularizer(**kwargs)

    def test_mc_entropy_needs_a_closed_form_entropy(self):
        q = tfd.MixtureSameFamily(
            tfd.Categorical(logits=tf.zeros((5, 2))),
            tfd.MultivariateNormalDiag(loc=tf.zeros((5, 2, 4))),
        )
        with pytest.raises(ValueError, match="no closed-form entropy.*mode='mc'"):
            added_loss(ke.KLRegularizer(mode="mc_entropy"), q)

    def test_auto_prefers_mc_entropy_unless_path_derivative(self):
        prior = mixture_prior()
        q = diag_posterior()
        assert ke.KLRegularizer(prior=prior).method(q, prior.distribution()) == "mc_entropy"
        stl = ke.KLRegularizer(prior=prior, path_derivative=True)
        assert stl.method(q, prior.distribution()) == "mc"
        assert ke.KLRegularizer().method(q, tfd.MultivariateNormalDiag(tf.zeros(4))) == "analytic"


class TestReductionOverNonBatchAxes:
    """Issue 10, point 2: the first axis is the batch; the KL is summed over
    every other axis of q's batch shape, then averaged over the batch."""

    def test_elementwise_normal_posterior_sums_over_latent_dimensions(self):
        # The seed document's code: elementwise Normals against Normals.
        q = tfd.Normal(loc=LOC, scale=SCALE)
        prior = tfd.Normal(tf.zeros(4), tf.ones(4))
        reg = ke.KLRegularizer(prior=prior, mode="analytic")
        expected = h.kl_diag_normal(LOC, SCALE).mean()  # summed over 4 dims
        np.testing.assert_allclose(added_loss(reg, q), expected, rtol=1e-5)
        np.testing.assert_allclose(reg.kl_divergence(q), h.kl_diag_normal(LOC, SCALE), rtol=1e-5)

    def test_elementwise_posterior_against_tfd_mixture_sums_over_latent_dimensions(self):
        weights, locs, scales = np.array([0.3, 0.7]), np.array([-1.0, 2.0]), np.array([1.0, 0.5])
        prior = tfd.Mixture(
            cat=tfd.Categorical(probs=weights.astype("float32")),
            components=[tfd.Normal(float(m), float(s)) for m, s in zip(locs, scales, strict=True)],
        )
        num_samples = 2000
        reg = ke.KLRegularizer(prior=prior, mode="mc", num_samples=num_samples, seed=5)
        estimate = added_loss(reg, tfd.Normal(loc=LOC, scale=SCALE))
        # Reference: the same estimator in NumPy float64 with 100x the
        # samples; per example the log ratio summed over the 4 dimensions.
        rng = np.random.default_rng(0)
        z = LOC + SCALE * rng.normal(size=(100 * num_samples, *LOC.shape))
        log_q = -0.5 * ((z - LOC) / SCALE) ** 2 - np.log(SCALE) - 0.5 * h.LOG_2PI
        log_p = h.mixture_logpdf(z[..., None], np.log(weights), locs[:, None], scales[:, None])
        ratio = (log_q - log_p).sum(axis=-1)  # (samples, batch)
        reference = ratio.mean()
        # The estimate averages num_samples draws per example over 5
        # examples: its standard error is sqrt(sum_b var_b / S) / B.
        std_err = np.sqrt(ratio.var(axis=0).sum() / num_samples) / LOC.shape[0]
        assert abs(estimate - reference) < 4 * std_err, (estimate, reference, std_err)
        # Averaging over the latent dimensions instead would be 4 times smaller.
        assert abs(reference / 4 - reference) > 20 * std_err

    def test_latent_map_sums_over_positions(self):
        rng = np.random.default_rng(4)
        loc = rng.normal(size=(2, 3, 5, 4)).astype("float32")  # (batch, h, w, d)
        scale = np.exp(rng.normal(scale=0.3, size=loc.shape)).astype("float32")
        reg = ke.KLRegularizer(mode="analytic")
        expected = h.kl_diag_normal(loc, scale).sum(axis=(1, 2)).mean()
        np.testing.assert_allclose(added_loss(reg, diag_posterior(loc, scale)), expected, rtol=1e-5)


class TestTFPPriorWithVariables:
    """Issue 10, point 8: a Keras 3 model would not train them."""

    def test_refused_at_construction_naming_the_prior_layers(self):
        prior = tfd.MultivariateNormalDiag(loc=tf.Variable(tf.zeros(4)))
        with pytest.raises(ValueError, match="tf.Variable.*keras_elbo.MixturePrior"):
            ke.KLRegularizer(prior=prior)

    def test_fixed_tfp_prior_is_accepted(self):
        reg = ke.KLRegularizer(prior=tfd.MultivariateNormalDiag(loc=tf.zeros(4)), mode="analytic")
        expected = h.kl_diag_normal(LOC, SCALE).mean()
        np.testing.assert_allclose(added_loss(reg, diag_posterior()), expected, rtol=1e-5)
