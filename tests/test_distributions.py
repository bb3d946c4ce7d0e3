"""Tests of keras_elbo.distributions, the same file on every Keras backend.

Run it under each backend:

    KERAS_BACKEND=jax python -m pytest tests/test_distributions.py

References are NumPy/scipy float64 closed forms computed from the same
float32 parameters; on the TensorFlow backend TFP is a second reference.

Tolerance `RTOL = ATOL = 1e-5` ("float32 round-off"): the parameters are
float32, and every value here (log-densities of magnitude <= ~30, KLs,
moments, gradients) is a sum of at most a few dozen float32 operations, each
with relative error <= 2**-24 ~ 6e-8; the accumulated error stays below
~2e-6, well inside 1e-5, while a wrong formula (a missing 0.5, a transposed
factor) is off by far more.
"""

import ast
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops
from scipy import special, stats

from keras_elbo import _backend
from keras_elbo import distributions as kd
from keras_elbo.distributions import _special
from tests._helpers import gradients

_PACKAGE = Path(kd.__file__).parent

BACKEND = keras.backend.backend()
RTOL = ATOL = 1e-5
NUM_SAMPLES = 20_000


def f32(*arrays):
    out = tuple(np.asarray(a, dtype=np.float32) for a in arrays)
    return out if len(out) > 1 else out[0]


def numpy(x):
    return np.asarray(ops.convert_to_numpy(x), dtype=np.float64)


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(numpy(actual), np.asarray(expected, np.float64), rtol, atol)


# ---------------------------------------------------------------------------
# NumPy float64 references.


def gaussian_kl(loc_q, cov_q, loc_p, cov_p):
    """KL[N(loc_q, cov_q) || N(loc_p, cov_p)], batched, via inverse, trace and slogdet."""
    loc_q, cov_q, loc_p, cov_p = (np.asarray(a, np.float64) for a in (loc_q, cov_q, loc_p, cov_p))
    inv_p = np.linalg.inv(cov_p)
    diff = loc_p - loc_q
    d = loc_q.shape[-1]
    return 0.5 * (
        np.trace(inv_p @ cov_q, axis1=-2, axis2=-1)
        + np.einsum("...i,...ij,...j->...", diff, inv_p, diff)
        - d
        + np.linalg.slogdet(cov_p)[1]
        - np.linalg.slogdet(cov_q)[1]
    )


def diag_cov(scale):
    scale = np.asarray(scale, np.float64)
    return scale[..., :, None] ** 2 * np.eye(scale.shape[-1])


def tril_cov(tril):
    tril = np.tril(np.asarray(tril, np.float64))
    return tril @ np.swapaxes(tril, -1, -2)


# ---------------------------------------------------------------------------
# One case per distribution: fixed float32 parameters, a point `x` (with a
# leading sample axis) and float64 references of every method.


def _rng(seed):
    return np.random.default_rng(seed)


NORMAL_LOC, NORMAL_SCALE = f32([-1.0, 0.5, 2.0], [0.5, 1.0, 2.0])
DIAG_LOC, DIAG_SCALE = f32(_rng(1).normal(size=(2, 3)), _rng(2).uniform(0.5, 2.0, size=(2, 3)))
# A lower-triangular scale with one negative diagonal entry (only |diag|
# matters) and non-zero values in the upper triangle, which must be ignored.
TRIL_LOC = f32(_rng(3).normal(size=(2, 3)))
TRIL = f32(
    [
        [[1.2, 9.0, 9.0], [0.3, -0.8, 9.0], [-0.5, 0.4, 0.6]],
        [[0.7, -9.0, 3.0], [-0.2, 1.5, 9.0], [0.1, 0.9, 1.1]],
    ]
)
MIX_LOGITS = f32([[0.3, -1.0, 1.2, 0.0], [2.0, 0.1, -0.4, -0.2]])
MIX_LOC = f32(2.0 * _rng(4).normal(size=(2, 4, 3)))
MIX_SCALE = f32(_rng(5).uniform(0.3, 1.5, size=(2, 4, 3)))
BERNOULLI_LOGITS = f32([-2.0, -0.3, 0.0, 1.5])


def _mixture_moments():
    weights = special.softmax(MIX_LOGITS.astype(np.float64), axis=-1)[..., None]
    loc, scale = MIX_LOC.astype(np.float64), MIX_SCALE.astype(np.float64)
    mean = np.sum(weights * loc, axis=-2)
    delta = loc - mean[..., None, :]
    variance = np.sum(weights * (scale**2 + delta**2), axis=-2)
    # Central fourth moment of the mixture: the normal's E[(mu + s e - m)**4]
    # per component = delta**4 + 6 delta**2 s**2 + 3 s**4, weighted.
    fourth = np.sum(weights * (delta**4 + 6 * delta**2 * scale**2 + 3 * scale**4), axis=-2)
    return mean, variance, fourth


def normal_case():
    x = f32(_rng(10).normal(0.0, 2.0, size=(5, 3)))
    loc, scale = NORMAL_LOC.astype(np.float64), NORMAL_SCALE.astype(np.float64)
    return dict(
        dist=kd.Normal(NORMAL_LOC, NORMAL_SCALE),
        x=x,
        batch_shape=(3,),
        event_shape=(),
        log_prob=stats.norm.logpdf(x, loc, scale),
        mean=loc,
        variance=scale**2,
        fourth=3 * scale**4,
        entropy=stats.norm.entropy(loc, scale),
    )


def diag_case():
    x = f32(_rng(11).normal(size=(4, 2, 3)))
    loc, scale = DIAG_LOC.astype(np.float64), DIAG_SCALE.astype(np.float64)
    return dict(
        dist=kd.MultivariateNormalDiag(DIAG_LOC, DIAG_SCALE),
        x=x,
        batch_shape=(2,),
        event_shape=(3,),
        log_prob=stats.norm.logpdf(x, loc, scale).sum(-1),
        mean=loc,
        variance=scale**2,
        fourth=3 * scale**4,
        entropy=stats.norm.entropy(loc, scale).sum(-1),
    )


def tril_case():
    x = f32(_rng(12).normal(size=(4, 2, 3)))
    cov = tril_cov(TRIL)
    loc = TRIL_LOC.astype(np.float64)
    variance = np.diagonal(cov, axis1=-2, axis2=-1)
    return dict(
        dist=kd.MultivariateNormalTriL(TRIL_LOC, TRIL),
        x=x,
        batch_shape=(2,),
        event_shape=(3,),
        log_prob=np.stack(
            [stats.multivariate_normal(loc[b], cov[b]).logpdf(x[:, b]) for b in range(2)], axis=1
        ),
        mean=loc,
        variance=variance,
        fourth=3 * variance**2,
        entropy=np.array([stats.multivariate_normal(loc[b], cov[b]).entropy() for b in range(2)]),
    )


def mixture_case():
    x = f32(_rng(13).normal(0.0, 2.0, size=(5, 2, 3)))
    log_weights = special.log_softmax(MIX_LOGITS.astype(np.float64), axis=-1)
    component_log_prob = stats.norm.logpdf(x[:, :, None, :], MIX_LOC, MIX_SCALE).sum(-1)
    mean, variance, fourth = _mixture_moments()
    return dict(
        dist=kd.MixtureSameFamily(MIX_LOGITS, kd.MultivariateNormalDiag(MIX_LOC, MIX_SCALE)),
        x=x,
        batch_shape=(2,),
        event_shape=(3,),
        log_prob=special.logsumexp(log_weights + component_log_prob, axis=-1),
        mean=mean,
        variance=variance,
        fourth=fourth,
        entropy=None,
    )


def bernoulli_case():
    # Binary values and a grey level (0.25): log_prob is minus the cross-entropy.
    x = f32([[0.0, 1.0, 1.0, 0.25], [1.0, 0.0, 0.0, 1.0]])
    logits = BERNOULLI_LOGITS.astype(np.float64)
    p = special.expit(logits)
    return dict(
        dist=kd.Bernoulli(BERNOULLI_LOGITS),
        x=x,
        batch_shape=(4,),
        event_shape=(),
        log_prob=x * special.log_expit(logits) + (1 - x) * special.log_expit(-logits),
        mean=p,
        variance=p * (1 - p),
        # E[(x - p)**4] = p (1-p)**4 + (1-p) p**4 = p (1-p) (1 - 3 p (1-p)).
        fourth=p * (1 - p) * (1 - 3 * p * (1 - p)),
        entropy=stats.bernoulli(p).entropy(),
    )


CASES = {
    "normal": normal_case,
    "diag": diag_case,
    "tril": tril_case,
    "mixture": mixture_case,
    "bernoulli": bernoulli_case,
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request):
    return CASES[request.param]()


# ---------------------------------------------------------------------------
# Values against the closed forms.


def test_log_prob(case):
    assert_close(case["dist"].log_prob(case["x"]), case["log_prob"])


def test_mean_and_stddev(case):
    assert_close(case["dist"].mean(), case["mean"])
    assert_close(case["dist"].stddev(), np.sqrt(case["variance"]))


def test_entropy(case):
    if case["entropy"] is None:
        with pytest.raises(NotImplementedError, match="MixtureSameFamily has no closed-form"):
            case["dist"].entropy()
    else:
        assert_close(case["dist"].entropy(), case["entropy"])


def test_shapes_and_dtype(case):
    dist = case["dist"]
    assert dist.batch_shape == case["batch_shape"]
    assert dist.event_shape == case["event_shape"]
    assert dist.dtype == "float32"
    # (A multi-axis sample_shape is checked in test_sample_moments.)
    sample = dist.sample(seed=1)
    assert tuple(sample.shape) == case["batch_shape"] + case["event_shape"]
    assert keras.backend.standardize_dtype(sample.dtype) == "float32"
    assert tuple(dist.log_prob(case["x"]).shape) == case["log_prob"].shape


def test_mixture_log_prob_broadcasts_a_point_against_the_batch():
    # One point of shape (3,) against a batch of two mixtures: (2,).
    dist = mixture_case()["dist"]
    x = f32([0.5, -1.0, 2.0])
    log_weights = special.log_softmax(MIX_LOGITS.astype(np.float64), axis=-1)
    expected = special.logsumexp(
        log_weights + stats.norm.logpdf(x, MIX_LOC, MIX_SCALE).sum(-1), axis=-1
    )
    assert_close(dist.log_prob(x), expected)


def test_mixture_logits_shared_by_a_batch():
    # One set of weights (K,) for a batch of two mixtures (2, K, d).
    logits = MIX_LOGITS[0]
    dist = kd.MixtureSameFamily(logits, kd.MultivariateNormalDiag(MIX_LOC, MIX_SCALE))
    assert dist.batch_shape == (2,)
    x = mixture_case()["x"]
    log_weights = special.log_softmax(logits.astype(np.float64))
    component_log_prob = stats.norm.logpdf(x[:, :, None, :], MIX_LOC, MIX_SCALE).sum(-1)
    assert_close(dist.log_prob(x), special.logsumexp(log_weights + component_log_prob, axis=-1))


def test_mixture_of_scalar_normals():
    # Components with event shape (): the component axis is the last one.
    logits, loc, scale = f32([0.0, 1.0, -0.5], [-1.0, 2.0, 0.0], [0.5, 1.5, 1.0])
    dist = kd.MixtureSameFamily(logits, kd.Normal(loc, scale))
    x = f32([-1.0, 0.0, 3.0])
    expected = special.logsumexp(
        special.log_softmax(logits.astype(np.float64)) + stats.norm.logpdf(x[:, None], loc, scale),
        axis=-1,
    )
    assert_close(dist.log_prob(x), expected)
    assert tuple(dist.sample(50, seed=0).shape) == (50,)


# ---------------------------------------------------------------------------
# Sampling: moments within 4 standard errors.
#
# With n draws, the sample mean has standard error sqrt(var / n), and the
# sum((x - mean)**2) / n has sqrt((mu4 - var**2) / n), mu4 the central fourth
# moment (3 var**2 for a normal). The sample variance uses the sample mean m:
# var_hat = sum((x - mean)**2) / n - (m - mean)**2, so its bound adds the
# square of the mean's bound (needed where mu4 = var**2: a Bernoulli at p = 0.5,
# whose var_hat = m (1 - m) moves only at second order). Each coordinate is
# checked at 4 standard errors: a correct sampler fails one with probability
# ~6e-5, and the seeds are fixed.


@pytest.mark.parametrize("seed_kind", ["generator", "int"])
def test_sample_moments(case, seed_kind):
    # An integer seed serves several draws in a mixture (its component choice
    # and its noise; see test_mixture_choice_and_noise_are_independent).
    seed = keras.random.SeedGenerator(42) if seed_kind == "generator" else 42
    # Drawn as (4, n / 4) to check a multi-axis sample_shape on the way.
    draws = case["dist"].sample((4, NUM_SAMPLES // 4), seed=seed)
    event = case["batch_shape"] + case["event_shape"]
    assert tuple(draws.shape) == (4, NUM_SAMPLES // 4) + event
    assert keras.backend.standardize_dtype(draws.dtype) == "float32"
    draws = numpy(draws).reshape((NUM_SAMPLES,) + event)
    mean, variance, fourth = case["mean"], case["variance"], case["fourth"]
    mean_se = np.sqrt(variance / NUM_SAMPLES)
    variance_se = np.sqrt((fourth - variance**2) / NUM_SAMPLES)
    np.testing.assert_array_less(np.abs(draws.mean(0) - mean), 4 * mean_se)
    np.testing.assert_array_less(
        np.abs(draws.var(0) - variance), 4 * variance_se + (4 * mean_se) ** 2
    )


def test_mixture_choice_and_noise_are_independent():
    # Two components 20 standard deviations apart: the sign of a draw tells
    # its component k, and draw - loc_k is that component's noise, which must
    # be N(0, 1) whatever k. With an integer seed the choice and the noise are
    # two draws; given the same seed, the TensorFlow and PyTorch samplers
    # reuse the choice's random stream in the noise (E[noise**2 | k] came out
    # 15 and 5 standard errors low, passing the same seed to both draws).
    # Bounds: 4 standard errors, with
    # SE(mean of noise) = sqrt(1 / n_k), SE(mean of noise**2) = sqrt(2 / n_k),
    # SE(fraction of k = 1) = sqrt(0.25 / n).
    n = 2 * NUM_SAMPLES
    dist = kd.MixtureSameFamily(f32([0.0, 0.0]), kd.Normal(f32([-10.0, 10.0]), f32([1.0, 1.0])))
    draws = numpy(dist.sample(n, seed=1))
    component = draws > 0
    noise = np.where(component, draws - 10.0, draws + 10.0)
    assert abs(component.mean() - 0.5) < 4 * np.sqrt(0.25 / n)
    for group in (component, ~component):
        count = group.sum()
        assert abs(noise[group].mean()) < 4 * np.sqrt(1 / count)
        assert abs((noise[group] ** 2).mean() - 1) < 4 * np.sqrt(2 / count)


def test_bernoulli_samples_are_zero_or_one():
    draws = numpy(kd.Bernoulli(BERNOULLI_LOGITS).sample(100, seed=0))
    assert set(np.unique(draws)) <= {0.0, 1.0}


def test_tril_sample_covariance():
    dist = kd.MultivariateNormalTriL(TRIL_LOC[0], TRIL[0])
    # (4, n / 4): the noise shape of test_sample_moments[normal], which JAX
    # then compiles once.
    draws = numpy(dist.sample((4, NUM_SAMPLES // 4), seed=keras.random.SeedGenerator(7)))
    draws = draws.reshape(NUM_SAMPLES, 3)
    cov = tril_cov(TRIL[0])
    # For a Gaussian, Var(x_i x_j) = cov_ii cov_jj + cov_ij**2 (Isserlis), so
    # each entry of the sample covariance has that over n as its variance
    # (estimating the mean adds O(1/n), negligible).
    se = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / NUM_SAMPLES)
    sample_cov = np.cov(draws, rowvar=False)
    np.testing.assert_array_less(np.abs(sample_cov - cov), 4 * se)


def test_seeds():
    dist = kd.Normal(NORMAL_LOC, NORMAL_SCALE)
    # An integer: the same draws at each call.
    np.testing.assert_array_equal(numpy(dist.sample(50, seed=5)), numpy(dist.sample(50, seed=5)))
    # A SeedGenerator: new draws at each call, reproducible from its seed.
    generator = keras.random.SeedGenerator(5)
    first, second = numpy(dist.sample(50, seed=generator)), numpy(dist.sample(50, seed=generator))
    assert not np.allclose(first, second)
    np.testing.assert_array_equal(first, numpy(dist.sample(50, seed=keras.random.SeedGenerator(5))))
    # TFP's stateless pair of integers: the same draws for the same pair
    # (issue 17, point 18), other draws for another pair.
    pair = numpy(dist.sample(50, seed=(1, 2)))
    np.testing.assert_array_equal(pair, numpy(dist.sample(50, seed=[1, 2])))
    assert not np.allclose(pair, numpy(dist.sample(50, seed=(2, 1))))


def test_erfc_fallback_for_older_keras():
    # `keras.ops.erfc` exists from Keras 3.15 only; the declared floor is
    # older, where the Normal's cdf uses this fit (issue 17, point 13).
    from keras_elbo.distributions._special import erfc_rational

    x = np.linspace(-9.0, 9.0, 721)
    actual = numpy(erfc_rational(f32(x)))
    expected = special.erfc(x.astype(np.float32).astype(np.float64))
    # The fit's 1.2e-7, and float32's rounding of exp(-x**2 + ...).
    bound = 1.2e-7 + (x**2 + 4.0) * 2.0**-22
    np.testing.assert_array_less(np.abs(actual / expected - 1.0), bound)


class TestTFPAccessors:
    """Issue 17, point 18: the accessors of TFP that ported code calls."""

    def test_covariance_and_variance(self):
        rng = np.random.default_rng(4)
        tril = np.tril(rng.normal(size=(3, 4, 4))) + 2 * np.eye(4)
        loc = rng.normal(size=(3, 4))
        full = kd.MultivariateNormalTriL(f32(loc), f32(tril))
        expected = tril @ np.swapaxes(tril, -1, -2)
        assert_close(full.covariance(), expected, rtol=1e-5, atol=1e-6)
        assert_close(full.variance(), np.diagonal(expected, axis1=-2, axis2=-1), rtol=1e-5)
        scale = np.exp(rng.normal(size=(3, 4)))
        diag = kd.MultivariateNormalDiag(f32(loc), f32(scale))
        assert_close(diag.covariance(), scale[..., None] ** 2 * np.eye(4), rtol=1e-6, atol=0)
        assert_close(diag.variance(), scale**2, rtol=1e-6, atol=0)

    def test_mixture_distribution_and_components_distribution(self):
        logits = f32([[0.3, -0.2, 1.0]])
        components = kd.MultivariateNormalDiag(f32(np.zeros((1, 3, 2))), f32(np.ones((1, 3, 2))))
        mixture = kd.MixtureSameFamily(logits, components)
        assert mixture.components_distribution is components
        probs = np.exp(logits[0]) / np.exp(logits[0]).sum()
        assert_close(mixture.mixture_distribution.probs(), probs[None], rtol=1e-6, atol=0)
        if BACKEND == "tensorflow":  # the same names as TFP's
            tfd = pytest.importorskip("tensorflow_probability").distributions
            for name in ("mixture_distribution", "components_distribution"):
                assert hasattr(tfd.MixtureSameFamily, name)
            for name in ("covariance", "variance", "scale_tril"):
                assert hasattr(tfd.MultivariateNormalTriL, name)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("seed", {"seed": 1.5}),
        ("seed", {"seed": -1}),
        ("seed", {"seed": True}),
        ("seed", {"seed": (1, -2)}),
        ("seed", {"seed": (1, 2, 3)}),
        ("sample_shape", {"sample_shape": 2.0}),
        ("sample_shape", {"sample_shape": (2, -1)}),
    ],
)
def test_sample_argument_errors(name, kwargs):
    with pytest.raises(ValueError, match=f"Invalid value received for argument `{name}`"):
        kd.Normal(0.0, 1.0).sample(**kwargs)


def test_samples_are_reparameterised():
    # The same integer seed gives the same noise eps = (x - loc) / scale, so
    # d sum(loc + scale * eps) / d loc = n and / d scale = sum(eps).
    n = 50
    x = numpy(kd.Normal(NORMAL_LOC, NORMAL_SCALE).sample(n, seed=3))
    grad_loc, grad_scale = gradients(
        lambda loc, scale: kd.Normal(loc, scale).sample(n, seed=3), NORMAL_LOC, NORMAL_SCALE
    )
    assert_close(grad_loc, np.full(3, n))
    assert_close(grad_scale, ((x - NORMAL_LOC) / NORMAL_SCALE).sum(0))

    # d sum_n (L eps_n)_i / d L_ij = sum_n eps_nj on and below the diagonal.
    loc, tril = TRIL_LOC[0], TRIL[0]
    x = numpy(kd.MultivariateNormalTriL(loc, tril).sample(n, seed=3))
    eps = np.linalg.solve(np.tril(tril), (x - loc).T).T
    (grad_tril,) = gradients(lambda t: kd.MultivariateNormalTriL(loc, t).sample(n, seed=3), tril)
    assert_close(grad_tril, np.tril(np.ones((3, 1)) * eps.sum(0)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["Normal", "MultivariateNormalDiag"])
def test_log_prob_of_its_own_sample_reads_back_the_noise(family):
    # log q of the very tensor q sampled uses the stored noise: the value and
    # the gradient (total derivative through the sample too) must equal those
    # of log q at a copy of the same numbers, and the NumPy density.
    n = 4
    build = getattr(kd, family)

    def own(loc, scale):
        q = build(loc, scale)
        return q.log_prob(q.sample(n, seed=3))

    def copied(loc, scale):
        q = build(loc, scale)
        z = q.sample(n, seed=3)
        return q.log_prob(z + keras.ops.zeros_like(z))  # a new tensor

    x = numpy(build(NORMAL_LOC, NORMAL_SCALE).sample(n, seed=3))
    reference = stats.norm.logpdf(x, NORMAL_LOC, NORMAL_SCALE)
    if family == "MultivariateNormalDiag":
        reference = reference.sum(-1)
    assert_close(numpy(own(NORMAL_LOC, NORMAL_SCALE)), reference)
    for g_own, g_copied in zip(
        gradients(own, NORMAL_LOC, NORMAL_SCALE),
        gradients(copied, NORMAL_LOC, NORMAL_SCALE),
        strict=True,
    ):
        assert_close(g_own, g_copied, rtol=1e-5, atol=1e-5)
    # Sampled through z alone: d/d loc = 0, d/d scale = -1/scale per draw.
    grad_loc, grad_scale = gradients(own, NORMAL_LOC, NORMAL_SCALE)
    assert_close(grad_loc, np.zeros(3), atol=1e-5)
    assert_close(grad_scale, -n / NORMAL_SCALE, rtol=1e-5)


def test_tril_log_prob_of_its_own_sample():
    # Value and gradients equal those at a copy of the sample (a triangular
    # solve), and the NumPy density; then a scale whose off-diagonal entries
    # are three times its diagonal, where a float32 solve over 60 dimensions
    # loses every digit: log q of its own sample stays the closed form in eps.
    loc, tril = TRIL_LOC[0], np.tril(TRIL[0])

    def own(loc, tril):
        q = kd.MultivariateNormalTriL(loc, tril)
        return q.log_prob(q.sample(4, seed=3))

    def copied(loc, tril):
        q = kd.MultivariateNormalTriL(loc, tril)
        z = q.sample(4, seed=3)
        return q.log_prob(z + keras.ops.zeros_like(z))

    x = numpy(kd.MultivariateNormalTriL(loc, tril).sample(4, seed=3))
    reference = stats.multivariate_normal(loc, tril @ tril.T).logpdf(x)
    assert_close(numpy(own(loc, tril)), reference, rtol=1e-4, atol=1e-4)
    for g_own, g_copied in zip(
        gradients(own, loc, tril), gradients(copied, loc, tril), strict=True
    ):
        assert_close(g_own, g_copied, rtol=1e-4, atol=1e-4)

    d = 60
    steep = f32(0.01 * np.eye(d) + 0.03 * np.tril(np.ones((d, d)), -1))
    q = kd.MultivariateNormalTriL(np.zeros(d, "float32"), steep)
    eps = numpy(_backend.standard_normal((2, d), "float32", 5))  # what sample draws
    expected = -0.5 * (eps**2).sum(-1) - d * np.log(0.01) - 0.5 * d * np.log(2 * np.pi)
    assert_close(numpy(q.log_prob(q.sample(2, seed=5))), expected, rtol=1e-5)


def test_standard_normal_given_as_constants():
    # NumPy or Python 0 and 1 make a standard normal (log_prob skips the
    # shift and scaling); tensors of 0 and 1 the general one: same numbers.
    x = f32([[-2.0, 0.0, 0.5], [1.0, 3.0, -0.3]])
    reference = stats.norm.logpdf(x).sum(-1)
    for loc, scale in [(np.zeros(3, "float32"), np.ones(3, "float32")), (0.0, 1.0)]:
        d = kd.MultivariateNormalDiag(loc, scale) if np.ndim(loc) else kd.Normal(loc, scale)
        assert d._marginals._standard if np.ndim(loc) else d._standard
        value = d.log_prob(x) if np.ndim(loc) else keras.ops.sum(d.log_prob(x), axis=-1)
        assert_close(numpy(value), reference)
    general = kd.MultivariateNormalDiag(keras.ops.zeros(3), keras.ops.ones(3))
    assert not general._marginals._standard
    assert_close(numpy(general.log_prob(x)), reference)

    # The closed-form KL to it, and to one of a larger batch (broadcast).
    q = kd.MultivariateNormalDiag(DIAG_LOC, DIAG_SCALE)
    kl = DIAG_LOC**2 / 2 + DIAG_SCALE**2 / 2 - 0.5 - np.log(DIAG_SCALE)
    standard = kd.MultivariateNormalDiag(np.zeros(3, "float32"), np.ones(3, "float32"))
    assert_close(kd.kl_divergence(q, standard), kl.sum(-1))
    wider = kd.MultivariateNormalDiag(np.zeros((4, 1, 3), "float32"), np.ones(3, "float32"))
    assert_close(kd.kl_divergence(q, wider), np.broadcast_to(kl.sum(-1), (4, 2)))


# ---------------------------------------------------------------------------
# KL divergences.

NORMAL_P_LOC, NORMAL_P_SCALE = f32([0.0, 1.5, -1.0], [1.0, 0.7, 3.0])
P_TRIL = f32([[0.9, 0.0, 0.0], [0.4, 1.3, 0.0], [-0.3, 0.2, 0.8]])
P_LOC = f32([0.2, -0.4, 1.0])


def kl_cases():
    """(id, q, p, float64 reference) with batch broadcasting between q and p."""
    p_diag_scale = f32([0.8, 1.5, 1.1])
    normal = (
        kd.Normal(NORMAL_LOC, NORMAL_SCALE),
        kd.Normal(NORMAL_P_LOC, NORMAL_P_SCALE),
        # Elementwise textbook form, a different expression from the library's.
        np.log(NORMAL_P_SCALE / NORMAL_SCALE.astype(np.float64))
        + (NORMAL_SCALE.astype(np.float64) ** 2 + (NORMAL_LOC - NORMAL_P_LOC) ** 2)
        / (2 * NORMAL_P_SCALE.astype(np.float64) ** 2)
        - 0.5,
    )
    diag_diag = (
        kd.MultivariateNormalDiag(DIAG_LOC, DIAG_SCALE),  # batch (2,)
        kd.MultivariateNormalDiag(P_LOC, p_diag_scale),  # batch ()
        gaussian_kl(DIAG_LOC, diag_cov(DIAG_SCALE), P_LOC, diag_cov(p_diag_scale)),
    )
    tril_diag = (
        kd.MultivariateNormalTriL(TRIL_LOC, TRIL),
        kd.MultivariateNormalDiag(P_LOC, p_diag_scale),
        gaussian_kl(TRIL_LOC, tril_cov(TRIL), P_LOC, diag_cov(p_diag_scale)),
    )
    diag_tril = (
        kd.MultivariateNormalDiag(DIAG_LOC, DIAG_SCALE),
        kd.MultivariateNormalTriL(P_LOC, P_TRIL),
        gaussian_kl(DIAG_LOC, diag_cov(DIAG_SCALE), P_LOC, tril_cov(P_TRIL)),
    )
    tril_tril = (
        kd.MultivariateNormalTriL(TRIL_LOC, TRIL),
        kd.MultivariateNormalTriL(P_LOC, P_TRIL),
        gaussian_kl(TRIL_LOC, tril_cov(TRIL), P_LOC, tril_cov(P_TRIL)),
    )
    return {
        "normal-normal": normal,
        "diag-diag": diag_diag,
        "tril-diag": tril_diag,
        "diag-tril": diag_tril,
        "tril-tril": tril_tril,
    }


KL_IDS = list(kl_cases())


@pytest.mark.parametrize("pair", KL_IDS)
def test_kl_closed_forms(pair):
    q, p, expected = kl_cases()[pair]
    assert kd.has_closed_form_kl(q, p)
    assert_close(kd.kl_divergence(q, p), expected)


def test_kl_of_a_distribution_with_itself_is_zero():
    # distrax's expm1 form: exactly 0 at q = p, no cancellation left over.
    q = kd.Normal(NORMAL_LOC, NORMAL_SCALE)
    assert_close(kd.kl_divergence(q, q), np.zeros(3), atol=0)
    tril = kd.MultivariateNormalTriL(TRIL_LOC, TRIL)
    assert_close(kd.kl_divergence(tril, tril), np.zeros(2), atol=1e-6)


def test_kl_gradients_normal():
    loc_q, scale_q, loc_p, scale_p = (
        a.astype(np.float64) for a in (NORMAL_LOC, NORMAL_SCALE, NORMAL_P_LOC, NORMAL_P_SCALE)
    )
    diff = loc_q - loc_p
    expected = [
        diff / scale_p**2,
        scale_q / scale_p**2 - 1 / scale_q,
        -diff / scale_p**2,
        1 / scale_p - (scale_q**2 + diff**2) / scale_p**3,
    ]
    actual = gradients(
        lambda lq, sq, lp, sp: kd.kl_divergence(kd.Normal(lq, sq), kd.Normal(lp, sp)),
        NORMAL_LOC,
        NORMAL_SCALE,
        NORMAL_P_LOC,
        NORMAL_P_SCALE,
    )
    for a, e in zip(actual, expected, strict=True):
        assert_close(a, e)


def test_kl_gradients_tril_diag():
    # KL = 0.5 * (sum((L / s[:, None])**2) + sum((dm / s)**2) - d) + sum(log s)
    #      - sum(log|diag L|),  dm = loc_p - loc_q. Hence
    # d/dloc_q = -dm / s**2, d/dL = tril(L / s[:, None]**2) - diag(1 / diag L),
    # d/ds = 1 / s - (sum_j L_ij**2 + dm**2) / s**3.
    loc_q, tril = TRIL_LOC[0], TRIL[0]
    scale_p = f32([0.8, 1.5, 1.1])
    L = np.tril(tril.astype(np.float64))
    s = scale_p.astype(np.float64)
    dm = P_LOC.astype(np.float64) - loc_q
    expected = [
        -dm / s**2,
        np.tril(L / s[:, None] ** 2) - np.diag(1 / np.diag(L)),
        1 / s - ((L**2).sum(1) + dm**2) / s**3,
    ]
    actual = gradients(
        lambda lq, t, sp: kd.kl_divergence(
            kd.MultivariateNormalTriL(lq, t), kd.MultivariateNormalDiag(P_LOC, sp)
        ),
        loc_q,
        tril,
        scale_p,
    )
    for a, e in zip(actual, expected, strict=True):
        assert_close(a, e)


def test_kl_gradients_tril_tril():
    # With S_p = L_p L_p^T, A = L_q L_q^T + dm dm^T, dm = loc_p - loc_q:
    # KL = 0.5 * (tr(S_p^-1 A) - d) + log|det L_p| - log|det L_q|, so
    # d/dL_q = tril(S_p^-1 L_q) - diag(1 / diag L_q),
    # d/dL_p = tril(-S_p^-1 A S_p^-1 L_p) + diag(1 / diag L_p),
    # d/dloc_p = S_p^-1 dm.
    loc_q, tril_q = TRIL_LOC[0], TRIL[0]
    Lq, Lp = np.tril(tril_q.astype(np.float64)), P_TRIL.astype(np.float64)
    dm = P_LOC.astype(np.float64) - loc_q
    inv_p = np.linalg.inv(Lp @ Lp.T)
    A = Lq @ Lq.T + np.outer(dm, dm)
    expected = [
        np.tril(inv_p @ Lq) - np.diag(1 / np.diag(Lq)),
        np.tril(-inv_p @ A @ inv_p @ Lp) + np.diag(1 / np.diag(Lp)),
        inv_p @ dm,
    ]
    actual = gradients(
        lambda tq, tp, lp: kd.kl_divergence(
            kd.MultivariateNormalTriL(loc_q, tq), kd.MultivariateNormalTriL(lp, tp)
        ),
        tril_q,
        P_TRIL,
        P_LOC,
    )
    for a, e in zip(actual, expected, strict=True):
        assert_close(a, e)


# ---------------------------------------------------------------------------
# The KL table.


def test_unregistered_pair_names_both_types():
    q, p = kd.Normal(0.0, 1.0), kd.Bernoulli(0.0)
    assert not kd.has_closed_form_kl(q, p)
    with pytest.raises(NotImplementedError, match=r"KL\(Normal \|\| Bernoulli\)"):
        kd.kl_divergence(q, p)


def test_duplicate_registration_names_both_types():
    with pytest.raises(ValueError, match=r"KL\(Normal \|\| Normal\) is already registered"):
        kd.register_kl(kd.Normal, kd.Normal)(lambda q, p: 0.0)
    # The failed registration left the closed form in place.
    assert_close(kd.kl_divergence(kd.Normal(1.0, 1.0), kd.Normal(0.0, 1.0)), 0.5)

    class First(kd.Distribution):
        pass

    class Second(kd.Distribution):
        pass

    kd.register_kl(First, Second)(lambda q, p: 1.0)
    with pytest.raises(ValueError, match=r"KL\(First \|\| Second\) is already registered"):
        kd.register_kl(First, Second)(lambda q, p: 2.0)
    assert kd.kl_divergence(First(), Second()) == 1.0


def test_register_kl_takes_classes():
    with pytest.raises(ValueError, match="Invalid value received for argument `type_q`"):
        kd.register_kl(kd.Normal(0.0, 1.0), kd.Normal)


def test_kl_lookup_follows_the_class_hierarchy():
    class Scaled(kd.Normal):
        pass

    q, p = Scaled(1.0, 1.0), kd.Normal(0.0, 1.0)
    # Inherited: Normal-Normal serves the subclass on either side.
    assert kd.has_closed_form_kl(q, p) and kd.has_closed_form_kl(p, q)
    assert_close(kd.kl_divergence(q, p), 0.5)
    # A nearer registration wins over the inherited one.
    kd.register_kl(Scaled, kd.Normal)(lambda q, p: -1.0)
    assert kd.kl_divergence(q, p) == -1.0
    assert_close(kd.kl_divergence(p, q), 0.5)


# ---------------------------------------------------------------------------
# Construction and dtypes.


@pytest.mark.parametrize(
    "name, build",
    [
        ("loc", lambda: kd.MultivariateNormalDiag(0.0, [1.0])),
        ("scale_diag", lambda: kd.MultivariateNormalDiag([0.0], 1.0)),
        ("loc", lambda: kd.MultivariateNormalTriL(0.0, np.eye(2, dtype="float32"))),
        ("scale_tril", lambda: kd.MultivariateNormalTriL(np.zeros(3), np.eye(2))),
        ("scale_tril", lambda: kd.MultivariateNormalTriL(np.zeros(2), np.ones((2, 3)))),
        ("mixture_logits", lambda: kd.MixtureSameFamily(np.zeros(3), kd.Normal(np.zeros(4), 1.0))),
        ("mixture_logits", lambda: kd.MixtureSameFamily(np.zeros(3), kd.Normal(0.0, 1.0))),
        ("components", lambda: kd.MixtureSameFamily(np.zeros(3), "normal")),
        (
            "mixture_logits",
            lambda: kd.MixtureSameFamily(np.zeros((3, 2)), kd.Normal(np.zeros((2, 2)), 1.0)),
        ),
        (
            "mixture_logits",
            lambda: kd.MixtureSameFamily(np.zeros((2, 2)), kd.Normal(np.zeros(2), 1.0)),
        ),
        ("scale", lambda: kd.Normal(np.zeros(2), np.ones(3))),
        ("scale_diag", lambda: kd.MultivariateNormalDiag(np.zeros((2, 3)), np.ones((2, 4)))),
        ("scale_tril", lambda: kd.MultivariateNormalTriL(np.zeros((2, 3)), np.ones((4, 3, 3)))),
    ],
)
def test_constructor_errors(name, build):
    with pytest.raises(ValueError, match=f"Invalid value received for argument `{name}`"):
        build()


def test_low_precision_parameters_compute_in_float32():
    dist = kd.Normal(np.float16(1.0), np.ones(2, np.float16))
    assert dist.dtype == "float32"
    assert keras.backend.standardize_dtype(dist.log_prob(0.0).dtype) == "float32"


def _float64_available():
    if BACKEND != "jax":
        return True
    import jax

    return bool(jax.config.jax_enable_x64)


@pytest.mark.skipif(not _float64_available(), reason="JAX computes float64 only with x64 enabled")
def test_float64_parameters_compute_in_float64():
    # float64 parameters give float64 results, accurate to float64 round-off.
    loc, scale = NORMAL_LOC.astype(np.float64) + 1e-9, NORMAL_SCALE.astype(np.float64)
    q = kd.MultivariateNormalTriL(loc, np.diag(scale))
    p = kd.MultivariateNormalDiag(np.zeros(3), np.ones(3))
    x = np.array([0.1, -0.2, 0.3])
    for value in (q.log_prob(x), q.sample(2, seed=0), q.entropy(), kd.kl_divergence(q, p)):
        assert keras.backend.standardize_dtype(value.dtype) == "float64"
    expected = stats.norm.logpdf(x, loc, scale).sum()
    np.testing.assert_allclose(numpy(q.log_prob(x)), expected, rtol=1e-12)


def test_repr():
    assert repr(kd.MultivariateNormalDiag(DIAG_LOC, DIAG_SCALE)) == (
        "<MultivariateNormalDiag batch_shape=(2,) event_shape=(3,) dtype=float32>"
    )


def test_package_imports_only_keras_numpy_the_standard_library_and_backend():
    # Written in keras.ops only, so that under JAX or PyTorch it pulls in no
    # TensorFlow (which reserves GPU memory and costs seconds to import).
    # Checked on the source: the run-time check (sys.modules after import
    # and training) belongs to the package's subprocess test.
    imported = set()
    for path in sorted(_PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                # `from keras_elbo import _backend` as `keras_elbo._backend`.
                imported.update(
                    f"{node.module}.{alias.name}" if node.module == "keras_elbo" else node.module
                    for alias in node.names
                )
    outside = {
        name
        for name in imported
        if name.split(".")[0] not in {"keras", "numpy", "keras_elbo"} | sys.stdlib_module_names
    }
    # Of the library, the package itself and keras_elbo._backend (which
    # imports TensorFlow only where it is the backend).
    library = {
        name
        for name in imported
        if name.startswith("keras_elbo") and not name.startswith("keras_elbo.distributions")
    }
    assert not outside, outside
    assert library <= {"keras_elbo._backend"}, library


# ---------------------------------------------------------------------------
# TFP as a second reference, on the TensorFlow backend only.

tensorflow_only = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="TFP runs on the TensorFlow backend only"
)


def _tfp_equivalent(name):
    import tensorflow_probability as tfp

    tfd = tfp.distributions
    return {
        "normal": lambda: tfd.Normal(NORMAL_LOC, NORMAL_SCALE),
        "diag": lambda: tfd.MultivariateNormalDiag(DIAG_LOC, DIAG_SCALE),
        # TFP reads the lower triangle only, as the library does.
        "tril": lambda: tfd.MultivariateNormalTriL(TRIL_LOC, TRIL),
        "mixture": lambda: tfd.MixtureSameFamily(
            tfd.Categorical(logits=MIX_LOGITS), tfd.MultivariateNormalDiag(MIX_LOC, MIX_SCALE)
        ),
        "bernoulli": lambda: tfd.Bernoulli(logits=BERNOULLI_LOGITS, dtype="float32"),
    }[name]()


@tensorflow_only
@pytest.mark.parametrize("name", list(CASES))
def test_against_tfp(name):
    ours, theirs = CASES[name]()["dist"], _tfp_equivalent(name)
    x = CASES[name]()["x"]
    assert ours.batch_shape == tuple(theirs.batch_shape)
    assert ours.event_shape == tuple(theirs.event_shape)
    assert_close(ours.log_prob(x), theirs.log_prob(x))
    assert_close(ours.mean(), theirs.mean())
    assert_close(ours.stddev(), theirs.stddev())
    if name != "mixture":
        assert_close(ours.entropy(), theirs.entropy())


@tensorflow_only
def test_symbolic_batch_axis():
    # In a traced TensorFlow function (a functional model's `call`), the
    # batch size is unknown: parameters broadcast at run time instead.
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, 3]), tf.TensorSpec([None, 3, 3])])
    def kl_and_samples(loc, tril):
        q = kd.MultivariateNormalTriL(loc, tril)
        p = kd.MultivariateNormalDiag(P_LOC, f32([0.8, 1.5, 1.1]))
        mixture = kd.MixtureSameFamily(
            loc[:, :2], kd.MultivariateNormalDiag(MIX_LOC[0, :2], MIX_SCALE[0, :2])
        )
        return kd.kl_divergence(q, p), q.sample(2, seed=1), mixture.sample(2, seed=2)

    kl, draws, mixture_draws = kl_and_samples(TRIL_LOC, TRIL)
    assert_close(kl, kl_cases()["tril-diag"][2])
    assert tuple(draws.shape) == tuple(mixture_draws.shape) == (2, 2, 3)


@tensorflow_only
@pytest.mark.parametrize("family", ["Normal", "Logistic", "StudentT", "MultivariateNormalTriL"])
def test_unknown_sizes_of_one_static_shape_broadcast_at_run_time(family):
    # Parameters of the same static shape (None, 3) are not broadcast when
    # built; a loc of 1 row against a scale of 4 rows must still give 4 rows
    # of samples, each with its own noise.
    import tensorflow as tf

    def build(loc, scale):
        if family == "StudentT":
            return kd.StudentT(5.0 + 0.0 * scale, loc, scale)
        if family == "MultivariateNormalTriL":
            return kd.MultivariateNormalTriL(loc, scale[..., None] * np.eye(3, dtype="float32"))
        return getattr(kd, family)(loc, scale)

    spec = tf.TensorSpec([None, 3])
    draw = tf.function(
        lambda loc, scale: build(loc, scale).sample(seed=1), input_signature=[spec] * 2
    )
    samples = numpy(draw(np.zeros((1, 3), "float32"), np.ones((4, 3), "float32")))
    assert samples.shape == (4, 3)
    assert len(np.unique(samples[:, 0])) == 4


@tensorflow_only
@pytest.mark.parametrize("pair", KL_IDS)
def test_kl_against_tfp(pair):
    import tensorflow_probability as tfp

    tfd = tfp.distributions

    def to_tfp(dist):
        if isinstance(dist, kd.Normal):
            return tfd.Normal(dist.loc, dist.scale)
        if isinstance(dist, kd.MultivariateNormalDiag):
            return tfd.MultivariateNormalDiag(dist.loc, dist.scale_diag)
        return tfd.MultivariateNormalTriL(dist.loc, dist.scale_tril)

    q, p, _ = kl_cases()[pair]
    assert_close(kd.kl_divergence(q, p), tfd.kl_divergence(to_tfp(q), to_tfp(p)))


# ---------------------------------------------------------------------------
# The families added for keras_elbo.outputs (more in tests/test_outputs.py),
# and the special functions written for them.


def test_lgamma_against_scipy():
    # Float32 error ~2e-6 * max(1, |lgamma|) (see `_special.lgamma`): near the zeros
    # at 1 and 2 two terms of ~10 cancel.
    x = f32(np.concatenate([np.linspace(1e-3, 20.0, 200), np.logspace(1.3, 7, 30)]))
    expected = special.gammaln(x.astype(np.float64))
    actual = numpy(_special.lgamma(ops.convert_to_tensor(x)))
    np.testing.assert_array_less(np.abs(actual - expected), 3e-6 * np.maximum(1, np.abs(expected)))


@pytest.mark.parametrize("df", [0.5, 1.0, 3.0, 30.0, 200.0])
def test_student_t_cdf_against_scipy(df):
    # The continued fraction, on both of its sides (|z| small and large).
    # Error budget: the prefactor exp(lgamma(a + b) - lgamma(a) - lgamma(b)),
    # a = df / 2, carries float32 round-off of the lgamma terms (~6e-8 * a *
    # log(a) relative): 3e-6 up to df = 30, ~2e-5 at df = 200.
    atol = 3e-6 if df <= 30 else 3e-5
    z = f32(np.concatenate([np.linspace(-30, 30, 121), [-1e4, 1e-3, 1e4]]))
    actual = numpy(kd.StudentT(df, 0.0, 1.0).cdf(z))
    expected = stats.t.cdf(z.astype(np.float64), df)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=atol)
    # The lower tail to a relative accuracy, where the CDF is small but a
    # normal float32 number.
    lower = (z < -3) & (expected > 1e-30)
    np.testing.assert_allclose(actual[lower], expected[lower], rtol=10 * atol)


@pytest.mark.parametrize("df", [0.5, 1.0, 2.5, 5.0, 30.0, 200.0])
def test_student_t_quantile_against_scipy(df):
    # Newton's method on the library's own cdf: its root is off by the cdf's
    # absolute error (the budget above) divided by the density there, plus
    # float32 round-off of p itself (p * 2**-24 / density) and of the result.
    p = f32([1e-4, 0.01, 0.05, 0.3, 0.5, 0.7, 0.95, 0.999])
    loc, scale = 0.5, 2.0
    actual = numpy(kd.StudentT(f32(df), f32(loc), f32(scale)).quantile(p))
    p64 = p.astype(np.float64)
    expected = stats.t.ppf(p64, df, loc, scale)
    density = stats.t.pdf(expected, df, loc, scale)
    cdf_error = 3e-6 if df <= 30 else 3e-5
    bound = 2 * (cdf_error + p64 * 2.0**-24) / density + 1e-6 * np.abs(expected)
    np.testing.assert_array_less(np.abs(actual - expected), bound)
    assert actual[4] == pytest.approx(loc, abs=1e-6)  # the median exactly


NEW_CASES = {
    "logistic": (
        lambda: kd.Logistic(f32([0.0, 1.0]), f32([1.0, 0.5])),
        lambda x: stats.logistic.logpdf(x, [0.0, 1.0], [1.0, 0.5]),
    ),
    "student_t": (
        lambda: kd.StudentT(f32([0.7, 4.0]), f32([0.0, 1.0]), f32([1.0, 0.5])),
        lambda x: stats.t.logpdf(x, [0.7, 4.0], [0.0, 1.0], [1.0, 0.5]),
    ),
    "poisson": (
        lambda: kd.Poisson(f32(np.log([0.5, 30.0]))),
        lambda x: stats.poisson.logpmf(x, [0.5, 30.0]),
    ),
}


def test_logistic_and_student_t_moments_against_scipy():
    # Issue 17: a wrong Logistic stddev and Student's t variance were caught
    # only by another module's tests. As TFP's allow_nan_stats (and scipy for
    # the variance): a Student's t variance is NaN for df <= 1 and inf for
    # 1 < df <= 2, its mean NaN for df <= 1.
    loc, scale = f32([0.0, 1.0, -2.0]), f32([1.0, 0.5, 3.0])
    logistic = kd.Logistic(loc, scale)
    loc64, scale64 = loc.astype(np.float64), scale.astype(np.float64)
    assert_close(logistic.stddev(), stats.logistic.std(loc64, scale64), rtol=1e-6, atol=0)
    assert_close(logistic.mean(), stats.logistic.mean(loc64, scale64), rtol=1e-6, atol=0)
    df = f32([0.5, 1.0, 1.5, 2.0, 2.5, 30.0])
    loc, scale = f32([0.0, 1.0, -1.0, 2.0, 0.5, -3.0]), f32([1.0, 0.5, 2.0, 1.5, 0.7, 1.2])
    student = kd.StudentT(df, loc, scale)
    df64, loc64, scale64 = (a.astype(np.float64) for a in (df, loc, scale))
    variance, expected = numpy(student.variance()), stats.t.var(df64, loc64, scale64)
    np.testing.assert_array_equal(np.isnan(variance), np.isnan(expected))  # df <= 1
    np.testing.assert_array_equal(np.isinf(variance), np.isinf(expected))  # 1 < df <= 2
    assert np.isnan(expected[:2]).all() and np.isinf(expected[2:4]).all()
    finite = np.isfinite(expected)
    np.testing.assert_allclose(variance[finite], expected[finite], rtol=1e-6)
    np.testing.assert_allclose(
        numpy(student.stddev())[finite], np.sqrt(expected[finite]), rtol=1e-6
    )
    mean = numpy(student.mean())
    # scipy gives inf for an undefined mean (df <= 1), TFP and this library NaN.
    expected_mean = stats.t.mean(df64, loc64, scale64)
    np.testing.assert_allclose(mean, np.where(np.isfinite(expected_mean), expected_mean, np.nan))


@pytest.mark.parametrize("name", list(NEW_CASES))
def test_new_families_log_prob(name):
    build, reference = NEW_CASES[name]
    x = f32([[0.0, 3.0], [2.0, 27.0], [7.0, 1.0]])
    assert_close(build().log_prob(x), reference(x.astype(np.float64)), rtol=1e-5, atol=1e-4)


def test_poisson_log_prob_of_fractional_and_negative_counts():
    # Issue 17, point 6: as TFP's Poisson.log_prob, a fractional count is
    # scored by the same formula with lgamma (code ported from tfp.layers
    # passes rates); a negative one is outside the support.
    x = f32([-1.0, 0.5, 1.0, 2.75])
    values = numpy(kd.Poisson(f32(np.log(1.7))).log_prob(x))
    counts = x[1:].astype(np.float64)
    expected = counts * np.log(1.7) - 1.7 - special.gammaln(counts + 1.0)
    assert values[0] == -np.inf
    assert_close(values[1:], expected, rtol=1e-6)
    if BACKEND == "tensorflow":
        tfd = pytest.importorskip("tensorflow_probability").distributions
        assert_close(values[1:], tfd.Poisson(rate=1.7).log_prob(x[1:]).numpy(), rtol=1e-6)


def test_categorical_log_prob_and_entropy():
    logits = f32([[0.3, -1.0, 1.2], [2.0, 0.1, -0.4]])
    log_probs = special.log_softmax(logits.astype(np.float64), -1)
    assert_close(kd.Categorical(logits).log_prob(f32([2, 0])), log_probs[[0, 1], [2, 0]])
    assert_close(
        kd.OneHotCategorical(logits).log_prob(np.eye(3)[[2, 0]]), log_probs[[0, 1], [2, 0]]
    )
    entropy = -np.sum(np.exp(log_probs) * log_probs, -1)
    assert_close(kd.Categorical(logits).entropy(), entropy)
    assert_close(kd.OneHotCategorical(logits).entropy(), entropy)
    assert kd.Categorical(logits).batch_shape == (2,)
    assert kd.OneHotCategorical(logits).event_shape == (3,)


def test_normal_cdf_and_quantile():
    dist = kd.Normal(NORMAL_LOC, NORMAL_SCALE)
    loc, scale = NORMAL_LOC.astype(np.float64), NORMAL_SCALE.astype(np.float64)
    assert_close(dist.cdf(f32([-3.0, 0.5, 9.0])), stats.norm.cdf([-3.0, 0.5, 9.0], loc, scale))
    for p in (0.01, 0.5, 0.8):
        assert_close(dist.quantile(p), stats.norm.ppf(p, loc, scale), rtol=1e-5, atol=1e-5)


def test_mixture_of_scalar_normals_cdf_and_quantile():
    # Reference quantile by brentq on the NumPy mixture CDF.
    from scipy import optimize

    logits, loc, scale = f32([0.5, -0.5]), f32([-2.0, 3.0]), f32([0.5, 1.5])
    weights = special.softmax(logits.astype(np.float64))
    dist = kd.MixtureSameFamily(logits, kd.Normal(loc, scale))

    def mixture_cdf(x):
        return np.sum(weights * stats.norm.cdf(x, loc, scale))

    x = f32([-3.0, 0.0, 4.0])
    assert_close(dist.cdf(x), [mixture_cdf(v) for v in x])
    for p in (0.05, 0.5, 0.95):
        expected = optimize.brentq(lambda v, p=p: mixture_cdf(v) - p, -50, 50, xtol=1e-12)
        assert_close(dist.quantile(p), expected, rtol=1e-5, atol=1e-5)
    variance = np.sum(weights * (scale**2 + (loc - np.sum(weights * loc)) ** 2))
    assert_close(dist.variance(), variance)
