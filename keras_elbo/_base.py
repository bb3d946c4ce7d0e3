"""Private base class for layers that hold a `KLRegularizer`."""

import keras


class ParentLayer(keras.layers.Layer):
    """A layer whose `metrics` lists its own metrics only, not its sublayers'.

    `Model.metrics` already visits every nested layer and adds each one's
    `metrics`; Keras's `Layer.metrics` also recurses into sublayers, so a metric
    owned by a layer nested in another layer (the KL metric of a
    `KLRegularizer` inside a posterior) would be listed twice, and
    `model.evaluate()` would return it twice. Layers of this library that own
    other layers derive from this class so that the KL is reported once.
    """

    @property
    def metrics(self):
        return list(self._metrics)
