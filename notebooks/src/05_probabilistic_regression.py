# %% [markdown]
# # Probabilistic regression: distribution outputs
#
# A model that predicts a distribution over `y`, not a single value, says how
# sure it is. In `keras_elbo` the model ends in a `Dense` layer that returns
# the distribution's parameters, and an output class from `keras_elbo.outputs`
# does the rest: given to `compile` it is the loss (the negative
# log-likelihood in nats per example), and `output.distribution(params)`
# turns the model's predictions into a distribution with `mean`, `stddev`,
# `quantile`, `sample` and `log_prob`. These classes replace the distribution
# layers of `tfp.layers` (`IndependentNormal`, `MixtureNormal`, ...), which
# return TFP distributions from a layer and do not run on Keras 3.
#
# Four cases on small synthetic 1-D data: noise of known size, noise that
# changes with x, a target with several branches, and a Bayesian network
# whose uncertainty grows away from the data.

# %%
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
FAST = os.environ.get("KERAS_ELBO_FAST") == "1"  # the test suite's short run

import keras
import matplotlib.pyplot as plt
import numpy as np

import keras_elbo as ke

to_numpy = keras.ops.convert_to_numpy
rng = np.random.default_rng(0)
x_grid = np.linspace(-3, 3, 300, dtype="float32")[:, None]


def f(x):
    return np.sin(2 * x) + 0.3 * x


def mlp(params_size, name, seed=0):
    """A small network ending in the parameters of an output distribution."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        name=name,
        layers=[
            keras.Input((1,)),
            keras.layers.Dense(32, activation="tanh"),
            keras.layers.Dense(32, activation="tanh"),
            keras.layers.Dense(params_size),
        ],
    )


def fit(model, loss, x, y, epochs, learning_rate=1e-2):
    model.compile(keras.optimizers.Adam(learning_rate), loss=loss)
    history = model.fit(x, y, epochs=epochs, batch_size=100, verbose=0).history
    print(f"{model.name}: final loss {history['loss'][-1]:.3f} nats per example")
    return model


# %% [markdown]
# ## 1. Known noise: `IndependentNormal(1, scale=sigma)`
#
# When the noise level is known, the model predicts only the mean: with a
# fixed `scale`, `params_size` is 1 per output and the loss is the Gaussian
# negative log-likelihood, a mean squared error up to constants. The
# distribution still gives intervals: the 90% band runs from the 5% to the
# 95% quantile.

# %%
SIGMA = 0.2
x1 = rng.uniform(-3, 3, (400, 1)).astype("float32")
y1 = (f(x1) + SIGMA * rng.standard_normal(x1.shape)).astype("float32")

known = ke.IndependentNormal(1, scale=SIGMA)
print("params_size:", known.params_size)
model_known = fit(mlp(known.params_size, "known_noise"), known, x1, y1, epochs=5 if FAST else 300)

dist = known.distribution(model_known.predict(x_grid, verbose=0))
mean, low, high = (
    to_numpy(t)[:, 0] for t in (dist.mean(), dist.quantile(0.05), dist.quantile(0.95))
)

train = known.distribution(model_known.predict(x1, verbose=0))
inside = (y1 >= to_numpy(train.quantile(0.05))) & (y1 <= to_numpy(train.quantile(0.95)))
print(f"training points inside the 90% band: {inside.mean():.1%}")

plt.figure(figsize=(7, 4))
plt.scatter(x1[:, 0], y1[:, 0], s=5, c="k", alpha=0.4, label="data")
plt.fill_between(x_grid[:, 0], low, high, alpha=0.3, label="90% band")
plt.plot(x_grid[:, 0], mean, label="predicted mean")
plt.plot(x_grid[:, 0], f(x_grid[:, 0]), "k:", lw=1, label="f(x)")
plt.title(f"Known noise, scale = {SIGMA}")
plt.xlabel("x")
plt.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 2. Unknown noise that depends on x: `IndependentNormal(1)`
#
# Without `scale`, the model predicts a mean and a raw scale per output
# (`params_size` 2), and the scale is `softplus(raw) + min_scale`: the noise
# is learned, for every x (heteroscedastic regression). Here the true noise
# scale is `0.1 + 0.25 * (1 + sin(1.5 x))`, from 0.1 to 0.6.


# %%
def true_scale(x):
    return 0.1 + 0.25 * (1 + np.sin(1.5 * x))


x2 = rng.uniform(-3, 3, (1000, 1)).astype("float32")
y2 = (f(x2) + true_scale(x2) * rng.standard_normal(x2.shape)).astype("float32")

learned = ke.IndependentNormal(1)
print("params_size:", learned.params_size)
model_learned = fit(
    mlp(learned.params_size, "learned_noise"), learned, x2, y2, epochs=5 if FAST else 300
)

dist = learned.distribution(model_learned.predict(x_grid, verbose=0))
mean, stddev = to_numpy(dist.mean())[:, 0], to_numpy(dist.stddev())[:, 0]
low, high = to_numpy(dist.quantile(0.05))[:, 0], to_numpy(dist.quantile(0.95))[:, 0]
error = np.abs(stddev - true_scale(x_grid[:, 0])).mean()
print(f"mean |learned stddev - true scale| over the grid: {error:.3f}")

fig, axes = plt.subplots(1, 2, figsize=(12, 4))
axes[0].scatter(x2[:, 0], y2[:, 0], s=4, c="k", alpha=0.3, label="data")
axes[0].fill_between(x_grid[:, 0], low, high, alpha=0.3, label="90% band")
axes[0].plot(x_grid[:, 0], mean, label="predicted mean")
axes[0].set(title="Learned, input-dependent noise", xlabel="x")
axes[0].legend(fontsize=8)
axes[1].plot(x_grid[:, 0], true_scale(x_grid[:, 0]), "k:", label="true noise scale")
axes[1].plot(x_grid[:, 0], stddev, label="learned stddev")
axes[1].set(title="Noise scale", xlabel="x", ylim=(0, None))
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Several answers for one x: `MixtureNormal(num_components, 1)`
#
# Inverse problems have several solutions. Bishop's example (1994): draw
# `y` in (0, 1), set `x = y + 0.3 sin(2 pi y)` plus noise, and predict `y`
# from `x`. In the middle of the range three values of `y` fit one `x`. A
# single normal can only put its mean between the branches, where there is no
# data; a mixture density network predicts, for every x, the weights, means
# and scales of `num_components` normals (`params_size` = 3 per component for
# a scalar target) and can put one on each branch.


# %%
def inverse_problem(n):
    y = rng.uniform(0, 1, (n, 1))
    x = y + 0.3 * np.sin(2 * np.pi * y) + rng.uniform(-0.1, 0.1, y.shape)
    return x.astype("float32"), y.astype("float32")


x3, y3 = inverse_problem(1000)
x3_test, y3_test = inverse_problem(1000)

mixture = ke.MixtureNormal(3, 1)
print("params_size:", mixture.params_size)
epochs = 5 if FAST else 500
model_mdn = fit(mlp(mixture.params_size, "mixture"), mixture, x3, y3, epochs, learning_rate=5e-3)
model_single = fit(
    mlp(learned.params_size, "one_normal"), learned, x3, y3, epochs, learning_rate=5e-3
)
for name, model in [("mixture of 3 normals", model_mdn), ("one normal", model_single)]:
    nll = model.evaluate(x3_test, y3_test, verbose=0)
    print(f"{name:22s} test NLL {nll:6.3f} nats per example")

# %% [markdown]
# The mixture has the lower test NLL (above) and its samples (right, five per
# x) follow the three branches. The single normal (left) can only widen its
# band over the whole fold, and its mean runs where the data are sparse.
# The mixture's own mean (right, blue) is no better: for such a target the
# mean is the wrong summary, the predictive distribution is the answer.

# %%
x_fold = np.linspace(x3.min(), x3.max(), 400, dtype="float32")[:, None]
mdn = mixture.distribution(model_mdn.predict(x_fold, verbose=0))
samples = to_numpy(mdn.sample(5, seed=1))[..., 0]  # (5, 400): 5 draws per x
single = learned.distribution(model_single.predict(x_fold, verbose=0))

fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
for ax in axes:
    ax.scatter(x3[:, 0], y3[:, 0], s=4, c="gray", alpha=0.3, label="data")
axes[0].fill_between(
    x_fold[:, 0],
    to_numpy(single.quantile(0.05))[:, 0],
    to_numpy(single.quantile(0.95))[:, 0],
    alpha=0.3,
    label="90% band",
)
axes[0].plot(x_fold[:, 0], to_numpy(single.mean())[:, 0], label="predicted mean")
axes[0].set(title="One normal: IndependentNormal(1)", xlabel="x", ylabel="y")
axes[1].scatter(np.broadcast_to(x_fold[:, 0], samples.shape), samples, s=3, c="C3", label="samples")
axes[1].plot(x_fold[:, 0], to_numpy(mdn.mean())[:, 0], "C0", label="mixture mean")
axes[1].set(title="Mixture density network: MixtureNormal(3, 1)", xlabel="x")
for ax in axes:
    ax.legend(fontsize=8, loc="upper left")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Uncertainty about the function: a Bayesian network
#
# The outputs above describe the noise in the data (aleatoric uncertainty).
# Where there are no data the networks still answer with confidence: nothing
# in their training told them otherwise. A Bayesian network keeps a
# posterior q(w) over its weights (`BayesianDense`, which replaces
# `tfp.layers.DenseVariational` and `DenseFlipout`; `estimator="flipout"`
# is the latter's estimator), and its predictions vary with the weights drawn
# (epistemic uncertainty). The last `BayesianDense` layer returns the
# parameters of an `IndependentNormal(1)`, which learns the noise as in part
# 2. As in notebook 04, each layer's `kl_weight` is `1 / N` (the KL is paid
# once per data set, the likelihood once per example), and `ke.ELBOModel`
# logs each layer's KL beside the loss.
#
# The data cover x in (-1.5, 1.5); we predict on (-3, 3).

# %%
x4 = rng.uniform(-1.5, 1.5, (1000, 1)).astype("float32")
y4 = (f(x4) + 0.15 * rng.standard_normal(x4.shape)).astype("float32")
N = len(x4)


def bayesian_mlp(params_size, kl_weight, seed=0):
    keras.utils.set_random_seed(seed)
    # inference="sample": every call outside training draws fresh weights.
    settings = {"kl_weight": kl_weight, "inference": "sample"}
    x = keras.Input((1,))
    h = ke.BayesianDense(64, activation="relu", seed=seed, **settings)(x)
    h = ke.BayesianDense(64, activation="relu", seed=seed + 1, **settings)(h)
    params = ke.BayesianDense(params_size, seed=seed + 2, **settings)(h)
    return ke.ELBOModel(x, params, name="bayesian")


model_bnn = bayesian_mlp(learned.params_size, kl_weight=1.0 / N)
model_bnn.compile(keras.optimizers.Adam(1e-2), loss=learned)
history = model_bnn.fit(x4, y4, epochs=20 if FAST else 1000, batch_size=N, verbose=0).history
print({key: round(values[-1], 2) for key, values in history.items()})

# %% [markdown]
# Each call draws new weights w ~ q(w). For each of 200 draws we keep the
# predicted mean (its spread is the epistemic uncertainty) and 20 draws of
# `y ~ p(y | x, w)`, so that the pooled draws follow the full predictive
# distribution, noise included. (With a fixed-scale head, whose only
# parameter is the mean, `ke.predictive_moments(model, x)` returns the same
# mean and epistemic spread directly; see notebook 04.)

# %%
num_draws = 50 if FAST else 200
means, draws = [], []
for i in range(num_draws):
    dist = learned.distribution(model_bnn(x_grid))
    means.append(to_numpy(dist.mean())[:, 0])
    draws.append(to_numpy(dist.sample(20, seed=i))[..., 0])
means, draws = np.stack(means), np.concatenate(draws)  # (200, 300), (4000, 300)

plt.figure(figsize=(7, 4))
plt.fill_between(
    x_grid[:, 0], *np.quantile(draws, [0.05, 0.95], axis=0), alpha=0.2, label="90% band, new y"
)
plt.fill_between(
    x_grid[:, 0],
    *np.quantile(means, [0.05, 0.95], axis=0),
    alpha=0.4,
    label="90% band of the mean (epistemic)",
)
plt.plot(x_grid[:, 0], means.mean(axis=0), label="predictive mean")
plt.plot(x_grid[:, 0], f(x_grid[:, 0]), "k:", lw=1, label="f(x)")
plt.scatter(x4[:, 0], y4[:, 0], s=3, c="k", alpha=0.3)
plt.axvspan(-1.5, 1.5, color="gray", alpha=0.08)
plt.ylim(-3, 3)
plt.title("Bayesian network: BayesianDense layers and an IndependentNormal head")
plt.xlabel("x")
plt.legend(fontsize=8, loc="upper left")
plt.show()

inside = np.abs(x_grid[:, 0]) < 1.4
outside = np.abs(x_grid[:, 0]) > 2.5
ratio = means.std(axis=0)[outside].mean() / means.std(axis=0)[inside].mean()
print(f"epistemic sd for |x| > 2.5 / inside the data: {ratio:.1f}")

# %% [markdown]
# Inside the data the band of the mean is narrow and the noise dominates;
# outside it the draws of the weights disagree and the band opens. The
# variance of a new y adds both parts, `mean_w(scale**2) + var_w(mean)` (the
# law of total variance over q(w)). The learned noise scale also grows
# outside the data: nothing there pins it down, so read it as a guess. A
# mean-field posterior is known to understate the uncertainty in gaps
# *between* data (notebook 04); beyond the data's range, as here, it grows
# readily.
