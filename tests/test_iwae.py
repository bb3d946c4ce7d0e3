"""Multi-sample objectives of `ELBOModel`: the averaged ELBO and the
importance-weighted bound (IWAE), with doubly reparameterised gradients.

References are computed in NumPy float64 from the model's weights and the very
samples the posterior drew; the linear-Gaussian model has a closed-form
log p(x); gradient estimators are compared by their means over many draws,
within standard errors.
"""

import copy
import math
import warnings

import keras
import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import keras_elbo as ke
from keras_elbo._base import find_layers
from keras_elbo.flows import FlowPosterior
from tests import _helpers as h

FEATURES, LATENT = 6, 2
DATA = h.TOY_DATA[:12, :FEATURES]


def vae(covariance="diag", objective="iwae", num_samples=3, dreg=False, prior=None, seed=0):
    """Dense encoder, Gaussian posterior, Dense decoder (Bernoulli logits)."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((FEATURES,))
    features = keras.layers.Dense(8, activation="tanh")(x)
    regularizer = ke.KLRegularizer(prior=prior)
    if covariance == "iaf":
        posterior = FlowPosterior(LATENT, num_flows=2, kl_regularizer=regularizer, seed=seed)
    else:
        posterior = ke.GaussianPosterior(
            LATENT, covariance=covariance, kl_regularizer=regularizer, seed=seed
        )
    hidden = keras.layers.Dense(8, activation="tanh")(posterior(features))
    model = ke.ELBOModel(
        x,
        keras.layers.Dense(FEATURES)(hidden),
        objective=objective,
        num_samples=num_samples,
        dreg=dreg,
    )
    model.compile(optimizer="adam", loss=ke.BernoulliNLL(from_logits=True))
    return model, posterior


def one_step_loss(model, x, y=None, seen=None):
    """The loss of one training step, computed eagerly as `fit` computes it.

    `seen`, a list, receives the posterior's q and its `(K, batch, d)` samples.
    """
    with model._drawing_several():
        draws = model._step_draws
        if seen is not None:
            record = draws.record
            draws.record = lambda layer, q, z, c: (seen.extend([q, z]), record(layer, q, z, c))
        y_pred = model(x, training=True)
        return model.compute_loss(x, x if y is None else y, y_pred, training=True)


def numpy_decoder_log_lik(model, posterior, z, x):
    """log p(x|z) of the Bernoulli decoder in float64, for z `(K, B, d)`."""
    dense = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.Dense)
        and model.layers.index(layer) > model.layers.index(posterior)
    ]
    out = z
    for i, layer in enumerate(dense):
        kernel, bias = (np.asarray(w, np.float64) for w in layer.get_weights())
        out = out @ kernel + bias
        if i < len(dense) - 1:
            out = np.tanh(out)
    # -BCE with logits, summed over pixels.
    return np.sum(x * out - np.logaddexp(0.0, out), axis=-1)


def numpy_log_q(q, z, covariance):
    if covariance == "iaf":
        # The flow's exact inverse (a copy forgets the log-density that
        # sampling remembered): another path than the training step's.
        return h.numpy(copy.copy(q).log_prob(z)).astype(np.float64)
    if covariance == "diag":
        return h.diag_normal_logpdf(z, q.loc, q.scale_diag)
    loc, tril = h.numpy(q.loc), h.numpy(q.scale_tril)
    return np.stack(
        [
            np.array(
                [
                    multivariate_normal(loc[b], tril[b] @ tril[b].T).logpdf(z[k, b])
                    for b in range(z.shape[1])
                ]
            )
            for k in range(z.shape[0])
        ]
    )


def numpy_log_prior(prior, z):
    """log p(z) in float64: N(0, I), or a `MixturePrior`'s mixture by logsumexp."""
    if prior is None:
        return h.diag_normal_logpdf(z, 0.0, 1.0)
    raw_scale = np.asarray(prior.raw_scale, np.float64)
    scales = h.softplus(raw_scale) + prior.min_scale
    return h.mixture_logpdf(z, np.asarray(prior.logits), np.asarray(prior.loc), scales)


@pytest.mark.parametrize(
    "objective, covariance, dreg, kl_weight, prior",
    [
        ("iwae", "diag", False, 1.0, "normal"),
        ("iwae", "full", False, 1.0, "normal"),
        ("iwae", "diag", True, 1.0, "normal"),
        ("iwae", "diag", False, 0.5, "normal"),
        ("iwae", "full", False, 1.0, "mixture"),
        ("iwae", "iaf", False, 1.0, "normal"),
        ("iwae", "iaf", False, 0.5, "mixture"),
        ("elbo", "diag", False, 1.0, "normal"),
        ("elbo", "full", False, 1.0, "normal"),
    ],
)
def test_loss_equals_numpy_bound_of_the_same_samples(objective, covariance, dreg, kl_weight, prior):
    k = 4
    mixture = None
    if prior == "mixture":
        mixture = ke.MixturePrior(LATENT, 3, init_scale=0.7, seed=3)
        mixture.logits.assign([0.5, -0.3, 0.1])  # unequal weights
    model, posterior = vae(covariance, objective, k, dreg, prior=mixture)
    posterior.kl_regularizer.kl_weight.assign(kl_weight)
    if covariance == "iaf":  # away from the identity flow it starts as
        rng = np.random.default_rng(5)
        for made in find_layers(posterior, ke.MADE):
            for weight in made.weights:
                weight.assign(0.3 * rng.normal(size=weight.shape))
    seen = []
    loss = h.numpy(one_step_loss(model, DATA, seen=seen))
    q, z = seen
    z = h.numpy(z)
    assert z.shape == (k, len(DATA), LATENT)
    x = DATA.astype(np.float64)
    log_lik = numpy_decoder_log_lik(model, posterior, z, x)  # (K, B)
    log_ratio = numpy_log_prior(mixture, z) - numpy_log_q(q, z, covariance)
    if objective == "iwae":
        bound = logsumexp(log_lik + kl_weight * log_ratio, axis=0) - math.log(k)
        expected = -np.mean(bound)
        # The logged `neg_iwae` is the bound at KL weight 1 whatever the
        # weight of the loss (issue 17: a log at the weight survived).
        bound_at_one = logsumexp(log_lik + log_ratio, axis=0) - math.log(k)
        logged = h.numpy(model.neg_iwae_tracker.result())
        np.testing.assert_allclose(logged, -np.mean(bound_at_one), rtol=2e-5)
    else:
        kl = (
            h.kl_diag_normal(q.loc, q.scale_diag)
            if covariance == "diag"
            else h.kl_full_normal(q.loc, q.scale_tril)
        )
        expected = -np.mean(log_lik) + kl_weight * np.mean(kl)
    np.testing.assert_allclose(loss, expected, rtol=2e-5)


def test_latent_map_bound_sums_over_positions():
    # Issue 17: no IWAE test used a latent map, and a bound that averaged
    # log p(z) - log q(z) over the positions instead of summing survived.
    k, positions = 3, 4
    keras.utils.set_random_seed(1)
    x = keras.Input((positions, FEATURES))
    posterior = ke.GaussianPosterior(LATENT, kl_regularizer=ke.KLRegularizer(), seed=1)
    decoder = keras.layers.Dense(FEATURES)
    model = ke.ELBOModel(
        x,
        decoder(posterior(keras.layers.Dense(8, activation="tanh")(x))),
        objective="iwae",
        num_samples=k,
    )
    model.compile(optimizer="adam", loss=ke.BernoulliNLL(from_logits=True))
    data = (np.random.default_rng(2).random((5, positions, FEATURES)) < 0.4).astype("float32")
    seen = []
    loss = h.numpy(one_step_loss(model, data, seen=seen))
    q, z = seen
    z = h.numpy(z)
    assert z.shape == (k, len(data), positions, LATENT)
    kernel, bias = (np.asarray(w, np.float64) for w in decoder.get_weights())
    logits = z @ kernel + bias  # (K, B, H, P)
    x64 = data.astype(np.float64)
    log_lik = np.sum(x64 * logits - np.logaddexp(0.0, logits), axis=(-2, -1))
    log_q = h.diag_normal_logpdf(z, q.loc, q.scale_diag)  # (K, B, H)
    log_ratio = np.sum(h.diag_normal_logpdf(z, 0.0, 1.0) - log_q, axis=-1)
    bound = logsumexp(log_lik + log_ratio, axis=0) - math.log(k)
    np.testing.assert_allclose(loss, -np.mean(bound), rtol=2e-5)
    np.testing.assert_allclose(h.numpy(model.neg_iwae_tracker.result()), -np.mean(bound), rtol=2e-5)


def test_logs_name_the_bound_and_its_parts():
    model, _ = vae(num_samples=5)
    logs = model.evaluate(DATA, DATA, verbose=0, return_dict=True)
    assert sorted(logs) == ["kl", "loss", "neg_elbo", "neg_iwae", "reconstruction"]
    assert logs["loss"] == pytest.approx(logs["neg_iwae"])
    assert logs["neg_elbo"] == pytest.approx(logs["reconstruction"] + logs["kl"], rel=1e-5)
    history = model.fit(DATA, DATA, epochs=2, batch_size=6, verbose=0).history
    assert all(np.isfinite(v).all() for v in history.values())
    assert model.predict(DATA, verbose=0).shape == DATA.shape  # one sample outside fit


def linear_gaussian(num_samples, sigma=0.5, seed=3):
    """x = W z + b + sigma * eps, z ~ N(0, I): log p(x) = N(x; b, W^T W + sigma^2 I).

    The encoder is linear and deliberately poor (its weights are not those of
    the exact posterior), so that the bound's gap is large.
    """
    x = keras.Input((4,))
    posterior = ke.GaussianPosterior(LATENT, kl_regularizer=ke.KLRegularizer(), seed=seed)
    decoder = keras.layers.Dense(4)
    model = ke.ELBOModel(
        x, decoder(posterior(x)), objective="iwae", num_samples=num_samples, jit_compile=False
    )
    model.compile(loss=ke.GaussianNLL(scale=sigma))
    rng = np.random.default_rng(seed)
    posterior.projection.set_weights([rng.normal(0, 0.2, (4, 2 * LATENT)), np.zeros(2 * LATENT)])
    decoder.set_weights([rng.normal(0, 1.0, (LATENT, 4)), rng.normal(0, 1.0, 4)])
    return model, decoder


@pytest.mark.slow
def test_linear_gaussian_bound_rises_with_k_toward_log_px():
    sigma, copies, batches = 0.5, 256, 8
    x = np.array([[0.5, -1.0, 1.5, 0.0]], "float32")
    log_px = None
    means, stderrs = [], []
    for k in (1, 5, 50):
        model, decoder = linear_gaussian(k, sigma)
        kernel, bias = decoder.get_weights()
        log_px = multivariate_normal(bias, kernel.T @ kernel + sigma**2 * np.eye(4)).logpdf(x[0])
        batch = np.repeat(x, copies, axis=0)
        # Each batch's loss is the mean of `copies` independent estimates of
        # -L_K(x): the batches' spread gives the standard error of their mean.
        values = [
            -model.test_on_batch(batch, batch, return_dict=True)["neg_iwae"] for _ in range(batches)
        ]
        means.append(np.mean(values))
        stderrs.append(np.std(values, ddof=1) / math.sqrt(batches))
    means, stderrs = np.array(means), np.array(stderrs)
    # Independent estimates: the SE of a difference is the root sum of squares.
    steps = np.diff(means)
    step_se = np.sqrt(stderrs[1:] ** 2 + stderrs[:-1] ** 2)
    assert np.all(steps > 4 * step_se), (means, stderrs)
    # A lower bound in expectation: never above log p(x) by more than 4 SE...
    assert np.all(means < log_px + 4 * stderrs), (means, log_px)
    # ...and K = 50 closes most of the K = 1 gap.
    assert (log_px - means[2]) < 0.25 * (log_px - means[0]), (means, log_px)


def gradient_draws(model, posterior, x, draws):
    """`draws` gradients of the training loss w.r.t. the model's trainable
    variables, one flattened row each, on the active backend."""
    variables = model.trainable_variables
    if h.BACKEND == "tensorflow":
        import tensorflow as tf

        # Traced once: each call advances the seed generators' state, so
        # each draws new samples (eagerly, 400 draws took a minute).
        @tf.function
        def gradient():
            with tf.GradientTape() as tape:
                loss = one_step_loss(model, x)
            return tape.gradient(loss, [v.value for v in variables])

        rows = [gradient() for _ in range(draws)]
    elif h.BACKEND == "torch":
        rows = [
            h.weight_gradients(lambda: one_step_loss(model, x), variables) for _ in range(draws)
        ]
    else:
        import jax

        # JAX differentiates pure functions: the variables' values and the
        # posterior's seed state are inputs (a new seed for each draw).
        seed = posterior.seed_generator.state

        def loss_of(values, seed_value):
            mapping = [*zip(variables, values, strict=True), (seed, seed_value)]
            with keras.StatelessScope(state_mapping=mapping):
                return one_step_loss(model, x)

        gradient = jax.jit(jax.grad(loss_of))
        values = [v.value for v in variables]
        rows = [
            gradient(values, keras.ops.convert_to_tensor([i, 7], seed.dtype)) for i in range(draws)
        ]
    return np.array([np.concatenate([h.numpy(g).ravel() for g in row]) for row in rows])


# At a KL weight below 1 (a warm-up) the bound is tempered, and so is DReG's
# encoder weight: (1 - kl_weight) * w + kl_weight * w**2, not w**2.
@pytest.mark.parametrize("kl_weight", [1.0, 0.2])
def test_dreg_gradient_equals_iwae_gradient_in_expectation(kl_weight):
    k, draws = 5, 400
    plain, posterior = vae(num_samples=k)
    posterior.kl_regularizer.kl_weight.assign(kl_weight)
    dreg = ke.ELBOModel(plain.input, plain.output, objective="iwae", num_samples=k, dreg=True)
    dreg.compile(loss=ke.BernoulliNLL(from_logits=True))
    x = DATA[:4]

    a, b = (gradient_draws(model, posterior, x, draws) for model in (plain, dreg))
    assert np.all(a.std(0) > 0) and np.all(b.std(0) > 0)  # independent draws
    se = np.sqrt(a.var(0, ddof=1) / draws + b.var(0, ddof=1) / draws)
    z = (a.mean(0) - b.mean(0)) / np.maximum(se, 1e-12)
    # Equal means: every coordinate within 4.5 standard errors of the
    # difference (about 200 coordinates: a false alarm has odds ~1e-3).
    assert np.max(np.abs(z)) < 4.5, np.sort(np.abs(z))[-5:]
    # (Its smaller variance is not a property of every weight setting: the
    # encoder's SNR at K = 1, 5, 50 is measured in benchmarks/iwae_snr.py.)


POSTERIORS = {
    "diag": lambda reg: ke.GaussianPosterior(LATENT, kl_regularizer=reg, seed=1),
    "full": lambda reg: ke.GaussianPosterior(LATENT, covariance="full", kl_regularizer=reg, seed=1),
    "iaf": lambda reg: FlowPosterior(LATENT, num_flows=1, kl_regularizer=reg, seed=1),
}


@pytest.mark.parametrize(
    "posterior, prior, objective",
    [
        ("diag", "normal", "iwae"),
        ("full", "normal", "iwae"),
        ("iaf", "normal", "iwae"),
        ("iaf", "normal", "elbo"),
        ("diag", "mixture", "iwae"),
        ("diag", "vamp", "iwae"),
    ],
)
def test_every_posterior_and_prior_trains(posterior, prior, objective):
    encoder = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(8, "tanh")])
    priors = {
        "normal": lambda: None,
        "mixture": lambda: ke.MixturePrior(LATENT, 3, seed=1),
        "vamp": lambda: ke.VampPrior(encoder, 4, (FEATURES,), seed=1),
    }
    regularizer = ke.KLRegularizer(prior=priors[prior](), mode="auto", seed=1)
    x = keras.Input((FEATURES,))
    z = POSTERIORS[posterior](regularizer)(encoder(x))
    model = ke.ELBOModel(x, keras.layers.Dense(FEATURES)(z), objective=objective, num_samples=3)
    model.compile(optimizer="adam", loss=ke.BernoulliNLL(from_logits=True))
    before = [np.array(v) for v in model.trainable_weights]
    history = model.fit(DATA, DATA, epochs=1, batch_size=6, verbose=0).history
    assert np.isfinite(history["loss"]).all() and np.isfinite(history["kl"]).all()
    changed = [
        not np.allclose(a, np.array(v))
        for a, v in zip(before, model.trainable_weights, strict=True)
    ]
    assert all(changed)


@pytest.mark.parametrize("use_custom_objects", [False, True])
def test_saves_and_loads_with_its_objective(tmp_path, monkeypatch, use_custom_objects):
    model, posterior = vae(num_samples=4, dreg=True)
    posterior.inference = "mean"
    model.fit(DATA, DATA, epochs=1, batch_size=6, verbose=0)
    loaded = h.save_and_load(model, tmp_path / "iwae.keras", use_custom_objects, monkeypatch)
    assert isinstance(loaded, ke.ELBOModel)
    assert (loaded.objective, loaded.num_samples, loaded.dreg) == ("iwae", 4, True)
    np.testing.assert_allclose(
        loaded.predict(DATA, verbose=0), model.predict(DATA, verbose=0), rtol=1e-5, atol=1e-6
    )
    logs = loaded.evaluate(DATA, DATA, verbose=0, return_dict=True)
    assert "neg_iwae" in logs and np.isfinite(logs["loss"])


def test_evaluation_functions_work_on_an_iwae_model():
    model, _ = vae(num_samples=4)
    model.fit(DATA, DATA, epochs=1, batch_size=6, verbose=0)
    elbo = ke.evaluate_elbo(model, DATA, num_samples=4, seed=0, verbose=0)
    log_px = ke.importance_weighted_log_likelihood(model, DATA, num_samples=64, seed=0, verbose=0)
    assert log_px.shape == (len(DATA),) and np.isfinite(log_px).all()
    # log p(x) estimates sit above the ELBO in expectation: over 12 images, a
    # margin of zero is a loose check of order, not of size.
    assert log_px.mean() > elbo["elbo"].mean()


class SubclassedVAE(ke.ELBOModel):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.encoder = keras.layers.Dense(8, activation="tanh")
        self.posterior = ke.GaussianPosterior(LATENT, kl_regularizer=ke.KLRegularizer(), seed=0)
        self.decoder = keras.layers.Dense(FEATURES)

    def call(self, x, training=None):
        return self.decoder(self.posterior(self.encoder(x), training=training))


def test_subclassed_model_trains_the_bound():
    model = SubclassedVAE(objective="iwae", num_samples=3)
    model(DATA[:2])
    model.compile(optimizer="adam", loss=ke.BernoulliNLL(from_logits=True))
    logs = model.fit(DATA, DATA, epochs=1, batch_size=6, verbose=0).history
    assert np.isfinite(logs["neg_iwae"]).all()
    with pytest.raises(ValueError, match="functional ELBOModel"):
        SubclassedVAE(objective="iwae", num_samples=3, dreg=True).compile(
            loss=ke.BernoulliNLL(from_logits=True)
        )


def test_bad_arguments_are_refused():
    x = keras.Input((FEATURES,))
    out = keras.layers.Dense(FEATURES)(
        ke.GaussianPosterior(LATENT, kl_regularizer=ke.KLRegularizer())(x)
    )
    with pytest.raises(ValueError, match="objective"):
        ke.ELBOModel(x, out, objective="vimco")
    with pytest.raises(ValueError, match="num_samples"):
        ke.ELBOModel(x, out, num_samples=0)
    with pytest.raises(ValueError, match="dreg"):
        ke.ELBOModel(x, out, objective="elbo", num_samples=5, dreg=True)
    with pytest.raises(ValueError, match="log-likelihood"):
        ke.ELBOModel(x, out, objective="iwae", num_samples=5).compile(loss="mse")
    free_bits = ke.GaussianPosterior(LATENT, kl_regularizer=ke.KLRegularizer(free_bits=0.1))
    model = ke.ELBOModel(x, free_bits(x), objective="iwae", num_samples=2)
    with pytest.raises(ValueError, match="free_bits"):
        model.compile(loss=ke.GaussianNLL())
    flow = FlowPosterior(LATENT, num_flows=1, kl_regularizer=ke.KLRegularizer())
    model = ke.ELBOModel(x, flow(x), objective="iwae", num_samples=2, dreg=True)
    with pytest.raises(ValueError, match="flow"):
        model.compile(loss=ke.GaussianNLL())
    two = ke.GaussianPosterior(LATENT, kl_regularizer=ke.KLRegularizer())
    first = ke.GaussianPosterior(LATENT, kl_regularizer=ke.KLRegularizer())
    model = ke.ELBOModel(x, two(first(x)), objective="iwae", num_samples=2, dreg=True)
    with pytest.raises(ValueError, match="dreg=True.*one posterior layer.*has 2"):
        model.compile(loss=ke.GaussianNLL())
    left, right = (ke.GaussianPosterior(LATENT, kl_regularizer=ke.KLRegularizer()) for _ in "lr")
    side_by_side = keras.layers.Concatenate()([left(x), right(x)])
    model = ke.ELBOModel(x, keras.layers.Dense(LATENT)(side_by_side), num_samples=2)
    with pytest.raises(ValueError, match="2 posterior layers whose inputs depend on no other"):
        model.compile(loss=ke.GaussianNLL())


def test_dreg_with_one_sample_trains_without_warnings():
    # At K = 1 DReG is the path-derivative gradient of the ELBO; the normalised
    # weight is 1 (a softmax over one sample made Keras warn at every trace).
    model, _ = vae(num_samples=1, dreg=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*softmax.*", category=UserWarning)
        history = model.fit(DATA, DATA, epochs=1, batch_size=6, verbose=0).history
    assert np.isfinite(history["neg_iwae"]).all()


def test_skip_connection_around_the_posterior_trains():
    # Issue 17, point 9: a skip connection around the posterior failed inside
    # the step with a Concatenate shape error. The decoder part now gets the
    # model's inputs repeated for each of the K samples.
    x = keras.Input((FEATURES,))
    posterior = ke.GaussianPosterior(LATENT, kl_regularizer=ke.KLRegularizer(), seed=0)
    skip = keras.layers.Concatenate()([posterior(x), x])
    model = ke.ELBOModel(x, keras.layers.Dense(FEATURES)(skip), objective="iwae", num_samples=3)
    model.compile(keras.optimizers.Adam(1e-2), loss=ke.GaussianNLL())
    data = np.random.default_rng(0).normal(size=(16, FEATURES)).astype("float32")
    history = model.fit(data, data, epochs=2, batch_size=8, verbose=0).history
    assert np.all(np.isfinite(history["neg_iwae"]))
    assert model.predict(data, verbose=0).shape == (16, FEATURES)  # one sample in predict
