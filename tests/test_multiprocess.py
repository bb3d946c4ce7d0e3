"""The README's recipes for training across processes ("Scaling out"), run as
real worker processes on 127.0.0.1 (ports chosen free at run time, each
process bounded in time) and checked against one process on the same global
batches: PyTorch's DistributedDataParallel, JAX's `keras.distribution` and
TensorFlow's MultiWorkerMirroredStrategy (in the recipe's own loop, cut short
and resumed from its backup).

Each test starts its backend itself, in subprocesses (conftest.py lists this
module as TensorFlow-only: one run of it covers every backend)."""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _recipe(name):
    """The README's block that starts with `# <name>`, unchanged."""
    pattern = rf"```py\n(# {re.escape(name)}.*?)```"
    blocks = re.findall(pattern, (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) == 1, name
    return blocks[0]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The saved file holds worker 0's final weights.
LOAD_BACK = """
import keras, numpy as np, keras_elbo as ke
model = keras.saving.load_model("vae.keras", custom_objects=ke.custom_objects())
saved = np.load("worker0.npz")
for i, v in enumerate(model.trainable_variables):
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(v.value), saved[f"arr_{i}"])
print("loaded", len(model.trainable_variables))
"""


def _environment(backend):
    return {
        **os.environ,
        "KERAS_BACKEND": backend,
        "PYTHONPATH": os.pathsep.join(p for p in [os.environ.get("PYTHONPATH"), str(ROOT)] if p),
    }


TRACEBACK = "Traceback (most recent call last)"


def _run_workers(tmp_path, code, envs, timeout=300):
    """Starts one process per environment, running `code` in `tmp_path`;
    returns their outputs once all have ended (each must succeed, within
    `timeout` seconds in all).

    Each process writes to a file, not a pipe: a worker blocked on a full
    pipe that is not being read would stall the collective its peers wait
    in."""
    logs = [tmp_path / f"process{i}.log" for i in range(len(envs))]
    workers = []
    for env, log in zip(envs, logs, strict=True):
        with open(log, "w") as out:
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-c", code],
                    cwd=tmp_path,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    deadline = time.monotonic() + timeout
    try:
        # Until all succeed, one fails (its peers would wait for it), or time
        # is up. A JAX worker that raised may hang on its way out, waiting
        # for its peers: its traceback counts as failing.
        while time.monotonic() < deadline:
            codes = [worker.poll() for worker in workers]
            if all(code == 0 for code in codes) or any(code not in (None, 0) for code in codes):
                break
            if any(TRACEBACK in log.read_text() for log in logs):
                break
            time.sleep(0.2)
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
    outputs = [log.read_text() for log in logs]
    for i, (worker, output) in enumerate(zip(workers, outputs, strict=True)):
        failed = worker.returncode != 0 or TRACEBACK in output
        assert not failed, f"process {i} of {len(workers)}:\n{output[-3000:]}"
    return outputs


def _run(tmp_path, code, env, timeout=300):
    return _run_workers(tmp_path, code, [env], timeout)[0]


def _check_workers_against_reference(tmp_path, env):
    """The two workers' final weights are equal, and equal to the one-process
    reference's to float32 round-off; both ended at the warm-up's KL weight
    of 1; one `vae.keras` was written, and loads with worker 0's weights.
    Returns the workers' records."""
    workers = [np.load(tmp_path / f"worker{rank}.npz") for rank in range(2)]
    ref = np.load(tmp_path / "reference.npz")
    weights = [k for k in ref.files if k.startswith("arr_")]
    assert len(weights) == 8  # four Dense kernels and biases
    for key in weights:
        np.testing.assert_array_equal(workers[0][key], workers[1][key])  # kept in sync
        np.testing.assert_allclose(workers[0][key], ref[key], rtol=1e-4, atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(workers[0]["kl_weight"], workers[1]["kl_weight"])
    assert workers[0]["kl_weight"][0] == pytest.approx(1.0)
    assert sorted(p.name for p in tmp_path.glob("*.keras")) == ["vae.keras"]
    assert "loaded 8" in _run(tmp_path, LOAD_BACK, env)
    return workers


# ---------------------------------------------------------------------------
# PyTorch's DistributedDataParallel, two worker processes.


# Runs the recipe's `main` in a worker and records what the test checks.
TORCH_WORKER = """
import os, sys
import numpy as np
sys.path.insert(0, os.getcwd())
import keras
import train_ddp

model = train_ddp.main()
rank = int(os.environ["RANK"])
posterior = [layer for layer in model.layers if layer.name.startswith("gaussian_posterior")][0]
z = posterior(np.ones((4, 64), "float32"), training=True)  # a draw, the same input everywhere
np.savez(
    f"worker{rank}.npz",
    *[keras.ops.convert_to_numpy(v.value) for v in model.trainable_variables],
    kl_weight=[float(keras.ops.convert_to_numpy(r.kl_weight)) for r in model.kl_regularizers],
    draw=keras.ops.convert_to_numpy(z),
)
"""

# One process, no DDP: each global batch as the workers' two halves, each half
# with its worker's seeds, the loss their mean (what DDP's gradient average
# computes), the logs accumulated as the workers' are.
TORCH_REFERENCE = """
import json, os, sys
import numpy as np
sys.path.insert(0, os.getcwd())
import keras
import torch
from torch.utils.data import DataLoader, DistributedSampler
import keras_elbo as ke
import train_ddp

WORLD = 2
model = train_ddp.build_vae()
states = [v for v in model.variables if v.name == "seed_generator_state"]
start = [keras.ops.convert_to_numpy(v.value) for v in states]
streams = []
for rank in range(WORLD):
    for v, value in zip(states, start):
        v.assign(value)
    ke.fold_in_seeds(model, rank)
    streams.append([keras.ops.convert_to_numpy(v.value) for v in states])
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
x_train = torch.from_numpy(train_ddp.load_digits()[0])
samplers = [
    DistributedSampler(x_train, WORLD, rank, shuffle=True, seed=0, drop_last=True)
    for rank in range(WORLD)
]
loaders = [
    DataLoader(x_train, batch_size=train_ddp.GLOBAL_BATCH // WORLD, sampler=s, drop_last=True)
    for s in samplers
]
logs = []
for epoch in range(train_ddp.EPOCHS):
    for s in samplers:
        s.set_epoch(epoch)
    for batch, halves in enumerate(zip(*loaders)):
        for regularizer in model.kl_regularizers:
            regularizer.kl_weight.assign(train_ddp.warmup(epoch + batch / len(loaders[0])))
        losses = []
        for rank, x in enumerate(halves):
            for v, value in zip(states, streams[rank]):
                v.assign(value)
            losses.append(model.compute_loss(x=x, y=x, y_pred=model(x, training=True)))
            streams[rank] = [keras.ops.convert_to_numpy(v.value) for v in states]
        optimizer.zero_grad()
        (sum(losses) / WORLD).backward()
        optimizer.step()
    logs.append({m.name: float(m.result()) for m in model.metrics if m.name != "loss"})
    for metric in model.metrics:
        metric.reset_state()
np.savez("reference.npz", *[keras.ops.convert_to_numpy(v.value) for v in model.trainable_variables])
with open("reference.json", "w") as f:
    json.dump(logs, f)
"""

EPOCH_LINE = re.compile(r"^epoch (\d+)/\d+: (.*)$", re.M)


@pytest.mark.slow  # three processes, each importing PyTorch and Keras
def test_torch_ddp_recipe_equals_one_process_with_the_same_batches_and_noise(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")  # the digits
    (tmp_path / "train_ddp.py").write_text(_recipe("train_ddp.py"))
    env = {
        **_environment("torch"),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": "2",
    }
    outputs = _run_workers(tmp_path, TORCH_WORKER, [{**env, "RANK": str(r)} for r in range(2)])
    _run(tmp_path, TORCH_REFERENCE, env)

    # The logs rank 0 prints (the workers' means) are the reference's.
    printed = [
        dict((k, float(v)) for k, v in (item.split(" ") for item in line.split(", ")))
        for _, line in EPOCH_LINE.findall(outputs[0])
    ]
    expected = json.loads((tmp_path / "reference.json").read_text())
    assert len(printed) == len(expected) == 2
    for got, want in zip(printed, expected, strict=True):
        assert sorted(got) == ["kl", "neg_elbo", "reconstruction"]
        for name in got:  # printed to 3 decimals
            assert abs(got[name] - want[name]) <= 6e-4 + 1e-5 * abs(want[name]), name
    assert EPOCH_LINE.search(outputs[1]) is None  # rank 0 alone prints

    workers = _check_workers_against_reference(tmp_path, env)
    # Each worker draws its own noise.
    assert not np.allclose(workers[0]["draw"], workers[1]["draw"])


# ---------------------------------------------------------------------------
# JAX: keras.distribution's DataParallel and ModelParallel over two worker processes.

JAX_WORKER = """
import json, os, sys
import numpy as np
sys.path.insert(0, os.getcwd())
import importlib
import jax
import keras
from jax.experimental import multihost_utils

recipe = importlib.import_module(os.environ["RECIPE"])
model, history = recipe.main()
rank = jax.process_index()
# The posterior's draws for the same 4 rows on every worker, gathered.
posterior = [layer for layer in model.layers if layer.name.startswith("gaussian_posterior")][0]
encoder = keras.Model(model.inputs, posterior.output)
layout = keras.distribution.distribution().get_data_layout((8, 64)).backend_layout
probe = jax.make_array_from_process_local_data(layout, np.ones((4, 64), "float32"))
trainable = [v.value for v in encoder.trainable_variables]
non_trainable = [v.value for v in encoder.non_trainable_variables]
draw = jax.jit(lambda t, n, x: encoder.stateless_call(t, n, x, training=True)[0])(
    trainable, non_trainable, probe
)
whole = lambda v: np.asarray(multihost_utils.process_allgather(v.value, tiled=True))
np.savez(
    f"worker{rank}.npz",
    *[whole(v) for v in model.trainable_variables],
    kl_weight=[whole(r.kl_weight) for r in model.kl_regularizers],
    draw=multihost_utils.process_allgather(draw, tiled=True),
    logits_shard=model.get_layer("logits").kernel.value.addressable_data(0).shape,
)
with open(f"history{rank}.json", "w") as f:
    json.dump(history.history, f)
"""

# One process, one device, the same global batches in the same order.
JAX_REFERENCE = """
import json, os, sys
import numpy as np
sys.path.insert(0, os.getcwd())
import keras
import keras_elbo as ke
import train_jax

model = train_jax.build_vae()
x = train_jax.global_batches(train_jax.load_digits()[0]).reshape(-1, 64)
history = model.fit(
    x, x, batch_size=train_jax.GLOBAL_BATCH, epochs=train_jax.EPOCHS, shuffle=False, verbose=0,
    callbacks=[ke.KLAnnealing(ke.LinearWarmup(duration=1.0))],
)
np.savez("reference.npz", *[keras.ops.convert_to_numpy(v.value) for v in model.trainable_variables])
with open("reference.json", "w") as f:
    json.dump(history.history, f)
"""


@pytest.fixture(scope="module")
def jax_reference(tmp_path_factory):
    """The one-process run both JAX recipes are checked against: its folder."""
    pytest.importorskip("jax")
    pytest.importorskip("sklearn")  # the digits
    folder = tmp_path_factory.mktemp("jax_reference")
    (folder / "train_jax.py").write_text(_recipe("train_jax.py"))
    _run(folder, JAX_REFERENCE, _environment("jax"))
    return folder


@pytest.mark.slow  # two processes per recipe, each compiling the training step
@pytest.mark.parametrize("recipe", ["train_jax", "train_jax_sharded"])
def test_jax_recipes_equal_one_process(tmp_path, jax_reference, recipe):
    for name in ("train_jax", "train_jax_sharded"):
        (tmp_path / f"{name}.py").write_text(_recipe(f"{name}.py"))
    for name in ("reference.npz", "reference.json"):
        (tmp_path / name).write_bytes((jax_reference / name).read_bytes())
    env = {
        **_environment("jax"),
        "RECIPE": recipe,
        "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"127.0.0.1:{_free_port()}",
        "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
    }
    envs = [{**env, "KERAS_DISTRIBUTION_PROCESS_ID": str(r)} for r in range(2)]
    outputs = _run_workers(tmp_path, JAX_WORKER, envs)

    # Under SPMD each step is one computation over the global batch, the
    # batch split between the workers (DataParallel) or the logits' kernel
    # (ModelParallel): the logs are the global batch's on every worker, the
    # noise one draw for it, the same as in one process.
    reference = json.loads((tmp_path / "reference.json").read_text())
    for rank in range(2):
        logged = json.loads((tmp_path / f"history{rank}.json").read_text())
        assert sorted(logged) == sorted(reference)
        assert {"kl", "neg_elbo", "reconstruction", "kl_weight"} <= set(logged)
        for name, values in reference.items():
            np.testing.assert_allclose(logged[name], values, rtol=1e-5, atol=1e-5, err_msg=name)
    assert "Epoch 2/2" in outputs[0] and "Epoch" not in outputs[1]  # rank 0 alone reports

    workers = _check_workers_against_reference(tmp_path, _environment("jax"))
    draw = workers[0]["draw"]
    np.testing.assert_array_equal(draw, workers[1]["draw"])  # one global array
    if recipe == "train_jax":
        # The same input rows on the two workers (each its half of the
        # batch), different draws; every variable whole on each worker.
        assert draw.shape == (8, 8)
        assert not np.allclose(draw[:4], draw[4:])
        assert tuple(workers[0]["logits_shard"]) == (64, 64)
    else:
        # The batch whole on each worker, one draw for it; each worker
        # holds half of the logits' kernel (its columns).
        assert draw.shape == (4, 8)
        assert tuple(workers[0]["logits_shard"]) == (64, 32)


# ---------------------------------------------------------------------------
# TensorFlow: MultiWorkerMirroredStrategy over two worker processes, in the
# recipe's own training loop (Keras's `fit` does not run under it).

# The posterior's draws for the same 4 rows in each replica of `strategy`
# (this process's), after the recipe's `main` has returned `model`.
TF_DRAWS = """
posterior = [layer for layer in model.layers if layer.name.startswith("gaussian_posterior")][0]

@tf.function
def draw(rows):
    def replica_draw(x):
        return posterior(x, training=True)
    return strategy.run(replica_draw, args=(rows,))

rows = strategy.experimental_distribute_values_from_function(lambda _: tf.ones((4, 64)))
draws = [d.numpy() for d in strategy.experimental_local_results(draw(rows))]
"""

# Runs the recipe's `main` in a worker and records what the test checks.
TF_WORKER = (
    """
import os, sys
import numpy as np
sys.path.insert(0, os.getcwd())
import keras
import tensorflow as tf
import train_tf

model = train_tf.main()
strategy = model.distribute_strategy
rank = strategy.cluster_resolver.task_id
"""
    + TF_DRAWS
    + """
np.savez(
    f"worker{rank}.npz",
    *[keras.ops.convert_to_numpy(v.value) for v in model.trainable_variables],
    kl_weight=[float(keras.ops.convert_to_numpy(r.kl_weight)) for r in model.kl_regularizers],
    draw=draws[0],
)
"""
)

# The same, lost after the first epoch's backup (both workers: a restart
# restarts every worker).
TF_INTERRUPTED = """
import os, sys
sys.path.insert(0, os.getcwd())
import keras
import train_tf

back_up = keras.callbacks.BackupAndRestore.on_epoch_end

def back_up_and_stop(self, epoch, logs=None):
    back_up(self, epoch, logs)
    print("stopped after epoch", epoch + 1, flush=True)
    os._exit(0)

keras.callbacks.BackupAndRestore.on_epoch_end = back_up_and_stop
train_tf.main()
"""

# One process, the recipe's `main` under a MirroredStrategy over two CPU
# devices: the same two replicas (so the same replica indices in the noise)
# and the same rows for each, in its own folder.
TF_REFERENCE = (
    """
import os, sys
sys.path.insert(0, os.getcwd())
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np
import train_tf

os.makedirs("reference")
os.chdir("reference")
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

# Cut short after the first epoch's backup and resumed, as the workers are.
class Stop(Exception):
    pass

back_up = keras.callbacks.BackupAndRestore.on_epoch_end

def back_up_and_stop(self, epoch, logs=None):
    back_up(self, epoch, logs)
    raise Stop

keras.callbacks.BackupAndRestore.on_epoch_end = back_up_and_stop
try:
    train_tf.main(strategy)
except Stop:
    keras.callbacks.BackupAndRestore.on_epoch_end = back_up
model = train_tf.main(strategy)
"""
    + TF_DRAWS
    + """
np.savez(
    "../reference.npz",
    *[keras.ops.convert_to_numpy(v.value) for v in model.trainable_variables],
    draws=np.stack(draws),
)
"""
)


def _tf_config_environments(env):
    ports = [_free_port() for _ in range(2)]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    return [
        {
            **env,
            "TF_CONFIG": json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": rank}}
            ),
        }
        for rank in range(2)
    ]


def _epoch_logs(output):
    return {
        int(epoch): dict((k, float(v)) for k, v in (item.split(" ") for item in line.split(", ")))
        for epoch, line in EPOCH_LINE.findall(output)
    }


@pytest.mark.slow  # five processes, each importing TensorFlow
def test_tf_multi_worker_recipe_resumes_and_equals_one_process(tmp_path):
    pytest.importorskip("tensorflow")
    pytest.importorskip("sklearn")  # the digits
    (tmp_path / "train_tf.py").write_text(_recipe("train_tf.py"))
    env = {**_environment("tensorflow"), "TF_CPP_MIN_LOG_LEVEL": "3"}

    # Cut short after the first epoch's backup, then started again: it resumes.
    first = _run_workers(tmp_path, TF_INTERRUPTED, _tf_config_environments(env))
    assert all("stopped after epoch 1" in output for output in first)
    assert not list(tmp_path.glob("*.keras"))
    second = _run_workers(tmp_path, TF_WORKER, _tf_config_environments(env))
    assert sorted(p.name for p in tmp_path.glob("backup*")) == []  # deleted when done
    reference = _epoch_logs(_run(tmp_path, TF_REFERENCE, env))

    # Rank 0 alone prints; epoch 1 before the cut, epoch 2 after it (not 1 again).
    logs = {**_epoch_logs(first[0]), **_epoch_logs(second[0])}
    assert list(_epoch_logs(second[0])) == [2]
    assert not _epoch_logs(first[1]) and not _epoch_logs(second[1])
    assert sorted(logs) == sorted(reference) == [1, 2]
    for epoch, want in reference.items():
        assert sorted(logs[epoch]) == ["kl", "neg_elbo", "reconstruction"]
        for name in want:  # printed to 4 decimals
            assert abs(logs[epoch][name] - want[name]) <= 6e-5 + 1e-5 * abs(want[name]), name

    workers = _check_workers_against_reference(tmp_path, env)
    # Each worker draws as its replica in the reference, not as the other.
    draws = np.load(tmp_path / "reference.npz")["draws"]
    for rank in range(2):
        np.testing.assert_allclose(workers[rank]["draw"], draws[rank], rtol=1e-4, atol=1e-5)
    assert not np.allclose(workers[0]["draw"], workers[1]["draw"])
