"""Tests of the discrete families' closed-form KL divergences and of the
relaxed families (`RelaxedOneHotCategorical`, `RelaxedBernoulli`), on every
backend.

References are NumPy float64: `sum(p * (log p - log q))` for the categorical
KL, the Concrete density of Maddison et al. (2017, eq. 10) written out
directly for the log-densities, and the class probabilities for the argmax
frequencies of samples, within four binomial standard errors. On TensorFlow,
TFP is a second reference.
"""

import keras
import numpy as np
import pytest
from keras import ops
from scipy import special

from keras_elbo import distributions as kd
from tests._helpers import gradients

BACKEND = keras.backend.backend()
RTOL = ATOL = 1e-5  # float32 round-off of sums of a few dozen terms (see test_distributions.py)


def f32(x):
    return np.asarray(x, np.float32)


def numpy(x):
    return np.asarray(ops.convert_to_numpy(x), np.float64)


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(numpy(actual), np.asarray(expected, np.float64), rtol, atol)


RNG = np.random.default_rng(0)
Q_LOGITS = f32(2.0 * RNG.normal(size=(3, 4, 5)))  # batch (3, 4), 5 classes
P_LOGITS = f32(RNG.normal(size=(4, 5)))  # batch (4,): broadcasts against q's


def numpy_categorical_kl(q_logits, p_logits):
    log_q = special.log_softmax(np.float64(q_logits), axis=-1)
    log_p = special.log_softmax(np.float64(p_logits), axis=-1)
    return np.sum(np.exp(log_q) * (log_q - log_p), axis=-1)


def numpy_concrete_log_prob(x, temperature, logits):
    """Maddison et al. (2017), eq. 10, as written there:
    `(K - 1)! t**(K - 1) prod(a_k x_k**(-t - 1)) / sum(a_k x_k**-t)**K`, `a = exp(logits)`."""
    x, t, a = np.float64(x), np.float64(temperature)[..., None], np.exp(np.float64(logits))
    k = x.shape[-1]
    numerator = (
        special.factorial(k - 1) * t[..., 0] ** (k - 1) * np.prod(a * x ** (-t - 1.0), axis=-1)
    )
    return np.log(numerator / np.sum(a * x**-t, axis=-1) ** k)


class TestCategoricalKL:
    @pytest.mark.parametrize("family", ["categorical", "one_hot"])
    def test_equals_numpy(self, family):
        cls = kd.Categorical if family == "categorical" else kd.OneHotCategorical
        q, p = cls(Q_LOGITS), cls(P_LOGITS)
        assert kd.has_closed_form_kl(q, p)
        kl = kd.kl_divergence(q, p)
        assert tuple(kl.shape) == (3, 4)
        assert_close(kl, numpy_categorical_kl(Q_LOGITS, P_LOGITS))

    def test_is_zero_for_the_same_distribution_and_invariant_to_a_logit_shift(self):
        q = kd.Categorical(Q_LOGITS)
        assert_close(kd.kl_divergence(q, q), np.zeros((3, 4)), atol=1e-6)
        shifted = kd.Categorical(Q_LOGITS + 3.0)
        assert_close(kd.kl_divergence(q, shifted), np.zeros((3, 4)), atol=1e-5)

    def test_different_numbers_of_classes_name_both(self):
        with pytest.raises(ValueError, match=r"same number of classes; received 5 \(q\) and 4"):
            kd.kl_divergence(kd.Categorical(Q_LOGITS), kd.Categorical(P_LOGITS[..., :4]))

    def test_bernoulli_equals_numpy(self):
        a, b = f32(RNG.normal(size=(3, 6)) * 3.0), f32(RNG.normal(size=6))
        q, p = special.expit(np.float64(a)), special.expit(np.float64(b))
        expected = q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p))
        assert kd.has_closed_form_kl(kd.Bernoulli(a), kd.Bernoulli(b))
        assert_close(kd.kl_divergence(kd.Bernoulli(a), kd.Bernoulli(b)), expected)

    @pytest.mark.skipif(BACKEND != "tensorflow", reason="TFP runs on TensorFlow only")
    def test_against_tfp(self):
        import tensorflow_probability as tfp

        tfd = tfp.distributions
        assert_close(
            kd.kl_divergence(kd.Categorical(Q_LOGITS), kd.Categorical(P_LOGITS)),
            tfd.kl_divergence(tfd.Categorical(logits=Q_LOGITS), tfd.Categorical(logits=P_LOGITS)),
        )


def _simplex_points(shape, k, seed):
    """Points well inside the simplex (Dirichlet(2)), float32, summing to 1."""
    x = np.random.default_rng(seed).dirichlet(np.full(k, 2.0), size=shape)
    return f32(x / x.sum(-1, keepdims=True))


class TestRelaxedOneHotCategorical:
    def test_log_prob_equals_the_published_density(self):
        temperature = f32([[0.3], [0.7], [1.0], [2.5]])  # broadcast against a batch (4, 3)
        logits = f32(RNG.normal(size=(4, 3, 5)))
        x = _simplex_points((6, 4, 3), 5, seed=1)  # a sample axis of 6
        d = kd.RelaxedOneHotCategorical(temperature, logits)
        assert (d.batch_shape, d.event_shape) == ((4, 3), (5,))
        expected = numpy_concrete_log_prob(x, np.broadcast_to(temperature, (4, 3)), logits)
        # Terms of size ~30 (t * log x): float32 round-off relative to them.
        assert_close(d.log_prob(x), expected, rtol=1e-5, atol=2e-5)

    def test_two_classes_integrate_to_one_and_match_the_binary_concrete(self):
        # At K = 2 the density is that of the first coordinate y on (0, 1);
        # integrated over s = logit(y), `p(y) * y * (1 - y) ds`, where both
        # coordinates are exact in float32 and the tails beyond |s| = 40 hold
        # less than exp(-40 * t) of the mass.
        s = np.linspace(-40.0, 40.0, 80_001)
        y = np.stack([special.expit(s), special.expit(-s)], -1)
        for temperature, logit in [(0.5, 0.3), (1.0, -1.0), (2.0, 2.0)]:
            d = kd.RelaxedOneHotCategorical(temperature, f32([logit, 0.0]))
            density = np.exp(numpy(d.log_prob(f32(y))))
            mass = np.trapezoid(density * y[:, 0] * y[:, 1], s)
            np.testing.assert_allclose(mass, 1.0, atol=1e-4)
            middle = np.abs(s) < 4.0
            binary = kd.RelaxedBernoulli(temperature, logit)
            assert_close(
                binary.log_prob(f32(y[middle, 0])), np.log(density[middle]), rtol=1e-4, atol=1e-4
            )

    def test_argmax_frequencies_are_the_class_probabilities(self):
        logits = f32([[1.0, 0.0, -1.0, 0.5], [-2.0, 0.3, 0.3, 1.5]])
        n = 20_000
        draws = numpy(kd.RelaxedOneHotCategorical(0.7, logits).sample(n, seed=3))
        assert draws.shape == (n, 2, 4)
        np.testing.assert_allclose(draws.sum(-1), 1.0, atol=1e-5)
        frequencies = np.stack([np.bincount(i, minlength=4) for i in draws.argmax(-1).T]) / n
        probs = special.softmax(np.float64(logits), axis=-1)
        standard_error = np.sqrt(probs * (1 - probs) / n)
        np.testing.assert_array_less(np.abs(frequencies - probs), 4 * standard_error)

    def test_low_temperature_samples_have_finite_log_prob(self):
        # At t = 0.05 many coordinates of a draw underflow to 0 in float32;
        # the log-density is computed from the log of the draw.
        d = kd.RelaxedOneHotCategorical(0.05, f32(RNG.normal(size=(8, 10))))
        sample = d.sample(4, seed=2)
        assert np.mean(numpy(sample) == 0.0) > 0.1
        assert np.all(np.isfinite(numpy(d.log_prob(sample))))

    def test_log_prob_of_its_own_sample_equals_that_of_a_copy(self):
        d = kd.RelaxedOneHotCategorical(f32([1.0, 2.0]), f32(RNG.normal(size=(2, 4))))
        sample = d.sample(5, seed=4)
        copy = ops.convert_to_tensor(numpy(sample).astype(np.float32))
        assert_close(d.log_prob(sample), d.log_prob(copy), rtol=1e-4, atol=1e-4)

    def test_gradient_flows_to_logits_and_temperature(self):
        def loss(logits, temperature):
            sample = kd.RelaxedOneHotCategorical(temperature, logits).sample(64, seed=0)
            return ops.mean(ops.square(sample[..., 0] - 1.0))

        grads = gradients(loss, f32([[0.5, -0.5, 0.0]]), f32([0.8]))
        assert all(np.all(np.isfinite(g)) and np.all(g != 0) for g in grads)

    @pytest.mark.parametrize("temperature", [0.0, -1.0])
    def test_temperature_must_be_positive(self, temperature):
        with pytest.raises(ValueError, match="`temperature`. Expected a positive number"):
            kd.RelaxedOneHotCategorical(temperature, f32([0.0, 0.0]))

    @pytest.mark.skipif(BACKEND != "tensorflow", reason="TFP runs on TensorFlow only")
    def test_against_tfp(self):
        import tensorflow_probability as tfp

        logits = f32(RNG.normal(size=(3, 4)))
        x = _simplex_points((2, 3), 4, seed=5)
        theirs = tfp.distributions.RelaxedOneHotCategorical(0.6, logits=logits)
        assert_close(kd.RelaxedOneHotCategorical(0.6, logits).log_prob(x), theirs.log_prob(x))


class TestRelaxedBernoulli:
    def test_log_prob_equals_the_published_density(self):
        temperature, logits = f32([0.4, 1.0, 3.0]), f32([-1.0, 0.2, 2.0])
        y = f32(np.random.default_rng(6).uniform(0.02, 0.98, size=(5, 3)))
        t, a, y64 = np.float64(temperature), np.exp(np.float64(logits)), np.float64(y)
        # Maddison et al. (2017), eq. 20.
        density = (
            t * a * y64 ** (-t - 1) * (1 - y64) ** (-t - 1) / (a * y64**-t + (1 - y64) ** -t) ** 2
        )
        assert_close(kd.RelaxedBernoulli(temperature, logits).log_prob(y), np.log(density))

    def test_samples_exceed_one_half_with_the_bernoulli_probability(self):
        logits = f32([-1.5, 0.0, 0.8])
        n = 20_000
        draws = numpy(kd.RelaxedBernoulli(0.5, logits).sample(n, seed=7))
        assert draws.shape == (n, 3) and np.all((draws >= 0) & (draws <= 1))
        probs = special.expit(np.float64(logits))
        standard_error = np.sqrt(probs * (1 - probs) / n)
        np.testing.assert_array_less(np.abs((draws > 0.5).mean(0) - probs), 4 * standard_error)

    def test_low_temperature_samples_have_finite_log_prob(self):
        d = kd.RelaxedBernoulli(0.02, f32(RNG.normal(size=50)))
        sample = d.sample(4, seed=8)
        assert np.mean((numpy(sample) == 0.0) | (numpy(sample) == 1.0)) > 0.5
        assert np.all(np.isfinite(numpy(d.log_prob(sample))))

    @pytest.mark.skipif(BACKEND != "tensorflow", reason="TFP runs on TensorFlow only")
    def test_against_tfp(self):
        import tensorflow_probability as tfp

        logits = f32([-1.0, 0.2, 2.0])
        y = f32([[0.1, 0.5, 0.93], [0.7, 0.3, 0.6]])
        theirs = tfp.distributions.RelaxedBernoulli(0.6, logits=logits)
        assert_close(kd.RelaxedBernoulli(0.6, logits).log_prob(y), theirs.log_prob(y))
