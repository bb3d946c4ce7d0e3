"""Private helpers shared by the layers, `ELBOModel` and the estimators: nested
layers, the stochastic layers' `inference` switch, batches of data as
`Model.evaluate` takes them, and the split of a model at its posterior."""

import contextlib

import keras
import numpy as np


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


def batch_iterable(x):
    """`(elements, steps)` for batched data given as an iterable: a
    `keras.utils.PyDataset`, a Python generator or iterator, a PyTorch
    `DataLoader` (anything iterable that is not array-like); `None` for an
    array-like `x` (NumPy, a backend tensor, a list), which the callers cut
    themselves (as they do a `tf.data.Dataset`, checked first).

    Each element is `x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)`, as
    `Model.evaluate` takes them (a list, as a `DataLoader` collates, counts
    as a tuple), with tensors of any backend turned into NumPy arrays.
    `steps` is the number of batches, `None` where unknown.
    """
    if isinstance(x, keras.utils.PyDataset):
        steps = len(x)
        return (_numpy_element(x[i]) for i in range(steps)), steps
    if hasattr(x, "__array__") or isinstance(x, (list, tuple, dict)) or not hasattr(x, "__iter__"):
        return None
    steps = len(x) if hasattr(x, "__len__") else None
    return (_numpy_element(element) for element in x), steps


def _numpy_element(element):
    """A batch `x` or tuple of parts as NumPy arrays (dicts left as they are)."""
    if isinstance(element, (list, tuple)):
        return tuple(_numpy_part(part) for part in element)
    return _numpy_part(element)


def _numpy_part(part):
    if part is None or isinstance(part, dict):
        return part
    if isinstance(part, (list, tuple)):  # the inputs of a model of several
        return tuple(_numpy_part(p) for p in part)
    if hasattr(part, "detach"):  # a PyTorch tensor, which may require grad
        part = part.detach().cpu()
    return np.asarray(part)


def _graph(inputs, outputs):
    """`keras.Model(inputs, outputs)`, or `None` where `outputs` depend on
    tensors other than `inputs`.

    Keras 3.14 and later refuse such a graph themselves; older Keras builds
    it with the model's own input layers inside (and fails when it is
    called), so the input layers are counted as well.
    """
    try:
        graph = keras.Model(inputs, outputs)
    except ValueError:
        return None
    input_layers = [op for op in graph.operations if isinstance(op, keras.layers.InputLayer)]
    return graph if len(input_layers) == len(keras.tree.flatten(graph.inputs)) else None


def split_at(posteriors, model):
    """Functional `model` in the three parts a multi-sample step or an
    estimator runs: `(top, body, decoder, decoder_reads_inputs)`.

    `top` is the posterior of `posteriors` (the model's posterior layers)
    whose inputs depend on no other: the top of a hierarchy, whose samples
    the others descend from. `body` maps the model's inputs (flattened) to
    its input tensors, its features and then a conditional prior's inputs.
    `decoder` maps its samples to the model's outputs, through the other
    posteriors (the lower layers of a hierarchy); where the outputs also read
    the model's inputs other than through a posterior's samples (a
    conditional VAE's label, a skip connection, a lower layer's features of
    x), it takes `[samples, *inputs]` and `decoder_reads_inputs` is True.

    Raises `ValueError` unless exactly one posterior is on top.
    """
    inputs = keras.tree.flatten(model.input)
    tops = []
    for posterior in posteriors:
        body = keras.Model(inputs, keras.tree.flatten(posterior.input))
        # Its graph's operations (and the layers nested in them): `compile`,
        # where this runs, does not track a new model's layers.
        inside = [
            layer
            for op in body.operations
            if isinstance(op, keras.layers.Layer)
            for layer in find_layers(op, keras.layers.Layer)
        ]
        if not any(layer is not posterior and layer in posteriors for layer in inside):
            tops.append((posterior, body))
    if len(tops) != 1:
        names = [posterior.name for posterior, _ in tops]
        raise ValueError(
            f"Model '{model.name}' has {len(tops)} posterior layers whose inputs depend "
            f"on no other posterior's samples ({names}): several samples per example "
            "are drawn ancestrally from one on top, with the others below it (a top-down "
            "hierarchy, each lower posterior reading the samples above it)."
        )
    top, body = tops[0]
    decoder = _graph(top.output, model.outputs)
    if decoder is not None:
        return top, body, decoder, False
    return top, body, keras.Model([top.output, *inputs], model.outputs), True


def reads_inputs_past_posteriors(posteriors, model):
    """Whether the outputs of functional `model` depend on its inputs other
    than through the samples of `posteriors` (a skip connection)."""
    return _graph([posterior.output for posterior in posteriors], model.outputs) is None


def features_and_prior_inputs(body_outputs):
    """`(features, prior_inputs)` from what a `split_at` body returns: the
    posterior's features, and a conditional prior's inputs or `None` (a body
    of one output returns the tensor, not a list of one)."""
    if not isinstance(body_outputs, (list, tuple)):
        return body_outputs, None
    features, *prior_inputs = body_outputs
    return features, prior_inputs[0] if prior_inputs else None
