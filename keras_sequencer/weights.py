"""Where model weights come from: Keras weight files (more sources to come)."""

import os


def load_weights(model, weights, variant=None):
    """Loads `weights` (a path to a Keras `.weights.h5` file) into `model`."""
    if weights == "imagenet":
        raise NotImplementedError(
            "ImageNet weights are not available yet; pass weights=None or a path."
        )
    path = os.fspath(weights)
    if not path.endswith(".weights.h5"):
        raise ValueError(
            f"Unsupported weights file {path!r}: expected a Keras `.weights.h5` file."
        )
    try:
        model.load_weights(path)
    except Exception as error:  # h5py/Keras errors are not user-facing messages
        raise ValueError(
            f"Could not load weights from {path!r} into {model.name!r}: "
            f"the file is corrupt or belongs to another model ({type(error).__name__}: {error})"
        ) from error
    return model
