"""The README's Python blocks run, in order, in one namespace."""

import pathlib
import re

import pytest

pytestmark = pytest.mark.slow  # whole trainings, subprocesses (README: Tests)

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)  # the quickstart saves vae.keras
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "vae.keras").exists()
    # The warm-up example: 256 rows in batches of 32 are 8 steps an epoch, and
    # the weight logged at an epoch's end is the one set for its last batch.
    expected = [(epoch + 7 / 8) / 5 for epoch in range(2)]
    assert namespace["history"].history["kl_weight"] == expected
