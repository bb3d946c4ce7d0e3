"""Small binary image data sets for examples and benchmarks, as float32 arrays."""

import os

import numpy as np

_MNIST_SPLITS = ("train", "valid", "test")
_MNIST_PIXELS = 784


def load_digits(
    threshold: float = 8.0, test_fraction: float = 0.2, seed: int = 0, with_labels: bool = False
) -> tuple[np.ndarray, ...]:
    """Scikit-learn's 8x8 handwritten digits, binarized and split.

    The 1,797 images ship with scikit-learn, so this works offline: a data set
    small enough to train a VAE in seconds on a CPU. Pixels (0 to 16) become
    `1.0` where `pixel >= threshold`, else `0.0`. Rows are shuffled with `seed`
    before the split, so the test set holds every digit.

    Needs scikit-learn: `pip install "keras_elbo[demo]"`.

    Args:
        threshold: the grey level (0 to 16) at and above which a pixel is on.
            Defaults to `8.0`.
        test_fraction: share of the images held out for testing, in (0, 1).
            Defaults to `0.2`.
        seed: seed of the shuffle. Defaults to `0`.
        with_labels: also return the digit (0 to 9) of each image. Defaults
            to `False`.

    Returns:
        `(x_train, x_test)`: float32 arrays of 0/1 with 64 columns; with
        `with_labels`, `(x_train, y_train, x_test, y_test)`.

    Example:

    >>> x_train, x_test = load_digits()
    >>> x_train.shape, x_test.shape
    ((1438, 64), (359, 64))
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            "Invalid value received for argument `test_fraction`. Expected a number "
            f"in (0, 1). Received: test_fraction={test_fraction}"
        )
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as error:  # an optional dependency: say how to get it
        raise ImportError(
            'load_digits needs scikit-learn: pip install "keras_elbo[demo]"'
        ) from error
    digits = sklearn_load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.data))
    x = (digits.data[order] >= threshold).astype("float32")
    y = digits.target[order]
    num_test = int(round(test_fraction * len(x)))
    if with_labels:
        return x[num_test:], y[num_test:], x[:num_test], y[:num_test]
    return x[num_test:], x[:num_test]


def load_binarized_mnist(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The statically binarized MNIST of Larochelle & Murray (2011), from a file.

    The data set of the published VAE likelihood tables: 50,000 train, 10,000
    valid and 10,000 test images. The file is an `.npz` holding uint8 arrays
    `train`, `valid` and `test`, each row 784 pixels packed with
    `numpy.packbits(axis=1)`. The test rows are ordered by digit: shuffle them
    before plotting a sample.

    Args:
        path: path of the `.npz` file.

    Returns:
        `(x_train, x_valid, x_test)`: float32 arrays of 0/1 with 784 columns.

    Raises:
        FileNotFoundError: if there is no file at `path`.
        ValueError: if the file lacks one of the three arrays.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No binarized MNIST file at {path!r}.")
    with np.load(path) as data:
        missing = [key for key in _MNIST_SPLITS if key not in data.files]
        if missing:
            raise ValueError(
                f"{path!r} must hold the arrays {list(_MNIST_SPLITS)} (packed with "
                f"numpy.packbits(axis=1)); missing {missing}, found {sorted(data.files)}."
            )
        # packbits pads each row to whole bytes: drop the padding bits.
        return tuple(
            np.unpackbits(data[key], axis=1)[:, :_MNIST_PIXELS].astype("float32")
            for key in _MNIST_SPLITS
        )
