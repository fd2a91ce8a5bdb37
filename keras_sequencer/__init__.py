"""Sequencer2D (Tatsunami & Taki, NeurIPS 2022) for Keras 3: TensorFlow, JAX and torch."""

from keras_sequencer.convert import CheckpointMismatchError, load_torch_state_dict
from keras_sequencer.exporters import export
from keras_sequencer.imagenet import (
    decode_predictions,
    imagenet_class_names,
    imagenet_synsets,
    load_image,
    preprocess_input,
)
from keras_sequencer.layers import BiLSTM2D, DropPath, Sequencer2DBlock
from keras_sequencer.models import (
    MODEL_CONFIGS,
    Sequencer2D,
    Sequencer2DL,
    Sequencer2DM,
    Sequencer2DS,
    create_model,
    list_models,
)

__version__ = "0.1.0"

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
    "create_model",
    "decode_predictions",
    "export",
    "imagenet_class_names",
    "imagenet_synsets",
    "load_image",
    "preprocess_input",
    "list_models",
    "load_torch_state_dict",
]
