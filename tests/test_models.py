"""Builders, registry and keras.applications-style argument handling."""

import keras
import numpy as np
import pytest

import keras_sequencer as ks
from conftest import run_model

try:
    from reference import AUTHORS_VARIANTS
except ImportError:  # timm missing
    AUTHORS_VARIANTS = None


def test_registry_covers_every_authors_variant():
    if AUTHORS_VARIANTS is None:
        pytest.skip("timm is not installed")
    two_dim = {name for name, config in ks.registry.MODEL_CONFIGS.items() if config["family"] == "sequencer2d"}
    assert two_dim == set(AUTHORS_VARIANTS)
    vanilla = set(ks.list_models()) - two_dim
    assert vanilla == {"v_sequencer_s", "v_sequencer_s_h", "v_sequencer_s_pe"}


def test_parameter_count_of_s():
    model = ks.Sequencer2DS(weights=None, input_shape=(56, 56, 3))
    # timm's 27.65M minus one of PyTorch's two LSTM biases per direction.
    assert model.count_params() == 27_627_112


@pytest.mark.parametrize("name", ks.list_models())
def test_recurrent_layers_stay_cudnn_eligible(name):
    model = ks.create_model(name, input_shape=(28, 28, 3))
    recurrent = []
    for layer in model.layers:
        if isinstance(layer, ks.Sequencer2DBlock):
            recurrent += layer.rnn_tokens.recurrent_layers()
        elif isinstance(layer, ks.models.vanilla.VanillaSequencerBlock):
            recurrent += [layer.rnn_tokens.forward_layer, layer.rnn_tokens.backward_layer]
    assert recurrent
    for rnn in recurrent:
        cell = rnn.cell
        assert cell.activation is keras.activations.tanh
        if not isinstance(rnn, keras.layers.SimpleRNN):
            assert cell.recurrent_activation is keras.activations.sigmoid
            assert rnn.use_cudnn in ("auto", True)
        if isinstance(rnn, keras.layers.GRU):
            assert cell.reset_after
        assert cell.use_bias and not rnn.unroll
        assert cell.recurrent_dropout == 0 and cell.dropout == 0
    assert not any(isinstance(layer, keras.layers.Masking) for layer in model.layers)


def test_variant_argument_differences():
    gru = ks.create_model("gru_sequencer2d_s", input_shape=(28, 28, 3))
    block = gru.get_layer("stages_0_blocks_0").rnn_tokens
    assert block.rnn_type == "gru" and block.union == "cat"
    vertical = ks.create_model("sequencer2d_vertical", input_shape=(28, 28, 3))
    block = vertical.get_layer("stages_1_blocks_0").rnn_tokens
    assert block.rnn_h is None and block.fc is None and block.hidden_size == 192
    big = ks.create_model("sequencer2d_s_392", weights=None)
    assert big.input_shape == (None, 392, 392, 3)


def test_any_resolution_with_dynamic_input(rng):
    model = ks.create_model("sequencer2d_s", input_shape=(None, None, 3), classifier_activation=None)
    fixed = ks.create_model("sequencer2d_s", input_shape=(42, 70, 3), classifier_activation=None)
    fixed.set_weights(model.get_weights())
    x = rng.uniform(0, 255, (1, 42, 70, 3)).astype("float32")
    np.testing.assert_allclose(run_model(model, x), run_model(fixed, x), atol=1e-5)
    assert run_model(model, rng.uniform(0, 255, (1, 28, 28, 3)).astype("float32")).shape == (1, 1000)


def test_drop_path_schedule_is_linear_over_all_blocks():
    model = ks.create_model("sequencer2d_s", input_shape=(28, 28, 3), drop_path_rate=0.1)
    rates = [
        layer.drop_path.rate for layer in model.layers if isinstance(layer, ks.Sequencer2DBlock)
    ]
    total = 4 + 3 + 8 + 3
    assert rates == pytest.approx([0.1 * k / (total - 1) for k in range(total)])


def test_pooling_and_heads():
    kwargs = dict(weights=None, input_shape=(28, 28, 3))
    assert ks.Sequencer2DS(include_top=False, **kwargs).output_shape == (None, 2, 2, 384)
    assert ks.Sequencer2DS(include_top=False, pooling="avg", **kwargs).output_shape == (None, 384)
    assert ks.Sequencer2DS(include_top=False, pooling="max", **kwargs).output_shape == (None, 384)
    model = ks.Sequencer2DS(classes=7, **kwargs)
    assert model.output_shape == (None, 7)


def test_input_tensor():
    tensor = keras.Input((28, 28, 3))
    model = ks.Sequencer2DS(weights=None, input_tensor=tensor, include_top=False)
    assert model.inputs[0] is tensor


def test_softmax_outputs_probabilities(rng):
    model = ks.Sequencer2DS(weights=None, input_shape=(28, 28, 3), classes=5)
    probs = run_model(model, rng.uniform(0, 255, (2, 28, 28, 3)).astype("float32"))
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(weights="imagenet", classes=10), "`classes` should be 1000"),
        (dict(weights=None, input_shape=(64, 64, 1)), "3 input channels"),
        (dict(weights="imagenet", input_shape=(64, 64, 4)), "3 channels"),
        (dict(weights=None, input_shape=(13, 64, 3)), "at least 14x14"),
        (dict(weights=None, input_shape=(64, 64)), "three integers"),
        (dict(weights=None, include_top=False, pooling="mean"), "`pooling`"),
        (dict(weights="/no/such/file.weights.h5"), "no such file"),
        (dict(weights="imagenet-21k"), "The `weights` argument"),
    ],
)
def test_bad_builder_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ks.Sequencer2DS(**kwargs)


def test_any_channel_count_without_preprocessing_or_weights():
    model = ks.Sequencer2DS(weights=None, include_preprocessing=False, input_shape=(28, 28, 1))
    assert model.get_layer("stem").kernel.shape == (7, 7, 1, 192)


def test_generic_builder_and_errors():
    model = ks.Sequencer2D(
        layers=(1, 1), patch_sizes=(4, 2), embed_dims=(16, 32), hidden_sizes=(4, 8),
        mlp_ratios=(2, 2), input_shape=(32, 32, 3), classes=3,
    )
    assert model.output_shape == (None, 3)
    with pytest.raises(ValueError, match="same length"):
        ks.Sequencer2D(layers=(1, 1), patch_sizes=(4,), embed_dims=(16, 32),
                       hidden_sizes=(4, 8), mlp_ratios=(2, 2))
    with pytest.raises(ValueError, match="No ImageNet weights"):
        ks.create_model("sequencer2d_s_add", weights="imagenet")
    with pytest.raises(ValueError, match="Unknown model 'sequencer2d_xl'"):
        ks.create_model("sequencer2d_xl")


def test_every_sublayer_is_built_at_construction():
    # An unbuilt sublayer makes Keras run a first eager pass (very slow on JAX).
    model = ks.create_model("sequencer2d_s", input_shape=(28, 28, 3), drop_path_rate=0.1)
    assert all(layer.built for layer in model._flatten_layers())


def test_models_free_each_intermediate_after_its_last_use():
    # Keras' functional runner keeps every layer's output until the pass ends
    # (on torch: every block's output, 1.8x timm's peak memory at 896 px).
    import weakref

    from keras_sequencer.models import functional_model

    seen = {}

    class Probe(keras.layers.Layer):
        def __init__(self, role, **kwargs):
            super().__init__(**kwargs)
            self.role = role

        def call(self, x):
            if self.role == "record":
                y = x * 1.0
                seen["first"] = weakref.ref(y)
                return y
            seen["first_alive_at_end"] = seen["first"]() is not None
            return x

    inputs = keras.Input((4,))
    x = Probe("record", name="record")(inputs)
    x = keras.layers.Dense(3, name="middle")(x)
    outputs = Probe("check", name="check")(x)
    model = functional_model(inputs, outputs, "probe")
    if keras.backend.backend() == "torch":  # else autograd keeps what Dense will need
        import torch

        with torch.inference_mode():
            y = model(np.ones((2, 4), "float32"))
    else:
        y = model(np.ones((2, 4), "float32"))
    assert y.shape == (2, 3)
    assert seen["first_alive_at_end"] is False
    plain = keras.Model(inputs, outputs)
    plain(np.ones((2, 4), "float32"))
    assert seen["first_alive_at_end"] is True  # what Keras' own runner does
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(plain(np.ones((2, 4), "float32"))), keras.ops.convert_to_numpy(y)
    )


def test_predict_and_predict_on_batch_equal_a_direct_call(rng):
    # FreeingFunctional's own predict_step: each backend's step signature
    # (JAX's takes the state too) passes through.
    model = ks.Sequencer2D(
        layers=[1], patch_sizes=[2], embed_dims=[8], hidden_sizes=[4], mlp_ratios=[2],
        input_shape=(8, 8, 3), include_preprocessing=False, classes=3,
    )
    x = rng.normal(size=(4, 8, 8, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_allclose(model.predict_on_batch(x), expected, atol=1e-6)
    np.testing.assert_allclose(model.predict(x, verbose=0, batch_size=2), expected, atol=1e-6)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch's inference mode")
def test_predict_runs_in_inference_mode_on_torch_and_the_model_still_trains(rng):
    """`predict` and `predict_on_batch` run under torch's inference mode (Keras'
    own step only disables autograd); direct calls and training are untouched
    (compiled predicts: tests/test_routes.py). Tensors kept between calls (the
    fused route's weight copies) must not become inference tensors: the model
    still trains after a predict, and predicts what it now computes."""
    import torch

    modes = []

    class Probe(keras.layers.Layer):
        def call(self, x):
            modes.append(torch.is_inference_mode_enabled())
            return x

    model = ks.Sequencer2D(
        layers=[1], patch_sizes=[2], embed_dims=[8], hidden_sizes=[4], mlp_ratios=[2],
        input_shape=(8, 8, 3), include_preprocessing=False, classes=3, rnn_route="fused",
    )
    inputs = keras.Input((8, 8, 3))
    probed = ks.models.functional_model(inputs, model(Probe()(inputs)), "probed")
    modes.clear()  # the symbolic calls of building
    x = rng.normal(size=(4, 8, 8, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, 4), 3)
    first = probed.predict_on_batch(x)
    np.testing.assert_allclose(first, probed.predict(x, verbose=0), atol=1e-6)
    np.testing.assert_allclose(first, keras.ops.convert_to_numpy(probed(x, training=False)), atol=1e-6)
    assert modes == [True, True, False]
    probed.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    probed.fit(x, y, epochs=2, batch_size=4, verbose=0)
    assert len(modes) > 4 and not any(modes[3:])
    del modes[:]
    after = probed.predict_on_batch(x)
    assert np.abs(after - first).max() > 1e-3  # it learned
    np.testing.assert_allclose(after, keras.ops.convert_to_numpy(probed(x, training=False)), atol=1e-6)
    assert modes == [True, False]


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="Keras' compiled JAX steps")
@pytest.mark.parametrize("without_ynnpack", [True, False])
def test_compiled_jax_steps_take_the_models_xla_options(rng, tmp_path, monkeypatch, without_ynnpack):
    """evaluate and predict compile with jax_compiler_options: where it turns
    YNNPACK off (AMX CPUs), XLA's optimized predict and test steps hold no
    YNNPACK fusion; left on, they hold one wherever this XLA sends a plain
    product to YNNPACK, as fit's train step always does. Predictions equal a
    direct call either way. XLA dumps its optimized modules through the same
    options, so fit's step is compiled with a dump of its own."""
    import jax

    from keras_sequencer import keras_compat
    from keras_sequencer.models import base

    monkeypatch.setattr(base, "JAX_WITHOUT_YNNPACK", without_ynnpack)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    options = base.jax_compiler_options()
    assert bool(options) == without_ynnpack and jax.default_backend() == "cpu"
    dump = tmp_path / "xla"
    monkeypatch.setattr(base, "jax_compiler_options", lambda: {**options, "xla_dump_to": str(dump)})
    model = ks.Sequencer2D(
        layers=[1], patch_sizes=[2], embed_dims=[16], hidden_sizes=[8], mlp_ratios=[2],
        input_shape=(16, 16, 3), include_preprocessing=False, classes=10,
    )
    x = rng.normal(size=(4, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 10, 4)
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_allclose(model.predict_on_batch(x), expected, atol=1e-5)
    model.compile(optimizer="adamw", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.evaluate(x, y, verbose=0)
    with keras_compat.jax_steps_compiled_with({"xla_dump_to": str(dump)}):
        model.fit(x, y, epochs=1, verbose=0)

    def fused_by_ynnpack(step):
        (module,) = dump.glob(f"*jit_{step}*after_optimizations.txt")
        return "__ynn_fusion" in module.read_text()

    a = np.ones((64, 32), "float32")
    plain_product = jax.jit(lambda a, b: a @ b).lower(a, a.T).compile()
    ynnpack_default = "__ynn_fusion" in plain_product.as_text()
    for step in ("predict_step", "test_step"):
        assert fused_by_ynnpack(step) == (ynnpack_default and not without_ynnpack), step
    assert fused_by_ynnpack("train_step") == ynnpack_default
