# %% [markdown]
# # A Bayesian neural network for 1-D regression
#
# `BayesianDense` keeps a mean-field Gaussian posterior q(w) over its weights
# and biases instead of point values, and adds KL[q(w) || p(w)] to the model's
# loss through the same `KLRegularizer` as the VAE layers. Predicting with
# several weight samples then gives an uncertainty that grows away from the
# data. Here the training inputs leave a gap in the middle.

# %%
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
FAST = os.environ.get("KERAS_ELBO_FAST") == "1"  # the test suite's short run

import keras
import matplotlib.pyplot as plt
import numpy as np

import keras_elbo as ke
from keras_elbo.bayesian import BayesianDense
from keras_elbo.predictive import predictive_moments

rng = np.random.default_rng(0)
NOISE = 0.1
x_train = np.concatenate([rng.uniform(-2, -0.5, 100), rng.uniform(0.5, 2, 100)])
y_train = np.sin(3 * x_train) + NOISE * rng.standard_normal(len(x_train))
x_train, y_train = x_train[:, None].astype("float32"), y_train[:, None].astype("float32")
N = len(x_train)
epochs = 20 if FAST else 1500
print(f"{N} training points, a gap in (-0.5, 0.5)")

# %% [markdown]
# ## The KL weight is 1 / N
#
# The ELBO of the whole data set is `sum_i log p(y_i | x_i, w) - KL[q(w) || p(w)]`
# (in expectation over q(w)): the KL is paid once, not once per example. Keras
# averages the loss over each batch, so to keep the same balance per example
# the KL enters with weight `1 / N`:
#
# ```python
# loss = mean_i(-log p(y_i | x_i, w)) + KL[q(w) || p(w)] / N
# ```
#
# Each `BayesianDense` takes `kl_weight=1 / N`. With `kl_weight=1` the prior
# would count N times too much and flatten the fit.


# %%
def build(kl_weight, seed=0):
    keras.utils.set_random_seed(seed)
    x = keras.Input((1,))
    h = BayesianDense(64, activation="relu", kl_weight=kl_weight, seed=seed)(x)
    h = BayesianDense(64, activation="relu", kl_weight=kl_weight, seed=seed + 1)(h)
    # ELBOModel logs each layer's KL (`<layer name>_kl`) beside the loss.
    model = ke.ELBOModel(x, BayesianDense(1, kl_weight=kl_weight, seed=seed + 2)(h))
    model.compile(keras.optimizers.Adam(1e-2), ke.GaussianNLL(scale=NOISE))
    return model


models = {"kl_weight = 1/N": build(1.0 / N), "kl_weight = 1": build(1.0)}
for name, model in models.items():
    history = model.fit(x_train, y_train, epochs=epochs, batch_size=N, verbose=0).history
    kl_total = sum(history[key][-1] for key in history if key.endswith("_kl"))
    print(f"{name:16s} final loss {history['loss'][-1]:8.2f}  total KL {kl_total:9.1f} nats")

# %% [markdown]
# ## Predictive uncertainty
#
# `predictive_moments` runs the model with 200 weight samples (it switches
# every layer to sampling for the call) and returns the mean prediction and its
# spread over q(w), the epistemic uncertainty. Adding the noise of the
# likelihood gives the spread of a new observation.

# %%
x_grid = np.linspace(-3, 3, 300, dtype="float32")[:, None]
fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
for ax, (name, model) in zip(axes, models.items(), strict=True):
    moments = predictive_moments(model, x_grid, num_samples=50 if FAST else 200)
    mean, epistemic = moments["mean"][:, 0], moments["stddev"][:, 0]
    total = np.sqrt(epistemic**2 + NOISE**2)
    ax.fill_between(
        x_grid[:, 0], mean - 2 * total, mean + 2 * total, alpha=0.2, label="±2 sd, new y"
    )
    ax.fill_between(
        x_grid[:, 0],
        mean - 2 * epistemic,
        mean + 2 * epistemic,
        alpha=0.4,
        label="±2 sd, epistemic",
    )
    ax.plot(x_grid[:, 0], mean, label="predictive mean")
    ax.plot(x_grid[:, 0], np.sin(3 * x_grid[:, 0]), "k:", lw=1, label="sin(3x)")
    ax.scatter(x_train[:, 0], y_train[:, 0], s=6, c="k")
    ax.axvspan(-0.5, 0.5, color="gray", alpha=0.08)
    ax.set(title=name, xlabel="x", ylim=(-3, 3))
axes[0].legend(loc="lower left", fontsize=8)
plt.tight_layout()
plt.show()

# %%
model = models["kl_weight = 1/N"]
moments = predictive_moments(model, x_grid, num_samples=50 if FAST else 200)
in_gap = np.abs(x_grid[:, 0]) < 0.25
in_data = (np.abs(x_grid[:, 0]) > 0.75) & (np.abs(x_grid[:, 0]) < 1.75)
ratio = moments["stddev"][in_gap].mean() / moments["stddev"][in_data].mean()
print(f"epistemic sd in the gap / inside the data: {ratio:.1f}")

# %% [markdown]
# In the run stored here the spread in the gap is about twice the spread inside
# the data. A mean-field Gaussian posterior is known to understate uncertainty
# *between* clusters of data (Foong et al., 2019, "'In-between' uncertainty in
# Bayesian neural networks"); outside the data's range it grows much faster.
# The test suite's version of this experiment (three hidden layers, 1024
# points, 4000 steps) measures a ratio of 2.5 to 4.3 across 16 seeds.
