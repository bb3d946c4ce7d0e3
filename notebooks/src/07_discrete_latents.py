# %% [markdown]
# # Discrete latents: a categorical VAE, straight-through and Gumbel-softmax
#
# A VAE whose code is 12 categorical variables of 4 classes each (4**12, about
# 17 million codes), as in Jang et al. (2017), trained with `model.fit`. A
# discrete sample has no reparameterisation, so `CategoricalPosterior` gives it
# a gradient with the `estimator` it is given:
#
# - `"straight_through"`: a one-hot sample in the forward pass, the gradient of
#   the class probabilities in the backward pass (`one_hot + p - stop_gradient(p)`);
# - `"gumbel_softmax"`: the Concrete relaxation `softmax((logits + g) / t)` at a
#   temperature t that `TemperatureAnnealing` lowers during training; with
#   `hard=True`, its argmax forward and its gradient backward.
#
# The KL term is the closed form between the posterior's categoricals and the
# uniform prior, `sum(log(4) - H[q])`. The data are scikit-learn's 8x8 digits,
# binarized, so this runs offline in a few minutes on a laptop CPU.

# %%
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
FAST = os.environ.get("KERAS_ELBO_FAST") == "1"  # the test suite's short run

import keras
import matplotlib.pyplot as plt
import numpy as np

import keras_elbo as ke
from keras_elbo.datasets import load_digits

x_train, y_train, x_test, y_test = load_digits(with_labels=True)
epochs = 2 if FAST else 150
num_variables, num_classes = 12, 4
print("train", x_train.shape, "test", x_test.shape)

# %% [markdown]
# ## Three models, one per estimator
#
# The same encoder and decoder; only the posterior layer's estimator differs.
# Outside training the layer returns the most probable class of each variable
# (`inference="mode"`, the default).

# %%
ESTIMATORS = {
    "straight-through": {"estimator": "straight_through"},
    "Gumbel-softmax": {"estimator": "gumbel_softmax"},
    "Gumbel-softmax, hard": {"estimator": "gumbel_softmax", "hard": True},
}


def categorical_vae(estimator, hard=False, seed=0):
    keras.utils.set_random_seed(seed)
    x = keras.Input((64,), name="image")
    h = keras.layers.Dense(128, activation="relu")(x)
    posterior = ke.CategoricalPosterior(
        num_variables,
        num_classes,
        estimator=estimator,
        hard=hard,
        flatten=True,
        kl_regularizer=ke.KLRegularizer(),
        seed=seed,
        name="posterior",
    )
    decoder = keras.Sequential(
        [
            keras.Input((num_variables * num_classes,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(64),
        ],
        name="decoder",
    )
    vae = ke.ELBOModel(x, decoder(posterior(h)))
    vae.compile(optimizer=keras.optimizers.Adam(2e-3), loss=ke.BernoulliNLL(from_logits=True))
    return vae, posterior, decoder


# %% [markdown]
# ## Train
#
# The temperature of the two Gumbel-softmax models falls from 1 to 0.5 by the
# schedule of Jang et al., `max(0.5, exp(-r * step))`, here with `r` chosen to
# reach 0.5 two thirds of the way through; the callback logs it as `temperature`.

# %%
steps = epochs * int(np.ceil(len(x_train) / 64))
decay = ke.ExponentialDecay(rate=np.log(2.0) / (0.67 * steps), start=1.0, floor=0.5)
models, histories = {}, {}
for name, kwargs in ESTIMATORS.items():
    vae, posterior, decoder = categorical_vae(**kwargs)
    callbacks = []
    if kwargs["estimator"] == "gumbel_softmax":
        callbacks.append(ke.TemperatureAnnealing(decay, unit="step"))
    history = vae.fit(
        x_train,
        x_train,
        validation_data=(x_test, x_test),
        epochs=epochs,
        batch_size=64,
        verbose=0,
        callbacks=callbacks,
    ).history
    models[name], histories[name] = (vae, posterior, decoder), history
    print(f"{name:22s} test -ELBO after {epochs} epochs: {history['val_neg_elbo'][-1]:.2f} nats")

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
for name, history in histories.items():
    axes[0].plot(history["val_neg_elbo"], label=name)
    axes[1].plot(history["val_kl"], label=name)
    if "temperature" in history:
        axes[2].plot(history["temperature"], label=name)
axes[0].set(xlabel="epoch", ylabel="nats per example", title="test -ELBO")
axes[1].set(xlabel="epoch", ylabel="nats per example", title="test KL")
axes[2].set(xlabel="epoch", ylabel="temperature", title="Gumbel-softmax temperature")
for ax in axes:
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Test ELBO and log-likelihood
#
# `evaluate_elbo` samples the code as each model was trained: a relaxed point of
# the simplex for the soft Gumbel-softmax, one-hot vectors for the others. The
# importance-weighted estimate of log p(x) needs codes that q gives a
# probability, one-hot ones: the soft model has none, and the function refuses
# it with a message. The soft model's ELBO is its training objective, the
# categorical KL with the decoder reading relaxed codes: it bounds the
# likelihood of no discrete model, so it is not comparable with the other two
# rows (Maddison et al., 2017, discuss this gap).

# %%
for name, (vae, _, _) in models.items():
    elbo = ke.evaluate_elbo(vae, x_test, num_samples=10, seed=0, verbose=0)["elbo"]
    line = f"{name:22s} test ELBO {elbo.mean():7.2f} +- {elbo.std() / np.sqrt(len(elbo)):.2f}"
    try:
        log_px = ke.importance_weighted_log_likelihood(
            vae, x_test, num_samples=20 if FAST else 500, seed=0, verbose=0
        )
        line += f"   log p(x) {log_px.mean():7.2f}"
    except ValueError as error:
        line += "   log p(x): refused, " + str(error).split(", ")[0].split(": ")[1]
    print(line)

# %% [markdown]
# ## Samples of the prior
#
# Codes drawn from the uniform prior, one class per variable, decoded by each
# model's decoder (Bernoulli means).

# %%
rng = np.random.default_rng(0)
codes = np.eye(num_classes, dtype="float32")[rng.integers(num_classes, size=(16, num_variables))]
fig, axes = plt.subplots(len(models), 16, figsize=(12, 2.6))
for row, (name, (_, _, decoder)) in zip(axes, models.items(), strict=True):
    means = keras.ops.sigmoid(decoder(codes.reshape(16, -1)))
    for ax, image in zip(row, keras.ops.convert_to_numpy(means), strict=True):
        ax.imshow(image.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
        ax.axis("off")
    row[0].set_title(name, fontsize=8, loc="left")
plt.show()

# %% [markdown]
# ## What each variable encodes
#
# For the straight-through model: the most probable class of each variable
# (columns) for the test images of each digit (rows), as the share of images
# of that digit whose code takes class 0, 1, 2 or 3. A variable whose rows
# differ tells digits apart.

# %%
vae, posterior, _ = models["straight-through"]
encoder = keras.Model(vae.input, posterior.output)
modes = keras.ops.convert_to_numpy(encoder(x_test, training=False))
modes = modes.reshape(-1, num_variables, num_classes).argmax(-1)
fig, axes = plt.subplots(1, num_classes, figsize=(14, 3.2), sharey=True)
for k, ax in enumerate(axes):
    share = np.array([(modes[y_test == digit] == k).mean(0) for digit in range(10)])
    image = ax.imshow(share, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set(xlabel="variable", title=f"share of codes in class {k}")
axes[0].set_ylabel("digit")
fig.colorbar(image, ax=axes, shrink=0.8)
plt.show()
