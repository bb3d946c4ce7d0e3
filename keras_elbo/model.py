"""`ELBOModel`: a Keras model that logs the parts of the ELBO."""

import keras

# Private Keras classes, needed to build a functional `ELBOModel` without
# Keras's `inject_functional_model_class`, which would rewrite
# `ELBOModel.__bases__` for good and break subclassing it afterwards.
from keras.src.models.functional import Functional
from keras.src.models.model import functional_init_arguments
from keras.src.trainers.trainer import Trainer
from keras.src.utils.naming import auto_name

from keras_elbo import _backend
from keras_elbo._base import find_layers
from keras_elbo.divergence import KLRegularizer


def _metric_names(model, regularizers):
    """The name under which each regularizer's KL is logged.

    A regularizer's own `metric_name` where given; otherwise `"kl"` when it is
    the model's only one, else the name of the layer that holds it (its
    posterior or Bayesian layer) followed by `"_kl"`.
    """
    owners = {}
    for layer in find_layers(model, keras.layers.Layer):
        regularizer = getattr(layer, "kl_regularizer", None)
        if isinstance(regularizer, KLRegularizer):
            owners.setdefault(id(regularizer), layer.name)
    names = []
    for regularizer in regularizers:
        if regularizer.metric_name is not None:
            names.append(regularizer.metric_name)
        elif len(regularizers) == 1:
            names.append("kl")
        else:
            names.append(f"{owners.get(id(regularizer), regularizer.name)}_kl")
    taken = {"loss", "reconstruction", "neg_elbo"}
    for regularizer, name in zip(regularizers, names, strict=True):
        if name in taken or names.count(name) > 1:
            raise ValueError(
                f"Two KL terms of model '{model.name}' would be logged as '{name}' "
                f"(KLRegularizer '{regularizer.name}'), or the name is taken by another "
                "log entry: give each KLRegularizer its own `metric_name`."
            )
        taken.add(name)
    return names


class ELBOModel(keras.Model):
    """A `keras.Model` that logs the KL of each regularizer, the reconstruction
    and the negative ELBO.

    Build it as any Keras model: functional (`ELBOModel(inputs, outputs)`) or
    by subclassing. It trains exactly as `keras.Model` does (the same `loss`),
    and adds to the logs of `fit` and `evaluate` (with `val_` twins):

    - one entry per `KLRegularizer` of the model: its unweighted KL in nats
      per example, named by the regularizer's `metric_name` (by default
      `"kl"` for a single regularizer, `"<layer name>_kl"` for several);
    - `"reconstruction"`: the compiled loss alone (the negative
      log-likelihood of a loss such as `BernoulliNLL`);
    - `"neg_elbo"`: the loss with every KL at weight 1 and without free
      bits, i.e. `reconstruction + sum(kl)` plus any other added loss (weight
      decay, say). During KL annealing or with free bits `loss` is the
      weighted objective, which changes meaning from epoch to epoch;
      `neg_elbo` does not: monitor `"val_neg_elbo"` in `EarlyStopping` and
      `ModelCheckpoint`.

    It also checks each batch's inputs for NaN and Inf (on TensorFlow) and
    stops `fit` with an error before any weight is updated. A plain
    `keras.Model` cannot promise that: an input NaN can pass through a layer
    that maps it to a finite value (TensorFlow's oneDNN fused Dense + ReLU
    returns 0) while its gradient is NaN, and the weights are silently
    corrupted. The checks are runtime assertions, which XLA drops: with
    `jit_compile=True` they do not run.

    The KL terms are found when the model is compiled: compile after every
    posterior and Bayesian layer exists (for a subclassed model, after
    `__init__`).

    Formula:

    ```python
    loss = reconstruction + sum_r(kl_weight_r * objective_r) + other_losses
    neg_elbo = reconstruction + sum_r(kl_r) + other_losses
    # objective_r = kl_r, or sum_j(max(free_bits, kl_rj)) with free bits
    ```

    Example:

    >>> import numpy as np
    >>> import keras_elbo as ke
    >>> x = keras.Input((6,))
    >>> z = ke.GaussianPosterior(2, kl_regularizer=ke.KLRegularizer(), seed=0)(x)
    >>> model = ke.ELBOModel(x, keras.layers.Dense(6)(z))
    >>> model.compile(optimizer="adam", loss=ke.BernoulliNLL(from_logits=True))
    >>> data = np.ones((8, 6), "float32")
    >>> logs = model.evaluate(data, data, verbose=0, return_dict=True)
    >>> sorted(logs)
    ['kl', 'loss', 'neg_elbo', 'reconstruction']
    >>> bool(np.isclose(logs["neg_elbo"], logs["reconstruction"] + logs["kl"]))
    True
    """

    def __new__(cls, *args, **kwargs):
        if cls is ELBOModel and functional_init_arguments(args, kwargs):
            return super().__new__(_FunctionalELBOModel, *args, **kwargs)
        return super().__new__(cls, *args, **kwargs)

    def compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)
        self.kl_regularizers = find_layers(self, KLRegularizer)
        names = _metric_names(self, self.kl_regularizers)
        self.kl_trackers = [keras.metrics.Mean(name=name) for name in names]
        self.reconstruction_tracker = keras.metrics.Mean(name="reconstruction")
        self.neg_elbo_tracker = keras.metrics.Mean(name="neg_elbo")

    def compile_from_config(self, config):
        # Keras skips an overridden `compile` when loading; this is its own
        # `compile_from_config`, calling ours.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    @property
    def metrics(self):
        metrics = super().metrics
        if self.compiled and hasattr(self, "kl_trackers"):
            # After `loss`, before compiled and sublayer metrics.
            head = 1 if metrics and metrics[0] is self._loss_tracker else 0
            ours = [*self.kl_trackers, self.reconstruction_tracker, self.neg_elbo_tracker]
            metrics = metrics[:head] + ours + [m for m in metrics[head:] if m not in ours]
        return metrics

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training=training)
        inputs = [
            t
            for t in keras.tree.flatten(x)
            if t is not None and keras.backend.is_float_dtype(t.dtype)
        ]
        if inputs:
            gate = _backend.finite_gate(
                inputs,
                f"ELBOModel '{self.name}': the inputs of this batch contain NaN or Inf. "
                "Remove or impute them before training",
            )
            loss = loss * keras.ops.cast(gate, loss.dtype)
        if not hasattr(self, "kl_trackers"):
            return loss
        added = [self._aggregate_additional_loss(value) for value in self.losses]
        reconstruction = loss - keras.ops.sum(keras.ops.stack(added)) if added else loss
        neg_elbo = loss
        batch_size = keras.ops.shape(keras.tree.flatten(x)[0])[0]
        for regularizer, tracker in zip(self.kl_regularizers, self.kl_trackers, strict=True):
            if not regularizer.built:
                raise ValueError(
                    f"KLRegularizer '{regularizer.name}' was not called by the model "
                    f"'{self.name}': ELBOModel logs the KL of the regularizers it finds "
                    "when compiled, each of which must be used in the model's call."
                )
            kl = keras.ops.cast(regularizer.last_kl, loss.dtype)
            penalty = keras.ops.cast(regularizer.last_penalty, loss.dtype)
            neg_elbo = neg_elbo - penalty + kl
            tracker.update_state(kl, sample_weight=batch_size)
        self.reconstruction_tracker.update_state(reconstruction, sample_weight=batch_size)
        self.neg_elbo_tracker.update_state(neg_elbo, sample_weight=batch_size)
        return loss


@keras.saving.register_keras_serializable(package="keras_elbo", name="ELBOModel")
class _FunctionalELBOModel(ELBOModel, Functional):
    """What `ELBOModel(inputs, outputs)` returns: an `ELBOModel` that is also a
    functional model, saved and loaded as `keras_elbo>ELBOModel`."""

    def __init__(self, inputs, outputs, name=None, **kwargs):
        Trainer.__init__(self)
        name = name or auto_name("ELBOModel")
        Functional.__init__(self, inputs, outputs, name=name, **kwargs)
