"""Annealing: schedule values, and the callbacks driving `kl_weight` and the Gumbel-softmax
temperature in `fit`."""

import math

import keras
import numpy as np
import pytest

import keras_elbo as ke
from keras_elbo._base import find_layers
from keras_elbo.callbacks import CyclicalAnnealing, KLAnnealing, LinearWarmup
from tests import _helpers as h

PIXELS, LATENT = 16, 2
DATA = (np.random.default_rng(0).random((64, PIXELS)) < 0.3).astype("float32")
BATCH = 16  # 64 examples -> 4 steps per epoch


def posterior(metric_name="kl", latent_dim=LATENT):
    regularizer = ke.KLRegularizer(metric_name=metric_name, seed=1)
    return ke.GaussianPosterior(latent_dim, kl_regularizer=regularizer, seed=2)


def make_vae(**compile_kwargs):
    keras.utils.set_random_seed(0)
    x = keras.Input((PIXELS,))
    z = posterior()(keras.layers.Dense(8, activation="relu")(x))
    return compile_vae(ke.ELBOModel(x, keras.layers.Dense(PIXELS)(z)), **compile_kwargs)


def compile_vae(model, jit_compile=False, steps_per_execution=1):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=ke.BernoulliNLL(from_logits=True),
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    return model


def regularizers_of(model):
    return find_layers(model, ke.KLRegularizer)


class WeightRecorder(keras.callbacks.Callback):
    """Records, after each training batch, the `kl_weight` of each regularizer.

    The weights are read back from float32 variables: a relative round-off of
    2**-24 (6e-8) from the float64 schedule, hence rtol=1e-6 below.
    """

    def __init__(self, regularizers):
        super().__init__()
        self.regularizers = regularizers
        self.weights = []  # one row per batch, one column per regularizer

    def on_train_batch_end(self, batch, logs=None):
        _ = self.model  # on JAX, writes the training state back to the variables
        self.weights.append([float(h.numpy(r.kl_weight)) for r in self.regularizers])


def fit(model, annealing, epochs=2, data=None, **kwargs):
    """Fits with `annealing`; returns the history and the weights per batch."""
    recorder = WeightRecorder(regularizers_of(model))
    history = model.fit(
        DATA if data is None else data,
        None if data is not None else DATA,
        epochs=epochs,
        batch_size=None if data is not None else BATCH,
        shuffle=False,
        verbose=0,
        callbacks=[annealing, recorder],
        **kwargs,
    )
    return history.history, np.array(recorder.weights)


def linear_reference(progress, duration, start=0.0, end=1.0):
    return start + (end - start) * np.clip(np.asarray(progress, np.float64) / duration, 0.0, 1.0)


def cyclical_reference(progress, period, num_cycles=None, ratio=0.5, start=0.0, end=1.0):
    progress = np.asarray(progress, np.float64)
    cycle, phase = np.floor(progress / period), np.mod(progress, period)
    weight = start + (end - start) * np.minimum(phase / (ratio * period), 1.0)
    if num_cycles is not None:
        weight = np.where(cycle >= num_cycles, end, weight)
    return weight


PROGRESS = np.linspace(0.0, 13.0, 105)  # steps of 0.125, exact in binary


class TestLinearWarmup:
    @pytest.mark.parametrize(
        "kwargs",
        [
            {"duration": 4},
            {"duration": 0.5},
            {"duration": 10, "start": 0.2},
            {"duration": 3, "start": 0.1, "end": 2.0},
            {"duration": 6, "start": 1.0, "end": 0.25},
        ],
        ids=["unit", "short", "from-0.2", "to-2", "decreasing"],
    )
    def test_values_match_numpy(self, kwargs):
        schedule = LinearWarmup(**kwargs)
        values = [schedule(p) for p in PROGRESS]
        np.testing.assert_allclose(values, linear_reference(PROGRESS, **kwargs), rtol=1e-12)

    def test_holds_end_and_returns_floats(self):
        schedule = LinearWarmup(2, start=0.5, end=1.5)
        assert schedule(0) == 0.5 and schedule(1) == 1.0 and schedule(2) == schedule(1e9) == 1.5
        assert isinstance(schedule(1), float)

    @pytest.mark.parametrize(
        "kwargs, name",
        [
            ({"duration": 0}, "duration"),
            ({"duration": -1}, "duration"),
            ({"duration": math.inf}, "duration"),
            ({"duration": True}, "duration"),
            ({"duration": "10"}, "duration"),
            ({"duration": 4, "start": -0.1}, "start"),
            ({"duration": 4, "end": math.nan}, "end"),
        ],
        ids=["zero", "negative", "inf", "bool", "string", "negative-start", "nan-end"],
    )
    def test_invalid_arguments(self, kwargs, name):
        with pytest.raises(ValueError, match=f"`{name}`"):
            LinearWarmup(**kwargs)

    def test_config_and_repr(self):
        schedule = LinearWarmup(10, start=0.1)
        assert schedule.get_config() == {"duration": 10.0, "start": 0.1, "end": 1.0}
        assert LinearWarmup.from_config(schedule.get_config()).get_config() == (
            schedule.get_config()
        )
        assert repr(schedule) == "LinearWarmup(duration=10.0, start=0.1, end=1.0)"


class TestCyclicalAnnealing:
    @pytest.mark.parametrize(
        "kwargs",
        [
            {"period": 4},
            {"period": 4, "ratio": 1.0},
            {"period": 2.5, "ratio": 0.2},
            {"period": 4, "num_cycles": 2},
            {"period": 3, "num_cycles": 1, "ratio": 0.75},
            {"period": 4, "start": 0.1, "end": 0.6},
            {"period": 5, "num_cycles": 2, "start": 0.3, "end": 2.0},
        ],
        ids=[
            "default",
            "ratio-1",
            "ratio-0.2",
            "two-cycles",
            "one-cycle",
            "start-end",
            "cycles-start-end",
        ],
    )
    def test_values_match_numpy(self, kwargs):
        schedule = CyclicalAnnealing(**kwargs)
        values = [schedule(p) for p in PROGRESS]
        np.testing.assert_allclose(values, cyclical_reference(PROGRESS, **kwargs), rtol=1e-12)

    def test_restarts_each_cycle_then_holds_end(self):
        schedule = CyclicalAnnealing(period=4, num_cycles=2, ratio=0.5)
        values = [schedule(p) for p in range(10)]
        assert values == [0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0]

    @pytest.mark.parametrize(
        "kwargs, name",
        [
            ({"period": 0}, "period"),
            ({"period": -2}, "period"),
            ({"period": 4, "num_cycles": 0}, "num_cycles"),
            ({"period": 4, "num_cycles": 2.0}, "num_cycles"),
            ({"period": 4, "num_cycles": True}, "num_cycles"),
            ({"period": 4, "ratio": 0}, "ratio"),
            ({"period": 4, "ratio": 1.5}, "ratio"),
            ({"period": 4, "start": -1}, "start"),
            ({"period": 4, "end": -1}, "end"),
        ],
        ids=[
            "zero-period",
            "negative-period",
            "zero-cycles",
            "float-cycles",
            "bool-cycles",
            "zero-ratio",
            "ratio-above-1",
            "negative-start",
            "negative-end",
        ],
    )
    def test_invalid_arguments(self, kwargs, name):
        with pytest.raises(ValueError, match=f"`{name}`"):
            CyclicalAnnealing(**kwargs)

    def test_config_and_repr(self):
        schedule = CyclicalAnnealing(8, num_cycles=3, ratio=0.25)
        config = schedule.get_config()
        assert config == {"period": 8.0, "num_cycles": 3, "ratio": 0.25, "start": 0.0, "end": 1.0}
        assert CyclicalAnnealing.from_config(config).get_config() == config
        assert repr(schedule) == (
            "CyclicalAnnealing(period=8.0, num_cycles=3, ratio=0.25, start=0.0, end=1.0)"
        )


class TestKLAnnealingArguments:
    @pytest.mark.parametrize(
        "kwargs, name",
        [
            ({"schedule": 0.5}, "schedule"),
            ({"schedule": LinearWarmup(4), "unit": "batch"}, "unit"),
            ({"schedule": LinearWarmup(4), "verbose": 2}, "verbose"),
        ],
        ids=["not-callable", "unit", "verbose"],
    )
    def test_invalid_arguments(self, kwargs, name):
        with pytest.raises(ValueError, match=f"`{name}`"):
            KLAnnealing(**kwargs)

    def test_model_without_regularizer_raises(self):
        x = keras.Input((PIXELS,))
        model = keras.Model(x, keras.layers.Dense(PIXELS)(x), name="plain")
        model.compile(optimizer="adam", loss="mse")
        with pytest.raises(ValueError, match="KLAnnealing found no KLRegularizer in model 'plain'"):
            model.fit(DATA, DATA, epochs=1, verbose=0, callbacks=[KLAnnealing(LinearWarmup(4))])


class TestKLAnnealingProgress:
    """The callback's units of progress, called directly (fast; issue 17: the
    epoch unit's fractional progress was caught by a slow test only)."""

    @pytest.mark.parametrize("steps", [4, None], ids=["known-steps", "unknown-steps"])
    def test_epoch_unit(self, steps):
        model = make_vae()
        callback = KLAnnealing(LinearWarmup(3), unit="epoch")
        callback.set_model(model)
        callback.set_params({"epochs": 3, "steps": steps, "verbose": 0})
        callback.on_train_begin()
        weights, progress = [], []
        for epoch in range(3):
            callback.on_epoch_begin(epoch)
            for batch in range(4):
                callback.on_train_batch_begin(batch)
                weights.append(float(h.numpy(regularizers_of(model)[0].kl_weight)))
                progress.append(epoch + (batch / steps if steps else 0.0))
        expected = linear_reference(np.array(progress), 3)
        assert len(set(expected)) == (12 if steps else 3)  # the fractions matter
        np.testing.assert_allclose(weights, expected, rtol=1e-6)

    def test_step_unit_reads_the_optimizer(self):
        model = make_vae()
        model.optimizer.build(model.trainable_variables)
        callback = KLAnnealing(LinearWarmup(8), unit="step")
        callback.set_model(model)
        callback.on_train_begin()
        for steps in (0, 3, 6):
            model.optimizer.iterations.assign(steps)
            callback.on_train_batch_begin(0)
            weight = float(h.numpy(regularizers_of(model)[0].kl_weight))
            np.testing.assert_allclose(weight, linear_reference(np.array(steps), 8), rtol=1e-6)


@pytest.mark.slow
class TestKLAnnealingFit:
    @pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
    def test_step_unit_follows_schedule_each_batch(self, jit_compile):
        if jit_compile and keras.backend.backend() == "torch":
            pytest.skip("jit_compile=True is XLA on TensorFlow and JAX (torch.compile: minutes)")
        model = make_vae(jit_compile=jit_compile)
        schedule = LinearWarmup(4)
        history, weights = fit(model, KLAnnealing(schedule, unit="step"))
        expected = linear_reference(np.arange(8), 4)  # 2 epochs x 4 steps
        np.testing.assert_allclose(weights[:, 0], expected, rtol=1e-6)
        # Weights at epoch ends: those of the last batch of each epoch.
        np.testing.assert_allclose(history["kl_weight"], expected[[3, 7]], rtol=1e-6)
        assert sorted(history) == ["kl", "kl_weight", "loss", "neg_elbo", "reconstruction"]

    def test_epoch_unit_uses_fractional_epochs(self):
        model = make_vae()
        history, weights = fit(model, KLAnnealing(LinearWarmup(1.5), unit="epoch"), epochs=3)
        progress = np.arange(12) / 4  # epoch + batch / 4
        expected = linear_reference(progress, 1.5)
        np.testing.assert_allclose(weights[:, 0], expected, rtol=1e-6)
        np.testing.assert_allclose(history["kl_weight"], expected[[3, 7, 11]], rtol=1e-6)

    @pytest.mark.skipif(
        keras.backend.backend() == "torch",
        reason="Keras's PyTorch backend refuses steps_per_execution > 1",
    )
    def test_steps_per_execution_sets_weight_once_per_execution(self):
        # Two steps per call to the train function: the weight is set from
        # the first step of each call, and the count still advances by 4 per
        # epoch.
        model = make_vae(steps_per_execution=2)
        history, weights = fit(model, KLAnnealing(LinearWarmup(8), unit="step"))
        expected = linear_reference([0, 2, 4, 6], 8)
        np.testing.assert_allclose(weights[:, 0], expected, rtol=1e-6)
        np.testing.assert_allclose(history["kl_weight"], expected[[1, 3]], rtol=1e-6)

    # Keras warns when a dataset of unknown length runs out, as it must here.
    @pytest.mark.filterwarnings("ignore:Your input ran out of data")
    @pytest.mark.skipif(
        keras.backend.backend() != "tensorflow", reason="tf.data input: TensorFlow backend"
    )
    def test_epoch_unit_with_unknown_epoch_length_uses_whole_epochs(self):
        import tensorflow as tf

        # `filter` hides the dataset's length: Keras does not know the steps.
        data = tf.data.Dataset.from_tensor_slices((DATA, DATA)).filter(lambda x, y: True)
        data = data.batch(BATCH)
        assert data.cardinality().numpy() == tf.data.UNKNOWN_CARDINALITY
        model = make_vae()
        _, weights = fit(model, KLAnnealing(LinearWarmup(4), unit="epoch"), epochs=2, data=data)
        np.testing.assert_allclose(weights[:, 0], [0.0] * 4 + [0.25] * 4, rtol=1e-6)

    @pytest.mark.parametrize("callback", ["same", "new"])
    def test_step_count_continues_across_fit_calls(self, callback):
        # The step is the model's (its optimizer's iteration count), not the
        # callback's: a new KLAnnealing continues where the last one stopped.
        model = make_vae()
        annealing = KLAnnealing(LinearWarmup(6), unit="step")
        _, first = fit(model, annealing, epochs=1)
        if callback == "new":
            annealing = KLAnnealing(LinearWarmup(6), unit="step")
        _, second = fit(model, annealing, epochs=1)
        weights = np.concatenate([first[:, 0], second[:, 0]])
        np.testing.assert_allclose(weights, linear_reference(np.arange(8), 6), rtol=1e-6)

    @pytest.mark.parametrize(
        "unit, duration, progress",
        [("step", 20, np.arange(16)), ("epoch", 5, np.arange(16) / 4)],
        ids=["step", "epoch"],
    )
    def test_run_resumed_by_backup_and_restore_continues_the_schedule(
        self, unit, duration, progress, tmp_path
    ):
        # A run of 4 epochs (16 steps) crashes at the start of epoch 2 and is
        # resumed, as by a new process, with a new model and a new
        # KLAnnealing: the 8 + 8 weights are those of an uninterrupted run
        # (the schedule at steps 0..15). KLAnnealing comes first in the
        # callbacks, before BackupAndRestore restores the model and optimizer.
        class Crash(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                if epoch == 2:
                    raise RuntimeError("crash at epoch 2")

        def run(model, *extra):
            """Fits `model` for 4 epochs; returns the weights it recorded,
            also when the fit crashes."""
            recorder = WeightRecorder(regularizers_of(model))
            callbacks = [
                KLAnnealing(LinearWarmup(duration), unit=unit),
                keras.callbacks.BackupAndRestore(str(tmp_path / "backup")),
                recorder,
                *extra,
            ]
            try:
                model.fit(
                    DATA,
                    DATA,
                    epochs=4,
                    batch_size=BATCH,
                    shuffle=False,
                    verbose=0,
                    callbacks=callbacks,
                )
            except RuntimeError as error:
                assert str(error) == "crash at epoch 2"
            return recorder.weights

        crashed = run(make_vae(), Crash())
        assert len(crashed) == 8
        resumed = run(make_vae())
        weights = np.array(crashed + resumed)[:, 0]
        # Stored in a float32 variable: relative round-off 2**-24.
        np.testing.assert_allclose(weights, linear_reference(progress, duration), rtol=1e-6)

    @pytest.mark.parametrize("layout", ["two-posteriors", "nested-model"])
    def test_every_regularizer_is_set(self, layout):
        keras.utils.set_random_seed(0)
        x = keras.Input((PIXELS,))
        if layout == "two-posteriors":
            z = posterior("kl_b")(posterior("kl_a")(x))
            expected_metrics = ["kl_a", "kl_b"]
        else:
            inner = keras.Input((PIXELS,))
            encoder = keras.Model(inner, posterior("kl_inner")(inner), name="encoder")
            z = posterior("kl_outer")(keras.layers.Dense(4)(encoder(x)))
            expected_metrics = ["kl_inner", "kl_outer"]
        model = compile_vae(ke.ELBOModel(x, keras.layers.Dense(PIXELS)(z)))
        annealing = KLAnnealing(CyclicalAnnealing(period=3, ratio=1.0, start=0.1), unit="step")
        history, weights = fit(model, annealing)
        assert sorted(r.metric_name for r in annealing.regularizers) == expected_metrics
        expected = cyclical_reference(np.arange(8), period=3, ratio=1.0, start=0.1)
        np.testing.assert_allclose(weights, np.stack([expected, expected], axis=1), rtol=1e-6)
        assert set(expected_metrics) < set(history)

    def test_shared_submodel_is_found_once(self):
        inner = keras.Input((PIXELS,))
        encoder = keras.Model(inner, keras.layers.Dense(PIXELS)(posterior()(inner)))
        x = keras.Input((PIXELS,))
        model = compile_vae(keras.Model(x, encoder(encoder(x))))
        annealing = KLAnnealing(LinearWarmup(4), unit="step")
        fit(model, annealing, epochs=1)
        assert len(annealing.regularizers) == 1

    def test_user_callable_schedule(self):
        model = make_vae()
        history, weights = fit(model, KLAnnealing(lambda step: 0.5**step, unit="step"))
        np.testing.assert_allclose(weights[:, 0], 0.5 ** np.arange(8), rtol=1e-6)
        np.testing.assert_allclose(history["kl_weight"], [0.5**3, 0.5**7], rtol=1e-6)

    @pytest.mark.parametrize(
        "bad, shown",
        [(-0.5, "-0.5"), (math.nan, "nan"), (math.inf, "inf"), ("high", "'high'")],
        ids=["negative", "nan", "inf", "string"],
    )
    def test_invalid_weight_from_schedule_raises(self, bad, shown):
        model = make_vae()
        # Raised before the first step, so no train function is traced.
        annealing = KLAnnealing(lambda epoch: bad)
        with pytest.raises(ValueError, match=f"returned {shown} at progress=0 \\(epochs\\)"):
            fit(model, annealing, epochs=1)

    def test_verbose_prints_one_line_per_epoch(self, capsys):
        model = make_vae()
        fit(model, KLAnnealing(LinearWarmup(4), unit="step", verbose=1))
        lines = [line for line in capsys.readouterr().out.splitlines() if "KLAnnealing" in line]
        assert lines == [
            "KLAnnealing: epoch 1 kl_weight=0.7500",
            "KLAnnealing: epoch 2 kl_weight=1.0000",
        ]

    # The model is saved before any training: its optimizer has no slots yet.
    @pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
    def test_loaded_model_follows_schedule(self, tmp_path):
        model = make_vae()
        model.layers[2].kl_regularizer.kl_weight.assign(0.3)
        model.save(tmp_path / "vae.keras")
        loaded = keras.saving.load_model(tmp_path / "vae.keras")
        assert float(h.numpy(loaded.layers[2].kl_regularizer.kl_weight)) == pytest.approx(0.3)
        schedule = CyclicalAnnealing(period=4, num_cycles=1)
        history, weights = fit(loaded, KLAnnealing(schedule, unit="step"))
        np.testing.assert_allclose(weights[:, 0], cyclical_reference(np.arange(8), 4, 1))
        assert history["kl_weight"] == [1.0, 1.0]

    @pytest.mark.parametrize(
        "unit, schedule, weights",
        [
            ("epoch", LinearWarmup(1.5), linear_reference(np.arange(8) / 4, 1.5)),
            ("step", LinearWarmup(8), linear_reference(np.arange(8), 8)),
        ],
        ids=["epoch", "step"],
    )
    def test_each_step_trains_with_the_scheduled_weight(self, unit, schedule, weights):
        # The weight a step used, read from its logs alone: the step's loss
        # less its reconstruction is weight * kl. (A callback that read the
        # variables would sync JAX's training state and hide an assignment
        # the step never saw.)
        class LogRecorder(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.rows = []  # per batch: the running means of the epoch

            def on_train_batch_end(self, batch, logs=None):
                self.rows.append([float(logs[k]) for k in ("loss", "reconstruction", "kl")])

        model, recorder = make_vae(), LogRecorder()
        model.fit(
            DATA, DATA, epochs=2, batch_size=BATCH, shuffle=False, verbose=0,
            callbacks=[KLAnnealing(schedule, unit=unit), recorder],
        )  # fmt: skip
        means = np.array(recorder.rows, np.float64).reshape(2, 4, 3)
        # Batch t of an epoch (1-based) from the running means:
        # t * m_t - (t - 1) * m_(t-1).
        t = np.arange(1, 5)[None, :, None]
        previous = np.concatenate([np.zeros((2, 1, 3)), means[:, :-1]], axis=1)
        batches = (t * means - (t - 1) * previous).reshape(8, 3)
        loss, reconstruction, kl = batches.T
        # Each float32 mean has a relative round-off of at most (t + 2) U
        # (a float32 sum of t terms, a division); the difference above
        # multiplies it by at most 2t - 1 <= 7: an absolute error below
        # 7 * 6 * U * max|m| per term, for loss, reconstruction and kl.
        atol = 3 * 42 * 2.0**-24 * np.abs(means).max()
        assert np.all(kl > 100 * atol), kl  # a KL the weights visibly scale
        np.testing.assert_allclose(loss - reconstruction, weights * kl, rtol=0, atol=atol)

    def test_loss_is_reconstruction_plus_scheduled_weight_times_kl(self):
        # One step on the whole data set from identically built models (same
        # initial weights, same sample seeds): the logged loss of that step is
        # reconstruction + w * kl, with the reconstruction and the KL the same
        # for every w, so the loss difference is exactly the w difference
        # times the logged KL.
        def first_step(weight):
            model = make_vae()
            history = model.fit(
                DATA,
                DATA,
                epochs=1,
                batch_size=len(DATA),
                verbose=0,
                callbacks=[KLAnnealing(lambda progress: weight)],
            ).history
            assert history["kl_weight"] == [weight]
            return history["loss"][0], history["kl"][0]

        (loss_0, kl_0), (loss_w, kl_w) = first_step(0.0), first_step(2.5)
        np.testing.assert_allclose(kl_0, kl_w, rtol=1e-6)
        np.testing.assert_allclose(loss_w - loss_0, 2.5 * kl_0, rtol=1e-4)


class TestFreeBitsWithWeight:
    """The added loss is `kl_weight * sum_j max(free_bits, kl_j)`, the weight
    multiplying the clamped dimensions too, at the constructor's weight and
    at the weights KLAnnealing sets in fit."""

    FREE_BITS, WEIGHT, MIN_SCALE = 0.3, 2.5, 1e-4
    # Per latent dimension: near the prior (KL about 0.00 and 0.015, below
    # the free bits) or far from it (KL about 1.44 and 2.75, above).
    LOC = np.array([0.0, 0.1, 1.5, -2.0])
    SCALE = np.array([1.0, 0.9, 0.5, 0.3])

    def model(self):
        keras.utils.set_random_seed(0)
        regularizer = ke.KLRegularizer(
            mode="analytic", weight=self.WEIGHT, free_bits=self.FREE_BITS, seed=1
        )
        posterior = ke.GaussianPosterior(
            4, kl_regularizer=regularizer, min_scale=self.MIN_SCALE, seed=2
        )
        x = keras.Input((PIXELS,))
        model = compile_vae(keras.Model(x, keras.layers.Dense(PIXELS)(posterior(x))))
        kernel = np.random.default_rng(3).normal(scale=0.02, size=(PIXELS, 8))
        raw = np.log(np.expm1(self.SCALE - self.MIN_SCALE))  # softplus^-1
        posterior.projection.set_weights([kernel, np.concatenate([self.LOC, raw])])
        return model, posterior

    def expected(self, posterior, x, weight):
        """NumPy float64: weight * sum_j max(free_bits, mean_i kl_ij)."""
        kernel, bias = (np.asarray(v, np.float64) for v in posterior.projection.get_weights())
        params = np.asarray(x, np.float64) @ kernel + bias
        loc, scale = params[:, :4], h.softplus(params[:, 4:]) + self.MIN_SCALE
        kl_j = np.mean(0.5 * (loc**2 + scale**2 - 1.0 - 2.0 * np.log(scale)), axis=0)
        return weight * np.sum(np.maximum(self.FREE_BITS, kl_j)), kl_j

    def added_loss(self, model, x):
        model(x)
        assert len(model.losses) == 1
        return float(h.numpy(model.losses[0]))

    # Float32 forward pass (a 16-term matmul, softplus, log, a mean over 16
    # examples, a sum over 4 dimensions): about 50 round-offs of 2**-24, 3e-6,
    # relative to the unclamped KL terms (of one sign); rtol 1e-5.
    RTOL = 1e-5

    def test_constructor_weight(self):
        model, posterior = self.model()
        x = DATA[:BATCH]
        expected, kl_j = self.expected(posterior, x, self.WEIGHT)
        # The free bits clamp some dimensions and not others.
        assert np.any(kl_j < self.FREE_BITS) and np.any(kl_j > self.FREE_BITS), kl_j
        np.testing.assert_allclose(self.added_loss(model, x), expected, rtol=self.RTOL)

    def test_annealed_weight_in_fit(self):
        model, posterior = self.model()
        x = DATA[:BATCH]
        test = self

        class Probe(keras.callbacks.Callback):
            """After each step: the KL weight, the added loss on `x` and its
            NumPy value at the current weights."""

            def __init__(self):
                super().__init__()
                self.rows = []

            def on_train_batch_end(self, batch, logs=None):
                model = self.model  # on JAX, writes the training state back
                weight = float(h.numpy(posterior.kl_regularizer.kl_weight))
                expected, kl_j = test.expected(posterior, x, weight)
                clamped = np.any(kl_j < test.FREE_BITS)
                self.rows.append((weight, test.added_loss(model, x), expected, clamped))

        probe = Probe()
        schedule = LinearWarmup(8, start=0.5, end=3.0)
        model.fit(
            DATA, DATA, epochs=2, batch_size=BATCH, shuffle=False, verbose=0,
            callbacks=[KLAnnealing(schedule, unit="step"), probe],
        )  # fmt: skip
        weights, actual, expected, clamped = (np.array(c) for c in zip(*probe.rows, strict=True))
        np.testing.assert_allclose(weights, linear_reference(np.arange(8), 8, 0.5, 3.0), rtol=1e-6)
        assert np.all(clamped)
        np.testing.assert_allclose(actual, expected, rtol=self.RTOL)


class TestExponentialDecay:
    @pytest.mark.parametrize(
        "kwargs", [{"rate": 0.3}, {"rate": 1e-4, "start": 2.0, "floor": 0.5}, {"rate": 0.0}]
    )
    def test_values_match_numpy(self, kwargs):
        schedule = ke.ExponentialDecay(**kwargs)
        progress = np.array([0.0, 0.5, 3.0, 10.0, 2e4])
        expected = np.maximum(
            kwargs.get("floor", 0.0), kwargs.get("start", 1.0) * np.exp(-kwargs["rate"] * progress)
        )
        np.testing.assert_allclose([schedule(p) for p in progress], expected, rtol=1e-12)

    @pytest.mark.parametrize(
        "kwargs, name", [({"rate": -1.0}, "rate"), ({"rate": 1, "floor": -1}, "floor")]
    )
    def test_invalid_arguments(self, kwargs, name):
        with pytest.raises(ValueError, match=f"argument `{name}`"):
            ke.ExponentialDecay(**kwargs)

    def test_config_and_repr(self):
        schedule = ke.ExponentialDecay(1e-4, floor=0.5)
        assert ke.ExponentialDecay.from_config(schedule.get_config()).get_config() == {
            "rate": 1e-4,
            "start": 1.0,
            "floor": 0.5,
        }
        assert repr(schedule) == "ExponentialDecay(rate=0.0001, start=1.0, floor=0.5)"


def gumbel_vae(estimator="gumbel_softmax"):
    keras.utils.set_random_seed(0)
    x = keras.Input((PIXELS,))
    h_ = keras.layers.Dense(8, activation="relu")(x)
    codes = ke.CategoricalPosterior(
        2, 3, estimator=estimator, flatten=True, kl_regularizer=ke.KLRegularizer(), seed=0
    )(h_)
    bits = ke.BernoulliPosterior(2, estimator=estimator, kl_regularizer=ke.KLRegularizer())(h_)
    z = keras.layers.Concatenate()([codes, bits])
    return compile_vae(ke.ELBOModel(x, keras.layers.Dense(PIXELS)(z)))


class TemperatureRecorder(keras.callbacks.Callback):
    """The temperature of each Gumbel-softmax posterior after each batch."""

    def __init__(self):
        super().__init__()
        self.values = []

    def on_train_batch_end(self, batch, logs=None):
        _ = self.model  # on JAX, writes the training state back to the variables
        layers = find_layers(self.model, (ke.CategoricalPosterior, ke.BernoulliPosterior))
        self.values.append([float(h.numpy(layer.temperature_variable)) for layer in layers])


class TestTemperatureAnnealing:
    def test_each_step_trains_at_the_scheduled_temperature(self):
        model = gumbel_vae()
        schedule = ke.ExponentialDecay(0.2, start=2.0, floor=0.6)
        recorder = TemperatureRecorder()
        history = model.fit(
            DATA,
            DATA,
            epochs=2,
            batch_size=BATCH,
            shuffle=False,
            verbose=0,
            callbacks=[ke.TemperatureAnnealing(schedule, unit="step"), recorder],
        ).history
        # Both layers, each of the 8 steps: the schedule at the steps taken before.
        expected = [schedule(step) for step in range(8)]
        np.testing.assert_allclose(recorder.values, np.transpose([expected, expected]), rtol=1e-6)
        np.testing.assert_allclose(history["temperature"], [expected[3], expected[7]], rtol=1e-6)

    def test_model_without_gumbel_softmax_posterior_raises(self):
        with pytest.raises(ValueError, match="TemperatureAnnealing found no Gumbel-softmax"):
            gumbel_vae("straight_through").fit(
                DATA, DATA, verbose=0, callbacks=[ke.TemperatureAnnealing(LinearWarmup(2))]
            )

    def test_non_positive_temperature_from_schedule_raises(self):
        # LinearWarmup starts at 0: a temperature must be positive.
        with pytest.raises(ValueError, match="A temperature must be a finite, positive number"):
            gumbel_vae().fit(
                DATA, DATA, verbose=0, callbacks=[ke.TemperatureAnnealing(LinearWarmup(2))]
            )
