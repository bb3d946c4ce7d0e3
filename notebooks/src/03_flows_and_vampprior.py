# %% [markdown]
# # Richer posteriors and priors: IAF and the VampPrior
#
# A diagonal Gaussian q(z|x) and a standard normal p(z) are the VAE's two
# simplest choices, and both cost likelihood. This notebook swaps in each
# richer alternative the library has, keeping everything else fixed:
#
# - `FlowPosterior`: the Gaussian's sample pushed through inverse autoregressive
#   flow steps (Kingma et al., 2016), so q(z|x) can be skewed and curved;
# - `VampPrior`: p(z) is the mixture of the model's own posteriors at learned
#   pseudo-inputs (Tomczak & Welling, 2018).
#
# Neither has a closed-form KL; `KLRegularizer(mode="auto")` estimates it by
# Monte Carlo. We compare test ELBOs and importance-weighted log-likelihoods.

# %%
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
FAST = os.environ.get("KERAS_ELBO_FAST") == "1"  # the test suite's short run

import keras
import matplotlib.pyplot as plt
import numpy as np

import keras_elbo as ke
from keras_elbo.datasets import load_digits

x_train, x_test = load_digits()
epochs = 2 if FAST else 150
latent_dim = 2  # small enough to draw q(z|x)


def build(kind, seed=0):
    keras.utils.set_random_seed(seed)
    encoder = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(128, activation="relu")], name="encoder"
    )
    prior = None
    if kind == "vamp":
        prior = ke.VampPrior(encoder, 30, (64,), activation="hard_sigmoid", seed=seed)
    regularizer = ke.KLRegularizer(prior=prior, seed=seed)
    if kind == "iaf":
        posterior = ke.FlowPosterior(
            latent_dim, num_flows=4, context=True, kl_regularizer=regularizer, name="posterior"
        )
    else:
        posterior = ke.GaussianPosterior(latent_dim, kl_regularizer=regularizer, name="posterior")
    x = keras.Input((64,))
    h = keras.layers.Dense(128, activation="relu")(posterior(encoder(x)))
    model = keras.Model(x, keras.layers.Dense(64)(h), name=kind)
    model.compile(keras.optimizers.Adam(2e-3), ke.BernoulliNLL(from_logits=True))
    return model


# %% [markdown]
# ## Train the three models
#
# Same data, architecture, optimiser, epochs and seed; only the posterior or
# the prior differs. `auto` picks the estimator: the closed form for the
# baseline, `mc` for the flow (no closed-form entropy), `mc_entropy` for the
# VampPrior.

# %%
models, histories = {}, {}
for kind in ("gaussian", "iaf", "vamp"):
    models[kind] = build(kind)
    histories[kind] = (
        models[kind]
        .fit(
            x_train,
            x_train,
            validation_data=(x_test, x_test),
            epochs=epochs,
            batch_size=64,
            verbose=0,
        )
        .history
    )
    print(f"{kind:9s} final test loss {histories[kind]['val_loss'][-1]:.2f}")

# %%
rows = []
for kind, model in models.items():
    elbo = ke.evaluate_elbo(model, x_test, num_samples=10, seed=0, verbose=0)
    log_px = ke.importance_weighted_log_likelihood(
        model, x_test, num_samples=20 if FAST else 500, seed=0, verbose=0
    )
    rows.append((kind, elbo["elbo"].mean(), elbo["kl"].mean(), log_px.mean()))
    print(
        f"{kind:9s} test ELBO {rows[-1][1]:7.2f}  KL {rows[-1][2]:5.2f}  "
        f"log p(x) {rows[-1][3]:7.2f} nats"
    )

fig, ax = plt.subplots(figsize=(6, 3.5))
positions = np.arange(len(rows))
ax.bar(positions - 0.2, [-r[1] for r in rows], width=0.4, label="-ELBO")
ax.bar(positions + 0.2, [-r[3] for r in rows], width=0.4, label="-log p(x), importance-weighted")
ax.set_xticks(positions, [r[0] for r in rows])
ax.set_ylim(min(-r[3] for r in rows) - 2, max(-r[1] for r in rows) + 1)
ax.set(ylabel="nats per test image (lower is better)")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# The gap between a model's two bars is the slack of its ELBO: how far q(z|x)
# is from the true posterior. In the run stored here the VampPrior gains about
# 0.4 nats of log-likelihood over N(0, I), by fitting p(z) to the codes. The
# flow gains about 0.1 nats on this small problem: with a 2-D code the Gaussian's
# slack is already only about 0.5 nats, little for a more flexible q to close.
# On binarized MNIST (32-D codes, 5 epochs, `python -m keras_elbo.demo
# --posterior iaf`) the same IAF posterior raised the test ELBO by 1.3 nats
# over the diagonal Gaussian.
#
# ## What the flow does to q(z|x)
#
# The density of q(z|x) for one test image, on a grid of z. The flow's
# `log_prob` at arbitrary points inverts it (two passes here, one per latent
# dimension); in training the library never needs that, since the log-density
# of q's own samples is known from the sampling path.

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 4))
for ax, kind in zip(axes, ("gaussian", "iaf"), strict=True):
    model = models[kind]
    posterior = model.get_layer("posterior")
    features = keras.ops.convert_to_numpy(model.get_layer("encoder")(x_test[:1]))
    # A grid around this posterior's own samples.
    samples = keras.ops.convert_to_numpy(posterior.distribution(features).sample(2000, seed=1))[
        :, 0
    ]
    center, span = samples.mean(axis=0), 4 * samples.std(axis=0).max()
    g0, g1 = (np.linspace(c - span, c + span, 80, dtype="float32") for c in center)
    zz = np.stack(np.meshgrid(g0, g1), axis=-1).reshape(-1, 2)
    q = posterior.distribution(np.repeat(features, len(zz), axis=0))
    density = np.exp(keras.ops.convert_to_numpy(q.log_prob(zz))).reshape(80, 80)
    ax.contourf(g0, g1, density, levels=20, cmap="viridis")
    ax.set(title=f"q(z|x) of one test image: {kind}", xlabel="z[0]", ylabel="z[1]")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Samples from each prior
#
# The VampPrior's samples come from its mixture of posteriors at the learned
# pseudo-inputs; the other two models sample N(0, I).

# %%
fig, axes = plt.subplots(3, 12, figsize=(12, 3.3))
for row, (kind, model) in enumerate(models.items()):
    posterior = model.get_layer("posterior")
    prior = posterior.kl_regularizer.prior_distribution(
        posterior.distribution(np.zeros((1, 128), "float32")), posterior
    )
    z = prior.sample(12, seed=1 + row)
    decoder_input = keras.Input((latent_dim,))
    h = model.layers[-2](decoder_input)
    decoder = keras.Model(decoder_input, model.layers[-1](h))
    images = keras.ops.convert_to_numpy(keras.ops.sigmoid(decoder(z)))
    for col, image in enumerate(images):
        axes[row, col].imshow(image.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
        axes[row, col].axis("off")
    axes[row, 0].set_title(kind, fontsize=9, loc="left")
plt.tight_layout()
plt.show()
