"""Reconstruction losses against NumPy log-likelihoods, in nats per example."""

import math
import re

import keras
import numpy as np
import pytest

import keras_elbo as ke
from tests import _helpers as h

BACKEND = keras.backend.backend()

# Tolerances: the losses compute in float32, unit round-off U = 2**-24, and
# sum n terms per example. Each term carries a relative error of a few U
# (log, exp, division), and the float32 sum adds at most (n - 1) * U times the
# sum of the terms' magnitudes (Higham, "Accuracy and stability of numerical
# algorithms", 2002, eq. 4.4). So |loss - reference| <= (n + 4) * U *
# sum(|terms|), with float64 NumPy references; the mean over a batch of b
# examples adds b * U.
U = 2.0**-24
REDUCTIONS = {"none": lambda v: v, "sum": np.sum, "sum_over_batch_size": np.mean}


def float32_bound(terms):
    """The round-off bound above for a float32 sum of each row of `terms`."""
    terms = np.abs(np.asarray(terms, np.float64)).reshape(len(terms), -1)
    return (terms.shape[1] + 4) * U * terms.sum(axis=1)


def assert_loss_close(actual, terms, reduction="none"):
    """`actual` equals the reduction of the per-example sums of `terms`."""
    per_example = np.asarray(terms, np.float64).reshape(len(terms), -1).sum(axis=1)
    reduce = REDUCTIONS[reduction]
    bound = reduce(float32_bound(terms)) + len(terms) * U * reduce(np.abs(per_example))
    actual = np.asarray(actual, np.float64)
    assert actual.shape == np.shape(reduce(per_example))
    assert np.all(np.abs(actual - reduce(per_example)) <= bound), (actual, reduce(per_example))


def bernoulli_terms(x, logits):
    """-log p(x_i | logit_i) per element, float64."""
    logits = np.asarray(logits, np.float64)
    log_p, log_1mp = -np.logaddexp(0, -logits), -np.logaddexp(0, logits)
    return -(x * log_p + (1 - x) * log_1mp)


def bernoulli_nll_numpy(x, logits):
    return bernoulli_terms(x, logits).reshape(len(x), -1).sum(axis=1)


def gaussian_terms(x, loc, scale):
    """-log N(x_i; loc_i, scale_i**2) per element, float64."""
    x, loc, scale = (np.asarray(a, np.float64) for a in (x, loc, scale))
    return 0.5 * ((x - loc) / scale) ** 2 + np.log(scale) + 0.5 * h.LOG_2PI


class TestBernoulliNLL:
    def test_zero_logits_give_pixels_times_log2(self):
        x = (np.random.default_rng(0).random((4, 784)) < 0.5).astype("float32")
        per_example = ke.bernoulli_nll(x, np.zeros_like(x), from_logits=True)
        assert_loss_close(per_example, np.full(x.shape, np.log(2.0)))

    @pytest.mark.parametrize("shape", [(6, 10), (6, 4, 4, 1)], ids=["flat", "image"])
    def test_logits_match_numpy_and_sum_over_all_event_axes(self, shape):
        rng = np.random.default_rng(1)
        x = (rng.random(shape) < 0.3).astype("float32")
        logits = rng.normal(scale=3.0, size=shape).astype("float32")
        terms = bernoulli_terms(x, logits)
        assert_loss_close(ke.bernoulli_nll(x, logits, from_logits=True), terms)
        loss = ke.BernoulliNLL(from_logits=True)
        assert_loss_close(loss(x, logits), terms, "sum_over_batch_size")

    def test_probabilities_match_numpy(self):
        rng = np.random.default_rng(2)
        x = (rng.random((5, 7)) < 0.5).astype("float32")
        probs = (1 / (1 + np.exp(-rng.normal(size=(5, 7))))).astype("float32")
        # The reference takes the float32 probabilities as given.
        p = probs.astype(np.float64)
        terms = -(x * np.log(p) + (1 - x) * np.log1p(-p))
        assert_loss_close(ke.BernoulliNLL()(x, probs), terms, "sum_over_batch_size")

    @pytest.mark.parametrize("reduction", list(REDUCTIONS))
    def test_reduction(self, reduction):
        rng = np.random.default_rng(3)
        x = (rng.random((5, 6)) < 0.5).astype("float32")
        logits = rng.normal(size=(5, 6)).astype("float32")
        loss = ke.BernoulliNLL(from_logits=True, reduction=reduction)
        assert_loss_close(loss(x, logits), bernoulli_terms(x, logits), reduction)

    def test_sample_weight(self):
        x = np.ones((2, 3), "float32")
        logits = np.array([[0.0] * 3, [1.0] * 3], "float32")
        per_example = bernoulli_nll_numpy(x, logits)
        value = ke.BernoulliNLL(from_logits=True)(x, logits, sample_weight=np.array([1.0, 0.0]))
        np.testing.assert_allclose(float(value), per_example[0] / 2, rtol=1e-6)

    def test_config_round_trip(self):
        loss = ke.BernoulliNLL(from_logits=True, reduction="sum", name="recon")
        clone = ke.BernoulliNLL.from_config(loss.get_config())
        assert clone.get_config() == loss.get_config()
        assert (clone.from_logits, clone.reduction, clone.name) == (True, "sum", "recon")


class TestGaussianNLL:
    def test_fixed_scale_matches_numpy(self):
        rng = np.random.default_rng(4)
        x = rng.normal(size=(5, 6)).astype("float32")
        loc = rng.normal(size=(5, 6)).astype("float32")
        terms = gaussian_terms(x, loc, 0.7)
        assert_loss_close(ke.gaussian_nll(x, loc, scale=0.7), terms)
        assert_loss_close(ke.GaussianNLL(scale=0.7)(x, loc), terms, "sum_over_batch_size")

    def test_learned_scale_matches_numpy(self):
        rng = np.random.default_rng(5)
        x = rng.normal(size=(5, 6)).astype("float32")
        y_pred = rng.normal(size=(5, 12)).astype("float32")
        scale = h.softplus(y_pred[:, 6:].astype(np.float64)) + 1e-3
        terms = gaussian_terms(x, y_pred[:, :6], scale)
        assert_loss_close(ke.GaussianNLL(scale=None)(x, y_pred), terms, "sum_over_batch_size")

    def test_learned_scale_keeps_its_floor(self):
        # softplus(-20) = 2e-9: the scale is min_scale, 0.5, not the default
        # floor 1e-3 (which would give a loss thousands of nats higher).
        rng = np.random.default_rng(6)
        x = rng.normal(size=(4, 3)).astype("float32")
        loc = rng.normal(size=(4, 3)).astype("float32")
        y_pred = np.concatenate([loc, np.full((4, 3), -20.0, "float32")], axis=1)
        terms = gaussian_terms(x, loc, h.softplus(-20.0) + 0.5)
        assert_loss_close(ke.gaussian_nll(x, y_pred, scale=None, min_scale=0.5), terms)
        loss = ke.GaussianNLL(scale=None, min_scale=0.5, reduction="none")
        assert_loss_close(loss(x, y_pred), terms)

    @pytest.mark.parametrize("reduction", list(REDUCTIONS))
    def test_reduction(self, reduction):
        rng = np.random.default_rng(7)
        x = rng.normal(size=(5, 6)).astype("float32")
        loc = rng.normal(size=(5, 6)).astype("float32")
        loss = ke.GaussianNLL(scale=0.7, reduction=reduction)
        assert_loss_close(loss(x, loc), gaussian_terms(x, loc, 0.7), reduction)

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
        loss = ke.GaussianNLL(scale=None, min_scale=0.01, reduction="none")
        clone = ke.GaussianNLL.from_config(loss.get_config())
        assert clone.get_config() == loss.get_config()
        assert (clone.scale, clone.min_scale, clone.reduction) == (None, 0.01, "none")


def latent_model(features=16):
    """x -> Dense -> GaussianPosterior 'posterior' (checks its parameters) -> Dense."""
    keras.utils.set_random_seed(0)
    x = keras.Input((features,))
    hidden = keras.layers.Dense(8, activation="relu")(x)
    posterior = ke.GaussianPosterior(
        2, kl_regularizer=ke.KLRegularizer(seed=0), seed=0, name="posterior"
    )
    return keras.Model(x, keras.layers.Dense(features)(posterior(hidden)))


# Raw 8-bit images, as they come from a file: values 0 to 255.
IMAGES = np.random.default_rng(8).integers(0, 256, size=(32, 16)).astype("uint8")
IMAGES[0, 0], IMAGES[0, 1] = 0, 255


class TestTargetChecks:
    def test_targets_outside_unit_interval_raise_eagerly(self):
        with pytest.raises(
            h.run_time_error(),
            match=r"BernoulliNLL: .* range from 0 to 255; scale the data to \[0, 1\]",
        ):
            ke.BernoulliNLL()(IMAGES, np.full(IMAGES.shape, 0.5, "float32"))

    @pytest.mark.parametrize("name", ["BernoulliNLL", "GaussianNLL"])
    def test_invalid_targets_give_nan_where_nothing_can_raise(self, name):
        # XLA and jax.jit drop the checks: a batch with an invalid target
        # gets a NaN loss for each example; a valid batch its values.
        clean = np.array([[0.0, 1.0], [1.0, 0.5]], "float32")
        loss = h.compiled(getattr(ke, name)(reduction="none"))
        pred = np.full(clean.shape, 0.5, "float32")
        if name == "BernoulliNLL":
            expected = [2 * np.log(2.0)] * 2
        else:
            expected = [np.sum(gaussian_terms(row, 0.5, 1.0)) for row in clean]
        np.testing.assert_allclose(h.numpy(loss(clean, pred)), expected, rtol=1e-6)
        invalid = [np.inf, np.nan, -np.inf] + ([2.0, -0.5] if name == "BernoulliNLL" else [])
        for value in invalid:
            y = clean.copy()
            y[1, 0] = value
            assert np.isnan(h.numpy(loss(y, pred))).all(), value

    @pytest.mark.parametrize("position", ["first", "middle", "last", "random"])
    def test_one_nan_anywhere_in_a_large_batch_is_found(self, position):
        # The checks reduce the whole batch (the range from its minimum and
        # maximum, which XLA's CPU reductions compute without NaN): one NaN,
        # wherever it lies, is found, and where nothing raises the loss is NaN.
        y = (np.random.default_rng(3).random((128, 784)) < 0.5).astype("float32")
        flat = {"first": 0, "middle": y.size // 2 + 3, "last": y.size - 1}.get(
            position, int(np.random.default_rng(4).integers(y.size))
        )
        y.flat[flat] = np.nan
        pred = np.zeros(y.shape, "float32")
        with pytest.raises(h.run_time_error(), match=r"targets \(y_true\) contain NaN"):
            ke.BernoulliNLL(from_logits=True)(y, pred)
        if BACKEND != "torch":  # (where nothing raises: the loss is NaN)
            assert np.isnan(h.numpy(h.compiled(ke.BernoulliNLL(from_logits=True))(y, pred)))

    @pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
    def test_targets_outside_unit_interval_in_fit(self, jit_compile):
        if jit_compile and BACKEND == "torch":
            pytest.skip("jit_compile=True is XLA on TensorFlow and JAX only")
        model = latent_model()
        model.compile(
            optimizer="adam", loss=ke.BernoulliNLL(from_logits=True), jit_compile=jit_compile
        )
        if not jit_compile:
            if BACKEND == "tensorflow":  # a graph's assertion shows its data in brackets
                match = (
                    r"BernoulliNLL: .*range from\] \[0\] \[to\] \[255\] "
                    r"\[; scale the data to \[0, 1\]"
                )
            else:  # PyTorch and JAX's fit without jit run eagerly
                match = r"BernoulliNLL: .*range from 0 to 255; scale the data to \[0, 1\]"
            with pytest.raises(h.run_time_error(), match=match):
                model.fit(IMAGES, IMAGES, batch_size=32, verbose=0)
        else:
            # XLA drops assertions: the loss is NaN, not a finite (negative)
            # number of "nats".
            history = model.fit(IMAGES, IMAGES, batch_size=32, verbose=0).history
            assert math.isnan(history["loss"][0])

    @pytest.mark.parametrize("name", ["BernoulliNLL", "GaussianNLL"])
    def test_non_finite_targets_raise_eagerly(self, name):
        y = np.array([[0.0, 1.0], [1.0, np.inf if name == "GaussianNLL" else np.nan]])
        loss = getattr(ke, name)()
        with pytest.raises(
            h.run_time_error(),
            match=rf"{name}: the targets \(y_true\) contain NaN or Inf",
        ):
            loss(y, np.full(y.shape, 0.5, "float32"))

    @pytest.mark.parametrize("name", ["BernoulliNLL", "GaussianNLL"])
    def test_nan_target_in_fit_is_named(self, name):
        # Clean inputs, one NaN in the targets: the error names the targets,
        # not the posterior layer whose parameters the NaN loss would poison
        # at the next step.
        rng = np.random.default_rng(9)
        x = rng.normal(size=(32, 16)).astype("float32")
        y = (rng.random((32, 16)) < 0.5).astype("float32")
        y[3, 5] = np.nan
        model = latent_model()
        loss = ke.BernoulliNLL(from_logits=True) if name == "BernoulliNLL" else ke.GaussianNLL()
        model.compile(optimizer="adam", loss=loss, jit_compile=False)
        with pytest.raises(h.run_time_error()) as info:
            model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
        message = str(info.value)
        assert f"{name}: the targets (y_true) contain NaN or Inf" in message
        assert "posterior" not in message


def test_losses_are_keras_losses():
    assert isinstance(ke.BernoulliNLL(), keras.losses.Loss)
    assert isinstance(ke.GaussianNLL(), keras.losses.Loss)


class TestShapeChecks:
    """Targets and predictions of different shapes are refused, not
    broadcast (issue 17, point 2): `(n, 1)` targets against `(n, 64)` logits
    gave 44.36 nats per example instead of an error."""

    @pytest.mark.parametrize(
        "loss, y_shape, pred_shape",
        [
            (ke.BernoulliNLL(from_logits=True), (4, 1), (4, 64)),
            (ke.BernoulliNLL(from_logits=True), (4, 8, 8), (4, 64)),
            (ke.GaussianNLL(), (4, 1), (4, 64)),
            (ke.GaussianNLL(), (4, 3, 2), (4, 2, 3)),
            (ke.GaussianNLL(scale=None), (4, 3), (4, 3)),
        ],
        ids=[
            "bernoulli-column",
            "bernoulli-rank",
            "gaussian-column",
            "gaussian-swapped",
            "learned",
        ],
    )
    def test_mismatched_shapes_are_named(self, loss, y_shape, pred_shape):
        with pytest.raises(
            ValueError, match=re.escape(f"y_true.shape={y_shape}, y_pred.shape={pred_shape}")
        ):
            loss(np.zeros(y_shape, "float32"), np.zeros(pred_shape, "float32"))

    def test_targets_with_a_trailing_unit_axis_in_fit(self):
        # `fit(x, x[..., None])` trained on an (n, 16, 16) outer product (a
        # loss near 2,900 instead of 45). The trailing axis of size 1 is now
        # dropped, as Keras's losses do: the same loss as with `x`.
        x = (np.random.default_rng(4).random((16, 16)) < 0.5).astype("float32")
        model = latent_model()
        model.compile(optimizer="adam", loss=ke.BernoulliNLL(from_logits=True))
        logits = h.numpy(model(x, training=False))
        expected = bernoulli_nll_numpy(x, logits)
        per_example = h.numpy(
            ke.BernoulliNLL(from_logits=True, reduction="none")(x[..., None], logits)
        )
        np.testing.assert_allclose(per_example, expected, rtol=1e-5)
        model.fit(x, x[..., None], batch_size=8, verbose=0)  # trains without broadcasting
        model = latent_model()
        model.compile(optimizer="adam", loss=ke.BernoulliNLL(from_logits=True))
        with pytest.raises(ValueError, match=r"BernoulliNLL: .*y_true.shape=\((None|8), 1\)"):
            model.fit(x, x[:, :1], batch_size=8, verbose=0)

    @pytest.mark.parametrize("learned", [False, True], ids=["fixed-scale", "learned-scale"])
    def test_a_target_vector_against_one_output_column(self, learned):
        # As Keras's losses do: (n,) targets against (n, 1) outputs are one
        # target per example, not an (n, n) outer product.
        rng = np.random.default_rng(3)
        y = rng.normal(size=5).astype("float32")
        pred = rng.normal(size=(5, 2 if learned else 1)).astype("float32")
        loss = ke.GaussianNLL(scale=None if learned else 0.5, reduction="none")
        scale = np.logaddexp(0, pred[:, 1:]) + 1e-3 if learned else 0.5
        assert_loss_close(loss(y, pred), gaussian_terms(y[:, None], pred[:, :1], scale))
        if not learned:  # and a trailing axis of size 1 on the targets
            assert_loss_close(loss(y[:, None], pred[:, 0]), gaussian_terms(y, pred[:, 0], 0.5))


class TestPredictionChecks:
    """`BernoulliNLL(from_logits=False)` refuses predictions outside [0, 1]
    (issue 17, point 3): clipped, 1.5 for a target 1 scored as a perfect fit."""

    def test_predictions_outside_unit_interval_raise_eagerly(self):
        y = np.ones((2, 3), "float32")
        with pytest.raises(
            h.run_time_error(),
            match=r"BernoulliNLL\(from_logits=False\): the predictions \(y_pred\) must be "
            r"probabilities in \[0, 1\], but they range from 0.5 to 1.5",
        ):
            ke.BernoulliNLL()(y, np.array([[0.5, 1.5, 1.0]] * 2, "float32"))

    def test_logits_are_not_range_checked(self):
        y = np.ones((2, 3), "float32")
        logits = np.full((2, 3), 1.5, "float32")
        value = float(h.numpy(ke.BernoulliNLL(from_logits=True)(y, logits)))
        np.testing.assert_allclose(value, bernoulli_nll_numpy(y, logits).mean(), rtol=1e-6)

    def test_invalid_predictions_give_nan_where_nothing_can_raise(self):
        y = np.ones((3, 2), "float32")
        loss = h.compiled(ke.BernoulliNLL(reduction="none"))
        pred = np.full((3, 2), 0.5, "float32")
        np.testing.assert_allclose(h.numpy(loss(y, pred)), [2 * np.log(2.0)] * 3, rtol=1e-6)
        for value in [1.5, -0.1, np.nan]:
            pred[1, 0] = value
            assert np.isnan(h.numpy(loss(y, pred))).all(), value

    def test_predictions_outside_unit_interval_in_fit(self):
        x = np.full((16, 16), 0.5, "float32")
        model = latent_model()  # linear outputs: not probabilities
        model.compile(optimizer="adam", loss=ke.BernoulliNLL(), jit_compile=False)
        with pytest.raises(h.run_time_error(), match=r"the predictions \(y_pred\) must be"):
            model.fit(x * 10, x, batch_size=8, verbose=0)
