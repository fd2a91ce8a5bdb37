"""Evaluation over class folders, the resolution sweep (the paper's figure) and
the `evaluate --image-sizes` and `erf` commands."""

import csv
import os

import keras
import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
from sklearn.datasets import load_digits  # noqa: E402

import keras_sequencer as ks  # noqa: E402
from conftest import run_once  # noqa: E402
from keras_sequencer import cli  # noqa: E402
from keras_sequencer.data import DataError  # noqa: E402
from keras_sequencer.models import functional_model  # noqa: E402

TINY = dict(layers=(1, 1), patch_sizes=(2, 2), embed_dims=(16, 24), hidden_sizes=(4, 6), mlp_ratios=(2.0, 2.0))
CLASSES = ["zero", "one", "two"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("eval") / "digits"
    digits = load_digits()
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i, image in enumerate(digits.images[digits.target == label][:6]):
            Image.fromarray((image / 16.0 * 255.0).astype("uint8")).resize((24, 24)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(1)
    base = ks.Sequencer2D(**TINY, input_shape=(None, None, 3), classes=3, name="tiny")
    return functional_model(base.inputs, base.outputs, "tiny", metadata={"class_names": CLASSES,
                                                                         "image_size": [24, 24]})


def expected_top1(model, folder, size):
    correct = total = 0
    for label, name in enumerate(CLASSES):
        paths = sorted((folder / name).iterdir())
        images = np.stack([ks.load_image(str(p), size) for p in paths])
        predicted = keras.ops.convert_to_numpy(model(images, training=False)).argmax(-1)
        correct += int((predicted == label).sum())
        total += len(paths)
    return 100.0 * correct / total


def test_resolution_sweep_evaluates_each_size_with_its_own_transform(model, folder, tmp_path):
    rows = ks.resolution_sweep(model, str(folder), [16, 24, 32], output_dir=str(tmp_path), progress=False)
    assert [r["image_size"] for r in rows] == [16, 24, 32]
    for row in rows:
        assert row["images"] == 18
        assert row["top1"] == pytest.approx(expected_top1(model, folder, row["image_size"]))
    reference = rows[1]["top1"]  # the size the model was trained at
    assert rows[1]["relative_top1"] == 1.0
    assert rows[0]["relative_top1"] == pytest.approx(rows[0]["top1"] / reference)
    with open(tmp_path / "resolution.csv", newline="") as f:
        assert [int(r["image_size"]) for r in csv.DictReader(f)] == [16, 24, 32]
    assert (tmp_path / "resolution.png").stat().st_size > 0
    assert "top-1 relative to 24" in (tmp_path / "resolution.md").read_text()


def test_sweep_and_evaluate_errors(model, folder, tmp_path):
    fixed = ks.Sequencer2D(**TINY, input_shape=(24, 24, 3), classes=3)
    with pytest.raises(DataError, match="takes only 24x24 images"):
        ks.resolution_sweep(fixed, str(folder), [16, 32])
    with pytest.raises(DataError, match="below the model's minimum of 4: 2"):
        ks.resolution_sweep(model, str(folder), [2, 24])
    with pytest.raises(DataError, match="no such directory"):
        ks.evaluate(model, str(tmp_path / "missing"))
    (tmp_path / "cats").mkdir()
    with pytest.raises(DataError, match="has no class for: cats"):
        ks.evaluate(model, str(tmp_path))


@run_once
def test_evaluate_sizes_and_erf_commands(model, folder, tmp_path, capsys):
    path = str(tmp_path / "tiny.keras")
    model.save(path)
    status = cli.main(["evaluate", str(folder), "--weights", path, "--image-sizes", "16", "24",
                       "--output", str(tmp_path / "sweep")])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "   24 px  top-1:" in out and "relative top-1: 1.0000" in out
    assert os.path.isfile(tmp_path / "sweep" / "resolution.png")

    status = cli.main(["erf", str(folder / "one"), "--weights", path, "--layers", "stages_1_blocks_0",
                       "--output", str(tmp_path / "erf")])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert np.load(tmp_path / "erf" / "stages_1_blocks_0.npy").shape == (24, 24)
    assert cli.main(["erf", str(folder / "one"), "--weights", path, "--layers", "nope"]) == 2
    assert "has no layer 'nope'" in capsys.readouterr().err


def test_resolution_sweep_compares_with_timm_on_the_same_data(folder, tmp_path):
    """timm's model with the same weights, evaluated by the sweep beside ours,
    gives the same accuracy at every size: same data, same transform."""
    timm_sequencer = pytest.importorskip("timm.models.sequencer")
    import torch

    torch.manual_seed(0)
    net = timm_sequencer.Sequencer2d(
        num_classes=3, layers=[1, 1], patch_sizes=[2, 2], embed_dims=[16, 24], hidden_sizes=[4, 6],
        mlp_ratios=[2.0, 2.0],
    ).eval()
    with torch.no_grad():
        for parameter in net.parameters():  # non-zero head and biases
            parameter.add_(torch.randn_like(parameter) * 0.1)
    ours = ks.Sequencer2D(**TINY, input_shape=(None, None, 3), classes=3, name="tiny", classifier_activation=None)
    ks.load_torch_state_dict(ours, net.state_dict())
    ours = functional_model(ours.inputs, ours.outputs, "tiny", metadata={"class_names": CLASSES, "image_size": [24, 24]})
    net.pretrained_cfg = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                              crop_pct=ks.model_metadata(ours)["crop_pct"])

    rows = ks.resolution_sweep(ours, str(folder), [16, 24, 32], output_dir=str(tmp_path), compare_timm=[net],
                               progress=False)
    mine = [r for r in rows if r["model"] == "tiny"]
    theirs = [r for r in rows if r["model"] != "tiny"]
    assert [r["image_size"] for r in theirs] == [16, 24, 32] and theirs[0]["model"].startswith("timm")
    assert [r["top1"] for r in mine] == [r["top1"] for r in theirs]
    assert [r["relative_top1"] for r in mine] == [r["relative_top1"] for r in theirs]
    with open(tmp_path / "resolution.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    assert (tmp_path / "resolution.png").stat().st_size > 0


def test_timm_comparison_needs_image_sizes(folder, capsys):
    status = cli.main(["evaluate", str(folder), "--variant", "s", "--timm", "sequencer2d_s"])
    assert status != 0
    assert "--timm compares resolution sweeps: give --image-sizes too" in capsys.readouterr().err
