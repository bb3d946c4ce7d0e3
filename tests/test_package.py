"""The package as a whole: its exports, its saving registry, its dependencies."""

import ast
import pathlib

import keras
import pytest

import keras_elbo as ke

PACKAGE = pathlib.Path(ke.__file__).parent


def test_custom_objects_lists_every_registered_class():
    registered = {
        name: obj
        for name, obj in keras.saving.get_custom_objects().items()
        if name.startswith("keras_elbo>")
    }
    assert ke.custom_objects() == registered
    assert len(registered) >= 9


def test_every_exported_name_exists():
    for name in ke.__all__:
        assert getattr(ke, name) is not None


def keras_2_uses(source):
    """Imports of tf_keras or of TFP's layers, and `tfp.layers` / `tf.keras`
    attributes, in code (docstrings may name `tfp.layers`: the classes they
    replace)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [alias.name for alias in node.names]
            module = getattr(node, "module", None) or ""
            if any(n.startswith("tf_keras") for n in [module, *names]) or "layers" in (
                module.split(".") if module.startswith("tensorflow_probability") else []
            ):
                found.append(ast.unparse(node))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in {("tfp", "layers"), ("tf", "keras")}:
                found.append(ast.unparse(node))
    return found


def test_keras_2_uses_are_found():
    assert keras_2_uses("import tf_keras\nx = tfp.layers.DenseVariational") == [
        "import tf_keras",
        "tfp.layers",
    ]
    assert keras_2_uses('"""Replaces tfp.layers.IndependentNormal."""') == []


def test_library_never_imports_keras_2():
    # tf_keras is installed only because TFP 0.25 will not import without it;
    # the library's layers must all be Keras 3 layers.
    offenders = {path.name: keras_2_uses(path.read_text()) for path in PACKAGE.glob("*.py")}
    assert {name: uses for name, uses in offenders.items() if uses} == {}


def test_metadata_declares_ranges_not_pins():
    # Issue 17, point 14: an exact pin in an extra forces every user of it
    # onto that version (on a GPU machine, whatever build the index serves).
    # CI pins what it tests in .ci/constraints.txt instead.
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = PACKAGE.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        requirements += extra
    assert [r for r in requirements if "==" in r] == []
    constraints = (root / ".ci" / "constraints.txt").read_text()
    assert "torch==2.13.0" in constraints.split()
    ci = (root / ".ci" / "run").read_text()
    assert "-c .ci/constraints.txt" in ci
    # Issue 17, point 13: CI tests the Keras floor the metadata declares.
    (keras_requirement,) = [r for r in project["dependencies"] if r.startswith("keras")]
    floor = keras_requirement.split(">=")[1]
    floor_constraints = (root / ".ci" / "constraints-floor.txt").read_text().split()
    assert f"keras=={floor}.0" in floor_constraints
    assert "-c .ci/constraints-floor.txt" in ci


def test_new_test_modules_run_on_every_backend(monkeypatch):
    # Issue 17, point 16: conftest.py lists the TensorFlow-only modules, each
    # with its reason; anything else (a new test file) runs on every backend.
    import conftest

    root = PACKAGE.parent
    for path, reason in conftest.TENSORFLOW_ONLY.items():
        assert (root / path).is_file(), f"stale entry {path}"
        assert len(reason) > 20, path
    for backend in ("jax", "torch"):
        monkeypatch.setenv("KERAS_BACKEND", backend)
        assert conftest.pytest_ignore_collect(root / "tests" / "test_new.py", None) is None
        assert conftest.pytest_ignore_collect(root / "tests" / "test_demo.py", None) is True


def private_keras_imports(path):
    """`(module, name)` of each `from keras.src... import name` in a file."""
    tree = ast.parse(path.read_text())
    return [
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("keras.src")
        for alias in node.names
    ]


def test_private_keras_imports_are_in_one_module_and_exist():
    # Keras's private modules are used where no public API does the same
    # (ELBOModel's functional construction and loss scaling): in model.py
    # alone, each checked here by name so that a Keras release that moves
    # one fails with the name rather than somewhere inside a model.
    users = {
        path.name: private_keras_imports(path)
        for path in sorted(PACKAGE.glob("*.py"))
        if private_keras_imports(path)
    }
    assert list(users) == ["model.py"], users
    for module, name in users["model.py"]:
        imported = __import__(module, fromlist=[name])
        assert hasattr(imported, name), f"Keras {keras.__version__} has no {module}.{name}"
