"""MADE, the IAF bijector and FlowPosterior: density, Jacobian, KL, fit, save/load.

Two independent references of the flow: a NumPy float64 forward and inverse
pass written from the MADE weights and masks (`numpy_made`, `numpy_flow`), and
TFP's own autoregressive-flow machinery,
`tfb.Invert(tfb.MaskedAutoregressiveFlow(...))` built on the same MADE
weights, which inverts the flow sequentially in its own loop and sums its own
log-determinants.
"""

from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import keras_elbo as ke
from keras_elbo.flows import LOG_SCALE_BOUND, MADE, FlowPosterior, InverseAutoregressiveFlow
from tests import _helpers as h

tfb, tfd = tfp.bijectors, tfp.distributions

FEATURES, LATENT = 5, 4
X = np.random.default_rng(0).normal(size=(6, FEATURES)).astype("float32")
PIXELS, DATA = h.TOY_PIXELS, h.TOY_DATA


@pytest.fixture(autouse=True)
def fixed_seed():
    """Every test starts from the same Keras initializer seeds."""
    keras.utils.set_random_seed(0)


def randomise_output_layers(layer, seed=1, scale=0.4):
    """Gives the zero-initialised output layers of the flow random weights."""
    rng = np.random.default_rng(seed)
    for made in layer.flows if isinstance(layer, FlowPosterior) else [layer]:
        for weight in (made.kernels[-1], made.biases[-1]):
            weight.assign(rng.normal(scale=scale, size=weight.shape).astype("float32"))


def flow_posterior(latent_dim=LATENT, output_scale=0.4, **kwargs):
    """A built FlowPosterior; `output_scale=0` keeps its steps the identity."""
    kwargs.setdefault("hidden_units", (16,))
    layer = FlowPosterior(latent_dim, **kwargs)
    layer.build(X.shape)
    if output_scale:
        randomise_output_layers(layer, scale=output_scale)
    return layer


def made_step(d=LATENT, reverse=False, context=None):
    """One IAF step with random output weights (not the identity)."""
    made = MADE((16, 16), reverse=reverse)
    made.build((None, d), None if context is None else context.shape)
    randomise_output_layers(made)
    return InverseAutoregressiveFlow(made, context=context)


def reference_posterior(q, layer, context):
    """q rebuilt from TFP's MaskedAutoregressiveFlow on the same MADE weights.

    IAF's forward `y = x * exp(s(x)) + m(x)` is MAF's inverse
    `x = (y - m'(y)) * exp(-s'(y))` with the roles of x and y swapped, for
    `s' = -s` and `m' = -m * exp(-s)`; `tfb.Invert` makes it a forward map.
    """

    def shift_and_log_scale_fn(made):
        def fn(u):
            shift, raw = made(u, context=context)
            log_scale = LOG_SCALE_BOUND * tf.tanh(raw / LOG_SCALE_BOUND)
            return -shift * tf.exp(-log_scale), -log_scale

        return fn

    steps = [
        tfb.Invert(tfb.MaskedAutoregressiveFlow(shift_and_log_scale_fn=shift_and_log_scale_fn(m)))
        for m in layer.flows
    ]
    return tfd.TransformedDistribution(q.distribution, tfb.Chain(steps[::-1]))


def numpy_made(made, z, context=None):
    """MADE's `(shift, raw log-scale)` in NumPy float64 from its weights and masks."""
    hidden = np.asarray(z, np.float64)
    last = len(made.kernels) - 1
    for i, (kernel, bias, mask) in enumerate(
        zip(made.kernels, made.biases, made.masks, strict=True)
    ):
        hidden = hidden @ (kernel.numpy() * mask) + bias.numpy()
        if i == 0 and context is not None:
            hidden = hidden + np.asarray(context, np.float64) @ made.context_kernel.numpy()
        if i < last:
            hidden = np.where(hidden > 0, hidden, np.expm1(np.minimum(hidden, 0)))  # elu
    d = hidden.shape[-1] // 2
    return hidden[..., :d], hidden[..., d:]


def numpy_step(made, x, context=None):
    """One IAF step forward in NumPy: `(y, log_scale)`, log-scale soft-clamped."""
    shift, raw = numpy_made(made, x, context)
    log_scale = LOG_SCALE_BOUND * np.tanh(raw / LOG_SCALE_BOUND)
    return x * np.exp(log_scale) + shift, log_scale


def numpy_base(layer, x):
    """The base Gaussian's `(loc, scale)` from the projection, in NumPy float64."""
    kernel, bias = (w.astype(np.float64) for w in layer.projection.get_weights())
    params = np.asarray(x, np.float64) @ kernel + bias
    d = layer.latent_dim
    return params[:, :d], h.softplus(params[:, d:]) + layer.min_scale


def numpy_flow(layer, z0, x):
    """`(z_K, sum of the log-scales)`: z_0 pushed through every step, in order."""
    context = x if layer.context else None
    z, log_det = np.asarray(z0, np.float64), 0.0
    for made in layer.flows:
        z, log_scale = numpy_step(made, z, context)
        log_det = log_det + log_scale.sum(axis=-1)
    return z, log_det


def numpy_flow_inverse(layer, z, x):
    """z_0 from z_K: each step undone by d fixed-point passes, last step first."""
    context = x if layer.context else None
    z = np.asarray(z, np.float64)
    for made in layer.flows[::-1]:
        y, z = z, np.zeros_like(z)
        for _ in range(z.shape[-1]):  # pass k fixes the k-th dimension in the ordering
            shift, raw = numpy_made(made, z, context)
            z = (y - shift) * np.exp(-LOG_SCALE_BOUND * np.tanh(raw / LOG_SCALE_BOUND))
    return z


def standard_normal_logpdf(z):
    return np.sum(-0.5 * np.asarray(z, np.float64) ** 2 - 0.5 * h.LOG_2PI, axis=-1)


class TestMADE:
    @pytest.mark.parametrize("reverse", [False, True], ids=["left-to-right", "right-to-left"])
    def test_output_depends_only_on_earlier_inputs(self, reverse):
        made = MADE((8, 8), reverse=reverse)
        made.build((None, LATENT))
        randomise_output_layers(made)
        x = tf.constant(X[:, :LATENT])
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            shift, log_scale = made(x)
        order = np.arange(1, LATENT + 1)[:: -1 if reverse else 1]
        allowed = order[np.newaxis, :] < order[:, np.newaxis]  # [i, j]: j before i
        for out in (shift, log_scale):
            jac = tape.batch_jacobian(out, x).numpy()
            np.testing.assert_array_equal(jac[:, ~allowed], 0.0)
            assert np.all(np.any(jac[:, allowed] != 0.0, axis=0))

    @pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
    @pytest.mark.parametrize(
        "inputs_shape, context_shape",
        [((6, 4), None), ((6, 4), (6, 5)), ((6, 4), (1, 5)), ((2, 6, 4), (6, 5))],
        ids=["plain", "context", "broadcast-context", "rank-3"],
    )
    def test_output_spec_matches_the_eager_call(self, policy, inputs_shape, context_shape):
        # Under mixed_float16 the eager call computes (and returns) float16;
        # the declared spec used to say float32.
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(policy)
        try:
            made = MADE((8,))
            rng = np.random.default_rng(2)
            inputs = rng.normal(size=inputs_shape).astype("float32")
            context = None
            if context_shape is not None:
                context = rng.normal(size=context_shape).astype("float32")
            eager = made(inputs, context=context)
            spec = made.compute_output_spec(
                keras.KerasTensor(inputs_shape),
                context=None if context is None else keras.KerasTensor(context_shape),
            )
            symbolic = made(
                keras.Input(batch_shape=inputs_shape),
                context=None if context is None else keras.Input(batch_shape=context_shape),
            )
        finally:
            keras.config.set_dtype_policy(previous)
        expected_dtype = "float16" if policy == "mixed_float16" else "float32"
        for out, out_spec, out_symbolic in zip(eager, spec, symbolic, strict=True):
            assert keras.backend.standardize_dtype(out.dtype) == expected_dtype
            for declared in (out_spec, out_symbolic):
                assert (declared.dtype, tuple(declared.shape)) == (expected_dtype, tuple(out.shape))

    def test_zero_output_at_initialisation(self):
        made = MADE((8,))
        shift, log_scale = made(X[:, :LATENT], context=X)
        np.testing.assert_array_equal(shift, 0.0)
        np.testing.assert_array_equal(log_scale, 0.0)

    def test_context_needed_once_built_with_it(self):
        made = MADE((8,))
        made(X[:, :LATENT], context=X)
        with pytest.raises(ValueError, match="with a context"):
            made(X[:, :LATENT])

    def test_config_round_trip(self):
        made = MADE((8, 4), activation="relu", reverse=True, kernel_initializer="he_normal")
        clone = h.config_round_trip(made)
        assert clone.hidden_units == (8, 4) and clone.reverse


class TestBijector:
    @pytest.mark.parametrize("context", [False, True], ids=["plain", "context"])
    @pytest.mark.parametrize("reverse", [False, True], ids=["left-to-right", "right-to-left"])
    def test_jacobian_is_triangular_and_log_det_matches_slogdet(self, reverse, context):
        step = made_step(reverse=reverse, context=tf.constant(X) if context else None)
        x = tf.constant(X[:, :LATENT])
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = step.forward(x)
        jac = tape.batch_jacobian(y, x).numpy().astype(np.float64)
        order = np.arange(1, LATENT + 1)[:: -1 if reverse else 1]
        later = order[np.newaxis, :] > order[:, np.newaxis]  # [i, j]: j after i
        np.testing.assert_array_equal(jac[:, later], 0.0)
        sign, logdet = np.linalg.slogdet(jac)
        assert np.all(sign > 0)
        np.testing.assert_allclose(step.forward_log_det_jacobian(x, 1), logdet, rtol=1e-5)

    @pytest.mark.parametrize("context", [False, True], ids=["plain", "context"])
    def test_inverse_undoes_forward(self, context):
        step = made_step(context=tf.constant(X) if context else None)
        x = X[:, :LATENT]
        # A copy of y: the bijector cache would otherwise return x unchanged.
        y = tf.constant(step.forward(x).numpy())
        np.testing.assert_allclose(step.inverse(y), x, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            step.inverse_log_det_jacobian(y, 1), -step.forward_log_det_jacobian(x, 1), rtol=1e-5
        )

    def test_context_changes_the_output(self):
        x = X[:, :LATENT]
        step = made_step(context=tf.constant(X))
        other = InverseAutoregressiveFlow(step.made, context=tf.constant(X[::-1].copy()))
        y, y_other = step.forward(x).numpy(), other.forward(x).numpy()
        # The first dimension in the ordering sees no input: it has a constant
        # shift and scale. The others see the context.
        np.testing.assert_allclose(y[:, 0], y_other[:, 0], rtol=1e-6)
        assert np.all(np.abs(y[:, 1:] - y_other[:, 1:]) > 1e-4)

    def test_log_scale_is_soft_clamped(self):
        step = made_step()
        step.made.biases[-1].assign(np.full(2 * LATENT, 100.0, "float32"))
        _, log_scale = step.shift_and_log_scale(X[:, :LATENT])
        assert np.all(np.abs(log_scale.numpy()) <= LOG_SCALE_BOUND)
        assert np.all(np.isfinite(step.forward(X[:, :LATENT] * 1e3)))


class TestDensity:
    @pytest.mark.parametrize("context", [False, True], ids=["plain", "context"])
    def test_log_prob_of_own_sample_matches_tfp_masked_autoregressive_flow(self, context):
        layer = flow_posterior(num_flows=3, context=context)
        q = layer.distribution(X)
        z = q.sample(seed=(1, 2))
        # The sample itself: log q along the sampling path, no inverse pass.
        with mock.patch.object(InverseAutoregressiveFlow, "_inverse", side_effect=AssertionError):
            log_q = q.log_prob(z).numpy()
        reference = reference_posterior(q, layer, tf.constant(X) if context else None)
        expected = reference.log_prob(tf.constant(z.numpy()))  # a copy: no cache
        np.testing.assert_allclose(log_q, expected, rtol=1e-5, atol=1e-5)
        # Our own sequential inverse agrees too on the copy.
        np.testing.assert_allclose(
            q.log_prob(tf.constant(z.numpy())), expected, rtol=1e-5, atol=1e-5
        )

    def test_kl_regularizer_reuses_the_sampling_path(self):
        layer = flow_posterior(kl_regularizer=ke.KLRegularizer(mode="mc"), seed=0)
        with mock.patch.object(InverseAutoregressiveFlow, "_inverse", side_effect=AssertionError):
            z = layer(X, training=True).numpy()
        assert len(layer.losses) == 1
        # num_samples=1: the KL is log q(z) - log p(z) of the returned z,
        # averaged over the batch; log q in NumPy through the inverse flow.
        loc, scale = numpy_base(layer, X)
        z0 = numpy_flow_inverse(layer, z, X)
        log_q = h.diag_normal_logpdf(z0, loc, scale) - numpy_flow(layer, z0, X)[1]
        expected = np.mean(log_q - standard_normal_logpdf(z))
        np.testing.assert_allclose(float(layer.losses[0]), expected, rtol=1e-5, atol=1e-5)

    def test_identity_at_initialisation(self):
        flow = flow_posterior(output_scale=0, inference="mean")
        gauss = ke.GaussianPosterior(LATENT, inference="mean")
        gauss.build(X.shape)
        gauss.projection.set_weights(flow.projection.get_weights())
        q_flow, q_gauss = flow.distribution(X), gauss.distribution(X)
        z_flow, z_gauss = q_flow.sample(seed=(3, 4)), q_gauss.sample(seed=(3, 4))
        np.testing.assert_array_equal(z_flow, z_gauss)
        loc, scale = numpy_base(flow, X)
        np.testing.assert_allclose(
            q_flow.log_prob(z_flow), h.diag_normal_logpdf(z_flow, loc, scale), rtol=1e-5
        )
        np.testing.assert_array_equal(flow(X, training=False), gauss(X, training=False))

    @pytest.mark.parametrize("context", [False, True], ids=["plain", "context"])
    def test_mean_is_the_flow_of_the_base_mean(self, context):
        layer = flow_posterior(num_flows=3, context=context, inference="mean")
        loc, _ = numpy_base(layer, X)
        expected, _ = numpy_flow(layer, loc, X)
        mean = layer(X, training=False)
        np.testing.assert_allclose(mean, expected, rtol=1e-5, atol=1e-5)
        assert not np.allclose(mean, loc, atol=1e-2)  # the steps are not the identity

    @pytest.mark.parametrize("context", [False, True], ids=["plain", "context"])
    def test_sample_and_log_prob_match_numpy(self, context):
        layer = flow_posterior(num_flows=3, context=context)
        q = layer.distribution(X)
        z = q.sample(seed=(5, 6))
        log_q = q.log_prob(z).numpy()  # along the sampling path (bijector cache)
        loc, scale = numpy_base(layer, X)
        z0 = numpy_flow_inverse(layer, z.numpy(), X)
        z_again, log_det = numpy_flow(layer, z0, X)
        # z is a flow of a base point: the NumPy inverse and forward agree.
        np.testing.assert_allclose(z_again, z, rtol=1e-5, atol=1e-5)
        # Change of variables: log q(z) = log N(z_0; loc, scale**2) - sum of log-scales.
        expected = h.diag_normal_logpdf(z0, loc, scale) - log_det
        np.testing.assert_allclose(log_q, expected, rtol=1e-5, atol=1e-4)
        # Elsewhere than its own samples, by the layer's inverse: a NumPy point.
        base_point = loc + 0.5 * scale
        other, other_log_det = numpy_flow(layer, base_point, X)
        np.testing.assert_allclose(
            q.log_prob(tf.constant(other, tf.float32)),
            h.diag_normal_logpdf(base_point, loc, scale) - other_log_det,
            rtol=1e-5,
            atol=1e-4,
        )

    def test_samples_are_reparameterised(self):
        layer = flow_posterior(seed=0)
        with tf.GradientTape() as tape:
            target = tf.reduce_sum(layer(X, training=True) ** 2)
        grads = tape.gradient(target, layer.trainable_weights)
        assert all(g is not None and np.any(g.numpy() != 0) for g in grads)


class TestKL:
    def test_auto_picks_monte_carlo(self):
        reg = ke.KLRegularizer(mode="auto")
        FlowPosterior(LATENT, kl_regularizer=reg)(keras.Input((FEATURES,)))
        assert list(reg._methods.values()) == ["mc"]

    @pytest.mark.parametrize(
        "prior", [None, ke.NormalPrior(LATENT, scale=2.0)], ids=["default", "normal-prior"]
    )
    def test_analytic_fails_at_model_construction(self, prior):
        reg = ke.KLRegularizer(prior=prior, mode="analytic")
        with pytest.raises(ValueError, match="mode='mc'"):
            FlowPosterior(LATENT, kl_regularizer=reg)(keras.Input((FEATURES,)))

    def test_mc_kl_matches_independent_estimate(self):
        n = 4000
        reg = ke.KLRegularizer(mode="mc", num_samples=n, seed=5)
        # Milder steps (log-scales up to ~0.8) keep the estimate's spread small.
        layer = flow_posterior(output_scale=0.2, context=True, kl_regularizer=reg, seed=0)
        layer(X)
        estimate = float(layer.losses[0])
        # Independent samples, and log q from TFP's MAF on copies of them.
        q = layer.distribution(X)
        z = q.sample(n, seed=(7, 8)).numpy()
        reference = reference_posterior(q, layer, tf.constant(X))
        log_ratio = reference.log_prob(tf.constant(z)).numpy() - standard_normal_logpdf(z)
        batch_mean = log_ratio.mean(axis=1)  # (n,): the batch-averaged KL per draw
        expected = batch_mean.mean()
        # Both estimates average n draws of the same quantity.
        std_err = np.sqrt(2.0) * batch_mean.std(ddof=1) / np.sqrt(n)
        assert abs(estimate - expected) < 4 * std_err, (estimate, expected, std_err)

    def test_mc_kl_gradient_matches_closed_form_at_identity(self):
        # A fresh flow is its Gaussian base: the gradient of the Monte Carlo
        # KL in the projection's bias must average to the closed form's,
        # d/d loc = loc and d/d raw = (scale - 1 / scale) * sigmoid(raw),
        # averaged over the batch. `repeats` independent estimates (each of
        # `n` draws) give the standard error: with 199 degrees of freedom
        # the sample standard deviation is within ~10% of the true one, and
        # 4 standard errors bound the mean's error for all 2 * LATENT
        # coordinates (two-sided normal tail at 4: 6e-5 each).
        repeats, n = 200, 25
        reg = ke.KLRegularizer(mode="mc", num_samples=n, seed=5)
        layer = flow_posterior(output_scale=0, kl_regularizer=reg, seed=0)
        bias = layer.projection.bias

        @tf.function
        def kl_gradient():
            with tf.GradientTape() as tape:
                kl = tf.reduce_mean(reg.kl_divergence(layer.distribution(X)))
            return tape.gradient(kl, bias)

        grads = np.array([kl_gradient().numpy() for _ in range(repeats)], np.float64)
        kernel, bias_value = (w.astype(np.float64) for w in layer.projection.get_weights())
        raw = (X.astype(np.float64) @ kernel + bias_value)[:, LATENT:]
        loc, scale = numpy_base(layer, X)
        exact = np.concatenate([loc.mean(0), ((scale - 1 / scale) / (1 + np.exp(-raw))).mean(0)])
        std_err = grads.std(axis=0, ddof=1) / np.sqrt(repeats)
        assert np.all(np.abs(grads.mean(axis=0) - exact) < 4 * std_err), (
            grads.mean(axis=0),
            exact,
            std_err,
        )

    def test_path_derivative_is_refused(self):
        with pytest.raises(ValueError, match="`kl_regularizer`"):
            FlowPosterior(LATENT, kl_regularizer=ke.KLRegularizer(path_derivative=True))


def make_vae(inference="sample", context=True, prior=None):
    keras.utils.set_random_seed(0)
    x = keras.Input((PIXELS,))
    hidden = keras.layers.Dense(32, activation="relu")(x)
    reg = ke.KLRegularizer(prior=prior, seed=1)
    z = FlowPosterior(
        3, hidden_units=(16,), context=context, kl_regularizer=reg, inference=inference, seed=2
    )(hidden)
    logits = keras.layers.Dense(PIXELS)(keras.layers.Dense(32, activation="relu")(z))
    return ke.ELBOModel(x, logits)


def compile_vae(model, jit_compile=False):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=ke.BernoulliNLL(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


class TestModel:
    @pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
    def test_loss_falls_and_kl_is_logged_once(self, jit_compile):
        model = compile_vae(make_vae(), jit_compile)
        h.assert_vae_trains_and_logs_kl_once(model)

    @pytest.mark.parametrize("use_custom_objects", [False, True], ids=["registered", "custom"])
    def test_save_load_round_trip(self, use_custom_objects, tmp_path, monkeypatch):
        model = compile_vae(make_vae(inference="mean", prior=ke.MixturePrior(3, 2, seed=0)))
        model.fit(DATA, DATA, epochs=1, batch_size=32, verbose=0)
        loaded = h.save_and_load(model, tmp_path / "m.keras", use_custom_objects, monkeypatch)
        assert isinstance(loaded.layers[2], FlowPosterior)
        for a, b in zip(model.weights, loaded.weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_allclose(
            model.predict(DATA, verbose=0), loaded.predict(DATA, verbose=0), rtol=1e-5, atol=1e-5
        )
        loaded.fit(DATA, DATA, epochs=1, batch_size=32, verbose=0)

    def test_config_round_trip(self):
        layer = FlowPosterior(
            3,
            num_flows=3,
            hidden_units=[8, 8],
            context=True,
            kl_regularizer=ke.KLRegularizer(prior=ke.NormalPrior(3), mode="mc"),
            min_scale=1e-3,
            inference="mean",
            seed=4,
            activation="relu",
            kernel_initializer="he_normal",
        )
        clone = h.config_round_trip(layer)
        assert clone.hidden_units == (8, 8) and len(clone.flows) == 3
        assert [m.reverse for m in clone.flows] == [False, True, False]

    def test_evaluation_functions(self):
        model = compile_vae(make_vae())
        model.fit(DATA, DATA, epochs=3, batch_size=32, verbose=0)
        elbo = ke.evaluate_elbo(model, DATA, seed=0, verbose=0)["elbo"]
        log_px = ke.importance_weighted_log_likelihood(
            model, DATA, num_samples=50, seed=0, verbose=0
        )
        assert np.all(np.isfinite(elbo)) and np.all(np.isfinite(log_px))
        std_err = np.std(log_px - elbo, ddof=1) / np.sqrt(len(DATA))
        assert log_px.mean() >= elbo.mean() - 4 * std_err


class TestErrors:
    @pytest.mark.parametrize(
        "kwargs, argument",
        [
            ({"latent_dim": 0}, "latent_dim"),
            ({"latent_dim": 2, "num_flows": 0}, "num_flows"),
            ({"latent_dim": 2, "num_flows": True}, "num_flows"),
            ({"latent_dim": 2, "num_flows": 1.5}, "num_flows"),
            ({"latent_dim": 2, "hidden_units": ()}, "hidden_units"),
            ({"latent_dim": 2, "hidden_units": 64}, "hidden_units"),
            ({"latent_dim": 2, "hidden_units": (64, 0)}, "hidden_units"),
            ({"latent_dim": 2, "context": "yes"}, "context"),
            ({"latent_dim": 2, "min_scale": 0.0}, "min_scale"),
            ({"latent_dim": 2, "inference": "mode"}, "inference"),
            ({"latent_dim": 2, "kl_regularizer": "kl"}, "kl_regularizer"),
        ],
        ids=lambda v: str(v),
    )
    def test_flow_posterior_argument_named(self, kwargs, argument):
        with pytest.raises(ValueError, match=f"`{argument}`"):
            FlowPosterior(**kwargs)

    @pytest.mark.parametrize(
        "kwargs, argument",
        [
            ({"hidden_units": []}, "hidden_units"),
            ({"hidden_units": "64"}, "hidden_units"),
            ({"hidden_units": (8, 2.0)}, "hidden_units"),
            ({"reverse": 1}, "reverse"),
        ],
        ids=lambda v: str(v),
    )
    def test_made_argument_named(self, kwargs, argument):
        with pytest.raises(ValueError, match=f"`{argument}`"):
            MADE(**kwargs)

    @pytest.mark.parametrize(
        "kwargs, argument",
        [
            ({"made": keras.layers.Dense(2)}, "made"),
            ({"made": MADE(), "log_scale_bound": -1.0}, "log_scale_bound"),
        ],
        ids=["made", "log_scale_bound"],
    )
    def test_bijector_argument_named(self, kwargs, argument):
        with pytest.raises(ValueError, match=f"`{argument}`"):
            InverseAutoregressiveFlow(**kwargs)

    def test_non_finite_input_raises_naming_the_layer(self):
        layer = flow_posterior(name="flow_q")
        bad = X.copy()
        bad[1, 2] = np.nan
        with pytest.raises(tf.errors.InvalidArgumentError, match="flow_q.*non-finite"):
            layer(bad)
