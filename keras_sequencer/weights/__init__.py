"""Where weights come from and how they reach a model: one path for every source.

The builder calls `weights_loader(weights, variant)` before it builds (so a
network error or a bad file is reported at once) and the returned `fill(model)`
after. Every source meets the same head rule (a model without a top takes a
file with one; with a top, the classes must match):

- "imagenet": `hub.imagenet_checkpoint` (the Hugging Face cache) -> the checkpoint path;
- a .safetensors/.pth/.pt/.bin checkpoint: `checkpoint.read_checkpoint` ->
  `convert.load_torch_state_dict` (the table "Keras variable <- checkpoint key");
- a Keras .weights.h5: `checkpoint.load_keras_weights` (Keras' own layout).

No second model is built, and a fill either assigns every weight or raises,
leaving the model as it was.
"""

import os

from keras_sequencer.weights.checkpoint import (
    WeightsError,
    is_keras_weights_file,
    load_keras_weights,
    read_checkpoint,
)
from keras_sequencer.weights.convert import CheckpointMismatchError, load_torch_state_dict
from keras_sequencer.weights.hub import imagenet_checkpoint


def weights_loader(weights, variant=None):
    """Fetches or reads `weights` now (None, "imagenet", a .weights.h5,
    .safetensors or PyTorch file) and returns None or a function that fills a
    model with them."""
    if weights is None:
        return None
    if weights == "imagenet":
        path = imagenet_checkpoint(variant)
        source = f"the {variant} ImageNet checkpoint {path!r}"
    else:
        path = os.fspath(weights)
        source = f"checkpoint {path!r}"
        if is_keras_weights_file(path):
            if not os.path.isfile(path):
                raise WeightsError(f"No such weights file: {path!r}")
            return lambda model: load_keras_weights(model, path)
    state_dict = read_checkpoint(path)
    return lambda model: load_torch_state_dict(model, state_dict, source=source)


__all__ = [
    "CheckpointMismatchError",
    "WeightsError",
    "imagenet_checkpoint",
    "load_keras_weights",
    "read_checkpoint",
    "weights_loader",
]
