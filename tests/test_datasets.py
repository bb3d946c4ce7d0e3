import numpy as np
import pytest

from keras_elbo import datasets

SPLITS = {"train": 7, "valid": 3, "test": 5}


def write_packed(path, **arrays):
    np.savez(path, **{key: np.packbits(a.astype("uint8"), axis=1) for key, a in arrays.items()})


class TestLoadBinarizedMNIST:
    def test_round_trip(self, tmp_path):
        rng = np.random.default_rng(0)
        arrays = {key: rng.integers(0, 2, (n, 784)) for key, n in SPLITS.items()}
        path = tmp_path / "mnist.npz"
        write_packed(path, **arrays)
        loaded = datasets.load_binarized_mnist(path)
        assert len(loaded) == 3
        for x, key in zip(loaded, ("train", "valid", "test"), strict=True):
            assert x.dtype == np.float32
            assert x.shape == (SPLITS[key], 784)
            np.testing.assert_array_equal(x, arrays[key])

    def test_accepts_a_string_path(self, tmp_path):
        write_packed(tmp_path / "m.npz", **{k: np.ones((2, 784)) for k in SPLITS})
        train, _, _ = datasets.load_binarized_mnist(str(tmp_path / "m.npz"))
        assert train.shape == (2, 784)
        assert train.min() == 1.0

    def test_missing_file(self, tmp_path):
        path = tmp_path / "absent.npz"
        with pytest.raises(FileNotFoundError, match="absent.npz"):
            datasets.load_binarized_mnist(path)

    def test_missing_arrays(self, tmp_path):
        path = tmp_path / "partial.npz"
        write_packed(path, train=np.zeros((2, 784)), other=np.zeros((2, 784)))
        with pytest.raises(ValueError, match=r"missing \['valid', 'test'\].*'other', 'train'"):
            datasets.load_binarized_mnist(path)


class TestLoadDigits:
    def test_shapes_and_values(self):
        x_train, x_test = datasets.load_digits()
        assert len(x_train) + len(x_test) == 1797
        assert x_train.shape[1] == x_test.shape[1] == 64
        assert x_train.dtype == x_test.dtype == np.float32
        assert set(np.unique(np.concatenate([x_train, x_test]))) == {0.0, 1.0}

    @pytest.mark.parametrize("test_fraction", [0.1, 0.2, 0.5], ids=["10%", "20%", "50%"])
    def test_split_size(self, test_fraction):
        x_train, x_test = datasets.load_digits(test_fraction=test_fraction)
        assert len(x_test) == round(test_fraction * 1797)
        assert len(x_train) == 1797 - len(x_test)

    def test_threshold(self):
        from sklearn.datasets import load_digits

        pixels = load_digits().data
        x_train, x_test = datasets.load_digits(threshold=4.0)
        on = np.concatenate([x_train, x_test]).sum()
        assert on == (pixels >= 4.0).sum()

    def test_seed(self):
        first, second = datasets.load_digits(seed=1), datasets.load_digits(seed=1)
        other = datasets.load_digits(seed=2)
        np.testing.assert_array_equal(first[0], second[0])
        np.testing.assert_array_equal(first[1], second[1])
        assert not np.array_equal(first[1], other[1])

    @pytest.mark.parametrize("test_fraction", [0.0, 1.0, -0.5], ids=["zero", "one", "negative"])
    def test_invalid_fraction(self, test_fraction):
        with pytest.raises(ValueError, match="test_fraction"):
            datasets.load_digits(test_fraction=test_fraction)


def test_load_digits_labels_follow_their_images():
    from sklearn.datasets import load_digits as sklearn_load_digits

    x_train, y_train, x_test, y_test = datasets.load_digits(seed=3, with_labels=True)
    np.testing.assert_array_equal(x_train, datasets.load_digits(seed=3)[0])
    reference = sklearn_load_digits()
    binary = (reference.data >= 8.0).astype("float32")
    # Each returned image is one of scikit-learn's, with that image's label.
    for image, label in zip(x_test[:50], y_test[:50], strict=True):
        matches = np.flatnonzero((binary == image).all(axis=1))
        assert label in set(reference.target[matches])
    assert len(y_train) == len(x_train) and set(np.unique(y_train)) == set(range(10))
