"""Sequencer2D (Tatsunami & Taki, NeurIPS 2022) for Keras 3: TensorFlow, JAX and torch."""

import importlib

__version__ = "0.1.0"

# Public names, imported on first use: `keras-sequencer export` must choose the
# Keras backend before anything imports keras.
_EXPORTS = {
    "CheckpointMismatchError": "convert",
    "load_torch_state_dict": "convert",
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
    "export": "exporters",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'keras_sequencer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"keras_sequencer.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
