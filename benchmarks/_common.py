"""Pieces shared by the likelihood benchmarks (`likelihood.py`, `iwae.py`,
`iwae_snr.py`): the test images, paired differences, the results file."""

import json
import os

import numpy as np

from keras_elbo import datasets


def load_mnist(path, test_subset=None):
    """Training and test images of statically binarized MNIST; with
    `test_subset`, that many random test images (the test rows are ordered by
    digit: a random subset, not the first N), the same for every model."""
    x_train, _, x_test = datasets.load_binarized_mnist(path)
    if test_subset:
        rows = np.random.default_rng(0).permutation(len(x_test))[:test_subset]
        x_test = x_test[rows]
    return x_train, x_test


def paired_differences(per_image, results, pairs):
    """Prints, and stores in `results[b]["log_px_minus_<a>"]`, the mean
    difference in log p(x) of `b` over `a` for each `(a, b)` of `pairs`, with
    its paired standard error: every model is evaluated on the same images,
    so a difference's standard error is much smaller than each model's own."""
    print("\nlog p(x) differences, per image (paired standard error):")
    for a, b in pairs:
        diff = per_image[b] - per_image[a]
        stderr = diff.std(ddof=1) / np.sqrt(len(diff))
        results[b][f"log_px_minus_{a}"] = [float(diff.mean()), float(stderr)]
        print(f"  {b} - {a}: {diff.mean():+.3f} (+/- {stderr:.3f})")


def write_results(args, results, name):
    """Writes `{"args": ..., "results": ...}` to `<args.output>/<name>.json`."""
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)
    print(f"\nwrote {path}")
