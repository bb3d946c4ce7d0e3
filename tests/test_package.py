"""The package as a whole: its exports, its saving registry, its dependencies."""

import pathlib
import re

import keras

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


def test_library_never_imports_keras_2():
    # tf_keras is installed only because TFP 0.25 will not import without it;
    # the library's layers must all be Keras 3 layers.
    pattern = re.compile(r"^\s*(import tf_keras|from tf_keras|.*tfp\.layers|.*tf\.keras)", re.M)
    offenders = [path.name for path in PACKAGE.glob("*.py") if pattern.search(path.read_text())]
    assert offenders == []
