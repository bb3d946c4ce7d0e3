"""predictive_moments: moments against known predictive distributions."""

import keras
import numpy as np
import pytest

import keras_elbo as ke
from keras_elbo.bayesian import BayesianDense
from keras_elbo.predictive import predictive_moments
from tests import _helpers as h
from tests.test_bayesian import numpy_posterior, spread_posterior

TF_ONLY = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tf.data input: TensorFlow backend"
)
X = np.random.default_rng(0).normal(size=(7, 4)).astype("float32")
U = 2.0**-24  # float32 unit round-off


def dense_reference(layer, x):
    """A Dense layer's output in float64, and a bound on its float32 error:
    each output is a sum of n + 1 terms (n inputs times kernel, and the
    bias), off by at most (n + 2) * U times the sum of their magnitudes."""
    kernel, bias = (w.astype(np.float64) for w in layer.get_weights())
    x = np.asarray(x, np.float64)
    bound = (x.shape[-1] + 2) * U * (np.abs(x) @ np.abs(kernel) + np.abs(bias))
    return x @ kernel + bias, bound


def numpy_entropy(p):
    return -np.sum(p * np.log(p), axis=-1)


def assert_gaussian_moments(moments, mean, var, n):
    """Sample mean and variance of n draws agree with the Gaussian's."""
    assert np.all(np.abs(moments["mean"] - mean) < 4.5 * np.sqrt(var / n))
    sample_var = moments["stddev"] ** 2
    assert np.all(np.abs(sample_var - var) < 4.5 * var * np.sqrt(2 / (n - 1)))


class TestRegression:
    @pytest.mark.parametrize("estimator", ["reparameterization", "flipout"])
    def test_bayesian_dense_moments_match_closed_form(self, estimator):
        # A linear layer's output over q(w) is Gaussian: mean x @ m + b_m,
        # variance x**2 @ s**2 + s_b**2. inference="mean" must not stop the
        # sampling, and batches of 4 and 3 must join up in order.
        n = 1000
        layer = BayesianDense(2, estimator=estimator, inference="mean", seed=0)
        model = keras.Sequential([keras.Input((4,)), layer])
        spread_posterior(layer)
        k_loc, k_scale, b_loc, b_scale = numpy_posterior(layer)
        moments = predictive_moments(model, X, num_samples=n, batch_size=4)
        assert set(moments) == {"mean", "stddev"} and moments["mean"].shape == (7, 2)
        var = X.astype(np.float64) ** 2 @ k_scale**2 + b_scale**2
        assert_gaussian_moments(moments, X @ k_loc + b_loc, var, n)
        assert layer.inference == "mean"

    def test_vectorised_latent_samples_match_the_posterior(self):
        # Only a posterior layer (independent samples per example): the
        # passes are one tiled call; the moments are q(z|x)'s.
        n = 2000
        posterior = ke.GaussianPosterior(3, inference="mean", seed=1)
        model = keras.Sequential([keras.Input((4,)), posterior])
        moments = predictive_moments(model, X, num_samples=n)
        w, b = (h.numpy(v) for v in posterior.projection.weights)
        params = X @ w + b
        scale = h.softplus(params[:, 3:]) + posterior.min_scale
        assert_gaussian_moments(moments, params[:, :3], scale**2, n)
        assert posterior.inference == "mean"

    def test_deterministic_model_has_zero_spread(self):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        moments = predictive_moments(model, X, num_samples=3)
        expected, bound = dense_reference(model.layers[0], X)
        assert np.all(np.abs(moments["mean"] - expected) <= bound)
        # Three identical passes: no spread at all.
        np.testing.assert_array_equal(moments["stddev"], 0.0)


def dataset(slices):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(slices)


def dataset_of(structure, batch=3):
    """X as a batched tf.data.Dataset whose elements are `structure`."""
    y, w = np.ones((len(X), 1), "float32"), np.ones(len(X), "float32")
    slices = {"x": X, "(x,)": (X,), "(x, y)": (X, y), "(x, y, w)": (X, y, w)}[structure]
    return dataset(slices).batch(batch)


class TestInputs:
    @TF_ONLY
    @pytest.mark.parametrize("structure", ["x", "(x,)", "(x, y)", "(x, y, w)"])
    def test_batched_dataset_uses_x(self, structure):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        moments = predictive_moments(model, dataset_of(structure), num_samples=2)
        expected, bound = dense_reference(model.layers[0], X)
        assert moments["mean"].shape == (7, 2)
        assert np.all(np.abs(moments["mean"] - expected) <= bound)

    @TF_ONLY
    def test_float64_dataset_through_vectorised_posterior(self):
        # Tiled passes over batches of 3, 3 and 1: the posterior's samples
        # have its moments; checked as in TestRegression.
        n = 2000
        posterior = ke.GaussianPosterior(3, seed=1)
        model = keras.Sequential([keras.Input((4,)), posterior])
        data = dataset(X.astype("float64")).batch(3)
        moments = predictive_moments(model, data, num_samples=n)
        w, b = (h.numpy(v) for v in posterior.projection.weights)
        params = X @ w + b
        scale = h.softplus(params[:, 3:]) + posterior.min_scale
        assert_gaussian_moments(moments, params[:, :3], scale**2, n)

    @pytest.mark.parametrize("form", ["pydataset", "generator", "torch_dataloader"])
    def test_batches_as_model_evaluate_takes_them(self, form):
        # Issue 17, point 15: on every backend, what Model.evaluate takes.
        y = np.ones((len(X), 1), "float32")
        if form == "pydataset":

            class Batches(keras.utils.PyDataset):
                def __len__(self):
                    return 3

                def __getitem__(self, i):
                    return X[3 * i : 3 * i + 3], y[3 * i : 3 * i + 3]

            data = Batches()
        elif form == "generator":
            data = (X[i : i + 3] for i in range(0, len(X), 3))
        else:
            torch = pytest.importorskip("torch")
            tensors = torch.utils.data.TensorDataset(torch.tensor(X), torch.tensor(y))
            data = torch.utils.data.DataLoader(tensors, batch_size=3)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        moments = predictive_moments(model, data, num_samples=2)
        expected, bound = dense_reference(model.layers[0], X)
        assert moments["mean"].shape == (7, 2)
        assert np.all(np.abs(moments["mean"] - expected) <= bound)

    def test_generator_of_single_examples_is_refused(self):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        with pytest.raises(ValueError, match=r"`x`.*batches.*single example of shape \(4,\)"):
            predictive_moments(model, (row for row in X), num_samples=2)

    @TF_ONLY
    def test_unbatched_dataset_is_refused(self):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        data = dataset(X)
        with pytest.raises(ValueError, match=r"`x`.*dataset\.batch"):
            predictive_moments(model, data, num_samples=2)

    @pytest.mark.parametrize(
        "x",
        [
            pytest.param(lambda: np.zeros((0, 4), "float32"), id="array"),
            pytest.param(lambda: [], id="list"),
            pytest.param(
                lambda: dataset(np.zeros((0, 4), "float32")).batch(2), id="dataset", marks=TF_ONLY
            ),
            # Of unknown length: found empty only when read.
            pytest.param(
                lambda: dataset(X).filter(lambda x: False).batch(2),
                id="filtered-dataset",
                marks=TF_ONLY,
            ),
        ],
    )
    def test_empty_input_is_refused(self, x):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        with pytest.raises(ValueError, match="`x`. Expected at least one example"):
            predictive_moments(model, x(), num_samples=2)


class Alternating(keras.layers.Layer):
    """Outputs the rows of `table` in turn, one per call, when sampling.

    A stand-in for a stochastic layer whose passes are known exactly: it has
    an `inference` switch and refuses to run unless it is set to "sample".
    """

    def __init__(self, table, **kwargs):
        super().__init__(**kwargs)
        self.table = np.asarray(table, "float32")
        self.inference = "mean"
        self.calls = self.add_weight(shape=(), initializer="zeros", trainable=False, dtype="int32")

    def call(self, inputs):
        if self.inference != "sample":
            raise AssertionError("predictive_moments did not switch inference to 'sample'")
        row = keras.ops.take(self.table, self.calls % len(self.table), axis=0)
        self.calls.assign_add(1)
        return keras.ops.zeros_like(inputs[:, :1]) + row

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.table.shape[-1])


PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])


class TestClassification:
    def test_entropy_and_mutual_information_of_known_passes(self):
        # Two passes with known probabilities: exact mean, entropy and
        # mutual information = H[mean p] - mean H[p].
        model = keras.Sequential([keras.Input((4,)), Alternating(PROBS)])
        moments = predictive_moments(model, X, num_samples=2, task="classification")
        # The table passes through float32 (relative round-off U = 6e-8);
        # the rest is float64. The mutual information, a difference of
        # entropies of about 0.9 and 0.7, loses a factor 0.9 / 0.2 more.
        mean = PROBS.mean(axis=0)
        np.testing.assert_allclose(moments["probabilities"], np.tile(mean, (7, 1)), rtol=1e-6)
        np.testing.assert_allclose(moments["entropy"], numpy_entropy(mean), rtol=1e-6)
        mutual_information = numpy_entropy(mean) - numpy_entropy(PROBS).mean()
        np.testing.assert_allclose(moments["mutual_information"], mutual_information, rtol=1e-5)
        assert model.layers[0].inference == "mean"

    @pytest.mark.parametrize(
        "activation, from_logits", [("softmax", False), (None, True)], ids=["probs", "logits"]
    )
    def test_entropy_of_a_fixed_softmax_output(self, activation, from_logits):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation)])
        moments = predictive_moments(
            model, X, num_samples=2, task="classification", from_logits=from_logits
        )
        logits, bound = dense_reference(model.layers[0], X)
        p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        # A softmax's relative error is at most twice its logits' absolute
        # error, plus a few U; entropies of about 1 nat, (1 + 1 / H) times
        # that. Both stay below 1e-5 while the logits' bound is below 2e-6.
        assert bound.max() < 2e-6
        np.testing.assert_allclose(moments["probabilities"], p, rtol=1e-5)
        np.testing.assert_allclose(moments["entropy"], numpy_entropy(p), rtol=1e-5)
        # Two passes of one deterministic model: no mutual information. They
        # run as one call on a tiled batch, and a CPU's matmul may round rows
        # differently (up to the logits' bound above); mutual information is
        # a Jensen gap, quadratic in those differences: below 1e-10.
        np.testing.assert_allclose(moments["mutual_information"], 0.0, atol=1e-10)

    def test_single_sigmoid_output_is_bernoulli(self):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, "sigmoid")])
        moments = predictive_moments(model, X, num_samples=2, task="classification")
        logits, bound = dense_reference(model.layers[0], X)
        p = 1.0 / (1.0 + np.exp(-logits[:, 0]))
        # As for the softmax above: a logit error below 2e-6.
        assert bound.max() < 2e-6
        np.testing.assert_allclose(
            moments["entropy"], -(p * np.log(p) + (1 - p) * np.log(1 - p)), rtol=1e-5
        )


class TestNotProbabilities:
    @pytest.mark.parametrize(
        "table, shown",
        [
            ([[2.0, -1.0, 0.5]], "values from -1 to 2"),  # softmax logits
            ([[1.7]], "values from 1.7 to 1.7"),  # a sigmoid's logit
            ([[0.3, 0.3, 0.401]], "sum to 1 \\+- 0.001"),  # in [0, 1], sum 1.001
            ([[0.9, 0.8]], "sum to 1 \\+- 0.7"),  # one sigmoid per class
        ],
        ids=["logits", "logit", "sum-1.001", "sigmoids"],
    )
    def test_outputs_that_are_not_probabilities_raise(self, table, shown):
        model = keras.Sequential([keras.Input((4,)), Alternating(table)])
        with pytest.raises(ValueError, match=shown) as info:
            predictive_moments(model, X, num_samples=2, task="classification")
        assert "add a softmax" in str(info.value) and "from_logits=True" in str(info.value)
        assert model.layers[0].inference == "mean"

    def test_float32_softmax_of_many_classes_is_accepted(self):
        # 1000 classes, logits of spread 30: the float32 softmax's rows sum
        # to 1 only within its round-off, which the check allows.
        init = keras.initializers.RandomNormal(stddev=15.0, seed=0)
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(1000, kernel_initializer=init),
                keras.layers.Softmax(),
            ]
        )
        moments = predictive_moments(model, X, num_samples=2, task="classification")
        assert moments["probabilities"].shape == (7, 1000)


class TestRestore:
    def test_inference_is_restored_after_an_error(self):
        x = keras.Input((4,))
        layer = BayesianDense(2, inference="mean")
        posterior = ke.GaussianPosterior(2, inference="mean")
        model = keras.Model(x, [layer(x), posterior(x)])  # two outputs: refused
        with pytest.raises(ValueError, match="single tensor output"):
            predictive_moments(model, X, num_samples=2)
        assert layer.inference == posterior.inference == "mean"

    def test_nested_layers_are_switched_and_restored(self):
        inner = keras.Sequential([keras.Input((4,)), BayesianDense(3, inference="mean")])
        model = keras.Sequential([keras.Input((4,)), inner, keras.layers.Dense(1)])
        moments = predictive_moments(model, X, num_samples=5)
        assert np.all(moments["stddev"] > 0)
        assert inner.layers[0].inference == "mean"

    @pytest.mark.parametrize("predict_before", [False, True], ids=["after", "before-and-after"])
    def test_model_predict_still_gives_the_mean(self, predict_before):
        # The passes run in a function of their own: the model's predict
        # function (cached or not) still sees inference="mean".
        posterior = ke.GaussianPosterior(3, inference="mean", seed=1)
        model = keras.Sequential([keras.Input((4,)), posterior])
        params, bound = dense_reference(posterior.projection, X)
        mean, bound = params[:, :3], bound[:, :3]
        if predict_before:
            assert np.all(np.abs(model.predict(X, verbose=0) - mean) <= bound)
        moments = predictive_moments(model, X, num_samples=3)
        assert np.all(moments["stddev"] > 0)
        assert np.all(np.abs(model.predict(X, verbose=0) - mean) <= bound)


class TestErrors:
    @pytest.mark.parametrize(
        "kwargs, argument",
        [
            ({"num_samples": 1}, "num_samples"),
            ({"num_samples": 10.0}, "num_samples"),
            ({"task": "ranking"}, "task"),
            ({"batch_size": 0}, "batch_size"),
            ({"from_logits": "yes"}, "from_logits"),
            ({"x": np.zeros((0, 4))}, "x"),
            ({"model": "model"}, "model"),
        ],
        ids=lambda v: str(v),
    )
    def test_bad_argument_names_it(self, kwargs, argument):
        model = keras.Sequential([keras.Input((4,)), BayesianDense(1)])
        kwargs = {"model": model, "x": X, **kwargs}
        with pytest.raises(ValueError, match=f"`{argument}`"):
            predictive_moments(**kwargs)
