"""Conditional priors p(z | c) computed by the network (issue 18, point 1) and
KL balancing, against NumPy float64 references."""

import keras
import numpy as np
import pytest

import keras_elbo as ke
from keras_elbo import _gaussian
from tests import _helpers as h
from tests.test_evaluation import fill_triangular_inverse

D = 3
MIN_SCALE = 1e-4
RNG = np.random.default_rng(0)


def numpy_gaussian(raw, covariance, min_scale=MIN_SCALE):
    """(loc, covariance matrix) per row of raw parameters, float64, from the
    layers' documented parametrisation."""
    raw = np.asarray(raw, np.float64)
    loc = raw[..., :D]
    if covariance == "diag":
        scale = h.softplus(raw[..., D:]) + min_scale
        return loc, scale[..., :, None] * np.eye(D) * scale[..., None, :]
    trils = []
    for row in raw[..., D:].reshape(-1, raw.shape[-1] - D):
        tril = h.numpy_fill_triangular(row, D)
        tril[np.diag_indices(D)] = h.softplus(np.diag(tril)) + min_scale
        trils.append(tril)
    tril = np.stack(trils).reshape(*raw.shape[:-1], D, D)
    return loc, tril @ np.swapaxes(tril, -1, -2)


def numpy_kl(q_raw, p_raw, covariance):
    """KL[N(m1, S1) || N(m2, S2)] per row: the textbook closed form."""
    m1, s1 = numpy_gaussian(q_raw, covariance)
    m2, s2 = numpy_gaussian(p_raw, covariance)
    s2_inv = np.linalg.inv(s2)
    diff = (m2 - m1)[..., None]
    return 0.5 * (
        np.trace(s2_inv @ s1, axis1=-2, axis2=-1)
        + (np.swapaxes(diff, -1, -2) @ s2_inv @ diff)[..., 0, 0]
        - D
        + np.linalg.slogdet(s2)[1]
        - np.linalg.slogdet(s1)[1]
    )


def numpy_kl_gradients(q_raw, p_raw, covariance, step=1e-6):
    """Gradients of the summed closed form by central differences in float64."""
    grads = []
    for which in (0, 1):
        args = [np.array(q_raw, np.float64), np.array(p_raw, np.float64)]
        grad = np.zeros_like(args[which])
        for index in np.ndindex(grad.shape):
            plus, minus = [a.copy() for a in args], [a.copy() for a in args]
            plus[which][index] += step
            minus[which][index] -= step
            grad[index] = (
                numpy_kl(*plus, covariance).sum() - numpy_kl(*minus, covariance).sum()
            ) / (2 * step)
        grads.append(grad)
    return grads


def identity_prior(covariance, **kwargs):
    """A conditional Gaussian prior whose parameters are its inputs."""
    prior = ke.ConditionalGaussianPrior(
        D, covariance=covariance, min_scale=MIN_SCALE, kernel_initializer="identity", **kwargs
    )
    prior.build((None, _gaussian.num_params(D, covariance)))
    return prior


def raw_pair(covariance, batch=4, seed=0):
    rng = np.random.default_rng(seed)
    n = _gaussian.num_params(D, covariance)
    return (rng.normal(0, 0.7, (batch, n)).astype("float32") for _ in range(2))


COVARIANCES = ["diag", "full"]


class TestClosedForm:
    @pytest.mark.parametrize("covariance", COVARIANCES)
    def test_kl_of_two_network_gaussians_is_the_numpy_closed_form(self, covariance):
        q_raw, p_raw = raw_pair(covariance)
        regularizer = ke.KLRegularizer(prior=identity_prior(covariance))
        q = _gaussian.gaussian(keras.ops.convert_to_tensor(q_raw), D, covariance, MIN_SCALE)
        p = regularizer.prior_distribution(q, prior_inputs=p_raw)
        assert regularizer.method(q, p) == "analytic"
        kl = regularizer.kl_divergence(q, prior_inputs=p_raw)
        expected = numpy_kl(q_raw, p_raw, covariance)
        np.testing.assert_allclose(h.numpy(kl), expected, rtol=2e-5, atol=1e-5)

    @pytest.mark.parametrize("balance", [None, 0.8, 0.3])
    @pytest.mark.parametrize("covariance", COVARIANCES)
    def test_gradients_reach_both_networks_as_numpy_says(self, covariance, balance):
        q_raw, p_raw = raw_pair(covariance, seed=1)
        regularizer = ke.KLRegularizer(prior=identity_prior(covariance), balance=balance)

        def kl(q_params, p_params):
            q = _gaussian.gaussian(q_params, D, covariance, MIN_SCALE)
            return regularizer.kl_divergence(q, prior_inputs=p_params)

        grad_q, grad_p = h.gradients(kl, q_raw, p_raw)
        expected_q, expected_p = numpy_kl_gradients(q_raw, p_raw, covariance)
        # Balancing: the same value, `alpha` of the gradient to the prior and
        # `1 - alpha` to the posterior (Hafner et al., 2021).
        alpha = 0.5 if balance is None else balance
        share_q, share_p = (1.0, 1.0) if balance is None else (1 - alpha, alpha)
        np.testing.assert_allclose(grad_q, share_q * expected_q, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(grad_p, share_p * expected_p, rtol=1e-3, atol=1e-4)
        q = _gaussian.gaussian(keras.ops.convert_to_tensor(q_raw), D, covariance, MIN_SCALE)
        np.testing.assert_allclose(
            h.numpy(regularizer.kl_divergence(q, prior_inputs=p_raw)),
            numpy_kl(q_raw, p_raw, covariance),
            rtol=2e-5,
            atol=1e-5,
        )


class TestMonteCarlo:
    def test_mixture_prior_kl_of_given_samples_matches_numpy(self):
        prior = ke.ConditionalMixturePrior(D, num_components=2)
        c = RNG.normal(size=(5, 4)).astype("float32")
        p = prior.distribution(c)
        kernel, bias = (h.numpy(w) for w in prior.projection.weights)
        params = c.astype(np.float64) @ kernel + bias
        logits = params[:, :2]
        loc = params[:, 2 : 2 + 2 * D].reshape(5, 2, D)
        scale = h.softplus(params[:, 2 + 2 * D :].reshape(5, 2, D)) + 1e-3
        q_raw = RNG.normal(0, 0.5, (5, 2 * D)).astype("float32")
        q = _gaussian.gaussian(keras.ops.convert_to_tensor(q_raw), D, "diag", MIN_SCALE)
        z = RNG.normal(size=(5, D)).astype("float32")
        regularizer = ke.KLRegularizer(prior=prior)
        assert regularizer.method(q, p) == "mc_entropy"
        kl = regularizer.kl_divergence(q, sample=z, prior_inputs=c)
        log_p = [h.mixture_logpdf(z[b], logits[b], loc[b], scale[b]) for b in range(5)]
        q_scale = h.softplus(q_raw[:, D:].astype(np.float64)) + MIN_SCALE
        entropy = np.sum(np.log(q_scale) + 0.5 * (1 + h.LOG_2PI), axis=-1)
        np.testing.assert_allclose(h.numpy(kl), -entropy - np.array(log_p), rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("mode", ["mc", "mc_entropy"])
    def test_balanced_monte_carlo_splits_the_gradients_of_the_same_samples(self, mode):
        # With fixed noise, KL balancing gives the unbalanced estimate's
        # value, and alpha (1 - alpha) of its gradient to the prior
        # (posterior): the backend's own unbalanced gradients are the reference.
        q_raw, p_raw = raw_pair("diag", seed=2)
        eps = RNG.normal(size=(4, D)).astype("float32")

        def estimate(balance):
            regularizer = ke.KLRegularizer(prior=identity_prior("diag"), mode=mode, balance=balance)

            def kl(q_params, p_params):
                q = _gaussian.gaussian(q_params, D, "diag", MIN_SCALE)
                z = q.mean() + q.stddev() * keras.ops.convert_to_tensor(eps)
                return regularizer.kl_divergence(q, sample=z, prior_inputs=p_params)

            return h.numpy(kl(q_raw, p_raw)), h.gradients(kl, q_raw, p_raw)

        value, (grad_q, grad_p) = estimate(None)
        balanced, (balanced_q, balanced_p) = estimate(0.8)
        np.testing.assert_allclose(balanced, value, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(balanced_q, 0.2 * grad_q, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(balanced_p, 0.8 * grad_p, rtol=1e-4, atol=1e-6)
        assert np.abs(grad_p).max() > 0.1 and np.abs(grad_q).max() > 0.1


def conditional_vae(covariance="diag", prior=None, balance=None, inference="sample"):
    """A conditional VAE on 6 pixels and a one-hot label of 3 classes."""
    x, label = keras.Input((6,), name="x"), keras.Input((3,), name="label")
    encoder = keras.layers.Dense(8, activation="tanh", name="encoder")
    h_ = encoder(keras.layers.Concatenate()([x, label]))
    c = keras.layers.Dense(4, activation="tanh", name="context")(label)
    prior = prior or ke.ConditionalGaussianPrior(D, covariance=covariance)
    posterior = ke.GaussianPosterior(
        D,
        covariance=covariance,
        kl_regularizer=ke.KLRegularizer(prior=prior, balance=balance),
        inference=inference,
        seed=0,
        name="posterior",
    )
    z = posterior(h_, prior_inputs=c)
    return ke.ELBOModel([x, label], keras.layers.Dense(6)(z))


X = (RNG.random((32, 6)) < 0.4).astype("float32")
LABELS = np.eye(3, dtype="float32")[RNG.integers(0, 3, 32)]


class TestELBOModel:
    @pytest.mark.parametrize("covariance", COVARIANCES)
    def test_logged_kl_is_the_numpy_closed_form_of_the_two_networks(self, covariance):
        model = conditional_vae(covariance)
        model.compile("adam", ke.BernoulliNLL(from_logits=True))
        logs = model.evaluate([X, LABELS], X, batch_size=32, verbose=0, return_dict=True)

        # The two networks' parameters, in NumPy from the layers' weights.
        def dense(inputs, layer):
            return inputs @ h.numpy(layer.kernel) + h.numpy(layer.bias)

        posterior = model.get_layer("posterior")
        features = np.tanh(dense(np.concatenate([X, LABELS], 1), model.get_layer("encoder")))
        q_raw = dense(features, posterior.projection)
        context = np.tanh(dense(LABELS.astype(np.float64), model.get_layer("context")))
        p_raw = dense(context, posterior.kl_regularizer.prior.projection)
        expected = numpy_kl(q_raw, p_raw, covariance).mean()
        assert logs["kl"] == pytest.approx(expected, rel=1e-4)
        assert logs["neg_elbo"] == pytest.approx(logs["reconstruction"] + logs["kl"], rel=1e-5)

    def test_training_moves_both_networks(self):
        model = conditional_vae(balance=0.8)
        model.compile(keras.optimizers.Adam(1e-2), ke.BernoulliNLL(from_logits=True))
        prior = model.get_layer("posterior").kl_regularizer.prior
        tracked = [*prior.trainable_weights, *model.get_layer("context").trainable_weights]
        before = [h.numpy(w) for w in tracked]
        history = model.fit([X, LABELS], X, epochs=2, batch_size=8, verbose=0).history
        assert sorted(history) == ["kl", "loss", "neg_elbo", "reconstruction"]
        assert np.all(np.isfinite(history["loss"]))
        for b, w in zip(before, tracked, strict=True):
            assert not np.allclose(b, h.numpy(w)), w.path

    @pytest.mark.parametrize("objective, num_samples", [("elbo", 4), ("iwae", 4)])
    def test_multi_sample_objectives_use_the_conditional_prior(self, objective, num_samples):
        # The decoder sees z only: K samples per example are drawn against
        # p(z | c) of the example.
        model = conditional_vae()
        multi = ke.ELBOModel(model.inputs, model.outputs, objective=objective, num_samples=4)
        multi.compile(keras.optimizers.Adam(1e-2), ke.BernoulliNLL(from_logits=True))
        logs = multi.evaluate([X, LABELS], X, batch_size=32, verbose=0, return_dict=True)
        single = model
        single.compile("adam", ke.BernoulliNLL(from_logits=True))
        kl = single.evaluate([X, LABELS], X, batch_size=32, verbose=0, return_dict=True)["kl"]
        assert logs["kl"] == pytest.approx(kl, rel=1e-5)  # analytic, per example
        if objective == "iwae":
            assert np.isfinite(logs["neg_iwae"])
        history = multi.fit([X, LABELS], X, epochs=1, batch_size=8, verbose=0).history
        assert np.all(np.isfinite(history["loss"]))

    def test_subclassed_model(self):
        class ConditionalVAE(ke.ELBOModel):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self.encoder = keras.layers.Dense(8, activation="tanh")
                self.context = keras.layers.Dense(4, activation="tanh")
                self.posterior = ke.GaussianPosterior(
                    D,
                    kl_regularizer=ke.KLRegularizer(prior=ke.ConditionalGaussianPrior(D)),
                    seed=0,
                )
                self.decoder = keras.layers.Dense(6)

            def call(self, inputs):
                x, label = inputs
                features = self.encoder(keras.ops.concatenate([x, label], axis=-1))
                return self.decoder(self.posterior(features, prior_inputs=self.context(label)))

        model = ConditionalVAE()
        model.compile(keras.optimizers.Adam(1e-2), ke.BernoulliNLL(from_logits=True))
        history = model.fit([X, LABELS], X, epochs=2, batch_size=8, verbose=0).history
        assert sorted(history) == ["kl", "loss", "neg_elbo", "reconstruction"]
        assert all(kl > 0 for kl in history["kl"])

    def test_sequence_kl_is_summed_over_time(self):
        # (batch, time, features) posterior and prior inputs: one Gaussian per
        # step, the KL summed over time and averaged over the batch.
        posterior = ke.GaussianPosterior(
            D,
            kl_regularizer=ke.KLRegularizer(prior=identity_prior("diag")),
            kernel_initializer="identity",
            name="posterior",
        )
        q_in, p_in = keras.Input((5, 2 * D)), keras.Input((5, 2 * D))
        z = posterior(q_in, prior_inputs=p_in)
        model = keras.Model([q_in, p_in], z)
        q_raw = RNG.normal(0, 0.5, (2, 5, 2 * D)).astype("float32")
        p_raw = RNG.normal(0, 0.5, (2, 5, 2 * D)).astype("float32")
        model([q_raw, p_raw])
        expected = numpy_kl(q_raw, p_raw, "diag").sum(axis=1).mean()
        (loss,) = model.losses
        assert float(h.numpy(loss)) == pytest.approx(expected, rel=1e-5)

    @pytest.mark.parametrize("use_custom_objects", [False, True])
    def test_saves_and_loads(self, use_custom_objects, tmp_path, monkeypatch):
        model = conditional_vae("full", balance=0.8, inference="mean")
        model.compile(keras.optimizers.Adam(1e-2), ke.BernoulliNLL(from_logits=True))
        model.fit([X, LABELS], X, epochs=1, batch_size=8, verbose=0)
        expected = h.numpy(model.predict([X, LABELS], verbose=0))
        loaded = h.save_and_load(model, tmp_path / "cvae.keras", use_custom_objects, monkeypatch)
        np.testing.assert_allclose(h.numpy(loaded.predict([X, LABELS], verbose=0)), expected)
        regularizer = loaded.get_layer("posterior").kl_regularizer
        assert isinstance(regularizer.prior, ke.ConditionalGaussianPrior)
        assert regularizer.balance == 0.8 and regularizer.prior.covariance == "full"
        logs = loaded.evaluate([X, LABELS], X, verbose=0, return_dict=True)
        assert logs["kl"] == pytest.approx(
            model.evaluate([X, LABELS], X, verbose=0, return_dict=True)["kl"], rel=1e-5
        )


class TestErrors:
    def test_conditional_prior_without_its_inputs(self):
        posterior = ke.GaussianPosterior(
            D, kl_regularizer=ke.KLRegularizer(prior=ke.ConditionalGaussianPrior(D))
        )
        with pytest.raises(ValueError, match="prior_inputs=c"):
            posterior(keras.Input((4,)))

    def test_prior_inputs_for_a_prior_that_takes_none(self):
        posterior = ke.GaussianPosterior(D, kl_regularizer=ke.KLRegularizer())
        with pytest.raises(ValueError, match="ConditionalGaussianPrior"):
            posterior(keras.Input((4,)), prior_inputs=keras.Input((2,)))

    def test_prior_inputs_without_a_regularizer(self):
        with pytest.raises(ValueError, match="no kl_regularizer"):
            ke.GaussianPosterior(D)(keras.Input((4,)), prior_inputs=keras.Input((2,)))

    def test_prior_of_another_size_fails_at_construction(self):
        posterior = ke.GaussianPosterior(
            D, kl_regularizer=ke.KLRegularizer(prior=ke.ConditionalGaussianPrior(D + 1))
        )
        with pytest.raises(ValueError, match="latent_dim=4"):
            posterior(keras.Input((4,)), prior_inputs=keras.Input((2,)))

    def test_analytic_mode_against_a_mixture_names_the_fix(self):
        regularizer = ke.KLRegularizer(prior=ke.ConditionalMixturePrior(D, 2), mode="analytic")
        posterior = ke.GaussianPosterior(D, kl_regularizer=regularizer)
        with pytest.raises(ValueError, match="mode='mc'"):
            posterior(keras.Input((4,)), prior_inputs=keras.Input((2,)))

    @pytest.mark.parametrize("balance", [-0.1, 1.5, "half"])
    def test_balance_outside_the_unit_interval(self, balance):
        with pytest.raises(ValueError, match="balance"):
            ke.KLRegularizer(balance=balance)

    def test_nan_prior_parameters_are_named(self):
        prior = ke.ConditionalGaussianPrior(D)
        with pytest.raises(h.run_time_error(), match="prior parameters"):
            prior.distribution(np.full((2, 4), np.nan, "float32")).mean()

    def test_prior_is_not_called_on_tensors(self):
        with pytest.raises(TypeError, match="prior"):
            ke.ConditionalGaussianPrior(D)(np.zeros((2, 4), "float32"))


def test_config_round_trip():
    for prior in (
        ke.ConditionalGaussianPrior(D, covariance="full", min_scale=1e-3),
        ke.ConditionalMixturePrior(D, num_components=4, min_scale=1e-2),
    ):
        h.config_round_trip(prior)
    regularizer = h.config_round_trip(
        ke.KLRegularizer(prior=ke.ConditionalGaussianPrior(D), balance=0.8)
    )
    assert regularizer.balance == 0.8 and regularizer.conditional


@pytest.mark.slow  # a whole training (about 15 s of CPU on TensorFlow)
def test_conditional_vae_draws_digits_of_the_class_asked_for():
    # Issue 18's acceptance: a conditional VAE on the bundled 8x8 digits; its
    # samples of class c, z ~ p(z | c) decoded to Bernoulli means, are
    # classified as c by a classifier trained on the real digits at least 90%
    # of the time (measured: 99.7% on TensorFlow after 50 epochs; the
    # classifier scores 93% on the real test digits; binary draws from the
    # means, 93%).
    from sklearn.linear_model import LogisticRegression

    from keras_elbo import datasets

    keras.utils.set_random_seed(0)
    x_train, y_train, x_test, y_test = datasets.load_digits(with_labels=True)
    onehot = np.eye(10, dtype="float32")
    x, label = keras.Input((64,)), keras.Input((10,))
    features = keras.layers.Dense(128, activation="relu")(keras.layers.Concatenate()([x, label]))
    context = keras.layers.Dense(32, activation="relu")(label)
    prior = ke.ConditionalGaussianPrior(4)
    z = ke.GaussianPosterior(4, kl_regularizer=ke.KLRegularizer(prior=prior), seed=0)(
        features, prior_inputs=context
    )
    decoder = [keras.layers.Dense(128, activation="relu"), keras.layers.Dense(64)]
    logits = decoder[1](decoder[0](keras.layers.Concatenate()([z, label])))
    model = ke.ELBOModel([x, label], logits)
    model.compile(keras.optimizers.Adam(3e-3), ke.BernoulliNLL(from_logits=True))
    model.fit([x_train, onehot[y_train]], x_train, epochs=50, batch_size=64, verbose=0)

    classifier = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    assert classifier.score(x_test, y_test) > 0.9
    asked = np.repeat(np.arange(10), 100)
    c = keras.ops.convert_to_tensor(onehot[asked])
    z_in = keras.Input((4,))
    generator = keras.Model(
        [z_in, label], decoder[1](decoder[0](keras.layers.Concatenate()([z_in, label])))
    )
    draws = prior.distribution(keras.Model(label, context)(c)).sample(seed=1)
    means = h.numpy(keras.ops.sigmoid(generator([draws, c])))
    accuracy = np.mean(classifier.predict(means) == asked)
    assert accuracy >= 0.9, accuracy


class Cell(keras.layers.Layer):
    """A `keras.layers.RNN` cell holding the posterior, the previous step's
    input its state: the step of `TestLoopOverTime`'s loop."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.state_size = 2 * D
        self.output_size = D
        self.posterior = step_posterior()

    def build(self, input_shape):
        self.posterior.build(input_shape)

    def call(self, inputs, states, training=None):
        z = self.posterior(inputs, prior_inputs=states[0], training=training)
        return z, [inputs]


def step_posterior():
    return ke.GaussianPosterior(
        D,
        kl_regularizer=ke.KLRegularizer(prior=identity_prior("diag")),
        kernel_initializer="identity",
        seed=0,
        name="posterior",
    )


class TestLoopOverTime:
    """A posterior layer and its conditional prior applied at each step of a
    loop over time (a sequential latent model), written in Python or as the
    cell of a `keras.layers.RNN(unroll=True)`: one KL per step, all in the
    loss and summed in the logged KL, on every backend (on JAX, Keras's
    `stateless_call` kept only a layer's last call's losses)."""

    STEPS = 3

    def model(self, form):
        sequence = keras.Input((self.STEPS, 2 * D))
        if form == "rnn_cell":
            codes = keras.layers.RNN(Cell(), return_sequences=True, unroll=True)(sequence)
        else:
            posterior = step_posterior()
            # p(z_t | x_{t-1}): the previous step's values are the prior's raw
            # parameters (zeros before the first step).
            previous = keras.ops.zeros_like(sequence[:, 0])
            steps = []
            for t in range(self.STEPS):
                steps.append(posterior(sequence[:, t], prior_inputs=previous))
                previous = sequence[:, t]
            codes = keras.ops.stack(steps, axis=1)
        # The output ignores the codes' values: the reconstruction is the
        # same for every sample, and the loss's KL part is exact.
        decoded = keras.layers.Lambda(lambda t: t[0] + 0.0 * keras.ops.sum(t[1]))([sequence, codes])
        return ke.ELBOModel(sequence, decoded)

    @pytest.mark.parametrize("form", ["python", "rnn_cell"])
    def test_every_step_is_in_the_loss_and_the_logged_kl(self, form):
        model = self.model(form)
        model.compile("adam", ke.GaussianNLL())
        x = RNG.normal(0, 0.5, (8, self.STEPS, 2 * D)).astype("float32")
        logs = model.evaluate(x, x, batch_size=8, verbose=0, return_dict=True)
        previous = np.concatenate([np.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
        expected = numpy_kl(x, previous, "diag").sum(axis=1).mean()
        assert logs["kl"] == pytest.approx(expected, rel=1e-5)
        reconstruction = 0.5 * np.log(2 * np.pi) * x[0].size  # N(x; x, 1) per example
        assert logs["reconstruction"] == pytest.approx(reconstruction, rel=1e-5)
        assert logs["loss"] == pytest.approx(reconstruction + expected, rel=1e-5)
        history = model.fit(x, x, epochs=2, batch_size=4, verbose=0).history
        assert np.all(np.isfinite(history["kl"]))

    def test_a_cell_that_is_not_unrolled_is_refused(self):
        # Its loop primitive hides the cell's losses (TensorFlow failed with
        # an InaccessibleTensorError; PyTorch counted one step twice).
        sequence = keras.Input((self.STEPS, 2 * D))
        codes = keras.layers.RNN(Cell(), name="vrnn")(sequence)
        model = ke.ELBOModel(sequence, codes)
        with pytest.raises(ValueError, match="'vrnn' has a KL term in its cell.*unroll=True"):
            model.compile("adam", ke.GaussianNLL())


class TestFreeNats:
    """DreamerV3's free nats: each example's KL at each step floored."""

    def test_loss_floors_each_example_and_step_and_gradients_stop_below(self):
        x = RNG.normal(0, 0.6, (4, 5, 2 * D)).astype("float32")
        c = RNG.normal(0, 0.6, (4, 5, 2 * D)).astype("float32")
        kl = numpy_kl(x, c, "diag")  # (batch, time)
        free = float(np.median(kl))  # half of the (example, step) pairs below it
        regularizer = ke.KLRegularizer(prior=identity_prior("diag"), free_nats=free)

        def loss(q_params):
            q = _gaussian.gaussian(q_params, D, "diag", MIN_SCALE)
            regularizer(q.mean(), posterior=q, prior_inputs=c)
            return regularizer.losses[-1]

        value = h.numpy(loss(keras.ops.convert_to_tensor(x)))
        assert value == pytest.approx(np.maximum(kl, free).sum(axis=1).mean(), rel=1e-5)
        # The logged KL is the true one.
        assert h.numpy(regularizer.last_kl) == pytest.approx(kl.sum(axis=1).mean(), rel=1e-5)
        (grad,) = h.gradients(loss, x)
        below = kl < free
        assert below.any() and (~below).any()
        assert np.all(grad[below] == 0.0)
        assert np.all(np.abs(grad[~below]).max(axis=-1) > 0)

    def test_in_a_model_with_a_sequence_posterior(self):
        sequence = keras.Input((5, 4))
        regularizer = ke.KLRegularizer(free_nats=1.0)
        # Zero weights: q = N(0, softplus(0) + 1e-4) at every step, a KL of
        # 0.32 nats per step against N(0, I).
        posterior = ke.GaussianPosterior(
            D, kl_regularizer=regularizer, kernel_initializer="zeros", seed=0
        )
        z = posterior(sequence)
        model = ke.ELBOModel(sequence, keras.layers.Dense(4)(z))
        model.compile("adam", ke.GaussianNLL())
        x = RNG.normal(size=(8, 5, 4)).astype("float32")
        logs = model.evaluate(x, x, batch_size=8, verbose=0, return_dict=True)
        scale = h.softplus(0.0) + 1e-4
        step_kl = D * 0.5 * (scale**2 - 1.0 - np.log(scale**2))
        assert logs["kl"] == pytest.approx(5 * step_kl, rel=1e-5)
        # Each step's KL is below 1 nat: the loss holds 5 floors of 1 nat.
        assert logs["loss"] == pytest.approx(logs["reconstruction"] + 5.0, rel=1e-5)

    def test_refused_by_the_importance_weighted_bound_and_beside_free_bits(self):
        x = keras.Input((4,))
        posterior = ke.GaussianPosterior(D, kl_regularizer=ke.KLRegularizer(free_nats=1.0))
        with pytest.raises(ValueError, match="free_nats"):
            ke.ELBOModel(x, posterior(x), objective="iwae", num_samples=2).compile(
                "adam", ke.GaussianNLL()
            )
        with pytest.raises(ValueError, match="choose one floor"):
            ke.KLRegularizer(free_bits=0.1, free_nats=1.0)


def test_two_stochastic_layers_log_each_kl_by_name():
    # A top-down hierarchy (issue 18, point 2): z2 ~ q(z2 | x) against N(0, I),
    # z1 ~ q(z1 | x, z2) against p(z1 | z2). Each KL is logged under its name;
    # the top one is checked against NumPy's closed form from the layers'
    # weights (the lower one depends on the sampled z2), and neg_elbo is the
    # reconstruction plus both.
    x = keras.Input((6,))
    h_ = keras.layers.Dense(8, activation="tanh")(x)
    top = ke.GaussianPosterior(
        2, kl_regularizer=ke.KLRegularizer(metric_name="kl_top"), seed=0, name="top"
    )
    z2 = top(h_)
    lower = ke.GaussianPosterior(
        D,
        kl_regularizer=ke.KLRegularizer(
            prior=ke.ConditionalGaussianPrior(D), metric_name="kl_lower"
        ),
        seed=1,
        name="lower",
    )
    z1 = lower(keras.layers.Concatenate()([h_, z2]), prior_inputs=z2)
    model = ke.ELBOModel(x, keras.layers.Dense(6)(z1))
    model.compile(keras.optimizers.Adam(1e-2), ke.BernoulliNLL(from_logits=True))
    logs = model.evaluate(X, X, batch_size=32, verbose=0, return_dict=True)
    assert sorted(logs) == ["kl_lower", "kl_top", "loss", "neg_elbo", "reconstruction"]
    features = np.tanh(X @ h.numpy(model.layers[1].kernel) + h.numpy(model.layers[1].bias))
    raw = features @ h.numpy(top.projection.kernel) + h.numpy(top.projection.bias)
    scale = h.softplus(raw[:, 2:]) + 1e-4
    expected_top = h.kl_diag_normal(raw[:, :2], scale).mean()
    assert logs["kl_top"] == pytest.approx(expected_top, rel=1e-5)
    assert logs["kl_lower"] > 0
    assert logs["neg_elbo"] == pytest.approx(
        logs["reconstruction"] + logs["kl_top"] + logs["kl_lower"], rel=1e-5
    )
    history = model.fit(X, X, epochs=2, batch_size=8, verbose=0).history
    assert sorted(history) == ["kl_lower", "kl_top", "loss", "neg_elbo", "reconstruction"]
    assert all(np.all(np.isfinite(values)) for values in history.values())


class TestEvaluation:
    """`evaluate_elbo` and `importance_weighted_log_likelihood` of a model of
    two inputs whose prior and decoder read the label: a linear Gaussian
    conditional model, log p(x | c) in closed form, and its exact posterior."""

    X_DIM, LATENT, CLASSES, SIGMA, S = 3, 2, 3, 0.5, 0.8

    def model(self):
        rng = np.random.default_rng(5)
        x_dim, latent, classes = self.X_DIM, self.LATENT, self.CLASSES
        w = rng.normal(size=(latent, x_dim))
        v = rng.normal(size=(classes, x_dim))
        a = rng.normal(size=(classes, latent))
        b = rng.normal(size=x_dim)
        sigma, s = self.SIGMA, self.S
        # The exact posterior q(z | x, c) = N(mu, cov), mu linear in (x, c).
        cov = np.linalg.inv(np.eye(latent) / s**2 + w @ w.T / sigma**2)
        x_to_mu = w.T @ cov / sigma**2
        c_to_mu = a @ cov / s**2 - v @ x_to_mu
        image, label = keras.Input((x_dim,)), keras.Input((classes,))
        prior = ke.ConditionalGaussianPrior(latent, min_scale=MIN_SCALE)
        posterior = ke.GaussianPosterior(
            latent,
            covariance="full",
            kl_regularizer=ke.KLRegularizer(prior=prior),
            min_scale=MIN_SCALE,
            seed=0,
        )
        z = posterior(keras.layers.Concatenate()([image, label]), prior_inputs=label)
        decoder = keras.layers.Dense(x_dim)
        model = keras.Model([image, label], decoder(keras.layers.Concatenate()([z, label])))
        model.compile(loss=ke.GaussianNLL(scale=sigma))
        raw_s = np.log(np.expm1(s - MIN_SCALE))
        prior.projection.set_weights(
            [
                np.concatenate([a, np.zeros((classes, latent))], 1),
                np.concatenate([np.zeros(latent), np.full(latent, raw_s)]),
            ]
        )
        tril = np.linalg.cholesky(cov)
        np.fill_diagonal(tril, np.log(np.expm1(np.diag(tril) - MIN_SCALE)))
        raw_tril = fill_triangular_inverse(tril)
        kernel = np.concatenate([x_to_mu, c_to_mu], 0)
        kernel = np.concatenate([kernel, np.zeros((x_dim + classes, raw_tril.size))], 1)
        posterior.projection.set_weights([kernel, np.concatenate([-b @ x_to_mu, raw_tril])])
        decoder.set_weights([np.concatenate([w, v], 0), b])
        data_rng = np.random.default_rng(6)
        labels = np.eye(classes, dtype="float32")[data_rng.integers(0, classes, 12)]
        x = (labels @ (a @ w + v) + b + data_rng.normal(size=(12, x_dim))).astype("float32")
        marginal_cov = s**2 * w.T @ w + sigma**2 * np.eye(x_dim)
        diff = x - (labels @ (a @ w + v) + b)
        log_px = -0.5 * (
            np.einsum("nd,de,ne->n", diff, np.linalg.inv(marginal_cov), diff)
            + np.linalg.slogdet(marginal_cov)[1]
            + x_dim * np.log(2 * np.pi)
        )
        mu = x @ x_to_mu + labels @ c_to_mu - b @ x_to_mu
        prior_loc = labels @ a
        kl = 0.5 * (
            np.trace(cov) / s**2
            + np.sum((mu - prior_loc) ** 2, axis=1) / s**2
            - latent
            + latent * np.log(s**2)
            - np.linalg.slogdet(cov)[1]
        )
        # Var_q[log p(x | z, c)] per example (tests/test_evaluation.py's
        # log_lik_variance): r = x - mu W - c V - b, M = W.T cov W.
        residual = x - (mu @ w + labels @ v + b)
        m = w.T @ cov @ w
        quad = np.einsum("nd,de,ne->n", residual, m, residual)
        self.log_lik_variance = (2 * np.trace(m @ m) + 4 * quad) / (4 * sigma**4)
        return model, x, labels, log_px, kl

    def test_exact_posterior_gives_log_p_x_given_c(self):
        model, x, labels, log_px, _ = self.model()
        # With the exact posterior every importance weight is p(x | c).
        estimate = ke.importance_weighted_log_likelihood(
            model, [x, labels], y=x, num_samples=20, batch_size=5, verbose=0, seed=0
        )
        np.testing.assert_allclose(estimate, log_px, rtol=1e-4, atol=1e-4)

    def test_elbo_kl_is_the_closed_form_per_example(self):
        model, x, labels, log_px, kl = self.model()
        result = ke.evaluate_elbo(model, [x, labels], y=x, num_samples=1000, verbose=0, seed=0)
        np.testing.assert_allclose(result["kl"], kl, rtol=1e-4, atol=1e-4)
        # ELBO = log p(x | c) for the exact posterior; its reconstruction is a
        # mean of 1000 samples: within 4 standard errors, per example.
        standard_error = np.sqrt(self.log_lik_variance / 1000)
        assert np.all(np.abs(result["elbo"] - log_px) < 4 * standard_error + 1e-4)

    @pytest.mark.parametrize("form", ["generator", "tf.data"])
    def test_batches_of_several_inputs(self, form):
        if form == "tf.data" and keras.backend.backend() != "tensorflow":
            pytest.skip("tf.data input: TensorFlow backend")
        model, x, labels, log_px, _ = self.model()
        batches = [((x[i : i + 5], labels[i : i + 5]), x[i : i + 5]) for i in range(0, 12, 5)]
        if form == "generator":
            data = iter(batches)
        else:
            import tensorflow as tf

            data = tf.data.Dataset.from_tensor_slices(((x, labels), x)).batch(5)
        estimate = ke.importance_weighted_log_likelihood(model, data, num_samples=20, verbose=0)
        np.testing.assert_allclose(estimate, log_px, rtol=1e-4, atol=1e-4)

    @pytest.mark.parametrize("dreg", [False, True])
    def test_importance_weighted_bound_in_fit_with_a_decoder_reading_c(self, dreg):
        # The multi-sample step repeats the label for each of the K samples
        # the decoder sees. With the exact posterior every importance weight
        # is p(x | c): the logged bound is -log p(x | c), with no noise.
        model, x, labels, log_px, kl = self.model()
        iwae = ke.ELBOModel(model.inputs, model.outputs, objective="iwae", num_samples=4, dreg=dreg)
        iwae.compile(loss=ke.GaussianNLL(scale=self.SIGMA))
        logs = iwae.evaluate([x, labels], x, batch_size=12, verbose=0, return_dict=True)
        assert logs["neg_iwae"] == pytest.approx(-log_px.mean(), rel=1e-4)
        assert logs["kl"] == pytest.approx(kl.mean(), rel=1e-4)
        iwae.compile(keras.optimizers.Adam(1e-3), loss=ke.GaussianNLL(scale=self.SIGMA))
        history = iwae.fit([x, labels], x, epochs=1, batch_size=6, verbose=0).history
        assert np.all(np.isfinite(history["loss"]))

    def test_several_inputs_need_the_target(self):
        model, x, labels, _, _ = self.model()
        with pytest.raises(ValueError, match="y="):
            ke.evaluate_elbo(model, [x, labels], verbose=0)
        with pytest.raises(TypeError, match="2 inputs"):
            ke.evaluate_elbo(model, x, y=x, verbose=0)
