"""Annealing: schedules, and the callbacks that apply them to the KL weight
(`KLAnnealing`) and to the Gumbel-softmax temperature (`TemperatureAnnealing`)."""

import math
from collections.abc import Callable

import keras

from keras_elbo import _math
from keras_elbo._base import find_layers
from keras_elbo.discrete import BernoulliPosterior, CategoricalPosterior
from keras_elbo.divergence import KLRegularizer

UNITS = ("epoch", "step")


class _Schedule:
    """Base of the schedules: `from_config` and a `repr` built from `get_config`."""

    def get_config(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.get_config().items())
        return f"{type(self).__name__}({args})"


class LinearWarmup(_Schedule):
    """A KL weight that rises linearly from `start` to `end`, then holds `end`.

    The KL warm-up of Bowman et al. (2016): with the KL switched off at first,
    the decoder learns to use the code before the KL pulls the posterior
    towards the prior, which counters posterior collapse. Give it to
    `KLAnnealing`; `progress` is in epochs or steps, as the callback's `unit`.

    Formula:

    ```python
    weight = start + (end - start) * min(progress / duration, 1.0)
    ```

    Args:
        duration: length of the rise, in units of progress; a positive number.
        start: weight at progress 0, a non-negative number. Defaults to `0.0`.
        end: weight from progress `duration` on, a non-negative number.
            Defaults to `1.0`.

    Example:

    >>> schedule = LinearWarmup(4)
    >>> [schedule(p) for p in (0, 1, 2, 4, 10)]
    [0.0, 0.25, 0.5, 1.0, 1.0]
    >>> LinearWarmup(10, start=0.1)
    LinearWarmup(duration=10.0, start=0.1, end=1.0)

    Reference: Bowman et al., 2016, "Generating sentences from a continuous
    space".
    """

    def __init__(self, duration: float, start: float = 0.0, end: float = 1.0):
        self.duration = _math.real("duration", duration, positive=True)
        self.start = _math.real("start", start, non_negative=True)
        self.end = _math.real("end", end, non_negative=True)

    def __call__(self, progress: float) -> float:
        fraction = min(max(progress / self.duration, 0.0), 1.0)
        return self.start + (self.end - self.start) * fraction

    def get_config(self) -> dict:
        return {"duration": self.duration, "start": self.start, "end": self.end}


class CyclicalAnnealing(_Schedule):
    """A KL weight that repeats a linear rise and a plateau, cycle after cycle.

    Each cycle lasts `period` units of progress: over its first `ratio *
    period` the weight rises linearly from `start` to `end`, then it holds
    `end` to the end of the cycle. After `num_cycles` cycles (when given) the
    weight holds `end` for good. Restarting the rise lets a code that the
    decoder learned to use in one cycle be refined, rather than collapsed, in
    the next.

    Formula:

    ```python
    cycle, phase = divmod(progress, period)
    if num_cycles is not None and cycle >= num_cycles:
        weight = end
    else:
        weight = start + (end - start) * min(phase / (ratio * period), 1.0)
    ```

    Args:
        period: length of one cycle, in units of progress; a positive number.
        num_cycles: number of cycles before the weight holds `end`, a positive
            integer, or `None` to cycle forever. Defaults to `None`.
        ratio: fraction of each cycle spent rising, in (0, 1]. Defaults to
            `0.5`.
        start: weight at the start of each cycle, a non-negative number.
            Defaults to `0.0`.
        end: weight at the top of each cycle, a non-negative number. Defaults
            to `1.0`.

    Example:

    >>> schedule = CyclicalAnnealing(period=4, num_cycles=2, ratio=0.5)
    >>> [schedule(p) for p in range(10)]
    [0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0]

    Reference: Fu et al., 2019, "Cyclical annealing schedule: a simple approach
    to mitigating KL vanishing".
    """

    def __init__(
        self,
        period: float,
        num_cycles: int | None = None,
        ratio: float = 0.5,
        start: float = 0.0,
        end: float = 1.0,
    ):
        self.period = _math.real("period", period, positive=True)
        self.num_cycles = None if num_cycles is None else _math.integer("num_cycles", num_cycles)
        self.ratio = _math.real("ratio", ratio, positive=True)
        # The rise must last a representable time: ratio * period > 0.
        if self.ratio > 1 or not self.ratio * self.period > 0:
            raise _math.invalid_argument(
                "ratio", f"a number in (0, 1] with ratio * period > 0 (period={period})", ratio
            )
        self.start = _math.real("start", start, non_negative=True)
        self.end = _math.real("end", end, non_negative=True)

    def __call__(self, progress: float) -> float:
        cycle, phase = divmod(max(progress, 0.0), self.period)
        if self.num_cycles is not None and cycle >= self.num_cycles:
            return self.end
        fraction = min(phase / (self.ratio * self.period), 1.0)
        return self.start + (self.end - self.start) * fraction

    def get_config(self) -> dict:
        return {
            "period": self.period,
            "num_cycles": self.num_cycles,
            "ratio": self.ratio,
            "start": self.start,
            "end": self.end,
        }


class ExponentialDecay(_Schedule):
    """A value that decays exponentially from `start`, down to `floor`.

    The temperature schedule of Jang et al. (2017), `max(0.5, exp(-r * t))`
    with `r` in {1e-5, 1e-4} per step, for `TemperatureAnnealing`; usable as
    any schedule of progress (a KL weight that decays, for `KLAnnealing`).

    Formula:

    ```python
    value = max(floor, start * exp(-rate * progress))
    ```

    Args:
        rate: the decay rate per unit of progress, a non-negative number.
        start: the value at progress 0, a non-negative number. Defaults to `1.0`.
        floor: the lowest value, a non-negative number. Defaults to `0.0`.

    Example:

    >>> schedule = ExponentialDecay(rate=0.5, floor=0.2)
    >>> [round(schedule(p), 4) for p in (0, 1, 2, 4)]
    [1.0, 0.6065, 0.3679, 0.2]

    Reference: Jang, Gu & Poole, 2017, "Categorical reparameterization with
    Gumbel-softmax".
    """

    def __init__(self, rate: float, start: float = 1.0, floor: float = 0.0):
        self.rate = _math.real("rate", rate, non_negative=True)
        self.start = _math.real("start", start, non_negative=True)
        self.floor = _math.real("floor", floor, non_negative=True)

    def __call__(self, progress: float) -> float:
        return max(self.floor, self.start * math.exp(-self.rate * max(progress, 0.0)))

    def get_config(self) -> dict:
        return {"rate": self.rate, "start": self.start, "floor": self.floor}


class _Annealing(keras.callbacks.Callback):
    """Sets a variable of some layers of a model by a schedule, before each
    training batch: what `KLAnnealing` (the KL weight of each
    `KLRegularizer`) and `TemperatureAnnealing` (the temperature of each
    Gumbel-softmax posterior) share. Progress, logging and validation are
    described in `KLAnnealing`'s docstring.

    A subclass names the value (`what`, `log_key`), finds its layers
    (`_targets`), reads and assigns each one's variable (`_current`,
    `_assign`) and says which values are allowed (`_valid`, `requirement`).
    """

    what = "value"
    log_key = "value"
    requirement = "a finite number"

    def __init__(self, schedule: Callable[[float], float], unit: str = "epoch", verbose: int = 0):
        super().__init__()
        if not callable(schedule):
            raise _math.invalid_argument(
                "schedule", "a callable from progress to a value, e.g. LinearWarmup(10)", schedule
            )
        if verbose not in (0, 1) or isinstance(verbose, bool):
            raise _math.invalid_argument("verbose", "0 or 1", verbose)
        self.schedule = schedule
        self.unit = _math.choice("unit", unit, UNITS)
        self.verbose = verbose
        self.targets = []  # found when training begins
        self._epoch = 0
        self._value = None  # last value set

    def _targets(self, model):
        """The layers whose variable the callback sets (raises if none)."""
        raise NotImplementedError

    def _current(self, layer):
        """The layer's value now (its variable's, or its argument's if unbuilt)."""
        raise NotImplementedError

    def _assign(self, layer, value):
        raise NotImplementedError

    def _valid(self, value):
        return math.isfinite(value)

    def on_train_begin(self, logs=None):
        self._value = None  # assigned again at the first batch of each fit
        # Searched at each fit: the callback may be reused with another model.
        self.targets = self._targets(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if self.unit == "step":
            # Steps already taken: the first step of this execution. Read
            # here, not when training begins: `BackupAndRestore` may restore
            # the optimizer after this callback's `on_train_begin`.
            iterations = self.model.optimizer.iterations
            progress = float(keras.ops.convert_to_numpy(iterations))
        else:
            # `batch` is the index of the execution's first step in the epoch.
            steps = self.params.get("steps") if self.params else None
            progress = self._epoch + (batch / steps if steps else 0.0)
        self._set(self._value_at(progress))

    def on_epoch_end(self, epoch, logs=None):
        value = self._value
        if value is None:  # no batch ran: report the value as it is
            value = self._current(self.targets[0])
        if logs is not None:
            # The same dict goes on to History and the progress bar.
            logs[self.log_key] = value
        if self.verbose:
            print(f"{type(self).__name__}: epoch {epoch + 1} {self.log_key}={value:.4f}")

    def _value_at(self, progress):
        value = self.schedule(progress)
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not self._valid(number):
            raise ValueError(
                f"{type(self).__name__}: the schedule {self.schedule!r} returned {value!r} at "
                f"progress={progress:g} ({self.unit}s). A {self.what} must be "
                f"{self.requirement}."
            )
        return number

    def _set(self, value):
        if value == self._value:
            return  # the variables hold it already
        if keras.backend.backend() == "jax":
            # JAX's `fit` carries the variables' values from step to step
            # outside the variables: write them back, so that the next step
            # reads the variables again, this assignment included.
            self.model.jax_state_sync()
        for layer in self.targets:
            self._assign(layer, value)
        self._value = value


class KLAnnealing(_Annealing):
    """Sets the KL weight of every `KLRegularizer` of a model by a schedule.

    Before each training batch, the callback evaluates `schedule(progress)`
    and assigns the result to the `kl_weight` variable of each `KLRegularizer`
    of the model, at any depth (inside posterior layers and nested models);
    it finds them itself when training begins. The weight in effect at the
    end of each epoch is added to the epoch's logs as `kl_weight`, so it is
    shown by the progress bar and recorded in `history.history["kl_weight"]`.
    Callbacks listed before this one in `fit(callbacks=...)` (a `CSVLogger`,
    say) do not see it. Validation, `evaluate` and `predict` use the weight
    last set. The weight is a variable of the model and is saved with it.

    Units of progress, both read from the state Keras keeps, so that a run
    resumed by `keras.callbacks.BackupAndRestore` (or from a saved model and
    optimizer) continues its schedule, even with a new `KLAnnealing`:

    - `"epoch"`: the epoch index plus the fraction of the epoch done,
      `epoch + batch / steps`, when the number of steps per epoch is known,
      else the epoch index alone. The index is the one Keras counts: it starts
      from `initial_epoch` (default 0) at each `fit` call, and from the epoch
      after the last one backed up when `BackupAndRestore` resumes a run.
    - `"step"`: the optimizer's iteration count, `model.optimizer.iterations`:
      the training steps the model has taken, across `fit` calls, restored
      by `BackupAndRestore` and saved with the model. To start a schedule
      again from 0, compile the model with a new optimizer. With
      `gradient_accumulation_steps`, it counts weight updates, not batches;
      under a `LossScaleOptimizer` (mixed precision), a step skipped for
      non-finite gradients does not count.

    With `steps_per_execution > 1`, Keras runs several steps per call, and the
    weight is set once per call, from its first step.

    Formula:

    ```python
    progress = epoch + batch / steps_per_epoch     # unit="epoch"
    progress = model.optimizer.iterations          # unit="step"
    kl_weight = schedule(progress)                 # each batch
    ```

    Args:
        schedule: a callable from progress (a float) to the KL weight (a
            finite, non-negative number), such as `LinearWarmup` or
            `CyclicalAnnealing`.
        unit: unit of progress, `"epoch"` or `"step"`. Defaults to `"epoch"`.
        verbose: `1` prints the weight at the end of each epoch (epochs
            numbered from 1, as in the progress bar), `0` is silent. Defaults
            to `0`.

    Example:

    >>> KLAnnealing(LinearWarmup(10), unit="epoch").schedule(2.5)
    0.25

    ```python
    model.fit(x, x, epochs=20, callbacks=[KLAnnealing(LinearWarmup(10))])
    ```

    Raises:
        ValueError: when training begins, if the model has no `KLRegularizer`;
            during training, if the schedule returns a value that is not a
            finite, non-negative number.
    """

    what = "KL weight"
    log_key = "kl_weight"
    requirement = "a finite, non-negative number"

    @property
    def regularizers(self):
        """The `KLRegularizer`s the callback sets, found when training begins."""
        return self.targets

    def _targets(self, model):
        regularizers = find_layers(model, KLRegularizer)
        if not regularizers:
            raise ValueError(
                f"KLAnnealing found no KLRegularizer in model '{model.name}'. "
                "Give a posterior layer a `kl_regularizer=keras_elbo.KLRegularizer()`, "
                "or remove the callback."
            )
        return regularizers

    def _current(self, regularizer):
        if not regularizer.built:
            return regularizer.weight
        return float(keras.ops.convert_to_numpy(regularizer.kl_weight))

    def _assign(self, regularizer, value):
        # A regularizer that was never called has no variable, and no loss.
        if regularizer.built:
            regularizer.kl_weight.assign(value)

    def _valid(self, value):
        return math.isfinite(value) and value >= 0


class TemperatureAnnealing(_Annealing):
    """Sets the temperature of every Gumbel-softmax posterior of a model by a schedule.

    The temperature of a `CategoricalPosterior` or `BernoulliPosterior` with
    `estimator="gumbel_softmax"` trades the bias of the relaxation (high
    temperatures) against the variance of its gradients (low ones); Jang et
    al. (2017) lower it during training. The callback works as
    `KLAnnealing` does, with the same schedules and units of progress: it
    assigns `schedule(progress)` to each such layer's `temperature_variable`
    before each training batch, adds the value to the epoch's logs as
    `temperature`, and the variable is saved with the model.

    Args:
        schedule: a callable from progress to the temperature (a finite,
            positive number): `ExponentialDecay(rate, start=1.0, floor=0.5)`
            as in Jang et al., or `LinearWarmup(duration, start=1.0, end=0.5)`.
        unit: unit of progress, `"epoch"` or `"step"`. Defaults to `"epoch"`.
        verbose: `1` prints the temperature at the end of each epoch, `0` is
            silent. Defaults to `0`.

    Example:

    >>> TemperatureAnnealing(ExponentialDecay(1e-4, floor=0.5), unit="step").schedule(10_000)
    0.5

    Raises:
        ValueError: when training begins, if the model has no Gumbel-softmax
            posterior; during training, if the schedule returns a value that
            is not a finite, positive number.
    """

    what = "temperature"
    log_key = "temperature"
    requirement = "a finite, positive number"

    def _targets(self, model):
        layers = [
            layer
            for layer in find_layers(model, (CategoricalPosterior, BernoulliPosterior))
            if layer.estimator == "gumbel_softmax"
        ]
        if not layers:
            raise ValueError(
                f"TemperatureAnnealing found no Gumbel-softmax posterior in model "
                f"'{model.name}': a keras_elbo.CategoricalPosterior or BernoulliPosterior "
                "with estimator='gumbel_softmax' has a temperature to anneal."
            )
        return layers

    def _current(self, layer):
        if not hasattr(layer, "temperature_variable"):
            return layer.temperature
        return float(keras.ops.convert_to_numpy(layer.temperature_variable))

    def _assign(self, layer, value):
        if hasattr(layer, "temperature_variable"):
            layer.temperature_variable.assign(value)

    def _valid(self, value):
        return math.isfinite(value) and value > 0
