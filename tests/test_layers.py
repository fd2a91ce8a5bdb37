"""BiLSTM2D, Sequencer2DBlock and DropPath on their own."""

import keras
import numpy as np
import pytest

import keras_sequencer as ks


def test_bilstm2d_argument_errors_match_the_reference():
    with pytest.raises(ValueError, match="Unrecognized union: diagonal"):
        ks.BiLSTM2D(8, union="diagonal")
    with pytest.raises(ValueError, match="Unrecognized rnn_type"):
        ks.BiLSTM2D(8, rnn_type="transformer")
    layer = ks.BiLSTM2D(8, with_fc=False)  # 2 axes * 2 directions * 8 = 32 channels
    with pytest.raises(ValueError, match="The output channel 32 is different from the input channel 24"):
        layer.build((None, 4, 4, 24))
    ks.BiLSTM2D(8, with_fc=False).build((None, 4, 4, 32))


@pytest.mark.parametrize(
    "kwargs, channels",
    [
        (dict(), 12),
        (dict(union="add", with_fc=False), 16),
        (dict(union="vertical"), 12),
        (dict(bidirectional=False, rnn_type="gru"), 12),
        (dict(rnn_type="rnn", union="horizontal", with_fc=False), 16),
    ],
)
def test_bilstm2d_shapes_and_config_round_trip(kwargs, channels, rng):
    layer = ks.BiLSTM2D(8, **kwargs)
    x = rng.normal(size=(2, 3, 5, channels)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x))
    assert y.shape == (2, 3, 5, channels)
    clone = ks.BiLSTM2D.from_config(layer.get_config())
    clone.build(x.shape)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(clone(x)), y, atol=1e-6)


def test_bilstm2d_vertical_runs_down_columns(rng):
    # Permuting rows must not change a horizontal-only layer's per-row output.
    layer = ks.BiLSTM2D(4, union="horizontal", with_fc=False)
    x = rng.normal(size=(1, 3, 5, 8)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x))
    y_perm = keras.ops.convert_to_numpy(layer(x[:, ::-1]))
    np.testing.assert_allclose(y_perm, y[:, ::-1], atol=1e-6)
    vertical = ks.BiLSTM2D(4, union="vertical", with_fc=False)
    yv = keras.ops.convert_to_numpy(vertical(x))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(vertical(x[:, :, ::-1])), yv[:, :, ::-1], atol=1e-6)


def test_drop_path_is_per_sample_and_identity_at_inference():
    layer = ks.DropPath(0.5, seed=3)
    x = np.ones((256, 2, 2, 3), dtype="float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x, training=False)), x)
    y = keras.ops.convert_to_numpy(layer(x, training=True))
    per_sample = y.reshape(256, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert (per_sample.min(axis=1) == per_sample.max(axis=1)).all()  # whole sample kept or dropped
    kept = (per_sample[:, 0] > 0).mean()
    assert 0.35 < kept < 0.65
    with pytest.raises(ValueError, match="rate"):
        ks.DropPath(1.0)


def test_block_config_round_trip(rng):
    block = ks.Sequencer2DBlock(4, mlp_ratio=2.0, rnn_type="gru", drop_path_rate=0.2)
    x = rng.normal(size=(2, 3, 3, 8)).astype("float32")
    y = keras.ops.convert_to_numpy(block(x))
    clone = ks.Sequencer2DBlock.from_config(block.get_config())
    clone.build(x.shape)
    clone.set_weights(block.get_weights())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(clone(x)), y, atol=1e-6)
    assert clone.get_config()["drop_path_rate"] == 0.2


@pytest.mark.parametrize("rnn_type", ["lstm", "gru", "rnn"])
def test_recurrent_weights_start_as_timms(rnn_type):
    # timm (and torch.nn.LSTM) draw every RNN weight from U(-1/sqrt(h), 1/sqrt(h));
    # PyTorch's two biases add up to Keras' one (GRU keeps both as two rows).
    hidden = 512  # enough bias samples for a 15% bound to hold at > 5 sigma
    limit = 1.0 / np.sqrt(hidden)
    layer = ks.layers.make_recurrent_layer(rnn_type, hidden, name="rnn")
    layer.build((None, None, 64))
    cell = layer.cell
    for weight in (cell.kernel, cell.recurrent_kernel):
        w = keras.ops.convert_to_numpy(weight)
        assert np.abs(w).max() <= limit
        assert abs(w.std() / (limit / np.sqrt(3)) - 1) < 0.05
    bias = keras.ops.convert_to_numpy(cell.bias)
    if rnn_type == "gru":
        assert bias.shape == (2, 3 * hidden) and np.abs(bias).max() <= limit
        return
    assert np.abs(bias).max() <= 2 * limit
    assert abs(bias.std() / (limit * np.sqrt(2 / 3)) - 1) < 0.15  # sum of two uniforms
    if rnn_type == "lstm":  # no Keras unit forget bias: the forget gate starts near 0
        assert abs(bias[hidden : 2 * hidden].mean()) < limit / 2


@pytest.mark.skipif(keras.backend.backend() == "tensorflow", reason="TensorFlow is the backend here")
def test_jax_and_torch_models_leave_tensorflow_unimported(tmp_path):
    # Keras' serializer imports TensorFlow where installed (3 s of a cold start);
    # building and running a model on another backend must not need it.
    import os
    import subprocess
    import sys

    script = (
        "import sys, numpy as np, keras_sequencer as ks\n"
        "m = ks.Sequencer2D(layers=[1], patch_sizes=[2], embed_dims=[8], hidden_sizes=[4],\n"
        "                   mlp_ratios=[2.0], input_shape=(4, 4, 3), classes=3, weights=None)\n"
        "m.predict(np.zeros((1, 4, 4, 3), 'float32'), verbose=0)\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    env = {**os.environ, "KERAS_BACKEND": keras.backend.backend()}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env, timeout=300)
