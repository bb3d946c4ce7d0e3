"""MADE, the IAF step, its distribution and FlowPosterior: density, Jacobian,
KL, fit, save/load, on every Keras backend.

Two independent references of the flow: a NumPy float64 forward pass written
from the MADE weights and masks (`numpy_made`, `numpy_flow`), on weights drawn
in NumPy (`numpy_weights`), so that log q for the same weights is checked to
be the same on TensorFlow, JAX and PyTorch; and, on TensorFlow, TFP's
`TransformedDistribution` through its own autoregressive-flow machinery,
`tfb.Invert(tfb.MaskedAutoregressiveFlow(...))` built on the same MADE
weights, which inverts the flow sequentially in its own loop and sums its own
log-determinants.
"""

from unittest import mock

import keras
import numpy as np
import pytest

import keras_elbo as ke
from keras_elbo.distributions import MultivariateNormalDiag, Normal, stop_parameter_gradients
from keras_elbo.flows import (
    LOG_SCALE_BOUND,
    MADE,
    FlowPosterior,
    InverseAutoregressiveFlow,
    InverseAutoregressiveFlowDistribution,
)
from tests import _helpers as h

TF_ONLY = pytest.mark.skipif(h.BACKEND != "tensorflow", reason="TFP reference: TensorFlow only")

FEATURES, LATENT = 5, 4
X = np.random.default_rng(0).normal(size=(6, FEATURES)).astype("float32")
PIXELS, DATA = h.TOY_PIXELS, h.TOY_DATA


@pytest.fixture(autouse=True)
def fixed_seed():
    """Every test starts from the same Keras initializer seeds."""
    keras.utils.set_random_seed(0)


def numpy_weights(layer, output_scale=0.4, seed=1):
    """Gives every weight of a FlowPosterior or a built MADE a NumPy draw.

    The same weights on every backend (Keras's initializers draw differently
    on each), so log q is compared for the same weights everywhere. Kernels
    are `N(0, 1 / fan_in)`, biases `N(0, 0.1**2)`; the output layers of the
    MADE networks `N(0, output_scale**2)`, zero when `output_scale=0` (the
    identity steps of a fresh layer).
    """
    rng = np.random.default_rng(seed)

    def draw(weight, std):
        weight.assign(rng.normal(scale=std, size=weight.shape).astype("float32"))

    def draw_dense(kernel, bias):
        draw(kernel, 1.0 / np.sqrt(kernel.shape[0]))
        draw(bias, 0.1)

    is_posterior = isinstance(layer, FlowPosterior)
    if is_posterior:
        draw_dense(layer.projection.kernel, layer.projection.bias)
    for made in layer.flows if is_posterior else [layer]:
        for kernel, bias in zip(made.kernels[:-1], made.biases[:-1], strict=True):
            draw_dense(kernel, bias)
        if made.context_kernel is not None:
            draw(made.context_kernel, 1.0 / np.sqrt(made.context_kernel.shape[0]))
        draw(made.kernels[-1], output_scale)
        draw(made.biases[-1], output_scale)


def flow_posterior(latent_dim=LATENT, output_scale=0.4, **kwargs):
    """A built FlowPosterior with NumPy weights; `output_scale=0` keeps its
    steps the identity."""
    kwargs.setdefault("hidden_units", (16,))
    layer = FlowPosterior(latent_dim, **kwargs)
    layer.build(X.shape)
    numpy_weights(layer, output_scale)
    return layer


def made_step(d=LATENT, reverse=False, context=None):
    """One IAF step with random output weights (not the identity)."""
    made = MADE((16, 16), reverse=reverse)
    made.build((None, d), None if context is None else context.shape)
    numpy_weights(made)
    return InverseAutoregressiveFlow(made, context=context)


def batch_jacobian(fn, x):
    """`jac[b, i, j] = d fn(x)[b, i] / d x[b, j]` for `fn` acting row by row,
    one backend gradient per output coordinate."""
    size = keras.ops.convert_to_numpy(fn(x)).shape[-1]
    rows = [h.gradients(lambda t, i=i: fn(t)[:, i], x)[0] for i in range(size)]
    return np.stack(rows, axis=1)


def gradient_function(fn, variables, carried=()):
    """A compiled function returning, at each call, the gradients of the
    scalar `fn()` in the Keras `variables`, as float64 arrays.

    TensorFlow records on a tape in a `tf.function`, PyTorch by autograd
    (eagerly); JAX jits the gradient of `fn` run in a `StatelessScope` with
    the variables mapped to traced values. `carried` are the variables `fn`
    updates (seed generators' states): JAX hands their new values back, so
    each call draws new noise, as on the other backends.
    """
    if h.BACKEND == "jax":
        import jax

        def pure(values, carried_values):
            mapping = [
                *zip(variables, values, strict=True),
                *zip(carried, carried_values, strict=True),
            ]
            with keras.StatelessScope(state_mapping=mapping) as scope:
                out = fn()
            return out, [scope.get_current_value(v) for v in carried]

        compiled = jax.jit(jax.grad(pure, has_aux=True))

        def jax_gradients():
            grads, updates = compiled([v.value for v in variables], [v.value for v in carried])
            for variable, value in zip(carried, updates, strict=True):
                variable.assign(value)
            return [np.asarray(g, np.float64) for g in grads]

        return jax_gradients
    if h.BACKEND == "torch":

        def torch_gradients():
            for variable in variables:
                variable.value.grad = None
            fn().backward()
            return [v.value.grad.numpy().astype(np.float64) for v in variables]

        return torch_gradients
    import tensorflow as tf

    @tf.function
    def tf_gradients():
        with tf.GradientTape() as tape:
            out = fn()
        return tape.gradient(out, variables)

    return lambda: [g.numpy().astype(np.float64) for g in tf_gradients()]


def reference_posterior(q, layer, context):
    """q rebuilt in TFP (TensorFlow only): q's base through TFP's
    MaskedAutoregressiveFlow on the same MADE weights.

    IAF's forward `y = x * exp(s(x)) + m(x)` is MAF's inverse
    `x = (y - m'(y)) * exp(-s'(y))` with the roles of x and y swapped, for
    `s' = -s` and `m' = -m * exp(-s)`; `tfb.Invert` makes it a forward map.
    """
    import tensorflow as tf
    import tensorflow_probability as tfp

    tfb, tfd = tfp.bijectors, tfp.distributions

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
    base = tfd.MultivariateNormalDiag(q.base.loc, q.base.scale_diag)
    return tfd.TransformedDistribution(base, tfb.Chain(steps[::-1]))


def numpy_made(made, z, context=None):
    """MADE's `(shift, raw log-scale)` in NumPy float64 from its weights and masks."""
    hidden = np.asarray(z, np.float64)
    last = len(made.kernels) - 1
    for i, (kernel, bias, mask) in enumerate(
        zip(made.kernels, made.biases, made.masks, strict=True)
    ):
        hidden = hidden @ (h.numpy(kernel) * mask) + h.numpy(bias)
        if i == 0 and context is not None:
            hidden = hidden + np.asarray(context, np.float64) @ h.numpy(made.context_kernel)
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


def standard_normal_logpdf(z):
    return np.sum(-0.5 * np.asarray(z, np.float64) ** 2 - 0.5 * h.LOG_2PI, axis=-1)


class TestMADE:
    @pytest.mark.parametrize("reverse", [False, True], ids=["left-to-right", "right-to-left"])
    def test_output_depends_only_on_earlier_inputs(self, reverse):
        made = MADE((8, 8), reverse=reverse)
        made.build((None, LATENT))
        numpy_weights(made)
        order = np.arange(1, LATENT + 1)[:: -1 if reverse else 1]
        allowed = order[np.newaxis, :] < order[:, np.newaxis]  # [i, j]: j before i
        for output in (0, 1):  # shift, log_scale
            jac = batch_jacobian(lambda x, k=output: made(x)[k], X[:, :LATENT])
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
        np.testing.assert_array_equal(h.numpy(shift), 0.0)
        np.testing.assert_array_equal(h.numpy(log_scale), 0.0)

    def test_context_needed_once_built_with_it(self):
        made = MADE((8,))
        made(X[:, :LATENT], context=X)
        with pytest.raises(ValueError, match="with a context"):
            made(X[:, :LATENT])

    def test_config_round_trip(self):
        made = MADE((8, 4), activation="relu", reverse=True, kernel_initializer="he_normal")
        clone = h.config_round_trip(made)
        assert clone.hidden_units == (8, 4) and clone.reverse


class TestInverseAutoregressiveFlow:
    @pytest.mark.parametrize("context", [False, True], ids=["plain", "context"])
    @pytest.mark.parametrize("reverse", [False, True], ids=["left-to-right", "right-to-left"])
    def test_jacobian_is_triangular_and_log_det_matches_slogdet(self, reverse, context):
        step = made_step(reverse=reverse, context=X if context else None)
        x = X[:, :LATENT]
        jac = batch_jacobian(lambda t: step.forward(t)[0], x)
        order = np.arange(1, LATENT + 1)[:: -1 if reverse else 1]
        later = order[np.newaxis, :] > order[:, np.newaxis]  # [i, j]: j after i
        np.testing.assert_array_equal(jac[:, later], 0.0)
        sign, logdet = np.linalg.slogdet(jac)
        assert np.all(sign > 0)
        np.testing.assert_allclose(h.numpy(step.forward(x)[1]), logdet, rtol=1e-5)

    @pytest.mark.parametrize("context", [False, True], ids=["plain", "context"])
    def test_inverse_undoes_forward(self, context):
        step = made_step(context=X if context else None)
        x = X[:, :LATENT]
        y, log_det = step.forward(x)
        x_again, inverse_log_det = step.inverse(y)
        np.testing.assert_allclose(h.numpy(x_again), x, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(h.numpy(inverse_log_det), -h.numpy(log_det), rtol=1e-5)

    def test_context_changes_the_output(self):
        x = X[:, :LATENT]
        step = made_step(context=X)
        other = InverseAutoregressiveFlow(step.made, context=X[::-1].copy())
        y, y_other = h.numpy(step.forward(x)[0]), h.numpy(other.forward(x)[0])
        # The first dimension in the ordering sees no input: it has a constant
        # shift and scale. The others see the context.
        np.testing.assert_allclose(y[:, 0], y_other[:, 0], rtol=1e-6)
        assert np.all(np.abs(y[:, 1:] - y_other[:, 1:]) > 1e-4)

    def test_log_scale_is_soft_clamped(self):
        step = made_step()
        step.made.biases[-1].assign(np.full(2 * LATENT, 100.0, "float32"))
        _, log_scale = step.shift_and_log_scale(X[:, :LATENT])
        assert np.all(np.abs(h.numpy(log_scale)) <= LOG_SCALE_BOUND)
        assert np.all(np.isfinite(h.numpy(step.forward(X[:, :LATENT] * 1e3)[0])))


def numpy_log_q(layer, z0, x):
    """`(z_K, log q(z_K))` in NumPy float64 from the base point `z_0`: the
    flow forward and the change of variables. Well conditioned, unlike a
    log q from the inverse of a float32 `z_K` (see `TestDensity`)."""
    loc, scale = numpy_base(layer, x)
    z, log_det = numpy_flow(layer, z0, x)
    return z, h.diag_normal_logpdf(z0, loc, scale) - log_det


class TestInverseAutoregressiveFlowDistribution:
    def test_log_prob_of_another_tensor_inverts_exactly(self):
        # Mild steps: the inverse of a float32 z is then well conditioned
        # (see TestDensity for the tolerance).
        layer = flow_posterior(output_scale=0.2, num_flows=2, context=True)
        q = layer.distribution(X)
        first = q.sample(seed=1)
        log_q_first = h.numpy(q.log_prob(first))  # from the sampling path
        q.sample(seed=2)  # q now remembers this sample only
        # The same values in other tensors: each step inverted, d passes each.
        inverse = InverseAutoregressiveFlow.inverse
        for other in (first, keras.ops.convert_to_tensor(h.numpy(first).astype("float32"))):
            with mock.patch.object(
                InverseAutoregressiveFlow, "inverse", autospec=True, side_effect=inverse
            ) as spy:
                log_q = h.numpy(q.log_prob(other))
            assert spy.call_count == 2
            np.testing.assert_allclose(log_q, log_q_first, rtol=1e-5, atol=1e-4)

    def test_a_copy_forgets_the_sample(self):
        # `stop_parameter_gradients` copies q with other parameter tensors:
        # the copy must not read back the original's log q (and gradients).
        layer = flow_posterior(output_scale=0.2, num_flows=2)
        q = layer.distribution(X)
        z = q.sample(seed=1)
        inverse = InverseAutoregressiveFlow.inverse
        with mock.patch.object(
            InverseAutoregressiveFlow, "inverse", autospec=True, side_effect=inverse
        ) as spy:
            log_q = h.numpy(stop_parameter_gradients(q).log_prob(z))
        assert spy.call_count == 2
        np.testing.assert_allclose(log_q, h.numpy(q.log_prob(z)), rtol=1e-5, atol=1e-4)

    def test_sample_shape_matches_numpy(self):
        # Leading sample axes broadcast against the batch of the context.
        layer = flow_posterior(num_flows=2, context=True)
        q = layer.distribution(X)
        z = q.sample((3,), seed=4)
        log_q = q.log_prob(z)
        assert tuple(z.shape) == (3, *X.shape[:1], LATENT)
        assert tuple(log_q.shape) == (3, *X.shape[:1])
        # The same integer seed draws the same base points.
        z_expected, log_q_expected = numpy_log_q(layer, h.numpy(q.base.sample((3,), seed=4)), X)
        np.testing.assert_allclose(h.numpy(z), z_expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(h.numpy(log_q), log_q_expected, rtol=1e-5, atol=1e-5)

    def test_shapes_and_dtype_are_the_base_ones(self):
        q = flow_posterior().distribution(X)
        assert (q.batch_shape, q.event_shape, q.dtype) == ((6,), (LATENT,), "float32")
        assert q.reparameterized and isinstance(q.base, MultivariateNormalDiag)
        assert len(q.flows) == 2

    @pytest.mark.parametrize(
        "method, match",
        [("mean", "no closed-form mean"), ("stddev", "stddev"), ("entropy", "entropy")],
    )
    def test_no_closed_form_moments(self, method, match):
        q = flow_posterior().distribution(X)
        with pytest.raises(NotImplementedError, match=match):
            getattr(q, method)()

    @pytest.mark.parametrize(
        "kwargs, argument",
        [
            ({"base": "normal"}, "base"),
            ({"base": Normal(0.0, 1.0)}, "base"),  # no event axis
            ({"flows": [MADE()]}, "flows"),
            ({"flows": "steps"}, "flows"),
        ],
        ids=["not-a-distribution", "scalar-event", "not-steps", "not-a-sequence"],
    )
    def test_argument_named(self, kwargs, argument):
        made = MADE((4,))
        arguments = {
            "base": MultivariateNormalDiag(np.zeros(2, "float32"), np.ones(2, "float32")),
            "flows": [InverseAutoregressiveFlow(made)],
            **kwargs,
        }
        with pytest.raises(ValueError, match=f"`{argument}`"):
            InverseAutoregressiveFlowDistribution(**arguments)


class TestDensity:
    """log q of a sample is compared with references that start from the
    sample's base point z_0 (the same integer seed draws it again from
    `q.base`): forward, the flow is well conditioned. Inverting a float32
    z_K is not where a step contracts a dimension strongly: with the weights
    of `flow_posterior()` and three steps, TFP's inverse of a copy of z_K
    and the sampling path were up to 0.25 nats apart over 20 draws, while
    the sampling path and the NumPy forward pass agreed to 5e-6. That is one
    reason log q is read from the sampling path; the inverse is compared
    with milder steps (`output_scale=0.2`: at most 5e-5 apart over the same
    20 draws, hence `atol=1e-4`)."""

    @TF_ONLY
    @pytest.mark.parametrize("context", [False, True], ids=["plain", "context"])
    def test_log_prob_of_own_sample_matches_tfp_transformed_distribution(self, context):
        import tensorflow as tf

        layer = flow_posterior(num_flows=3, context=context)
        q = layer.distribution(X)
        z = q.sample(seed=1)
        # The sample itself: log q along the sampling path, no inverse pass.
        with mock.patch.object(InverseAutoregressiveFlow, "inverse", side_effect=AssertionError):
            log_q = q.log_prob(z).numpy()
        # TFP's TransformedDistribution on the same base point: its forward
        # pass, then log q from its own bijector cache.
        reference = reference_posterior(q, layer, tf.constant(X) if context else None)
        z_reference = reference.bijector.forward(q.base.sample(seed=1))
        np.testing.assert_allclose(z, z_reference, rtol=1e-5, atol=1e-5)
        expected = reference.log_prob(z_reference).numpy()
        np.testing.assert_allclose(log_q, expected, rtol=1e-5, atol=1e-5)

    @TF_ONLY
    @pytest.mark.parametrize("context", [False, True], ids=["plain", "context"])
    def test_log_prob_elsewhere_matches_tfp_sequential_inverse(self, context):
        import tensorflow as tf

        # Mild steps: the inverse of a float32 point is well conditioned.
        layer = flow_posterior(output_scale=0.2, num_flows=3, context=context)
        q = layer.distribution(X)
        z = tf.constant(q.sample(seed=1).numpy())  # a copy: both caches miss
        reference = reference_posterior(q, layer, tf.constant(X) if context else None)
        np.testing.assert_allclose(q.log_prob(z), reference.log_prob(z), rtol=1e-5, atol=1e-4)

    def test_kl_regularizer_reuses_the_sampling_path(self):
        layer = flow_posterior(kl_regularizer=ke.KLRegularizer(mode="mc"), seed=0)
        state = h.numpy(layer.seed_generator.state)
        with mock.patch.object(InverseAutoregressiveFlow, "inverse", side_effect=AssertionError):
            z = h.numpy(layer(X, training=True))
        assert len(layer.losses) == 1
        # The call's base point, drawn again from the generator's old state.
        layer.seed_generator.state.assign(state.astype(layer.seed_generator.state.dtype))
        z0 = h.numpy(layer.distribution(X).base.sample(seed=layer.seed_generator))
        z_expected, log_q = numpy_log_q(layer, z0, X)
        np.testing.assert_allclose(z, z_expected, rtol=1e-5, atol=1e-5)
        # num_samples=1: the KL is log q(z) - log p(z) of the returned z,
        # averaged over the batch.
        expected = np.mean(log_q - standard_normal_logpdf(z))
        np.testing.assert_allclose(h.numpy(layer.losses[0]), expected, rtol=1e-5, atol=1e-5)

    def test_identity_at_initialisation(self):
        flow = flow_posterior(output_scale=0, inference="mean")
        gauss = ke.GaussianPosterior(LATENT, inference="mean")
        gauss.build(X.shape)
        gauss.projection.set_weights(flow.projection.get_weights())
        q_flow, q_gauss = flow.distribution(X), gauss.distribution(X)
        z_flow, z_gauss = q_flow.sample(seed=3), q_gauss.sample(seed=3)
        np.testing.assert_array_equal(h.numpy(z_flow), h.numpy(z_gauss))
        loc, scale = numpy_base(flow, X)
        np.testing.assert_allclose(
            h.numpy(q_flow.log_prob(z_flow)),
            h.diag_normal_logpdf(h.numpy(z_flow), loc, scale),
            rtol=1e-5,
        )
        np.testing.assert_array_equal(
            h.numpy(flow(X, training=False)), h.numpy(gauss(X, training=False))
        )

    @pytest.mark.parametrize("context", [False, True], ids=["plain", "context"])
    def test_mean_is_the_flow_of_the_base_mean(self, context):
        layer = flow_posterior(num_flows=3, context=context, inference="mean")
        loc, _ = numpy_base(layer, X)
        expected, _ = numpy_flow(layer, loc, X)
        mean = h.numpy(layer(X, training=False))
        np.testing.assert_allclose(mean, expected, rtol=1e-5, atol=1e-5)
        assert not np.allclose(mean, loc, atol=1e-2)  # the steps are not the identity

    @pytest.mark.parametrize("context", [False, True], ids=["plain", "context"])
    def test_sample_and_log_prob_match_numpy(self, context):
        # The NumPy reference and the weights are the same on every backend:
        # log q for the same weights is the same on TensorFlow, JAX and PyTorch.
        layer = flow_posterior(num_flows=3, context=context)
        q = layer.distribution(X)
        z = q.sample(seed=5)
        # Along the sampling path: no inverse pass.
        with mock.patch.object(InverseAutoregressiveFlow, "inverse", side_effect=AssertionError):
            log_q = h.numpy(q.log_prob(z))
        # z is the flow of its base point (drawn again with the same seed);
        # change of variables: log q(z) = log N(z_0; loc, scale**2) - sum of log-scales.
        z_expected, expected = numpy_log_q(layer, h.numpy(q.base.sample(seed=5)), X)
        np.testing.assert_allclose(h.numpy(z), z_expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(log_q, expected, rtol=1e-5, atol=1e-5)
        # Elsewhere than its own samples, by the layer's inverse: a NumPy
        # point, the same on every backend.
        loc, scale = numpy_base(layer, X)
        other, other_log_q = numpy_log_q(layer, loc + 0.5 * scale, X)
        np.testing.assert_allclose(
            h.numpy(q.log_prob(other.astype("float32"))), other_log_q, rtol=1e-5, atol=1e-4
        )

    def test_samples_are_reparameterised(self):
        layer = flow_posterior(seed=0)
        grads = gradient_function(
            lambda: keras.ops.sum(layer(X, training=True) ** 2),
            layer.trainable_weights,
            carried=[layer.seed_generator.state],
        )()
        assert len(grads) == len(layer.trainable_weights)
        assert all(np.any(g != 0) for g in grads)


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
        estimate = float(h.numpy(layer.losses[0]))
        # Independent samples and their log q, all in NumPy float64.
        loc, scale = numpy_base(layer, X)
        z0 = loc + scale * np.random.default_rng(7).normal(size=(n, *loc.shape))
        z, log_q = numpy_log_q(layer, z0, X)
        log_ratio = log_q - standard_normal_logpdf(z)
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

        kl_gradient = gradient_function(
            lambda: keras.ops.mean(reg.kl_divergence(layer.distribution(X))),
            [bias],
            carried=[reg.seed_generator.state],
        )
        grads = np.array([kl_gradient()[0] for _ in range(repeats)], np.float64)
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


def compile_vae(model, jit_compile="auto"):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=ke.BernoulliNLL(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


# Compiled and not: on TensorFlow a graph with and without XLA; JAX's
# uncompiled step runs op by op (20 s here) and PyTorch's compiled one spends
# 40 s in torch.compile, so each of those runs its usual mode only (what
# `jit_compile="auto"`, the other tests' setting, picks on a CPU).
JIT_COMPILE = h.JIT_MODES


@pytest.mark.slow
class TestModel:
    @pytest.mark.parametrize("jit_compile", JIT_COMPILE, ids=lambda jit: f"jit_compile={jit}")
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
            np.testing.assert_array_equal(h.numpy(a), h.numpy(b))
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
    def test_step_argument_named(self, kwargs, argument):
        with pytest.raises(ValueError, match=f"`{argument}`"):
            InverseAutoregressiveFlow(**kwargs)

    def test_non_finite_input_raises_naming_the_layer(self):
        # Eagerly on every backend (on JAX only outside a jitted function).
        error = ValueError
        if h.BACKEND == "tensorflow":
            import tensorflow as tf

            error = tf.errors.InvalidArgumentError
        layer = flow_posterior(name="flow_q")
        bad = X.copy()
        bad[1, 2] = np.nan
        with pytest.raises(error, match="flow_q.*non-finite"):
            layer(bad)


class TestFloat64:
    """Issue 17, point 7: under a float64 floatx the flow computed in float32:
    `fit` failed on TensorFlow (a float32 KL in a float64 loss) and
    `evaluate_elbo` returned float32 on PyTorch."""

    @pytest.fixture
    def float64(self):
        if h.BACKEND == "jax":
            import jax

            if not jax.config.jax_enable_x64:
                pytest.skip("JAX keeps float32 unless JAX_ENABLE_X64 is set (README)")
        # The policy too: a test that set one (mixed precision) leaves it
        # fixed, whatever floatx says.
        policy = keras.config.dtype_policy()
        keras.config.set_floatx("float64")
        keras.config.set_dtype_policy("float64")
        yield
        keras.config.set_floatx("float32")
        keras.config.set_dtype_policy(policy)

    def test_log_q_is_float64_exact(self, float64):
        layer = flow_posterior(num_flows=2, context=True)
        x = X.astype("float64")
        q = layer.distribution(x)
        z0 = np.random.default_rng(3).normal(size=(len(x), LATENT))
        z, _ = q.forward(keras.ops.convert_to_tensor(z0, "float64"))
        log_q = q.log_prob(z)
        assert keras.backend.standardize_dtype(log_q.dtype) == "float64"
        expected_z, expected = numpy_log_q(layer, z0, x)
        # float64 throughout: agreement to ~1e-12, where float32 gives ~1e-6.
        # Except on PyTorch, where Keras 3.15 computes a float64 matmul in
        # float32 (keras-team/keras#23704, open): float64 tensors there,
        # float32 precision.
        rtol = 1e-5 if h.BACKEND == "torch" else 1e-10
        np.testing.assert_allclose(h.numpy(z), expected_z, rtol=rtol, atol=1e-12)
        np.testing.assert_allclose(h.numpy(log_q), expected, rtol=rtol)

    def test_vae_trains_and_evaluates_in_float64(self, float64):
        model = compile_vae(make_vae())
        data = (np.random.default_rng(4).random((32, PIXELS)) < 0.4).astype("float64")
        history = model.fit(data, data, epochs=1, batch_size=16, verbose=0).history
        assert np.isfinite(history["loss"]).all()
        estimate = ke.evaluate_elbo(model, data, num_samples=2, verbose=0)
        assert {np.asarray(v).dtype for v in estimate.values()} == {np.dtype("float64")}
