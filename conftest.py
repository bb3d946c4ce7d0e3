"""Test-session settings shared by tests/ and the doctests in keras_elbo/.

The backend is TensorFlow unless `KERAS_BACKEND` says otherwise. Every test
module and every doctest runs on every backend, except the modules listed in
`TENSORFLOW_ONLY`, each with its reason. A new test file therefore runs on
JAX and PyTorch too unless someone lists it here and says why. So

    KERAS_BACKEND=jax python -m pytest

runs the suite on JAX, less the TensorFlow-only modules.
"""

import gc
import os
import pathlib

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# XLA's CPU code generation unoptimised, for JAX and for TensorFlow's
# jit_compile=True (and the subprocesses the tests start, which inherit it):
# the tests' models are tiny, compiling is most of their time. The same
# programs, compiled with less effort. Measured 2026-12-04 (CPU seconds,
# 2 cores): tests/test_iwae.py and test_hierarchy.py on JAX 80 and 78 with
# these flags, 93 and 83 with level 0 alone (which had saved a third over
# the default level, 2026-12-03); XLA tests of test_reliability.py and
# test_model.py on TensorFlow 30 with the flags, 38 without.
#
# One thread for each backend's operations, here and in the subprocesses: the
# operations are tiny, and CI runs two test sessions side by side on two
# cores, where thread pools cost more than they gain. Measured 2026-12-04:
# four modules on TensorFlow and on JAX at once, 115 and 175 s of wall time
# with the backends' own pools, 110 and 167 s with one thread each (user CPU
# 91 and 184 s, then 87 and 176 s); in CI, TensorFlow's shared part 434 ->
# 403 s and JAX's fast subset 517 -> 478 s. PyTorch: a small matmul took
# 4 ms with its pool instead of 15 us.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    " --xla_cpu_multi_thread_eigen=false",
)
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
if os.environ["KERAS_BACKEND"] == "torch":
    os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = pathlib.Path(__file__).resolve().parent

# Paths, relative to the repository root, collected under TensorFlow only.
TENSORFLOW_ONLY = {
    "keras_elbo/_tfp.py": "TFP interop: TFP distributions exist on TensorFlow only",
    "keras_elbo/demo.py": "whole training; tests/test_demo.py runs the demo",
    "tests/test_demo.py": "whole trainings of the demo (its --backend runs are subprocesses)",
    "tests/test_readme.py": "runs every README block, one of them tf.distribute (TensorFlow)",
    "tests/test_properties.py": "hypothesis over every layer: costly; the layers' numbers "
    "are checked on every backend by their own modules",
    "tests/test_reliability.py": "tf.distribute, XLA, subprocesses that start each backend",
    "tests/test_cross_backend.py": "starts each backend itself, in subprocesses",
    "tests/cross_backend_model.py": "helper of test_cross_backend.py, run in its subprocesses",
    "tests/test_multiprocess.py": "starts PyTorch and JAX worker processes itself",
}


def pytest_ignore_collect(collection_path, config):
    # KERAS_ELBO_COLLECT_ALL=1 collects everything (for porting a module).
    # KERAS_ELBO_PART=shared collects all but the TensorFlow-only modules,
    # KERAS_ELBO_PART=tensorflow-only those alone: CI runs the two parts of
    # the TensorFlow suite side by side (.ci/run).
    if collection_path.is_dir() or os.environ.get("KERAS_ELBO_COLLECT_ALL") == "1":
        return None
    try:
        relative = collection_path.resolve().relative_to(ROOT).as_posix()
    except ValueError:  # outside the repository
        return None
    tensorflow_only = relative in TENSORFLOW_ONLY
    part = os.environ.get("KERAS_ELBO_PART")
    if part not in (None, "shared", "tensorflow-only"):
        raise ValueError(f"KERAS_ELBO_PART must be 'shared' or 'tensorflow-only', not {part!r}")
    if part == "shared" and tensorflow_only:
        return True
    if part == "tensorflow-only" and not tensorflow_only and relative.endswith(".py"):
        return True
    if os.environ["KERAS_BACKEND"] != "tensorflow" and tensorflow_only:
        return True
    return None


def pytest_collection_finish(session):
    # Python's cyclic garbage collector scans every live container object at
    # each full collection, and a test session that has imported TensorFlow,
    # JAX or PyTorch and built many models holds millions: its full
    # collections took 5 to 15% of a session's time (tests/test_model.py,
    # test_conditional.py, test_iwae.py and test_evaluation.py on TensorFlow,
    # 2026-12-04: 6.4 s of 126 CPU-s; 2.7 s with the settings below). The
    # imported modules are kept out of the scans (`freeze`), and collections
    # run less often. Tests do not depend on when garbage is collected.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20000, 20, 20)
