"""Bayesian layers: KL scaled by data-set size, sampling moments, save/load."""

import keras
import numpy as np
import pytest
from scipy.special import expit

import keras_elbo as ke
from keras_elbo import distributions
from keras_elbo.bayesian import (
    BayesianConv1D,
    BayesianConv2D,
    BayesianConv3D,
    BayesianDense,
)
from keras_elbo.predictive import predictive_moments
from keras_elbo.priors import ScaleMixturePrior
from keras_elbo.weight_posteriors import (
    MIN_SCALE,
)
from tests import _helpers as h

RNG = np.random.default_rng(0)
X = RNG.normal(size=(3, 4)).astype("float32")
IMAGES = RNG.normal(size=(2, 5, 5, 2)).astype("float32")
CONVOLUTIONS = {1: BayesianConv1D, 2: BayesianConv2D, 3: BayesianConv3D}
# Inputs (two examples) and kernel sizes for each rank: small outputs.
CONV_INPUTS = {
    1: RNG.normal(size=(2, 6, 2)).astype("float32"),
    2: IMAGES,
    3: RNG.normal(size=(2, 3, 3, 3, 2)).astype("float32"),
}
KERNEL_SIZES = {1: 3, 2: 3, 3: 2}


def numpy_posterior(layer):
    """(kernel loc, kernel scale, bias loc, bias scale) of a mean-field
    posterior in float64, the kernel's in the kernel's shape."""
    posterior = layer.weight_posterior
    loc = h.numpy(posterior.loc)
    scale = h.softplus(h.numpy(posterior.raw_scale)) + MIN_SCALE
    size = int(np.prod(layer.kernel_shape))
    kernel = (loc[:size].reshape(layer.kernel_shape), scale[:size].reshape(layer.kernel_shape))
    return (*kernel, loc[size:], scale[size:])


def spread_posterior(layer, seed=1):
    """Random locs and scales in [0.2, 0.6]: moments worth testing."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(layer.kernel_shape))
    locs, scales = [], []
    for shape in (layer.kernel_shape, (layer.num_parameters - size,)):
        locs.append(rng.normal(size=shape).ravel())
        scales.append(rng.uniform(0.2, 0.6, size=shape).ravel())
    scale = np.concatenate(scales)
    layer.weight_posterior.loc.assign(np.concatenate(locs).astype("float32"))
    layer.weight_posterior.raw_scale.assign(np.log(np.expm1(scale - MIN_SCALE)).astype("float32"))


def flat(*arrays):
    return np.concatenate([a.ravel() for a in arrays])


def repeated_calls(layer, x, n, training=True):
    """`n` calls of `layer` on `x`: the outputs stacked, (n, *output_shape),
    and the loss each call added, (n,), in float64.

    Compiled where the backend can (`tf.function`; on JAX `jax.jit` of
    `stateless_call`, threading the seed generators' state from call to
    call), so that thousands of calls take seconds; eager on PyTorch.
    """
    if h.BACKEND == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]

        @jax.jit
        def call(state):
            outputs, state, losses = layer.stateless_call(
                trainable, state, x, training=training, return_losses=True
            )
            return outputs, losses[0], state

        state, results = [v.value for v in layer.non_trainable_variables], []
        for _ in range(n):
            outputs, loss, state = call(state)
            results.append((outputs, loss))
    elif h.BACKEND == "tensorflow":
        import tensorflow as tf

        call = tf.function(lambda: (layer(x, training=training), layer.losses[0]))
        results = [call() for _ in range(n)]
    else:
        import torch

        with torch.no_grad():
            results = [(layer(x, training=training), layer.losses[0]) for _ in range(n)]
    outputs = np.stack([h.numpy(outputs) for outputs, _ in results])
    return outputs, np.array([float(h.numpy(loss)) for _, loss in results])


def repeated_outputs(layer, x, n, training=True):
    """`n` calls of `layer` on `x`, stacked: (n, *output_shape), float64."""
    return repeated_calls(layer, x, n, training)[0]


def numpy_conv(x, kernel, strides=1, padding="valid", dilation=1):
    """Cross-correlation (TensorFlow's convolution), channels last, of any
    rank, with SAME padded as TensorFlow pads and the kernel dilated by
    inserting zeros."""
    rank = kernel.ndim - 2
    strides = (strides,) * rank if isinstance(strides, int) else tuple(strides)
    dilation = (dilation,) * rank if isinstance(dilation, int) else tuple(dilation)
    size = [d * (k - 1) + 1 for k, d in zip(kernel.shape[:rank], dilation, strict=True)]
    dilated = np.zeros((*size, *kernel.shape[rank:]))
    dilated[tuple(slice(None, None, d) for d in dilation)] = kernel
    if padding == "same":
        pads = []
        for n, k, s in zip(x.shape[1:-1], size, strides, strict=True):
            total = max((-(-n // s) - 1) * s + k - n, 0)
            pads.append((total // 2, total - total // 2))
        x = np.pad(x, [(0, 0), *pads, (0, 0)])
    axes = tuple(range(1, rank + 1))
    patches = np.lib.stride_tricks.sliding_window_view(x, size, axis=axes)
    patches = patches[(slice(None), *(slice(None, None, s) for s in strides))]
    # patches: (batch, *out, channels, *kernel); contract channels and kernel.
    letters = "ijk"[:rank]
    return np.einsum(f"...c{letters},{letters}cf->...f", patches, dilated)


def assert_moments(outputs, mean, var):
    """The draws `outputs` (n, ...) have mean `mean` and variance `var`, each
    within 4 standard errors: the mean's is sd(y) / sqrt(n); the variance is
    the mean of (y - mean)**2 (centred at the true mean, so unbiased), whose
    standard error is sd((y - mean)**2) / sqrt(n)."""
    n = len(outputs)
    np.testing.assert_array_less(
        np.abs(outputs.mean(0) - mean), 4 * outputs.std(0, ddof=1) / np.sqrt(n)
    )
    squares = (outputs - mean) ** 2
    np.testing.assert_array_less(
        np.abs(squares.mean(0) - var), 4 * squares.std(0, ddof=1) / np.sqrt(n)
    )


class TestKL:
    @pytest.mark.parametrize(
        "prior, prior_scale",
        [(None, 1.0), (ke.NormalPrior(scale=0.5), 0.5)],
        ids=["default", "s0.5"],
    )
    def test_loss_is_kl_over_data_set_size(self, prior, prior_scale):
        n_train = 250
        layer = BayesianDense(3, prior=prior, kl_weight=1 / n_train, seed=0)
        inputs = keras.Input((4,))
        model = ke.ELBOModel(inputs, layer(inputs))
        spread_posterior(layer)
        k_loc, k_scale, b_loc, b_scale = numpy_posterior(layer)
        kl = h.kl_diag_normal(
            flat(k_loc, b_loc), flat(k_scale, b_scale), prior_scale=prior_scale
        )  # closed form over all P = 15 parameters
        model(X, training=True)
        assert len(model.losses) == 1
        np.testing.assert_allclose(float(h.numpy(model.losses[0])), kl / n_train, rtol=1e-5)
        # ELBOModel logs the unweighted KL (its evaluate samples the weights:
        # the ELBO). A plain model's evaluate honours inference="mean": its
        # `loss` is the per-example NLL at the mean weights plus KL / N.
        model.compile(loss=ke.GaussianNLL(scale=1.0))
        y = RNG.normal(size=(3, 3)).astype("float32")
        logs = model.evaluate(X, y, return_dict=True, verbose=0)
        np.testing.assert_allclose(logs[f"{layer.name}_kl"], kl, rtol=1e-5)
        plain = keras.Model(inputs, layer(inputs))
        plain.compile(loss=ke.GaussianNLL(scale=1.0))
        mean = X.astype(np.float64) @ k_loc + b_loc
        nll = np.mean(np.sum(0.5 * (y - mean) ** 2 + 0.5 * h.LOG_2PI, axis=-1))
        loss = plain.evaluate(X, y, verbose=0)
        np.testing.assert_allclose(loss, nll + kl / n_train, rtol=1e-5)

    def test_conv_kl_is_closed_form_over_all_parameters(self):
        layer = BayesianConv2D(3, 2, kl_weight=0.01, seed=0)
        layer(IMAGES, training=True)
        k_loc, k_scale, b_loc, b_scale = numpy_posterior(layer)
        assert layer.num_parameters == 2 * 2 * 2 * 3 + 3 == k_loc.size + b_loc.size
        kl = h.kl_diag_normal(flat(k_loc, b_loc), flat(k_scale, b_scale))
        np.testing.assert_allclose(float(h.numpy(layer.losses[0])), 0.01 * kl, rtol=1e-5)

    def test_two_layers_add_two_losses_and_log_two_metrics(self):
        first = BayesianDense(5, activation="relu", kl_weight=0.1, name="first")
        inputs = keras.Input((4,))
        model = ke.ELBOModel(inputs, BayesianDense(2, name="second")(first(inputs)))
        model.compile(keras.optimizers.Adam(1e-2), ke.GaussianNLL())
        history = model.fit(X, X[:, :2], epochs=1, verbose=0).history
        assert sorted(history) == ["first_kl", "loss", "neg_elbo", "reconstruction", "second_kl"]
        # JAX's fit steps are stateless and leave no losses on the layers:
        # count them after an eager call.
        model(X, training=True)
        assert len(model.losses) == 2
        assert len(model.evaluate(X, X[:, :2], verbose=0)) == 5  # each metric once

    def test_scale_mixture_prior_kl_is_unbiased_monte_carlo(self):
        layer = BayesianDense(2, prior=ScaleMixturePrior(scale2=0.05), seed=3)
        layer.build((None, 4))
        spread_posterior(layer)
        q = layer.posterior()
        assert layer.kl_regularizer.method(q, layer.prior.distribution()) == "mc_entropy"
        n = 2000
        estimates = repeated_calls(layer, X, n)[1]
        # Reference: log q - log p, by NumPy's own draws (many more of them).
        k_loc, k_scale, b_loc, b_scale = numpy_posterior(layer)
        loc, scale = flat(k_loc, b_loc), flat(k_scale, b_scale)
        w = loc + scale * np.random.default_rng(5).normal(size=(200_000, loc.size))
        log_p = np.logaddexp(
            np.log(0.5) + h.diag_normal_logpdf(w[..., None], 0.0, 1.0),
            np.log(0.5) + h.diag_normal_logpdf(w[..., None], 0.0, 0.05),
        ).sum(axis=-1)
        log_ratio = h.diag_normal_logpdf(w, loc, scale) - log_p
        reference = log_ratio.mean()
        # Both sides are Monte Carlo means: their standard errors add in
        # quadrature (the reference's is about 10 times smaller).
        tol = 4 * np.hypot(estimates.std() / np.sqrt(n), log_ratio.std() / np.sqrt(len(w)))
        assert abs(estimates.mean() - reference) < tol, (estimates.mean(), reference, tol)


ESTIMATORS = ["reparameterization", "flipout"]
# Dense layers also take local reparameterisation (inputs of rank 2).
DENSE_ESTIMATORS = [*ESTIMATORS, "local_reparameterization"]


class TestSampling:
    @pytest.mark.parametrize("estimator", DENSE_ESTIMATORS)
    def test_mean_inference_is_the_loc_weights(self, estimator):
        layer = BayesianDense(2, estimator=estimator, inference="mean", seed=0)
        layer.build((None, 4))
        spread_posterior(layer)
        k_loc, _, b_loc, _ = numpy_posterior(layer)
        for _ in range(2):
            out = layer(X, training=False)
            np.testing.assert_allclose(h.numpy(out), X @ k_loc + b_loc, rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("estimator", DENSE_ESTIMATORS)
    @pytest.mark.parametrize(
        "training, inference", [(True, "mean"), (False, "sample")], ids=["training", "sample"]
    )
    def test_samples_vary_between_calls(self, estimator, training, inference):
        layer = BayesianDense(2, estimator=estimator, inference=inference, seed=0)
        first, second = (h.numpy(layer(X, training=training)) for _ in range(2))
        assert not np.allclose(first, second)
        assert len(layer.losses) == 1  # the KL, added outside training too

    @pytest.mark.parametrize("estimator", DENSE_ESTIMATORS)
    def test_dense_output_moments_match_gaussian(self, estimator):
        # Each output is Gaussian over q(w): mean x @ m + b_m, variance
        # x**2 @ s**2 + s_b**2, whatever the estimator (Flipout's signs do
        # not change the marginal of a symmetric perturbation; local
        # reparameterisation samples that very Gaussian).
        n = 3000
        layer = BayesianDense(2, estimator=estimator, seed=4)
        layer.build((None, 4))
        spread_posterior(layer)
        k_loc, k_scale, b_loc, b_scale = numpy_posterior(layer)
        mean = X @ k_loc + b_loc
        var = X.astype(np.float64) ** 2 @ k_scale**2 + b_scale**2
        assert_moments(repeated_outputs(layer, X, n), mean, var)

    @pytest.mark.parametrize("estimator", DENSE_ESTIMATORS)
    def test_perturbations_of_identical_examples(self, estimator):
        # A batch of identical rows, so that only the estimator's sharing of
        # the weight noise differs between rows. Row n's perturbation
        # p[n, j] = y[n, j] - (x @ k_loc + b_loc)[j] is N(0, V_j) for either
        # estimator, V_j = sum_i w_ij + B_j with w_ij = x_i**2 * k_scale_ij**2
        # and B_j = b_scale_j**2. For two rows n != m:
        # - "reparameterization" (one sample): p[n] = p[m], so
        #   E[p_n p_m] = V and E[p_n**2 p_m**2] = E[p**4] = 3 V**2.
        # - "flipout": p[n, j] = s_out[n, j] * u[n, j], u[n, j] = sum_i
        #   s_in[n, i] a_ij + b_j with the shared a_ij ~ N(0, w_ij),
        #   b_j ~ N(0, B_j). The output signs make E[p_n p_m] = 0; given
        #   (a, b), E[u**2] = S = sum_i a_ij**2 + b_j**2 for each row, so
        #   E[p_n**2 p_m**2] = E[S**2] = V**2 + 2 (sum_i w_ij**2 + B_j**2).
        # Without the input signs |p[n]| = |p[m]| (fourth moment 3 V**2);
        # without the output signs E[p_n p_m] = B. Each call gives one mean
        # over its row pairs and units; the calls are independent, so their
        # standard deviation / sqrt(calls) is the standard error.
        # 16 inputs of equal size: no few weights dominate the perturbation,
        # so Flipout's E[p_n**2 p_m**2] / V**2 (1.18 here) is far from 3.
        rows, calls, inputs = 8, 800, 16
        layer = BayesianDense(8, estimator=estimator, seed=5)
        layer.build((None, inputs))
        spread_posterior(layer)
        k_loc, k_scale, b_loc, b_scale = numpy_posterior(layer)
        row = 0.5 * (-1.0) ** np.arange(inputs)
        x = np.tile(row, (rows, 1)).astype("float32")
        p = repeated_outputs(layer, x, calls) - (x.astype(np.float64) @ k_loc + b_loc)
        w = row[:, None] ** 2 * k_scale**2  # (inputs, units)
        var = w.sum(0) + b_scale**2
        p = p / np.sqrt(var)  # standardised: N(0, 1) per row and unit
        pairs = rows * (rows - 1)  # ordered pairs n != m

        def pair_mean(v):  # per call: mean over pairs and units of v[n] v[m]
            return ((v.sum(1) ** 2 - (v**2).sum(1)) / pairs).mean(-1)

        cross, fourth = pair_mean(p), pair_mean(p**2)
        if estimator == "flipout":
            expected_cross = 0.0
            expected_fourth = np.mean(1 + 2 * ((w**2).sum(0) + b_scale**4) / var**2)
        elif estimator == "local_reparameterization":
            # Independent draws for each row: E[p_n p_m] = 0, and
            # E[p_n**2 p_m**2] = E[p_n**2] E[p_m**2] = 1 once standardised.
            expected_cross, expected_fourth = 0.0, 1.0
        else:
            expected_cross, expected_fourth = 1.0, 3.0
        for values, expected in ((cross, expected_cross), (fourth, expected_fourth)):
            tol = 4 * values.std(ddof=1) / np.sqrt(calls)
            assert abs(values.mean() - expected) < tol, (values.mean(), expected, tol)

    @pytest.mark.parametrize("estimator", ESTIMATORS)
    @pytest.mark.parametrize("rank", [1, 2, 3], ids=["1d", "2d", "3d"])
    def test_conv_output_moments_match_gaussian(self, estimator, rank):
        # Each output is Gaussian over q(w): mean conv(x, k_loc) + b_loc,
        # variance conv(x**2, k_scale**2) + b_scale**2. Few outputs (8 to
        # 18), so that 4 standard errors hold for all of them.
        n = 2000
        layer = CONVOLUTIONS[rank](2, KERNEL_SIZES[rank], estimator=estimator, seed=6)
        x = CONV_INPUTS[rank][:1]
        layer.build(x.shape)
        spread_posterior(layer)
        k_loc, k_scale, b_loc, b_scale = numpy_posterior(layer)
        mean = numpy_conv(x.astype(np.float64), k_loc) + b_loc
        var = numpy_conv(x.astype(np.float64) ** 2, k_scale**2) + b_scale**2
        assert_moments(repeated_outputs(layer, x, n), mean, var)

    @pytest.mark.parametrize("estimator", ESTIMATORS)
    def test_inputs_of_rank_three(self, estimator):
        # Flipout signs are drawn per example, shared along the middle axis.
        layer = BayesianDense(2, estimator=estimator, seed=0)
        x = np.stack([X, 2 * X], axis=1)  # (3, 2, 4)
        assert tuple(layer(x, training=True).shape) == (3, 2, 2)
        k_loc, _, b_loc, _ = numpy_posterior(layer)
        np.testing.assert_allclose(h.numpy(layer(x)), x @ k_loc + b_loc, rtol=1e-5, atol=1e-6)

    def test_local_reparameterization_gradient_is_finite_for_a_zero_input(self):
        # Without a bias, a zero input row has pre-activation variance 0,
        # where sqrt's derivative is infinite: its gradient must still be
        # finite (zero: that output does not depend on the scales).
        layer = BayesianDense(2, use_bias=False, estimator="local_reparameterization", seed=0)
        layer.build((None, 3))
        x = np.array([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]], "float32")
        grads = h.weight_gradients(
            lambda: keras.ops.sum(layer(x, training=True)), layer.trainable_variables
        )
        assert all(np.all(np.isfinite(g)) for g in grads), grads
        assert np.any(grads[1] != 0)

    def test_layers_given_neighbouring_seeds_draw_independent_noise(self):
        # Keras's PyTorch backend seeds each draw with the sum of the two
        # words of the SeedGenerator's state, (seed, counter): layers given
        # seeds s and s + 1 would draw the same weights one call apart (and
        # correlated noise across a network built with seeds 0, 1, 2, ...)
        # unless the library spreads the seeds it gives Keras.
        calls = 3
        outputs = []
        for seed in (0, 1):
            layer = BayesianDense(3, seed=seed)
            layer.build((None, 4))
            spread_posterior(layer)  # the same q(w) for both layers
            x = np.ones((1, 4), "float32")
            outputs.append([h.numpy(layer(x, training=True)) for _ in range(calls)])
        for i in range(calls):
            for j in range(calls):
                assert not np.allclose(outputs[0][i], outputs[1][j]), (i, j)

    @pytest.mark.parametrize("estimator", DENSE_ESTIMATORS)
    @pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
    def test_mixed_precision_computes_in_half_and_kl_in_float32(self, policy, estimator):
        layer = BayesianDense(3, dtype=policy, estimator=estimator, seed=0)
        out = layer(X, training=True)
        dtype = keras.backend.standardize_dtype
        assert dtype(out.dtype) == policy[6:] and dtype(layer.losses[0].dtype) == "float32"
        assert all(w.dtype == "float32" for w in layer.weights)


class TestGradients:
    @pytest.mark.parametrize("estimator", ESTIMATORS)
    def test_gradients_match_closed_form_for_the_drawn_noise(self, estimator):
        # For a linear layer and L = sum(c * y), given the call's noise,
        #   y[n, j] = (x @ k_loc + b_loc)[n, j] + p[n, j],
        #   p[n, j] = sum_i x[n, i] A[n, i, j] + B[n, j],
        # A = s_in s_out * k_scale * eps_k, B = s_out * b_scale * eps_b
        # (all signs 1 for "reparameterization"). So
        #   dL/dk_loc = x.T @ c,  dL/db_loc = sum_n c[n],
        #   dL/dk_raw[i, j] = sigmoid(k_raw) * sum_n c[n, j] x[n, i] A[n, i, j] / k_scale,
        #   dL/db_raw[j] = sigmoid(b_raw) * sum_n c[n, j] B[n, j] / b_scale.
        # A and B are read back from layers built with the same seed and
        # called on probe batches of the same size (the first call of a
        # layer with a given seed draws the same noise): zeros give B, rows
        # e_i give A[:, i] + B.
        rows, inputs, units = 5, 4, 3
        rng = np.random.default_rng(7)
        x = rng.normal(size=(rows, inputs)).astype("float32")
        c = rng.normal(size=(rows, units))

        def fresh_layer():
            layer = BayesianDense(units, estimator=estimator, seed=11)
            layer.build((None, inputs))
            spread_posterior(layer, seed=3)
            return layer

        layer = fresh_layer()
        k_loc, k_scale, b_loc, b_scale = numpy_posterior(layer)

        def perturbation(batch):
            out = h.numpy(fresh_layer()(batch, training=True))
            return out - (batch.astype(np.float64) @ k_loc + b_loc)

        bias_part = perturbation(np.zeros((rows, inputs), "float32"))
        kernel_part = np.stack(
            [
                perturbation(np.tile(np.eye(inputs, dtype="float32")[i], (rows, 1))) - bias_part
                for i in range(inputs)
            ],
            axis=1,
        )  # (rows, inputs, units)
        # q(w)'s variables, flat over the kernel (row-major) then the bias.
        variables = [layer.weight_posterior.loc, layer.weight_posterior.raw_scale]
        assert variables == layer.trainable_variables
        # The layer's first call, made statelessly (with its seed generator's
        # initial state) so that each backend's autodiff can differentiate it.
        state = [keras.ops.convert_to_numpy(v) for v in layer.non_trainable_variables]

        def output(*weights):
            return layer.stateless_call(list(weights), state, x, training=True)[0]

        y = h.numpy(output(*(v.value for v in variables)))
        grads = h.gradients(
            lambda *weights: keras.ops.convert_to_tensor(c, "float32") * output(*weights),
            *(h.numpy(v).astype("float32") for v in variables),
        )
        # The read-back noise is this call's noise.
        np.testing.assert_allclose(
            y - (x.astype(np.float64) @ k_loc + b_loc),
            np.einsum("ni,nij->nj", x, kernel_part) + bias_part,
            atol=1e-5,
        )
        if estimator == "reparameterization":  # one sample shared by the rows
            np.testing.assert_allclose(kernel_part, kernel_part[:1].repeat(rows, 0), atol=1e-5)
        raw = h.numpy(variables[1])
        k_raw, b_raw = raw[: inputs * units].reshape(inputs, units), raw[inputs * units :]
        expected = [
            flat(x.T.astype(np.float64) @ c, c.sum(0)),
            flat(
                expit(k_raw) * np.einsum("nj,ni,nij->ij", c, x, kernel_part) / k_scale,
                expit(b_raw) * np.sum(c * bias_part, axis=0) / b_scale,
            ),
        ]
        for grad, value, variable in zip(grads, expected, variables, strict=True):
            np.testing.assert_allclose(grad, value, rtol=1e-4, atol=1e-5, err_msg=variable.name)


class TestConv:
    @pytest.mark.parametrize(
        "padding, strides", [("valid", 1), ("same", 2)], ids=["valid-1", "same-2"]
    )
    def test_mean_path_is_convolution_with_loc_kernel(self, padding, strides):
        layer = BayesianConv2D(3, 3, strides=strides, padding=padding, seed=0)
        layer.build(IMAGES.shape)
        spread_posterior(layer)
        k_loc, _, b_loc, _ = numpy_posterior(layer)
        expected = numpy_conv(IMAGES.astype(np.float64), k_loc, strides, padding) + b_loc
        np.testing.assert_allclose(
            h.numpy(layer(IMAGES, training=False)), expected, rtol=1e-5, atol=1e-5
        )

    @pytest.mark.parametrize(
        "rank, kwargs",
        [
            (1, {"kernel_size": 3}),
            (1, {"kernel_size": 2, "strides": 2, "padding": "same"}),
            (1, {"kernel_size": 2, "dilation_rate": 2, "padding": "same"}),
            (2, {"kernel_size": (2, 3), "strides": (1, 2)}),
            (3, {"kernel_size": 2}),
            (3, {"kernel_size": (1, 2, 2), "strides": 2, "padding": "same"}),
            (3, {"kernel_size": 2, "dilation_rate": (1, 2, 1), "padding": "same"}),
        ],
        ids=["1d", "1d-same-strided", "1d-dilated", "2d", "3d", "3d-same-strided", "3d-dilated"],
    )
    def test_output_is_convolution_with_the_drawn_weights(self, rank, kwargs):
        # One weight sample (the call's first draw, taken here from the same
        # seed generator state), then a NumPy convolution with that kernel.
        layer = CONVOLUTIONS[rank](3, seed=7, **kwargs)
        x = CONV_INPUTS[rank]
        if rank == 3:
            x = np.concatenate([x, x[:, :1]], axis=1)  # depth 4: strides meet padding
        layer.build(x.shape)
        spread_posterior(layer)
        state = keras.ops.convert_to_numpy(layer.seed_generator.state)
        w = h.numpy(layer.posterior().sample(seed=layer.seed_generator))
        layer.seed_generator.state.assign(state)
        outputs = h.numpy(layer(x, training=True))
        size = int(np.prod(layer.kernel_shape))
        kernel, bias = w[:size].reshape(layer.kernel_shape), w[size:]
        strides, dilation = kwargs.get("strides", 1), kwargs.get("dilation_rate", 1)
        padding = kwargs.get("padding", "valid")
        expected = numpy_conv(x.astype(np.float64), kernel, strides, padding, dilation) + bias
        assert outputs.shape == expected.shape
        np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize(
        "rank, kwargs",
        [
            (1, {"kernel_size": 3, "strides": 2, "padding": "same"}),
            (1, {"kernel_size": 2, "dilation_rate": 2}),
            (3, {"kernel_size": (1, 2, 3), "strides": 2, "padding": "same"}),
            (3, {"kernel_size": 2, "dilation_rate": 2}),
        ],
        ids=["1d-same-strided", "1d-dilated", "3d-same-strided", "3d-dilated"],
    )
    def test_output_shape_agrees_with_keras_conv1d_and_conv3d(self, rank, kwargs):
        x = np.zeros((2, *(7, 6, 5)[:rank], 2), "float32")
        keras_class = {1: keras.layers.Conv1D, 3: keras.layers.Conv3D}[rank]
        expected = keras_class(4, **kwargs).compute_output_shape(x.shape)
        layer = CONVOLUTIONS[rank](4, **kwargs)
        assert tuple(layer(x).shape) == tuple(expected)
        assert layer.compute_output_shape(x.shape) == tuple(expected)
        symbolic = layer(keras.Input(x.shape[1:]))
        assert tuple(symbolic.shape) == (None, *expected[1:])

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"kernel_size": 3},
            {"kernel_size": (2, 3), "strides": 2, "padding": "same"},
            {"kernel_size": 2, "dilation_rate": 2},
        ],
        ids=["valid", "same-strided", "dilated"],
    )
    def test_output_shape_agrees_with_keras_conv2d(self, kwargs):
        x = np.zeros((2, 7, 6, 2), "float32")
        # Keras's declared shape (calling Conv2D would compile on JAX).
        expected = keras.layers.Conv2D(4, **kwargs).compute_output_shape(x.shape)
        layer = BayesianConv2D(4, **kwargs)
        assert tuple(layer(x).shape) == tuple(expected)
        assert layer.compute_output_shape(x.shape) == tuple(expected)
        symbolic = layer(keras.Input((7, 6, 2)))
        assert tuple(symbolic.shape) == (None, *expected[1:])


def small_model(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((5, 5, 2)),
            BayesianConv2D(
                3, 3, activation="relu", prior=ke.NormalPrior(scale=0.5), kl_weight=1 / 32, seed=1
            ),
            keras.layers.Flatten(),
            BayesianDense(
                2, estimator="flipout", prior=ScaleMixturePrior(), kl_weight=1 / 32, seed=2
            ),
        ]
    )
    model.compile(keras.optimizers.Adam(1e-2), ke.GaussianNLL(scale=0.5))
    return model


IMAGE_DATA = np.random.default_rng(1).normal(size=(32, 5, 5, 2)).astype("float32")
TARGETS = np.stack([IMAGE_DATA.mean((1, 2, 3)), IMAGE_DATA[:, 2, 2, 0]], axis=1)


class TestSaveLoad:
    # Slow (two fits): the battery saves and loads every layer on every backend.
    @pytest.mark.slow
    @pytest.mark.parametrize("use_custom_objects", [False, True], ids=["registered", "custom"])
    def test_round_trip(self, use_custom_objects, tmp_path, monkeypatch):
        model = small_model()
        model.fit(IMAGE_DATA, TARGETS, epochs=1, batch_size=16, verbose=0)
        model.layers[-1].kl_regularizer.kl_weight.assign(0.125)  # as a callback would
        loaded = h.save_and_load(model, tmp_path / "m.keras", use_custom_objects, monkeypatch)
        for a, b in zip(model.weights, loaded.weights, strict=True):
            np.testing.assert_array_equal(h.numpy(a), h.numpy(b))
        conv, dense = loaded.layers[0], loaded.layers[-1]
        assert conv.prior.latent_dim == model.layers[0].num_parameters
        assert isinstance(dense.prior, ScaleMixturePrior) and dense.estimator == "flipout"
        assert float(h.numpy(dense.kl_regularizer.kl_weight)) == 0.125
        # inference="mean": predictions are deterministic and must agree.
        np.testing.assert_allclose(
            model.predict(IMAGE_DATA, verbose=0), loaded.predict(IMAGE_DATA, verbose=0), rtol=1e-5
        )
        loaded.fit(IMAGE_DATA, TARGETS, epochs=1, batch_size=16, verbose=0)

    @pytest.mark.parametrize(
        "layer",
        [
            BayesianDense(4, "tanh", use_bias=False, kl_weight=0.5, inference="sample", seed=3),
            BayesianConv2D(2, (3, 2), strides=(1, 2), padding="same", estimator="flipout"),
        ],
        ids=["dense", "conv"],
    )
    def test_config_round_trip(self, layer):
        h.config_round_trip(layer)


def slow_on(*backends):
    """The slow mark on the given backends, no mark on the others."""
    return [pytest.mark.slow] if h.BACKEND in backends else []


class TestFit:
    # Off: a graph on TensorFlow, op by op on JAX (slow, and covered by the
    # eager tests). On: XLA on TensorFlow and JAX, torch.compile on PyTorch
    # (most of a minute of compiling on a CPU).
    @pytest.mark.parametrize(
        "jit_compile",
        [
            pytest.param(False, id="graph", marks=slow_on("jax")),
            pytest.param(True, id="xla", marks=slow_on("torch")),
        ],
    )
    def test_loss_falls(self, jit_compile):
        if jit_compile and h.BACKEND == "torch" and h.KERAS_VERSION < (3, 12):
            # TorchDynamo (PyTorch 2.13) fails on Keras 3.9 to 3.11's loss
            # code ("exception table entry start instruction has no offset",
            # keras/src/trainers/compile_utils.py); Keras 3.12 on compiles.
            pytest.skip("torch.compile of a Keras step needs Keras >= 3.12 (README)")
        model = small_model()
        model.compile(
            keras.optimizers.Adam(1e-2), ke.GaussianNLL(scale=0.5), jit_compile=jit_compile
        )
        losses = model.fit(IMAGE_DATA, TARGETS, epochs=10, batch_size=8, verbose=0).history["loss"]
        assert np.all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3]), losses


class TestErrors:
    @pytest.mark.parametrize(
        "kwargs, argument",
        [
            ({"units": 0}, "units"),
            ({"units": 2.0}, "units"),
            ({"kl_weight": -1.0}, "kl_weight"),
            ({"kl_weight": "1/N"}, "kl_weight"),
            ({"estimator": "local"}, "estimator"),
            ({"kl_mode": "exact"}, "kl_mode"),
            ({"posterior": ke.NormalPrior()}, "posterior"),
            ({"inference": "mode"}, "inference"),
            ({"posterior_scale_init": 0.0}, "posterior_scale_init"),
            ({"prior": "normal"}, "prior"),
            ({"prior": distributions.Normal(0.0, 1.0)}, "prior"),
            ({"use_bias": 1}, "use_bias"),
            ({"seed": 1.5}, "seed"),
        ],
        ids=lambda v: str(v),
    )
    def test_dense_bad_argument_names_it(self, kwargs, argument):
        kwargs = {"units": 2, **kwargs}
        with pytest.raises(ValueError, match=f"`{argument}`"):
            BayesianDense(**kwargs)

    @pytest.mark.parametrize(
        "kwargs, argument",
        [
            ({"filters": 0}, "filters"),
            ({"kernel_size": (3,)}, "kernel_size"),
            ({"strides": 0}, "strides"),
            ({"padding": "causal"}, "padding"),
            ({"dilation_rate": (1, -1)}, "dilation_rate"),
            ({"estimator": "local"}, "estimator"),
        ],
        ids=lambda v: str(v),
    )
    def test_conv_bad_argument_names_it(self, kwargs, argument):
        kwargs = {"filters": 2, "kernel_size": 3, **kwargs}
        with pytest.raises(ValueError, match=f"`{argument}`"):
            BayesianConv2D(**kwargs)

    @pytest.mark.parametrize("rank", [1, 3], ids=["1d", "3d"])
    def test_conv_bad_argument_names_it_in_every_rank(self, rank):
        with pytest.raises(ValueError, match="`kernel_size`"):
            CONVOLUTIONS[rank](2, (3,) * (rank + 1))
        with pytest.raises(ValueError, match="`strides`"):
            CONVOLUTIONS[rank](2, 3, strides=(2,) * (rank - 1) + (0,))
        # Strided and dilated at once: keras.ops.conv refuses it at the first
        # call; the constructor says so, as keras.layers.Conv*D does.
        with pytest.raises(ValueError, match="`dilation_rate`.*strides"):
            CONVOLUTIONS[rank](2, 2, strides=2, dilation_rate=2)

    @pytest.mark.parametrize("rank", [1, 2, 3], ids=["1d", "2d", "3d"])
    def test_conv_refuses_local_reparameterization(self, rank):
        with pytest.raises(ValueError, match="`estimator`.*local reparameterisation is for dense"):
            CONVOLUTIONS[rank](2, 3, estimator="local_reparameterization")

    @pytest.mark.parametrize(
        "rank, shape",
        [(1, (5, 5, 2)), (1, (5,)), (3, (5, 5, 2)), (3, (2, 3, 3, 3, 2))],
        ids=["1d-image", "1d-flat", "3d-image", "3d-rank-6"],
    )
    def test_conv_input_of_another_rank_names_the_expected_shape(self, rank, shape):
        expected = {1: r"rank 3, shape \(batch, steps, channels\)", 3: "rank 5"}[rank]
        with pytest.raises(ValueError, match=expected):
            CONVOLUTIONS[rank](2, 2)(keras.Input(shape))

    def test_local_reparameterization_refuses_inputs_of_rank_three(self):
        layer = BayesianDense(2, estimator="local_reparameterization")
        with pytest.raises(ValueError, match="local_reparameterization.*Use estimator='flipout'"):
            layer(np.zeros((3, 2, 4), "float32"))

    def test_prior_of_another_size_fails_at_model_construction(self):
        layer = BayesianDense(3, prior=ke.NormalPrior(7))
        with pytest.raises(ValueError, match=r"event shape \(7,\).*\(15,\)"):
            keras.Sequential([keras.Input((4,)), layer])

    def test_analytic_mode_is_not_forced_on_a_mixture_prior(self):
        # The layer's regularizer uses mode="auto": Monte Carlo, no error.
        layer = BayesianDense(3, prior=ScaleMixturePrior())
        layer(X, training=True)
        assert np.isfinite(float(h.numpy(layer.losses[0])))


def gap_regression(seed, n=1024, noise=0.1, steps=4000, batch_size=32):
    """A Bayesian MLP fitted to y = sin(3x) + noise, x in [-2, -0.5] U [0.5, 2]."""
    rng = np.random.default_rng(seed)
    x = (rng.uniform(0.5, 2.0, n) * rng.choice([-1.0, 1.0], n))[:, None].astype("float32")
    y = (np.sin(3 * x) + noise * rng.normal(size=x.shape)).astype("float32")
    keras.utils.set_random_seed(seed)
    layers = [BayesianDense(32, "relu", kl_weight=1 / n, seed=10 * seed + i) for i in range(3)]
    model = keras.Sequential(
        [keras.Input((1,)), *layers, BayesianDense(1, kl_weight=1 / n, seed=10 * seed + 9)]
    )
    model.compile(
        keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-2, steps)),
        ke.GaussianNLL(scale=noise),
        # The model is tiny: amortise Keras's per-step work (PyTorch takes one
        # step per execution, and torch.compile takes minutes on a CPU).
        jit_compile=h.BACKEND != "torch",
        steps_per_execution=1 if h.BACKEND == "torch" else 16,
    )
    model.fit(x, y, epochs=steps * batch_size // n, batch_size=batch_size, verbose=0)
    return model


@pytest.mark.slow
class TestAcceptance:
    def test_predictive_stddev_is_larger_in_the_gap_of_the_data(self):
        # The acceptance test. With kl_weight = 1 / N the posterior
        # is the Bayesian one for this data set: weights the data pin down
        # are certain, the others keep the prior's spread, which shows in the
        # gap. Mean-field posteriors are known to be weak at such in-between
        # uncertainty (Foong et al., 2019): a 3-hidden-layer network is used,
        # trained to convergence. Gap / inside ratio measured over seeds
        # (keras.random draws, 2026-11-25): TensorFlow 1.6 to 4.6, JAX 1.0 to
        # 3.8 (seeds 0-15; PyTorch 2.0 at seed 0, see
        # test_layers_given_neighbouring_seeds_draw_independent_noise); with
        # TensorFlow's Box-Muller normals (2026-12-04) seed 0 gives 1.97 and
        # seeds 1-8 2.86 to 4.29. A ratio of 1.5, not 2, is asserted: the
        # widening, without failing on one seed in ten.
        model = gap_regression(seed=0)
        inside = np.concatenate([np.linspace(-1.65, -0.85, 5), np.linspace(0.85, 1.65, 5)])
        grid = np.concatenate([inside, [0.0]])[:, None].astype("float32")
        moments = predictive_moments(model, grid, num_samples=200)
        mean, stddev = moments["mean"][:, 0], moments["stddev"][:, 0]
        # The fit is good where there are data ...
        assert np.sqrt(np.mean((mean[:-1] - np.sin(3 * inside)) ** 2)) < 0.1, mean
        # ... and the model knows that it does not know in the gap.
        assert stddev[-1] >= 1.5 * stddev[:-1].mean(), stddev
        assert all(layer.inference == "mean" for layer in model.layers)
