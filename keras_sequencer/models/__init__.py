"""The model builders: Sequencer2D (the paper's family), the vanilla Sequencer,
and what they share. `create_model` builds any registered variant by name."""

import importlib

from keras_sequencer import registry
from keras_sequencer.models.base import (
    FreeingFunctional,
    fast_predict,
    functional_model,
    minimum_input_size,
    minimum_model_input_size,
    model_metadata,
)
from keras_sequencer.models.sequencer2d import Sequencer2D, Sequencer2DL, Sequencer2DM, Sequencer2DS

MODEL_CONFIGS = registry.MODEL_CONFIGS
list_models = registry.list_models

# family -> (module, builder) that makes it
_FAMILIES = {
    "sequencer2d": ("keras_sequencer.models.sequencer2d", "Sequencer2D"),
    "vanilla": ("keras_sequencer.models.vanilla", "VanillaSequencer"),
}


def create_model(name, **kwargs):
    """Builds a registered variant by name (see `list_models()`).

    kwargs pass to the family's builder (`Sequencer2D` or `VanillaSequencer`).
    `weights` defaults to None here, as timm's `create_model` defaults to
    `pretrained=False`.
    """
    config = registry.model_config(name)
    module, builder = _FAMILIES[config["family"]]
    arguments = dict(config["arch"])
    arguments.update(
        default_size=config["default_size"],
        weights_variant=config["weights_variant"],
        name=name,
        weights=None,
    )
    arguments.update(kwargs)
    return getattr(importlib.import_module(module), builder)(**arguments)


__all__ = [
    "FreeingFunctional",
    "MODEL_CONFIGS",
    "Sequencer2D",
    "Sequencer2DL",
    "Sequencer2DM",
    "Sequencer2DS",
    "create_model",
    "fast_predict",
    "functional_model",
    "list_models",
    "minimum_input_size",
    "minimum_model_input_size",
    "model_metadata",
]
