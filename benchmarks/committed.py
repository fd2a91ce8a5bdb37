"""A commit's keras_sequencer modules beside the working tree's, for the A/B
scripts (ab_tensorflow.py, ab_torch.py): functions are swapped by name.
Import it after KERAS_BACKEND is set."""

import linecache
import subprocess
import types

from keras_sequencer import layers, training

# The modules --swap names reach: "NAME" is layers.NAME, "training.NAME" training's.
MODULES = {"layers": layers, "training": training}


def committed_module(base, name):
    module = types.ModuleType(f"committed_{name}")
    filename = f"{base}:keras_sequencer/{name}.py"
    source = subprocess.check_output(["git", "show", filename], text=True)
    # Autograph and tracebacks read a function's source through linecache.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


def lookup(module, name):
    value = module
    for part in name.split("."):
        value = getattr(value, part)
    return value


def replace(module, name, value):
    *owner, attribute = name.split(".")
    setattr(lookup(module, ".".join(owner)) if owner else module, attribute, value)


def module_of(name):
    """("layers" or "training", the name within that module)."""
    first, _, rest = name.partition(".")
    return (first, rest) if first in MODULES and rest else ("layers", name)
