"""Hierarchies of stochastic layers (issue 18, point 2): the multi-sample
objectives of `ELBOModel` and the estimators of `keras_elbo.evaluation` draw
each sample ancestrally through every posterior and weigh it by every layer's
log p(z_l | ...) - log q(z_l | ...).

The reference is a linear Gaussian model with two stochastic layers, whose
log p(x) and exact posteriors are closed forms computed in NumPy:

    z2 ~ N(0, I),  z1 | z2 ~ N(z2 A + a0, s1^2 I),  x | z1 ~ N(z1 W + b, sx^2 I)

inferred top-down, q(z2 | x) then q(z1 | x, z2), as the layers are wired.
"""

import keras
import numpy as np
import pytest

import keras_elbo as ke
from tests.test_evaluation import fill_triangular_inverse

X_DIM, D2, D1, S1, SX = 4, 2, 2, 0.7, 0.5
MIN_SCALE = 1e-4
N = 300


def raw_scale(scale):
    """The raw value whose `softplus(raw) + MIN_SCALE` is `scale`."""
    return np.log(np.expm1(scale - MIN_SCALE))


def raw_tril(cov):
    """A full-covariance layer's raw scale entries for covariance `cov`."""
    tril = np.linalg.cholesky(cov)
    np.fill_diagonal(tril, raw_scale(np.diag(tril)))
    return fill_triangular_inverse(tril)


def set_projection(layer, kernel, bias, cov):
    """A posterior whose location is `inputs @ kernel + bias` and whose
    covariance is the constant `cov`."""
    raw = raw_tril(cov)
    layer.projection.set_weights(
        [
            np.concatenate([kernel, np.zeros((len(kernel), raw.size))], 1),
            np.concatenate([bias, raw]),
        ]
    )


def two_layer_model(scale_factor=1.0, loc_shift=0.0, seed=0):
    """The two-layer linear Gaussian model (see the module's docstring) with
    the exact posteriors, or their covariances times `scale_factor` and
    locations plus `loc_shift` (a worse q); its data and log p(x) per
    example, float64."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=(D2, D1))
    a0 = rng.normal(size=D1)
    w = rng.normal(size=(D1, X_DIM))
    b = rng.normal(size=X_DIM)
    # x | z2 ~ N(z2 M + m0, C), and the marginal of x.
    m, m0 = a @ w, a0 @ w + b
    c = S1**2 * w.T @ w + SX**2 * np.eye(X_DIM)
    marginal = m.T @ m + c
    # q(z2 | x) = p(z2 | x): N((x - m0) C^-1 M^T cov2, cov2).
    cov2 = np.linalg.inv(np.eye(D2) + m @ np.linalg.solve(c, m.T))
    x_to_mu2 = np.linalg.solve(c, m.T) @ cov2
    # q(z1 | x, z2) = p(z1 | x, z2): N(((x - b) W^T / sx^2 + (z2 A + a0) / s1^2) cov1, cov1).
    cov1 = np.linalg.inv(np.eye(D1) / S1**2 + w @ w.T / SX**2)
    x_to_mu1 = w.T @ cov1 / SX**2
    z2_to_mu1 = a @ cov1 / S1**2

    x = keras.Input((X_DIM,))
    top = ke.GaussianPosterior(
        D2,
        covariance="full",
        kl_regularizer=ke.KLRegularizer(metric_name="kl_top"),
        min_scale=MIN_SCALE,
        seed=seed,
        name="top",
    )
    z2 = top(x)
    prior = ke.ConditionalGaussianPrior(D1, min_scale=MIN_SCALE)
    lower = ke.GaussianPosterior(
        D1,
        covariance="full",
        kl_regularizer=ke.KLRegularizer(prior=prior, metric_name="kl_lower"),
        min_scale=MIN_SCALE,
        seed=seed + 1,
        name="lower",
    )
    z1 = lower(keras.layers.Concatenate()([x, z2]), prior_inputs=z2)
    decoder = keras.layers.Dense(X_DIM)
    model = keras.Model(x, decoder(z1))
    model.compile(loss=ke.GaussianNLL(scale=SX))

    set_projection(top, x_to_mu2, -m0 @ x_to_mu2 + loc_shift, scale_factor * cov2)
    set_projection(
        lower,
        np.concatenate([x_to_mu1, z2_to_mu1], 0),
        -b @ x_to_mu1 + a0 @ cov1 / S1**2 + loc_shift,
        scale_factor * cov1,
    )
    prior.projection.set_weights(
        [
            np.concatenate([a, np.zeros((D2, D1))], 1),
            np.concatenate([a0, np.full(D1, raw_scale(S1))]),
        ]
    )
    decoder.set_weights([w, b])

    data_rng = np.random.default_rng(4)
    data = data_rng.multivariate_normal(m0, marginal, size=N)
    diff = data - m0
    log_px = -0.5 * (
        np.einsum("nd,de,ne->n", diff, np.linalg.inv(marginal), diff)
        + np.linalg.slogdet(marginal)[1]
        + X_DIM * np.log(2 * np.pi)
    )
    return model, data.astype("float32"), log_px


def elbo_model(model, objective, num_samples):
    multi = ke.ELBOModel(model.inputs, model.outputs, objective=objective, num_samples=num_samples)
    multi.compile(loss=ke.GaussianNLL(scale=SX))
    return multi


def mean_and_standard_error(values):
    values = np.asarray(values, np.float64)
    return values.mean(), values.std(ddof=1) / np.sqrt(len(values))


class TestExactPosteriors:
    """With the exact posteriors every importance weight of an ancestral
    sample is p(x): any number of samples gives log p(x), with no noise.
    Weighing a layer's samples with the wrong prior, or pairing a lower
    sample with another top sample than the one it was drawn under, breaks
    the equality."""

    def test_importance_weighted_log_likelihood_is_log_p_x(self):
        model, x, log_px = two_layer_model()
        estimate = ke.importance_weighted_log_likelihood(
            model, x[:40], num_samples=30, batch_size=20, max_decoder_batch=200, verbose=0, seed=0
        )
        np.testing.assert_allclose(estimate, log_px[:40], rtol=1e-4, atol=1e-4)

    @pytest.mark.parametrize("num_samples", [1, 5])
    def test_the_importance_weighted_bound_of_fit_is_log_p_x(self, num_samples):
        model, x, log_px = two_layer_model()
        iwae = elbo_model(model, "iwae", num_samples)
        logs = iwae.evaluate(x[:40], x[:40], batch_size=20, verbose=0, return_dict=True)
        assert logs["neg_iwae"] == pytest.approx(-log_px[:40].mean(), rel=1e-5)
        # Each layer's KL is logged by name, and the ELBO's parts add up.
        assert logs["neg_elbo"] == pytest.approx(
            logs["reconstruction"] + logs["kl_top"] + logs["kl_lower"], rel=1e-5
        )


class TestWorsePosteriors:
    """Posteriors with twice the exact covariances and shifted locations:
    the acceptance list of issue 18 (point 2), with tolerances from the
    standard errors over the N examples."""

    @pytest.fixture(scope="class")
    def estimates(self):
        model, x, log_px = two_layer_model(scale_factor=2.0, loc_shift=0.4)
        iw = {
            k: ke.importance_weighted_log_likelihood(
                model, x, num_samples=k, batch_size=100, verbose=0, seed=k
            )
            for k in (1, 10, 100, 5000)
        }
        elbo = ke.evaluate_elbo(model, x, num_samples=1, batch_size=100, verbose=0, seed=7)
        return model, x, log_px, iw, elbo["elbo"]

    def test_one_sample_bound_is_the_elbo_in_expectation(self, estimates):
        _, _, _, iw, elbo = estimates
        difference = iw[1].mean() - elbo.mean()
        standard_error = np.sqrt(iw[1].var(ddof=1) / N + elbo.var(ddof=1) / N)
        assert abs(difference) < 4 * standard_error

    def test_bound_rises_with_k_and_stays_below_log_p_x(self, estimates):
        _, _, log_px, iw, _ = estimates
        gap = log_px.mean() - iw[1].mean()
        assert gap > 0.3  # the worse posterior leaves a gap to close
        for small, large in ((1, 10), (10, 100), (100, 5000)):
            rise, standard_error = mean_and_standard_error(iw[large] - iw[small])
            assert rise > 2 * standard_error, (small, large, rise, standard_error)
        for k, estimate in iw.items():
            excess, standard_error = mean_and_standard_error(estimate - log_px)
            assert excess < 3 * standard_error, (k, excess, standard_error)
        assert iw[100].mean() - iw[1].mean() >= 0.5 * gap

    def test_importance_weighted_log_likelihood_reaches_log_p_x(self, estimates):
        _, _, log_px, iw, _ = estimates
        error, standard_error = mean_and_standard_error(iw[5000] - log_px)
        assert abs(error) < 4 * standard_error + 1e-3

    @pytest.mark.parametrize("objective, k", [("elbo", 4), ("iwae", 1), ("iwae", 100)])
    def test_the_bounds_of_fit_agree_with_the_estimators(self, estimates, objective, k):
        # ELBOModel's multi-sample step (the top posterior draws K per
        # example, the lower one one per row) against the estimators: the
        # K-sample ELBO's expectation is the ELBO, the importance-weighted
        # bound's that of the estimator at the same K.
        model, x, _, iw, elbo = estimates
        logs = elbo_model(model, objective, k).evaluate(
            x, x, batch_size=N, verbose=0, return_dict=True
        )
        if objective == "elbo":
            reference, spread = elbo, elbo.std(ddof=1) / np.sqrt(k)
            logged = -logs["neg_elbo"]
        else:
            reference, spread = iw[k], iw[k].std(ddof=1)
            logged = -logs["neg_iwae"]
        # Two independent means over N examples (the model's over K samples).
        standard_error = np.sqrt(spread**2 / N + reference.var(ddof=1) / N)
        assert abs(logged - reference.mean()) < 4 * standard_error


def test_hierarchy_trains_with_each_objective():
    model, x, _ = two_layer_model(scale_factor=2.0, loc_shift=0.4)
    before = [np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_variables]
    for objective, k in (("elbo", 3), ("iwae", 3)):
        multi = ke.ELBOModel(model.inputs, model.outputs, objective=objective, num_samples=k)
        multi.compile(keras.optimizers.Adam(1e-2), loss=ke.GaussianNLL(scale=SX))
        history = multi.fit(x, x, epochs=1, batch_size=50, verbose=0).history
        assert np.all(np.isfinite(history["loss"]))
        assert sorted(history) == sorted(
            ["loss", "kl_top", "kl_lower", "reconstruction", "neg_elbo"]
            + (["neg_iwae"] if objective == "iwae" else [])
        )
    after = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    # Both posteriors, the conditional prior and the decoder moved.
    assert len(after) == 8
    assert all(not np.allclose(b, a) for b, a in zip(before, after, strict=True))


class SubclassedHierarchy(ke.ELBOModel):
    """The two-layer model as a subclassed `ELBOModel`. In a multi-sample step
    the top posterior returns K * batch rows, so `call` repeats x to match
    them before the lower posterior reads it."""

    def __init__(self, top, lower, decoder, **kwargs):
        super().__init__(**kwargs)
        self.top, self.lower, self.decoder = top, lower, decoder
        self.concatenate = keras.layers.Concatenate()

    def call(self, x):
        z2 = self.top(x)
        repeats = keras.ops.shape(z2)[0] // keras.ops.shape(x)[0]
        x_rows = keras.ops.tile(x, [repeats, 1])
        z1 = self.lower(self.concatenate([x_rows, z2]), prior_inputs=z2)
        return self.decoder(z1)


@pytest.mark.parametrize("num_samples", [1, 5])
def test_subclassed_hierarchy_bound_is_log_p_x(num_samples):
    # The same exact posteriors in a subclassed model: the first posterior it
    # calls draws K per example, the second one per row, and every weight
    # is p(x).
    model, x, log_px = two_layer_model()
    top, lower = model.get_layer("top"), model.get_layer("lower")
    subclassed = SubclassedHierarchy(
        top, lower, model.layers[-1], objective="iwae", num_samples=num_samples
    )
    subclassed.compile(loss=ke.GaussianNLL(scale=SX))
    logs = subclassed.evaluate(x[:40], x[:40], batch_size=20, verbose=0, return_dict=True)
    assert logs["neg_iwae"] == pytest.approx(-log_px[:40].mean(), rel=1e-5)
    assert logs["neg_elbo"] == pytest.approx(
        logs["reconstruction"] + logs["kl_top"] + logs["kl_lower"], rel=1e-5
    )
