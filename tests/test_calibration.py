"""Calibration metrics against NumPy/scipy references and hand-computed cases."""

import math

import keras
import numpy as np
import pytest
from scipy import optimize, special, stats

import keras_elbo as ke
from keras_elbo import calibration
from tests import _helpers as h

RNG = np.random.default_rng(0)
N, CLASSES = 400, 4
PROBS = RNG.dirichlet(np.full(CLASSES, 0.7), size=N)
LABELS = np.array([RNG.choice(CLASSES, p=p) for p in PROBS])
# float32 arithmetic on sums of a few hundred terms of size <= 1.
TOL = dict(rtol=1e-5, atol=1e-5)


def numpy_bins(labels, probs, num_bins):
    """Bins of the top-class confidence, right-closed ((b-1)/M, b/M], in loops."""
    confidence, predicted = probs.max(-1), probs.argmax(-1)
    count, conf_sum, correct_sum = np.zeros((3, num_bins))
    for conf, pred, label in zip(confidence, predicted, labels, strict=True):
        b = min(max(math.ceil(conf * num_bins) - 1, 0), num_bins - 1)
        count[b] += 1
        conf_sum[b] += conf
        correct_sum[b] += pred == label
    return count, conf_sum, correct_sum


def numpy_ece(labels, probs, num_bins):
    count, conf_sum, correct_sum = numpy_bins(labels, probs, num_bins)
    used = count > 0
    gaps = np.abs(correct_sum[used] / count[used] - conf_sum[used] / count[used])
    return float(np.sum(count[used] / len(labels) * gaps))


def two_classes(p_positive):
    return np.stack([1 - p_positive, p_positive], axis=-1)


class TestExpectedCalibrationError:
    @pytest.mark.parametrize("num_bins", [1, 5, 15])
    def test_matches_numpy(self, num_bins):
        expected = numpy_ece(LABELS, PROBS, num_bins)
        actual = calibration.expected_calibration_error(LABELS, PROBS, num_bins)
        np.testing.assert_allclose(actual, expected, **TOL)

    def test_hand_computed(self):
        # Two bins, (0, 0.5] and (0.5, 1]: confidence 0.5 falls in the first.
        probs = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])
        labels = np.array([1, 0, 0, 1])
        # bin 1: one example, confidence 0.5, wrong (argmax 0 != 1): gap 0.5;
        # bin 2: three, confidence 0.8, accuracy 2/3: gap 0.1333.
        expected = 1 / 4 * 0.5 + 3 / 4 * abs(2 / 3 - 0.8)
        actual = calibration.expected_calibration_error(labels, probs, num_bins=2)
        np.testing.assert_allclose(actual, expected, **TOL)

    def test_binary_output_one_hot_labels_and_logits_agree(self):
        p = RNG.uniform(size=N)
        y = (RNG.uniform(size=N) < p**2).astype(int)
        expected = numpy_ece(y, two_classes(p), 10)
        logits = np.log(p) - np.log1p(-p)
        for labels, predictions, from_logits in [
            (y, p, False),
            (y[:, None], p[:, None], False),
            (np.eye(2)[y], two_classes(p), False),
            (y, logits, True),
        ]:
            actual = calibration.expected_calibration_error(labels, predictions, 10, from_logits)
            np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)

    def test_metric_accumulates_batches_and_weights(self):
        metric = ke.ExpectedCalibrationError(num_bins=10)
        for start in range(0, N, 64):
            metric.update_state(LABELS[start : start + 64], PROBS[start : start + 64])
        np.testing.assert_allclose(float(metric.result()), numpy_ece(LABELS, PROBS, 10), **TOL)
        # A weight of 2 counts an example twice.
        weights = np.where(np.arange(N) % 3 == 0, 2.0, 1.0)
        repeated = np.repeat(np.arange(N), weights.astype(int))
        metric.reset_state()
        metric.update_state(LABELS, PROBS, sample_weight=weights)
        expected = numpy_ece(LABELS[repeated], PROBS[repeated], 10)
        np.testing.assert_allclose(float(metric.result()), expected, **TOL)

    def test_reliability_bins_and_diagram(self):
        bins = calibration.reliability_bins(LABELS, PROBS, num_bins=8)
        count, conf_sum, correct_sum = numpy_bins(LABELS, PROBS, 8)
        np.testing.assert_array_equal(bins["count"], count)
        used = count > 0
        np.testing.assert_allclose(bins["confidence"][used], conf_sum[used] / count[used], **TOL)
        np.testing.assert_allclose(bins["accuracy"][used], correct_sum[used] / count[used], **TOL)
        assert np.all(np.isnan(bins["accuracy"][~used]))
        matplotlib = pytest.importorskip("matplotlib")
        matplotlib.use("Agg")
        ax = calibration.reliability_diagram(LABELS, PROBS, num_bins=8)
        heights = [patch.get_height() for patch in ax.patches]
        np.testing.assert_allclose(heights, np.nan_to_num(bins["accuracy"]), **TOL)
        assert f"{numpy_ece(LABELS, PROBS, 8):.3f}" in ax.get_title()


@pytest.mark.skipif(h.BACKEND != "tensorflow", reason="TFP, a second reference: TensorFlow")
def test_ece_and_brier_agree_with_tfp():
    # TFP bins left-closed ([b/M, (b+1)/M)), this library right-closed as Guo
    # et al.: the same bins for confidences off the edges (random ones here).
    # TFP's Brier score is sum_c p_c**2 - 2 p_label, ours that plus 1.
    import tensorflow_probability as tfp

    logits = np.log(PROBS).astype("float32")
    expected = float(tfp.stats.expected_calibration_error(10, logits=logits, labels_true=LABELS))
    np.testing.assert_allclose(
        calibration.expected_calibration_error(LABELS, PROBS, 10), expected, **TOL
    )
    tfp_brier = float(np.mean(tfp.stats.brier_score(LABELS, logits)))
    np.testing.assert_allclose(calibration.brier_score(LABELS, PROBS), tfp_brier + 1.0, **TOL)


class TestBrierAndNLL:
    def test_brier_matches_numpy(self):
        expected = np.mean(np.sum((PROBS - np.eye(CLASSES)[LABELS]) ** 2, axis=-1))
        np.testing.assert_allclose(calibration.brier_score(LABELS, PROBS), expected, **TOL)

    def test_brier_of_one_output_counts_both_classes(self):
        p, y = np.array([0.9, 0.2, 0.6]), np.array([1, 0, 0])
        one_output = np.mean((p - y) ** 2)  # (0.01 + 0.04 + 0.36) / 3
        np.testing.assert_allclose(calibration.brier_score(y, p), 2 * one_output, **TOL)

    def test_nll_matches_numpy(self):
        probs = PROBS.copy()
        probs[0] = np.eye(CLASSES)[(LABELS[0] + 1) % CLASSES]  # p(label) = 0: clipped
        picked = np.maximum(probs[np.arange(N), LABELS], keras.config.epsilon())
        expected = np.mean(-np.log(picked))
        np.testing.assert_allclose(
            calibration.classification_nll(LABELS, probs), expected, rtol=1e-4
        )
        logits = np.log(PROBS) + 3.0  # softmax ignores the shift
        np.testing.assert_allclose(
            calibration.classification_nll(LABELS, logits, from_logits=True),
            np.mean(-np.log(PROBS[np.arange(N), LABELS])),
            rtol=1e-4,
        )

    def test_metrics_in_compile_equal_the_functions(self, tmp_path, monkeypatch):
        x = RNG.normal(size=(96, 3)).astype("float32")
        y = (x[:, 0] + 0.5 * RNG.normal(size=96) > 0).astype("int32")
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
        metrics = [ke.ExpectedCalibrationError(num_bins=5), ke.BrierScore()]
        model.compile("adam", "sparse_categorical_crossentropy", metrics=metrics)
        model.fit(x, y, epochs=2, batch_size=16, verbose=0)
        logs = model.evaluate(x, y, batch_size=32, return_dict=True, verbose=0)
        probs = model.predict(x, verbose=0)
        np.testing.assert_allclose(
            logs["expected_calibration_error"],
            calibration.expected_calibration_error(y, probs, 5),
            rtol=1e-4,
            atol=1e-5,
        )
        np.testing.assert_allclose(logs["brier_score"], calibration.brier_score(y, probs), 1e-4)
        for custom in (False, True):
            loaded = h.save_and_load(model, tmp_path / f"m{custom}.keras", custom, monkeypatch)
            reloaded = loaded.evaluate(x, y, batch_size=32, return_dict=True, verbose=0)
            for name in ("expected_calibration_error", "brier_score"):
                np.testing.assert_allclose(reloaded[name], logs[name], rtol=1e-5)


class TestTemperature:
    @pytest.mark.parametrize("classes", [2, 5])
    def test_minimises_the_nll_as_scipy_does(self, classes):
        logits = 3.0 * RNG.normal(size=(300, classes))
        labels = np.array([RNG.choice(classes, p=special.softmax(row / 2.0)) for row in logits])

        def nll(t):
            scaled = logits / t
            return np.mean(special.logsumexp(scaled, -1) - scaled[np.arange(300), labels])

        reference = optimize.minimize_scalar(
            nll, bounds=(0.01, 100), method="bounded", options={"xatol": 1e-10}
        ).x
        fitted = ke.fit_temperature(logits, labels)
        np.testing.assert_allclose(fitted, reference, rtol=1e-6)
        assert nll(fitted) < nll(1.0)  # the logits were overconfident (drawn at T = 2)

    def test_binary_logits_are_the_positive_class(self):
        logit = 2.0 * RNG.normal(size=200)
        labels = (RNG.uniform(size=200) < special.expit(logit / 3.0)).astype(int)
        two = np.stack([np.zeros(200), logit], axis=-1)
        np.testing.assert_allclose(
            ke.fit_temperature(logit, labels), ke.fit_temperature(two, labels), rtol=1e-9
        )

    def test_separable_data_reach_the_lower_bound(self):
        logits = np.array([[2.0, 0.0], [0.0, 2.0]])
        assert ke.fit_temperature(logits, [0, 1], bounds=(0.1, 10.0)) == 0.1


class TestRegression:
    def test_gaussian_nll_matches_scipy(self):
        mean, stddev = RNG.normal(size=(50, 3)), RNG.uniform(0.5, 2.0, size=(50, 3))
        y = mean + stddev * RNG.normal(size=(50, 3))
        expected = -np.mean(stats.norm.logpdf(y, mean, stddev).sum(-1))
        np.testing.assert_allclose(
            calibration.gaussian_predictive_nll(y, mean, stddev), expected, rtol=1e-5
        )

    def test_coverage_matches_scipy_intervals(self):
        mean, stddev = RNG.normal(size=500), RNG.uniform(0.5, 2.0, size=500)
        y = mean + 1.3 * stddev * RNG.normal(size=500)  # too narrow: undercovers
        levels = (0.3, 0.5, 0.9)
        coverage = calibration.interval_coverage(y, mean, stddev, levels)
        for level in levels:
            low, high = stats.norm.interval(level, mean, stddev)
            np.testing.assert_allclose(
                coverage[level], np.mean((y >= low) & (y <= high)), rtol=1e-6
            )

    def test_calibrated_predictions_cover_their_levels(self):
        n = 20_000
        mean, stddev = RNG.normal(size=n), RNG.uniform(0.5, 2.0, size=n)
        y = mean + stddev * RNG.normal(size=n)
        coverage = calibration.interval_coverage(y, mean, stddev, calibration.DEFAULT_LEVELS)
        for level, covered in coverage.items():
            # Binomial standard error of a fraction of n.
            assert abs(covered - level) < 4 * math.sqrt(level * (1 - level) / n)
        calibrated = calibration.coverage_calibration_error(y, mean, stddev)
        overconfident = calibration.coverage_calibration_error(y, mean, 0.5 * stddev)
        assert calibrated < 0.01 < 0.1 < overconfident
        expected = np.mean([abs(c - level) for level, c in coverage.items()])
        np.testing.assert_allclose(calibrated, expected, rtol=1e-12)


class TestErrors:
    @pytest.mark.parametrize(
        "labels, probs, message",
        [
            ([0, 1], [[0.5, 0.6], [1.2, -0.2]], "probabilities in \\[0, 1\\]"),
            ([0, 2], [[0.5, 0.5], [0.5, 0.5]], "labels in 0..1"),
            ([0, 1, 1], [[0.5, 0.5], [0.5, 0.5]], "Expected 2 integer labels"),
            ([0.5, 1], [[0.5, 0.5], [0.5, 0.5]], "integer labels"),
        ],
        ids=["out_of_range", "label_too_large", "count", "fractional"],
    )
    def test_bad_classification_inputs(self, labels, probs, message):
        with pytest.raises(ValueError, match=message):
            calibration.expected_calibration_error(np.array(labels), np.array(probs))

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="num_bins"):
            ke.ExpectedCalibrationError(num_bins=0)
        with pytest.raises(ValueError, match="from_logits"):
            ke.BrierScore(from_logits="yes")
        with pytest.raises(ValueError, match="one shape"):
            calibration.interval_coverage(np.zeros(3), np.zeros(3), np.ones(4))
        with pytest.raises(ValueError, match="stddev > 0"):
            calibration.gaussian_predictive_nll(np.zeros(3), np.zeros(3), np.zeros(3))
        with pytest.raises(ValueError, match="levels"):
            calibration.interval_coverage(np.zeros(3), np.zeros(3), np.ones(3), levels=(1.0,))
        with pytest.raises(ValueError, match="bounds"):
            ke.fit_temperature(np.zeros((2, 2)), [0, 1], bounds=(2.0, 1.0))

    def test_config_round_trip(self):
        for metric in (ke.ExpectedCalibrationError(7, from_logits=True), ke.BrierScore(True)):
            clone = type(metric).from_config(metric.get_config())
            assert clone.get_config() == metric.get_config()
