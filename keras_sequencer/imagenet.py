"""ImageNet helpers that work offline: timm's eval transform, normalisation, class names."""

import functools
import math
import os

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875
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


def load_image(path_or_image, image_size=224, crop_pct=DEFAULT_CROP_PCT):
    """timm's eval transform up to normalisation: PIL bicubic resize of the short
    side to floor(image_size / crop_pct), then a centre crop. Returns float32
    RGB values in [0, 255], shape (image_size, image_size, 3)."""
    from PIL import Image

    if isinstance(path_or_image, Image.Image):
        image = path_or_image
    else:
        try:
            image = Image.open(path_or_image)
            image.load()
        except (OSError, ValueError) as error:
            raise ValueError(f"Cannot read image {path_or_image!r}: {error}") from error
    image = image.convert("RGB")
    scale = math.floor(image_size / crop_pct)
    width, height = image.size
    # torchvision's Resize(int): short side -> scale, long side truncated.
    if width <= height:
        new_w, new_h = scale, int(scale * height / width)
    else:
        new_w, new_h = int(scale * width / height), scale
    image = image.resize((new_w, new_h), Image.BICUBIC)
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, dtype="float32")


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
