"""Semantic segmentation: a Sequencer backbone with a Semantic FPN decoder.

The decoder follows the protocol PoolFormer used on ADE20K and the Sequencer
authors compared against: mmsegmentation's FPN neck (lateral 1x1 convs, a
top-down pathway, 3x3 output convs) and FPNHead (Kirillov et al.'s panoptic
FPN semantic head: per level, conv3x3 + norm + ReLU steps with 2x bilinear
upsampling until the finest level, summed, channel dropout, 1x1 classifier),
then bilinear upsampling of the logits to the input size.

Sequencer2D's stages have reductions 7, 14, 14, 14, not the 4, 8, 16, 32 the
protocol was written for. The decoder therefore reads each map's reduction
from the backbone's `feature_info`: levels of equal reduction are added
without resizing, a coarser level takes round(log2(ratio)) conv-and-upsample
steps (at least one conv), and every step that changes the size ends with a
resize to the exact size of the target level (64 px input: stage maps of 9
and 4 px, and 2 x 4 != 9).

Also here: the metrics (mean IoU, pixel accuracy) and loss with an ignore
index, a loader for `root/images` + `root/annotations` folders (ADE20K's
layout), and the digit scenes the example trains on.
"""

import math
import numbers
import os

import keras
import numpy as np
from PIL import Image

from keras_sequencer import registry
from keras_sequencer.data import IMAGE_SUFFIXES, DataError, read_image
from keras_sequencer.models import create_model
from keras_sequencer.models.base import functional_model, minimum_model_input_size, validate_weights_argument

IGNORE_INDEX = 255  # ADE20K's (and mmsegmentation's) "no label"
BACKBONE = "backbone"
CLASSIFIER = "classifier"
LOGITS = "logits"
# Mask modes whose pixels are class indices as stored ("P": palette indices).
_MASK_MODES = ("L", "P", "I", "I;16", "1")


@keras.saving.register_keras_serializable(package="keras_sequencer")
class ResizeLike(keras.layers.Layer):
    """Resizes `x` to the height and width of `reference`. The target size is
    read when the layer runs, so models with input_shape (None, None, 3) work."""

    def __init__(self, interpolation="bilinear", **kwargs):
        super().__init__(**kwargs)
        self.interpolation = interpolation

    def call(self, x, reference):
        size = keras.ops.shape(reference)[1:3]
        return keras.ops.image.resize(x, size, interpolation=self.interpolation)

    def compute_output_shape(self, x_shape, reference_shape):
        return (x_shape[0], reference_shape[1], reference_shape[2], x_shape[-1])

    def get_config(self):
        return dict(super().get_config(), interpolation=self.interpolation)


@keras.saving.register_keras_serializable(package="keras_sequencer")
class PixelAccuracy(keras.metrics.Metric):
    """Fraction of labelled pixels whose argmax over the logits is the label;
    pixels labelled `ignore_index` are left out (mmsegmentation's aAcc)."""

    def __init__(self, ignore_index=IGNORE_INDEX, name="pixel_accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.ignore_index = ignore_index
        self.correct = self.add_variable(shape=(), initializer="zeros", name="correct")
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = keras.ops.cast(y_true, "int32")
        if len(y_true.shape) == len(y_pred.shape):  # (B, H, W, 1) labels
            y_true = keras.ops.squeeze(y_true, axis=-1)
        predicted = keras.ops.cast(keras.ops.argmax(y_pred, axis=-1), "int32")
        valid = keras.ops.ones_like(y_true, dtype=self.dtype)
        if self.ignore_index is not None:
            valid = keras.ops.cast(keras.ops.not_equal(y_true, self.ignore_index), self.dtype)
        if sample_weight is not None:
            valid = valid * keras.ops.broadcast_to(keras.ops.cast(sample_weight, self.dtype), keras.ops.shape(valid))
        hits = keras.ops.cast(keras.ops.equal(predicted, y_true), self.dtype) * valid
        self.correct.assign_add(keras.ops.sum(hits))
        self.total.assign_add(keras.ops.sum(valid))

    def result(self):
        return keras.ops.divide_no_nan(self.correct, self.total)

    def reset_state(self):
        self.correct.assign(0.0)
        self.total.assign(0.0)

    def get_config(self):
        return dict(super().get_config(), ignore_index=self.ignore_index)


def segmentation_metrics(num_classes, ignore_index=IGNORE_INDEX):
    """[mean IoU, pixel accuracy], both from logits, both skipping pixels
    labelled `ignore_index`. Mean IoU is over the classes present in the labels
    or the predictions (a class absent from both is left out, as in
    mmsegmentation's nanmean), accumulated over all batches seen."""
    return [
        keras.metrics.MeanIoU(num_classes, name="mean_iou", ignore_class=ignore_index, sparse_y_pred=False),
        PixelAccuracy(ignore_index),
    ]


def segmentation_loss(ignore_index=IGNORE_INDEX):
    """Per-pixel cross-entropy from logits, averaged over the labelled pixels."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=ignore_index)


def SequencerSegmenter(
    backbone="sequencer2d_s",
    num_classes=150,
    input_shape=None,
    backbone_weights=None,
    fpn_channels=256,
    head_channels=128,
    dropout=0.1,
    include_preprocessing=None,
    class_names=None,
    ignore_index=IGNORE_INDEX,
    name=None,
):
    """A Sequencer backbone with a Semantic FPN decoder; outputs per-pixel
    logits (B, H, W, num_classes) at the input resolution.

    Args:
        backbone: a registered variant name (see `list_models()`), or a
            `features_only=True` Keras model (e.g. a small custom
            `Sequencer2D(..., features_only=True)`) whose
            `metadata["feature_info"]` gives each map's reduction.
        num_classes: number of classes (ADE20K: 150).
        input_shape: (height, width, 3); default (None, None, 3) for a named
            backbone, the backbone's own input shape for a model.
        backbone_weights: None, "imagenet" or a weights file; named backbones only.
        fpn_channels: width of the FPN neck (the protocol's 256).
        head_channels: width of the per-level scale heads (the protocol's 128).
        dropout: channel dropout before the classifier (the protocol's 0.1).
        include_preprocessing: named backbones only: the model takes RGB in
            [0, 255] and normalises inside (default True). A backbone model keeps its own.
        class_names: optional names, one per class, kept in `model.metadata`.
        ignore_index: the label of unlabelled pixels, kept in `model.metadata`
            for the loss and metrics (None: every pixel is labelled).
        name: the model name (default "<backbone>_fpn").

    Returns:
        A functional `keras.Model`; compile it with `segmentation_loss()` and
        `segmentation_metrics()`.
    """
    named = isinstance(backbone, str)
    _validate(backbone, named, num_classes, input_shape, backbone_weights, fpn_channels, head_channels,
              dropout, include_preprocessing, class_names, ignore_index)
    if named:
        input_shape = tuple(input_shape) if input_shape is not None else (None, None, 3)
        backbone = create_model(
            backbone,
            features_only=True,
            out_indices=(0, 1, 2, 3),
            input_shape=input_shape,
            include_preprocessing=True if include_preprocessing is None else include_preprocessing,
            weights=backbone_weights,
        )
    else:
        input_shape = _model_input_shape(backbone, input_shape)
    feature_info = backbone.metadata["feature_info"]
    reductions = [int(info["reduction"]) for info in feature_info]

    image = keras.Input(shape=input_shape, name=registry.INPUT)
    features = backbone(image)
    features = list(features) if isinstance(features, (list, tuple)) else [features]
    logits = semantic_fpn(features, reductions, num_classes, fpn_channels, head_channels, dropout)
    logits = ResizeLike("bilinear", dtype="float32", name=LOGITS)(logits, image)
    metadata = {
        "task": "semantic_segmentation",
        "num_classes": int(num_classes),
        "ignore_index": ignore_index,
        "feature_info": [dict(info) for info in feature_info],
    }
    if class_names is not None:
        metadata["class_names"] = [str(c) for c in class_names]
    return functional_model(image, logits, name or f"{backbone.name}_fpn", metadata=metadata)


def semantic_fpn(features, reductions, num_classes, fpn_channels=256, head_channels=128, dropout=0.1):
    """mmsegmentation's FPN neck + FPNHead on `features` (finest first, with
    their `reductions`); returns logits at the finest level's size."""
    order = np.argsort(reductions, kind="stable")
    if list(order) != list(range(len(features))):
        raise ValueError(f"feature maps must come finest first; their reductions are {reductions}")
    # Neck: laterals, then top-down (nearest, as mmsegmentation), then 3x3 convs.
    laterals = [
        keras.layers.Conv2D(fpn_channels, 1, name=f"fpn_lateral_{i}")(f) for i, f in enumerate(features)
    ]
    for i in range(len(laterals) - 1, 0, -1):
        upper = laterals[i]
        if reductions[i] != reductions[i - 1]:
            upper = ResizeLike("nearest", name=f"fpn_topdown_resize_{i}")(upper, laterals[i - 1])
        laterals[i - 1] = keras.layers.Add(name=f"fpn_topdown_{i}")([laterals[i - 1], upper])
    outs = [
        keras.layers.Conv2D(fpn_channels, 3, padding="same", name=f"fpn_output_{i}")(x)
        for i, x in enumerate(laterals)
    ]
    # Head: per level, conv-norm-ReLU steps, each followed by a 2x upsample
    # while coarser than the finest level; then exact resizing to it.
    finest = outs[0]
    summed = []
    for i, x in enumerate(outs):
        ratio = reductions[i] / reductions[0]
        steps = max(1, int(round(math.log2(ratio)))) if ratio > 1 else 1
        for k in range(steps):
            prefix = f"head_scale_{i}_{k}"
            x = keras.layers.Conv2D(head_channels, 3, padding="same", use_bias=False,
                                    kernel_initializer="he_normal", name=prefix + "_conv")(x)
            x = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name=prefix + "_norm")(x)
            x = keras.layers.ReLU(name=prefix + "_relu")(x)
            if ratio > 1:
                x = keras.layers.UpSampling2D(2, interpolation="bilinear", name=prefix + "_up")(x)
        if ratio > 1:
            x = ResizeLike("bilinear", name=f"head_scale_{i}_resize")(x, finest)
        summed.append(x)
    x = keras.layers.Add(name="head_sum")(summed) if len(summed) > 1 else summed[0]
    if dropout > 0:
        x = keras.layers.SpatialDropout2D(dropout, name="head_dropout")(x)  # torch's Dropout2d
    return keras.layers.Conv2D(
        num_classes, 1, kernel_initializer=keras.initializers.RandomNormal(stddev=0.01), name=CLASSIFIER
    )(x)


def _positive_int(value, what):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{what}` must be a positive integer. Received: {what}={value!r}")


def _validate(backbone, named, num_classes, input_shape, backbone_weights, fpn_channels, head_channels,
              dropout, include_preprocessing, class_names, ignore_index):
    if named:
        registry.model_config(backbone)  # an unknown name: one line listing the known ones
        validate_weights_argument(backbone_weights)
    elif isinstance(backbone, keras.Model):
        info = (getattr(backbone, "metadata", None) or {}).get("feature_info")
        if not info:
            raise ValueError(
                "A backbone model must be a features_only model whose metadata['feature_info'] "
                f"gives each map's reduction (e.g. Sequencer2D(..., features_only=True)). Got {backbone.name!r}"
            )
        if backbone_weights is not None or include_preprocessing is not None:
            raise ValueError(
                "`backbone_weights` and `include_preprocessing` apply to a named backbone; a backbone "
                "model keeps its own weights and preprocessing."
            )
    else:
        raise ValueError(
            "`backbone` must be a variant name (see list_models()) or a features_only Keras model. "
            f"Received: backbone={backbone!r}"
        )
    _positive_int(num_classes, "num_classes")
    if num_classes < 2:
        raise ValueError(f"`num_classes` must be at least 2 (background and one class). Received: {num_classes}")
    _positive_int(fpn_channels, "fpn_channels")
    _positive_int(head_channels, "head_channels")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ValueError(f"`dropout` must be a number in [0, 1). Received: dropout={dropout!r}")
    if input_shape is not None:
        shape = tuple(input_shape)
        if len(shape) != 3 or any(s is not None and (not isinstance(s, numbers.Integral) or s < 1) for s in shape):
            raise ValueError(
                "`input_shape` must be (height, width, channels), each a positive integer or None "
                f"for height and width. Received: input_shape={input_shape!r}"
            )
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"`class_names` has {len(class_names)} names for num_classes={num_classes}")
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral)
        or 0 <= ignore_index < num_classes
    ):
        raise ValueError(
            "`ignore_index` must be None or an integer outside the class range "
            f"0..{num_classes - 1}. Received: ignore_index={ignore_index!r}"
        )


def _model_input_shape(backbone, input_shape):
    """The segmenter's input shape for a backbone model: its own unless given;
    a given one must fit it."""
    own = tuple(backbone.input_shape[1:])
    if input_shape is None:
        return own
    input_shape = tuple(input_shape)
    fits = len(own) == 3 and all(o is None or o == s for o, s in zip(own, input_shape))
    if not fits:
        raise ValueError(f"input_shape={input_shape} does not fit the backbone's input shape {own}")
    smallest = minimum_model_input_size(backbone)
    if any(s is not None and s < smallest for s in input_shape[:2]):
        raise ValueError(f"Input size must be at least {smallest}x{smallest}. Received: input_shape={input_shape}")
    return input_shape


# --- Reading a folder of images and masks --------------------------------------------


def _size_pair(image_size):
    if image_size is None:
        return None
    pair = (image_size, image_size) if np.ndim(image_size) == 0 else tuple(image_size)
    if len(pair) != 2 or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in pair):
        raise ValueError(f"`image_size` must be None, an int or (height, width). Received: {image_size!r}")
    return tuple(int(s) for s in pair)


def read_mask(path):
    """A class-index mask as int32 (H, W), exactly as stored: no colour
    conversion (a palette image gives its indices). Masks that are not
    single-channel raise DataError."""
    try:
        with Image.open(path) as mask:
            mode = mask.mode
            if mode not in _MASK_MODES:
                raise DataError(
                    f"mask {path} is not single-channel (mode {mode}): a mask holds one class index per pixel"
                )
            return np.asarray(mask, dtype=np.int64).astype(np.int32)
    except DataError:
        raise
    except Exception as error:  # PIL's many error types: one line
        raise DataError(f"cannot read mask {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


def load_segmentation_folder(root, num_classes=None, image_size=None, ignore_index=IGNORE_INDEX,
                             reduce_zero_label=False):
    """(images, masks) from `root/images/**` and `root/annotations/**`.

    Each image (any suffix of `data.IMAGE_SUFFIXES`) has a PNG mask of the
    same relative path and stem under `annotations` (ADE20K:
    `images/training/x.jpg` -> `annotations/training/x.png`) holding one class
    index per pixel. Returns float32 RGB in [0, 255], (N, H, W, 3), and int32
    masks (N, H, W). `image_size` (int or (height, width)) resizes images
    bilinearly and masks by nearest neighbour; without it every image must have
    the same size. `reduce_zero_label` is ADE20K's convention: 0 ("other")
    becomes `ignore_index` and k becomes k - 1. With `num_classes`, an index
    >= num_classes that is not `ignore_index` is an error.
    """
    size = _size_pair(image_size)
    image_dir, mask_dir = os.path.join(root, "images"), os.path.join(root, "annotations")
    for folder in (image_dir, mask_dir):
        if not os.path.isdir(folder):
            raise DataError(f"no such directory: {folder} (expected root/images and root/annotations)")
    relative = sorted(
        os.path.relpath(os.path.join(here, f), image_dir)
        for here, dirs, files in os.walk(image_dir)
        for f in files
        if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith(".")
    )
    if not relative:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
    images, masks = [], []
    for rel in relative:
        image_path = os.path.join(image_dir, rel)
        mask_path = os.path.join(mask_dir, os.path.splitext(rel)[0] + ".png")
        if not os.path.isfile(mask_path):
            raise DataError(f"no mask for image {image_path}: expected {mask_path}")
        image, mask = read_image(image_path), read_mask(mask_path)
        if mask.shape != (image.height, image.width):
            raise DataError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image is {image.width}x{image.height}"
            )
        if reduce_zero_label:
            mask = np.where(mask == 0, ignore_index, np.where(mask == ignore_index, ignore_index, mask - 1))
        labelled = mask[mask != ignore_index] if ignore_index is not None else mask
        if labelled.size and (labelled.min() < 0 or (num_classes is not None and labelled.max() >= num_classes)):
            bad = int(labelled.min()) if labelled.min() < 0 else int(labelled.max())
            raise DataError(
                f"mask {mask_path} has class index {bad}, outside 0..{(num_classes or 1) - 1} "
                f"and not the ignore index {ignore_index}"
            )
        if size is not None:
            image = image.resize((size[1], size[0]), Image.BILINEAR)
            mask = np.asarray(Image.fromarray(mask).resize((size[1], size[0]), Image.NEAREST))
        images.append(np.asarray(image, dtype="float32"))
        masks.append(mask.astype(np.int32))
    shapes = sorted({m.shape for m in masks})
    if len(shapes) > 1:
        raise DataError(f"images differ in size ({len(shapes)} sizes, e.g. {shapes[:2]}); pass image_size=")
    return np.stack(images), np.stack(masks)


# --- Digit scenes: a small, offline segmentation task ---------------------------------

DIGIT_CLASS_NAMES = ["background"] + [str(d) for d in range(10)]
_TRAIN_SCANS = 1400  # scans 0..1399 build training scenes, the rest (397) held-out ones


def digit_scenes(count, size=64, digits=(1, 3), scale=(2.5, 3.5), noise=12.0, split="train", seed=0):
    """Scenes of scikit-learn's 8x8 digit scans, upsampled and placed on a
    noisy canvas: (images float32 (count, size, size, 3) in [0, 255], masks
    int32 (count, size, size)). Stroke pixels of digit d are class d + 1,
    everything else background 0 (11 classes, `DIGIT_CLASS_NAMES`).

    `digits` is the (min, max) number per scene (placed without overlap),
    `scale` the range of upsampling factors, `noise` the std of the pixel
    noise. "train" and "test" scenes use disjoint scans."""
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    scans = load_digits()
    pool = np.arange(_TRAIN_SCANS) if split == "train" else np.arange(_TRAIN_SCANS, len(scans.images))
    rng = np.random.default_rng(seed)
    images = np.empty((count, size, size, 3), np.float32)
    masks = np.zeros((count, size, size), np.int32)
    for n in range(count):
        background = rng.uniform(0, 120, 3)
        canvas = np.broadcast_to(background, (size, size, 3)).copy()
        taken = np.zeros((size, size), bool)
        for _ in range(rng.integers(digits[0], digits[1] + 1)):
            index = rng.choice(pool)
            side = int(round(8 * rng.uniform(*scale)))
            scan = np.asarray(
                Image.fromarray(scans.images[index].astype(np.float32) / 16.0).resize((side, side), Image.BILINEAR)
            )
            stroke = scan > 0.4
            for _ in range(20):  # a free spot, else skip the digit
                top, left = rng.integers(0, size - side + 1, 2)
                if not taken[top : top + side, left : left + side].any():
                    break
            else:
                continue
            taken[top : top + side, left : left + side] = True
            colour = rng.uniform(150, 255, 3)
            region = canvas[top : top + side, left : left + side]
            region[:] = region * (1 - scan[..., None]) + colour * scan[..., None]
            masks[n, top : top + side, left : left + side][stroke] = scans.target[index] + 1
        images[n] = np.clip(canvas + rng.normal(0, noise, canvas.shape), 0, 255)
    return images, masks
