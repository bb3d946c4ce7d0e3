"""KLRegularizer: closed forms, Monte Carlo accuracy, mode choice, errors.

On every backend with the library's own distributions (`keras_elbo.distributions`);
on TensorFlow also with TFP distributions as posterior and prior, including the
seed document's three examples as a TFP user writes them with Keras 3. The
same seed draws differently on different backends: Monte Carlo checks are
statistical (tolerances from standard errors), never equal draws.
"""

import functools

import keras
import numpy as np
import pytest

import keras_elbo as ke
from keras_elbo import distributions as kd
from tests import _helpers as h

TENSORFLOW_ONLY = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="TFP interop: TFP distributions exist on the TensorFlow backend only",
)

RNG = np.random.default_rng(0)
LOC = RNG.normal(size=(5, 4)).astype("float32")
SCALE = np.exp(RNG.normal(scale=0.5, size=(5, 4))).astype("float32")


def tfp_modules():
    """`(tfd, tfb)`, imported on first use (TensorFlow-only tests)."""
    import tensorflow_probability as tfp

    return tfp.distributions, tfp.bijectors


def diag_posterior(loc=LOC, scale=SCALE):
    return kd.MultivariateNormalDiag(loc, scale)


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
    sample = posterior.sample(seed=12) if sample is None else sample
    reg(sample, posterior=posterior)
    assert len(reg.losses) == 1
    return float(h.numpy(reg.losses[0]))


def check_against_mixture_reference(estimate, prior, n):
    """`estimate`, an n-sample Monte Carlo KL of `diag_posterior()` against
    the `MixturePrior` `prior`, agrees with the NumPy estimator on
    independent draws."""
    eps = np.random.default_rng(12).normal(size=(n, *LOC.shape))
    z = LOC + SCALE * eps
    scales = h.softplus(h.numpy(prior.raw_scale)) + prior.min_scale
    log_ratio = h.diag_normal_logpdf(z, LOC, SCALE) - h.mixture_logpdf(
        z, h.numpy(prior.logits), h.numpy(prior.loc), scales
    )
    # Standard error of the batch-mean of n-sample means; the reference's
    # own Monte Carlo error adds the same variance again.
    std_err = log_ratio.mean(axis=1).std() / np.sqrt(n)
    tol = 4 * np.sqrt(2) * std_err
    assert abs(estimate - log_ratio.mean()) < tol, (estimate, log_ratio.mean(), tol)


# A mixture of two scalar normals, the prior of every latent dimension.
MIXTURE_WEIGHTS, MIXTURE_LOCS, MIXTURE_SCALES = (
    np.array([0.3, 0.7]),
    np.array([-1.0, 2.0]),
    np.array([1.0, 0.5]),
)


@functools.cache
def elementwise_mixture_log_ratios(num_samples):
    """log q(z) - log p(z) of the elementwise `Normal(LOC, SCALE)` against
    the elementwise two-normal mixture, in NumPy float64, summed over the
    4 dimensions: shape `(num_samples, batch)`."""
    rng = np.random.default_rng(0)
    z = LOC + SCALE * rng.normal(size=(num_samples, *LOC.shape))
    log_q = -0.5 * ((z - LOC) / SCALE) ** 2 - np.log(SCALE) - 0.5 * h.LOG_2PI
    log_weighted = (
        np.log(MIXTURE_WEIGHTS)
        - 0.5 * ((z[..., None] - MIXTURE_LOCS) / MIXTURE_SCALES) ** 2
        - np.log(MIXTURE_SCALES)
        - 0.5 * h.LOG_2PI
    )  # (samples, batch, 4, components)
    log_p = np.logaddexp.reduce(log_weighted, axis=-1)  # faster than scipy's logsumexp
    return (log_q - log_p).sum(axis=-1)


def check_against_elementwise_mixture_reference(estimate, num_samples):
    """`estimate`, a `num_samples`-sample Monte Carlo KL of the elementwise
    `Normal(LOC, SCALE)` against the elementwise two-normal mixture, agrees
    with the same estimator in NumPy float64 with 100x the samples, per
    example summed over the 4 dimensions."""
    ratio = elementwise_mixture_log_ratios(100 * num_samples)  # (samples, batch)
    reference = ratio.mean()
    # The estimate averages num_samples draws per example over 5
    # examples: its standard error is sqrt(sum_b var_b / S) / B.
    std_err = np.sqrt(ratio.var(axis=0).sum() / num_samples) / LOC.shape[0]
    assert abs(estimate - reference) < 4 * std_err, (estimate, reference, std_err)
    # Averaging over the latent dimensions instead would be 4 times smaller.
    assert abs(reference / 4 - reference) > 20 * std_err


class TestAnalytic:
    def test_diag_equals_numpy_closed_form(self):
        reg = ke.KLRegularizer(mode="analytic")
        expected = h.kl_diag_normal(LOC, SCALE).mean()
        np.testing.assert_allclose(added_loss(reg, diag_posterior()), expected, rtol=1e-5)

    def test_full_covariance_equals_numpy_trace_and_slogdet(self):
        tril = random_tril(5, 4, np.random.default_rng(3))
        q = kd.MultivariateNormalTriL(LOC, tril)
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
        q = kd.Independent(kd.Normal(LOC, SCALE), reinterpreted_batch_ndims=1)
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
        # The loss is the mean over the batch of B rows: row b's gradient
        # is 1/B of its own KL's.
        n = 4000
        reg = ke.KLRegularizer(mode="mc", num_samples=n, seed=3)

        def kl(loc, scale):
            q = kd.MultivariateNormalDiag(loc, scale)
            reg(q.sample(seed=1), posterior=q)
            return reg.losses[0]

        g_loc, g_scale = (len(LOC) * g for g in h.gradients(kl, LOC, SCALE))
        m, s = LOC.astype(np.float64), SCALE.astype(np.float64)
        assert np.all(np.abs(g_loc - m) < 4 * s / np.sqrt(n))
        assert np.all(np.abs(g_scale - (s - 1 / s)) < 4 * np.sqrt(m**2 + 2 * s**2) / np.sqrt(n))

    def test_single_sample_reuses_the_given_sample(self):
        q = diag_posterior()
        z = q.sample(seed=45)
        reg = ke.KLRegularizer(mode="mc", num_samples=1)
        z_np = h.numpy(z)
        expected = np.mean(
            h.diag_normal_logpdf(z_np, LOC, SCALE) - h.diag_normal_logpdf(z_np, 0, 1)
        )
        np.testing.assert_allclose(added_loss(reg, q, sample=z), expected, rtol=1e-5)

    def test_mixture_prior_matches_numpy_logsumexp_reference(self):
        prior = mixture_prior()
        n = 4000
        reg = ke.KLRegularizer(prior=prior, mode="auto", num_samples=n, seed=5)
        check_against_mixture_reference(added_loss(reg, diag_posterior()), prior, n)


class TestAuto:
    def test_uses_closed_form_for_normal_prior(self):
        # Exact to float precision, and the same on every call: no sampling.
        reg = ke.KLRegularizer(mode="auto", num_samples=1)
        first = added_loss(reg, diag_posterior())
        second = added_loss(reg, diag_posterior())
        expected = h.kl_diag_normal(LOC, SCALE).mean()
        np.testing.assert_allclose([first, second], [expected, expected], rtol=1e-5)

    def test_uses_monte_carlo_for_mixture_prior(self):
        # As many samples as the tests above: JAX reuses their compiled shapes.
        reg = ke.KLRegularizer(prior=mixture_prior(), mode="auto", num_samples=4000, seed=0)
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
            ke.KLRegularizer()(keras.ops.zeros((2, 3)))

    def test_distribution_prior_trains_but_save_names_the_layer_to_use(self, tmp_path):
        prior = kd.MultivariateNormalDiag(keras.ops.zeros(2), 2.0 * keras.ops.ones(2))
        x = keras.Input((3,))
        z = ke.GaussianPosterior(2, kl_regularizer=ke.KLRegularizer(prior=prior), seed=0)(x)
        model = keras.Model(x, keras.layers.Dense(3)(z))
        model.compile("adam", "mse")
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


# q's location and scale in two regimes.
REGIMES = {
    "narrow": (np.array([0.5, -0.3, 0.2, 1.0]), np.linspace(0.1, 0.5, 4)),  # a trained VAE's q
    "near-prior": (np.array([0.1, -0.1, 0.05, 0.0]), np.linspace(0.9, 1.1, 4)),
}
NARROW, NEAR_PRIOR = "narrow", "near-prior"


@functools.cache  # several tests share estimates; JAX traces each call anew
def one_sample_estimates(mode, regime, path_derivative=False, repeats=300):
    """One-sample KL estimates against a mixture prior and their gradients
    with respect to q's location and scale: `repeats` independent copies of
    one posterior in a batch, so that one call gives every estimate. The
    integer seed gives the same draws to the value and to the gradient."""
    loc = np.tile(REGIMES[regime][0], (repeats, 1)).astype("float32")
    scale = np.tile(REGIMES[regime][1], (repeats, 1)).astype("float32")
    prior = ke.MixturePrior(4, num_components=5, init_loc_stddev=0.3, seed=1)
    reg = ke.KLRegularizer(prior=prior, mode=mode, path_derivative=path_derivative)

    def values(loc, scale):
        q = kd.MultivariateNormalDiag(loc, scale)
        return reg.kl_divergence(q, sample=q.sample(seed=70))

    grads = h.gradients(values, loc, scale)  # rows are independent: per-row gradients
    return h.numpy(values(loc, scale)), np.concatenate(grads, axis=-1)


def variance_ratio(a, b):
    """var(a) / var(b), summed over columns for gradients."""
    return np.var(a, axis=0, ddof=1).sum() / np.var(b, axis=0, ddof=1).sum()


class TestVarianceReduction:
    # With 300 samples each, the F-test's 1% point for a ratio of two
    # variances is about 1.31: a ratio above 2 (or below 0.5) is no chance.

    def test_mc_entropy_lowers_value_variance_for_narrow_posterior(self):
        v_mc, _ = one_sample_estimates("mc", NARROW)
        v_ent, _ = one_sample_estimates("mc_entropy", NARROW)
        assert variance_ratio(v_mc, v_ent) > 2  # measured 3.8 (TF), 9.5 (JAX, PyTorch)
        # Both unbiased: their means agree within four standard errors.
        assert abs(v_mc.mean() - v_ent.mean()) < 4 * np.sqrt((v_mc.var() + v_ent.var()) / len(v_mc))

    @pytest.mark.parametrize("regime", [NARROW, NEAR_PRIOR])
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
        # Same value: both evaluate log q(z) from the same parameters, one
        # of them behind stop_gradient; they may differ by float32 round-off
        # of log-densities of size ~5 (ulp ~5e-7).
        np.testing.assert_allclose(v_mc, v_stl, rtol=0, atol=1e-5)
        assert variance_ratio(g_mc, g_stl) > 2  # measured 19 (TF), 45 (JAX), 29 (PyTorch)

    def test_path_derivative_raises_gradient_variance_for_narrow_posterior(self):
        # The documented trade-off: far from the prior, dropping the score
        # term leaves the path term's noise uncancelled.
        _, g_mc = one_sample_estimates("mc", NARROW)
        _, g_stl = one_sample_estimates("mc", NARROW, path_derivative=True)
        assert variance_ratio(g_mc, g_stl) < 0.5  # measured 0.005 to 0.01

    def test_path_derivative_gradient_is_zero_when_q_equals_the_prior(self):
        # log q(z) - log p(z) is constant in z when q = p: the path term
        # d/dz (log q - log p) * dz/dparameter vanishes exactly, sample by sample.
        reg = ke.KLRegularizer(mode="mc", path_derivative=True)

        def kl(loc, scale):
            q = kd.MultivariateNormalDiag(loc, scale)
            return reg.kl_divergence(q, sample=q.sample(seed=0))

        grads = h.gradients(kl, np.zeros_like(LOC), np.ones_like(SCALE))
        np.testing.assert_array_equal(np.concatenate(grads), 0.0)


class TestFreeBits:
    def test_loss_clamps_each_dimension_and_metric_stays_true_kl(self):
        lam = 0.5
        per_dim = h.kl_diag_normal(LOC[..., None], SCALE[..., None]).mean(axis=0)  # (4,)
        assert np.any(per_dim < lam) and np.any(per_dim > lam)  # both cases occur
        reg = ke.KLRegularizer(free_bits=lam, mode="analytic")
        loss = added_loss(reg, diag_posterior())
        np.testing.assert_allclose(loss, np.maximum(per_dim, lam).sum(), rtol=1e-5)
        np.testing.assert_allclose(h.numpy(reg.last_kl), per_dim.sum(), rtol=1e-5)

    def test_clamped_dimensions_get_no_gradient(self):
        lam = 0.5
        per_dim = h.kl_diag_normal(LOC[..., None], SCALE[..., None]).mean(axis=0)
        reg = ke.KLRegularizer(free_bits=lam, mode="analytic")

        def loss(loc, scale):
            q = kd.MultivariateNormalDiag(loc, scale)
            reg(q.sample(seed=0), posterior=q)
            return reg.losses[0]

        g_loc, _ = h.gradients(loss, LOC, SCALE)
        np.testing.assert_array_equal(g_loc[:, per_dim < lam], 0.0)
        assert np.all(np.abs(g_loc[:, per_dim > lam]).sum(axis=0) > 0)

    def test_monte_carlo_per_dimension_matches_numpy(self):
        q = diag_posterior()
        z = q.sample(seed=33)
        reg = ke.KLRegularizer(free_bits=0.3, mode="mc")
        z_np = h.numpy(z)[..., None]
        per_dim = (
            h.diag_normal_logpdf(z_np, LOC[..., None], SCALE[..., None])
            - h.diag_normal_logpdf(z_np, 0.0, 1.0)
        ).mean(axis=0)
        loss = added_loss(reg, q, sample=z)
        np.testing.assert_allclose(loss, np.maximum(per_dim, 0.3).sum(), rtol=1e-5, atol=1e-6)

    def test_non_factorised_kl_is_clamped_as_a_whole(self):
        tril = random_tril(5, 4, np.random.default_rng(3))
        q = kd.MultivariateNormalTriL(LOC, tril)
        kl = h.kl_full_normal(LOC, tril).mean()
        for lam, expected in ((0.1, kl), (kl, 4 * kl)):  # threshold lam * latent_dim
            reg = ke.KLRegularizer(free_bits=float(lam), mode="analytic")
            np.testing.assert_allclose(added_loss(reg, q), max(expected, 4 * lam), rtol=1e-5)

    def test_latent_map_floors_each_dimension_over_its_positions(self):
        # Issue 17: no free-bits test used a latent map, and a floor that
        # ignored the positions survived. q of shape (batch, positions, d): the
        # KL of dimension j is summed over the H positions and averaged over
        # the batch, and its floor is free_bits * H (the docstring's rule).
        rng = np.random.default_rng(5)
        batch, positions, d, lam = 4, 3, 4, 0.5
        loc = rng.normal(scale=[0.1, 0.3, 0.8, 1.5], size=(batch, positions, d))
        scale = np.exp(rng.normal(scale=0.2, size=(batch, positions, d)))
        kl = 0.5 * (loc**2 + scale**2 - 1.0 - 2.0 * np.log(scale))  # (b, h, j)
        per_dim = kl.sum(axis=1).mean(axis=0)  # (d,)
        floor = lam * positions
        # Both sides of the floor occur, and a floor of lam alone would differ.
        assert np.any(per_dim < floor) and np.any(per_dim > floor) and np.any(per_dim < lam)
        q = kd.MultivariateNormalDiag(loc.astype("float32"), scale.astype("float32"))
        reg = ke.KLRegularizer(free_bits=lam, mode="analytic")
        loss = added_loss(reg, q)
        np.testing.assert_allclose(loss, np.maximum(per_dim, floor).sum(), rtol=1e-5)
        np.testing.assert_allclose(h.numpy(reg.last_kl), per_dim.sum(), rtol=1e-5)


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
        q = kd.MixtureSameFamily(
            keras.ops.zeros((5, 2)),
            kd.MultivariateNormalDiag(keras.ops.zeros((5, 2, 4)), keras.ops.ones((5, 2, 4))),
        )
        with pytest.raises(ValueError, match="no closed-form entropy.*mode='mc'"):
            added_loss(ke.KLRegularizer(mode="mc_entropy"), q)

    def test_auto_prefers_mc_entropy_unless_path_derivative(self):
        prior = mixture_prior()
        q = diag_posterior()
        assert ke.KLRegularizer(prior=prior).method(q, prior.distribution()) == "mc_entropy"
        stl = ke.KLRegularizer(prior=prior, path_derivative=True)
        assert stl.method(q, prior.distribution()) == "mc"
        normal = kd.MultivariateNormalDiag(keras.ops.zeros(4), keras.ops.ones(4))
        assert ke.KLRegularizer().method(q, normal) == "analytic"


class TestReductionOverNonBatchAxes:
    """Issue 10, point 2: the first axis is the batch; the KL is summed over
    every other axis of q's batch shape, then averaged over the batch."""

    def test_elementwise_normal_posterior_sums_over_latent_dimensions(self):
        q = kd.Normal(LOC, SCALE)
        prior = kd.Normal(keras.ops.zeros(4), keras.ops.ones(4))
        reg = ke.KLRegularizer(prior=prior, mode="analytic")
        expected = h.kl_diag_normal(LOC, SCALE).mean()  # summed over 4 dims
        np.testing.assert_allclose(added_loss(reg, q), expected, rtol=1e-5)
        np.testing.assert_allclose(
            h.numpy(reg.kl_divergence(q)), h.kl_diag_normal(LOC, SCALE), rtol=1e-5
        )

    def test_elementwise_posterior_against_mixture_sums_over_latent_dimensions(self):
        prior = kd.MixtureSameFamily(
            np.log(MIXTURE_WEIGHTS).astype("float32"),
            kd.Normal(MIXTURE_LOCS.astype("float32"), MIXTURE_SCALES.astype("float32")),
        )
        num_samples = 2000
        reg = ke.KLRegularizer(prior=prior, mode="mc", num_samples=num_samples, seed=5)
        estimate = added_loss(reg, kd.Normal(LOC, SCALE))
        check_against_elementwise_mixture_reference(estimate, num_samples)

    def test_latent_map_sums_over_positions(self):
        rng = np.random.default_rng(4)
        loc = rng.normal(size=(2, 3, 5, 4)).astype("float32")  # (batch, h, w, d)
        scale = np.exp(rng.normal(scale=0.3, size=loc.shape)).astype("float32")
        reg = ke.KLRegularizer(mode="analytic")
        expected = h.kl_diag_normal(loc, scale).sum(axis=(1, 2)).mean()
        np.testing.assert_allclose(added_loss(reg, diag_posterior(loc, scale)), expected, rtol=1e-5)


# ---------------------------------------------------------------------------
# TFP distributions, on TensorFlow only.


def tfp_added_loss(reg, posterior):
    """`added_loss` for a TFP posterior (TFP wants a pair of ints as seed)."""
    return added_loss(reg, posterior, sample=posterior.sample(seed=(1, 2)))


@TENSORFLOW_ONLY
class TestTFPPosterior:
    """A TFP posterior handed to `KLRegularizer` by a user's own layer."""

    def test_diag_equals_numpy_closed_form(self):
        tfd, _ = tfp_modules()
        q = tfd.MultivariateNormalDiag(loc=LOC, scale_diag=SCALE)
        expected = h.kl_diag_normal(LOC, SCALE).mean()
        reg = ke.KLRegularizer(mode="analytic")
        np.testing.assert_allclose(tfp_added_loss(reg, q), expected, rtol=1e-5)

    def test_full_covariance_equals_numpy_trace_and_slogdet(self):
        tfd, _ = tfp_modules()
        tril = random_tril(5, 4, np.random.default_rng(3))
        q = tfd.MultivariateNormalTriL(loc=LOC, scale_tril=tril)
        expected = h.kl_full_normal(LOC, tril).mean()
        reg = ke.KLRegularizer(mode="analytic")
        np.testing.assert_allclose(tfp_added_loss(reg, q), expected, rtol=1e-5)

    def test_independent_normal_posterior_gets_independent_default_prior(self):
        tfd, _ = tfp_modules()
        q = tfd.Independent(tfd.Normal(LOC, SCALE), reinterpreted_batch_ndims=1)
        expected = h.kl_diag_normal(LOC, SCALE).mean()
        reg = ke.KLRegularizer(mode="analytic")
        np.testing.assert_allclose(tfp_added_loss(reg, q), expected, rtol=1e-5)

    def test_monte_carlo_against_mixture_prior_layer(self):
        tfd, _ = tfp_modules()
        prior = mixture_prior()
        n = 4000
        reg = ke.KLRegularizer(prior=prior, mode="mc", num_samples=n, seed=5)
        q = tfd.MultivariateNormalDiag(loc=LOC, scale_diag=SCALE)
        check_against_mixture_reference(tfp_added_loss(reg, q), prior, n)

    def test_path_derivative_gradient_is_zero_when_q_equals_the_prior(self):
        tfd, _ = tfp_modules()
        reg = ke.KLRegularizer(mode="mc", path_derivative=True)

        def kl(loc, scale):
            q = tfd.MultivariateNormalDiag(loc=loc, scale_diag=scale)
            return reg.kl_divergence(q, sample=q.sample(seed=(0, 1)))

        grads = h.gradients(kl, np.zeros_like(LOC), np.ones_like(SCALE))
        np.testing.assert_array_equal(np.concatenate(grads), 0.0)

    def test_mc_entropy_needs_a_closed_form_entropy(self):
        tfd, _ = tfp_modules()
        q = tfd.MixtureSameFamily(
            tfd.Categorical(logits=np.zeros((5, 2), "float32")),
            tfd.MultivariateNormalDiag(loc=np.zeros((5, 2, 4), "float32")),
        )
        with pytest.raises(ValueError, match="no closed-form entropy.*mode='mc'"):
            tfp_added_loss(ke.KLRegularizer(mode="mc_entropy"), q)


@TENSORFLOW_ONLY
class TestTFPPrior:
    """Issue 10, point 8: a fixed TFP prior works; one holding variables
    is refused, as a Keras 3 model would not train them."""

    def test_refused_at_construction_naming_the_prior_layers(self):
        import tensorflow as tf

        tfd, _ = tfp_modules()
        prior = tfd.MultivariateNormalDiag(loc=tf.Variable(tf.zeros(4)))
        with pytest.raises(ValueError, match="tf.Variable.*keras_elbo.MixturePrior"):
            ke.KLRegularizer(prior=prior)

    def test_fixed_tfp_prior_is_accepted(self):
        tfd, _ = tfp_modules()
        prior = tfd.MultivariateNormalDiag(loc=np.zeros(4, "float32"))
        reg = ke.KLRegularizer(prior=prior, mode="analytic")
        expected = h.kl_diag_normal(LOC, SCALE).mean()
        np.testing.assert_allclose(added_loss(reg, diag_posterior()), expected, rtol=1e-5)

    def test_tfp_prior_against_tfp_posterior_monte_carlo(self):
        tfd, _ = tfp_modules()
        prior = tfd.MultivariateNormalDiag(loc=np.zeros(4, "float32"))
        n = 4000
        reg = ke.KLRegularizer(prior=prior, mode="mc", num_samples=n, seed=7)
        estimate = tfp_added_loss(reg, tfd.MultivariateNormalDiag(loc=LOC, scale_diag=SCALE))
        # As in TestMonteCarlo: the standard error from NumPy draws.
        z = LOC + SCALE * np.random.default_rng(11).normal(size=(n, *LOC.shape))
        log_ratio = h.diag_normal_logpdf(z, LOC, SCALE) - h.diag_normal_logpdf(z, 0.0, 1.0)
        std_err = log_ratio.mean(axis=1).std() / np.sqrt(n)
        expected = h.kl_diag_normal(LOC, SCALE).mean()
        assert abs(estimate - expected) < 4 * std_err, (estimate, expected, std_err)

    def test_tfp_prior_trains_but_save_names_the_layer_to_use(self, tmp_path):
        tfd, _ = tfp_modules()
        prior = tfd.MultivariateNormalDiag(
            loc=np.zeros(2, "float32"), scale_diag=np.full(2, 2.0, "float32")
        )
        x = keras.Input((3,))
        z = ke.GaussianPosterior(2, kl_regularizer=ke.KLRegularizer(prior=prior), seed=0)(x)
        model = keras.Model(x, keras.layers.Dense(3)(z))
        model.compile("adam", ke.GaussianNLL())
        data = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
        history = model.fit(data, data, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
        with pytest.raises(ValueError, match="NormalPrior.*MixturePrior"):
            model.save(tmp_path / "model.keras")


# The seed document's examples: a user's Keras 3 layer building a TFP
# posterior and handing it to KLRegularizer. TFP is imported in the methods.

SEED_LATENT = 2


class TFPNormalPosterior(keras.layers.Layer):
    """q(z|x) = tfd.Normal(loc=mu, scale=softplus(raw)), elementwise."""

    def __init__(self, latent_dim, kl_regularizer, **kwargs):
        super().__init__(**kwargs)
        self.loc_layer = keras.layers.Dense(latent_dim)
        self.raw_scale_layer = keras.layers.Dense(latent_dim)
        self.kl_regularizer = kl_regularizer

    def distribution(self, x):
        tfd, _ = tfp_modules()
        scale = keras.ops.softplus(self.raw_scale_layer(x)) + 1e-3
        return tfd.Normal(loc=self.loc_layer(x), scale=scale)

    def call(self, x):
        q = self.distribution(x)
        return self.kl_regularizer(q.sample(), posterior=q)


class TFPFlowPosterior(keras.layers.Layer):
    """q(z|x): a diagonal Gaussian of x through a masked autoregressive flow
    (`tfb.MaskedAutoregressiveFlow`) whose shift and log-scale are a masked
    linear map of the layer's own weights, written with TensorFlow ops."""

    def __init__(self, latent_dim, kl_regularizer, **kwargs):
        super().__init__(**kwargs)
        self.latent_dim = latent_dim
        self.loc_layer = keras.layers.Dense(latent_dim)
        self.raw_scale_layer = keras.layers.Dense(latent_dim)
        self.kl_regularizer = kl_regularizer
        # Output j may depend on inputs i < j only: strictly upper triangular.
        self.mask = np.triu(np.ones((latent_dim, latent_dim), "float32"), k=1)

    def build(self, input_shape):
        d = self.latent_dim
        self.shift_kernel = self.add_weight(shape=(d, d), initializer="glorot_uniform")
        self.log_scale_kernel = self.add_weight(shape=(d, d), initializer="glorot_uniform")
        self.shift_bias = self.add_weight(shape=(d,), initializer="zeros")

    def shift_and_log_scale(self, u):
        import tensorflow as tf

        shift = tf.matmul(u, self.shift_kernel * self.mask) + self.shift_bias
        return shift, tf.tanh(tf.matmul(u, self.log_scale_kernel * self.mask))

    def distribution(self, x):
        tfd, tfb = tfp_modules()
        scale = keras.ops.softplus(self.raw_scale_layer(x)) + 1e-3
        base = tfd.MultivariateNormalDiag(loc=self.loc_layer(x), scale_diag=scale)
        flow = tfb.MaskedAutoregressiveFlow(shift_and_log_scale_fn=self.shift_and_log_scale)
        return tfd.TransformedDistribution(base, flow)

    def call(self, x):
        q = self.distribution(x)
        return self.kl_regularizer(q.sample(), posterior=q)


def fit_seed_vae(posterior):
    """Trains `x -> posterior -> Dense` as an `ELBOModel` on `TOY_DATA` for a
    few epochs; checks that the loss falls and every logged KL is finite."""
    keras.utils.set_random_seed(0)  # seeds TFP's unseeded `sample()` too
    x = keras.Input((h.TOY_PIXELS,))
    model = ke.ELBOModel(x, keras.layers.Dense(h.TOY_PIXELS)(posterior(x)))
    model.compile(keras.optimizers.Adam(0.02), ke.BernoulliNLL(from_logits=True))
    history = model.fit(h.TOY_DATA, h.TOY_DATA, epochs=4, batch_size=32, verbose=0).history
    assert history["loss"][-1] < history["loss"][0], history["loss"]
    assert np.all(np.isfinite(history["kl"])) and min(history["kl"]) > 0, history["kl"]
    return model


def elementwise_tfd_mixture():
    tfd, _ = tfp_modules()
    return tfd.Mixture(
        cat=tfd.Categorical(probs=MIXTURE_WEIGHTS.astype("float32")),
        components=[
            tfd.Normal(float(m), float(s))
            for m, s in zip(MIXTURE_LOCS, MIXTURE_SCALES, strict=True)
        ],
    )


@TENSORFLOW_ONLY
class TestSeedDocumentExamples:
    """Issue 11, point 2: the seed document's three examples, as a TFP user
    writes them with Keras 3, run on TensorFlow."""

    def test_analytic_normal_kl_sums_over_latent_dimensions(self):
        tfd, _ = tfp_modules()
        prior = tfd.Normal(np.zeros(4, "float32"), np.ones(4, "float32"))
        reg = ke.KLRegularizer(prior=prior, mode="analytic")
        q = tfd.Normal(loc=LOC, scale=SCALE)
        expected = h.kl_diag_normal(LOC, SCALE).mean()  # summed over 4 dims
        np.testing.assert_allclose(tfp_added_loss(reg, q), expected, rtol=1e-5)
        np.testing.assert_allclose(
            h.numpy(reg.kl_divergence(q)), h.kl_diag_normal(LOC, SCALE), rtol=1e-5
        )

    def test_analytic_normal_kl_trains_and_logs_the_closed_form(self):
        tfd, _ = tfp_modules()
        d = SEED_LATENT
        prior = tfd.Normal(np.zeros(d, "float32"), np.ones(d, "float32"))
        posterior = TFPNormalPosterior(d, ke.KLRegularizer(prior=prior, mode="analytic"))
        model = fit_seed_vae(posterior)
        # The logged KL of one full batch is the NumPy closed form of the
        # posterior's parameters on that batch.
        logs = model.evaluate(
            h.TOY_DATA, h.TOY_DATA, batch_size=len(h.TOY_DATA), verbose=0, return_dict=True
        )
        q = posterior.distribution(h.TOY_DATA)
        expected = h.kl_diag_normal(h.numpy(q.loc), h.numpy(q.scale)).mean()
        np.testing.assert_allclose(logs["kl"], expected, rtol=1e-5)

    def test_mixture_prior_monte_carlo_sums_over_latent_dimensions(self):
        num_samples = 2000
        reg = ke.KLRegularizer(
            prior=elementwise_tfd_mixture(), mode="mc", num_samples=num_samples, seed=5
        )
        tfd, _ = tfp_modules()
        estimate = tfp_added_loss(reg, tfd.Normal(loc=LOC, scale=SCALE))
        check_against_elementwise_mixture_reference(estimate, num_samples)

    def test_mixture_prior_monte_carlo_trains(self):
        reg = ke.KLRegularizer(prior=elementwise_tfd_mixture(), mode="mc")
        fit_seed_vae(TFPNormalPosterior(SEED_LATENT, reg))

    def test_flow_posterior_auto_picks_monte_carlo_on_the_given_sample(self):
        d = SEED_LATENT
        reg = ke.KLRegularizer(mode="auto")
        posterior = TFPFlowPosterior(d, reg)
        x = h.TOY_DATA[:8]
        posterior(x)  # builds
        q = posterior.distribution(x)
        assert reg.method(q, reg.prior_distribution(q)) == "mc"
        z = q.sample(seed=(3, 4))
        # One sample: the loss is log q(z) - log N(z; 0, I) at that very z.
        expected = np.mean(h.numpy(q.log_prob(z)) - h.diag_normal_logpdf(h.numpy(z), 0.0, 1.0))
        np.testing.assert_allclose(added_loss(reg, q, sample=z), expected, rtol=1e-5)

    def test_flow_posterior_monte_carlo_trains(self):
        reg = ke.KLRegularizer(mode="mc")
        fit_seed_vae(TFPFlowPosterior(SEED_LATENT, reg))
