"""Start-up: what importing the package and parsing the command line pull in,
the registration of serializable classes without an eager import, and the
skipped initializers of a model whose weights come from a file. Fresh
interpreters; no timing assertions (benchmarks/cold_start.py measures)."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_sequencer as ks
from conftest import run_model, run_once

HEAVY = ("keras", "tensorflow", "jax", "torch", "numpy")
SUBCOMMANDS = ("predict", "evaluate", "export", "finetune", "demo")


def _python(script, tmp_path, backend=None, timeout=300):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    if backend:
        env["KERAS_BACKEND"] = backend
    # cwd outside the repository would change nothing (the package is installed
    # editable); tmp_path keeps stray files out of it.
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@run_once
@pytest.mark.parametrize("command", [(), *((c,) for c in SUBCOMMANDS)], ids=lambda c: c[0] if c else "main")
def test_help_exits_zero(command, tmp_path):
    done = subprocess.run([sys.executable, "-m", "keras_sequencer.cli", *command, "--help"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: keras-sequencer" in done.stdout


@run_once
def test_help_imports_nothing_heavy(tmp_path):
    # Importing the CLI and parsing every --help, in one interpreter.
    script = (
        "import contextlib, io, json, sys\n"
        "import keras_sequencer.cli as cli\n"
        f"for command in [[], *([c] for c in {list(SUBCOMMANDS)!r})]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            cli.build_parser().parse_args(command + ['--help'])\n"
        "        except SystemExit as stop:\n"
        "            assert stop.code == 0, command\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    assert json.loads(_python(script, tmp_path)) == []


@run_once
def test_import_package_imports_no_keras(tmp_path):
    script = (
        "import json, sys\n"
        "import keras_sequencer as ks\n"
        "assert ks.__version__ and 'create_model' in dir(ks) and 'create_model' in ks.__all__\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    assert json.loads(_python(script, tmp_path)) == []


def test_public_names_resolve():
    for name in ks.__all__:
        assert getattr(ks, name) is not None
    assert ks.models.MODEL_CONFIGS is ks.MODEL_CONFIGS  # submodules, as the eager __init__ had
    with pytest.raises(AttributeError):
        ks.no_such_name


def _tiny_model():
    return ks.Sequencer2D(layers=[1], patch_sizes=[2], embed_dims=[8], hidden_sizes=[4], mlp_ratios=[2.0],
                          input_shape=(4, 4, 3), classes=3, weights=None)


def _save_tiny_model(folder):
    """tiny.keras, an input x.npy and its outputs y.npy, for a fresh process to load and check."""
    model = _tiny_model()
    model.save(folder / "tiny.keras")
    x = np.random.default_rng(0).uniform(0, 255, (1, 4, 4, 3)).astype("float32")
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", run_model(model, x))


@run_once
@pytest.mark.parametrize("keras_first", [False, True], ids=["package_first", "keras_first"])
def test_saved_model_loads_after_plain_import(keras_first, tmp_path):
    """`import keras_sequencer` alone (no ks. attribute touched) registers the
    layers for keras.models.load_model, whichever of the two is imported first."""
    _save_tiny_model(tmp_path)
    imports = "import keras\nimport keras_sequencer\n" if keras_first else "import keras_sequencer\nimport keras\n"
    script = imports + (
        "import sys\n"
        "import numpy as np\n"
        "assert not any(type(f).__name__ == '_AfterKerasImport' for f in sys.meta_path), 'hook left behind'\n"
        "m = keras.models.load_model('tiny.keras')\n"
        "y = keras.ops.convert_to_numpy(m(np.load('x.npy'), training=False))\n"
        "np.testing.assert_allclose(y, np.load('y.npy'), rtol=1e-5, atol=1e-6)\n"
        "print(type(m).__name__, type(m.layers[3]).__name__)\n"
    )
    assert _python(script, tmp_path, backend="tensorflow").split() == ["FreeingFunctional", "Sequencer2DBlock"]


@run_once
@pytest.mark.parametrize("first", [
    "import keras_sequencer as ks\nks.BiLSTM2D\n",
    "from keras_sequencer import layers\n",
    "import keras_sequencer.layers\n",
], ids=["attribute", "from_import", "dotted_import"])
def test_layers_module_first_imports_and_registers(first, tmp_path):
    """The layers module as the first thing touched imports keras itself while
    half-built; registration waits until it is done (it once failed with a
    circular import), and a saved model still loads."""
    _save_tiny_model(tmp_path)
    script = first + (
        "import keras\n"
        "import numpy as np\n"
        "m = keras.models.load_model('tiny.keras')\n"
        "y = keras.ops.convert_to_numpy(m(np.load('x.npy'), training=False))\n"
        "np.testing.assert_allclose(y, np.load('y.npy'), rtol=1e-5, atol=1e-6)\n"
        "print(type(m).__name__, type(m.layers[3]).__name__)\n"
    )
    assert _python(script, tmp_path, backend="torch").split() == ["FreeingFunctional", "Sequencer2DBlock"]


@pytest.mark.skipif(keras.backend.backend() == "tensorflow", reason="TensorFlow is the backend here")
def test_registration_hook_and_weights_file_leave_tensorflow_unimported(tmp_path):
    # tests/test_layers.py checks a model built from scratch; this one goes through
    # the import hook (keras imported after the package), a weights file (the
    # skipped initializers) and a prediction.
    from safetensors.numpy import save_file

    from reference import Sequencer2d

    reference = Sequencer2d(layers=[1], patch_sizes=[2], embed_dims=[8], hidden_sizes=[4],
                            mlp_ratios=[2.0], num_classes=3)
    save_file({k: v.detach().numpy().copy() for k, v in reference.state_dict().items()},
              str(tmp_path / "tiny.safetensors"))
    script = (
        "import sys\n"
        "import keras_sequencer as ks\n"
        "import keras\n"
        "from keras.saving import get_registered_object\n"
        "assert get_registered_object('keras_sequencer>BiLSTM2D') is not None\n"
        "import numpy as np\n"
        "m = ks.Sequencer2D(layers=[1], patch_sizes=[2], embed_dims=[8], hidden_sizes=[4],\n"
        "                   mlp_ratios=[2.0], input_shape=(4, 4, 3), classes=3, weights='tiny.safetensors')\n"
        "m.predict(np.zeros((1, 4, 4, 3), 'float32'), verbose=0)\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    _python(script, tmp_path, backend=keras.backend.backend())


def test_weights_file_build_equals_random_build_then_load(tmp_path):
    """A model built with weights=file skips its initializers; its weights,
    variable paths and config equal those of a random build loaded afterwards."""
    from safetensors.numpy import save_file

    from keras_sequencer.weights import weights_loader
    from reference import Sequencer2d

    arch = dict(layers=[1, 1], patch_sizes=[2, 1], embed_dims=[8, 8], hidden_sizes=[4, 4], mlp_ratios=[2.0, 2.0])
    reference = Sequencer2d(**arch, num_classes=3)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.detach().numpy().copy() for k, v in reference.state_dict().items()}, str(path))
    for kwargs in (dict(classes=3), dict(include_top=False, pooling="avg"), dict(classes=3, drop_rate=0.1)):
        direct = ks.Sequencer2D(**arch, input_shape=(4, 4, 3), weights=str(path), **kwargs)
        loaded = ks.Sequencer2D(**arch, input_shape=(4, 4, 3), weights=None, **kwargs)
        weights_loader(str(path))(loaded)
        assert [v.path for v in direct.weights] == [v.path for v in loaded.weights]
        for a, b in zip(direct.get_weights(), loaded.get_weights()):
            np.testing.assert_array_equal(a, b)
        assert direct.get_config() == loaded.get_config()
    # The initializers still draw random values for a model built without weights.
    fresh = ks.Sequencer2D(**arch, input_shape=(4, 4, 3), classes=3, weights=None)
    assert np.abs(keras.ops.convert_to_numpy(fresh.get_layer("stem").kernel)).max() > 0
