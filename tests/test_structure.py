"""The house rules (../shared/LAYOUT.md): imports point down, no import cycle,
and every Keras internal the package leans on still exists in this Keras."""

import ast
import os

import pytest

import keras_sequencer
from keras_sequencer import keras_compat

PACKAGE = os.path.dirname(keras_sequencer.__file__)

# Floors, from the ground up. A module may import its own floor or lower ones.
FLOORS = {
    "registry": 0, "keras_compat": 0, "files": 0, "imagenet": 0, "data": 0, "plots": 0,
    "layers": 0, "training": 0,
    "weights": 1,
    "models": 2,
    "tasks": 3,
    "cli": 4,
}


def _modules():
    """{dotted name relative to the package: path}; a package is its __init__."""
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            parts = os.path.relpath(path, PACKAGE)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts:  # the top __init__ only re-exports lazily
                found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(path):
    """The package modules `path` imports, anywhere in the file (functions too:
    an import hidden in a function still closes a circle)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith("keras_sequencer."):
                relative = name[len("keras_sequencer."):]
                if relative in MODULES:
                    targets.add(relative)
    return targets


GRAPH = {module: _imports(path) - {module} for module, path in MODULES.items()}


def _floor(module):
    return FLOORS[module.split(".")[0]]


def test_every_module_has_a_floor():
    assert {m.split(".")[0] for m in MODULES} <= set(FLOORS)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    upward = sorted(t for t in GRAPH[module] if _floor(t) > _floor(module))
    assert not upward, f"{module} (floor {_floor(module)}) imports {upward} from above"


def test_no_import_cycle():
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(GRAPH[module]):
            if target == module.rsplit(".", 1)[0]:
                continue  # a submodule importing its package's __init__ siblings is fine
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_registry_imports_nothing_of_the_package():
    assert GRAPH["registry"] == set()


@pytest.mark.parametrize("internal", sorted(keras_compat.INTERNALS))
def test_keras_internals_still_exist(internal):
    """Fails loudly when a Keras upgrade moves an internal that keras_compat
    relies on: the workaround would otherwise switch itself off in silence."""
    assert internal not in keras_compat.missing_internals(), (
        f"Keras {__import__('keras').__version__} no longer has {keras_compat.INTERNALS[internal][1:]}: "
        f"keras_compat's workaround for {keras_compat.INTERNALS[internal][0]} is off"
    )


def test_no_keras_internal_outside_keras_compat():
    offenders = []
    for module, path in MODULES.items():
        if module == "keras_compat":
            continue
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("keras.src"):
                offenders.append(f"{module}: from {node.module}")
            elif isinstance(node, ast.Import) and any(a.name.startswith("keras.src") for a in node.names):
                offenders.append(f"{module}: import keras.src")
            elif isinstance(node, ast.Attribute) and node.attr in ("_flatten_layers", "_get_ops_details", "_nodes_by_depth", "_called"):
                offenders.append(f"{module}: .{node.attr}")
    assert not offenders, offenders


def test_the_freeing_model_walks_the_graph_itself():
    """The memory workaround is on: FreeingFunctional runs its own graph walk."""
    import keras
    import numpy as np

    from keras_sequencer.models import functional_model

    inputs = keras.Input((4,))
    model = functional_model(inputs, keras.layers.Dense(2)(keras.layers.Dense(3)(inputs)), "m")
    x = np.ones((1, 4), "float32")
    freed = keras_compat.run_graph_freeing(model, x, lambda op: op, None)
    assert freed is not None
    np.testing.assert_allclose(keras.ops.convert_to_numpy(freed), keras.ops.convert_to_numpy(model(x)), atol=1e-6)


def test_saved_models_load_when_the_internals_are_gone(tmp_path, monkeypatch):
    """If Keras moved the graph internals, models still build, run, save and load
    through the public API (the workaround steps aside; the test above fails)."""
    import keras
    import numpy as np

    from keras_sequencer.models import Sequencer2D

    tiny = dict(layers=(1, 1), patch_sizes=(4, 2), embed_dims=(8, 16), hidden_sizes=(4, 8), mlp_ratios=(2.0, 2.0))
    model = Sequencer2D(**tiny, input_shape=(16, 16, 3), classes=3)
    x = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x))
    path = str(tmp_path / "m.keras")
    model.save(path)
    monkeypatch.setattr(keras_compat, "_FUNCTIONAL_ATTRIBUTES", ("_an_internal_keras_removed",))
    loaded = keras.models.load_model(path)
    assert keras_compat.run_graph_freeing(loaded, x, lambda op: op, None) is None
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)), expected, atol=1e-5)
