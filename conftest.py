"""Test-session settings shared by tests/ and the doctests in keras_elbo/.

The backend is TensorFlow unless `KERAS_BACKEND` says otherwise. Under JAX or
PyTorch only the modules listed in `ALL_BACKENDS` are collected (tests and
doctests). The library runs on every backend; the modules left out are run on
TensorFlow only because they test TensorFlow-side things or cost too much to
repeat: the demo and notebooks (whole trainings), the README's code, the
property tests (hypothesis), the reliability tests (tf.distribute, XLA,
subprocesses), the cross-backend tests (which start each backend themselves)
and the data loaders (NumPy only: nothing backend-specific to repeat). So

    KERAS_BACKEND=jax python -m pytest

runs the backend-neutral part of the suite on JAX.
"""

import os
import pathlib

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ["KERAS_BACKEND"] == "torch":
    # Tiny models: PyTorch's thread pool costs more than it gains on a shared
    # 2-core machine (a small matmul 4 ms instead of 15 us).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = pathlib.Path(__file__).resolve().parent

# Paths, relative to the repository root, that run on every backend.
ALL_BACKENDS = {
    "conftest.py",
    "keras_elbo/_backend.py",
    "keras_elbo/_base.py",
    "keras_elbo/_math.py",
    "keras_elbo/bayesian.py",
    "keras_elbo/callbacks.py",
    "keras_elbo/distributions.py",
    "keras_elbo/divergence.py",
    "keras_elbo/evaluation.py",
    "keras_elbo/flows.py",
    "keras_elbo/losses.py",
    "keras_elbo/model.py",
    "keras_elbo/posteriors.py",
    "keras_elbo/predictive.py",
    "keras_elbo/priors.py",
    "keras_elbo/weight_posteriors.py",
    "keras_elbo/outputs.py",
    "tests/__init__.py",
    "tests/test_bayesian.py",
    "tests/test_callbacks.py",
    "tests/test_distributions.py",
    "tests/test_divergence.py",
    "tests/test_evaluation.py",
    "tests/test_flows.py",
    "tests/test_layer_battery.py",
    "tests/test_iwae.py",
    "tests/test_variational.py",
    "tests/test_outputs.py",
    "tests/test_losses.py",
    "tests/test_migration_guide.py",
    "tests/test_model.py",
    "tests/test_package.py",
    "tests/test_posteriors.py",
    "tests/test_predictive.py",
    "tests/test_priors.py",
    "tests/test_subclassing.py",
    "tests/test_vampprior.py",
}


def pytest_ignore_collect(collection_path, config):
    # KERAS_ELBO_COLLECT_ALL=1 collects everything (for porting a module).
    if (
        os.environ["KERAS_BACKEND"] == "tensorflow"
        or os.environ.get("KERAS_ELBO_COLLECT_ALL") == "1"
        or collection_path.is_dir()
    ):
        return None
    relative = collection_path.resolve().relative_to(ROOT).as_posix()
    return True if relative not in ALL_BACKENDS else None
