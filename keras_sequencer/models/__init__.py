"""The model builders: Sequencer2D (the paper's family), the vanilla Sequencer,
and what they share. `create_model` builds any registered variant by name."""

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
from keras_sequencer.models.vanilla import VanillaSequencer, VSequencerS, VSequencerSH, VSequencerSPE

MODEL_CONFIGS = registry.MODEL_CONFIGS
list_models = registry.list_models

# family -> the builder that makes it
_FAMILIES = {"sequencer2d": Sequencer2D, "vanilla": VanillaSequencer}


def create_model(name, **kwargs):
    """Builds a registered variant by name (see `list_models()`).

    kwargs pass to the family's builder (`Sequencer2D` or `VanillaSequencer`).
    `weights` defaults to None here, as timm's `create_model` defaults to
    `pretrained=False`.
    """
    config = registry.model_config(name)
    arguments = dict(config["arch"])
    arguments.update(
        default_size=config["default_size"],
        weights_variant=config["weights_variant"],
        name=name,
        weights=None,
    )
    arguments.update(kwargs)
    return _FAMILIES[config["family"]](**arguments)


# Segmentation builds on create_model; imported last so that its Keras classes
# are registered whenever the models are.
from keras_sequencer.models import segmentation  # noqa: E402
from keras_sequencer.models.segmentation import SequencerSegmenter  # noqa: E402


__all__ = [
    "FreeingFunctional",
    "MODEL_CONFIGS",
    "Sequencer2D",
    "Sequencer2DL",
    "Sequencer2DM",
    "Sequencer2DS",
    "SequencerSegmenter",
    "VSequencerS",
    "VSequencerSH",
    "VSequencerSPE",
    "VanillaSequencer",
    "create_model",
    "fast_predict",
    "functional_model",
    "list_models",
    "minimum_input_size",
    "minimum_model_input_size",
    "model_metadata",
]
