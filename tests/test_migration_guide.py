"""The migration guide from `tfp.layers`: it names every public `tfp.layers`
name, and its "after" code runs (on every backend: CI runs it on TensorFlow
and PyTorch, whose whole lists it takes; on JAX with `-m slow`)."""

import pathlib
import re

import pytest

GUIDE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "migrating_from_tfp_layers.md"


def test_guide_names_every_public_tfp_layers_name():
    tfp = pytest.importorskip("tensorflow_probability")
    names = {name for name in dir(tfp.layers) if not name.startswith("_")}
    text = GUIDE.read_text()
    # A table row's first cell names it in backquotes.
    listed = set(re.findall(r"`(\w+)`", text))
    assert len(names) > 30
    assert sorted(names - listed) == []


@pytest.mark.slow  # three small trainings (JAX compiles each)
def test_guide_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)
    assert len(blocks) == 4
    namespace = {}
    for block in blocks:
        exec(compile(block, str(GUIDE), "exec"), namespace)
    assert namespace["draws"].shape == (20, 5, 1)
    # Weights are drawn at each call: predictions differ between calls.
    assert namespace["draws"].std(axis=0).min() > 0


def test_library_names_only_tfp_layers_that_exist():
    # Issue 17, point 11: a docstring claimed to replace
    # `tfp.layers.IndependentStudentT`, which TFP has never had.
    tfp = pytest.importorskip("tensorflow_probability")
    names = set(dir(tfp.layers))
    package = pathlib.Path(__file__).resolve().parents[1] / "keras_elbo"
    texts = [path.read_text() for path in package.glob("*.py")]
    texts += [GUIDE.read_text(), (package.parent / "README.md").read_text()]
    named = {name for text in texts for name in re.findall(r"tfp\.layers\.(\w+)", text)}
    assert len(named) > 10
    assert sorted(named - names) == []
