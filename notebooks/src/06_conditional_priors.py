# %% [markdown]
# # Priors the network computes: conditional, hierarchical and sequential VAEs
#
# In a conditional VAE (Sohn et al., 2015) the prior of the code depends on a
# context c, here the digit's label: p(z | c) is a Gaussian whose location and
# scale a small network computes from c, and the KL term of the ELBO is
# KL[q(z | x, c) || p(z | c)], one closed form per example. In `keras_elbo` the
# prior is a layer, `ConditionalGaussianPrior`, held by the posterior's
# `KLRegularizer`; the posterior layer is called with the prior's inputs,
# `posterior(features, prior_inputs=c)`. Everything else is `model.fit`.
#
# The decoder reads the label too, p(x | z, c): the code z then only needs to
# hold what the label does not, the style of the handwriting. Asked for a
# class, the model draws z ~ p(z | c) and decodes it, so it writes digits of
# that class on demand. A classifier trained on the real digits checks that
# it does.
#
# The same two layers then make a two-layer hierarchical VAE, whose lower prior
# is computed from the code above it, and a sequential VAE (a recurrent
# state-space model), whose prior at each step is computed from a recurrent
# state.
#
# The data are scikit-learn's 8x8 handwritten digits, binarized (offline), and
# synthetic sine waves.

# %%
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
FAST = os.environ.get("KERAS_ELBO_FAST") == "1"  # the test suite's short run

import keras
import matplotlib.pyplot as plt
import numpy as np
from sklearn.linear_model import LogisticRegression

import keras_elbo as ke
from keras_elbo.datasets import load_digits

keras.utils.set_random_seed(0)
x_train, y_train, x_test, y_test = load_digits(with_labels=True)
onehot = np.eye(10, dtype="float32")
c_train, c_test = onehot[y_train], onehot[y_test]
epochs = 2 if FAST else 100
latent_dim = 4
print("train", x_train.shape, "test", x_test.shape)

# %% [markdown]
# ## Build
#
# Three networks: the encoder of (x, c), the prior network of c (a `Dense`
# layer, then the prior's own projection to a location and a scale), and the
# decoder of (z, c). The KL between the two Gaussians is the closed form
# (`mode="auto"`), with gradients into the encoder and into the prior network.
# `balance=0.8` is KL balancing (Hafner et al., 2021): the same KL, with 80% of
# its gradient moving the prior towards the posterior and 20% the posterior
# towards the prior.

# %%
image = keras.Input((64,), name="image")
label = keras.Input((10,), name="label")
features = keras.layers.Dense(128, activation="relu", name="encoder")(
    keras.layers.Concatenate()([image, label])
)
context = keras.layers.Dense(32, activation="relu", name="prior_network")(label)
prior = ke.ConditionalGaussianPrior(latent_dim, name="prior")
posterior = ke.GaussianPosterior(
    latent_dim,
    kl_regularizer=ke.KLRegularizer(prior=prior, balance=0.8),
    inference="mean",
    seed=1,
    name="posterior",
)
z = posterior(features, prior_inputs=context)
decoder = keras.Sequential(
    [
        keras.Input((latent_dim + 10,)),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(64),
    ],
    name="decoder",
)
cvae = ke.ELBOModel([image, label], decoder(keras.layers.Concatenate()([z, label])), name="cvae")
cvae.compile(optimizer=keras.optimizers.Adam(3e-3), loss=ke.BernoulliNLL(from_logits=True))

# %% [markdown]
# ## Train

# %%
history = cvae.fit(
    [x_train, c_train],
    x_train,
    validation_data=([x_test, c_test], x_test),
    epochs=epochs,
    batch_size=64,
    verbose=0,
).history
print({key: round(values[-1], 2) for key, values in history.items()})

fig, axes = plt.subplots(1, 2, figsize=(9, 3))
for key in ("neg_elbo", "val_neg_elbo"):
    axes[0].plot(history[key], label=key)
for key in ("kl", "val_kl"):
    axes[1].plot(history[key], label=key)
axes[0].set(xlabel="epoch", ylabel="nats per image", title="negative ELBO")
axes[1].set(xlabel="epoch", ylabel="nats per image", title="KL[q(z | x, c) || p(z | c)]")
for ax in axes:
    ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Digits on demand
#
# For each class c: z ~ p(z | c), from the prior layer's `distribution` of the
# prior network's output, then the decoder's Bernoulli means. One row per
# class.

# %%
prior_network = keras.Model(label, context)
z_in = keras.Input((latent_dim,))
generator = keras.Model([z_in, label], decoder(keras.layers.Concatenate()([z_in, label])))


def draw_digits(classes, seed):
    """Bernoulli means of digits drawn from p(z | c) for each class in `classes`."""
    c = keras.ops.convert_to_tensor(onehot[classes])
    draws = prior.distribution(prior_network(c)).sample(seed=seed)
    return keras.ops.convert_to_numpy(keras.ops.sigmoid(generator([draws, c])))


per_class = 10
grid = draw_digits(np.repeat(np.arange(10), per_class), seed=2)
fig, axes = plt.subplots(10, per_class, figsize=(per_class * 0.7, 7))
for ax, image_ in zip(axes.flat, grid, strict=True):
    ax.imshow(image_.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
    ax.axis("off")
plt.suptitle("z ~ p(z | c), one row per class c")
plt.show()

# %% [markdown]
# ## Are they the digits asked for?
#
# A logistic regression trained on the real training digits classifies the
# drawn digits (their Bernoulli means, and binary images drawn from them).
# The test suite checks the same on every backend
# (`tests/test_conditional.py`: at least 90% after 50 epochs).

# %%
classifier = LogisticRegression(max_iter=2000).fit(x_train, y_train)
asked = np.repeat(np.arange(10), 100)
means = draw_digits(asked, seed=3)
binary = (np.random.default_rng(0).random(means.shape) < means).astype("float32")
right = {
    "real test digits": classifier.score(x_test, y_test),
    "drawn digits, means": np.mean(classifier.predict(means) == asked),
    "drawn digits, binary draws": np.mean(classifier.predict(binary) == asked),
}
for what, share in right.items():
    print(f"{what}: {share:.3f} classified as their class")

# %% [markdown]
# ## The code holds the style
#
# One z per column, decoded with each label: what z encodes (slant, width,
# thickness) carries across the classes. And the learned prior: the location of
# p(z | c) for each class, beside the posterior means of the test digits.

# %%
styles = prior.distribution(prior_network(keras.ops.convert_to_tensor(onehot[[0] * 6]))).sample(
    seed=4
)
fig, axes = plt.subplots(10, 6, figsize=(4.2, 7))
for digit in range(10):
    c = keras.ops.convert_to_tensor(onehot[[digit] * 6])
    images = keras.ops.convert_to_numpy(keras.ops.sigmoid(generator([styles, c])))
    for ax, image_ in zip(axes[digit], images, strict=True):
        ax.imshow(image_.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
        ax.axis("off")
plt.suptitle("one z per column, every label")
plt.show()

encoder = keras.Model([image, label], z)  # inference="mean": posterior means
codes = encoder.predict([x_test, c_test], verbose=0)
prior_locs = keras.ops.convert_to_numpy(
    prior.distribution(prior_network(keras.ops.convert_to_tensor(onehot))).mean()
)
plt.figure(figsize=(5, 4))
plt.scatter(codes[:, 0], codes[:, 1], c=y_test, cmap="tab10", s=8, alpha=0.6)
plt.scatter(
    prior_locs[:, 0],
    prior_locs[:, 1],
    c=np.arange(10),
    cmap="tab10",
    marker="*",
    s=250,
    edgecolors="black",
)
plt.colorbar(label="digit")
plt.xlabel("z[0]")
plt.ylabel("z[1]")
plt.title("posterior means (dots), prior locations p(z | c) (stars)")
plt.show()

# %% [markdown]
# ## Two stochastic layers: a hierarchical VAE
#
# The same layer makes a top-down hierarchy (Burda et al., 2016; Sønderby et
# al., 2016): the top code z2 ~ q(z2 | x) against N(0, I), the lower one
# z1 ~ q(z1 | x, z2) against p(z1 | z2), a `ConditionalGaussianPrior` of z2.
# `ELBOModel` logs each layer's KL under its `metric_name`. Sampling is
# ancestral: z2 from N(0, I), z1 from p(z1 | z2), then the decoder. The
# estimators draw their samples the same way, through q: `evaluate_elbo` sums
# the two layers' KLs, and `importance_weighted_log_likelihood` weighs each
# ancestral sample by log p(x | z1) + log p(z1 | z2) - log q(z1 | x, z2) +
# log p(z2) - log q(z2 | x), a tighter estimate of log p(x) than the ELBO.

# %%
x = keras.Input((64,), name="image")
h = keras.layers.Dense(128, activation="relu")(x)
top = ke.GaussianPosterior(
    2, kl_regularizer=ke.KLRegularizer(metric_name="kl_top"), seed=3, name="top"
)
z2 = top(h)
lower_prior = ke.ConditionalGaussianPrior(4, name="lower_prior")
lower_context = keras.layers.Dense(32, activation="relu", name="lower_context")
lower = ke.GaussianPosterior(
    4,
    kl_regularizer=ke.KLRegularizer(prior=lower_prior, metric_name="kl_lower"),
    seed=4,
    name="lower",
)
z1 = lower(keras.layers.Concatenate()([h, z2]), prior_inputs=lower_context(z2))
hierarchy_decoder = keras.Sequential(
    [keras.Input((4,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(64)],
    name="hierarchy_decoder",
)
hvae = ke.ELBOModel(x, hierarchy_decoder(z1), name="hierarchical_vae")
hvae.compile(optimizer=keras.optimizers.Adam(3e-3), loss=ke.BernoulliNLL(from_logits=True))
hierarchy = hvae.fit(
    x_train, x_train, validation_data=(x_test, x_test), epochs=epochs, batch_size=64, verbose=0
).history
print({key: round(values[-1], 2) for key, values in hierarchy.items() if key.startswith("val_")})
test_elbo = ke.evaluate_elbo(hvae, x_test, seed=0, verbose=0)["elbo"].mean()
test_log_px = ke.importance_weighted_log_likelihood(
    hvae, x_test, num_samples=50 if FAST else 1000, seed=0, verbose=0
).mean()
print(f"test ELBO {test_elbo:.2f} nats, importance-weighted log p(x) {test_log_px:.2f} nats")

fig, axes = plt.subplots(1, 2, figsize=(10, 3))
for key in ("val_kl_top", "val_kl_lower"):
    axes[0].plot(hierarchy[key], label=key)
axes[0].set(xlabel="epoch", ylabel="nats per image", title="each layer's KL")
axes[0].legend()
z2_draws = keras.random.normal((16, 2), seed=5)
z1_draws = lower_prior.distribution(lower_context(z2_draws)).sample(seed=6)
ancestral = keras.ops.convert_to_numpy(keras.ops.sigmoid(hierarchy_decoder(z1_draws)))
axes[1].imshow(
    ancestral.reshape(2, 8, 8, 8).transpose(0, 2, 1, 3).reshape(16, 64),
    cmap="gray_r",
    vmin=0,
    vmax=1,
)
axes[1].set_title("ancestral samples: z2 ~ N(0, I), z1 ~ p(z1 | z2)")
axes[1].axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## A sequence: a recurrent state-space model
#
# The prior of a sequential latent model is computed from a recurrent state,
# p(z_t | h_t), as in the RSSM of PlaNet and Dreamer (Hafner et al., 2019): a
# deterministic state h_t = GRU(h_{t-1}, z_{t-1}), a code z_t ~ q(z_t | h_t, x_t)
# while observing, and an emission p(x_t | h_t, z_t). One step is a
# `keras.layers.RNN` cell holding a `GaussianPosterior` whose prior is a
# `ConditionalGaussianPrior` of h_t, with KL balancing as DreamerV2 uses it.
# The RNN is built with `unroll=True`, so that the cell runs in a Python loop
# and each step's KL is added (`ELBOModel` refuses a cell with a KL term that
# is not unrolled: the backends' loop primitives hide its losses); the logged
# `kl` is their sum over the steps.
#
# The data are noisy sine waves of random frequency, phase and amplitude, 30
# steps each. After training, the model observes the first half of a test
# sequence (the posterior's means) and then predicts the rest from the learned
# prior alone, drawing z_t ~ p(z_t | h_t): the spread of the draws is the
# model's uncertainty about the continuation.

# %%
steps, prefix = (10, 5) if FAST else (30, 15)
state_dim, code_dim = 32, 4
sequence_rng = np.random.default_rng(0)


def sine_waves(n):
    """`n` noisy sine waves of `steps` steps, `(n, steps, 1)`, and the clean ones."""
    t = np.arange(steps)
    frequency = sequence_rng.uniform(0.2, 0.5, (n, 1))
    phase = sequence_rng.uniform(0, 2 * np.pi, (n, 1))
    amplitude = sequence_rng.uniform(0.5, 1.5, (n, 1))
    clean = amplitude * np.sin(frequency * t + phase)
    noisy = clean + sequence_rng.normal(0, 0.1, clean.shape)
    return noisy.astype("float32")[..., None], clean


waves, _ = sine_waves(256 if FAST else 2000)
test_waves, test_clean = sine_waves(8)


class StateSpaceCell(keras.layers.Layer):
    """One step: h_t = GRU(h_{t-1}, z_{t-1}), z_t ~ q(z_t | h_t, x_t) against
    p(z_t | h_t). Outputs [h_t, z_t] for the emission."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.state_size = [state_dim, code_dim]
        self.output_size = state_dim + code_dim
        self.transition = keras.layers.GRUCell(state_dim, name="transition")
        self.prior = ke.ConditionalGaussianPrior(code_dim, name="step_prior")
        self.posterior = ke.GaussianPosterior(
            code_dim,
            kl_regularizer=ke.KLRegularizer(prior=self.prior, balance=0.8),
            seed=7,
            name="step_posterior",
        )

    def build(self, input_shape):
        self.transition.build((None, code_dim))
        self.posterior.build((None, state_dim + input_shape[-1]))

    def call(self, inputs, states, training=None):
        h, z = states
        h = self.transition(z, [h])[0]
        z = self.posterior(
            keras.ops.concatenate([h, inputs], axis=-1), prior_inputs=h, training=training
        )
        return keras.ops.concatenate([h, z], axis=-1), [h, z]


cell = StateSpaceCell()
emission_hidden = keras.layers.Dense(32, activation="tanh", name="emission_hidden")
emission_mean = keras.layers.Dense(1, name="emission_mean")


def emission(hz):
    return emission_mean(emission_hidden(hz))


observed = keras.Input((steps, 1), name="sequence")
states = keras.layers.RNN(cell, return_sequences=True, unroll=True)(observed)
ssm = ke.ELBOModel(observed, emission(states), name="state_space_vae")
ssm.compile(optimizer=keras.optimizers.Adam(3e-3), loss=ke.GaussianNLL(scale=0.1))
sequence_history = ssm.fit(waves, waves, epochs=2 if FAST else 40, batch_size=64, verbose=0).history
print({key: round(values[-1], 2) for key, values in sequence_history.items()})


# %%
def predict_from_prior(observed, num_draws, seed):
    """Filter the first `prefix` steps with the posterior's means, then draw
    `num_draws` continuations from the prior: `(n, num_draws, steps - prefix)`."""
    n = len(observed)
    h, z = keras.ops.zeros((n, state_dim)), keras.ops.zeros((n, code_dim))
    for t in range(prefix):
        h = cell.transition(z, [h])[0]
        z = cell.posterior.distribution(keras.ops.concatenate([h, observed[:, t]], axis=-1)).mean()
    h, z = keras.ops.repeat(h, num_draws, axis=0), keras.ops.repeat(z, num_draws, axis=0)
    generator = keras.random.SeedGenerator(seed)
    means = []
    for _ in range(prefix, steps):
        h = cell.transition(z, [h])[0]
        z = cell.prior.distribution(h).sample(seed=generator)
        means.append(emission(keras.ops.concatenate([h, z], axis=-1)))
    predicted = keras.ops.convert_to_numpy(keras.ops.stack(means, axis=1))
    return predicted.reshape(n, num_draws, steps - prefix)


predicted = predict_from_prior(keras.ops.convert_to_tensor(test_waves), 20, seed=8)
rmse = np.sqrt(np.mean((predicted.mean(axis=1) - test_clean[:, prefix:]) ** 2))
print(f"RMSE of the mean prediction to the clean waves: {rmse:.3f} (amplitudes 0.5 to 1.5)")

fig, axes = plt.subplots(2, 4, figsize=(12, 4.5), sharex=True, sharey=True)
for i, ax in enumerate(axes.flat):
    ax.plot(test_clean[i], color="black", lw=1, label="clean")
    ax.plot(test_waves[i, :, 0], ".", color="gray", label="observed")
    ax.plot(range(prefix, steps), predicted[i].T, color="C0", alpha=0.15)
    ax.axvline(prefix - 0.5, color="C3", lw=0.8)
axes[0, 0].legend(fontsize=7)
plt.suptitle("after the red line: 20 continuations drawn from the learned prior")
plt.tight_layout()
plt.show()
