"""VampPrior's `activation`: applied to the pseudo-inputs before the encoder.

The reference is NumPy float64: the pseudo-inputs through the activation, the
encoder body's Dense layer and the posterior's projection, read from their
weights.
"""

import keras
import numpy as np
import pytest
from scipy.special import expit

import keras_elbo as ke
from tests import _helpers as h

INPUTS, FEATURES, LATENT, COMPONENTS = 6, 5, 2, 4


@pytest.mark.parametrize("activation", [None, "sigmoid"], ids=["none", "sigmoid"])
def test_components_are_the_posterior_at_the_activated_pseudo_inputs(activation):
    keras.utils.set_random_seed(0)
    body = keras.Sequential(
        [keras.Input((INPUTS,)), keras.layers.Dense(FEATURES, activation="tanh")]
    )
    prior = ke.VampPrior(
        body,
        COMPONENTS,
        (INPUTS,),
        activation=activation,
        # Spread out, so that the sigmoid changes every pseudo-input a lot.
        pseudo_inputs_initializer=keras.initializers.RandomNormal(0.0, 2.0, seed=1),
    )
    posterior = ke.GaussianPosterior(LATENT, kl_regularizer=ke.KLRegularizer(prior=prior))
    posterior(body(keras.Input((INPUTS,))))
    p = prior.distribution(posterior)

    u = prior.pseudo_inputs.numpy().astype(np.float64)
    if activation == "sigmoid":
        u = expit(u)
    kernel, bias = (w.astype(np.float64) for w in body.layers[0].get_weights())
    features = np.tanh(u @ kernel + bias)
    kernel, bias = (w.astype(np.float64) for w in posterior.projection.get_weights())
    params = features @ kernel + bias
    loc = params[:, :LATENT]
    scale = h.softplus(params[:, LATENT:]) + posterior.min_scale

    np.testing.assert_allclose(h.numpy(p.components.mean()), loc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h.numpy(p.components.stddev()), scale, rtol=1e-5, atol=1e-6)
    # p(z) = mean_k N(z; loc_k, scale_k**2): equal weights, by logsumexp.
    z = np.random.default_rng(2).normal(size=(5, LATENT))
    expected = h.mixture_logpdf(z, np.zeros(COMPONENTS), loc, scale)
    np.testing.assert_allclose(
        h.numpy(p.log_prob(z.astype("float32"))), expected, rtol=1e-5, atol=1e-5
    )
