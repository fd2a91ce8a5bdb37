"""Semantic segmentation: the Sequencer + Semantic FPN model, its metrics, loss,
mask loader, and the digit-scene example."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

from conftest import run_model, run_once
from keras_sequencer.data import DataError
from keras_sequencer.models import segmentation as seg
from keras_sequencer.models.sequencer2d import Sequencer2D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGNORE = seg.IGNORE_INDEX


def tiny_backbone(input_shape=(None, None, 3), patch_sizes=(7, 2, 1, 1)):
    return Sequencer2D(
        layers=(1, 1, 1, 1),
        patch_sizes=patch_sizes,
        embed_dims=(16, 24, 24, 24),
        hidden_sizes=(4, 6, 6, 6),
        mlp_ratios=(2, 2, 2, 2),
        features_only=True,
        out_indices=(0, 1, 2, 3),
        input_shape=input_shape,
        name="tiny",
    )


def tiny_segmenter(num_classes=4, **kwargs):
    return seg.SequencerSegmenter(
        tiny_backbone(**kwargs), num_classes=num_classes, fpn_channels=16, head_channels=8
    )


def images(shape, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, shape).astype("float32")


# --- the model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def s_segmenter():
    return seg.SequencerSegmenter("sequencer2d_s", num_classes=5, fpn_channels=16, head_channels=8)


@pytest.mark.parametrize("height, width", [(64, 64), (56, 98)])
def test_named_backbone_logits_at_input_resolution(s_segmenter, height, width):
    # sequencer2d_s: reductions 7, 14, 14, 14; 64 px gives maps of 9 and 4 px.
    assert [i["reduction"] for i in s_segmenter.metadata["feature_info"]] == [7, 14, 14, 14]
    assert s_segmenter.input_shape == (None, None, None, 3)
    logits = run_model(s_segmenter, images((2, height, width, 3)))
    assert logits.shape == (2, height, width, 5)
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("shape", [(70, 84, 3), (64, 64, 3)])
def test_fixed_input_shape(shape):
    model = tiny_segmenter(input_shape=shape)
    assert model.output_shape == (None, *shape[:2], 4)
    assert run_model(model, images((1, *shape))).shape == (1, *shape[:2], 4)


def test_levels_of_every_reduction_ratio():
    # patch sizes 2, 2, 2, 1: reductions 2, 4, 8, 8 (one, two and two 2x steps).
    model = tiny_segmenter(patch_sizes=(2, 2, 2, 1))
    assert [i["reduction"] for i in model.metadata["feature_info"]] == [2, 4, 8, 8]
    assert run_model(model, images((1, 30, 42, 3))).shape == (1, 30, 42, 4)


def test_metadata_and_names():
    model = seg.SequencerSegmenter(
        tiny_backbone(), num_classes=3, fpn_channels=8, head_channels=8, class_names=["bg", "a", "b"]
    )
    assert model.name == "tiny_fpn"
    assert model.metadata["num_classes"] == 3
    assert model.metadata["ignore_index"] == IGNORE
    assert model.metadata["class_names"] == ["bg", "a", "b"]
    assert model.get_layer(seg.CLASSIFIER).filters == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(backbone="sequencer2d_xs"), "Unknown model"),
        (dict(backbone=42), "variant name"),
        (dict(num_classes=1), "at least 2"),
        (dict(num_classes=2.5), "positive integer"),
        (dict(fpn_channels=0), "fpn_channels"),
        (dict(dropout=1.0), "dropout"),
        (dict(ignore_index=3), "outside the class range"),
        (dict(class_names=["a"]), "class_names"),
        (dict(input_shape=(64, 64)), "input_shape"),
        (dict(backbone_weights="no/such/file.h5"), "no such file"),
    ],
)
def test_bad_arguments_fail_in_one_line(kwargs, message):
    arguments = dict(backbone="sequencer2d_s", num_classes=5)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message) as error:
        seg.SequencerSegmenter(**arguments)
    assert "\n" not in str(error.value)


def test_backbone_model_rules():
    backbone = tiny_backbone(input_shape=(64, 64, 3))
    with pytest.raises(ValueError, match="apply to a named backbone"):
        seg.SequencerSegmenter(backbone, num_classes=3, backbone_weights="imagenet")
    with pytest.raises(ValueError, match="does not fit"):
        seg.SequencerSegmenter(backbone, num_classes=3, input_shape=(32, 32, 3))
    plain = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 3)])
    with pytest.raises(ValueError, match="features_only"):
        seg.SequencerSegmenter(plain, num_classes=3)


def test_keras_file_round_trip(tmp_path):
    model = tiny_segmenter()
    x = images((2, 56, 70, 3))
    path = str(tmp_path / "segmenter.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(run_model(loaded, x), run_model(model, x), rtol=1e-5, atol=1e-5)
    assert loaded.metadata["num_classes"] == 4


# --- metrics and loss against numpy --------------------------------------------------


def numpy_scores(labels, logits, num_classes, ignore):
    predicted = logits.argmax(-1).ravel()
    labels = labels.ravel()
    keep = labels != ignore
    labels, predicted = labels[keep], predicted[keep]
    ious = []
    for c in range(num_classes):
        union = np.sum((labels == c) | (predicted == c))
        if union:
            ious.append(np.sum((labels == c) & (predicted == c)) / union)
    return np.mean(ious), np.mean(labels == predicted)


def test_metrics_match_numpy():
    rng = np.random.default_rng(1)
    num_classes = 6
    labels = rng.integers(0, num_classes - 1, (2, 3, 10, 12))  # class 5 never labelled
    labels[rng.random(labels.shape) < 0.2] = IGNORE
    logits = rng.normal(size=(2, 3, 10, 12, num_classes)).astype("float32")
    logits[0, 0, :2, :2, 4] = 50.0  # predicted where some labels are ignored
    mean_iou, accuracy = seg.segmentation_metrics(num_classes)
    for batch in range(2):  # accumulated over batches
        mean_iou.update_state(labels[batch], logits[batch])
        accuracy.update_state(labels[batch], logits[batch])
    expected_iou, expected_accuracy = numpy_scores(labels, logits, num_classes, IGNORE)
    assert 0.05 < expected_iou < 0.5  # a non-trivial value
    np.testing.assert_allclose(float(mean_iou.result()), expected_iou, rtol=1e-5)
    np.testing.assert_allclose(float(accuracy.result()), expected_accuracy, rtol=1e-5)
    accuracy.reset_state()
    assert float(accuracy.result()) == 0.0


def test_loss_averages_over_labelled_pixels():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, (2, 5, 6))
    labels[:, :2] = IGNORE
    logits = rng.normal(size=(2, 5, 6, 4)).astype("float32")
    loss = float(seg.segmentation_loss()(labels, logits))
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    keep = labels != IGNORE
    expected = -np.take_along_axis(log_probs, np.where(keep, labels, 0)[..., None], -1)[..., 0][keep].mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


# --- the folder loader ---------------------------------------------------------------


def write_pair(root, stem, image_size=(12, 10), mask=None, mask_mode="L", sub=""):
    """An RGB image root/images/<sub>/<stem>.jpg and its mask (w, h sizes)."""
    os.makedirs(os.path.join(root, "images", sub), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations", sub), exist_ok=True)
    width, height = image_size
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(os.path.join(root, "images", sub, stem + ".jpg"))
    if mask is None:
        mask = (np.arange(height * width).reshape(height, width) % 3).astype(np.uint8)
    picture = Image.fromarray(mask).convert(mask_mode) if mask_mode != "P" else Image.fromarray(mask, "P")
    if mask_mode == "P":
        picture.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    picture.save(os.path.join(root, "annotations", sub, stem + ".png"))
    return mask


def test_loader_reads_indices_as_stored(tmp_path):
    first = write_pair(tmp_path, "a", mask_mode="P", sub="training")  # palette: indices, not colours
    second = np.where(np.eye(10, 12, dtype=bool), IGNORE, 2).astype(np.uint8)
    write_pair(tmp_path, "b", mask=second, sub="training")
    x, y = seg.load_segmentation_folder(tmp_path, num_classes=3)
    assert x.shape == (2, 10, 12, 3) and x.dtype == np.float32
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y[0], first)
    np.testing.assert_array_equal(y[1], second)


def test_loader_resizes_masks_by_nearest(tmp_path):
    mask = np.zeros((10, 12), np.uint8)
    mask[:, 6:] = 2
    mask[0, 0] = IGNORE
    write_pair(tmp_path, "a", mask=mask)
    x, y = seg.load_segmentation_folder(tmp_path, image_size=(20, 18))
    assert x.shape == (1, 20, 18, 3) and y.shape == (1, 20, 18)
    assert set(np.unique(y)) == {0, 2, IGNORE}  # no blended labels


def test_loader_reduce_zero_label(tmp_path):
    mask = np.array([[0, 1, 2], [3, IGNORE, 1]], np.uint8)
    write_pair(tmp_path, "a", image_size=(3, 2), mask=mask)
    _, y = seg.load_segmentation_folder(tmp_path, num_classes=3, reduce_zero_label=True)
    np.testing.assert_array_equal(y[0], [[IGNORE, 0, 1], [2, IGNORE, 0]])


def test_loader_mask_of_another_size(tmp_path):
    write_pair(tmp_path, "a", image_size=(12, 10), mask=np.zeros((9, 12), np.uint8))
    with pytest.raises(DataError, match=r"mask .*a\.png is 12x9 but its image is 12x10"):
        seg.load_segmentation_folder(tmp_path)


def test_loader_missing_mask(tmp_path):
    write_pair(tmp_path, "a")
    os.remove(tmp_path / "annotations" / "a.png")
    with pytest.raises(DataError, match=r"no mask for image .*a\.jpg"):
        seg.load_segmentation_folder(tmp_path)


def test_loader_class_index_out_of_range(tmp_path):
    mask = np.zeros((10, 12), np.uint8)
    mask[3, 4] = 7
    mask[0, 0] = IGNORE  # allowed
    write_pair(tmp_path, "a", mask=mask)
    with pytest.raises(DataError, match="class index 7, outside 0..4"):
        seg.load_segmentation_folder(tmp_path, num_classes=5)
    assert seg.load_segmentation_folder(tmp_path, num_classes=8)[1].max() == IGNORE


def test_loader_rgb_mask(tmp_path):
    write_pair(tmp_path, "a", mask_mode="RGB")
    with pytest.raises(DataError, match="not single-channel"):
        seg.load_segmentation_folder(tmp_path)


def test_loader_no_images_and_mixed_sizes(tmp_path):
    os.makedirs(tmp_path / "images")
    os.makedirs(tmp_path / "annotations")
    with pytest.raises(DataError, match="no images"):
        seg.load_segmentation_folder(tmp_path)
    write_pair(tmp_path, "a", image_size=(12, 10))
    write_pair(tmp_path, "b", image_size=(8, 8), mask=np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match="pass image_size"):
        seg.load_segmentation_folder(tmp_path)
    assert seg.load_segmentation_folder(tmp_path, image_size=16)[0].shape == (2, 16, 16, 3)


# --- learning ------------------------------------------------------------------------


def test_digit_scenes_labels_strokes():
    x, y = seg.digit_scenes(8, size=48, digits=(1, 2), split="test")
    assert x.shape == (8, 48, 48, 3) and y.shape == (8, 48, 48)
    assert 0 <= x.min() and x.max() <= 255
    assert set(np.unique(y)) <= set(range(11)) and (y > 0).any() and (y == 0).mean() > 0.5
    other = seg.digit_scenes(8, size=48, digits=(1, 2), split="test", seed=1)[1]
    assert not np.array_equal(y, other)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="slow; one backend is enough")
def test_short_fit_lowers_the_loss():
    keras.utils.set_random_seed(0)
    x, y = seg.digit_scenes(64, size=32, digits=(1, 2), scale=(1.5, 2.0))
    model = seg.SequencerSegmenter(
        tiny_backbone(input_shape=(32, 32, 3), patch_sizes=(4, 2, 1, 1)),
        num_classes=11, fpn_channels=16, head_channels=16,
    )
    model.compile(keras.optimizers.Adam(3e-3), seg.segmentation_loss(), metrics=seg.segmentation_metrics(11))
    history = model.fit(x, y, batch_size=16, epochs=4, verbose=0).history
    assert history["loss"][-1] < 0.6 * history["loss"][0]
    assert history["pixel_accuracy"][-1] > 0.8


@run_once
def test_example_runs(tmp_path):
    picture = tmp_path / "digits.png"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "segment_digits.py"),
         "--epochs", "1", "--scenes", "32", "--test-scenes", "8", "--output", str(picture)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, KERAS_BACKEND="tensorflow"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "held-out mean IoU" in result.stdout and "background only" in result.stdout
    assert Image.open(picture).size[0] > 100
