"""The vanilla Sequencer: logit parity with a PyTorch reference through the
checkpoint path, the resampled position embedding against timm's, saving, and
argument handling. Run the file under each KERAS_BACKEND."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

pytest.importorskip("timm")
import torch  # noqa: E402
from timm.layers import resample_abs_pos_embed  # noqa: E402

import keras_sequencer as ks  # noqa: E402
from conftest import run_model, run_once  # noqa: E402
from keras_sequencer.models import vanilla  # noqa: E402
from keras_sequencer.weights.convert import guess_variant, normalize_state_dict  # noqa: E402
from reference import make_reference, normalize  # noqa: E402
from reference_vanilla import VARIANTS, make_vanilla_reference, vanilla_logits  # noqa: E402

TOLERANCE = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILDERS = {
    "v_sequencer_s": vanilla.VSequencerS,
    "v_sequencer_s_h": vanilla.VSequencerSH,
    "v_sequencer_s_pe": vanilla.VSequencerSPE,
}


def _images(rng, batch, height, width):
    return rng.uniform(0, 255, size=(batch, height, width, 3)).astype("float32")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{name: (reference model, path of its checkpoint in the authors' layout)}."""
    folder = tmp_path_factory.mktemp("vanilla")
    out = {}
    for name in VARIANTS:
        reference = make_vanilla_reference(name)
        path = folder / f"{name}.pth"
        torch.save({"model": reference.state_dict()}, path)  # wrapped, as training scripts save
        out[name] = reference, str(path)
    return out


def _check_logits(model, reference, images):
    expected = vanilla_logits(reference, normalize(images))
    diff = np.abs(run_model(model, images) - expected).max()
    assert diff <= TOLERANCE, diff
    assert np.abs(expected).max() > 0.1  # the head really contributes
    return diff


def test_registry_and_builders():
    assert {"v_sequencer_s", "v_sequencer_s_h", "v_sequencer_s_pe"} <= set(ks.list_models())
    for name in VARIANTS:
        config = ks.registry.model_config(name)
        assert config["family"] == "vanilla" and config["weights_variant"] is None
        arch = {k: v for k, v in config["arch"].items() if k != "ape"}
        reference = {k: v for k, v in VARIANTS[name].items() if k != "ape"}
        assert {k: list(v) for k, v in arch.items()} == reference
        assert config["arch"]["ape"] == VARIANTS[name].get("ape", False)
    assert [b.__name__ for b in BUILDERS.values()] == ["VSequencerS", "VSequencerSH", "VSequencerSPE"]


def test_parameter_counts():
    reference = make_vanilla_reference("v_sequencer_s")
    torch_count = sum(p.numel() for p in reference.parameters())
    assert torch_count == 33_016_552  # REFERENCE.md: about 33.0M
    model = vanilla.VSequencerS(input_shape=(28, 28, 3))
    # Keras keeps one LSTM bias per direction where PyTorch keeps two.
    bias_hh = sum(p.numel() for k, p in reference.named_parameters() if "bias_hh" in k)
    assert bias_hh == 18 * 2 * 4 * 192
    assert model.count_params() == torch_count - bias_hh


@pytest.mark.parametrize(
    "name, size",
    [("v_sequencer_s", 56), ("v_sequencer_s_h", 56), ("v_sequencer_s_pe", 224)],
)
def test_checkpoint_through_builder(checkpoints, rng, name, size):
    reference, path = checkpoints[name]
    model = BUILDERS[name](weights=path, input_shape=(size, size, 3), classifier_activation=None)
    _check_logits(model, reference, _images(rng, 2, size, size))


def test_checkpoint_through_create_model(checkpoints, rng):
    reference, path = checkpoints["v_sequencer_s_h"]
    model = ks.create_model("v_sequencer_s_h", weights=path, input_shape=(42, 70, 3), classifier_activation=None)
    assert model.name == "v_sequencer_s_h"
    _check_logits(model, reference, _images(rng, 2, 42, 70))  # 6x10 tokens, then 3x5


@pytest.mark.parametrize("shape", [(112, 112), (280, 252), (98, 168)])
def test_position_embedding_at_other_sizes(checkpoints, rng, shape):
    # 8x8 (shrunk, antialiased), 20x18 (grown) and 7x12 token grids.
    reference, path = checkpoints["v_sequencer_s_pe"]
    model = vanilla.VSequencerSPE(weights=path, input_shape=(*shape, 3), classifier_activation=None)
    _check_logits(model, reference, _images(rng, 1, *shape))


@pytest.mark.parametrize("grid", [(16, 16), (8, 8), (20, 18), (7, 12), (3, 31), (1, 1)])
def test_resampled_embedding_equals_timm(rng, grid):
    embedding = rng.normal(size=(1, 16, 16, 24)).astype("float32")
    layer = vanilla.AbsolutePositionEmbedding((16, 16))
    layer.build((None, None, None, 24))
    layer.embedding.assign(embedding)
    ours = keras.ops.convert_to_numpy(layer(np.zeros((1, *grid, 24), "float32")))
    expected = resample_abs_pos_embed(
        torch.from_numpy(embedding.reshape(1, 256, 24)), new_size=list(grid), old_size=[16, 16], num_prefix_tokens=0
    ).reshape(1, *grid, 24).numpy()
    if grid == (16, 16):
        np.testing.assert_array_equal(ours, embedding)  # the reference's grid: no resampling
    diff = np.abs(ours - expected).max()
    assert diff <= TOLERANCE, diff


def test_any_size_model_saves_and_loads(checkpoints, rng, tmp_path):
    reference, path = checkpoints["v_sequencer_s_pe"]
    model = vanilla.VSequencerSPE(weights=path, input_shape=(None, None, 3), classifier_activation=None)
    file = str(tmp_path / "v.keras")
    model.save(file)
    loaded = keras.saving.load_model(file)
    for shape in ((112, 112), (70, 98)):
        images = _images(rng, 1, *shape)
        _check_logits(loaded, reference, images)
        np.testing.assert_allclose(run_model(loaded, images), run_model(model, images), atol=1e-5)
    assert isinstance(loaded.get_layer("stages_0_blocks_0"), vanilla.VanillaSequencerBlock)


def test_keras_weights_file_round_trip(checkpoints, rng, tmp_path):
    reference, path = checkpoints["v_sequencer_s"]
    model = vanilla.VSequencerS(weights=path, input_shape=(28, 28, 3), classifier_activation=None)
    file = str(tmp_path / "v.weights.h5")
    model.save_weights(file)
    again = vanilla.VSequencerS(weights=file, input_shape=(28, 28, 3), classifier_activation=None)
    _check_logits(again, reference, _images(rng, 2, 28, 28))


def test_routes_agree(checkpoints, rng):
    reference, path = checkpoints["v_sequencer_s"]
    images = _images(rng, 2, 42, 42)
    for route in ("keras", "fused"):
        model = vanilla.VSequencerS(weights=path, input_shape=(42, 42, 3), classifier_activation=None,
                                    rnn_route=route)
        assert model.get_layer("stages_0_blocks_0").selected_route == route
        _check_logits(model, reference, images)


def test_training_call_with_drop_path_runs():
    model = vanilla.VSequencerSH(input_shape=(28, 28, 3), classes=3, drop_rate=0.1, drop_path_rate=0.2)
    x = np.ones((2, 28, 28, 3), "float32")
    out = keras.ops.convert_to_numpy(model(x, training=True))
    assert out.shape == (2, 3) and np.all(np.isfinite(out))
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("pooling, shape", [(None, (2, 2, 2, 384)), ("avg", (2, 384)), ("max", (2, 384))])
def test_headless(pooling, shape):
    model = vanilla.VSequencerS(include_top=False, pooling=pooling, input_shape=(28, 28, 3))
    assert "head" not in [layer.name for layer in model.layers]
    assert run_model(model, np.ones((2, 28, 28, 3), "float32")).shape == shape


def test_headless_model_takes_a_checkpoint(checkpoints, rng):
    reference, path = checkpoints["v_sequencer_s"]
    model = vanilla.VSequencerS(weights=path, include_top=False, pooling="avg", input_shape=(28, 28, 3))
    images = _images(rng, 2, 28, 28)
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(normalize(images).transpose(0, 3, 1, 2)))
        expected = reference.forward_features(x).mean(dim=(1, 2)).numpy()
    assert np.abs(run_model(model, images) - expected).max() <= TOLERANCE


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least 14x14"):
        vanilla.VSequencerS(input_shape=(13, 56, 3))
    with pytest.raises(ValueError, match="No ImageNet weights are published for 'v_sequencer_s'"):
        vanilla.VSequencerS(weights="imagenet")
    with pytest.raises(ValueError, match="`pooling` must be one of"):
        vanilla.VSequencerS(include_top=False, pooling="mean")
    with pytest.raises(ValueError, match="no such file"):
        vanilla.VSequencerS(weights="missing.pth")
    with pytest.raises(ValueError, match="2 \\* hidden_sizes must equal embed_dims. Stage 1"):
        vanilla.VanillaSequencer((1, 1), (14, 1), (64, 64), (32, 16), (3.0, 3.0))
    with pytest.raises(ValueError, match="same length"):
        vanilla.VanillaSequencer((1, 1), (14,), (64, 64), (32, 32), (3.0, 3.0))
    with pytest.raises(ValueError, match="Unrecognized route"):
        vanilla.VSequencerS(rnn_route="cudnn")
    with pytest.raises(ValueError, match="3 input channels"):
        vanilla.VSequencerS(input_shape=(56, 56, 1))


def test_family_mismatch_is_one_line(checkpoints, tmp_path):
    _, path = checkpoints["v_sequencer_s"]
    with pytest.raises(ks.CheckpointMismatchError) as info:
        ks.Sequencer2DS(weights=path, input_shape=(28, 28, 3))
    message = str(info.value)
    assert "\n" not in message
    assert "vanilla Sequencer" in message and "'sequencer2d_s' is a Sequencer2D" in message
    two_dim = tmp_path / "s.pth"
    torch.save(make_reference("sequencer2d_s").state_dict(), two_dim)
    with pytest.raises(ks.CheckpointMismatchError) as info:
        vanilla.VSequencerS(weights=str(two_dim), input_shape=(28, 28, 3))
    assert "\n" not in str(info.value)
    assert "holds a Sequencer2D" in str(info.value) and "is a vanilla Sequencer" in str(info.value)


def test_wrong_vanilla_variant_lists_problems(checkpoints):
    reference, _ = checkpoints["v_sequencer_s_pe"]
    model = vanilla.VSequencerS(input_shape=(28, 28, 3))
    with pytest.raises(ks.CheckpointMismatchError) as info:
        ks.load_torch_state_dict(model, reference.state_dict())
    assert "unexpected keys (1): absolute_pos_embed" in str(info.value)
    assert "looks like 'v_sequencer_s_pe'" in str(info.value)


def test_guess_variant(checkpoints):
    for name, (reference, _) in checkpoints.items():
        assert guess_variant(normalize_state_dict(reference.state_dict())) == name


@run_once
def test_example_runs(checkpoints, tmp_path):
    _, path = checkpoints["v_sequencer_s_pe"]
    result = subprocess.run(
        [sys.executable, "examples/vanilla_sequencer.py", "--variant", "v_sequencer_s_pe",
         "--checkpoint", path, "--image-size", "112", "--compare-2d"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, KERAS_BACKEND="tensorflow"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "v_sequencer_s_pe: 33.09M parameters" in result.stdout
    assert "reads 64 tokens in one sequence (8x8 grid" in result.stdout
    assert "sequencer2d_s: 27.63M parameters" in result.stdout
