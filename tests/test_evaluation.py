"""ELBO and importance-weighted log p(x) on a linear Gaussian latent model.

p(z) = N(0, I), p(x|z) = N(z @ K + b, sigma**2 I): the marginal
p(x) = N(b, K.T @ K + sigma**2 I), the exact posterior p(z|x), the ELBO of a
Gaussian q and the moments of the importance weights are closed forms,
computed here in NumPy float64. The same model applied at every position of
a latent map (a sequence, an image) makes positions independent: the
example's reference is the sum of its positions'.
"""

import logging
import math

import keras
import numpy as np
import pytest

import keras_elbo as ke
from tests import _helpers as h

BACKEND = keras.backend.backend()
TF_ONLY = pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.data input: TensorFlow backend")

D, LATENT, SIGMA, MIN_SCALE = 5, 2, 0.5, 1e-6
RNG = np.random.default_rng(0)
K_DEC = RNG.normal(size=(LATENT, D))
B_DEC = RNG.normal(size=D)
X = RNG.multivariate_normal(B_DEC, K_DEC.T @ K_DEC + SIGMA**2 * np.eye(D), size=40)
# The 40 rows of X as examples of one position, or as 10 examples of 4
# positions (a latent map of batch shape (batch, 4) or (batch, 2, 2)).
LAYOUTS = {"vector": (), "sequence": (4,), "image": (2, 2)}
# float32 rounding: each log-density (tens of nats) carries ~1e-6 relative
# error; with a margin for sums over samples and positions.
FLOAT32_TOL = dict(rtol=1e-4, atol=1e-4)


def as_examples(rows, positions):
    """Rows of X (one per position) grouped into examples of shape `(*positions, D)`."""
    return rows.reshape(-1, *positions, *rows.shape[1:])


def per_example(values, positions):
    """A reference per row summed over the positions of each example."""
    return values.reshape(-1, math.prod(positions)).sum(axis=1)


def exact_posterior():
    """The exact p(z|x) = N((x - b) @ A, cov) of the linear Gaussian model."""
    cov = np.linalg.inv(np.eye(LATENT) + K_DEC @ K_DEC.T / SIGMA**2)
    return K_DEC.T @ cov / SIGMA**2, cov


def fill_triangular_inverse(tril):
    """The values TFP's `fill_triangular` places into the lower triangle
    `tril` (d, d): TFP's own algorithm (`fill_triangular_inverse`), in NumPy.
    The last row, reversed, then the other rows plus their 180-degree
    rotation, read row by row."""
    d = len(tril)
    rest = tril[:-1] + tril[:-1][::-1, ::-1]
    return np.concatenate([tril[-1][::-1], rest.reshape(-1)[: d * (d + 1) // 2 - d]])


def make_model(positions=(), covariance="diag", loc_shift=0.0, scale_factor=1.0):
    """The linear Gaussian model at each position, with a Gaussian q(z|x).

    `covariance="full"`: q is the exact posterior. `"diag"`: q has the exact
    posterior's marginal scales times `scale_factor` and its location plus
    `loc_shift`. The decoder is a 1x1 convolution on images, so it takes
    latents of shape `(batch, h, w, LATENT)` only.

    Returns:
        The model, q's location for each row of X `(40, LATENT)` and q's
        covariance `(LATENT, LATENT)`.
    """
    x = keras.Input((*positions, D))
    posterior = ke.GaussianPosterior(
        LATENT,
        covariance=covariance,
        kl_regularizer=ke.KLRegularizer(),
        min_scale=MIN_SCALE,
        seed=0,
    )
    decoder = keras.layers.Conv2D(D, 1) if len(positions) == 2 else keras.layers.Dense(D)
    model = keras.Model(x, decoder(posterior(x)))
    model.compile(loss=ke.GaussianNLL(scale=SIGMA))
    a, cov = exact_posterior()
    if covariance == "diag":
        scale = np.sqrt(np.diag(cov)) * scale_factor
        raw = np.log(np.expm1(scale - MIN_SCALE))
        cov = np.diag(scale**2)
    else:
        raw_tril = np.linalg.cholesky(cov)
        np.fill_diagonal(raw_tril, np.log(np.expm1(np.diag(raw_tril) - MIN_SCALE)))
        # The layer's layout of the triangle's entries is TFP's fill_triangular.
        raw = fill_triangular_inverse(raw_tril)
    kernel = np.concatenate([a, np.zeros((D, raw.size))], axis=1)
    posterior.projection.set_weights([kernel, np.concatenate([-B_DEC @ a + loc_shift, raw])])
    decoder.set_weights([K_DEC.reshape(decoder.kernel.shape), B_DEC])
    return model, (X - B_DEC) @ a + loc_shift, cov


def true_log_px():
    """log p(x) of each row of X."""
    cov = K_DEC.T @ K_DEC + SIGMA**2 * np.eye(D)
    diff = X - B_DEC
    _, logdet = np.linalg.slogdet(cov)
    maha = np.einsum("nd,de,ne->n", diff, np.linalg.inv(cov), diff)
    return -0.5 * (maha + logdet + D * np.log(2 * np.pi))


def expected_log_lik(loc, cov, target=X):
    """E_q[log p(target|z)] per row, for q = N(loc, cov)."""
    residual = target - (loc @ K_DEC + B_DEC)
    trace = np.trace(K_DEC.T @ cov @ K_DEC)
    return -0.5 * (
        (np.sum(residual**2, axis=1) + trace) / SIGMA**2 + D * np.log(2 * np.pi * SIGMA**2)
    )


def log_lik_variance(loc, cov, target=X):
    """Var_q[log p(target|z)] per row.

    log p = -|r - u|**2 / (2 sigma**2) + c with r = target - loc @ K - b and
    u = (z - loc) @ K ~ N(0, M), M = K.T @ cov @ K; for a Gaussian u,
    Var(|r - u|**2) = 2 tr(M @ M) + 4 r @ M @ r.
    """
    residual = target - (loc @ K_DEC + B_DEC)
    m = K_DEC.T @ cov @ K_DEC
    quad = np.einsum("nd,de,ne->n", residual, m, residual)
    return (2 * np.trace(m @ m) + 4 * quad) / (4 * SIGMA**4)


def kl_to_prior(loc, cov):
    """KL[N(loc, cov) || N(0, I)] per row."""
    return h.kl_full_normal(loc, np.linalg.cholesky(cov))


def log_ratio_moments(loc, cov):
    """Moments under q of r = p(z|x) / q(z|x) = w / p(x), per row.

    Returns `(var_log_r, rel_var)`: Var_q[log r], the variance of a
    one-sample log-weight, and E_q[r**2] - 1 = Var[w] / E[w]**2, the
    relative variance of the weights.

    With z = loc + L e (L L.T = cov, e ~ N(0, I)), m, C the exact posterior
    and d = loc - m: log r = -e.T (G - I) e / 2 - d.T C^-1 L e + const,
    G = L.T C^-1 L, so Var[log r] = tr((G - I)**2) / 2 + d.T C^-1 cov C^-1 d.
    E_q[r**2] = int N(z; m, C)**2 / q(z) dz, with N(z; m, C)**2 =
    N(z; m, C/2) / sqrt((4 pi)**d |C|), and for Gaussians
    int N(z; a, A) / N(z; b, B) dz = sqrt((2 pi)**d |B| / (|A| |P|))
    * exp(g.T P^-1 g / 2 - (a.T A^-1 a - b.T B^-1 b) / 2),
    P = A^-1 - B^-1 (positive definite here), g = A^-1 a - B^-1 b.
    """
    a, post_cov = exact_posterior()
    m = (X - B_DEC) @ a
    post_inv, q_inv = np.linalg.inv(post_cov), np.linalg.inv(cov)
    tril = np.linalg.cholesky(cov)
    g_minus_i = tril.T @ post_inv @ tril - np.eye(LATENT)
    d = loc - m
    var_log_r = 0.5 * np.trace(g_minus_i @ g_minus_i) + np.einsum(
        "ni,ij,nj->n", d, post_inv @ cov @ post_inv, d
    )
    a_inv = 2 * post_inv  # A = C / 2
    p = a_inv - q_inv
    g = m @ a_inv - loc @ q_inv

    def logdet(matrix):
        return np.linalg.slogdet(matrix)[1]

    def quad(v, matrix):
        return np.einsum("ni,ij,nj->n", v, matrix, v)

    log_integral = 0.5 * (
        LATENT * np.log(2 * np.pi)
        + logdet(cov)
        - logdet(post_cov / 2)
        - logdet(p)
        + quad(g, np.linalg.inv(p))
        - quad(m, a_inv)
        + quad(loc, q_inv)
    )
    log_second_moment = log_integral - 0.5 * (LATENT * np.log(4 * np.pi) + logdet(post_cov))
    return var_log_r, np.expm1(log_second_moment)


def recorded(tensor, values):
    """`tensor`, whose value is appended to the list `values` each time the
    function that computes it runs, compiled (TensorFlow, JAX) or not."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        def record(array):
            values.append(array.copy())
            return array

        out = tf.numpy_function(record, [tensor], tensor.dtype, stateful=True)
        out.set_shape(tensor.shape)
        return out
    if BACKEND == "jax":
        import jax

        jax.debug.callback(lambda array: values.append(np.array(array)), tensor, ordered=True)
        return tensor
    values.append(h.numpy(tensor))  # PyTorch runs eagerly
    return tensor


class TestEvaluateELBO:
    @pytest.mark.parametrize("positions", LAYOUTS.values(), ids=LAYOUTS)
    def test_matches_closed_form_within_standard_error(self, positions):
        model, loc, cov = make_model(positions, loc_shift=0.3, scale_factor=1.5)
        n = 2000
        result = ke.evaluate_elbo(
            model, as_examples(X, positions), num_samples=n, seed=1, verbose=0
        )
        # The KL is analytic: the closed form summed over positions.
        np.testing.assert_allclose(
            result["kl"], per_example(kl_to_prior(loc, cov), positions), **FLOAT32_TOL
        )
        expected = per_example(expected_log_lik(loc, cov) - kl_to_prior(loc, cov), positions)
        # The reconstruction is a mean of n samples of log p(x|z); positions
        # are independent, so their variances add. 5 standard errors: a
        # false failure among 40 rows has probability < 40 * 6e-7.
        std_err = np.sqrt(per_example(log_lik_variance(loc, cov), positions) / n)
        assert np.all(np.abs(result["elbo"] - expected) < 5 * std_err)

    @pytest.mark.parametrize("positions", LAYOUTS.values(), ids=LAYOUTS)
    def test_exact_posterior_gives_log_px(self, positions):
        # With the exact q the ELBO is log p(x); its estimate (analytic KL,
        # sampled reconstruction) is within its standard error of it.
        model, loc, cov = make_model(positions, covariance="full")
        n = 2000
        elbo = ke.evaluate_elbo(model, as_examples(X, positions), num_samples=n, seed=2, verbose=0)
        std_err = np.sqrt(per_example(log_lik_variance(loc, cov), positions) / n)
        assert np.all(np.abs(elbo["elbo"] - per_example(true_log_px(), positions)) < 5 * std_err)


class TestImportanceWeighted:
    @pytest.mark.parametrize("positions", LAYOUTS.values(), ids=LAYOUTS)
    def test_exact_posterior_gives_log_px_without_noise(self, positions):
        # With the exact q, log p(x|z) + log p(z) - log q(z|x) = log p(x) for
        # every z, provided the log-densities are summed over the positions
        # of a latent map: every importance weight is the same, at any K.
        model, _, _ = make_model(positions, covariance="full")
        iwae = ke.importance_weighted_log_likelihood(
            model, as_examples(X, positions), num_samples=7, verbose=0
        )
        np.testing.assert_allclose(iwae, per_example(true_log_px(), positions), **FLOAT32_TOL)

    @pytest.mark.parametrize("positions", LAYOUTS.values(), ids=LAYOUTS)
    def test_one_sample_is_the_elbo_in_expectation(self, positions):
        model, loc, cov = make_model(positions, loc_shift=0.3, scale_factor=1.5)
        runs = 60
        tiled = np.tile(as_examples(X, positions), (runs, *[1] * (len(positions) + 1)))
        estimates = ke.importance_weighted_log_likelihood(
            model, tiled, num_samples=1, batch_size=40, seed=4, verbose=0
        )
        expected = per_example(expected_log_lik(loc, cov) - kl_to_prior(loc, cov), positions)
        # One sample: log w = log p(x) + log r, with Var[log r] in closed
        # form (summed over independent positions); the mean of the
        # runs * n estimates has variance mean(Var) / (runs * n).
        var_log_w = per_example(log_ratio_moments(loc, cov)[0], positions)
        std_err = np.sqrt(np.mean(var_log_w) / len(estimates))
        assert abs(estimates.mean() - expected.mean()) < 4 * std_err

    @pytest.mark.parametrize("max_decoder_batch", [40_000, 400], ids=["one_chunk", "100_chunks"])
    def test_many_samples_reach_log_px_within_standard_error(self, max_decoder_batch):
        # K = 1000 samples of each of the 40 examples, in one batch: one
        # chunk, or 100 chunks of 10 samples. Each chunk must draw new
        # samples (one seed reused would make the estimate that of K = 10).
        model, loc, cov = make_model(loc_shift=0.4, scale_factor=1.4)
        decoded = []

        def likelihood(y_true, y_pred):
            # Records the decoder's outputs z @ K + b: one row per sample
            # (K has full rank, so distinct rows are distinct samples).
            return ke.gaussian_nll(y_true, recorded(y_pred, decoded), scale=SIGMA)

        k = 1000
        estimate = ke.importance_weighted_log_likelihood(
            model,
            X,
            num_samples=k,
            batch_size=40,
            max_decoder_batch=max_decoder_batch,
            likelihood=likelihood,
            seed=3,
            verbose=0,
        )
        decoded = np.concatenate(decoded)
        assert len(decoded) == k * len(X)
        assert len(np.unique(decoded, axis=0)) == k * len(X)
        # Delta method, rel_var = Var[w] / E[w]**2 (finite: q is wider than
        # the posterior): log(mean of K weights) has mean
        # log p(x) - rel_var / (2K) and variance rel_var / K; the mean over
        # the 40 independent examples has variance mean(rel_var) / (40 K).
        # Here rel_var = 2.8: the bias is 0.0014 at K = 1000 but 0.14 at
        # K = 10, far beyond the tolerance 4 * 0.0084.
        rel_var = log_ratio_moments(loc, cov)[1]
        bias = np.mean(rel_var) / (2 * k)
        std_err = np.sqrt(np.mean(rel_var) / (k * len(X)))
        assert abs(np.mean(estimate - true_log_px()) + bias) < 4 * std_err


def own_gaussian_nll(flag):
    """A Gaussian NLL of the user's own, marked as a reconstruction loss or not."""

    class OwnGaussianNLL(keras.losses.Loss):
        is_reconstruction_loss = flag

        def call(self, y_true, y_pred):
            squares = keras.ops.sum(keras.ops.square(y_true - y_pred), axis=-1)
            return 0.5 * squares / SIGMA**2 + D * math.log(SIGMA * math.sqrt(2 * math.pi))

    return OwnGaussianNLL()


class TestLikelihood:
    def test_own_loss_marked_as_reconstruction_loss(self):
        model, _, _ = make_model(covariance="full")
        model.compile(loss=own_gaussian_nll(True))
        iwae = ke.importance_weighted_log_likelihood(model, X, num_samples=3, verbose=0)
        np.testing.assert_allclose(iwae, true_log_px(), **FLOAT32_TOL)

    @pytest.mark.parametrize(
        "loss", ["mse", own_gaussian_nll(False)], ids=["keras_mse", "own_unmarked"]
    )
    def test_other_loss_needs_likelihood(self, loss):
        model, _, _ = make_model(covariance="full")
        model.compile(loss=loss)
        with pytest.raises(ValueError, match="likelihood=.*is_reconstruction_loss"):
            ke.importance_weighted_log_likelihood(model, X, num_samples=2, verbose=0)
        estimate = ke.importance_weighted_log_likelihood(
            model, X, num_samples=2, likelihood=ke.GaussianNLL(scale=SIGMA), verbose=0
        )
        np.testing.assert_allclose(estimate, true_log_px(), **FLOAT32_TOL)


def dataset(*arrays):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(arrays if len(arrays) > 1 else arrays[0])


class Batches(keras.utils.PyDataset):
    """A `keras.utils.PyDataset` of `(x, x)` batches of 8 rows."""

    def __init__(self, x):
        super().__init__()
        self.x = x

    def __len__(self):
        return -(-len(self.x) // 8)

    def __getitem__(self, i):
        batch = self.x[8 * i : 8 * (i + 1)]
        return batch, batch


def data_loader(x):
    torch = pytest.importorskip("torch")
    tensors = torch.utils.data.TensorDataset(torch.tensor(x), torch.tensor(x))
    return torch.utils.data.DataLoader(tensors, batch_size=8)


DATA_FORMS = {
    "array": lambda x: x,
    # Issue 17, point 15: what Model.evaluate takes, on every backend.
    "pydataset": Batches,
    "generator": lambda x: (x[i : i + 8] for i in range(0, len(x), 8)),
    "generator_x_y": lambda x: ((x[i : i + 8], x[i : i + 8]) for i in range(0, len(x), 8)),
    "torch_dataloader": data_loader,
    "nested_list": lambda x: x.tolist(),
    "dataset_x": lambda x: dataset(x).batch(8),
    "dataset_x_y": lambda x: dataset(x, x).batch(8),
    "dataset_x_y_weights": lambda x: dataset(x, x, np.ones(len(x))).batch(8),
    "dataset_unknown_length": lambda x: dataset(x).filter(lambda _: True).batch(8),
}


class TestData:
    @pytest.mark.parametrize(
        "form",
        [
            pytest.param(form, id=name, marks=TF_ONLY if name.startswith("dataset") else ())
            for name, form in DATA_FORMS.items()
        ],
    )
    def test_forms_model_evaluate_accepts(self, form):
        # The exact q gives log p(x) without noise and an analytic KL: both
        # known exactly, whatever the form of the data.
        model, loc, cov = make_model(covariance="full")
        iwae = ke.importance_weighted_log_likelihood(model, form(X), num_samples=3, verbose=0)
        np.testing.assert_allclose(iwae, true_log_px(), **FLOAT32_TOL)
        kl = ke.evaluate_elbo(model, form(X), verbose=0)["kl"]
        np.testing.assert_allclose(kl, kl_to_prior(loc, cov), **FLOAT32_TOL)

    @TF_ONLY
    def test_dataset_target_is_y(self):
        # A dataset of (x, y): q(z|x) from x, the likelihood of y.
        model, loc, cov = make_model(loc_shift=0.3, scale_factor=1.5)
        target = X + RNG.normal(size=X.shape)
        n = 2000
        result = ke.evaluate_elbo(
            model, dataset(X, target).batch(16), num_samples=n, seed=7, verbose=0
        )
        expected = -expected_log_lik(loc, cov, target)
        std_err = np.sqrt(log_lik_variance(loc, cov, target) / n)
        assert np.all(np.abs(result["reconstruction"] - expected) < 5 * std_err)

    @pytest.mark.parametrize(
        "data, error, message",
        [
            pytest.param(lambda: X[:0], ValueError, "no examples", id="empty_array"),
            pytest.param(
                lambda: dataset(X[:0]).batch(4),
                ValueError,
                "no examples",
                id="empty_dataset",
                marks=TF_ONLY,
            ),
            pytest.param(
                lambda: dataset(X).filter(lambda _: False).batch(4),
                ValueError,
                "yielded no batches",
                id="dataset_yielding_nothing",
                marks=TF_ONLY,
            ),
            pytest.param(
                lambda: dataset(X),
                ValueError,
                "batch it first",
                id="unbatched_dataset",
                marks=TF_ONLY,
            ),
            pytest.param(
                lambda: dataset(X).batch(4).repeat(),
                ValueError,
                "infinite",
                id="infinite_dataset",
                marks=TF_ONLY,
            ),
            pytest.param(
                lambda: dataset(X, X, X, X).batch(4),
                ValueError,
                "4-tuples",
                id="dataset_of_4_tuples",
                marks=TF_ONLY,
            ),
            pytest.param(
                lambda: dataset({"x": X}).batch(4),
                TypeError,
                "must be a NumPy array",
                id="dataset_of_dicts",
                marks=TF_ONLY,
            ),
            pytest.param(
                lambda: (row for row in X), ValueError, "yield batches", id="generator_of_rows"
            ),
            pytest.param(
                lambda: ({"x": X[i : i + 4]} for i in range(0, len(X), 4)),
                TypeError,
                "must be a NumPy array",
                id="generator_of_dicts",
            ),
        ],
    )
    def test_bad_data(self, data, error, message):
        model, _, _ = make_model()
        with pytest.raises(error, match=message):
            ke.evaluate_elbo(model, data(), verbose=0)
        with pytest.raises(error, match=message):
            ke.importance_weighted_log_likelihood(model, data(), num_samples=2, verbose=0)

    @TF_ONLY
    def test_dataset_batch_above_max_decoder_batch(self):
        model, _, _ = make_model()
        with pytest.raises(ValueError, match="`max_decoder_batch`.*>= 16"):
            ke.importance_weighted_log_likelihood(
                model, dataset(X).batch(16), num_samples=2, max_decoder_batch=10, verbose=0
            )


class TestErrors:
    def test_model_without_posterior(self):
        x = keras.Input((D,))
        model = keras.Model(x, keras.layers.Dense(D)(x))
        model.compile(loss=ke.GaussianNLL())
        with pytest.raises(ValueError, match="a posterior layer.*has none"):
            ke.evaluate_elbo(model, X, verbose=0)

    def test_subclassed_model_is_named(self):
        # Issue 17, point 9: was `AttributeError: ... has no attribute 'inputs'`.
        class Subclassed(ke.ELBOModel):
            def __init__(self):
                super().__init__()
                self.posterior = ke.GaussianPosterior(2, kl_regularizer=ke.KLRegularizer())
                self.decoder = keras.layers.Dense(D)

            def call(self, x, training=None):
                return self.decoder(self.posterior(x, training=training))

        model = Subclassed()
        model(X[:2])
        model.compile(loss=ke.GaussianNLL())
        for estimate in (ke.evaluate_elbo, ke.importance_weighted_log_likelihood):
            with pytest.raises(ValueError, match=r"needs a functional model .* is subclassed"):
                estimate(model, X, verbose=0)

    @pytest.mark.parametrize("num_samples", [0, 1.5, True])
    def test_bad_num_samples(self, num_samples):
        model, _, _ = make_model()
        with pytest.raises(ValueError, match="`num_samples`"):
            ke.evaluate_elbo(model, X, num_samples=num_samples, verbose=0)

    @pytest.mark.parametrize(
        "kwargs, argument",
        [
            ({"batch_size": 0}, "batch_size"),
            ({"batch_size": -1}, "batch_size"),
            ({"batch_size": 2.5}, "batch_size"),
            ({"max_decoder_batch": 10, "batch_size": 20}, "max_decoder_batch"),
            ({"max_decoder_batch": 100.0}, "max_decoder_batch"),
        ],
    )
    def test_bad_batch_sizes_are_named(self, kwargs, argument):
        model, _, _ = make_model()
        with pytest.raises(ValueError, match=f"`{argument}`"):
            ke.importance_weighted_log_likelihood(model, X, num_samples=2, verbose=0, **kwargs)
        if "max_decoder_batch" not in kwargs:
            with pytest.raises(ValueError, match=f"`{argument}`"):
                ke.evaluate_elbo(model, X, verbose=0, **kwargs)


class TestRepeatedCalls:
    """The estimators keep their compiled functions per model between calls."""

    def test_no_retracing_and_same_draws_for_a_seed(self):
        model, _, _ = make_model()
        tf_log = RetraceLog()
        with tf_log:
            first = ke.evaluate_elbo(model, X, num_samples=2, seed=5, verbose=0)
            for _ in range(6):
                again = ke.evaluate_elbo(model, X, num_samples=2, seed=5, verbose=0)
                iw = ke.importance_weighted_log_likelihood(
                    model, X, num_samples=7, max_decoder_batch=100, seed=5, verbose=0
                )
        np.testing.assert_array_equal(again["elbo"], first["elbo"])
        iw_again = ke.importance_weighted_log_likelihood(
            model, X, num_samples=7, max_decoder_batch=100, seed=5, verbose=0
        )
        np.testing.assert_array_equal(iw_again, iw)
        assert tf_log.retracing == [], tf_log.retracing

    def test_a_short_last_batch_is_padded_to_the_compiled_shape(self, monkeypatch):
        # 40 examples in batches of 15: the last 10 are padded to 15 (one
        # compiled shape: TensorFlow retraced and JAX recompiled for it) and
        # the padding's results dropped.
        from keras_elbo import evaluation

        model, _, _ = make_model()
        seen = set()
        posterior = evaluation._LatentModel.posterior

        def recording(self, x):
            seen.add(x.shape[0])
            return posterior(self, x)

        monkeypatch.setattr(evaluation._LatentModel, "posterior", recording)
        elbo = ke.evaluate_elbo(model, X, batch_size=15, seed=0, verbose=0)
        iw = ke.importance_weighted_log_likelihood(
            model, X, num_samples=3, batch_size=15, verbose=0
        )
        assert seen == {15}, seen
        assert elbo["elbo"].shape == iw.shape == (40,)
        assert np.all(np.isfinite(elbo["elbo"])) and np.all(np.isfinite(iw))

    def test_seed_none_draws_anew_each_call(self):
        model, _, _ = make_model()
        first = ke.evaluate_elbo(model, X, seed=None, verbose=0)["reconstruction"]
        second = ke.evaluate_elbo(model, X, seed=None, verbose=0)["reconstruction"]
        assert np.all(first != second)

    def test_new_compile_changes_the_likelihood(self):
        # The reconstruction term of a Gaussian of scale s: the squared error
        # over 2 s**2 plus D log(s sqrt(2 pi)); with the same seed the same z.
        model, _, _ = make_model()
        narrow = ke.evaluate_elbo(model, X, seed=3, verbose=0)["reconstruction"]
        model.compile(loss=ke.GaussianNLL(scale=2 * SIGMA))
        wide = ke.evaluate_elbo(model, X, seed=3, verbose=0)["reconstruction"]
        half_squares = narrow - D * math.log(SIGMA * math.sqrt(2 * math.pi))
        expected = half_squares / 4 + D * math.log(2 * SIGMA * math.sqrt(2 * math.pi))
        np.testing.assert_allclose(wide, expected, **FLOAT32_TOL)


class RetraceLog(logging.Handler):
    """Collects TensorFlow's "triggered tf.function retracing" warnings
    while it is entered (none on other backends)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.retracing = []

    def emit(self, record):
        if "retracing" in record.getMessage():
            self.retracing.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("tensorflow").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("tensorflow").removeHandler(self)
