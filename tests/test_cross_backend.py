"""A `.keras` file written on one backend loads on another and predicts the same."""

import itertools
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # subprocesses, one per backend and role

SCRIPT = pathlib.Path(__file__).with_name("cross_backend_model.py")
ROOT = SCRIPT.parents[1]
BACKENDS = ("tensorflow", "jax", "torch")

# Five processes cover the six ordered pairs: each loads what the backends
# before it saved, then saves its own (a process per pair took eight for four).
CHAIN = (
    ("tensorflow", (), True),
    ("jax", ("tensorflow",), True),
    ("torch", ("tensorflow", "jax"), True),
    ("tensorflow", ("jax", "torch"), False),
    ("jax", ("torch",), False),
)


def run(backend, sources, save, folder):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    # (XLA_FLAGS comes from conftest.py: XLA's code generation unoptimised.)
    command = [sys.executable, str(SCRIPT), str(folder), backend]
    command += [f"--load={source}" for source in sources] + (["--save"] if save else [])
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cross_backend")
    for backend, sources, save in CHAIN:
        run(backend, sources, save, folder)
    return folder


def test_the_chain_covers_every_ordered_pair():
    pairs = {(source, backend) for backend, sources, _ in CHAIN for source in sources}
    assert pairs == set(itertools.permutations(BACKENDS, 2))


def test_jax_and_torch_processes_import_no_tensorflow(folder):
    # Each process of the chain loads and trains models of every public
    # layer: on JAX and PyTorch, neither TensorFlow nor TFP is loaded (up to
    # the first `model.save`, where Keras itself imports an installed
    # TensorFlow; see cross_backend_model.py).
    imported = {
        path.stem: json.loads(path.read_text()) for path in (folder / "imported").glob("*.json")
    }
    assert len(imported) == len(CHAIN), imported
    for process, modules in imported.items():
        if process.startswith("tensorflow"):
            assert "tensorflow" in modules, process  # the check sees an import
        else:
            assert modules == [], process


@pytest.mark.parametrize("source, target", list(itertools.permutations(BACKENDS, 2)))
def test_saved_model_predicts_the_same_on_another_backend(source, target, folder):
    saved, loaded = folder / source, folder / source / f"on_{target}"
    for name in ("vae", "regression"):
        expected = np.load(saved / f"{name}_predictions.npy")
        actual = np.load(loaded / f"{name}_loaded.npy")
        # Same weights, deterministic outputs (inference="mean"): equal up to
        # float32 round-off of differently ordered sums on each backend.
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6, err_msg=name)
        # Loaded compiled (issue 17, point 8: a model compiled on PyTorch failed
        # at `fit` elsewhere): the optimizer's state is restored (one epoch of
        # 32 rows in batches of 8 is 4 steps) and training goes on.
        compiled = json.loads((loaded / f"{name}_compiled.json").read_text())
        assert compiled["iterations"] == 4, name
        assert np.isfinite(compiled["loss"]), name
    # Every distribution output, rebuilt from its config on the other backend,
    # gives the same negative log-likelihoods of the same parameters and targets
    # (float32 round-off of each backend's own lgamma, softplus and sums).
    expected = json.loads((saved / "outputs.json").read_text())["losses"]
    actual = json.loads((loaded / "outputs_loaded.json").read_text())
    assert sorted(actual) == sorted(expected) and len(expected) == 12
    for name, values in expected.items():
        assert np.all(np.isfinite(values)), name
        np.testing.assert_allclose(actual[name], values, rtol=1e-5, atol=1e-5, err_msg=name)
