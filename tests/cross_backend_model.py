"""Saves or loads a model of every public layer, for tests/test_cross_backend.py.

Run as `KERAS_BACKEND=b python tests/cross_backend_model.py save|load DIR`:
`save` trains one epoch, writes `DIR/model.keras` and the model's predictions
(`inference="mean"`: deterministic) to `DIR/predictions.npy`; `load` loads the
file on this backend (with `compile=False`: an optimizer saved on one backend
need not restore on another) and writes `DIR/loaded.npy`.
"""

import pathlib
import sys

import keras
import numpy as np

import keras_elbo as ke

PIXELS = 8
DATA = (np.random.default_rng(0).random((32, PIXELS)) < 0.3).astype("float32")


def build():
    keras.utils.set_random_seed(0)
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
    z = keras.layers.Concatenate()([z1, z2, z3])
    model = ke.ELBOModel(x, keras.layers.Dense(PIXELS)(z))
    model.compile(keras.optimizers.Adam(1e-2), ke.BernoulliNLL(from_logits=True))
    return model


def main(action, folder):
    folder = pathlib.Path(folder)
    if action == "save":
        model = build()
        model.fit(DATA, DATA, epochs=1, batch_size=8, verbose=0)
        model.save(folder / "model.keras")
        np.save(folder / "predictions.npy", keras.ops.convert_to_numpy(model.predict(DATA)))
    else:
        model = keras.saving.load_model(folder / "model.keras", compile=False)
        np.save(folder / "loaded.npy", keras.ops.convert_to_numpy(model.predict(DATA)))


if __name__ == "__main__":
    main(*sys.argv[1:])
