"""Effective receptive fields (tasks/erf.py) against the authors' computation on timm."""

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("timm")
import torch  # noqa: E402

import keras_sequencer as ks  # noqa: E402
from conftest import run_once  # noqa: E402
from keras_sequencer.tasks.erf import (  # noqa: E402
    default_erf_layers,
    effective_receptive_field,
    save_erf_heatmaps,
)
from reference import make_reference, normalize  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 56  # stage maps 8x8, 4x4, 4x4, 4x4
LAYERS = ["stem", "stages_0_blocks_0", "stages_1_downsample", "stages_3_blocks_2"]
TOLERANCE = 1e-4


def timm_module(model, name):
    """Our layer name -> the timm module whose output it is (both NHWC)."""
    if name in ("stem", "norm"):
        return getattr(model, name)
    parts = name.split("_")
    stage = model.stages[int(parts[1])]
    return stage.downsample if parts[2] == "downsample" else stage.blocks[int(parts[3])]


def timm_erf(model, images_0_255, layers, batch_size):
    """The authors' generate_erf.py on timm: gradients of the summed centre
    feature w.r.t. the normalised input, ReLU, summed over batches, batch and
    channels, then log10(1 + x)."""
    captured = {}
    hooks = [
        timm_module(model, name).register_forward_hook(
            lambda module, inputs, output, name=name: captured.__setitem__(name, output)
        )
        for name in layers
    ]
    totals = {name: 0.0 for name in layers}
    needs_grad = [p.requires_grad for p in model.parameters()]
    for param in model.parameters():
        param.requires_grad_(False)  # input gradients only: no weight-gradient work
    try:
        for start in range(0, len(images_0_255), batch_size):
            chunk = normalize(images_0_255[start : start + batch_size]).transpose(0, 3, 1, 2)
            x = torch.from_numpy(np.ascontiguousarray(chunk)).requires_grad_(True)
            model(x)
            for name in layers:
                out = captured[name]
                height, width = out.shape[1:3]
                centre = out[:, height // 2 - 1, width // 2 - 1, :].sum()
                (grad,) = torch.autograd.grad(centre, x, retain_graph=True)
                totals[name] = totals[name] + torch.relu(grad).sum(dim=(0, 1)).double().numpy()
    finally:
        for hook in hooks:
            hook.remove()
        for param, flag in zip(model.parameters(), needs_grad):
            param.requires_grad_(flag)
    return {name: np.log10(1.0 + total) for name, total in totals.items()}


@pytest.fixture(scope="module")
def reference():
    return make_reference("sequencer2d_s", num_classes=10)


@pytest.fixture(scope="module")
def model(reference):
    model = ks.Sequencer2DS(weights=None, classes=10, input_shape=(SIZE, SIZE, 3))
    ks.load_torch_state_dict(model, reference.state_dict())
    return model


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(0, 255, (3, SIZE, SIZE, 3)).astype("float32")


def test_matches_authors_computation_on_timm(model, reference, images):
    # Batches of 2 over 3 images: the maps accumulate over uneven batches too.
    ours = effective_receptive_field(model, images, layers=LAYERS, batch_size=2)
    expected = timm_erf(reference, images, LAYERS, batch_size=2)
    assert list(ours) == LAYERS
    for name in LAYERS:
        assert ours[name].shape == (SIZE, SIZE), name
        scale = np.abs(expected[name]).max()
        assert scale > 0.1, name  # the gradient reaches the input
        relative = np.abs(ours[name] - expected[name]).max() / scale
        print(f"{name}: relative difference {relative:.2e}")
        assert relative <= TOLERANCE, (name, relative)
    # The stem's token (3, 3) of 8x8 sees its 7x7 patch and nothing else.
    stem = ours["stem"]
    inside = stem[21:28, 21:28]
    assert (inside > 0).mean() > 0.5 and stem.sum() == pytest.approx(inside.sum())


def test_same_maps_without_preprocessing_inside(model, images):
    # Gradients are taken w.r.t. the normalised images, as the authors': a model
    # that takes normalised input gives the same maps.
    plain = ks.Sequencer2DS(
        weights=None, classes=10, include_preprocessing=False, input_shape=(SIZE, SIZE, 3)
    )
    plain.set_weights(model.get_weights())
    a = effective_receptive_field(model, images[:1], layers="stages_0_blocks_0")
    normalised = ks.preprocess_input(images[:1], normalize=True)
    b = effective_receptive_field(plain, normalised, layers="stages_0_blocks_0")
    np.testing.assert_allclose(a["stages_0_blocks_0"], b["stages_0_blocks_0"], rtol=1e-4, atol=1e-6)


def test_default_layers_and_clear_errors(model, images):
    assert default_erf_layers(model) == [
        "stages_0_blocks_3", "stages_1_blocks_2", "stages_2_blocks_7", "stages_3_blocks_2"
    ]
    with pytest.raises(ValueError, match="no layer 'stages_9_blocks_0'.*stages_0_blocks_0"):
        effective_receptive_field(model, images, layers=["stages_9_blocks_0"])
    with pytest.raises(ValueError, match="'head' outputs shape .*not a 4-D"):
        effective_receptive_field(model, images, layers=["head"])
    with pytest.raises(ValueError, match="images"):
        effective_receptive_field(model, images[0, 0], layers=["stem"])


@run_once
def test_heatmaps_and_npy_written(tmp_path):
    ramp = np.linspace(0, 2, SIZE * SIZE).reshape(SIZE, SIZE)
    erf = {"stages_3_blocks_2": ramp, "flat": np.ones((4, 4))}
    paths = save_erf_heatmaps(erf, str(tmp_path / "erf"))
    assert sorted(os.path.basename(p) for p in paths) == sorted(
        ["stages_3_blocks_2.npy", "stages_3_blocks_2.png", "flat.npy", "flat.png"]
    )
    np.testing.assert_array_equal(np.load(tmp_path / "erf" / "stages_3_blocks_2.npy"), ramp)
    with open(tmp_path / "erf" / "flat.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@run_once
def test_example_script(tmp_path):
    weights = tmp_path / "random.weights.h5"
    full = ks.Sequencer2DS(weights=None, input_shape=(SIZE, SIZE, 3))
    full.save_weights(str(weights))
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "examples/effective_receptive_field.py", "--weights", str(weights),
         "--output", str(output), "--image-size", str(SIZE), "--layers", "stem,stages_3_blocks_2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = sorted(os.listdir(output))
    assert written == ["stages_3_blocks_2.npy", "stages_3_blocks_2.png", "stem.npy", "stem.png"]
    assert np.load(output / "stem.npy").shape == (SIZE, SIZE)
