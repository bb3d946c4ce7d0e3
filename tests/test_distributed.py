"""Training across worker processes (README: "Scaling out").

`fold_in_seeds` on every backend; the README's PyTorch recipe run as two real
worker processes on 127.0.0.1 and checked against one process that computes
the same global batches with the same noise.
"""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_elbo as ke

ROOT = pathlib.Path(__file__).resolve().parents[1]


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


# ---------------------------------------------------------------------------
# PyTorch's DistributedDataParallel, two worker processes.


def _recipe():
    """The README's `train_ddp.py` block, unchanged."""
    blocks = re.findall(r"```py\n(# train_ddp\.py.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) == 1
    return blocks[0]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs the recipe's `main` in a worker and records what the test checks.
WORKER = """
import json, os, sys
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
REFERENCE = """
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


def _run_workers(tmp_path, world=2, timeout=300):
    env = {
        **os.environ,
        "KERAS_BACKEND": "torch",
        "PYTHONPATH": os.pathsep.join([p for p in [os.environ.get("PYTHONPATH"), str(ROOT)] if p]),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(world),
    }
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER],
            cwd=tmp_path,
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=timeout)[0])
    finally:
        for worker in workers:
            worker.kill()
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-3000:]
    return env, outputs


@pytest.mark.slow  # three processes, each importing PyTorch and Keras
def test_torch_ddp_recipe_equals_one_process_with_the_same_batches_and_noise(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")  # the digits
    (tmp_path / "train_ddp.py").write_text(_recipe())
    env, outputs = _run_workers(tmp_path)
    reference = subprocess.run(
        [sys.executable, "-c", REFERENCE],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert reference.returncode == 0, reference.stderr[-3000:]

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

    workers = [np.load(tmp_path / f"worker{rank}.npz") for rank in range(2)]
    ref = np.load(tmp_path / "reference.npz")
    weights = [k for k in ref.files if k.startswith("arr_")]
    assert len(weights) == 8  # four Dense kernels and biases
    for key in weights:
        np.testing.assert_array_equal(workers[0][key], workers[1][key])  # kept in sync
        np.testing.assert_allclose(workers[0][key], ref[key], rtol=1e-4, atol=1e-6, err_msg=key)
    # The warm-up reached the same KL weight on both workers.
    np.testing.assert_array_equal(workers[0]["kl_weight"], workers[1]["kl_weight"])
    assert workers[0]["kl_weight"][0] == pytest.approx(1.0)
    # Each worker draws its own noise.
    assert not np.allclose(workers[0]["draw"], workers[1]["draw"])

    # One file, written by rank 0, which loads and holds the trained weights.
    assert sorted(p.name for p in tmp_path.glob("*.keras")) == ["vae.keras"]
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import keras, numpy as np, keras_elbo as ke\n"
            "m = keras.saving.load_model('vae.keras', custom_objects=ke.custom_objects())\n"
            "w = np.load('worker0.npz')\n"
            "for i, v in enumerate(m.trainable_variables):\n"
            "    value = keras.ops.convert_to_numpy(v.value)\n"
            "    np.testing.assert_array_equal(value, w[f'arr_{i}'])\n"
            "print('loaded', len(m.trainable_variables))\n",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0, check.stderr[-3000:]
    assert "loaded 8" in check.stdout
