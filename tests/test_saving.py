"""Save/load round trips and mixed precision."""

import keras
import numpy as np
import pytest

import keras_sequencer as ks
from conftest import run_model


def _small_model():
    return ks.Sequencer2D(
        layers=(2, 1), patch_sizes=(4, 2), embed_dims=(16, 24), hidden_sizes=(4, 6),
        mlp_ratios=(2.0, 3.0), rnn_type="lstm", drop_path_rate=0.1, input_shape=(24, 20, 3),
        classes=5, name="tiny",
    )


def test_keras_file_round_trip(tmp_path, rng):
    model = _small_model()
    x = rng.uniform(0, 255, (2, 24, 20, 3)).astype("float32")
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_array_equal(run_model(restored, x), run_model(model, x))
    assert restored.get_layer("stages_0_blocks_1").drop_path.rate == pytest.approx(0.05)


def test_full_size_keras_file_round_trip(tmp_path, rng):
    model = ks.Sequencer2DS(weights=None, input_shape=(28, 28, 3))
    path = tmp_path / "s.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    x = rng.uniform(0, 255, (1, 28, 28, 3)).astype("float32")
    np.testing.assert_array_equal(run_model(restored, x), run_model(model, x))


def test_weights_file_round_trip_through_builder(tmp_path, rng):
    model = _small_model()
    path = tmp_path / "tiny.weights.h5"
    model.save_weights(path)
    again = ks.Sequencer2D(
        layers=(2, 1), patch_sizes=(4, 2), embed_dims=(16, 24), hidden_sizes=(4, 6),
        mlp_ratios=(2.0, 3.0), input_shape=(24, 20, 3), classes=5, weights=str(path),
    )
    x = rng.uniform(0, 255, (2, 24, 20, 3)).astype("float32")
    np.testing.assert_array_equal(run_model(again, x), run_model(model, x))


def test_corrupt_weights_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.weights.h5"
    path.write_bytes(b"not an hdf5 file")
    with pytest.raises(ValueError, match="corrupt or not a Sequencer2D .weights.h5"):
        ks.Sequencer2DS(weights=str(path), input_shape=(28, 28, 3))


def test_weights_file_of_another_variant_names_it_in_one_line(tmp_path):
    path = tmp_path / "gru.weights.h5"
    ks.create_model("gru_sequencer2d_s", input_shape=(28, 28, 3)).save_weights(path)
    model = ks.Sequencer2DS(weights=None, input_shape=(28, 28, 3))
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ks.CheckpointMismatchError) as caught:
        ks.Sequencer2DS(weights=str(path), input_shape=(28, 28, 3))
    message = str(caught.value)
    assert "\n" not in message and len(message) < 300, message
    assert message.endswith("it looks like 'gru_sequencer2d_s'.")
    from keras_sequencer.weights import weights_loader

    with pytest.raises(ks.CheckpointMismatchError):
        weights_loader(str(path))(model)
    for a, b in zip(model.get_weights(), before):  # nothing half-loaded
        np.testing.assert_array_equal(a, b)


def test_mixed_bfloat16_builds_and_runs(rng):
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = ks.Sequencer2DS(weights=None, input_shape=(28, 28, 3))
        out = run_model(model, rng.uniform(0, 255, (2, 28, 28, 3)).astype("float32"))
    finally:
        keras.config.set_dtype_policy("float32")
    assert model.get_layer("stages_0_blocks_0").compute_dtype == "bfloat16"
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(out.sum(axis=-1), 1.0, atol=1e-3)


def test_save_and_load_after_the_fused_block_has_run(tmp_path, rng):
    """The torch whole-block form keeps per-layer state (its sublayers, weight
    copies); Keras' saver must not walk into it (it once recursed forever)."""
    model = ks.Sequencer2D(layers=(1, 1), patch_sizes=(4, 2), embed_dims=(16, 32), hidden_sizes=(8, 16),
                           mlp_ratios=(2.0, 2.0), input_shape=(32, 32, 3), classes=3)
    x = rng.uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    expected = run_model(model, x)  # the fused form runs (torch) and fills its caches
    model.save_weights(str(tmp_path / "m.weights.h5"))
    model.load_weights(str(tmp_path / "m.weights.h5"))
    model.save(str(tmp_path / "m.keras"))
    loaded = keras.models.load_model(str(tmp_path / "m.keras"))
    np.testing.assert_allclose(run_model(loaded, x), expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["int8"])
def test_quantized_model_saves_and_loads(mode, tmp_path, rng):
    """`model.quantize(...)` reaches every Dense of every block (the head, the
    MLPs and the fc after the recurrences), and the saved model rebuilds them
    quantized: its outputs come back exactly."""
    import warnings

    model = _small_model()
    for variable in model.weights:
        variable.assign(rng.normal(scale=0.3, size=variable.shape).astype(variable.dtype))
    x = rng.uniform(0, 255, size=(2, 24, 20, 3)).astype("float32")
    before = run_model(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras names every layer it cannot quantize (convs, norms)
        model.quantize(mode)
    dense = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.Dense)]
    assert len(dense) == 1 + 3 * sum(1 for layer in model.layers if isinstance(layer, ks.Sequencer2DBlock))
    assert all(layer.quantization_mode == mode for layer in dense), [
        (layer.path, layer.quantization_mode) for layer in dense
    ]
    quantized = run_model(model, x)
    assert 0 < np.abs(quantized - before).max() < 0.05 * np.abs(before).max()
    path = tmp_path / "quantized.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert all(layer.quantization_mode == mode for layer in loaded._flatten_layers()
               if isinstance(layer, keras.layers.Dense))
    np.testing.assert_array_equal(run_model(loaded, x), quantized)
