"""The offline digits demo: the three-way split and the `demo` command."""

import os

import numpy as np
import pytest

pytest.importorskip("sklearn")

from conftest import run_once  # noqa: E402
from keras_sequencer import cli  # noqa: E402
from keras_sequencer.tasks.demo import (  # noqa: E402
    TEST_FRACTION,
    VALIDATION_FRACTION,
    load_digits_splits,
    split_three_ways,
    upsample,
)


@pytest.mark.parametrize("seed", [0, 1])
def test_three_splits_are_disjoint_stratified_and_complete(seed):
    from sklearn.datasets import load_digits

    labels = load_digits().target
    train, validation, test = split_three_ways(labels, seed=seed)
    assert not (train & validation).any() and not (train & test).any() and not (validation & test).any()
    assert (train | validation | test).all()
    for label in np.unique(labels):
        members = labels == label
        count = members.sum()
        # the same fraction of every class, within one image of rounding
        assert abs((test & members).sum() - TEST_FRACTION * count) <= 1
        assert abs((validation & members).sum() - VALIDATION_FRACTION * count) <= 1
    assert split_three_ways(labels, seed=seed)[2].tolist() == test.tolist()  # reproducible
    other = split_three_ways(labels, seed=seed + 10)[2]
    assert other.tolist() != test.tolist()


def test_digits_splits_are_upsampled_images_of_the_split():
    splits = load_digits_splits(seed=0)
    assert [len(splits[s][1]) for s in ("train", "validation", "test")] == [1259, 179, 359]
    images = splits["test"][0]
    assert images.shape[1:] == (16, 16, 3) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 255.0
    # bilinear upsampling keeps a constant image constant
    flat = np.full((1, 8, 8, 3), 7.0)
    np.testing.assert_allclose(upsample(flat), 7.0, rtol=1e-6)


@run_once
def test_demo_command_smoke(tmp_path, capsys):
    output = tmp_path / "demo"
    assert cli.main(["demo", "--output", str(output), "--epochs", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("digits 16x16"), lines
    assert "1259 training, 179 validation" in lines[0] and "359 test" in lines[0], lines[0]
    assert any(line.startswith("reloaded model.keras: predictions match") for line in lines), lines
    assert lines[-1].startswith("accuracy: 0."), lines
    for name in ("model.keras", "history.csv", "curves.png", "confusion_matrix.png"):
        assert os.path.getsize(output / name) > 0
    with open(output / "history.csv") as log:
        assert "val_accuracy" in log.readline()
