"""`sample_weight` in `ELBOModel`: the weighted ELBO, `sum_i w_i (rec_i + KL_i) / N`.

Keras weighs a compiled loss by the weights and leaves a loss added by a layer
(the KL, through `add_loss`) alone: the logged "negative ELBO" of a batch with
half its weights 0 used to be half its reconstruction plus all of its KL.
`ELBOModel` weighs each example's KL as Keras weighs its reconstruction.
References: the closed-form KL of the posterior's parameters, in NumPy.
"""

import keras
import numpy as np
import pytest

import keras_elbo as ke
from keras_elbo.divergence import _batch_mean
from tests import _helpers as h
from tests.test_model import DATA, compile_vae, make_vae

WEIGHTS = np.random.default_rng(1).choice([0.0, 0.5, 1.0, 3.0], size=len(DATA)).astype("float32")


def _per_example_kl(model, x):
    """Each example's closed-form KL under the model's posterior, (batch,)."""
    posterior = next(layer for layer in model.layers if isinstance(layer, ke.GaussianPosterior))
    features = keras.Model(model.input, posterior.input)(x)
    q = posterior.distribution(features)
    return h.kl_diag_normal(q.mean(), q.stddev())


@pytest.mark.parametrize("shape", [(-1,), (-1, 1)], ids=["(batch,)", "(batch, 1)"])
def test_logged_kl_is_the_weighted_mean_of_each_examples_kl(shape):
    model = compile_vae(make_vae(mode="analytic"))
    weights = WEIGHTS.reshape(shape)
    logs = model.evaluate(
        DATA, DATA, sample_weight=weights, batch_size=len(DATA), verbose=0, return_dict=True
    )
    expected = np.sum(WEIGHTS * _per_example_kl(model, DATA)) / len(DATA)
    np.testing.assert_allclose(logs["kl"], expected, rtol=1e-5)
    np.testing.assert_allclose(logs["neg_elbo"], logs["reconstruction"] + logs["kl"], rtol=1e-5)
    np.testing.assert_allclose(logs["loss"], logs["neg_elbo"], rtol=1e-5)


def test_weight_zero_removes_an_example_from_the_elbo():
    """Half the batch at weight 0: its KL is half that of the other half alone
    (Keras divides a weighted loss by the batch size, not by the weights' sum)."""
    model = compile_vae(make_vae(mode="analytic"))
    half = len(DATA) // 2
    weights = np.r_[np.ones(half), np.zeros(half)].astype("float32")
    logs = model.evaluate(
        DATA, DATA, sample_weight=weights, batch_size=len(DATA), verbose=0, return_dict=True
    )
    alone = model.evaluate(DATA[:half], DATA[:half], batch_size=half, verbose=0, return_dict=True)
    np.testing.assert_allclose(logs["kl"], alone["kl"] / 2, rtol=1e-5)


def test_the_training_loss_holds_the_weighted_kl():
    """`fit`'s step: the loss it differentiates is the weighted
    reconstruction plus the weighted KL (both logged from the same forward
    pass, before the update)."""
    model = compile_vae(make_vae(mode="analytic"))
    expected = np.sum(WEIGHTS * _per_example_kl(model, DATA)) / len(DATA)
    logs = model.train_on_batch(DATA, DATA, sample_weight=WEIGHTS, return_dict=True)
    np.testing.assert_allclose(logs["kl"], expected, rtol=1e-5)
    np.testing.assert_allclose(logs["loss"], logs["reconstruction"] + expected, rtol=1e-5)


def test_a_plain_keras_model_is_unchanged():
    """Only `ELBOModel` weighs the KL: a plain `keras.Model` adds it as Keras
    adds any layer's loss, unweighted (as the README says)."""
    vae = make_vae(mode="analytic")
    model = compile_vae(keras.Model(vae.inputs, vae.outputs))
    posterior = next(layer for layer in vae.layers if isinstance(layer, ke.GaussianPosterior))
    model.evaluate(DATA, DATA, sample_weight=WEIGHTS, batch_size=len(DATA), verbose=0)
    expected = np.mean(_per_example_kl(vae, DATA))
    np.testing.assert_allclose(h.numpy(posterior.kl_regularizer.last_kl), expected, rtol=1e-5)


def _hierarchy(num_samples, objective="elbo"):
    x = keras.Input((h.TOY_PIXELS,))
    hidden = keras.layers.Dense(16, activation="tanh")(x)
    top = ke.KLRegularizer(metric_name="kl_2", seed=5)
    z2 = ke.GaussianPosterior(2, kl_regularizer=top, seed=6)(hidden)
    h2 = keras.layers.Dense(8, activation="tanh")(z2)
    lower = ke.KLRegularizer(prior=ke.ConditionalGaussianPrior(3), metric_name="kl_1", seed=7)
    z1 = ke.GaussianPosterior(3, kl_regularizer=lower, seed=8)(
        keras.layers.Concatenate()([hidden, h2]), prior_inputs=h2
    )
    outputs = keras.layers.Dense(h.TOY_PIXELS)(z1)
    return compile_vae(ke.ELBOModel(x, outputs, num_samples=num_samples, objective=objective))


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_every_layer_of_a_multi_sample_hierarchy_is_weighted(objective):
    """Same weights and draws (copies of one model, same seeds): weights of 2
    double each layer's KL, the lower one's over K samples per example too,
    and every other log (the importance-weighted bound's too); weights of 0
    leave nothing."""
    keras.utils.set_random_seed(0)
    models = [_hierarchy(3, objective) for _ in range(3)]
    for model in models[1:]:
        model.set_weights(models[0].get_weights())
    ones = np.ones(len(DATA), "float32")
    logs = [
        model.evaluate(
            DATA, DATA, sample_weight=w, batch_size=len(DATA), verbose=0, return_dict=True
        )
        for model, w in zip(models, [None, 2 * ones, 0 * ones], strict=True)
    ]
    assert sorted(logs[0]) == sorted(logs[1]) == sorted(logs[2])
    assert ("neg_iwae" in logs[0]) == (objective == "iwae")
    for name in logs[0]:
        assert abs(logs[0][name]) > 0.01, name
        np.testing.assert_allclose(logs[1][name], 2 * logs[0][name], rtol=1e-5, err_msg=name)
        assert logs[2][name] == 0.0, name


@pytest.mark.parametrize("positions", [(), (5,)], ids=["per example", "latent map"])
def test_batch_mean_weighs_rows_sample_major(positions):
    """K samples of n examples as K * n rows, row `k * n + i` of example i
    (a lower posterior in a multi-sample step), against NumPy."""
    rng = np.random.default_rng(2)
    k, n, terms = 3, 4, 2
    values = rng.normal(size=(k * n, *positions, terms)).astype("float32")
    weights = rng.random(n).astype("float32")
    per_row = values.sum(axis=tuple(range(1, values.ndim - 1)))  # (k * n, terms)
    expected = (per_row * np.tile(weights, k)[:, None]).sum(axis=0) / (k * n)
    result = _batch_mean(keras.ops.convert_to_tensor(values), keras.ops.convert_to_tensor(weights))
    np.testing.assert_allclose(h.numpy(result), expected, rtol=1e-5)


def test_per_element_weights_are_refused_with_their_shape():
    """A loss of one value per pixel takes a weight per pixel in Keras; which
    of them would weigh an example's KL is not defined: refused."""

    def per_pixel(y, logits):
        return keras.ops.binary_crossentropy(y, logits, from_logits=True)

    model = compile_vae(make_vae(mode="analytic"), loss=per_pixel)
    weights = np.ones(DATA.shape, "float32")
    with pytest.raises(ValueError, match=r"one weight per example.*\(128, 16\)"):
        model.fit(DATA, DATA, sample_weight=weights, batch_size=len(DATA), verbose=0)
