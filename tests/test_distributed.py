"""`fold_in_seeds`: each data-parallel worker its own noise (README: "Scaling
out"). The recipes themselves run as worker processes in
tests/test_multiprocess.py."""

import keras
import numpy as np
import pytest

import keras_elbo as ke


def _probe_model(seed=0):
    x = keras.Input((3,))
    h = keras.layers.Dropout(0.5, seed=seed)(x)
    return keras.Model(x, ke.GaussianPosterior(2, seed=seed + 1)(h))


def _draws(model):
    inputs = np.ones((4, 3), "float32")
    return keras.ops.convert_to_numpy(model(inputs, training=True))


class TestFoldInSeeds:
    def test_different_values_draw_different_noise_and_equal_values_the_same(self):
        models = []
        for value in (0, 1, 1):
            keras.utils.set_random_seed(0)  # the same weights and seeds in each copy
            model = _probe_model()
            assert ke.fold_in_seeds(model, value) == 2  # the dropout's and the posterior's
            models.append(model)
        first, second, again = (_draws(model) for model in models)
        assert not np.allclose(first, second)
        np.testing.assert_array_equal(second, again)

    def test_without_it_copies_draw_the_same_noise(self):
        # What a worker that skips it gets: the same stream as every other.
        draws = []
        for _ in range(2):
            keras.utils.set_random_seed(0)
            draws.append(_draws(_probe_model()))
        np.testing.assert_array_equal(*draws)

    def test_keeps_the_draw_counter(self):
        keras.utils.set_random_seed(0)
        model = _probe_model()
        _draws(model)
        states = [v for v in model.variables if v.name == "seed_generator_state"]
        counters = [int(keras.ops.convert_to_numpy(v.value)[1]) for v in states]
        ke.fold_in_seeds(model, 3)
        assert [int(keras.ops.convert_to_numpy(v.value)[1]) for v in states] == counters
        assert max(counters) > 0

    @pytest.mark.parametrize("value", [-1, 1.5, True])
    def test_refuses_a_value_that_is_not_a_non_negative_integer(self, value):
        with pytest.raises(ValueError, match="value"):
            ke.fold_in_seeds(_probe_model(), value)

    def test_a_restored_backup_holds_no_generator_state(self, tmp_path):
        # Why the TensorFlow recipe folds the epoch in when it resumes: the
        # weights file restores the weights but not the generators, so a
        # restored model draws as a fresh one, its first steps' noise again.
        keras.utils.set_random_seed(0)
        fresh = _draws(_probe_model())
        keras.utils.set_random_seed(0)
        trained = _probe_model()
        for _ in range(3):
            _draws(trained)  # the generators advance
        trained.save_weights(tmp_path / "backup.weights.h5")
        keras.utils.set_random_seed(0)
        restored = _probe_model()
        restored.load_weights(tmp_path / "backup.weights.h5")
        np.testing.assert_array_equal(_draws(restored), fresh)
        keras.utils.set_random_seed(0)
        resumed = _probe_model()
        resumed.load_weights(tmp_path / "backup.weights.h5")
        ke.fold_in_seeds(resumed, 1)
        assert not np.allclose(_draws(resumed), fresh)
