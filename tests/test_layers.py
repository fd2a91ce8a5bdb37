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


def _conv_pair(rng, patch, filters=6, channels=5, **kwargs):
    """A PatchConv2D and a keras Conv2D with the same kernel and bias."""
    options = dict(strides=patch, padding="valid", **kwargs)
    conv, reference = ks.layers.PatchConv2D(filters, patch, **options), keras.layers.Conv2D(filters, patch, **options)
    for layer in (conv, reference):
        layer.build((None, None, None, channels))
    weights = [rng.normal(size=w.shape).astype("float32") for w in conv.get_weights()]
    conv.set_weights(weights)
    reference.set_weights(weights)
    return conv, reference


@pytest.mark.parametrize(
    "patch, size, kwargs",
    [(7, 30, {}), (2, 8, {}), ((2, 3), (8, 9), {}), (1, 5, {}), (2, 8, dict(use_bias=False, activation="relu"))],
)
def test_patch_conv_equals_conv2d_with_its_gradients(patch, size, kwargs, rng):
    """Outputs and every gradient: 30 px with 7 px patches drops a remainder as
    "valid" padding does."""
    height, width = (size, size) if isinstance(size, int) else size
    conv, reference = _conv_pair(rng, patch, **kwargs)
    x = rng.normal(size=(2, height, width, 5)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(conv(x)), keras.ops.convert_to_numpy(reference(x)),
                               atol=1e-5)
    if keras.backend.backend() == "torch":
        import torch

        grads = []
        for layer in (conv, reference):
            inputs = torch.tensor(x, requires_grad=True)
            (layer(inputs) ** 2).sum().backward()
            grads.append([inputs.grad.numpy()] + [w.value.grad.numpy() for w in layer.trainable_weights])
            for w in layer.trainable_weights:
                w.value.grad = None
        for a, b in zip(*grads):
            # float32 sums of ~500 in another order: relative 1e-6 on AMD CPUs
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
        assert conv._patch_product_applies(torch.tensor(x))


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="the patch product is torch's")
def test_patch_conv_takes_the_product_only_where_it_equals_a_tiling_conv(rng):
    import torch

    x = torch.zeros((1, 8, 8, 5))
    for kwargs in (dict(strides=1), dict(strides=2, padding="same"), dict(strides=1, dilation_rate=2)):
        conv = ks.layers.PatchConv2D(4, 2, **{**dict(strides=2), **kwargs})
        conv.build((None, None, None, 5))
        assert not conv._patch_product_applies(x)
        assert tuple(conv(x).shape) == tuple(keras.layers.Conv2D(4, 2, **kwargs)(x).shape)


def test_patch_conv_under_mixed_precision_and_lora(rng):
    conv, reference = _conv_pair(rng, 2, dtype="mixed_bfloat16")
    x = rng.normal(size=(2, 8, 8, 5)).astype("float32")
    y = conv(x)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.ops.cast(y, "float32")),
                               keras.ops.convert_to_numpy(keras.ops.cast(reference(x), "float32")), atol=0.1)
    conv, reference = _conv_pair(rng, 2)
    for layer in (conv, reference):
        layer.enable_lora(2)
        layer.lora_kernel_b.assign(np.full(layer.lora_kernel_b.shape, 0.3, "float32"))
    conv.lora_kernel_a.assign(keras.ops.convert_to_numpy(reference.lora_kernel_a))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(conv(x)), keras.ops.convert_to_numpy(reference(x)),
                               atol=1e-5)


def test_patch_conv_config_round_trip(rng):
    conv, _ = _conv_pair(rng, 2)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(conv))
    assert type(clone) is ks.layers.PatchConv2D and clone.get_config() == conv.get_config()
