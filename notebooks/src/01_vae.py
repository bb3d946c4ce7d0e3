# %% [markdown]
# # A variational autoencoder with `keras_elbo`
#
# A VAE trained with `model.fit`, no custom training loop: a `GaussianPosterior`
# layer samples the code z and adds the KL term of the ELBO through `add_loss`,
# and `BernoulliNLL` given to `compile` adds the reconstruction term. The `loss`
# that Keras logs is then the negative ELBO in nats per example.
#
# The data are scikit-learn's 8x8 handwritten digits, binarized: they ship with
# scikit-learn, so this runs offline in a minute on a laptop CPU. A latent space
# of two dimensions lets us draw it.

# %%
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
FAST = os.environ.get("KERAS_ELBO_FAST") == "1"  # the test suite's short run

import keras
import matplotlib.pyplot as plt
import numpy as np

import keras_elbo as ke
from keras_elbo.datasets import load_digits

keras.utils.set_random_seed(0)
x_train, y_train, x_test, y_test = load_digits(with_labels=True)
epochs = 2 if FAST else 200
print("train", x_train.shape, "test", x_test.shape)

# %% [markdown]
# ## Build
#
# The encoder ends in a `GaussianPosterior` with a `KLRegularizer` (the prior is
# N(0, I) and the KL its closed form). With `inference="mean"` the layer returns
# the posterior mean outside training, for clean reconstructions and codes; the
# KL is still added, from a sample.

# %%
x = keras.Input((64,), name="image")
h = keras.layers.Dense(128, activation="relu")(x)
posterior = ke.GaussianPosterior(
    2, kl_regularizer=ke.KLRegularizer(), inference="mean", seed=1, name="posterior"
)
z = posterior(h)
decoder = keras.Sequential(
    [keras.Input((2,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(64)],
    name="decoder",
)
vae = ke.ELBOModel(x, decoder(z), name="vae")
vae.compile(optimizer=keras.optimizers.Adam(2e-3), loss=ke.BernoulliNLL(from_logits=True))
vae.summary()

# %% [markdown]
# ## Train
#
# `ELBOModel` is a `keras.Model` that logs the parts of the ELBO: `fit` logs
# `loss` (here the negative ELBO), `kl`, `reconstruction` and `neg_elbo` (the
# negative ELBO at KL weight 1, which stays comparable across epochs under KL
# annealing) for the training and the validation data.

# %%
history = vae.fit(
    x_train,
    x_train,
    validation_data=(x_test, x_test),
    epochs=epochs,
    batch_size=64,
    verbose=0,
).history
print({key: round(values[-1], 2) for key, values in history.items()})

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for ax, key, title in zip(axes, ("loss", "kl"), ("train loss (-ELBO)", "KL"), strict=True):
    ax.plot(history[key], label="train")
    ax.plot(history[f"val_{key}"], label="test")
    ax.set(xlabel="epoch", ylabel="nats per example", title=title)
    ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Test ELBO and log-likelihood
#
# With `inference="mean"`, `evaluate` decodes the posterior mean, so its loss is
# not the ELBO. `evaluate_elbo` samples z whatever the layer's setting, and
# `importance_weighted_log_likelihood` gives the estimate of log p(x) that
# published tables report (it is above the ELBO).

# %%
elbo = ke.evaluate_elbo(vae, x_test, num_samples=10, seed=0, verbose=0)
log_px = ke.importance_weighted_log_likelihood(
    vae, x_test, num_samples=50 if FAST else 1000, seed=0, verbose=0
)
print(f"test ELBO          {elbo['elbo'].mean():7.2f} nats")
print(f"  reconstruction   {elbo['reconstruction'].mean():7.2f}")
print(f"  KL               {elbo['kl'].mean():7.2f}")
print(f"test log p(x)      {log_px.mean():7.2f} nats (importance-weighted)")


# %% [markdown]
# ## Reconstructions and samples


# %%
def show(images, rows, title):
    cols = int(np.ceil(len(images) / rows))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.8, rows * 0.8))
    for ax, image in zip(axes.flat, images, strict=False):
        ax.imshow(image.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title)
    plt.show()


probs = keras.ops.convert_to_numpy(keras.ops.sigmoid(vae.predict(x_test[:12], verbose=0)))
show(np.concatenate([x_test[:12], probs]), 2, "test images (top) and reconstructions (bottom)")
z_prior = np.random.default_rng(0).standard_normal((24, 2)).astype("float32")
samples = keras.ops.convert_to_numpy(keras.ops.sigmoid(decoder.predict(z_prior, verbose=0)))
show(samples, 3, "decoded samples of the prior N(0, I)")

# %% [markdown]
# ## The latent space
#
# Left: the posterior means of the test images, coloured by digit. Right: the
# decoder's output over a grid of z.

# %%
codes = keras.ops.convert_to_numpy(posterior.distribution(vae.layers[1](x_test)).mean())
grid = np.linspace(-2.5, 2.5, 12, dtype="float32")
zs = np.array([[a, b] for b in grid[::-1] for a in grid], dtype="float32")
tiles = keras.ops.convert_to_numpy(keras.ops.sigmoid(decoder.predict(zs, verbose=0)))
# A blank line of pixels around each 8x8 tile, or touching digits merge.
tiles = np.pad(tiles.reshape(-1, 8, 8), ((0, 0), (0, 1), (0, 1)))
canvas = tiles.reshape(12, 12, 9, 9).transpose(0, 2, 1, 3).reshape(108, 108)
fig, axes = plt.subplots(1, 2, figsize=(11, 5))
scatter = axes[0].scatter(codes[:, 0], codes[:, 1], c=y_test, cmap="tab10", s=10)
axes[0].legend(*scatter.legend_elements(), title="digit", fontsize=7, loc="upper right")
axes[0].set(xlabel="z[0]", ylabel="z[1]", title="test codes")
axes[1].imshow(canvas, cmap="gray_r", extent=(-2.5, 2.5, -2.5, 2.5))
axes[1].set(xlabel="z[0]", ylabel="z[1]", title="decoded grid")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Save and load
#
# Every layer is registered with Keras, so the model saves to `.keras` and loads
# back, with or without `custom_objects`.

# %%
vae.save("vae_digits.keras")
loaded = keras.saving.load_model("vae_digits.keras", custom_objects=ke.custom_objects())
same = all(
    np.array_equal(a, b) for a, b in zip(vae.get_weights(), loaded.get_weights(), strict=True)
)
print("weights identical after loading:", same)
print(
    "same reconstructions:",
    np.allclose(vae.predict(x_test, verbose=0), loaded.predict(x_test, verbose=0), atol=1e-5),
)
os.remove("vae_digits.keras")
