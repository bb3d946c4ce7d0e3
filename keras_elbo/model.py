"""`ELBOModel`: a Keras model that logs the parts of the ELBO and trains
single- or multi-sample objectives (the averaged ELBO, the importance-weighted
bound)."""

import contextlib
import inspect
import threading

import keras
from keras import ops

# Private Keras classes, needed to build a functional `ELBOModel` without
# Keras's `inject_functional_model_class`, which would rewrite
# `ELBOModel.__bases__` for good and break subclassing it afterwards.
from keras.src.losses.loss import scale_loss_for_distribution, unscale_loss_for_distribution
from keras.src.models.functional import Functional
from keras.src.models.model import functional_init_arguments
from keras.src.trainers.trainer import Trainer
from keras.src.utils.naming import auto_name
from keras.src.utils.tracking import no_automatic_dependency_tracking

from keras_elbo import _backend, _math
from keras_elbo import _objectives as objectives
from keras_elbo._base import (
    features_and_prior_inputs,
    find_layers,
    sampling,
    split_at,
    stochastic_layers,
)
from keras_elbo.discrete import relaxed_samples_error
from keras_elbo.divergence import KLRegularizer, _batch_mean, stop_parameter_gradients
from keras_elbo.flows import FlowPosterior
from keras_elbo.losses import is_reconstruction_loss
from keras_elbo.posteriors import MultiSampleDraws, Posterior, drawing

OBJECTIVES = ("elbo", "iwae")


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

    `evaluate` (and the `val_` logs of `fit`) samples every posterior and
    Bayesian layer of the model, whatever its `inference` says: the logged
    terms are the ELBO, an expectation over q, and a reconstruction at the
    posterior mean could even lie below -log p(x). `predict` and direct
    calls still honour `inference`.

    It also checks each batch's inputs for NaN and Inf (on TensorFlow) and
    stops `fit` with an error before any weight is updated. A plain
    `keras.Model` cannot promise that: an input NaN can pass through a layer
    that maps it to a finite value (TensorFlow's oneDNN fused Dense + ReLU
    returns 0) while its gradient is NaN, and the weights are silently
    corrupted. The checks are runtime assertions, which XLA drops: with
    `jit_compile=True` they do not run.

    Sample weights (`sample_weight`, `class_weight`) weigh each example's
    KL as Keras weighs its reconstruction, so that the loss and the logs are
    the weighted ELBO, `sum_i w_i (reconstruction_i + KL_i) / batch_size`
    (the KL of a Bayesian layer's weights, which belongs to no example, is
    left alone). It takes one weight per example, shape `(batch,)`, in its
    train and test steps (`fit`, `evaluate`, `train_on_batch`); a plain
    `keras.Model` adds the KL unweighted, as Keras adds any layer's loss.

    The KL terms are found when the model is compiled: compile after every
    posterior and Bayesian layer exists (for a subclassed model, after
    `__init__`).

    Multi-sample objectives. With `num_samples=K > 1` the model's
    posterior draws K samples per example in `fit` and `evaluate`, and the
    decoder runs once on all `K * batch` of them (sample-major: the model's
    output has `K * batch` rows there; `predict` is unchanged). In a
    hierarchy of posteriors (a top-down one: `z_L ~ q(z_L | x)`, then each
    `z_l ~ q(z_l | x, z_{l+1})` against a conditional prior `p(z_l |
    z_{l+1})`) the top posterior draws the K samples and each lower one draws
    one sample per row, so that each of the K is drawn ancestrally through
    every layer. With `objective="elbo"` the loss is the ELBO averaged over
    the K samples; with `objective="iwae"` it is the importance-weighted
    bound of Burda et al. (2016), tighter as K grows:

    ```python
    log_w[k] = log p(x|z_k) + sum_l kl_weight_l * (log p(z_l,k | z_l+1,k)
                                                  - log q(z_l,k | x, z_l+1,k))
    loss = -mean_over_batch(logsumexp_k(log_w) - log(K)) + other_losses
    ```

    logged as `loss`; `neg_iwae` is the same at `kl_weight=1` (the bound),
    and `kl`, `reconstruction` (averaged over the samples) and `neg_elbo` are
    logged beside it for reference. Under `"iwae"` a `kl_weight` below 1
    (annealing) tempers the prior-to-posterior ratio inside the bound, a
    warm-up that reaches the bound at weight 1 (with `dreg=True` too: the
    gradient is then the tempered bound's); free bits have no meaning there
    and are refused. In a functional model the part after the posterior
    gets the model's inputs it reads (a skip connection around the
    posterior, a conditional VAE's label) repeated K times; a subclassed
    model's decoder must take the `K * batch` samples alone. The compiled
    loss must give each example's negative log-likelihood
    (`keras_elbo.losses`, `keras_elbo.outputs`). `dreg=True` trains the
    bound with the doubly reparameterised gradient of Tucker et al. (2019):
    the encoder's gradient no longer loses its signal-to-noise ratio as K
    grows (Rainforth et al., 2018). It costs one more pass of the decoder
    per step, needs a functional model and one Gaussian posterior (the flow
    posterior's log-density depends on its weights through the flow).

    Args:
        objective: `"elbo"` or `"iwae"`. Defaults to `"elbo"`.
        num_samples: K, samples of z per example in `fit` and `evaluate`.
            Defaults to `1`.
        dreg: train `"iwae"` with doubly reparameterised gradients. Defaults
            to `False`.
        *args, **kwargs: those of `keras.Model`.

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

    def __init__(self, *args, objective="elbo", num_samples=1, dreg=False, **kwargs):
        # Subclasses: `super().__init__(objective=..., num_samples=...)`.
        super().__init__(*args, **kwargs)
        self._set_objective(objective, num_samples, dreg)

    def _set_objective(self, objective, num_samples, dreg):
        self.objective = _math.choice("objective", objective, OBJECTIVES)
        self.num_samples = _math.integer("num_samples", num_samples)
        self.dreg = _math.boolean("dreg", dreg)
        if self.dreg and self.objective != "iwae":
            raise _math.invalid_argument(
                "dreg", 'False unless objective="iwae" (it is a gradient of that bound)', dreg
            )

    @property
    def multi_sample(self) -> bool:
        """Whether `fit` and `evaluate` draw several samples per example (or
        weigh them as the importance-weighted bound)."""
        return self.num_samples > 1 or self.objective == "iwae"

    # Untracked, as Keras's own `compile` (the regularizers are sublayers
    # already, the trackers are listed by `metrics`): a built subclassed
    # model refuses new tracked state.
    @no_automatic_dependency_tracking
    def compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)
        # Keras saves `jit_compile` resolved for this backend ("auto" is True
        # on JAX): a file saved on JAX would turn XLA on under TensorFlow
        # (dropping the run-time checks) and torch.compile under PyTorch. The
        # argument as given is saved instead (`get_compile_config`).
        arguments = inspect.signature(keras.Model.compile).bind(self, *args, **kwargs).arguments
        object.__setattr__(self, "_jit_compile_argument", arguments.get("jit_compile", "auto"))
        self.kl_regularizers = find_layers(self, KLRegularizer)
        _check_recurrent_cells(self)
        names = _metric_names(self, self.kl_regularizers)
        self.kl_trackers = [keras.metrics.Mean(name=name) for name in names]
        self.reconstruction_tracker = keras.metrics.Mean(name="reconstruction")
        self.neg_elbo_tracker = keras.metrics.Mean(name="neg_elbo")
        self.neg_iwae_tracker = None
        if self.objective == "iwae":
            self.neg_iwae_tracker = keras.metrics.Mean(name="neg_iwae")
        # Plain attribute: the layers are sublayers already.
        object.__setattr__(self, "_stochastic_layers", stochastic_layers(self))
        self._prepare_multi_sample()

    def _prepare_multi_sample(self):
        """Finds (and checks) what a multi-sample objective needs."""
        # Plain attributes, not tracked: the posteriors are already
        # sublayers, and the decoder shares the model's layers.
        object.__setattr__(self, "_multi_posteriors", None)
        object.__setattr__(self, "_split", None)
        object.__setattr__(self, "_step_draws", None)
        if not self.multi_sample:
            return
        what = f'ELBOModel(objective="{self.objective}", num_samples={self.num_samples})'
        posteriors = find_layers(self, Posterior)
        if not posteriors:
            raise ValueError(
                f"{what} draws several samples from the model's posterior layers; "
                f"model '{self.name}' has none."
            )
        if self.objective == "iwae":
            for posterior in posteriors:
                regularizer = posterior.kl_regularizer
                if regularizer is None:
                    raise ValueError(
                        f"{what}: posterior '{posterior.name}' has no kl_regularizer, so "
                        "there is no prior p(z) to weigh its samples with."
                    )
                if not posterior.samples_have_log_prob:
                    raise relaxed_samples_error(what, posterior)
                if regularizer.free_bits > 0 or regularizer.free_nats > 0:
                    floor = "free_bits" if regularizer.free_bits > 0 else "free_nats"
                    raise ValueError(
                        f"{what}: KLRegularizer '{regularizer.name}' has {floor}="
                        f"{getattr(regularizer, floor)}. Free bits and free nats floor a "
                        "KL term, which the importance-weighted bound does not have; use "
                        "objective='elbo'."
                    )
            if not is_reconstruction_loss(self.loss):
                raise ValueError(
                    f"{what} needs each example's log-likelihood: compile with a loss "
                    "from keras_elbo.losses or keras_elbo.outputs (or a keras.losses."
                    "Loss whose class sets `is_reconstruction_loss = True`). "
                    f"Received: loss={self.loss!r}"
                )
        if self.dreg:
            if len(posteriors) > 1:
                raise ValueError(
                    f"{what}, dreg=True: the doubly reparameterised gradient is "
                    f"implemented for one posterior layer; model '{self.name}' has "
                    f"{len(posteriors)}. Use dreg=False (the importance-weighted bound "
                    "itself takes any number)."
                )
            if not posteriors[0].reparameterized_samples:
                raise ValueError(
                    f"{what}, dreg=True: the doubly reparameterised gradient needs "
                    f"reparameterised samples, and posterior '{posteriors[0].name}' "
                    f"({type(posteriors[0]).__name__}) draws discrete ones. Use dreg=False."
                )
            if isinstance(posteriors[0], FlowPosterior):
                raise ValueError(
                    f"{what}, dreg=True: the doubly reparameterised gradient needs "
                    "log q(z|x) with q's parameters held fixed, which a flow "
                    f"posterior ('{posteriors[0].name}') does not have (its density "
                    "depends on the flow's weights). Use dreg=False."
                )
            if not isinstance(self, Functional):
                raise ValueError(
                    f"{what}, dreg=True needs a functional ELBOModel (it runs the "
                    "decoder, the part after the posterior, a second time)."
                )
        if isinstance(self, Functional):
            # The step runs the model in three parts (`_FunctionalELBOModel.
            # call`): the body to the top posterior's inputs, its K draws per
            # example (K * batch rows), and the decoder from them (with the
            # lower posteriors of a hierarchy, one draw per row each) and,
            # where it reads them (a conditional VAE's label, a skip
            # connection, a lower posterior's features of x), the model's
            # inputs repeated K times. (A subclassed model's `call` runs as
            # written: the first posterior it calls draws K per example.)
            object.__setattr__(self, "_split", split_at(posteriors, self))
        object.__setattr__(self, "_multi_posteriors", posteriors)

    def get_compile_config(self):
        config = super().get_compile_config()
        if config is not None and hasattr(self, "_jit_compile_argument"):
            config = {**config, "jit_compile": self._jit_compile_argument}
        return config

    def compile_from_config(self, config):
        # Keras skips an overridden `compile` when loading; this is its own
        # `compile_from_config`, calling ours.
        config = keras.saving.deserialize_keras_object(_portable_optimizer(config))
        self.compile(**config)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    @contextlib.contextmanager
    def _drawing_several(self):
        """While a train or test step is traced (or run): the posteriors draw
        `num_samples` per example, ancestrally (see
        `posteriors.MultiSampleDraws`)."""
        posteriors = getattr(self, "_multi_posteriors", None)
        if not posteriors:
            yield
            return
        draws = MultiSampleDraws(self.num_samples, add_kl=self.objective == "elbo")
        object.__setattr__(self, "_step_draws", draws)
        try:
            with drawing(posteriors, draws):
                yield
        finally:
            object.__setattr__(self, "_step_draws", None)

    @contextlib.contextmanager
    def _summing_kl_calls(self):
        """While a train or test step is traced (or run): each regularizer's
        logged KL is the sum over its calls in the step."""
        regularizers = getattr(self, "kl_regularizers", ())
        for regularizer in regularizers:
            regularizer._calls_in_step = {}
        try:
            yield
        finally:
            for regularizer in regularizers:
                regularizer._calls_in_step = None

    @contextlib.contextmanager
    def _weighing_kl(self, data):
        """While a train or test step is traced (or run) with a
        `sample_weight`: each regularizer weighs each example's KL by it, as
        Keras weighs the reconstruction, so that the loss and the logs are
        the weighted ELBO, `sum_i w_i (reconstruction_i + KL_i) / N`."""
        weights = keras.utils.unpack_x_y_sample_weight(data)[2]
        regularizers = getattr(self, "kl_regularizers", ())
        if weights is None or not regularizers:
            yield
            return
        shape = tuple(weights.shape)
        if any(n is not None and n != 1 for n in shape[1:]):
            raise ValueError(
                f"ELBOModel '{self.name}' weighs each example's KL by its sample_weight, "
                f"which needs one weight per example, of shape (batch,); received "
                f"sample_weight of shape {shape}. (Per-element weights would weigh the "
                "reconstruction alone.)"
            )
        flat, thread = ops.reshape(weights, (-1,)), threading.get_ident()
        for regularizer in regularizers:
            regularizer._example_weights[thread] = flat
        try:
            yield
        finally:
            for regularizer in regularizers:
                regularizer._example_weights.pop(thread, None)

    def stateless_call(self, *args, **kwargs):
        # Keras's JAX trainer calls the model through `stateless_call`, which
        # runs `self.call` outside a call context: each call of a sublayer is
        # then an outermost one, which drops the losses its earlier calls
        # added (a posterior applied at each step of a loop over time would
        # add only its last KL). A call context around it, as `__call__`
        # makes, keeps them all.
        self._get_call_context()
        try:
            return super().stateless_call(*args, **kwargs)
        finally:
            self._maybe_reset_call_context()

    def _input_message(self):
        return (
            f"ELBOModel `{self.name}`: the inputs of this batch contain NaN or Inf. "
            "Remove or impute them before training"
        )

    def _inputs_checked(self, data):
        """On TensorFlow, the step's ops (the optimizer's step counter too)
        wait for a check of the batch's inputs (`_backend.checked_before`;
        not under XLA)."""
        x = keras.utils.unpack_x_y_sample_weight(data)[0]
        return _backend.checked_before(_float_inputs(x), self._input_message())

    def make_train_function(self, force=False):
        # Without a distribution strategy, Keras on TensorFlow builds the
        # optimizer inside the first trace of the train function, which
        # TensorFlow then traces a second time (to create the variables
        # under a condition): a third of the first epoch's start-up for a
        # small model. Built first, as Keras does under a strategy, it is
        # traced once. Only where every layer is built already (Keras's own
        # test before it builds the optimizer): a subclassed model not yet
        # called, or a layer built at its first call (a conditional prior
        # inside an RNN cell), creates variables in the trace, which the
        # optimizer must see, so Keras's way is kept there.
        optimizer = getattr(self, "optimizer", None)
        if (
            optimizer is not None
            and not optimizer.built
            and all(layer.built for layer in find_layers(self, keras.layers.Layer))
        ):
            optimizer.build(self.trainable_variables)
        return super().make_train_function(force)

    def _build_before_drawing(self, data):
        """Builds an unbuilt subclassed model before a multi-sample step.

        Keras builds it inside the step, with a symbolic run of `call` (in a
        scratch graph on TensorFlow): were the posteriors drawing for the
        step by then, the run's draws would be recorded as the step's. This
        runs the same symbolic call first, outside the step's draws.
        """
        if self.built or not getattr(self, "_multi_posteriors", None):
            return
        x = keras.utils.unpack_x_y_sample_weight(data)[0]
        self.compute_output_spec(
            keras.tree.map_structure(lambda t: keras.KerasTensor(t.shape, t.dtype), x)
        )

    # One wrapper for every backend's signature: `(data)` on TensorFlow and
    # PyTorch, `(state, data)` on JAX.
    def train_step(self, *args, **kwargs):
        self._build_before_drawing(args[-1])
        with (
            self._drawing_several(),
            self._summing_kl_calls(),
            self._weighing_kl(args[-1]),
            self._inputs_checked(args[-1]),
        ):
            return super().train_step(*args, **kwargs)

    def test_step(self, *args, **kwargs):
        # The ELBO is an expectation over q: `evaluate` samples every
        # posterior and Bayesian layer whatever its `inference` says (at the
        # mean, the logged "ELBO" could even exceed log p(x)).
        self._build_before_drawing(args[-1])
        with (
            sampling(getattr(self, "_stochastic_layers", ())),
            self._drawing_several(),
            self._summing_kl_calls(),
            self._weighing_kl(args[-1]),
            self._inputs_checked(args[-1]),
        ):
            return super().test_step(*args, **kwargs)

    @property
    def metrics(self):
        metrics = super().metrics
        if self.compiled and hasattr(self, "kl_trackers"):
            # After `loss`, before compiled and sublayer metrics.
            head = 1 if metrics and metrics[0] is self._loss_tracker else 0
            ours = [*self.kl_trackers, self.reconstruction_tracker, self.neg_elbo_tracker]
            if getattr(self, "neg_iwae_tracker", None) is not None:
                ours.append(self.neg_iwae_tracker)
            metrics = metrics[:head] + ours + [m for m in metrics[head:] if m not in ours]
        return metrics

    def _tiled(self, structure):
        """Targets or weights repeated K times along the batch, to match the
        sample-major outputs of a multi-sample step."""
        k = self.num_samples

        def tile(t):
            if t is None or k == 1:
                return t
            return ops.tile(t, [k] + [1] * (len(t.shape) - 1))

        return keras.tree.map_structure(tile, structure)

    def _taken_draws(self):
        """The step's records of `MultiSampleDraws`, or `None` outside a
        multi-sample step."""
        draws = getattr(self, "_step_draws", None)
        if draws is None:
            return None
        records = draws.take()
        if not records:
            raise ValueError(
                f"ELBOModel '{self.name}' (num_samples={self.num_samples}): no posterior "
                "drew samples in this step. A Posterior subclass that overrides `call` "
                "must keep the base class's, which draws them."
            )
        return records

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if getattr(self, "_step_draws", None) is not None:
            y, sample_weight = self._tiled(y), self._tiled(sample_weight)
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        draws = self._taken_draws()
        bounds = None
        if draws is not None and self.objective == "iwae":
            loss, reconstruction, bounds = self._importance_weighted_loss(
                draws, x, y, y_pred, sample_weight, training
            )
        else:
            if draws is not None:
                y, sample_weight = self._tiled(y), self._tiled(sample_weight)
            loss = super().compute_loss(x, y, y_pred, sample_weight, training=training)
        inputs = _float_inputs(x)
        if inputs:
            # (On TensorFlow the step's own check, `_inputs_checked`, fires
            # first; this one serves the other backends and `compute_loss`
            # called from a train step of one's own.)
            gate = _backend.finite_gate(inputs, self._input_message())
            loss = loss * ops.cast(gate, loss.dtype)
        if not hasattr(self, "kl_trackers"):
            return loss
        # The logs in nats per example: under TensorFlow's MirroredStrategy
        # Keras divides each replica's loss by the number of replicas.
        added = [
            unscale_loss_for_distribution(self._aggregate_additional_loss(value))
            for value in self.losses
        ]
        other = ops.sum(ops.stack(added)) if added else ops.zeros((), loss.dtype)
        if bounds is None:
            reconstruction = unscale_loss_for_distribution(loss) - other
        neg_elbo = reconstruction + other
        batch_size = ops.shape(keras.tree.flatten(x)[0])[0]
        for regularizer, tracker in zip(self.kl_regularizers, self.kl_trackers, strict=True):
            if not regularizer.built:
                raise ValueError(
                    f"KLRegularizer '{regularizer.name}' was not called by the model "
                    f"'{self.name}': ELBOModel logs the KL of the regularizers it finds "
                    "when compiled, each of which must be used in the model's call."
                )
            kl = ops.cast(regularizer.last_kl, loss.dtype)
            neg_elbo = neg_elbo + kl
            if bounds is None:
                # `other` holds this regularizer's weighted (free-bits) KL.
                neg_elbo = neg_elbo - ops.cast(regularizer.last_penalty, loss.dtype)
            tracker.update_state(kl, sample_weight=batch_size)
        self.reconstruction_tracker.update_state(reconstruction, sample_weight=batch_size)
        self.neg_elbo_tracker.update_state(neg_elbo, sample_weight=batch_size)
        if bounds is not None:
            self.neg_iwae_tracker.update_state(-bounds + other, sample_weight=batch_size)
        return loss

    def _importance_weighted_loss(self, records, x, y, y_pred, sample_weight, training):
        """The importance-weighted bound's loss from the step's K samples.

        `records` are the step's draws (`MultiSampleDraws.take`): the top
        posterior's K samples per example, then each lower posterior's. The
        log weight of sample k is `log p(x | z_k) + sum_l [log p(z_l,k | ...)
        - log q(z_l,k | ...)]`, each layer's ratio tempered by its
        regularizer's `kl_weight`.

        Returns the loss (`-bound` at the regularizers' `kl_weight`s, plus the
        model's other added losses), the reconstruction averaged over the
        samples, and the bound at weight 1 (both averaged over the batch).
        """
        k = self.num_samples
        dtype = _math.density_dtype()
        targets = self._tiled(y)

        def log_likelihood(outputs):
            """`(K, batch)` log p(x|z_k)."""
            return -ops.reshape(ops.cast(self.loss.call(targets, outputs), dtype), (k, -1))

        ratios = objectives.log_density_ratios(records)
        log_lik = log_likelihood(y_pred)
        tempered = objectives.log_weights(log_lik, ratios, tempered=True)
        bound = objectives.importance_weighted_bound(tempered)  # (batch,)
        bound_at_one = objectives.importance_weighted_bound(objectives.log_weights(log_lik, ratios))
        if self.dreg:
            # Tucker et al. (2019), eq. 8: the encoder's gradient is
            # sum_k w_k^2 d(log w_k)/dz_k dz_k/dphi with q's parameters held
            # fixed in log q, the decoder's and prior's sum_k w_k grad log w_k
            # (w: normalised weights). One surrogate gives both: the decoder
            # runs again on z_k whose gradient to the encoder is scaled by
            # w_k (same value), and sum_k w_k log w_k is differentiated.
            # At a KL weight b != 1 (warm-up), log w_k holds -b log q(z_k): the
            # score term that DReG rewrites is b times as large, the encoder's
            # weight (1 - b) w_k + b w_k^2, so z_k's gradient is scaled by
            # 1 - b + b w_k instead (w_k at b = 1).
            # (One posterior: `_prepare_multi_sample` refuses DReG with more.)
            [(layer, q, z, prior_inputs)] = records
            regularizer = layer.kl_regularizer
            p = regularizer.prior_distribution(q, prior_inputs=prior_inputs)
            weight = ops.cast(regularizer.kl_weight, dtype)
            w = objectives.normalized_weights(tempered)
            scale = (1.0 - weight) + weight * w
            for _ in range(len(z.shape) - 2):
                scale = ops.expand_dims(scale, -1)
            scaled = ops.stop_gradient(z) + ops.cast(scale, z.dtype) * (z - ops.stop_gradient(z))
            flat = ops.reshape(scaled, (-1, *ops.shape(z)[2:]))
            _, _, decoder, reads_inputs = self._split  # (DReG needs a functional model)
            latents = ops.cast(flat, layer.compute_dtype)
            if reads_inputs:
                outputs = decoder([latents, *self._tiled(keras.tree.flatten(x))], training=training)
            else:
                outputs = decoder(latents, training=training)
            fixed_q = stop_parameter_gradients(q)
            ratio2 = ops.cast(
                _math.sum_positions(p.log_prob(scaled) - fixed_q.log_prob(scaled)), dtype
            )
            surrogate = ops.sum(w * (log_likelihood(outputs) + weight * ratio2), axis=0)
            bound = ops.stop_gradient(bound) + surrogate - ops.stop_gradient(surrogate)
        weights = None if sample_weight is None else ops.reshape(sample_weight, (-1,))

        def batch_mean(per_example):
            """`sum_i w_i v_i / batch`, weighted by `sample_weight` as Keras
            weighs a loss: the regularizers' mean of each example's KL."""
            return ops.sum(_batch_mean(ops.expand_dims(per_example, -1), weights))

        # Scaled as Keras scales a compiled loss (by 1 / replicas under
        # MirroredStrategy); the added losses below are scaled already.
        objective = scale_loss_for_distribution(-batch_mean(bound))
        added = [self._aggregate_additional_loss(value) for value in self.losses]
        loss = objective + ops.sum(ops.stack(added)) if added else objective
        reconstruction = -batch_mean(ops.mean(log_lik, axis=0))
        return loss, reconstruction, batch_mean(ops.stop_gradient(bound_at_one))


def _check_recurrent_cells(model):
    """Refuses a KL term inside the cell of a `keras.layers.RNN` that is not
    unrolled.

    Such an RNN runs its cell inside the backend's loop primitive
    (`tf.while_loop`, `jax.lax.scan`), from which a loss added by the cell
    cannot be read out (TensorFlow fails with an `InaccessibleTensorError`;
    on PyTorch one step's KL was counted twice, silently). With
    `unroll=True` the cell is called once per step in a Python loop, and
    every step's KL is added.
    """
    for rnn in find_layers(model, keras.layers.RNN):
        regularizers = find_layers(rnn.cell, KLRegularizer)
        if regularizers and not rnn.unroll:
            raise ValueError(
                f"RNN layer '{rnn.name}' has a KL term in its cell "
                f"('{regularizers[0].name}'): build it with `unroll=True` (a known "
                "number of time steps), so that each step's KL is added to the loss. "
                "A loop over time steps written in Python works too."
            )


def _portable_optimizer(config):
    """A compile config whose optimizer is the running backend's.

    Keras saves the optimizer of a model compiled on PyTorch as a class of its
    torch backend (`keras.src.backend.torch.optimizers...`), which, loaded
    on TensorFlow or JAX where PyTorch is installed, fails at the first
    `fit` (and, where it is not, fails to load). The same optimizer by its
    public name (`keras.optimizers.Adam`) is the running backend's.
    """
    optimizer = config.get("optimizer") if isinstance(config, dict) else None
    if (
        isinstance(optimizer, dict)
        and str(optimizer.get("module", "")).startswith("keras.src.backend.")
        and hasattr(keras.optimizers, optimizer.get("class_name", ""))
    ):
        optimizer = {**optimizer, "module": "keras.optimizers"}
        optimizer.pop("registered_name", None)
        config = {**config, "optimizer": optimizer}
    return config


def _float_inputs(x):
    """The floating-point tensors of a batch's inputs `x`."""
    return [
        t for t in keras.tree.flatten(x) if t is not None and keras.backend.is_float_dtype(t.dtype)
    ]


@keras.saving.register_keras_serializable(package="keras_elbo", name="ELBOModel")
class _FunctionalELBOModel(ELBOModel, Functional):
    """What `ELBOModel(inputs, outputs)` returns: an `ELBOModel` that is also a
    functional model, saved and loaded as `keras_elbo>ELBOModel`."""

    # `(*args, **kwargs)`: Keras saves (and revives) a subclass's graph only
    # if its constructor looks like Functional's, which each Keras version
    # checks its own way: Keras 3.15 accepts `*args, **kwargs`, and in
    # Keras <= 3.8, where `Functional.__init__` is decorated, its signature
    # reads as no arguments at all, which `*args, **kwargs` matches too.
    def __init__(self, *args, **kwargs):
        objective = kwargs.pop("objective", "elbo")
        num_samples = kwargs.pop("num_samples", 1)
        dreg = kwargs.pop("dreg", False)
        Trainer.__init__(self)
        if len(args) < 3 and not kwargs.get("name"):
            kwargs["name"] = auto_name("ELBOModel")
        Functional.__init__(self, *args, **kwargs)
        self._set_objective(objective, num_samples, dreg)

    def call(self, inputs, training=None, mask=None):
        split = getattr(self, "_split", None)
        if split is None or getattr(self, "_step_draws", None) is None:
            return Functional.call(self, inputs, training=training, mask=mask)
        # A multi-sample step (see `_prepare_multi_sample`).
        posterior, body, decoder, reads_inputs = split
        outputs = body(keras.tree.flatten(inputs), training=training)
        features, prior_inputs = features_and_prior_inputs(outputs)
        z = posterior(features, prior_inputs=prior_inputs, training=training)
        if not reads_inputs:
            return decoder(z, training=training)
        return decoder([z, *self._tiled(keras.tree.flatten(inputs))], training=training)

    def get_config(self):
        return {
            **Functional.get_config(self),
            "objective": self.objective,
            "num_samples": self.num_samples,
            "dreg": self.dreg,
        }


# Printed as what the user built (`type(model)`, summaries, error messages);
# saved under the registered name `keras_elbo>ELBOModel` either way.
_FunctionalELBOModel.__name__ = _FunctionalELBOModel.__qualname__ = "ELBOModel"
