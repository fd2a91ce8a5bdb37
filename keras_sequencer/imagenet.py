"""ImageNet helpers that work offline: timm's eval transform, normalisation, class names."""

import functools
import os

import numpy as np

# Re-exported: the eval transform lives with the image reader.
from keras_sequencer.data import DEFAULT_CROP_PCT, load_image  # noqa: F401

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CLASSES_FILE = os.path.join(os.path.dirname(__file__), "data", "imagenet_classes.tsv")


def preprocess_input(x, data_format=None, normalize=False):
    """Prepares RGB [0, 255] images for a Sequencer model.

    Models built with `include_preprocessing=True` (the default) normalise
    inside, so this is the identity, as for keras.applications' ConvNeXt. For
    models built with `include_preprocessing=False`, pass `normalize=True` to
    apply timm's ImageNet normalisation ((x / 255 - mean) / std).
    """
    del data_format  # channels-last only; kept for keras.applications' signature
    if not normalize:
        return x
    x = np.asarray(x, dtype="float32")
    return ((x / 255.0 - np.array(IMAGENET_MEAN, "float32")) / np.array(IMAGENET_STD, "float32")).astype(
        "float32"
    )


def normalization_layer(name="preprocessing"):
    """timm's ImageNet normalisation of RGB [0, 255] inputs as a Keras layer.

    Rescaling keeps the constants in the graph (Normalization's captured
    tensors become extra inputs in tf2onnx's ONNX files)."""
    import keras

    return keras.layers.Rescaling(
        scale=[1.0 / (255.0 * s) for s in IMAGENET_STD],
        offset=[-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)],
        name=name,
    )


@functools.lru_cache(maxsize=1)
def _classes():
    synsets, names = [], []
    with open(_CLASSES_FILE, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            synset, name = line.rstrip("\n").split("\t", 1)
            synsets.append(synset)
            names.append(name)
    return tuple(synsets), tuple(names)


def imagenet_synsets():
    """The 1000 ImageNet-1k synset ids in class-index order."""
    return list(_classes()[0])


def imagenet_class_names():
    """Readable names of the 1000 classes, in class-index order."""
    return list(_classes()[1])


def decode_predictions(preds, top=5):
    """[(synset, name, score), ...] per sample, best first (keras.applications' format),
    from the class list shipped with the package: no download."""
    preds = np.asarray(preds)
    if preds.ndim != 2 or preds.shape[1] != 1000:
        raise ValueError(
            "`decode_predictions` expects a batch of predictions (i.e. a 2D array of "
            f"shape (samples, 1000)). Received array with shape: {preds.shape}"
        )
    synsets, names = _classes()
    results = []
    for row in preds:
        best = np.argsort(row)[::-1][:top]
        results.append([(synsets[i], names[i].split(",")[0], float(row[i])) for i in best])
    return results
