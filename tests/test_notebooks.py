"""Every committed notebook matches its source, holds its outputs, and runs."""

import importlib.util
import pathlib

import keras
import matplotlib
import matplotlib.pyplot as plt
import nbformat
import pytest

pytestmark = pytest.mark.slow  # whole trainings, subprocesses (README: Tests)

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
spec = importlib.util.spec_from_file_location("notebook_build", NOTEBOOKS / "build.py")
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)

NAMES = sorted(path.stem for path in (NOTEBOOKS / "src").glob("*.py"))


def code_cells(notebook):
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_matches_source_and_has_outputs(name):
    committed = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    source = build.to_notebook((NOTEBOOKS / "src" / f"{name}.py").read_text())
    assert code_cells(committed) == code_cells(source), "run: python notebooks/build.py " + name
    outputs = [out for cell in committed.cells for out in cell.get("outputs", [])]
    assert any("image/png" in out.get("data", {}) for out in outputs), "no plot stored"
    assert not [out for out in outputs if out.output_type == "error"]
    stderr = "".join(out.text for out in outputs if out.get("name") == "stderr")
    assert not [line for line in stderr.splitlines() if build.NOISE.match(line)]


def test_start_up_noise_is_dropped():
    noisy = build.to_notebook("# %%\nprint(1)\n")
    noisy.cells[0].outputs = [
        nbformat.v4.new_output(
            "stream",
            name="stderr",
            text="WARNING: All log messages before absl::InitializeLog() is called are "
            "written to STDERR\nI0000 00:00:1795622490.037997   22080 port.cc:153] oneDNN "
            "custom operations are on.\n",
        ),
        nbformat.v4.new_output("stream", name="stderr", text="UserWarning: kept\n"),
        nbformat.v4.new_output("stream", name="stdout", text="1\n"),
    ]
    outputs = build.drop_start_up_noise(noisy).cells[0].outputs
    assert [out.text for out in outputs] == ["UserWarning: kept\n", "1\n"]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_fast_mode(name, monkeypatch):
    # The cells run in this process, in a fresh namespace, in the notebooks
    # folder: a Jupyter kernel per notebook (nbclient, as `build.py` runs
    # them to store their outputs) took 137 s for the six on TensorFlow where
    # this takes 59 s (2026-12-04, 2 cores), its own start-up and imports
    # each time. What a fresh kernel alone would show (an import left out
    # that this process happens to hold cannot hide: the namespace is fresh)
    # is checked on the committed outputs above.
    monkeypatch.setenv("KERAS_ELBO_FAST", "1")
    monkeypatch.chdir(NOTEBOOKS)
    matplotlib.use("Agg")
    notebook = build.to_notebook((NOTEBOOKS / "src" / f"{name}.py").read_text())
    namespace = {"__name__": "__main__"}
    try:
        for index, source in enumerate(code_cells(notebook)):
            exec(compile(source, f"{name}.ipynb, code cell {index}", "exec"), namespace)
    finally:
        plt.close("all")
        keras.backend.clear_session()
