"""ImageNet helpers, the keras-sequencer CLI, the converter and the examples."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("timm")
pytest.importorskip("sklearn")
import timm  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.datasets import load_sample_images  # noqa: E402

import keras_sequencer as ks  # noqa: E402
from conftest import run_model, run_once  # noqa: E402
from keras_sequencer import cli  # noqa: E402
from reference import (  # noqa: E402
    AUTHORS_VARIANTS,
    make_reference,
    normalize,
    reference_logits,
    to_authors_layout,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 56


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """scikit-learn's bundled real photographs, saved as JPEG and PNG."""
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for index, array in enumerate(load_sample_images().images):
        path = folder / (f"photo{index}.jpg" if index == 0 else f"photo{index}.png")
        Image.fromarray(array).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    reference = make_reference("sequencer2d_s", seed=11)
    path = tmp_path_factory.mktemp("ckpt") / "sequencer2d_s.pth"
    torch.save(to_authors_layout(reference.state_dict(), AUTHORS_VARIANTS["sequencer2d_s"]["layers"]), path)
    return reference, str(path)


def test_eval_transform_matches_timm_on_real_photographs(photos):
    reference = timm.create_model("sequencer2d_s", pretrained=False)
    config = timm.data.resolve_data_config({}, model=reference)
    transform = timm.data.create_transform(**config)
    for path in photos:
        expected = transform(Image.open(path).convert("RGB")).numpy().transpose(1, 2, 0)
        ours = ks.preprocess_input(ks.load_image(path), normalize=True)
        assert ours.shape == expected.shape == (224, 224, 3)
        assert np.abs(ours - expected).max() <= 1e-5


def test_class_names_ship_with_the_package():
    info = timm.data.ImageNetInfo("imagenet-1k")
    assert ks.imagenet_synsets() == [info.index_to_label_name(i) for i in range(1000)]
    names = ks.imagenet_class_names()
    assert names[1] == info.index_to_description(1)
    probs = np.zeros((2, 1000), "float32")
    probs[0, 1], probs[1, 999] = 0.9, 0.8
    decoded = ks.decode_predictions(probs, top=3)
    assert decoded[0][0] == ("n01443537", "goldfish", pytest.approx(0.9))
    assert decoded[1][0][0] == ks.imagenet_synsets()[999]
    with pytest.raises(ValueError, match="shape"):
        ks.decode_predictions(np.zeros((2, 10)))


def test_preprocess_input_follows_the_model_contract(rng):
    x = rng.uniform(0, 255, (1, 4, 4, 3)).astype("float32")
    assert ks.preprocess_input(x) is x  # models normalise inside by default
    np.testing.assert_allclose(ks.preprocess_input(x, normalize=True), normalize(x), atol=1e-6)


def test_cli_predict_json(photos, checkpoint, capsys):
    reference, path = checkpoint
    status = cli.main(["predict", *photos, "--weights", path, "--image-size", str(SIZE), "--top", "3", "--json"])
    assert status == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == photos
    images = np.stack([ks.load_image(p, SIZE) for p in photos])
    logits = reference_logits(reference, normalize(images))
    for result, row in zip(results, logits):
        assert [p["synset"] for p in result["predictions"]] == [
            ks.imagenet_synsets()[i] for i in np.argsort(row)[::-1][:3]
        ]


def test_cli_evaluate_imagenet_folder(photos, checkpoint, tmp_path, capsys):
    reference, path = checkpoint
    images = np.stack([ks.load_image(p, SIZE) for p in photos])
    predicted = reference_logits(reference, normalize(images)).argmax(-1)
    synsets = ks.imagenet_synsets()
    # First photo filed under its predicted class, second under another one.
    labels = [int(predicted[0]), int((predicted[1] + 1) % 1000)]
    for photo, label in zip(photos, labels):
        folder = tmp_path / synsets[label]
        folder.mkdir(exist_ok=True)
        os.link(photo, folder / os.path.basename(photo))
    (tmp_path / synsets[labels[0]] / "broken.jpg").write_bytes(b"not an image")
    status = cli.main(["evaluate", str(tmp_path), "--weights", path, "--image-size", str(SIZE), "--batch-size", "2"])
    captured = capsys.readouterr()
    assert status == 0
    assert "images: 2 (skipped 1 unreadable)" in captured.out
    assert "top-1: 50.000" in captured.out


def test_cli_errors(tmp_path, capsys):
    assert cli.main(["evaluate", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert cli.main(["evaluate", str(tmp_path)]) == 2
    assert "no class sub-folders" in capsys.readouterr().err
    assert cli.main(["predict", str(tmp_path / "nope.jpg")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def _run(args, **kwargs):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900, **kwargs
    )


@run_once
def test_weights_conversion_command_with_verify(checkpoint, tmp_path, rng):
    reference, path = checkpoint
    output = tmp_path / "s.weights.h5"
    result = _run(["-m", "weights_conversion", path, "--variant", "sequencer2d_s",
                   "--output", str(output), "--verify", "--image-size", str(SIZE)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max abs logit difference vs timm" in result.stdout
    assert "top-1 agreement with timm: 1.000" in result.stdout
    model = ks.Sequencer2DS(weights=str(output), input_shape=(SIZE, SIZE, 3), classifier_activation=None)
    images = rng.uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    diff = np.abs(run_model(model, images) - reference_logits(reference, normalize(images))).max()
    assert diff <= 1e-4
    again = _run(["-m", "weights_conversion", path, "--output", str(output)])
    assert again.returncode == 2 and "exists" in again.stderr


@run_once
def test_weights_conversion_wrong_variant_is_a_clear_error(checkpoint, tmp_path):
    _, path = checkpoint
    result = _run(["-m", "weights_conversion", path, "--variant", "sequencer2d_m",
                   "--output", str(tmp_path / "m.weights.h5")])
    assert result.returncode == 1
    assert "looks like 'sequencer2d_s'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "m.weights.h5").exists()


@run_once
def test_examples_run(photos, checkpoint, tmp_path):
    _, path = checkpoint
    converted = tmp_path / "example.weights.h5"
    result = _run([os.path.join("examples", "convert_checkpoint.py"), path, str(converted)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert converted.exists()
    result = _run([os.path.join("examples", "classify_image.py"), photos[0],
                   "--weights", str(converted), "--image-size", str(SIZE)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("(n") == 5  # five synsets printed
