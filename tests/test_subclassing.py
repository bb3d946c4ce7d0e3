"""A user's own `Posterior` and `Prior` subclasses, as the README invites:
trained in a VAE, one added loss, the KL against NumPy, saved and loaded.

The two classes below are written as a user would write them, from the
base classes' docstrings alone, and registered under the package `"tests"`.
"""

import keras
import numpy as np
import pytest

import keras_elbo as ke
from keras_elbo import distributions as kd
from tests import _helpers as h

LATENT = 2
X = np.random.default_rng(0).normal(size=(6, 5)).astype("float32")


@keras.saving.register_keras_serializable(package="tests")
class FixedScalePosterior(ke.Posterior):
    """A diagonal Gaussian q(z|x): the location a dense projection of x, the
    scale one fixed number for every dimension and example."""

    def __init__(self, latent_dim, scale=0.8, **kwargs):
        super().__init__(latent_dim, **kwargs)
        self.scale = scale
        self.loc_projection = keras.layers.Dense(latent_dim, dtype=self.dtype_policy, name="loc")

    def build_sublayers(self, input_shape):
        self.loc_projection.build(input_shape)

    def distribution(self, inputs):
        loc = keras.ops.cast(self.loc_projection(inputs), "float32")
        return kd.MultivariateNormalDiag(loc, keras.ops.full_like(loc, self.scale))

    def get_config(self):
        config = super().get_config()
        config["scale"] = self.scale
        return config


@keras.saving.register_keras_serializable(package="tests")
class LearnedLocationPrior(ke.Prior):
    """p(z) = N(loc, scale**2 I) with a learned `loc` and a fixed `scale`."""

    def __init__(self, latent_dim, scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.latent_dim = latent_dim
        self.scale = scale
        self.build()  # a prior takes no input: its weights are made now

    def build(self, input_shape=None):
        self.loc = self.add_weight(shape=(self.latent_dim,), initializer="zeros", name="loc")
        self.built = True

    def distribution(self, posterior_layer=None):
        loc = keras.ops.convert_to_tensor(self.loc)
        return kd.MultivariateNormalDiag(loc, keras.ops.full_like(loc, self.scale))

    def get_config(self):
        config = super().get_config()
        config.update({"latent_dim": self.latent_dim, "scale": self.scale})
        return config


USER_OBJECTS = {
    keras.saving.get_registered_name(cls): cls
    for cls in (FixedScalePosterior, LearnedLocationPrior)
}


def subclassed_posterior():
    return FixedScalePosterior(
        LATENT, scale=0.8, kl_regularizer=ke.KLRegularizer(), inference="mean", seed=2
    )


def posterior_with_subclassed_prior():
    prior = LearnedLocationPrior(LATENT, scale=1.5, name="learned_prior")
    return ke.GaussianPosterior(
        LATENT, kl_regularizer=ke.KLRegularizer(prior=prior), inference="mean", seed=2
    )


MAKERS = {"posterior": subclassed_posterior, "prior": posterior_with_subclassed_prior}


def make_vae(posterior):
    keras.utils.set_random_seed(0)
    x = keras.Input((h.TOY_PIXELS,))
    z = posterior(keras.layers.Dense(32, activation="relu")(x))
    logits = keras.layers.Dense(h.TOY_PIXELS)(keras.layers.Dense(32, activation="relu")(z))
    model = keras.Model(x, logits)
    model.compile(keras.optimizers.Adam(1e-2), ke.BernoulliNLL(from_logits=True), jit_compile=False)
    return model


@pytest.fixture(scope="module", params=sorted(MAKERS))
def trained(request):
    """A VAE with one subclass in it, trained for 8 epochs on the toy data:
    `(kind, model, losses per epoch, weights before training)`."""
    model = make_vae(MAKERS[request.param]())
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(h.TOY_DATA, h.TOY_DATA, epochs=8, batch_size=32, verbose=0).history
    return request.param, model, history["loss"], before


def the_posterior(model):
    return next(layer for layer in model.layers if isinstance(layer, ke.Posterior))


def test_vae_trains_with_one_added_loss(trained):
    kind, model, losses, before = trained
    assert losses[0] > losses[-1] and losses[-1] < h.TOY_LEARNED_NATS, losses
    model(h.TOY_DATA[:2])  # JAX records layer losses in eager calls only
    assert len(model.losses) == 1  # one regularizer, one KL
    # Every weight trains, the subclass's own included (the prior's location).
    for b, w in zip(before, model.trainable_weights, strict=True):
        assert not np.allclose(b, w.numpy()), w.path
    posterior = the_posterior(model)
    if kind == "posterior":
        assert posterior.trainable_weights == posterior.loc_projection.trainable_weights
    else:
        assert posterior.kl_regularizer.prior.loc in posterior.trainable_weights


@pytest.mark.parametrize("use_custom_objects", [False, True], ids=["registered", "custom"])
def test_save_and_load(trained, use_custom_objects, tmp_path, monkeypatch):
    kind, model, *_ = trained
    loaded = h.save_and_load(
        model, tmp_path / "vae.keras", use_custom_objects, monkeypatch, USER_OBJECTS
    )
    posterior = the_posterior(loaded)
    if kind == "posterior":
        assert type(posterior) is FixedScalePosterior and posterior.scale == 0.8
    else:
        prior = posterior.kl_regularizer.prior
        assert type(prior) is LearnedLocationPrior and prior.scale == 1.5
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    # inference="mean": the outputs are deterministic.
    x = h.TOY_DATA[:16]
    np.testing.assert_allclose(
        h.numpy(loaded(x, training=False)), h.numpy(model(x, training=False)), rtol=1e-6
    )


class TestPosteriorSubclass:
    def test_base_class_samples_and_returns_the_mean(self):
        n = 20000
        layer = subclassed_posterior()
        z = h.numpy(layer(np.repeat(X[:1], n, axis=0), training=True))
        loc = h.numpy(layer(X[:1], training=False))[0]  # inference="mean"
        kernel, bias = (w.numpy() for w in layer.loc_projection.weights)
        np.testing.assert_allclose(loc, X[0] @ kernel + bias, rtol=1e-5, atol=1e-6)
        # The sample mean has standard error 0.8 / sqrt(n), the sample
        # standard deviation 0.8 / sqrt(2 n).
        assert np.all(np.abs(z.mean(0) - loc) < 4 * 0.8 / np.sqrt(n))
        assert np.all(np.abs(z.std(0) - 0.8) < 4 * 0.8 / np.sqrt(2 * n))

    def test_added_kl_matches_numpy_closed_form(self):
        layer = subclassed_posterior()
        layer(X)
        kernel, bias = (w.numpy().astype(np.float64) for w in layer.loc_projection.weights)
        loc = X.astype(np.float64) @ kernel + bias
        # KL[N(loc, 0.8**2 I) || N(0, I)] per example, averaged over the batch.
        expected = h.kl_diag_normal(loc, np.full_like(loc, 0.8)).mean()
        assert len(layer.losses) == 1
        np.testing.assert_allclose(float(layer.losses[0]), expected, rtol=1e-5)

    def test_config_round_trip(self):
        clone = h.config_round_trip(subclassed_posterior())
        assert clone.scale == 0.8 and isinstance(clone.kl_regularizer, ke.KLRegularizer)


class TestPriorSubclass:
    def test_added_kl_matches_numpy_closed_form(self):
        layer = posterior_with_subclassed_prior()
        layer.build(X.shape)
        prior_loc = np.array([0.3, -0.7])
        layer.kl_regularizer.prior.loc.assign(prior_loc.astype("float32"))
        layer(X)
        kernel, bias = (w.numpy().astype(np.float64) for w in layer.projection.weights)
        params = X.astype(np.float64) @ kernel + bias
        loc, scale = params[:, :LATENT], h.softplus(params[:, LATENT:]) + layer.min_scale
        expected = h.kl_diag_normal(loc, scale, prior_loc=prior_loc, prior_scale=1.5).mean()
        assert len(layer.losses) == 1
        np.testing.assert_allclose(float(layer.losses[0]), expected, rtol=1e-5)

    def test_config_round_trip(self):
        clone = h.config_round_trip(LearnedLocationPrior(3, scale=0.5))
        assert clone.latent_dim == 3 and tuple(clone.loc.shape) == (3,)
