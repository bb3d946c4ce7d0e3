import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_elbo as ke
from keras_elbo import datasets, demo
from keras_elbo.flows import FlowPosterior

pytestmark = pytest.mark.slow  # whole trainings, subprocesses (README: Tests)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("reconstructions.png", "samples.png", "curves.png")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short demo run on the digits, shared by the tests of this module."""
    output = tmp_path_factory.mktemp("demo")
    result = demo.main(["--epochs", "2", "--output", str(output), "--verbose", "0"])
    return output, result


class TestMain:
    @pytest.mark.parametrize("name", PLOTS)
    def test_writes_png(self, run, name):
        output, _ = run
        data = (output / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 1000

    def test_saves_model(self, run):
        output, result = run
        assert result["model_path"] == os.path.join(output, "vae.keras")
        assert (output / "vae.keras").stat().st_size > 0

    def test_numbers(self, run):
        _, result = run
        history = result["history"]
        logged = {"loss", "kl", "reconstruction", "neg_elbo"}  # an ELBOModel's logs
        assert set(history) == logged | {f"val_{key}" for key in logged}
        assert all(len(values) == 2 for values in history.values())
        assert math.isfinite(result["test_elbo"]) and result["test_elbo"] < 0
        assert math.isfinite(result["reloaded_test_elbo"])
        assert math.isfinite(result["test_log_likelihood"])
        assert result["test_kl"] >= 0

    def test_reloaded_elbo_matches(self, run):
        # Every evaluation draws new z, so the two numbers differ by Monte
        # Carlo noise: size it from repeated evaluations of the saved model.
        _, result = run
        model = keras.saving.load_model(result["model_path"], custom_objects=ke.custom_objects())
        _, x_test = datasets.load_digits(seed=0)
        losses = [model.evaluate(x_test, x_test, batch_size=64, verbose=0)[0] for _ in range(10)]
        std = np.std(losses, ddof=1)
        # Two independent draws: the difference has std sqrt(2) * std.
        tolerance = 5 * math.sqrt(2) * std
        assert abs(result["reloaded_test_elbo"] - result["test_elbo"]) < tolerance
        assert abs(np.mean(losses) + result["test_elbo"]) < tolerance


class TestCommandLine:
    def test_help(self, capsys):
        with pytest.raises(SystemExit) as exit_info:
            demo.main(["--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        for flag in ("--data", "--epochs", "--prior", "--kl-mode", "--output"):
            assert flag in text

    def test_analytic_mixture_is_a_usage_error(self, capsys):
        with pytest.raises(SystemExit) as exit_info:
            demo.main(["--prior", "mixture", "--kl-mode", "analytic"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "mode='analytic'" in err and "mode='mc'" in err and "Traceback" not in err

    @pytest.mark.parametrize(
        "argv", [["--epochs", "0"], ["--prior", "laplace"]], ids=["epochs", "prior"]
    )
    def test_invalid_flags(self, argv):
        with pytest.raises(SystemExit) as exit_info:
            demo.main(argv)
        assert exit_info.value.code == 2

    def test_missing_data_file(self, tmp_path, capsys):
        with pytest.raises(SystemExit) as exit_info:
            demo.main(["--data", str(tmp_path / "absent.npz")])
        assert exit_info.value.code == 2
        assert "absent.npz" in capsys.readouterr().err

    @pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
    def test_subprocess_output(self, backend, tmp_path):
        # As a user runs it: without the TF_CPP_MIN_LOG_LEVEL of conftest.py.
        env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
        env["KERAS_BACKEND"] = backend
        command = [sys.executable, "-m", "keras_elbo.demo", "--epochs", "2", "--iw-samples", "5"]
        completed = subprocess.run(
            [*command, "--output", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert completed.returncode == 0, completed.stderr[-2000:]
        assert (tmp_path / "vae.keras").exists()
        # One display per epoch, its report line: no progress bar besides.
        training = completed.stdout.split("final test ELBO")[0].split("\n")
        lines = [line for line in training if line.strip()]
        assert len(lines) == 2, lines
        assert lines[0].startswith("epoch 1/2  train loss") and lines[1].startswith("epoch 2/2")
        # No TensorFlow start-up lines (oneDNN, CUDA drivers, cuInit).
        output = (completed.stdout + completed.stderr).lower()
        assert "onednn" not in output and "cuda" not in output, completed.stderr[-2000:]
        # Issue 17, point 12: a log (not a terminal) gets no progress-bar
        # control characters.
        assert not set("\b\r\x1b") & set(completed.stdout), repr(completed.stdout[-500:])


def test_build_vae_with_normal_prior():
    vae = demo.build_vae(16, latent_dim=3, hidden=8, prior="normal", seed=0)
    assert vae.get_layer("posterior").kl_regularizer.prior is None
    assert tuple(vae(np.zeros((2, 16), "float32")).shape) == (2, 16)
    assert len(vae.losses) == 1


def test_vamp_prior_with_warmup(tmp_path):
    argv = ["--prior", "vamp", "--warmup", "1", "--epochs", "2", "--iw-samples", "5"]
    result = demo.main([*argv, "--output", str(tmp_path), "--verbose", "0"])
    # LinearWarmup(1) in epochs: set before each step from epoch + step /
    # steps, so epoch 0 ends at (steps - 1) / steps, and epoch 1 at 1.
    steps = math.ceil(len(datasets.load_digits(seed=0)[0]) / 64)
    weights = result["history"]["kl_weight"]
    assert weights == [pytest.approx((steps - 1) / steps, rel=1e-6), 1.0]
    assert all((tmp_path / name).read_bytes().startswith(PNG_MAGIC) for name in PLOTS)
    assert math.isfinite(result["test_log_likelihood"])


def test_iaf_posterior(tmp_path):
    argv = ["--posterior", "iaf", "--num-flows", "2", "--epochs", "1", "--iw-samples", "5"]
    result = demo.main([*argv, "--output", str(tmp_path), "--verbose", "0"])
    model = keras.saving.load_model(result["model_path"])
    assert isinstance(model.get_layer("posterior"), FlowPosterior)
    assert len(model.get_layer("posterior").flows) == 2
    assert math.isfinite(result["test_elbo"]) and math.isfinite(result["test_log_likelihood"])
    assert result["test_kl"] > 0


def test_iwae_objective(tmp_path):
    argv = ["--objective", "iwae", "--train-samples", "3", "--dreg", "--epochs", "1"]
    result = demo.main([*argv, "--iw-samples", "5", "--output", str(tmp_path), "--verbose", "0"])
    model = keras.saving.load_model(result["model_path"])
    assert (model.objective, model.num_samples, model.dreg) == ("iwae", 3, True)
    history = result["history"]
    # The trained bound is tighter than the ELBO of the same samples.
    assert history["neg_iwae"][0] < history["neg_elbo"][0]
    assert math.isfinite(result["test_log_likelihood"])


def test_iwae_with_free_bits_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--objective", "iwae", "--train-samples", "2", "--free-bits", "0.5"])
    assert exit_info.value.code == 2
    assert "free_bits" in capsys.readouterr().err
