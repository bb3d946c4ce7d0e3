"""Private helpers for layers that hold other layers."""

import contextlib

import keras


def deserialize_nested(config, *keys):
    """A copy of `config` with the Keras objects serialized under `keys`
    (layers given as constructor arguments) deserialized, for `from_config`."""
    config = dict(config)
    for key in keys:
        config[key] = keras.saving.deserialize_keras_object(config[key])
    return config


def find_layers(model, cls):
    """Every layer of `model` (itself and nested ones, at any depth) that is an
    instance of `cls`, each once, in layer order.

    The one place that uses Keras's private `_flatten_layers`, stable across
    Keras 3: it walks sublayers held as attributes (a posterior's regularizer)
    and nested models, and skips a layer already seen (shared layers).
    """
    return [
        layer
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if isinstance(layer, cls)
    ]


def stochastic_layers(model):
    """The layers of `model` (nested ones included) with an `inference`
    switch (posteriors, Bayesian layers)."""
    return [
        layer
        for layer in find_layers(model, keras.layers.Layer)
        if isinstance(getattr(layer, "inference", None), str)
    ]


@contextlib.contextmanager
def sampling(layers):
    """Switches each of `layers` to `inference="sample"` for the duration,
    and back afterwards (also when the body raises).

    A layer reads `inference` when Keras traces it: make the traced function
    inside the block.
    """
    saved = [(layer, layer.inference) for layer in layers]
    try:
        for layer in layers:
            layer.inference = "sample"
        yield
    finally:
        for layer, inference in saved:
            layer.inference = inference
