# %% [markdown]
# # Is the uncertainty calibrated?
#
# After training a Bayesian network, the next question is whether its
# uncertainty means what it says: do 90% predictive intervals hold 90% of new
# targets, and is a class predicted with probability 0.8 right 80% of the
# time? `keras_elbo.calibration` measures both, from the output of
# `predictive_moments` (or any model's predictions), on every backend:
#
# - regression: `gaussian_predictive_nll`, `interval_coverage` at chosen
#   levels and `coverage_calibration_error` over levels 0.05 to 0.95;
# - classification: `expected_calibration_error`, `brier_score`,
#   `classification_nll` (also as Keras metrics, `ExpectedCalibrationError`
#   and `BrierScore`), `reliability_diagram`, and `fit_temperature`
#   (temperature scaling, Guo et al., 2017).
#
# Both data sets ship with scikit-learn: the diabetes regression (442 patients)
# and the 8x8 digits.

# %%
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
FAST = os.environ.get("KERAS_ELBO_FAST") == "1"  # the test suite's short run

import keras
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_diabetes

import keras_elbo as ke
from keras_elbo.datasets import load_digits
from keras_elbo.predictive import predictive_moments

S = 20 if FAST else 200  # weight samples for the predictive distribution
rng = np.random.default_rng(0)
x, y = load_diabetes(return_X_y=True)
rows = rng.permutation(len(x))
train, test = rows[:342], rows[342:]
x_mean, x_std, y_mean, y_std = x[train].mean(0), x[train].std(0), y[train].mean(), y[train].std()
x_train, x_test = ((x[r] - x_mean) / x_std for r in (train, test))
y_train = ((y[train] - y_mean) / y_std)[:, None]
x_train, x_test, y_train = (a.astype("float32") for a in (x_train, x_test, y_train))
print(f"diabetes: {len(train)} training and {len(test)} test patients, {x.shape[1]} features")

# %% [markdown]
# ## A Bayesian regression network
#
# One hidden layer of `BayesianDense`, KL weight 1/N, and a learned noise:
# the last layer outputs the mean and a raw scale, read by
# `GaussianNLL(scale=None)` as `softplus(raw) + 1e-3`. The layers sample their
# weights at every call (`inference="sample"`), so S calls give S predictive
# Gaussians; their mixture has mean `mean_s(mu_s)` and variance
# `mean_s(sigma_s**2) + var_s(mu_s)` (noise plus epistemic spread).

# %%
N = len(x_train)
keras.utils.set_random_seed(0)
inputs = keras.Input((x.shape[1],))
hidden = ke.BayesianDense(32, "relu", kl_weight=1 / N, inference="sample", seed=0)(inputs)
outputs = ke.BayesianDense(2, kl_weight=1 / N, inference="sample", seed=1)(hidden)
regressor = ke.ELBOModel(inputs, outputs)  # logs each layer's KL beside the loss
regressor.compile(keras.optimizers.Adam(1e-2), ke.GaussianNLL(scale=None))
regressor.fit(x_train, y_train, batch_size=32, epochs=5 if FAST else 300, verbose=0)

outputs = np.stack([keras.ops.convert_to_numpy(regressor(x_test)) for _ in range(S)])
mu = outputs[..., 0] * y_std + y_mean  # (S, n), original units
sigma = (np.logaddexp(0.0, outputs[..., 1]) + 1e-3) * y_std
mean = mu.mean(0)
stddev = np.sqrt((sigma**2).mean(0) + mu.var(0))
epistemic = mu.std(0)
print(f"test RMSE {np.sqrt(np.mean((mean - y[test]) ** 2)):.1f} (target sd {y.std():.1f})")
print(f"epistemic share of the predictive variance: {np.mean(epistemic**2 / stddev**2):.0%}")

# %% [markdown]
# ## Coverage of the predictive intervals
#
# `interval_coverage` counts the targets inside each central interval
# `mean ± z * stddev`; a calibrated predictor covers the fraction named by the
# level. `coverage_calibration_error` averages `|coverage - level|` over levels
# 0.05 to 0.95, and `gaussian_predictive_nll` is the Gaussian NLL of the
# targets in nats per patient. The noise alone (`sigma`, without the epistemic
# spread) gives narrower intervals.

# %%
levels = np.round(np.arange(0.05, 1.0, 0.05), 2)
for name, scale in [("noise + epistemic", stddev), ("noise only", np.sqrt((sigma**2).mean(0)))]:
    cover = ke.interval_coverage(y[test], mean, scale, levels=(0.5, 0.9, 0.95))
    print(
        f"{name:18s} NLL {ke.gaussian_predictive_nll(y[test], mean, scale):.3f}  "
        f"coverage 50/90/95%: {'/'.join(f'{c:.0%}' for c in cover.values())}  "
        f"calibration error {ke.coverage_calibration_error(y[test], mean, scale):.3f}"
    )
coverage = ke.interval_coverage(y[test], mean, stddev, levels=levels)
order = np.argsort(mean)
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
left.errorbar(
    np.arange(len(order)),
    mean[order],
    1.645 * stddev[order],
    fmt="none",
    alpha=0.4,
    label="90% predictive interval",
)
left.scatter(np.arange(len(order)), y[test][order], s=6, c="k", label="target")
left.set(xlabel="test patient, by predicted mean", ylabel="disease progression")
left.legend(loc="upper left")
right.plot(levels, list(coverage.values()), "o-", label="Bayesian network")
right.plot([0, 1], [0, 1], "--", color="gray", label="calibrated")
right.set(xlabel="level of the central interval", ylabel="coverage on the test set")
right.legend(loc="upper left")
plt.tight_layout()
plt.show()

# %% [markdown]
# With 100 test patients each coverage has a standard error of about
# `sqrt(level * (1 - level) / 100)`, 3 points at the 90% level: read the
# curve's distance from the diagonal against that. In the run stored here the
# curve lies above the diagonal at every level: the intervals are too wide
# (the network is underconfident), and the learned noise alone is already
# nearer to calibrated than noise plus epistemic spread. A mean-field
# posterior with KL weight 1/N on 342 rows keeps much of the prior's spread;
# coverage is how a user sees it.
#
# ## A classifier before and after temperature scaling
#
# A plain network trained far past the point where the training loss stops
# teaching it anything grows its logits, and its probabilities become
# overconfident. Temperature scaling divides the logits by one number T,
# fitted by `fit_temperature` on held-out rows (never the training set or the
# test set): the argmax, so the accuracy, is unchanged; the confidence shrinks
# when T > 1.

# %%
x_digits, labels, x_digits_test, labels_test = load_digits(with_labels=True)
x_fit, labels_fit = x_digits[:1100], labels[:1100]
x_held, labels_held = x_digits[1100:], labels[1100:]  # for T only
keras.utils.set_random_seed(0)
classifier = keras.Sequential(
    [keras.Input((64,)), keras.layers.Dense(128, "relu"), keras.layers.Dense(10)]
)
classifier.compile(
    keras.optimizers.Adam(1e-3),
    keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=[ke.ExpectedCalibrationError(from_logits=True)],
)
classifier.fit(x_fit, labels_fit, batch_size=32, epochs=5 if FAST else 200, verbose=0)
BINS = 10  # of the ECE and the diagrams: 359 test images, most in the top bin
temperature = ke.fit_temperature(classifier.predict(x_held, verbose=0), labels_held)
print(f"fitted temperature T = {temperature:.2f}")

logits = classifier.predict(x_digits_test, verbose=0)
confidence = keras.ops.convert_to_numpy(keras.ops.softmax(logits)).max(-1)
print(f"test images predicted with confidence above 0.9: {np.mean(confidence > 0.9):.0%}")
fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
for ax, (name, scaled) in zip(
    axes, [("as trained", logits), (f"T = {temperature:.2f}", logits / temperature)], strict=True
):
    probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(scaled))
    # Dividing the logits by T > 0 keeps each row's argmax: the same accuracy.
    assert np.array_equal(probabilities.argmax(-1), logits.argmax(-1))
    print(
        f"{name:12s} accuracy {np.mean(probabilities.argmax(-1) == labels_test):.3f}  "
        f"ECE {ke.expected_calibration_error(labels_test, probabilities, BINS):.3f}  "
        f"Brier {ke.brier_score(labels_test, probabilities):.3f}  "
        f"NLL {ke.classification_nll(labels_test, probabilities):.3f}"
    )
    ke.reliability_diagram(labels_test, probabilities, num_bins=BINS, ax=ax)
    ax.set_title(f"{name}: {ax.get_title()}")
plt.tight_layout()
plt.show()

# %% [markdown]
# Most test images are predicted with confidence above 0.9, so the top bin
# holds most of the ECE's weight and the low bins hold a few images each (their
# bars are noisy). In the run stored here T > 1: the trained network was
# overconfident, and dividing its logits by T lowered the test ECE, the Brier
# score and the NLL at the same accuracy.
#
# The same metric while training, from `compile(metrics=[...])`: the ECE that
# Keras logged over the training rows of the last epoch.

# %%
print(
    "training ECE, last epoch:",
    round(float(classifier.history.history["expected_calibration_error"][-1]), 4),
)

# %% [markdown]
# ## A Bayesian classifier
#
# The same network with `BayesianDense` layers (KL weight 1/N) averages its
# probabilities over weight samples: `predictive_moments(...,
# task="classification", from_logits=True)` returns that average, to which
# the same metrics apply.

# %%
keras.utils.set_random_seed(0)
inputs = keras.Input((64,))
hidden = ke.BayesianDense(128, "relu", kl_weight=1 / len(x_fit), seed=0)(inputs)
bayesian = ke.ELBOModel(inputs, ke.BayesianDense(10, kl_weight=1 / len(x_fit), seed=1)(hidden))
bayesian.compile(
    keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
)
bayesian.fit(x_fit, labels_fit, batch_size=32, epochs=5 if FAST else 100, verbose=0)
moments = predictive_moments(
    bayesian, x_digits_test, num_samples=S, task="classification", from_logits=True
)
probabilities = moments["probabilities"]
print(
    f"Bayesian     accuracy {np.mean(probabilities.argmax(-1) == labels_test):.3f}  "
    f"ECE {ke.expected_calibration_error(labels_test, probabilities, BINS):.3f}  "
    f"Brier {ke.brier_score(labels_test, probabilities):.3f}  "
    f"NLL {ke.classification_nll(labels_test, probabilities):.3f}"
)
