"""Tests of keras_elbo.discrete: categorical and Bernoulli posteriors with
straight-through and Gumbel-softmax gradients, and their priors, on every
backend.

References are NumPy float64: the softmax (sigmoid) Jacobian-vector product
for the straight-through gradient, `sum(q * (log q - log p))` for the KL the
layers add, and the relaxation's own gradient (the same noise, drawn from
the same integer seed) for the hard Gumbel-softmax.
"""

import keras
import numpy as np
import pytest
from keras import ops
from scipy import special

import keras_elbo as ke
from keras_elbo import discrete
from tests import _helpers as h

V, K = 4, 3  # variables, classes
FEATURES = 5
RNG = np.random.default_rng(0)
LOGITS = (2.0 * RNG.normal(size=(2, V, K))).astype("float32")
WEIGHTS = RNG.normal(size=(2, V, K)).astype("float32")  # a linear loss of the sample
INPUTS = RNG.normal(size=(6, FEATURES)).astype("float32")


def one_hot_with_gradient(estimator, temperature=None, hard=False):
    return lambda logits: discrete._OneHotCategoricalWithGradient(
        logits, estimator, temperature, hard
    )


def projected_logits(layer, x):
    """The posterior's logits from its projection's weights, in NumPy."""
    kernel, bias = (np.float64(w) for w in layer.projection.get_weights())
    return x.astype(np.float64) @ kernel + bias


def numpy_kl(q_logits, p_logits):
    log_q = special.log_softmax(q_logits, axis=-1)
    log_p = special.log_softmax(p_logits, axis=-1)
    return np.sum(np.exp(log_q) * (log_q - log_p), axis=-1)


class TestCategoricalEstimators:
    def test_straight_through_is_a_one_hot_sample_with_the_softmax_gradient(self):
        q = one_hot_with_gradient("straight_through")(LOGITS)
        sample = h.numpy(q.sample(seed=3))
        # One-hot up to the round-off of `one_hot + p - p`.
        np.testing.assert_allclose(sample, np.round(sample), atol=1e-6)
        np.testing.assert_allclose(sample.sum(-1), 1.0, atol=1e-6)
        (grad,) = h.gradients(
            lambda logits: ops.multiply(
                WEIGHTS, one_hot_with_gradient("straight_through")(logits).sample(seed=3)
            ),
            LOGITS,
        )
        # d sum(w * p) / d logits = J_softmax^T w = p * (w - sum(p * w)).
        p = special.softmax(np.float64(LOGITS), axis=-1)
        expected = p * (WEIGHTS - np.sum(p * WEIGHTS, axis=-1, keepdims=True))
        np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)

    def test_soft_gumbel_softmax_is_a_point_of_the_simplex(self):
        q = one_hot_with_gradient("gumbel_softmax", temperature=0.5)(LOGITS)
        sample = h.numpy(q.sample(7, seed=1))
        assert sample.shape == (7, 2, V, K)
        assert np.all(sample > 0) and np.any(np.abs(sample - np.round(sample)) > 1e-3)
        np.testing.assert_allclose(sample.sum(-1), 1.0, atol=1e-5)

    def test_hard_gumbel_softmax_is_its_argmax_with_the_relaxation_gradient(self):
        soft = one_hot_with_gradient("gumbel_softmax", temperature=0.5)
        hard = one_hot_with_gradient("gumbel_softmax", temperature=0.5, hard=True)
        y = h.numpy(soft(LOGITS).sample(seed=4))
        z = h.numpy(hard(LOGITS).sample(seed=4))  # the same noise: an integer seed
        np.testing.assert_allclose(z, np.eye(K)[y.argmax(-1)], atol=1e-6)
        (soft_grad,) = h.gradients(lambda x: ops.multiply(WEIGHTS, soft(x).sample(seed=4)), LOGITS)
        (hard_grad,) = h.gradients(lambda x: ops.multiply(WEIGHTS, hard(x).sample(seed=4)), LOGITS)
        np.testing.assert_allclose(hard_grad, soft_grad, rtol=1e-5, atol=1e-6)
        assert np.any(np.abs(soft_grad) > 1e-3)

    def test_bernoulli_straight_through_has_the_sigmoid_gradient(self):
        logits, weights = LOGITS[..., 0], WEIGHTS[..., 0]

        def sample(x):
            return discrete._BernoulliWithGradient(x, "straight_through", None, False).sample(
                seed=2
            )

        bits = h.numpy(sample(logits))
        np.testing.assert_allclose(bits, np.round(bits), atol=1e-6)
        (grad,) = h.gradients(lambda x: ops.multiply(weights, sample(x)), logits)
        p = special.expit(np.float64(logits))
        np.testing.assert_allclose(grad, weights * p * (1 - p), rtol=1e-5, atol=1e-6)

    def test_hard_relaxed_bernoulli_rounds_the_relaxation(self):
        def sample(x, hard):
            d = discrete._BernoulliWithGradient(x, "gumbel_softmax", 0.7, hard)
            return d.sample(seed=5)

        y, z = h.numpy(sample(LOGITS, False)), h.numpy(sample(LOGITS, True))
        np.testing.assert_allclose(z, (y > 0.5).astype(float), atol=1e-6)
        (soft_grad,) = h.gradients(lambda x: ops.multiply(WEIGHTS, sample(x, False)), LOGITS)
        (hard_grad,) = h.gradients(lambda x: ops.multiply(WEIGHTS, sample(x, True)), LOGITS)
        np.testing.assert_allclose(hard_grad, soft_grad, rtol=1e-5, atol=1e-6)


def categorical_posterior(**kwargs):
    kwargs.setdefault("kl_regularizer", ke.KLRegularizer(seed=1))
    return ke.CategoricalPosterior(V, K, seed=0, **kwargs)


class TestCategoricalPosterior:
    def test_kl_against_the_default_uniform_prior_is_numpy_closed_form(self):
        layer = categorical_posterior()
        z = h.numpy(layer(INPUTS, training=True))
        assert z.shape == (6, V, K)
        np.testing.assert_allclose(z.sum(-1), 1.0, atol=1e-6)
        (kl,) = layer.losses
        logits = projected_logits(layer, INPUTS).reshape(6, V, K)
        # Nats per example: summed over the variables, averaged over the batch.
        expected = numpy_kl(logits, np.zeros(K)).sum(-1).mean()
        np.testing.assert_allclose(h.numpy(kl), expected, rtol=1e-5)

    def test_kl_against_a_learned_prior(self):
        prior = ke.CategoricalPrior(V, K, learned=True)
        p_logits = RNG.normal(size=(V, K)).astype("float32")
        prior.logits.assign(p_logits)
        layer = categorical_posterior(kl_regularizer=ke.KLRegularizer(prior=prior))
        layer(INPUTS, training=True)
        logits = projected_logits(layer, INPUTS).reshape(6, V, K)
        expected = numpy_kl(logits, np.float64(p_logits)).sum(-1).mean()
        np.testing.assert_allclose(h.numpy(layer.losses[0]), expected, rtol=1e-5)
        assert [w.name for w in prior.trainable_weights] == ["logits"]

    def test_free_nats_and_balance_apply_as_to_any_posterior(self):
        # DreamerV3's settings: KL balancing 0.8 and a floor of free nats per
        # example, here the median of the examples' KLs (fixed projection
        # weights, so the same numbers on every backend). Balancing changes
        # the gradients only; the floor, each example's KL.
        kernel = np.random.default_rng(1).normal(size=(FEATURES, V * K)).astype("float32")
        bias = np.zeros(V * K, "float32")
        softmax = special.softmax((INPUTS @ kernel).reshape(6, V, K), axis=-1)
        kl = numpy_kl(np.log(0.99 * softmax + 0.01 / K), np.zeros(K)).sum(-1)
        floor = float(np.median(kl))
        assert kl.min() < floor < kl.max(), kl
        regularizer = ke.KLRegularizer(balance=0.8, free_nats=floor)
        layer = categorical_posterior(kl_regularizer=regularizer, unimix=0.01)
        layer.build(INPUTS.shape)
        layer.projection.set_weights([kernel, bias])
        layer(INPUTS, training=True)
        expected = np.maximum(kl, floor).mean()
        np.testing.assert_allclose(h.numpy(layer.losses[0]), expected, rtol=1e-5)

    def test_kl_against_a_conditional_prior_computed_from_the_model(self):
        # DreamerV3's prior p(z_t | h_t), here of a tensor c, with unimix.
        prior = ke.ConditionalCategoricalPrior(V, K, unimix=0.01)
        layer = categorical_posterior(kl_regularizer=ke.KLRegularizer(prior=prior))
        c = RNG.normal(size=(6, 7)).astype("float32")
        layer(INPUTS, prior_inputs=c, training=True)
        p_logits = projected_logits(prior, c).reshape(6, V, K)
        p_logits = np.log(0.99 * special.softmax(p_logits, axis=-1) + 0.01 / K)
        logits = projected_logits(layer, INPUTS).reshape(6, V, K)
        expected = numpy_kl(logits, p_logits).sum(-1).mean()
        np.testing.assert_allclose(h.numpy(layer.losses[0]), expected, rtol=1e-5)
        wrong = ke.KLRegularizer(prior=ke.ConditionalCategoricalPrior(K, V))
        with pytest.raises(ValueError, match=r"has event shape \(3, 4\) but the posterior"):
            categorical_posterior(kl_regularizer=wrong).build((None, FEATURES))

    def test_unimix_mixes_the_probabilities_with_the_uniform(self):
        layer = categorical_posterior(unimix=0.1, inference="probs")
        probs = h.numpy(layer(INPUTS))
        softmax = special.softmax(projected_logits(layer, INPUTS).reshape(6, V, K), axis=-1)
        np.testing.assert_allclose(probs, 0.9 * softmax + 0.1 / K, rtol=1e-5)

    def test_inference_outputs(self):
        logits = None
        for inference in ("mode", "probs", "sample"):
            layer = categorical_posterior(inference=inference, flatten=True)
            out = h.numpy(layer(INPUTS))
            assert out.shape == (6, V * K)
            out = out.reshape(6, V, K)
            logits = projected_logits(layer, INPUTS).reshape(6, V, K)
            if inference == "mode":
                np.testing.assert_array_equal(out, np.eye(K)[logits.argmax(-1)])
            elif inference == "probs":
                np.testing.assert_allclose(out, special.softmax(logits, -1), rtol=1e-5)
            else:
                np.testing.assert_allclose(out, np.round(out), atol=1e-6)

    def test_gumbel_softmax_temperature_is_a_non_trainable_variable(self):
        layer = categorical_posterior(estimator="gumbel_softmax", temperature=2.0)
        layer.build((None, FEATURES))
        assert float(h.numpy(layer.temperature_variable)) == 2.0
        assert layer.temperature_variable in layer.non_trainable_weights
        assert not hasattr(categorical_posterior(), "temperature_variable")

    # Each compiled mode with the default estimator; the other in one mode
    # (a whole fit is the costliest test here).
    @pytest.mark.parametrize(
        "estimator, jit_compile",
        [("straight_through", mode) for mode in h.JIT_MODES] + [("gumbel_softmax", h.JIT_MODES[0])],
    )
    def test_vae_trains_and_logs_kl_once(self, estimator, jit_compile):
        keras.utils.set_random_seed(0)
        x = keras.Input((h.TOY_PIXELS,))
        z = ke.CategoricalPosterior(
            4, 4, estimator=estimator, flatten=True, kl_regularizer=ke.KLRegularizer(), seed=0
        )(keras.layers.Dense(16, activation="tanh")(x))
        model = ke.ELBOModel(x, keras.layers.Dense(h.TOY_PIXELS)(z))
        model.compile(
            keras.optimizers.Adam(0.02),
            ke.BernoulliNLL(from_logits=True),
            jit_compile=jit_compile,
        )
        h.assert_vae_trains_and_logs_kl_once(model)

    def test_prior_of_another_shape_fails_at_construction(self):
        layer = categorical_posterior(
            kl_regularizer=ke.KLRegularizer(prior=ke.CategoricalPrior(K, V))
        )
        with pytest.raises(ValueError, match="event shape"):
            layer.build((None, FEATURES))

    @pytest.mark.parametrize(
        "kwargs, argument",
        [
            ({"num_classes": 1}, "num_classes"),
            ({"num_variables": 0}, "num_variables"),
            ({"estimator": "reinforce"}, "estimator"),
            ({"temperature": 0.0}, "temperature"),
            ({"unimix": 1.0}, "unimix"),
            ({"inference": "mean"}, "inference"),
            ({"flatten": "yes"}, "flatten"),
        ],
        ids=lambda v: v if isinstance(v, str) else None,
    )
    def test_constructor_errors_name_the_argument(self, kwargs, argument):
        arguments = {"num_variables": V, "num_classes": K, **kwargs}
        with pytest.raises(ValueError, match=f"argument `{argument}`"):
            ke.CategoricalPosterior(**arguments)

    def test_inputs_of_rank_three_are_refused(self):
        with pytest.raises(ValueError, match=r"inputs of shape \(batch, features\)"):
            categorical_posterior()(np.zeros((2, 3, FEATURES), "float32"))

    def test_config_round_trip(self):
        layer = categorical_posterior(
            estimator="gumbel_softmax", temperature=0.5, hard=True, unimix=0.01, flatten=True
        )
        clone = h.config_round_trip(layer)
        assert (clone.num_variables, clone.num_classes, clone.hard) == (V, K, True)


class TestBernoulliPosterior:
    def test_kl_against_the_default_prior_is_numpy_closed_form(self):
        layer = ke.BernoulliPosterior(6, kl_regularizer=ke.KLRegularizer(), seed=0)
        bits = h.numpy(layer(INPUTS, training=True))
        assert bits.shape == (6, 6)
        np.testing.assert_allclose(bits, np.round(bits), atol=1e-6)
        q = special.expit(projected_logits(layer, INPUTS))
        expected = np.sum(q * np.log(2 * q) + (1 - q) * np.log(2 * (1 - q)), -1).mean()
        np.testing.assert_allclose(h.numpy(layer.losses[0]), expected, rtol=1e-5)

    def test_learned_prior_and_outputs(self):
        prior = ke.BernoulliPrior(6, learned=True)
        prior.logits.assign(np.linspace(-1, 1, 6).astype("float32"))
        for inference in ("mode", "probs"):
            layer = ke.BernoulliPosterior(
                6, kl_regularizer=ke.KLRegularizer(prior=prior), inference=inference, seed=0
            )
            out = h.numpy(layer(INPUTS))
            q = special.expit(projected_logits(layer, INPUTS))
            expected = (q > 0.5).astype(float) if inference == "mode" else q
            np.testing.assert_allclose(out, expected, rtol=1e-5)
        p = special.expit(np.linspace(-1, 1, 6))
        kl = np.sum(q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p)), -1).mean()
        np.testing.assert_allclose(h.numpy(layer.losses[0]), kl, rtol=1e-5)

    def test_vae_trains(self):
        keras.utils.set_random_seed(0)
        x = keras.Input((h.TOY_PIXELS,))
        z = ke.BernoulliPosterior(8, kl_regularizer=ke.KLRegularizer(), seed=0)(
            keras.layers.Dense(16, activation="tanh")(x)
        )
        model = ke.ELBOModel(x, keras.layers.Dense(h.TOY_PIXELS)(z))
        model.compile(
            keras.optimizers.Adam(0.02),
            ke.BernoulliNLL(from_logits=True),
            jit_compile=h.JIT_MODES[0],
        )
        h.assert_vae_trains_and_logs_kl_once(model)


def test_priors_validate_their_arguments():
    with pytest.raises(ValueError, match="argument `num_classes`"):
        ke.CategoricalPrior(3, 1)
    with pytest.raises(ValueError, match="argument `learned`"):
        ke.BernoulliPrior(3, learned="no")
    assert ops.all(ke.CategoricalPrior(2, 3).distribution().distribution.logits == 0.0)


PIXELS = 6
X = (np.random.default_rng(3).random((5, PIXELS)) < 0.4).astype("float32")


def enumerable_vae(estimator="straight_through", hard=False, **model_kwargs):
    """Two variables of three classes: 9 codes, so log p(x) and the ELBO are
    sums over them."""
    keras.utils.set_random_seed(1)
    x = keras.Input((PIXELS,))
    h_ = keras.layers.Dense(8, activation="tanh", name="body")(x)
    codes = ke.CategoricalPosterior(
        2,
        3,
        estimator=estimator,
        hard=hard,
        flatten=True,
        kl_regularizer=ke.KLRegularizer(),
        seed=0,
        name="posterior",
    )(h_)
    model = ke.ELBOModel(x, keras.layers.Dense(PIXELS, name="decoder")(codes), **model_kwargs)
    model.compile(keras.optimizers.SGD(0.1), ke.BernoulliNLL(from_logits=True))
    return model


def enumerated(model, x):
    """NumPy float64: q of each code `(n, 9)`, log p(x | code) `(n, 9)`."""
    w1, b1 = (np.float64(w) for w in model.get_layer("body").get_weights())
    layer = model.get_layer("posterior")
    x = np.float64(x)
    hidden = np.tanh(x @ w1 + b1)
    q = special.softmax(projected_logits(layer, hidden).reshape(-1, 2, 3), axis=-1)
    q_codes = (q[:, 0, :, None] * q[:, 1, None, :]).reshape(-1, 9)
    codes = np.array(
        [np.concatenate([np.eye(3)[i], np.eye(3)[j]]) for i in range(3) for j in range(3)]
    )
    w2, b2 = (np.float64(w) for w in model.get_layer("decoder").get_weights())
    logits = codes @ w2 + b2  # (9, pixels)
    log_lik = x @ logits.T - np.sum(np.logaddexp(0.0, logits), axis=-1)  # (n, 9)
    return q_codes, log_lik


class TestEvaluation:
    def test_elbo_and_kl_against_enumeration(self):
        model = enumerable_vae()
        q, log_lik = enumerated(model, X)
        kl = np.sum(q * np.log(9 * q), axis=-1)  # against the uniform prior over 9 codes
        expected = np.sum(q * log_lik, axis=-1) - kl
        num_samples = 400
        result = ke.evaluate_elbo(model, X, num_samples=num_samples, seed=0, verbose=0)
        np.testing.assert_allclose(result["kl"], kl, rtol=1e-5)
        variance = np.sum(q * log_lik**2, axis=-1) - np.sum(q * log_lik, axis=-1) ** 2
        error = np.abs(result["elbo"] - expected)
        np.testing.assert_array_less(error, 4 * np.sqrt(variance / num_samples) + 1e-5)

    def test_importance_weighted_log_likelihood_against_enumeration(self):
        model = enumerable_vae(estimator="gumbel_softmax", hard=True)
        q, log_lik = enumerated(model, X)
        log_px = special.logsumexp(log_lik, axis=-1) - np.log(9.0)
        num_samples = 2000
        estimate = ke.importance_weighted_log_likelihood(
            model, X, num_samples=num_samples, seed=0, verbose=0
        )
        # The estimate is log(mean(w)), w = p(x, z) / q(z): its standard
        # error is std(w) / (p(x) sqrt(S)), computed exactly over the codes.
        w = np.exp(log_lik - np.log(9.0) - np.log(q) - log_px[:, None])  # w / p(x)
        standard_error = np.sqrt((np.sum(q * w**2, axis=-1) - 1.0) / num_samples)
        np.testing.assert_array_less(np.abs(estimate - log_px), 4 * standard_error + 1e-5)

    def test_relaxed_samples_are_not_importance_weighted(self):
        model = enumerable_vae(estimator="gumbel_softmax")
        with pytest.raises(ValueError, match="soft Gumbel-softmax samples"):
            ke.importance_weighted_log_likelihood(model, X, num_samples=4, verbose=0)
        with pytest.raises(ValueError, match="soft Gumbel-softmax samples"):
            enumerable_vae(estimator="gumbel_softmax", objective="iwae", num_samples=3)

    def test_iwae_objective_trains_and_dreg_is_refused(self):
        model = enumerable_vae(objective="iwae", num_samples=3)
        history = model.fit(X, X, epochs=2, batch_size=5, verbose=0).history
        assert np.all(np.isfinite(history["neg_iwae"])), history
        with pytest.raises(ValueError, match="needs reparameterised samples"):
            enumerable_vae(objective="iwae", num_samples=3, dreg=True)
