"""Sequencer2D (Tatsunami & Taki, NeurIPS 2022) for Keras 3: TensorFlow, JAX and torch."""

import importlib
import importlib.util
import sys

__version__ = "0.2.0"

# Public names, imported on first use (PEP 562): `import keras_sequencer` costs
# nothing, so `keras-sequencer --help` answers without importing keras (and
# TensorFlow), and `export` can still choose the backend.
_EXPORTS = {
    "CheckpointMismatchError": "weights.convert",
    "load_torch_state_dict": "weights.convert",
    "export": "tasks.export",
    "decode_predictions": "imagenet",
    "imagenet_class_names": "imagenet",
    "imagenet_synsets": "imagenet",
    "load_image": "imagenet",
    "preprocess_input": "imagenet",
    "BiLSTM2D": "layers",
    "DropPath": "layers",
    "Sequencer2DBlock": "layers",
    "MODEL_CONFIGS": "models",
    "Sequencer2D": "models",
    "Sequencer2DL": "models",
    "Sequencer2DM": "models",
    "Sequencer2DS": "models",
    "create_model": "models",
    "list_models": "models",
    "model_metadata": "models",
    "create_optimizer": "training",
    "finetune": "tasks.finetune",
    "VanillaSequencer": "models.vanilla",
    "VSequencerS": "models.vanilla",
    "VSequencerSH": "models.vanilla",
    "VSequencerSPE": "models.vanilla",
    "SequencerSegmenter": "models.segmentation",
    "digit_scenes": "models.segmentation",
    "load_segmentation_folder": "models.segmentation",
    "segmentation_loss": "models.segmentation",
    "segmentation_metrics": "models.segmentation",
    "effective_receptive_field": "tasks.erf",
    "evaluate": "tasks.evaluate",
    "resolution_sweep": "tasks.evaluate",
}
# Submodules the eager __init__ imported, so `ks.models.X` keeps working.
_SUBMODULES = ("imagenet", "layers", "models", "registry", "tasks", "training", "weights")

__all__ = [
    "BiLSTM2D",
    "CheckpointMismatchError",
    "DropPath",
    "MODEL_CONFIGS",
    "Sequencer2D",
    "Sequencer2DBlock",
    "Sequencer2DL",
    "Sequencer2DM",
    "Sequencer2DS",
    "SequencerSegmenter",
    "VSequencerS",
    "VSequencerSH",
    "VSequencerSPE",
    "VanillaSequencer",
    "create_model",
    "create_optimizer",
    "decode_predictions",
    "digit_scenes",
    "export",
    "imagenet_class_names",
    "imagenet_synsets",
    "load_image",
    "preprocess_input",
    "list_models",
    "load_segmentation_folder",
    "load_torch_state_dict",
    "model_metadata",
    "effective_receptive_field",
    "evaluate",
    "finetune",
    "resolution_sweep",
    "segmentation_loss",
    "segmentation_metrics",
]


def __getattr__(name):
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        _finish_deferred_registration()
        return module
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    _finish_deferred_registration()
    globals()[name] = value
    return value


def _finish_deferred_registration():
    waiting = [f for f in sys.meta_path if _is_hook(f) and f.keras_imported]
    if waiting and not any(_initializing(f"{__name__}.{name}") for name in _REGISTERING):
        _remove_hook()
        _register_serializables()


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))


# Serializable classes. `import keras_sequencer; keras.models.load_model("m.keras")`
# must find BiLSTM2D & co. in Keras' registry, which only importing their modules
# fills (an earlier lazy __init__ broke this and was reverted). Those modules
# import keras, so they are imported as soon as keras is: at once if it already
# is, else right after `import keras` finishes, by a one-shot import hook. The
# hook adds no import of its own: on JAX or torch nothing pulls in TensorFlow,
# and a process that never imports keras (`--help`) never pays for it.
_REGISTERING = ("layers", "models")


def _register_serializables():
    """Imports the registering modules, unless one of them is half-built: it
    imported keras first (`ks.BiLSTM2D` before anything else), and importing
    the others now would fail on its names. Then the hook waits for the next
    import (or attribute of this package) after that module is done."""
    if any(_initializing(f"{__name__}.{name}") for name in _REGISTERING):
        if not any(_is_hook(f) for f in sys.meta_path):
            sys.meta_path.insert(0, _AfterKerasImport(keras_imported=True))
        return
    for name in _REGISTERING:
        importlib.import_module(f"{__name__}.{name}")


def _initializing(name):
    # What Python itself checks to call a module "partially initialized".
    module = sys.modules.get(name)
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


class _AfterKerasImport:
    """A sys.meta_path finder that only watches for the top-level `keras`: it finds
    keras' real spec with the other finders, and wraps that loader's exec_module
    so that, once keras' own code has run, our registering modules are imported.
    It removes itself on first use (and the wrapper on firing), so it costs
    nothing afterwards and never runs twice."""

    def __init__(self, keras_imported=False):
        self.keras_imported = keras_imported

    def find_spec(self, fullname, path=None, target=None):
        if self.keras_imported:  # registration deferred: see _register_serializables
            if not any(_initializing(f"{__name__}.{name}") for name in _REGISTERING):
                _remove_hook()
                _register_serializables()
            return None
        if fullname != "keras":
            return None
        _remove_hook()
        spec = importlib.util.find_spec("keras")  # the other finders; we are gone
        loader = getattr(spec, "loader", None)
        original = getattr(loader, "exec_module", None)
        if original is None:
            return spec  # an unusual loader: import it untouched (no registration)

        def exec_module(module):
            try:
                original(module)
            finally:
                vars(loader).pop("exec_module", None)  # back to the class' method
            _register_serializables()

        try:
            loader.exec_module = exec_module  # this spec's loader instance only
        except AttributeError:
            pass
        return spec


def _is_hook(finder):  # by name: a reloaded package has a new class
    return type(finder).__name__ == "_AfterKerasImport"


def _remove_hook():
    sys.meta_path[:] = [f for f in sys.meta_path if not _is_hook(f)]


if "keras" in sys.modules:
    _register_serializables()
elif not any(_is_hook(f) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterKerasImport())
