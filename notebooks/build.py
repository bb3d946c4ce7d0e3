"""Builds the notebooks from their sources and runs them, storing the outputs.

Each `notebooks/src/NAME.py` is a notebook written as a Python file: cells
start at `# %%` lines, Markdown cells at `# %% [markdown]` lines (their text
in `# ` comments). This script turns it into `notebooks/NAME.ipynb` and
executes it, so that the committed notebook opens with its outputs and plots.
The test suite executes every committed notebook again in a fast mode
(`KERAS_ELBO_FAST=1`, small data and few epochs), so none can rot.

    python notebooks/build.py              # every notebook, full mode
    python notebooks/build.py 01_vae       # one notebook
"""

import os
import pathlib
import re
import sys

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent
CELL = re.compile(r"^# %%( \[markdown\])?[^\n]*\n", flags=re.MULTILINE)


def to_notebook(source: str) -> nbformat.NotebookNode:
    """A notebook from a percent-format Python source."""
    cells = []
    parts = CELL.split(source)
    # parts: [preamble, marker_group, body, marker_group, body, ...]
    for markdown, body in zip(parts[1::2], parts[2::2], strict=True):
        body = body.strip("\n")
        if markdown:
            text = "\n".join(re.sub(r"^# ?", "", line) for line in body.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(text))
        elif body:
            cells.append(nbformat.v4.new_code_cell(body))
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return notebook


def execute(notebook: nbformat.NotebookNode, timeout: int = 1800) -> nbformat.NotebookNode:
    """Runs every cell in a fresh kernel, in the notebooks folder."""
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": HERE}}
    )
    client.execute()
    return notebook


# TensorFlow's C++ start-up lines (oneDNN, CUDA stubs, absl), which TF 2.21
# writes to stderr whatever TF_CPP_MIN_LOG_LEVEL says: noise to a reader.
NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IWE]\d{4} .*"
    r"(port\.cc|cudart_stub\.cc|cuda_\w+\.cc|cpu_feature_guard\.cc)"
    r"|To enable the following instructions: .* rebuild TensorFlow)"
)


def drop_start_up_noise(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Removes TensorFlow's start-up lines from the stderr outputs (and the
    outputs they leave empty)."""
    for cell in notebook.cells:
        kept = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                lines = output["text"].splitlines(keepends=True)
                output["text"] = "".join(line for line in lines if not NOISE.match(line))
                if not output["text"].strip():
                    continue
            kept.append(output)
        if "outputs" in cell:
            cell["outputs"] = kept
    return notebook


def build(name: str) -> pathlib.Path:
    source = (HERE / "src" / f"{name}.py").read_text()
    notebook = drop_start_up_noise(execute(to_notebook(source)))
    path = HERE / f"{name}.ipynb"
    nbformat.write(notebook, path)
    return path


if __name__ == "__main__":
    os.environ.pop("KERAS_ELBO_FAST", None)
    names = sys.argv[1:] or sorted(p.stem for p in (HERE / "src").glob("*.py"))
    for name in names:
        print(f"building {name} ...", flush=True)
        print(f"wrote {build(name)}")
