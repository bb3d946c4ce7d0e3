"""Saves or loads models of every public layer and a distribution output, for
tests/test_cross_backend.py.

Run as `KERAS_BACKEND=b python tests/cross_backend_model.py DIR b [--load=SRC]...
[--save]`. Each `--load=SRC` loads the files that backend SRC saved in
`DIR/SRC/`, on this backend with `compile=False`, and writes the predictions
to `DIR/SRC/on_b/<name>_loaded.npy`; then loads each compiled, records the
restored optimizer's step count and trains one epoch
(`DIR/SRC/on_b/<name>_compiled.json`), and rebuilds every distribution output
from its saved config and writes its losses on the same parameters and
targets (`outputs_loaded.json`). `--save` trains each model one epoch and
writes `DIR/b/<name>.keras`, the model's predictions (`inference="mean"`:
deterministic, `<name>_predictions.npy`) and every distribution output
(`keras_elbo.outputs`) as its config with its per-example losses on fixed
parameters and targets (`outputs.json`). Each process also lists in
`DIR/imported/<b>-<pid>.json` the TensorFlow and TFP modules it imported
before its first `model.save` (or by its end): none may be on JAX and
PyTorch (TensorFlow reserves a GPU's memory when imported, and costs
seconds). Saving is left out because Keras's own serializer imports an
installed TensorFlow on every backend (`serialize_keras_object` checks for
`tf.TensorShape`; Keras 3.15), as `keras.utils.set_random_seed` does.
"""

import json
import os
import pathlib
import sys

import keras
import numpy as np

import keras_elbo as ke

PIXELS = 8
DATA = (np.random.default_rng(0).random((32, PIXELS)) < 0.3).astype("float32")


# No `keras.utils.set_random_seed`: it imports TensorFlow on every backend
# where it is installed (to seed it too), which would hide whether the
# library does. The weights need not repeat between runs: each process
# compares what it loads with what the saving process predicted.


def record_imports(folder, backend):
    """Writes, once per process, the TensorFlow and TFP modules imported so far."""
    path = folder / "imported" / f"{backend}-{os.getpid()}.json"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        imported = [m for m in ("tensorflow", "tensorflow_probability") if m in sys.modules]
        path.write_text(json.dumps(imported))


def build():
    body = keras.Sequential(
        [keras.Input((PIXELS,)), keras.layers.Dense(8, activation="tanh")], name="body"
    )
    x = keras.Input((PIXELS,))
    h = body(x)
    mixture = ke.KLRegularizer(prior=ke.MixturePrior(3, 4, seed=0), metric_name="kl_mixture")
    z1 = ke.GaussianPosterior(3, kl_regularizer=mixture, inference="mean", seed=1)(h)
    full = ke.KLRegularizer(prior=ke.NormalPrior(2, scale=2.0), metric_name="kl_full")
    z2 = ke.GaussianPosterior(2, covariance="full", kl_regularizer=full, inference="mean")(h)
    vamp = ke.VampPrior(body, 3, (PIXELS,), activation="sigmoid", seed=2)
    z3 = ke.GaussianPosterior(
        2, kl_regularizer=ke.KLRegularizer(prior=vamp, metric_name="kl_vamp"), inference="mean"
    )(h)
    # A conditional prior, p(z | c) of features of the data.
    conditional = ke.KLRegularizer(
        prior=ke.ConditionalGaussianPrior(2, covariance="full"), balance=0.8, metric_name="kl_cond"
    )
    context = keras.layers.Dense(3, activation="tanh", name="context")(x)
    z4 = ke.GaussianPosterior(2, kl_regularizer=conditional, inference="mean", seed=3)(
        h, prior_inputs=context
    )
    # A conditional mixture prior (Monte Carlo KL) of the same context.
    conditional_mixture = ke.KLRegularizer(
        prior=ke.ConditionalMixturePrior(2, num_components=2), mode="mc", metric_name="kl_cmix"
    )
    z5 = ke.GaussianPosterior(2, kl_regularizer=conditional_mixture, inference="mean", seed=4)(
        h, prior_inputs=context
    )
    # Discrete latents with learned priors (their modes: deterministic).
    categorical = ke.KLRegularizer(
        prior=ke.CategoricalPrior(2, 3, learned=True), metric_name="kl_cat"
    )
    z6 = ke.CategoricalPosterior(
        2, 3, estimator="gumbel_softmax", hard=True, flatten=True, kl_regularizer=categorical
    )(h)
    # A world model's categorical state: p(z | c) computed from the context.
    dreamer = ke.KLRegularizer(
        prior=ke.ConditionalCategoricalPrior(2, 2, unimix=0.01),
        balance=0.8,
        free_nats=0.5,
        metric_name="kl_state",
    )
    z8 = ke.CategoricalPosterior(2, 2, unimix=0.01, flatten=True, kl_regularizer=dreamer)(
        h, prior_inputs=context
    )
    bits = ke.KLRegularizer(prior=ke.BernoulliPrior(2, learned=True), metric_name="kl_bits")
    z7 = ke.BernoulliPosterior(2, unimix=0.01, kl_regularizer=bits, seed=6)(h)
    z = keras.layers.Concatenate()([z1, z2, z3, z4, z5, z6, z7, z8])
    model = ke.ELBOModel(x, keras.layers.Dense(PIXELS)(z))
    model.compile(keras.optimizers.Adam(1e-2), ke.BernoulliNLL(from_logits=True))
    return model


def build_regression():
    """Bayesian convolutions, dense and variational layers, a mixture output."""
    x = keras.Input((PIXELS,))
    steps = keras.layers.Reshape((PIXELS, 1))(x)
    h1 = ke.BayesianConv1D(2, 3, inference="mean", seed=1)(steps)
    cube = keras.layers.Reshape((2, 2, 2, 1))(x)
    h3 = ke.BayesianConv3D(1, 2, estimator="flipout", inference="mean", seed=2)(cube)
    h = keras.layers.Concatenate()([keras.layers.Flatten()(h1), keras.layers.Flatten()(h3)])
    h = ke.BayesianDense(4, estimator="local_reparameterization", inference="mean", seed=3)(h)
    h = ke.DenseVariational(
        4, posterior=ke.FullCovarianceWeights(), kl_weight=1 / 32, inference="mean", seed=4
    )(h)
    model = ke.ELBOModel(x, keras.layers.Dense(ke.MixtureNormal.params_size(2, 1))(h))
    model.compile(keras.optimizers.Adam(1e-2), ke.MixtureNormal(2, 1))
    return model


MODELS = {"vae": (build, DATA), "regression": (build_regression, DATA[:, :1] * 2.0 - 1.0)}

# One instance of every distribution output, with non-default arguments where
# the class has them, and targets it accepts (labels, counts, bits, reals).
_RNG = np.random.default_rng(1)
OUTPUTS = {
    "IndependentNormal": (ke.IndependentNormal((2, 2)), _RNG.normal(size=(4, 2, 2))),
    "IndependentNormal-fixed": (ke.IndependentNormal(2, scale=0.5), _RNG.normal(size=(4, 2))),
    "IndependentLogistic": (ke.IndependentLogistic(2), _RNG.normal(size=(4, 2))),
    "IndependentStudentT": (ke.IndependentStudentT(2), _RNG.normal(size=(4, 2))),
    "IndependentStudentT-df": (ke.IndependentStudentT(2, df=3.0), _RNG.normal(size=(4, 2))),
    "IndependentBernoulli": (ke.IndependentBernoulli(3), _RNG.random((4, 3)) < 0.5),
    "IndependentPoisson": (ke.IndependentPoisson(3), _RNG.poisson(2.0, size=(4, 3))),
    "MultivariateNormalTriL": (ke.MultivariateNormalTriL(3), _RNG.normal(size=(4, 3))),
    "OneHotCategorical": (ke.OneHotCategorical(3), np.eye(3)[[0, 2, 1, 1]]),
    "Categorical": (ke.Categorical(3), np.array([0, 2, 1, 1])),
    "MixtureNormal": (ke.MixtureNormal(2, 2), _RNG.normal(size=(4, 2))),
    "MixtureLogistic": (ke.MixtureLogistic(3), _RNG.normal(size=(4, 1))),
}


def output_losses(outputs):
    """Each output's per-example negative log-likelihoods on fixed inputs."""
    losses = {}
    for name, (output, targets) in OUTPUTS.items():
        params = np.random.default_rng(2).normal(size=(4, output.params_size))
        values = outputs[name].call(targets.astype("float32"), params.astype("float32"))
        losses[name] = keras.ops.convert_to_numpy(values).tolist()
    return losses


def save(folder):
    folder.mkdir(parents=True)
    for name, (make, targets) in MODELS.items():
        model = make()
        model.fit(DATA, targets, epochs=1, batch_size=8, verbose=0)
        record_imports(folder.parent, keras.backend.backend())
        model.save(folder / f"{name}.keras")
        predictions = keras.ops.convert_to_numpy(model.predict(DATA, verbose=0))
        np.save(folder / f"{name}_predictions.npy", predictions)
    outputs = {name: output for name, (output, _) in OUTPUTS.items()}
    configs = {name: keras.saving.serialize_keras_object(o) for name, o in outputs.items()}
    record = {"configs": configs, "losses": output_losses(outputs)}
    (folder / "outputs.json").write_text(json.dumps(record))


def load(source, target):
    target.mkdir()
    for name, (_, targets) in MODELS.items():
        model = keras.saving.load_model(source / f"{name}.keras", compile=False)
        predictions = keras.ops.convert_to_numpy(model.predict(DATA, verbose=0))
        np.save(target / f"{name}_loaded.npy", predictions)
        # Compiled too: the optimizer is this backend's, its state restored,
        # and the model trains on (a PyTorch optimizer failed at `fit`).
        model = keras.saving.load_model(source / f"{name}.keras")
        steps = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
        loss = model.fit(DATA, targets, epochs=1, batch_size=8, verbose=0).history["loss"]
        compiled = {"iterations": steps, "loss": loss[0]}
        (target / f"{name}_compiled.json").write_text(json.dumps(compiled))
    configs = json.loads((source / "outputs.json").read_text())["configs"]
    outputs = {
        name: keras.saving.deserialize_keras_object(config) for name, config in configs.items()
    }
    (target / "outputs_loaded.json").write_text(json.dumps(output_losses(outputs)))


def main(folder, backend, *options):
    folder = pathlib.Path(folder)
    if backend != keras.backend.backend():
        raise SystemExit(f"KERAS_BACKEND is {keras.backend.backend()}, not {backend}")
    for option in options:
        if option.startswith("--load="):
            source = option.removeprefix("--load=")
            load(folder / source, folder / source / f"on_{backend}")
        elif option == "--save":
            save(folder / backend)
        else:
            raise SystemExit(f"unknown option {option!r}")
    record_imports(folder, backend)


if __name__ == "__main__":
    main(*sys.argv[1:])
