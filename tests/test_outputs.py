"""Tests of keras_elbo.outputs, the distribution outputs, on every Keras backend.

    KERAS_BACKEND=jax python -m pytest tests/test_outputs.py

References are scipy float64 log-densities, moments, CDFs and quantiles of
the float32 parameters (the parameter maps, softplus and `fill_triangular`,
rewritten in NumPy). Tolerance RTOL = 1e-5, ATOL = 1e-4 ("float32 round-off"):
each value is a sum of at most a few dozen float32 terms of magnitude <= ~50
(relative error ~6e-8 each, so ~3e-6 absolute), and the float32 `lgamma` of
the Poisson and Student's t terms adds up to ~2e-6 times max(1, |lgamma|);
a wrong formula is off by far more.
"""

import math

import keras
import numpy as np
import pytest
from scipy import optimize, special, stats

import keras_elbo as ke
from keras_elbo._gaussian import fill_triangular
from keras_elbo.losses import is_reconstruction_loss
from tests._helpers import (
    BACKEND,
    JIT_MODES,
    compiled,
    config_round_trip,
    numpy,
    run_time_error,
    save_and_load,
    softplus,
)

RTOL, ATOL = 1e-5, 1e-4
BATCH = 5


def f32(x):
    return np.asarray(x, np.float32)


def _rng(seed):
    return np.random.default_rng(seed)


def _scale(raw, min_scale=1e-3):
    return softplus(raw.astype(np.float64)) + min_scale


# ---------------------------------------------------------------------------
# One case per output: the loss, float32 parameters, targets, and float64
# scipy references of the per-example log-density and of the distribution.


def _normal_case(event_shape, scale=None):
    n = math.prod(event_shape)
    output = ke.IndependentNormal(event_shape, scale=scale)
    params = f32(_rng(0).normal(size=(BATCH, output.params_size)))
    y = f32(_rng(1).normal(size=(BATCH,) + event_shape))
    loc = params[:, :n].reshape((BATCH,) + event_shape).astype(np.float64)
    s = scale if scale else _scale(params[:, n:]).reshape(loc.shape)
    ref = stats.norm(loc, s)
    return output, params, y, ref, ref.logpdf(y).reshape(BATCH, -1).sum(-1)


def _logistic_case():
    output = ke.IndependentLogistic(2)
    params = f32(_rng(2).normal(size=(BATCH, 4)))
    y = f32(_rng(3).normal(0.0, 2.0, size=(BATCH, 2)))
    ref = stats.logistic(params[:, :2].astype(np.float64), _scale(params[:, 2:]))
    return output, params, y, ref, ref.logpdf(y).sum(-1)


def _student_case(df=None):
    output = ke.IndependentStudentT(2, df=df)
    params = f32(_rng(4).normal(size=(BATCH, output.params_size)))
    if df is None:
        params[:, 4:] += 3.0  # df = softplus(raw) + 0.01 in ~[1.5, 5]
    y = f32(_rng(5).normal(0.0, 2.0, size=(BATCH, 2)))
    dfs = df if df else _scale(params[:, 4:], 0.01)
    ref = stats.t(dfs, params[:, :2].astype(np.float64), _scale(params[:, 2:4]))
    return output, params, y, ref, ref.logpdf(y).sum(-1)


def _bernoulli_case():
    output = ke.IndependentBernoulli((2, 2))
    params = f32(_rng(6).normal(size=(BATCH, 4)))
    y = f32(_rng(7).random((BATCH, 2, 2)) < 0.5)
    ref = stats.bernoulli(special.expit(params.astype(np.float64)).reshape(BATCH, 2, 2))
    return output, params, y, ref, ref.logpmf(y).reshape(BATCH, -1).sum(-1)


def _poisson_case():
    output = ke.IndependentPoisson(3)
    params = f32(_rng(8).normal(1.0, 1.0, size=(BATCH, 3)))
    ref = stats.poisson(np.exp(params.astype(np.float64)))
    y = f32(_rng(9).poisson(np.exp(params)))
    return output, params, y, ref, ref.logpmf(y).sum(-1)


def _numpy_scale_tril(raw, d, min_scale=1e-3):
    tril = numpy(fill_triangular(keras.ops.convert_to_tensor(raw), d))
    diagonal = np.einsum("...ii->...i", tril)
    eye = np.eye(d)
    return tril * (1 - eye) + eye * _scale(diagonal, min_scale)[..., None, :]


def _tril_case():
    output = ke.MultivariateNormalTriL(3)
    params = f32(_rng(10).normal(size=(BATCH, 9)))
    y = f32(_rng(11).normal(size=(BATCH, 3)))
    tril = _numpy_scale_tril(params[:, 3:], 3)
    loc = params[:, :3].astype(np.float64)
    cov = tril @ np.swapaxes(tril, -1, -2)
    log_prob = np.array(
        [stats.multivariate_normal(loc[b], cov[b]).logpdf(y[b]) for b in range(BATCH)]
    )
    return output, params, y, (loc, cov), log_prob


def _one_hot_case():
    output = ke.OneHotCategorical(4)
    params = f32(_rng(12).normal(size=(BATCH, 4)))
    labels = _rng(13).integers(0, 4, size=BATCH)
    log_prob = special.log_softmax(params.astype(np.float64), -1)[np.arange(BATCH), labels]
    return output, params, f32(np.eye(4)[labels]), None, log_prob


def _categorical_case(target_shape):
    output = ke.Categorical(4)
    params = f32(_rng(12).normal(size=(BATCH, 4)))
    labels = _rng(13).integers(0, 4, size=BATCH)
    log_prob = special.log_softmax(params.astype(np.float64), -1)[np.arange(BATCH), labels]
    return output, params, labels.reshape(target_shape), None, log_prob


class MixtureReference:
    """A NumPy/scipy mixture of K `family` components per example, per coordinate."""

    def __init__(self, family, logits, loc, scale):
        # logits (B, K); loc, scale (B, K, n).
        self.family, self.loc, self.scale = family, loc, scale
        self.log_weights = special.log_softmax(logits, -1)
        self.weights = np.exp(self.log_weights)[..., None]

    def logpdf(self, y):  # y (B, n) -> (B,)
        component = self.family.logpdf(y[:, None, :], self.loc, self.scale).sum(-1)
        return special.logsumexp(self.log_weights + component, axis=-1)

    def mean(self):
        return np.sum(self.weights * self.family.mean(self.loc, self.scale), axis=1)

    def variance(self):
        means = self.family.mean(self.loc, self.scale)
        spread = (means - self.mean()[:, None, :]) ** 2
        return np.sum(self.weights * (self.family.var(self.loc, self.scale) + spread), axis=1)

    def cdf(self, x):  # x (B, n)
        return np.sum(self.weights * self.family.cdf(x[:, None, :], self.loc, self.scale), 1)

    def quantile(self, p):
        out = np.empty(self.loc.shape[::2])
        for b in range(out.shape[0]):
            for j in range(out.shape[1]):
                w, loc, scale = self.weights[b, :, 0], self.loc[b, :, j], self.scale[b, :, j]

                def f(x, w=w, loc=loc, scale=scale):
                    return np.sum(w * self.family.cdf(x, loc, scale)) - p

                out[b, j] = optimize.brentq(f, -1e3, 1e3, xtol=1e-12)
        return out


def _mixture_case(output, family, n):
    k = output.num_components
    params = f32(_rng(14).normal(size=(BATCH, output.params_size)))
    params[:, k : k + k * n] *= 3.0  # spread the components out
    y = f32(_rng(15).normal(0.0, 2.0, size=(BATCH, n)))
    loc = params[:, k : k + k * n].reshape(BATCH, k, n).astype(np.float64)
    scale = _scale(params[:, k + k * n :]).reshape(BATCH, k, n)
    ref = MixtureReference(family, params[:, :k].astype(np.float64), loc, scale)
    return output, params, y, ref, ref.logpdf(y)


CASES = {
    "normal": lambda: _normal_case((3,)),
    "normal_fixed_scale": lambda: _normal_case((2, 3), scale=0.7),
    "normal_scalar_event": lambda: _normal_case(()),
    "logistic": _logistic_case,
    "student_t": _student_case,
    "student_t_fixed_df": lambda: _student_case(df=3.0),
    "bernoulli": _bernoulli_case,
    "poisson": _poisson_case,
    "tril": _tril_case,
    "one_hot_categorical": _one_hot_case,
    "categorical": lambda: _categorical_case((BATCH,)),
    "categorical_column": lambda: _categorical_case((BATCH, 1)),
    "mixture_normal": lambda: _mixture_case(ke.MixtureNormal(3, event_shape=2), stats.norm, 2),
    "mixture_logistic": lambda: _mixture_case(ke.MixtureLogistic(2), stats.logistic, 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_loss_is_the_scipy_negative_log_likelihood(name):
    output, params, y, _, log_prob = CASES[name]()
    np.testing.assert_allclose(numpy(output.call(y, params)), -log_prob, RTOL, ATOL)
    # Keras averages the per-example values over the batch.
    np.testing.assert_allclose(numpy(output(y, params)), -log_prob.mean(), RTOL, ATOL)


@pytest.mark.parametrize("name", list(CASES))
def test_params_size(name):
    output, params, *_ = CASES[name]()
    assert output.params_size == params.shape[-1]
    assert isinstance(output.params_size, int)


def test_static_params_size_has_tfp_signature():
    assert ke.IndependentNormal.params_size(1) == 2
    assert ke.IndependentNormal.params_size(event_shape=(2, 3)) == 12
    assert ke.IndependentNormal.params_size((2, 3), scale=1.0) == 6
    assert ke.IndependentNormal.params_size(()) == 2
    assert ke.IndependentLogistic.params_size(3) == 6
    assert ke.IndependentStudentT.params_size(3) == 9
    assert ke.IndependentBernoulli.params_size((28, 28)) == 784
    assert ke.IndependentPoisson.params_size(4) == 4
    assert ke.MultivariateNormalTriL.params_size(4) == 4 + 10
    assert ke.OneHotCategorical.params_size(5) == 5
    assert ke.Categorical.params_size(5) == 5
    assert ke.MixtureNormal.params_size(3, event_shape=2) == 3 + 2 * 3 * 2
    assert ke.MixtureLogistic.params_size(2) == 6


def test_losses_are_reconstruction_losses():
    for name in CASES:
        assert is_reconstruction_loss(CASES[name]()[0])


# ---------------------------------------------------------------------------
# The distributions against scipy.

P = f32([0.025, 0.3, 0.5, 0.9])


@pytest.mark.parametrize("name", ["normal", "normal_scalar_event", "logistic"])
def test_elementwise_moments_cdf_and_quantiles(name):
    output, params, y, ref, _ = CASES[name]()
    dist = output.distribution(params)
    np.testing.assert_allclose(numpy(dist.mean()), ref.mean(), RTOL, ATOL)
    np.testing.assert_allclose(numpy(dist.stddev()), ref.std(), RTOL, ATOL)
    np.testing.assert_allclose(numpy(dist.variance()), ref.var(), RTOL, ATOL)
    np.testing.assert_allclose(numpy(dist.cdf(y)), ref.cdf(y), RTOL, ATOL)
    for p in P:
        np.testing.assert_allclose(numpy(dist.quantile(p)), ref.ppf(float(p)), RTOL, ATOL)


def test_student_t_moments_and_cdf():
    output, params, y, ref, _ = _student_case()
    dist = output.distribution(params)
    df = ref.args[0]
    np.testing.assert_allclose(numpy(dist.mean()), ref.mean(), RTOL, ATOL)  # all df > 1
    stddev = numpy(dist.stddev())
    finite = df > 2
    np.testing.assert_allclose(stddev[finite], ref.std()[finite], RTOL, ATOL)
    assert np.all(np.isinf(stddev[~finite]))
    np.testing.assert_allclose(numpy(dist.cdf(y)), ref.cdf(y), RTOL, ATOL)
    for p in P:  # see test_distributions.py for the quantile's error budget
        np.testing.assert_allclose(numpy(dist.quantile(p)), ref.ppf(float(p)), 1e-4, 1e-4)


def test_student_t_statistics_undefined_for_small_df():
    # TFP's allow_nan_stats: mean NaN for df <= 1, variance inf on (1, 2], NaN below.
    from keras_elbo import distributions as kd

    dist = kd.StudentT(f32([0.5, 1.5, 3.0]), 0.0, 1.0)
    mean, variance = numpy(dist.mean()), numpy(dist.variance())
    assert np.isnan(mean[0]) and mean[1] == 0.0
    assert np.isnan(variance[0]) and np.isinf(variance[1]) and variance[2] == pytest.approx(3.0)


def test_poisson_moments():
    output, params, _, ref, _ = _poisson_case()
    dist = output.distribution(params)
    np.testing.assert_allclose(numpy(dist.mean()), ref.mean(), RTOL, ATOL)
    np.testing.assert_allclose(numpy(dist.stddev()), ref.std(), RTOL, ATOL)


def test_tril_moments():
    output, params, _, (loc, cov), _ = _tril_case()
    dist = output.distribution(params)
    np.testing.assert_allclose(numpy(dist.mean()), loc, RTOL, ATOL)
    np.testing.assert_allclose(
        numpy(dist.stddev()), np.sqrt(np.einsum("...ii->...i", cov)), RTOL, ATOL
    )


def test_categorical_probabilities():
    _, params, *_ = _one_hot_case()
    probs = special.softmax(params.astype(np.float64), -1)
    np.testing.assert_allclose(
        numpy(ke.OneHotCategorical(4).distribution(params).mean()), probs, RTOL, ATOL
    )
    categorical = ke.Categorical(4).distribution(params)
    np.testing.assert_allclose(numpy(categorical.probs()), probs, RTOL, ATOL)
    np.testing.assert_array_equal(numpy(categorical.mode()), probs.argmax(-1))


@pytest.mark.parametrize("name", ["mixture_normal", "mixture_logistic"])
def test_mixture_moments_cdf_and_quantiles(name):
    output, params, y, ref, _ = CASES[name]()
    dist = output.distribution(params)
    np.testing.assert_allclose(numpy(dist.mean()), ref.mean(), RTOL, ATOL)
    np.testing.assert_allclose(numpy(dist.variance()), ref.variance(), RTOL, ATOL)
    np.testing.assert_allclose(numpy(dist.stddev()), np.sqrt(ref.variance()), RTOL, ATOL)
    np.testing.assert_allclose(numpy(dist.cdf(y)), ref.cdf(y), RTOL, ATOL)
    for p in P:
        # Bisection ends at adjacent floats: the quantile to float32 round-off
        # of its magnitude (<= ~10 here).
        np.testing.assert_allclose(numpy(dist.quantile(p)), ref.quantile(float(p)), 1e-5, 1e-4)


# ---------------------------------------------------------------------------
# Samples.

NUM_SAMPLES = 20_000


@pytest.mark.parametrize(
    "name", ["normal", "logistic", "student_t_fixed_df", "bernoulli", "poisson", "mixture_normal"]
)
def test_sample_moments(name):
    output, params, _, ref, _ = CASES[name]()
    dist = output.distribution(params)
    draws = numpy(dist.sample(NUM_SAMPLES, seed=keras.random.SeedGenerator(3)))
    assert draws.shape == (NUM_SAMPLES,) + numpy(dist.mean()).shape
    mean = numpy(dist.mean())  # checked against scipy above
    variance = numpy(dist.variance())
    # The sample mean has standard error sqrt(variance / n). The sample
    # variance has sqrt((mu4 - variance**2) / n), mu4 the central fourth
    # moment, estimated here from the draws (a relative error of O(n**-0.5)
    # in a bound, immaterial at 4 standard errors), plus the mean's bound
    # squared. 4 standard errors: a correct sampler fails one coordinate with
    # probability ~6e-5; the seed is fixed. (Student's t with df = 3 has no
    # fourth moment: only its mean is checked, with the finite variance.)
    mean_se = np.sqrt(variance / NUM_SAMPLES)
    np.testing.assert_array_less(np.abs(draws.mean(0) - mean), 4 * mean_se)
    if name != "student_t_fixed_df":
        mu4 = np.mean((draws - mean) ** 4, axis=0)
        variance_se = np.sqrt(np.maximum(mu4 - variance**2, 0.0) / NUM_SAMPLES)
        np.testing.assert_array_less(
            np.abs(draws.var(0) - variance), 4 * variance_se + (4 * mean_se) ** 2 + 1e-6
        )


def test_poisson_samples_at_small_and_large_rates():
    # Both samplers (inversion below rate 10, transformed rejection above),
    # and their boundary. Counts are integers; the mean and variance are the
    # rate, with standard errors sqrt(rate / n) and sqrt((rate + 2 rate**2) / n)
    # (a Poisson's central fourth moment is rate + 3 rate**2).
    from keras_elbo import distributions as kd

    rates = np.array([0.05, 2.0, 9.99, 10.0, 37.0, 2500.0])
    draws = numpy(kd.Poisson(f32(np.log(rates))).sample(NUM_SAMPLES, seed=11))
    assert np.all(draws == np.round(draws)) and np.all(draws >= 0)
    mean_se = np.sqrt(rates / NUM_SAMPLES)
    np.testing.assert_array_less(np.abs(draws.mean(0) - rates), 4 * mean_se)
    variance_se = np.sqrt((rates + 2 * rates**2) / NUM_SAMPLES)
    np.testing.assert_array_less(np.abs(draws.var(0) - rates), 4 * variance_se + (4 * mean_se) ** 2)


def test_categorical_sample_frequencies():
    # Each class frequency has standard error sqrt(p (1 - p) / n).
    _, params, *_ = _one_hot_case()
    probs = special.softmax(params.astype(np.float64), -1)
    labels = numpy(ke.Categorical(4).distribution(params).sample(NUM_SAMPLES, seed=5))
    one_hot = numpy(ke.OneHotCategorical(4).distribution(params).sample(NUM_SAMPLES, seed=6))
    assert np.all(one_hot.sum(-1) == 1)
    se = np.sqrt(probs * (1 - probs) / NUM_SAMPLES)
    for frequencies in (np.eye(4)[labels.astype(int)].mean(0), one_hot.mean(0)):
        np.testing.assert_array_less(np.abs(frequencies - probs), 4 * se)


# ---------------------------------------------------------------------------
# Training.


@pytest.mark.slow  # ~8 s: several hundred steps
def test_heteroscedastic_regression_recovers_the_noise_scale():
    # y = 2 x + noise, noise scale 0.2 where the flag s is 0 and 0.6 where it
    # is 1; the model's mean and raw scale are linear in (x, s), so it can
    # represent the truth exactly. The maximum-likelihood scale of a group of
    # m examples has standard error sigma / sqrt(2 m); the check allows 4 of
    # them plus 0.01 for the optimisation not being run to convergence.
    rng = _rng(20)
    n = 4000
    x = rng.uniform(-1, 1, size=(n, 1))
    s = (rng.random((n, 1)) < 0.5).astype(float)
    sigma = np.where(s == 1, 0.6, 0.2)
    y = f32(2 * x + sigma * rng.normal(size=(n, 1)))
    features = f32(np.concatenate([x, s], axis=1))
    output = ke.IndependentNormal(1)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(output.params_size)])
    model.compile(keras.optimizers.Adam(0.05), loss=output, jit_compile=JIT_MODES[-1])
    model.fit(features, y, epochs=40, batch_size=250, verbose=0)
    dist = output.distribution(model.predict(f32([[0.0, 0.0], [0.0, 1.0]]), verbose=0))
    for predicted, true, m in zip(
        numpy(dist.stddev())[:, 0], (0.2, 0.6), (n / 2, n / 2), strict=True
    ):
        assert abs(predicted - true) < 4 * true / np.sqrt(2 * m) + 0.01, (predicted, true)
    np.testing.assert_allclose(numpy(dist.mean())[:, 0], [0.0, 0.0], atol=0.05)


@pytest.mark.slow  # ~8 s: several hundred steps
def test_mixture_density_network_learns_two_branches():
    # y = +x or -x (probability 1/2 each) plus N(0, 0.05**2) noise, x in
    # [0.3, 1]: a single normal would predict mean 0. The two components'
    # means must come within 0.1 of -x and x (the noise's standard error on
    # a branch's mean from ~1000 points near each x is far smaller; 0.1 allows
    # for the finite training), and their weights within 0.15 of 1/2.
    rng = _rng(21)
    n = 2000
    x = rng.uniform(0.3, 1.0, size=(n, 1))
    sign = np.where(rng.random((n, 1)) < 0.5, 1.0, -1.0)
    y = f32(sign * x + 0.05 * rng.normal(size=(n, 1)))
    output = ke.MixtureNormal(2)
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(output.params_size),
        ]
    )
    model.compile(keras.optimizers.Adam(0.02), loss=output, jit_compile=JIT_MODES[-1])
    model.fit(f32(x), y, epochs=40, batch_size=200, verbose=0)
    x_test = f32([[0.4], [0.7], [0.9]])
    params = numpy(model.predict(x_test, verbose=0))
    locs = np.sort(params[:, 2:4], axis=-1)
    np.testing.assert_allclose(locs, np.concatenate([-x_test, x_test], axis=1), atol=0.1)
    np.testing.assert_allclose(special.softmax(params[:, :2], -1), 0.5, atol=0.15)
    # The predictive mean is then ~0 and the spread ~x.
    dist = output.distribution(params)
    np.testing.assert_allclose(numpy(dist.stddev())[:, 0], x_test[:, 0], atol=0.1)


# ---------------------------------------------------------------------------
# Saving.


# Every case saves and loads; every other one through `custom_objects` (the
# registry and `custom_objects` each see every kind of output over the cases,
# at half the cost of both for each).
@pytest.mark.parametrize(
    "name, use_custom_objects", [(name, i % 2 == 1) for i, name in enumerate(CASES)]
)
def test_save_and_load(name, use_custom_objects, tmp_path, monkeypatch):
    output, params, y, _, _ = CASES[name]()
    config = config_round_trip(output).get_config()
    assert config == output.get_config()
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(output.params_size)])
    model.compile(optimizer="sgd", loss=output)
    x = f32(_rng(30).normal(size=(BATCH, 2)))
    if name.startswith("mixture") or name in ("normal", "logistic", "student_t"):
        # Keep the random Dense outputs' scales and dfs moderate.
        model.layers[-1].kernel.assign(0.1 * numpy(model.layers[-1].kernel))
    loaded = save_and_load(model, tmp_path / "model.keras", use_custom_objects, monkeypatch)
    assert type(loaded.loss) is type(output)
    assert loaded.loss.get_config() == output.get_config()
    expected = model.evaluate(x, y, verbose=0)
    assert np.isfinite(expected)
    np.testing.assert_allclose(loaded.evaluate(x, y, verbose=0), expected, rtol=1e-6)


# ---------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("name", ["normal", "tril", "categorical", "mixture_normal"])
def test_wrong_params_width_names_params_size(name):
    output, params, y, *_ = CASES[name]()
    with pytest.raises(ValueError, match=r"params_size\(.*\) = \d+.*y_pred.shape"):
        output(y, params[:, :-1])
    with pytest.raises(ValueError, match="params_size"):
        output.distribution(params[:, :-1])


def test_wrong_target_shape():
    output, params, *_ = _normal_case((3,))
    with pytest.raises(ValueError, match=r"targets \(y_true\) must hold .* event shape \(3,\)"):
        output(np.zeros((BATCH, 4)), params)


class TestTargetSupport:
    """Issue 17, point 6: a label outside the classes, or a fractional one,
    gave a NaN loss, and a negative count an infinite one, with no message."""

    @pytest.mark.parametrize(
        "labels, high", [([0, 3, 1], "3"), ([0, 1.5, 1], "1.5"), ([0, -1, 2], "2")]
    )
    def test_invalid_categorical_labels_are_named(self, labels, high):
        with pytest.raises(
            run_time_error(),
            match=r"Categorical: the targets \(y_true\) must be integer class labels in "
            rf"0 \.\. 2, but they range from -?\d+ to {high}",
        ):
            ke.Categorical(3)(f32(labels), np.zeros((3, 3), "float32"))

    def test_negative_counts_are_named(self):
        with pytest.raises(
            run_time_error(),
            match=r"IndependentPoisson: the targets \(y_true\) must be non-negative counts, "
            "but they range from -1 to 2",
        ):
            ke.IndependentPoisson()(f32([[2.0], [-1.0]]), np.zeros((2, 1), "float32"))

    def test_fractional_counts_are_scored_as_tfp_scores_them(self):
        # tfp.layers.IndependentPoisson users pass rates: lgamma(y + 1) for log(y!).
        y, log_rate = f32([[0.5], [2.25]]), f32([[0.3], [-0.2]])
        values = numpy(ke.IndependentPoisson(reduction="none")(y, log_rate))
        y64, lr = y.astype(np.float64), log_rate.astype(np.float64)
        expected = (np.exp(lr) - y64 * lr + special.gammaln(y64 + 1.0))[:, 0]
        np.testing.assert_allclose(values, expected, rtol=RTOL)

    def test_invalid_targets_give_nan_where_nothing_can_raise(self):
        # A batch with an invalid target gets a NaN loss for every example.
        output = compiled(ke.Categorical(3, reduction="none"))
        logits = np.zeros((2, 3), "float32")
        np.testing.assert_allclose(numpy(output(f32([0, 2]), logits)), [np.log(3)] * 2, rtol=1e-6)
        for labels in ([0, 3], [1.5, 2], [-1, 0]):
            assert np.isnan(numpy(output(f32(labels), logits))).all(), labels
        poisson = compiled(ke.IndependentPoisson(reduction="none"))
        rates = np.zeros((2, 1), "float32")
        np.testing.assert_allclose(
            numpy(poisson(f32([[1.0], [2.0]]), rates)), [1.0, 1.0 + np.log(2)], rtol=1e-6
        )
        assert np.isnan(numpy(poisson(f32([[1.0], [-2.0]]), rates))).all()

    def test_invalid_label_in_fit(self):
        if BACKEND == "jax":
            pytest.skip("inside JAX's jitted step nothing can raise (NaN: tested above)")
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
        model.compile(optimizer="sgd", loss=ke.Categorical(3), jit_compile=False)
        with pytest.raises(run_time_error(), match="integer class labels in 0 .. 2"):
            model.fit(np.zeros((4, 2), "float32"), f32([0, 1, 2, 3]), verbose=0)


@pytest.mark.parametrize(
    "name, build",
    [
        ("event_shape", lambda: ke.IndependentNormal(0)),
        ("event_shape", lambda: ke.IndependentNormal("3")),
        ("event_shape", lambda: ke.IndependentBernoulli((2, -1))),
        ("event_shape", lambda: ke.IndependentNormal.params_size(True)),
        ("scale", lambda: ke.IndependentNormal(1, scale=-1.0)),
        ("min_scale", lambda: ke.IndependentLogistic(1, min_scale=0.0)),
        ("df", lambda: ke.IndependentStudentT(1, df=0.0)),
        ("min_df", lambda: ke.IndependentStudentT(1, min_df=-1.0)),
        ("event_size", lambda: ke.MultivariateNormalTriL(1.5)),
        ("event_size", lambda: ke.OneHotCategorical(0)),
        ("num_classes", lambda: ke.Categorical(True)),
        ("num_components", lambda: ke.MixtureNormal(0)),
        ("num_components", lambda: ke.MixtureLogistic.params_size(-2)),
        ("event_shape", lambda: ke.MixtureLogistic(2, event_shape=[2.0])),
    ],
)
def test_constructor_errors(name, build):
    with pytest.raises(ValueError, match=f"Invalid value received for argument `{name}`"):
        build()


# ---------------------------------------------------------------------------
# Compiled use: the distribution's methods inside a compiled function.


def test_methods_compile():
    output, params, y, ref, _ = CASES["mixture_normal"]()

    def fn(params, y):
        dist = output.distribution(params)
        return dist.quantile(0.9), dist.cdf(y), output.call(y, params)

    if BACKEND == "jax":
        import jax

        compiled = jax.jit(fn)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(fn, jit_compile=True)
    else:
        pytest.skip("torch.compile of a bisection loop is slow; PyTorch runs eagerly")
    quantile, cdf, loss = (numpy(v) for v in compiled(params, y))
    np.testing.assert_allclose(quantile, ref.quantile(0.9), 1e-5, 1e-4)
    np.testing.assert_allclose(cdf, ref.cdf(y), RTOL, ATOL)
    np.testing.assert_allclose(loss, -ref.logpdf(y), RTOL, ATOL)
