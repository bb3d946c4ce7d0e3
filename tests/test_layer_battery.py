"""One battery of checks run on every public layer, after Keras's own layer test.

Modelled on `keras.src.testing.TestCase.run_layer_test` (private), written
with public Keras API only, as keras-hub's `tests/test_case.py` does. Each
stage is one test parametrised over the layers it applies to:

- the config survives JSON, `from_config` and `serialize_keras_object`;
- the counts of trainable and non-trainable weights and of seed generators
  once built, and no loss before a call;
- symbolic and eager calls give the same output shapes and dtypes, and an
  eager call adds the expected number of losses;
- under `mixed_float16`, the output follows the policy while the weights and
  the added KL stay float32;
- two steps of a tiny compiled model: the loss is finite and every trainable
  weight of the layer changes; then `model.save` and
  `keras.saving.load_model`, with and without `custom_objects`: weights and
  (deterministic) outputs equal. One test for both, for speed: building a
  model costs more than anything it checks.

Priors and weight posteriors (`MeanFieldWeights`, ...) take no input, and
`KLRegularizer` takes its posterior as a TFP distribution (with no symbolic
form) and returns its input unchanged: those layers are run inside a "host",
the `GaussianPosterior` whose KL they serve (for a weight posterior, the
`DenseVariational` it is the posterior of), for every stage that needs a
tensor input; their own weights are checked.
"""

import dataclasses
import json
from collections.abc import Callable

import keras
import numpy as np
import pytest

import keras_elbo as ke
from tests import _helpers as h

LATENT = 3
FEATURES = (5,)
BATCH = 4
# The non-trainable variables of every KLRegularizer, made by its `build`
# (which a posterior's or Bayesian layer's `build` calls): `kl_weight`, which
# a callback anneals, and the last batch's `last_kl` and `last_penalty`,
# which `ELBOModel` logs.
KL_NON_TRAINABLE = 3


def host_posterior(kl_regularizer):
    """The posterior through which a prior or a regularizer is run."""
    return ke.GaussianPosterior(LATENT, kl_regularizer=kl_regularizer, inference="mean", seed=2)


def wire_input_layer(layer, x):
    """Calls a layer that takes tensors; MADE's two outputs are concatenated."""
    outputs = layer(x)
    return keras.ops.concatenate(outputs, axis=-1) if isinstance(outputs, tuple) else outputs


def wire_regularizer(layer, x):
    return host_posterior(layer)(x)


def wire_prior(layer, x):
    # A VampPrior's encoder maps the data to the posterior's features: the
    # model uses it too, so that the prior and the data share it.
    features = layer.encoder(x) if isinstance(layer, ke.VampPrior) else x
    return host_posterior(ke.KLRegularizer(prior=layer, seed=1))(features)


def wire_discrete_prior(layer, x):
    # The prior of the discrete posterior of its shape.
    regularizer = ke.KLRegularizer(prior=layer, seed=1)
    if isinstance(layer, ke.BernoulliPrior):
        return ke.BernoulliPosterior(layer.latent_dim, kl_regularizer=regularizer, seed=2)(x)
    posterior = ke.CategoricalPosterior(
        layer.num_variables, layer.num_classes, kl_regularizer=regularizer, seed=2
    )
    # A conditional prior's p(z | c) of the input features themselves.
    return posterior(x, prior_inputs=x) if layer.conditional else posterior(x)


def wire_conditional_prior(layer, x):
    # p(z | c) of the input features themselves.
    return host_posterior(ke.KLRegularizer(prior=layer, seed=1))(x, prior_inputs=x)


def build_with_input(layer, input_shape):
    layer.build((None, *input_shape))


def build_regularizer(layer, input_shape):
    layer.build()  # its variables do not depend on any input


def built_at_construction(layer, input_shape):
    # A prior takes no input, so it makes its weights in `__init__`.
    assert layer.built


def build_weight_posterior(layer, input_shape):
    layer.build_parameters(input_shape[-1])


def wire_weight_posterior(layer, x):
    host = ke.DenseVariational(LATENT, posterior=layer, kl_weight=0.1, inference="mean", seed=2)
    return host(x)


def vamp_prior():
    encoder = keras.Sequential([keras.Input(FEATURES), keras.layers.Dense(4)], name="body")
    return ke.VampPrior(encoder, num_components=2, input_shape=FEATURES, seed=0)


@dataclasses.dataclass(frozen=True)
class Case:
    """A public layer and what the battery expects of it.

    `make` returns a fresh layer; `build` builds it as its kind is built;
    `wire` calls it (or its host) on a tensor and returns the tensor the
    model continues from, of shape `(batch, *output_shape)`. The counts are
    the layer's own, sublayers included, once built; `losses` is the number
    one call adds.
    """

    id: str
    make: Callable[[], keras.layers.Layer]
    trainable: int
    non_trainable: int
    seed_generators: int
    losses: int = 1
    input_shape: tuple = FEATURES
    output_shape: tuple = (LATENT,)
    build: Callable = build_with_input
    wire: Callable = wire_input_layer


CASES = [
    # Trainable: the projection's kernel and bias. Seed generators: the
    # posterior's samples and the regularizer's.
    Case(
        "GaussianPosterior-diag",
        lambda: ke.GaussianPosterior(
            LATENT, kl_regularizer=ke.KLRegularizer(seed=1), inference="mean", seed=2
        ),
        trainable=2,
        non_trainable=KL_NON_TRAINABLE,
        seed_generators=2,
    ),
    Case(
        "GaussianPosterior-full",
        lambda: ke.GaussianPosterior(
            LATENT,
            covariance="full",
            kl_regularizer=ke.KLRegularizer(mode="mc", seed=1),
            min_scale=1e-3,
            inference="mean",
            seed=2,
        ),
        trainable=2,
        non_trainable=KL_NON_TRAINABLE,
        seed_generators=2,
    ),
    # Trainable: the projection's 2, and the flow step's hidden kernel and
    # bias, output kernel and bias, and context kernel.
    Case(
        "FlowPosterior",
        lambda: ke.FlowPosterior(
            LATENT,
            num_flows=1,
            hidden_units=(8,),
            context=True,
            kl_regularizer=ke.KLRegularizer(seed=1),
            inference="mean",
            seed=2,
        ),
        trainable=2 + 5,
        non_trainable=KL_NON_TRAINABLE,
        seed_generators=2,
    ),
    # The masks are NumPy constants, not weights; no randomness, no loss.
    Case(
        "MADE",
        lambda: ke.MADE(hidden_units=(8, 8), activation="tanh", reverse=True),
        trainable=6,
        non_trainable=0,
        seed_generators=0,
        losses=0,
        input_shape=(LATENT,),
        output_shape=(2 * LATENT,),
    ),
    # A trainable prior inside a regularizer is the MixturePrior case's.
    Case(
        "KLRegularizer",
        lambda: ke.KLRegularizer(
            prior=ke.NormalPrior(LATENT, scale=2.0), mode="mc", num_samples=2, weight=0.5, seed=1
        ),
        trainable=0,
        non_trainable=KL_NON_TRAINABLE,
        seed_generators=1,
        build=build_regularizer,
        wire=wire_regularizer,
    ),
    Case(
        "NormalPrior",
        lambda: ke.NormalPrior(LATENT, loc=0.5, scale=2.0),
        trainable=0,
        non_trainable=0,
        seed_generators=0,
        build=built_at_construction,
        wire=wire_prior,
    ),
    # Trainable: the location and the raw scale of each dimension.
    Case(
        "NormalPrior-trainable",
        lambda: ke.NormalPrior(LATENT, loc=0.5, trainable_loc=True, trainable_scale=True),
        trainable=2,
        non_trainable=0,
        seed_generators=0,
        build=built_at_construction,
        wire=wire_prior,
    ),
    Case(
        "MixturePrior",
        lambda: ke.MixturePrior(LATENT, num_components=2, init_scale=0.5, seed=0),
        trainable=3,
        non_trainable=0,
        seed_generators=0,
        build=built_at_construction,
        wire=wire_prior,
    ),
    # latent_dim=None: the size is set from the host posterior.
    Case(
        "ScaleMixturePrior",
        lambda: ke.ScaleMixturePrior(mixture_weight=0.25, scale1=1.5, scale2=0.1),
        trainable=0,
        non_trainable=0,
        seed_generators=0,
        build=built_at_construction,
        wire=wire_prior,
    ),
    # Trainable: the pseudo-inputs, and the shared encoder's kernel and bias.
    Case(
        "VampPrior",
        vamp_prior,
        trainable=3,
        non_trainable=0,
        seed_generators=0,
        build=built_at_construction,
        wire=wire_prior,
    ),
    # Discrete latents: 2 variables of 3 classes. Non-trainable: the
    # regularizer's, and the Gumbel-softmax temperature.
    Case(
        "CategoricalPosterior-straight-through",
        lambda: ke.CategoricalPosterior(2, 3, kl_regularizer=ke.KLRegularizer(seed=1), seed=2),
        trainable=2,
        non_trainable=KL_NON_TRAINABLE,
        seed_generators=2,
        output_shape=(2, 3),
    ),
    Case(
        "CategoricalPosterior-gumbel-softmax",
        lambda: ke.CategoricalPosterior(
            2,
            3,
            estimator="gumbel_softmax",
            temperature=0.5,
            hard=True,
            unimix=0.01,
            flatten=True,
            kl_regularizer=ke.KLRegularizer(mode="mc", seed=1),
            seed=2,
        ),
        trainable=2,
        non_trainable=KL_NON_TRAINABLE + 1,
        seed_generators=2,
        output_shape=(6,),
    ),
    Case(
        "BernoulliPosterior",
        lambda: ke.BernoulliPosterior(
            LATENT,
            estimator="gumbel_softmax",
            kl_regularizer=ke.KLRegularizer(seed=1),
            inference="probs",
            seed=2,
        ),
        trainable=2,
        non_trainable=KL_NON_TRAINABLE + 1,
        seed_generators=2,
    ),
    # Trainable: the free logits.
    Case(
        "CategoricalPrior",
        lambda: ke.CategoricalPrior(2, 3, learned=True),
        trainable=1,
        non_trainable=0,
        seed_generators=0,
        output_shape=(2, 3),
        build=built_at_construction,
        wire=wire_discrete_prior,
    ),
    Case(
        "BernoulliPrior",
        lambda: ke.BernoulliPrior(LATENT, learned=True),
        trainable=1,
        non_trainable=0,
        seed_generators=0,
        build=built_at_construction,
        wire=wire_discrete_prior,
    ),
    Case(
        "ConditionalCategoricalPrior",
        lambda: ke.ConditionalCategoricalPrior(2, 3, unimix=0.01),
        trainable=2,
        non_trainable=0,
        seed_generators=0,
        output_shape=(2, 3),
        wire=wire_discrete_prior,
    ),
    # Trainable: the projection of the prior's inputs, kernel and bias.
    Case(
        "ConditionalGaussianPrior-diag",
        lambda: ke.ConditionalGaussianPrior(LATENT, min_scale=1e-3),
        trainable=2,
        non_trainable=0,
        seed_generators=0,
        wire=wire_conditional_prior,
    ),
    Case(
        "ConditionalGaussianPrior-full",
        lambda: ke.ConditionalGaussianPrior(LATENT, covariance="full"),
        trainable=2,
        non_trainable=0,
        seed_generators=0,
        wire=wire_conditional_prior,
    ),
    Case(
        "ConditionalMixturePrior",
        lambda: ke.ConditionalMixturePrior(LATENT, num_components=2),
        trainable=2,
        non_trainable=0,
        seed_generators=0,
        wire=wire_conditional_prior,
    ),
    # Trainable: q(w)'s loc and raw scale, each flat over the kernel and
    # bias (held by the layer's MeanFieldWeights). Non-trainable: its own
    # KLRegularizer's. Seed generators: the layer's and the regularizer's.
    Case(
        "BayesianDense",
        lambda: ke.BayesianDense(
            4, activation="tanh", kl_weight=1 / 64, estimator="flipout", seed=0
        ),
        trainable=2,
        non_trainable=KL_NON_TRAINABLE,
        seed_generators=2,
        output_shape=(4,),
    ),
    Case(
        "BayesianDense-local",
        lambda: ke.BayesianDense(
            4, kl_weight=1 / 64, estimator="local_reparameterization", kl_mode="mc", seed=0
        ),
        trainable=2,
        non_trainable=KL_NON_TRAINABLE,
        seed_generators=2,
        output_shape=(4,),
    ),
    Case(
        "BayesianConv1D",
        lambda: ke.BayesianConv1D(
            2, 3, padding="same", kl_weight=1 / 64, estimator="flipout", seed=0
        ),
        trainable=2,
        non_trainable=KL_NON_TRAINABLE,
        seed_generators=2,
        input_shape=(6, 2),
        output_shape=(6, 2),
    ),
    Case(
        "BayesianConv2D",
        lambda: ke.BayesianConv2D(
            2, 3, padding="same", kl_weight=1 / 64, prior=ke.NormalPrior(scale=0.5), seed=0
        ),
        trainable=2,
        non_trainable=KL_NON_TRAINABLE,
        seed_generators=2,
        input_shape=(6, 6, 2),
        output_shape=(6, 6, 2),
    ),
    Case(
        "BayesianConv3D",
        lambda: ke.BayesianConv3D(
            2, 2, padding="same", kl_weight=1 / 64, prior=ke.ScaleMixturePrior(), seed=0
        ),
        trainable=2,
        non_trainable=KL_NON_TRAINABLE,
        seed_generators=2,
        input_shape=(3, 3, 3, 2),
        output_shape=(3, 3, 3, 2),
    ),
    # Trainable: the posterior's 2 and the trainable prior's 3 (P = 5 * 4 + 4;
    # two components, since one component's logit gets no gradient).
    Case(
        "DenseVariational-mean-field",
        lambda: ke.DenseVariational(
            4,
            posterior=ke.MeanFieldWeights(scale_init=0.05),
            prior=ke.MixturePrior(24, num_components=2, seed=0),
            kl_weight=1 / 64,
            inference="mean",
            seed=0,
        ),
        trainable=2 + 3,
        non_trainable=KL_NON_TRAINABLE,
        seed_generators=2,
        output_shape=(4,),
    ),
    # Trainable: the location and the lower-triangular scale's entries.
    Case(
        "DenseVariational-full",
        lambda: ke.DenseVariational(
            2,
            posterior=ke.FullCovarianceWeights(scale_init=0.05),
            prior=ke.NormalPrior(scale=0.5),
            kl_weight=1 / 64,
            kl_use_exact=True,
            inference="mean",
            seed=0,
        ),
        trainable=2,
        non_trainable=KL_NON_TRAINABLE,
        seed_generators=2,
        output_shape=(2,),
    ),
    # Posteriors over weights take no input: built as their layer builds
    # them (with P = 5 here), run inside a DenseVariational.
    Case(
        "MeanFieldWeights",
        lambda: ke.MeanFieldWeights(scale_init=0.05),
        trainable=2,
        non_trainable=0,
        seed_generators=0,
        build=build_weight_posterior,
        wire=wire_weight_posterior,
    ),
    Case(
        "FullCovarianceWeights",
        lambda: ke.FullCovarianceWeights(scale_init=0.05),
        trainable=2,
        non_trainable=0,
        seed_generators=0,
        build=build_weight_posterior,
        wire=wire_weight_posterior,
    ),
]


each_layer = pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)


def data(case, n=BATCH, seed=0):
    return np.random.default_rng(seed).normal(size=(n, *case.input_shape)).astype("float32")


def tiny_model(case, layer):
    """A model around the layer: its output, flattened, to one Dense unit."""
    x = keras.Input(case.input_shape)
    y = case.wire(layer, x)
    if len(case.output_shape) > 1:
        y = keras.layers.Flatten()(y)
    return keras.Model(x, keras.layers.Dense(1, name="head")(y))


def counts(layer):
    # Layer.variables is the weights plus one state variable per seed
    # generator (metric variables are in neither).
    return {
        "trainable": len(layer.trainable_weights),
        "non_trainable": len(layer.non_trainable_weights),
        "seed_generators": len(layer.variables) - len(layer.weights),
    }


def expected_counts(case):
    return {k: getattr(case, k) for k in ("trainable", "non_trainable", "seed_generators")}


@pytest.fixture
def mixed_precision():
    """Sets the global policy to mixed_float16 for one test, then restores it."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def to_json(config):
    return json.dumps(config, sort_keys=True)


@each_layer
def test_config_round_trips_through_json(case):
    layer = case.make()
    config = to_json(layer.get_config())
    clone = type(layer).from_config(json.loads(config))
    # Compared as JSON, as a .keras file holds it (a tuple reads back as a list).
    assert to_json(clone.get_config()) == config
    assert set(dir(clone)) == set(dir(layer))
    serialized = to_json(keras.saving.serialize_keras_object(layer))
    revived = keras.saving.deserialize_keras_object(json.loads(serialized))
    assert type(revived) is type(layer)
    assert to_json(revived.get_config()) == config


@each_layer
def test_weights_and_seed_generators_once_built(case):
    layer = case.make()
    case.build(layer, case.input_shape)
    assert layer.built
    assert counts(layer) == expected_counts(case)
    assert all(w.dtype == "float32" for w in layer.weights)
    assert len(layer.losses) == 0  # losses come from calls


@each_layer
def test_symbolic_and_eager_calls_agree(case):
    layer = case.make()
    x = keras.Input(case.input_shape)
    symbolic = case.wire(layer, x)
    # Built by a symbolic call rather than by `build`: the same weights.
    assert counts(layer) == expected_counts(case)
    model = keras.Model(x, symbolic)
    model(data(case))
    assert len(model.losses) == case.losses  # one KL per call, none for MADE
    eager = case.wire(case.make(), data(case))  # a fresh layer, built eagerly
    assert tuple(symbolic.shape) == (None, *case.output_shape)
    assert tuple(eager.shape) == (BATCH, *case.output_shape)
    assert keras.backend.standardize_dtype(symbolic.dtype) == "float32"
    assert keras.backend.standardize_dtype(eager.dtype) == "float32"


@each_layer
def test_mixed_precision(case, mixed_precision):
    layer = case.make()
    x = keras.Input(case.input_shape)
    model = keras.Model(x, case.wire(layer, x))
    output = model(data(case))
    assert keras.backend.standardize_dtype(output.dtype) == "float16"
    assert all(w.dtype == "float32" for w in layer.weights)
    assert len(model.losses) == case.losses
    # The KL is computed and added in float32: float16 overflows at 65504.
    assert all(keras.backend.standardize_dtype(loss.dtype) == "float32" for loss in model.losses)
    if case.wire is wire_input_layer:
        # As Keras's layer test: the layer's own output spec, asked outside
        # __call__, gives the dtype its call returns.
        spec = layer.compute_output_spec(keras.KerasTensor((BATCH, *case.input_shape), "float16"))
        outputs = keras.tree.flatten(layer(data(case)))
        for tensor, s in zip(outputs, keras.tree.flatten(spec), strict=True):
            assert keras.backend.standardize_dtype(tensor.dtype) == s.dtype


@each_layer
@pytest.mark.slow
def test_trains_then_saves_and_loads(case, tmp_path, monkeypatch):
    keras.utils.set_random_seed(0)
    layer = case.make()
    model = tiny_model(case, layer)
    # Eager, for speed (tracing a step costs seconds per layer): the graph
    # and XLA steps are fitted in test_model, test_flows and test_bayesian.
    model.compile(keras.optimizers.Adam(1e-2), "mse", run_eagerly=True)
    before = [w.numpy().copy() for w in layer.trainable_weights]
    x = data(case, n=2 * BATCH)
    y = np.random.default_rng(1).normal(size=(2 * BATCH, 1)).astype("float32")
    # Two steps: a fresh MADE's output kernel is zero, so its hidden kernels
    # get no gradient at the first step.
    history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0).history
    assert np.all(np.isfinite(history["loss"]))
    for b, w in zip(before, layer.trainable_weights, strict=True):
        assert not np.array_equal(b, w.numpy()), w.path
    # Trained weights, so that a weight the file misses cannot pass by being
    # initialised again to the same value. Deterministic outputs: posteriors
    # with inference="mean", Bayesian layers with their default
    # inference="mean", MADE without randomness.
    expected = h.numpy(model(x, training=False))
    # Loaded as registered at import, then with the library's classes
    # unregistered and `ke.custom_objects()` given instead.
    for use_custom_objects in (False, True):
        path = tmp_path / f"custom_{use_custom_objects}.keras"
        loaded = h.save_and_load(model, path, use_custom_objects, monkeypatch)
        assert len(loaded.weights) == len(model.weights)
        for a, b in zip(model.weights, loaded.weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
        np.testing.assert_allclose(h.numpy(loaded(x, training=False)), expected, rtol=1e-6)
