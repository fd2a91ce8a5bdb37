"""BiLSTM2D's routes: which loop runs, and that every route computes the same
outputs and gradients from the same variables."""

import keras
import numpy as np
import pytest

import keras_sequencer as ks
from keras_sequencer.tasks.export import portable_recurrences

BACKEND = keras.backend.backend()
TOLERANCE = 1e-5


def _has_fused(rnn_type):
    return BACKEND == "torch" or (BACKEND in ("tensorflow", "jax") and rnn_type == "lstm")


def _expected_auto_route(rnn_type="lstm"):
    if not _has_fused(rnn_type):
        return "keras"
    if BACKEND == "torch":
        return "fused"  # cuDNN on a GPU, as Keras' loop
    if BACKEND == "jax":
        import jax

        return "keras" if any(d.platform == "gpu" for d in jax.devices()) else "fused"
    import tensorflow as tf

    return "keras" if tf.config.list_physical_devices("GPU") else "fused"


def test_auto_route_is_selected_and_visible_in_the_config():
    layer = ks.BiLSTM2D(4)
    assert layer.route == "auto" and layer.get_config()["route"] == "auto"
    assert layer.selected_route == _expected_auto_route()
    forced = ks.BiLSTM2D.from_config({**layer.get_config(), "route": "keras"})
    assert forced.selected_route == "keras" and forced.get_config()["route"] == "keras"
    block = ks.Sequencer2DBlock(4, rnn_route="keras")
    assert block.get_config()["rnn_route"] == "keras"
    assert ks.Sequencer2DBlock.from_config(block.get_config()).rnn_tokens.selected_route == "keras"


def test_auto_route_on_a_gpu(monkeypatch):
    """On a GPU torch's fused kernel is cuDNN, as Keras' own loop there: "auto"
    stays fused (one layer call per block); TensorFlow and JAX keep Keras'
    cuDNN LSTMs."""
    monkeypatch.setattr(ks.layers, "has_gpu", lambda: True)
    expected = "fused" if BACKEND == "torch" else "keras"
    assert ks.BiLSTM2D(4).selected_route == expected
    assert ks.Sequencer2DBlock(4).rnn_tokens.selected_route == expected


def test_route_errors():
    with pytest.raises(ValueError, match="Unrecognized route: 'cudnn'"):
        ks.BiLSTM2D(4, route="cudnn")
    with pytest.raises(ValueError, match="Unrecognized route"):
        ks.Sequencer2DS(weights=None, rnn_route="fast")
    for rnn_type in ("lstm", "gru", "rnn"):
        assert ks.BiLSTM2D(4, rnn_type=rnn_type).selected_route == _expected_auto_route(rnn_type)
        if not _has_fused(rnn_type):
            with pytest.raises(ValueError, match="route='fused' needs a fused recurrent kernel"):
                ks.BiLSTM2D(4, rnn_type=rnn_type, route="fused")
    layer = ks.BiLSTM2D(4)
    with pytest.raises(ValueError, match="Unrecognized route"):
        layer.route = "nope"
    assert layer.route == "auto"  # a rejected override leaves the layer as it was


def test_route_overridden_per_layer_and_restored_around_export():
    model = ks.Sequencer2D(
        layers=[1, 1], patch_sizes=[4, 2], embed_dims=[8, 16], hidden_sizes=[4, 8],
        mlp_ratios=[2, 2], input_shape=(16, 16, 3), rnn_route="keras",
    )
    blocks = [layer for layer in model.layers if isinstance(layer, ks.Sequencer2DBlock)]
    assert [b.rnn_tokens.selected_route for b in blocks] == ["keras", "keras"]
    blocks[1].rnn_tokens.route = "auto"
    assert blocks[1].rnn_tokens.selected_route == _expected_auto_route()
    assert blocks[1].get_config()["rnn_route"] == "auto"
    with portable_recurrences(model):
        assert [b.rnn_tokens.selected_route for b in blocks] == ["keras", "keras"]
    assert [b.rnn_tokens.route for b in blocks] == ["keras", "auto"]


def _outputs_and_gradients(layer, x, weights, training=None):
    """The layer's output and the gradients of sum(output * weights) with respect
    to the input and every trainable variable, as numpy. `training` reaches
    TensorFlow's traced call (its fused route trains in a form of its own)."""
    variables = layer.trainable_variables
    if BACKEND == "torch":
        import torch

        inputs = torch.from_numpy(x).requires_grad_(True)
        outputs = layer(inputs)
        grads = torch.autograd.grad(
            (outputs * torch.from_numpy(weights)).sum(), [inputs] + [v.value for v in variables]
        )
        return [outputs.detach().numpy()] + [g.numpy() for g in grads]
    if BACKEND == "jax":
        import jax

        def loss(inputs, trainable):
            outputs, _ = layer.stateless_call(trainable, [v.value for v in layer.non_trainable_variables], inputs)
            return (outputs * weights).sum(), outputs

        # Jitted, as predict and fit run it.
        (_, outputs), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
            x, [v.value for v in variables]
        )
        return [np.asarray(outputs), np.asarray(grads[0])] + [np.asarray(g) for g in grads[1]]
    import tensorflow as tf

    inputs = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        outputs = tf.function(layer)(inputs, training=training)  # traced, as predict and fit run it
        loss = tf.reduce_sum(outputs * weights)
    grads = tape.gradient(loss, [inputs] + [v.value for v in variables])
    return [outputs.numpy()] + [g.numpy() for g in grads]


FUSED_CASES = [
    dict(rnn_type="lstm"),
    dict(rnn_type="lstm", bidirectional=False, union="add"),
    dict(rnn_type="lstm", union="vertical"),
    dict(rnn_type="gru"),
    dict(rnn_type="gru", bidirectional=False, union="vertical"),
    dict(rnn_type="rnn", union="horizontal"),
    dict(rnn_type="rnn", bidirectional=False),
]


# Not square (H and W differ); on torch sequences of up to
# layers.UNROLL_MAX_STEPS run unrolled, longer ones through ATen's kernel.
GRIDS = [(5, 7), (2, 1), (1, 7)]


def _flows(name, grid):
    """Whether a gradient reaches this variable: not a recurrent kernel over
    one-step sequences (zero state in, so its gradient is exactly zero)."""
    steps = grid[0] if "rnn_v" in name else grid[1]
    return not ("recurrent_kernel" in name and steps == 1)


# TensorFlow's fused route has three forms: in inference sequences of up to
# layers.TENSORFLOW_UNROLL_MAX_STEPS steps as an XLA-compiled unrolled
# recurrence, longer ones through BlockLSTM; in training ("trained") short
# sequences (float32, or bfloat16 on CPUs with bfloat16 instructions) as
# tensorflow_trained_lstm, the rest through BlockLSTM. A limit of 0 puts every
# sequence on BlockLSTM and TENSORFLOW_TRAINS_UNROLLED pins the training form,
# so every form meets the same checks on small grids, in any dtype, on any CPU.
FUSED_FORMS = ["unrolled", "block", "trained"] if BACKEND == "tensorflow" else ["unrolled"]


@pytest.fixture(params=FUSED_FORMS)
def fused_form(request, monkeypatch):
    from keras_sequencer import layers as layers_module

    if request.param == "block":
        monkeypatch.setattr(layers_module, "TENSORFLOW_UNROLL_MAX_STEPS", 0)
    monkeypatch.setattr(layers_module, "TENSORFLOW_TRAINS_UNROLLED", request.param == "trained")
    # JAX's fused route scans axes of layers.JAX_FUSED_MIN_SEQUENCES sequences
    # or more; these small maps have fewer, so every axis is made to qualify.
    monkeypatch.setattr(layers_module, "JAX_FUSED_MIN_SEQUENCES", 0)
    return request.param


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("kwargs", FUSED_CASES)
def test_fused_route_matches_keras_route_with_gradients(kwargs, grid, rng, fused_form):
    if not _has_fused(kwargs["rnn_type"]):
        pytest.skip(f"no fused {kwargs['rnn_type']} kernel on {BACKEND}")
    layer = ks.BiLSTM2D(6, **kwargs)
    x = rng.normal(size=(2, *grid, 10)).astype("float32")
    layer.build(x.shape)
    for variable in layer.trainable_variables:  # non-zero biases, both GRU bias rows
        variable.assign(rng.normal(scale=0.4, size=variable.shape).astype("float32"))
    weights = rng.normal(size=x.shape).astype("float32")

    results = {}
    for route in ("fused", "keras"):
        layer.route = route
        results[route] = _outputs_and_gradients(layer, x, weights, training=fused_form == "trained")
    names = ["outputs", "d inputs"] + [v.path for v in layer.trainable_variables]
    for name, fused, reference in zip(names, results["fused"], results["keras"]):
        assert _flows(name, grid) == (np.abs(reference).max() > 1e-3), name  # the gradient really flows
        diff = np.abs(fused - reference).max()
        assert diff <= TOLERANCE, (name, diff)


@pytest.mark.skipif(BACKEND != "torch", reason="torch's square unrolled form")
@pytest.mark.parametrize("side", [1, 2])
def test_torch_square_maps_step_all_four_lstms_together(side, rng):
    """Inference on a square map of up to layers.UNROLL_MAX_STEPS rows runs the
    four LSTMs of a BiLSTM2D together (layers._unrolled_torch_bilstm2d): the
    Keras route's outputs, and again after the weights change (the stacked
    copies are rebuilt)."""
    import torch
    from keras_sequencer import layers as layers_module

    layer = ks.BiLSTM2D(6)
    x = torch.tensor(rng.normal(size=(3, side, side, 10)).astype("float32"))
    layer.build(tuple(x.shape))
    for attempt in range(2):
        for variable in layer.trainable_variables:
            variable.assign(rng.normal(scale=0.4, size=variable.shape).astype("float32"))
        results = {}
        for route in ("fused", "keras"):
            layer.route = route
            with torch.inference_mode():
                results[route] = layer(x).numpy()
        with torch.inference_mode():
            assert layers_module._square_unrolls(layer, x)
        assert np.abs(results["fused"] - results["keras"]).max() <= TOLERANCE


def _small_classifier(policy="float32"):
    """A one-block Sequencer2D on the fused route for 8x8 inputs and 3 classes,
    built under `policy` (the global policy is restored)."""
    keras.config.set_dtype_policy(policy)
    try:
        return ks.Sequencer2D(
            layers=[1], patch_sizes=[2], embed_dims=[8], hidden_sizes=[4], mlp_ratios=[2],
            input_shape=(8, 8, 3), include_preprocessing=False, classes=3, rnn_route="fused",
        )
    finally:
        keras.config.set_dtype_policy("float32")


def test_fused_route_trains_a_model(rng, fused_form):
    model = _small_classifier()
    assert model.get_layer("stages_0_blocks_0").rnn_tokens.selected_route == "fused"
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    x = rng.normal(size=(32, 8, 8, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, 32), 3)
    kernel = model.get_layer("stages_0_blocks_0").rnn_tokens.rnn_v.forward_layer.cell.kernel
    before = keras.ops.convert_to_numpy(kernel).copy()
    history = model.fit(x, y, epochs=8, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert np.abs(keras.ops.convert_to_numpy(kernel) - before).max() > 0  # the LSTM learned


# TensorFlow's bfloat16 products have two forms (layers.
# tensorflow_plain_bfloat16_products): plain MatMuls with the biases and GELU
# in XLA (AMX CPUs), or MatMul+BiasAdd for TensorFlow's oneDNN fusions. Tests
# pin each, whatever this CPU would pick.
MIXED_FORMS = [("mixed_bfloat16", False), ("mixed_bfloat16", True), ("mixed_float16", False)]


def _mixed_form_id(form):
    policy, plain = form
    return f"{policy}-plain_products" if plain else policy


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's fused route under mixed precision")
@pytest.mark.parametrize("policy,plain", MIXED_FORMS, ids=[_mixed_form_id(f) for f in MIXED_FORMS])
def test_mixed_precision_fused_route_on_tensorflow_keeps_the_state_in_float32(policy, plain, rng, fused_form,
                                                                              monkeypatch):
    """No bfloat16/float16 BlockLSTM on CPU: the fused route runs the float32
    kernel on the float32 variables inside a mixed-precision layer (the
    unrolled and trained forms: products from the compute dtype, state in
    float32). Outputs and gradients within the compute dtype's rounding of the
    float32 layer's (the block's fused MLP included), with either form of the
    products."""
    import tensorflow as tf

    from keras_sequencer import layers as layers_module

    monkeypatch.setattr(layers_module, "TENSORFLOW_PLAIN_BFLOAT16_PRODUCTS", plain)
    x = rng.normal(size=(2, 5, 7, 10)).astype("float32")
    exact = _block(rng, rnn_route="fused")
    mixed = ks.Sequencer2DBlock(6, mlp_ratio=2.0, rnn_route="fused", dtype=policy)
    mixed.build(x.shape)
    for source, target in zip(exact.weights, mixed.weights):
        target.assign(source)
    loss_weights = tf.constant(rng.normal(size=x.shape).astype("float32"))

    def traced(block):
        inputs = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = tf.function(lambda a: block(a, training=fused_form == "trained"))(inputs)
            loss = tf.reduce_sum(tf.cast(outputs, "float32") * loss_weights)
        grads = tape.gradient(loss, [inputs] + block.trainable_variables)
        return outputs, [tf.cast(g, "float32").numpy() for g in grads]

    expected, expected_grads = traced(exact)
    outputs, grads = traced(mixed)
    assert outputs.dtype == policy.split("_")[1]
    got, expected = tf.cast(outputs, "float32").numpy(), expected.numpy()
    assert np.abs(got - expected).max() <= np.abs(expected).max() * 2.0**-6
    # Gradients (ERF maps take them in traced inference): within 16 roundings
    # of the compute dtype (measured: 2^-4.5 for bfloat16, 2^-8.8 for float16).
    rounding = 2.0**-8 if policy == "mixed_bfloat16" else 2.0**-11
    for name, g, e in zip(["inputs"] + [v.path for v in mixed.trainable_variables], grads, expected_grads):
        assert np.abs(g - e).max() <= 16 * rounding * np.abs(e).max(), name


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's bfloat16 products")
@pytest.mark.parametrize("plain", [False, True], ids=["bias_add", "plain_products"])
def test_tensorflow_plain_bfloat16_products_leave_no_bias_on_a_matmul(plain, rng, monkeypatch):
    """TensorFlow hands a MatMul followed by a BiasAdd (or an Add of a bias) to
    oneDNN's inner product, whose bfloat16 form runs without AMX. In the plain
    form no product of a mixed_bfloat16 block in traced inference feeds a bias
    op: the biases and GELU are XLA calls. In the other form the input
    projection and both MLP products feed BiasAdds, for TensorFlow to fuse."""
    from keras_sequencer import layers as layers_module

    monkeypatch.setattr(layers_module, "TENSORFLOW_PLAIN_BFLOAT16_PRODUCTS", plain)
    block = ks.Sequencer2DBlock(6, mlp_ratio=2.0, rnn_route="fused", dtype="mixed_bfloat16")
    x = rng.normal(size=(2, 5, 7, 10)).astype("float32")
    block.build(x.shape)
    operations = _traced_operations(lambda a: block(a, training=False), x)
    bias_ops = ("BiasAdd", "AddV2", "Add")
    biased = [op.name for op in operations if op.type in bias_ops and op.inputs[0].op.type == "MatMul"]
    compiled = _xla_compiled_functions(operations)
    if plain:
        assert biased == []
        assert sum("bias_gelu" in name for name in compiled) == 1, compiled
    else:
        assert len(biased) == 4, biased  # two axes' projections, fc1, fc2
        assert not any("bias_gelu" in name for name in compiled), compiled


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's bfloat16 products")
def test_tensorflow_bias_gelu_and_bias_gradients_are_autodiffs(rng):
    """The plain-product MLP's XLA bias + GELU and bias add carry gradients of
    their own (the bias's as a product with a row of ones): in float32 equal
    to TensorFlow's autodiff of the same formulas to 1e-5 of their scale."""
    import tensorflow as tf

    from keras_sequencer import layers as layers_module

    y = tf.constant(rng.normal(scale=2.0, size=(3, 5, 12)).astype("float32"))
    bias = tf.constant(rng.normal(size=(12,)).astype("float32"))
    upstream = tf.constant(rng.normal(size=(3, 5, 12)).astype("float32"))
    pairs = [
        (layers_module._bias_gelu, lambda a, b: layers_module._erf_gelu(a + b)),
        (layers_module._bias_add, lambda a, b: a + b),
    ]
    for fn, formula in pairs:
        results = []
        for f in (tf.function(fn), formula):
            with tf.GradientTape() as tape:
                tape.watch([y, bias])
                outputs = f(y, bias)
            results.append([outputs, *tape.gradient(outputs, [y, bias], output_gradients=upstream)])
        for name, a, b in zip(["outputs", "d y", "d bias"], *results):
            assert np.abs(a.numpy() - b.numpy()).max() <= TOLERANCE * np.abs(b.numpy()).max(), (fn.__name__, name)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's bfloat16 products")
def test_tensorflow_plain_bfloat16_block_trains_as_keras_layers_do(rng, monkeypatch):
    """In traced training a mixed_bfloat16 block with plain products (MatMuls,
    the biases and GELU in XLA) gives the output and every gradient of the same
    block through Keras' Dense layers, within bfloat16's rounding."""
    from keras_sequencer import layers as layers_module

    monkeypatch.setattr(layers_module, "TENSORFLOW_PLAIN_BFLOAT16_PRODUCTS", True)
    block = _block(rng, hidden=4, rnn_route="fused", dtype="mixed_bfloat16")
    x = rng.normal(size=(2, 5, 7, 10)).astype("float32")
    weights = rng.normal(size=x.shape).astype("float32")
    plain = _outputs_and_gradients(block, x, weights, training=True)
    monkeypatch.setattr(layers_module, "tensorflow_fused_mlp_applies", lambda *args: False)
    expected = _outputs_and_gradients(block, x, weights, training=True)
    names = ["outputs", "d inputs"] + [v.path for v in block.trainable_variables]
    assert any("fc1/bias" in name for name in names) and any("fc2/bias" in name for name in names)
    for name, a, b in zip(names, plain, expected):
        a, b = a.astype("float32"), b.astype("float32")
        assert np.abs(b).max() > 1e-3, name
        assert np.abs(a - b).max() <= 16 * 2.0**-8 * np.abs(b).max(), (name, np.abs(a - b).max())


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's bfloat16 products")
@pytest.mark.parametrize("policy", ["mixed_bfloat16", "float32"])
def test_tensorflow_plain_bfloat16_block_joins_biases_and_residuals(policy, rng, monkeypatch):
    """With plain bfloat16 products a block in traced inference adds the
    mixer's fc bias, the residual and the second LayerNorm in one XLA call,
    and fc2's bias with the residual in another, rounding as the per-layer
    form does (equal outputs). float32 keeps oneDNN's bias fusions."""
    import tensorflow as tf

    from keras_sequencer import layers as layers_module

    monkeypatch.setattr(layers_module, "TENSORFLOW_PLAIN_BFLOAT16_PRODUCTS", True)
    block = ks.Sequencer2DBlock(6, mlp_ratio=2.0, rnn_route="fused", dtype=policy)
    x = rng.normal(size=(2, 5, 7, 10)).astype("float32")
    block.build(x.shape)
    for variable in block.trainable_variables:
        variable.assign(rng.normal(scale=0.4, size=variable.shape).astype("float32"))
    compiled = _xla_compiled_functions(_traced_operations(lambda a: block(a, training=False), x))
    joined = [name for name in compiled if "bias_residual" in name]
    # Traced for any batch size, as evaluate and fit's validation trace it.
    any_batch = [tf.TensorSpec((None, *x.shape[1:]), "float32")]
    outputs = tf.function(lambda a: block(a, training=False), input_signature=any_batch)(x)
    monkeypatch.setattr(layers_module, "tensorflow_fused_block_applies", lambda *args: False)
    expected = tf.function(lambda a: block(a, training=False), input_signature=any_batch)(x)
    if policy == "float32":
        assert joined == []
        return
    assert len(joined) == 2 and sum("bias_residual_norm" in name for name in joined) == 1, compiled
    assert outputs.dtype == expected.dtype == tf.bfloat16
    np.testing.assert_array_equal(tf.cast(outputs, "float32").numpy(), tf.cast(expected, "float32").numpy())


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """A file that stands in for Linux's /proc/cpuinfo while the test runs."""
    import builtins

    real_open = builtins.open
    path = tmp_path / "cpuinfo"

    def fake_open(name, *args, **kwargs):
        return real_open(path if name == "/proc/cpuinfo" else name, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    return path


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's bfloat16 products")
def test_tensorflow_plain_bfloat16_products_follow_the_cpu(cpuinfo, monkeypatch):
    """Plain bfloat16 products where oneDNN has AMX (the CPU's flag, unless
    ONEDNN_MAX_CPU_ISA caps it below AMX), for bfloat16 only; the module
    switch overrides the CPU."""
    from keras_sequencer import layers as layers_module

    has_amx = layers_module.cpu_has_amx.__wrapped__  # uncached
    for isa in (None, "AVX512_CORE_BF16", "AVX512_CORE_AMX", "ALL"):
        if isa is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
        monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
        cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n")
        assert has_amx() == (isa != "AVX512_CORE_BF16"), isa
        cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
        assert not has_amx(), isa
    cpuinfo.unlink()
    assert not has_amx()  # no /proc/cpuinfo: not Linux

    monkeypatch.setattr(layers_module, "cpu_has_amx", lambda: True)
    assert layers_module.tensorflow_plain_bfloat16_products("bfloat16")
    assert not layers_module.tensorflow_plain_bfloat16_products("float32")
    assert not layers_module.tensorflow_plain_bfloat16_products("float16")
    monkeypatch.setattr(layers_module, "TENSORFLOW_PLAIN_BFLOAT16_PRODUCTS", False)
    assert not layers_module.tensorflow_plain_bfloat16_products("bfloat16")
    monkeypatch.setattr(layers_module, "cpu_has_amx", lambda: False)
    assert not layers_module.tensorflow_plain_bfloat16_products("float32")
    monkeypatch.setattr(layers_module, "TENSORFLOW_PLAIN_BFLOAT16_PRODUCTS", True)
    assert layers_module.tensorflow_plain_bfloat16_products("bfloat16")


def test_cpu_bfloat16_flags_are_read_from_cpuinfo(cpuinfo):
    """x86's avx512_bf16 or amx_bf16 and Arm's bf16 feature; None where there is
    no /proc/cpuinfo to read (not Linux)."""
    from keras_sequencer import layers as layers_module

    has_bfloat16 = layers_module.cpu_has_bfloat16.__wrapped__  # uncached
    for flags, expected in (("fpu avx2 avx512f", False), ("fpu avx512f avx512_bf16", True),
                            ("fpu amx_bf16 amx_tile", True)):
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert has_bfloat16() is expected, flags
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert has_bfloat16() is True
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    assert has_bfloat16() is False
    cpuinfo.unlink()
    assert has_bfloat16() is None


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's bfloat16 products")
@pytest.mark.parametrize("plain", [False, True], ids=["bias_add", "plain_products"])
def test_mixed_bfloat16_fused_route_trains_on_tensorflow(plain, rng, monkeypatch):
    """fit under mixed_bfloat16 with either form of the products: the loss
    falls and the LSTM and MLP learn."""
    from keras_sequencer import layers as layers_module

    monkeypatch.setattr(layers_module, "TENSORFLOW_PLAIN_BFLOAT16_PRODUCTS", plain)
    model = _small_classifier("mixed_bfloat16")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    x = rng.normal(size=(32, 8, 8, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, 32), 3)
    block = model.get_layer("stages_0_blocks_0")
    watched = [block.rnn_tokens.rnn_v.forward_layer.cell.kernel, block.fc1.kernel, block.fc2.bias]
    before = [keras.ops.convert_to_numpy(v).copy() for v in watched]
    history = model.fit(x, y, epochs=8, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    for variable, value in zip(watched, before):
        assert np.abs(keras.ops.convert_to_numpy(variable) - value).max() > 0, variable.path


def _traced_operations(fn, x):
    """The operations of the graph `fn` traces for `x`."""
    import tensorflow as tf

    return tf.function(fn).get_concrete_function(tf.TensorSpec(x.shape)).graph.get_operations()


def _xla_compiled_functions(operations):
    """The names of the functions these operations call with XLA."""
    return [
        op.get_attr("f").name
        for op in operations
        if "_XlaMustCompile" in op.node_def.attr and op.get_attr("_XlaMustCompile")
    ]


def _tensorflow_graph_kernels(fn, x):
    """(BlockLSTM ops, XLA-compiled recurrences, XLA-compiled LayerNorms) in
    the graph `fn` traces for `x`."""
    operations = _traced_operations(fn, x)
    compiled = _xla_compiled_functions(operations)
    assert all("recurrence" in name or "layer_norm" in name for name in compiled), compiled
    return (
        [op.type for op in operations].count("BlockLSTM"),
        sum("recurrence" in name for name in compiled),
        sum("layer_norm" in name for name in compiled),
    )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's two fused forms")
def test_tensorflow_fused_route_unrolls_short_sequences_for_inference(rng, monkeypatch):
    """In inference 3-step columns run as one XLA-compiled call for both
    directions and 34-step rows (over layers.TENSORFLOW_UNROLL_MAX_STEPS) as a
    BlockLSTM per direction, and the block's two LayerNorms as one XLA-compiled
    call each; in training (Keras passes `training` down from the block) and
    in eager calls every sequence runs BlockLSTM and the LayerNorms run as
    Keras' layers (the training form of short sequences pinned off here; its
    own test follows). Each equal to Keras' route."""
    from unittest import mock

    import tensorflow as tf

    from keras_sequencer import layers as layers_module

    assert layers_module.TENSORFLOW_UNROLL_MAX_STEPS < 34
    monkeypatch.setattr(layers_module, "TENSORFLOW_TRAINS_UNROLLED", False)
    block = _block(rng, hidden=4, rnn_route="fused")  # non-zero LayerNorm and MLP weights
    x = rng.normal(size=(2, 3, 34, 10)).astype("float32")
    assert _tensorflow_graph_kernels(lambda a: block(a, training=False), x) == (2, 1, 2)
    assert _tensorflow_graph_kernels(lambda a: block(a, training=True), x) == (4, 0, 0)
    layer = block.rnn_tokens
    assert _tensorflow_graph_kernels(layer, x) == (2, 1, 0)
    fused = {training: tf.function(layer)(x, training=training).numpy() for training in (False, True)}
    with mock.patch.object(layers_module, "tensorflow_unrolled_lstm", side_effect=AssertionError):
        fused["eager"] = layer(x).numpy()  # BlockLSTM: one eager call would pay a compilation
    blocks = {training: tf.function(block)(x, training=training).numpy() for training in (False, True)}
    with mock.patch.object(layers_module, "tensorflow_layer_norm", side_effect=AssertionError):
        blocks["eager"] = block(x).numpy()
    layer.route = "keras"
    expected, expected_block = layer(x).numpy(), tf.function(block)(x, training=False).numpy()
    for training, outputs in fused.items():
        assert np.abs(outputs - expected).max() <= TOLERANCE, training
    for training, outputs in blocks.items():
        assert np.abs(outputs - expected_block).max() <= TOLERANCE, training


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's training form")
@pytest.mark.tensorflow_trained_form
def test_tensorflow_trains_short_sequences_in_a_form_of_its_own(rng, monkeypatch):
    """Traced training runs sequences of up to
    layers.TENSORFLOW_TRAINED_MAX_STEPS steps as tensorflow_trained_lstm (one
    XLA-compiled recurrence for both directions, no BlockLSTM) and longer ones
    through BlockLSTM: in float32, and under mixed_bfloat16 on a CPU with
    bfloat16 instructions; bfloat16 on other CPUs, inference and eager calls
    keep their forms."""
    from unittest import mock

    from keras_sequencer import layers as layers_module

    limit = layers_module.TENSORFLOW_TRAINED_MAX_STEPS
    x = rng.normal(size=(2, 3, limit + 1, 10)).astype("float32")  # 3-step columns, longer rows
    mixed, exact = (ks.BiLSTM2D(4, route="fused", dtype=policy) for policy in ("mixed_bfloat16", "float32"))

    def kernels(layer, training):
        operations = _traced_operations(lambda a: layer(a, training=training), x)
        compiled = _xla_compiled_functions(operations)
        return [op.type for op in operations].count("BlockLSTM"), sum("trained" in name for name in compiled)

    monkeypatch.setattr(layers_module, "cpu_has_bfloat16", lambda: True)
    assert kernels(mixed, True) == (2, 1)
    assert kernels(mixed, False)[1] == 0
    assert kernels(exact, True) == (2, 1)
    with mock.patch.object(layers_module, "tensorflow_trained_lstm", side_effect=AssertionError):
        mixed(x, training=True)  # eager: BlockLSTM, no compilation for one call
        exact(x, training=True)
    for has_bfloat16 in (False, None):  # None: no /proc/cpuinfo to tell
        monkeypatch.setattr(layers_module, "cpu_has_bfloat16", lambda: has_bfloat16)
        assert kernels(mixed, True) == (4, 0)
        assert kernels(exact, True) == (2, 1)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's training form")
@pytest.mark.tensorflow_trained_form
@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_tensorflow_trains_layer_norms_in_a_form_of_their_own(policy, rng, monkeypatch):
    """Traced training runs a block's two LayerNorms as
    tensorflow_trained_layer_norm, one XLA-compiled call each; eager training
    and training with the forms pinned off run Keras' layers. The block's
    output and every gradient (the input's, the LayerNorms' scales and offsets
    among them) equal those through Keras' LayerNorm: float32 to 1e-5 of
    their scale, mixed precision within the compute dtype's rounding."""
    from unittest import mock

    from keras_sequencer import layers as layers_module

    monkeypatch.setattr(layers_module, "cpu_has_bfloat16", lambda: True)
    block = _block(rng, hidden=4, rnn_route="fused", dtype=policy)
    x = rng.normal(size=(2, 5, 7, 10)).astype("float32")

    def trained_norms():
        compiled = _xla_compiled_functions(_traced_operations(lambda a: block(a, training=True), x))
        return sum("trained_layer_norm_forward" in name for name in compiled)

    assert trained_norms() == 2
    with mock.patch.object(layers_module, "tensorflow_trained_layer_norm", side_effect=AssertionError):
        block(x, training=True)  # eager: no compilation for one call
        monkeypatch.setattr(layers_module, "TENSORFLOW_TRAINS_UNROLLED", False)
        assert trained_norms() == 0
    monkeypatch.setattr(layers_module, "TENSORFLOW_TRAINS_UNROLLED", None)

    weights = rng.normal(size=x.shape).astype("float32")
    trained = _outputs_and_gradients(block, x, weights, training=True)
    # The same traced training step, the LSTMs in the same form, Keras' LayerNorms.
    monkeypatch.setattr(layers_module, "tensorflow_xla_norm_applies", lambda *args: False)
    expected = _outputs_and_gradients(block, x, weights, training=True)
    tolerance = {"float32": TOLERANCE, "mixed_bfloat16": 16 * 2.0**-8, "mixed_float16": 16 * 2.0**-11}[policy]
    names = ["outputs", "d inputs"] + [v.path for v in block.trainable_variables]
    assert any("norm1/gamma" in name for name in names) and any("norm2/beta" in name for name in names)
    for name, a, b in zip(names, trained, expected):
        a, b = a.astype("float32"), b.astype("float32")
        scale = np.abs(b).max()
        assert scale > 1e-3, name
        assert np.abs(a - b).max() <= tolerance * scale, (name, np.abs(a - b).max(), scale)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's training form")
@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_tensorflow_trained_form_steps_a_model_as_block_lstm_does(policy, rng, monkeypatch):
    """fit's train step from the same weights: the trained form gives
    BlockLSTM's losses and LSTM updates (float32: to 1e-5; mixed_bfloat16:
    within bfloat16's rounding), and the model learns."""
    from unittest import mock

    from keras_sequencer import layers as layers_module

    x = rng.normal(size=(16, 8, 8, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, 16), 3)
    models = [_small_classifier(policy) for _ in range(2)]
    models[1].set_weights(models[0].get_weights())
    kernel_path = "stages_0_blocks_0/rnn_tokens/rnn_v/forward_rnn_v_forward/lstm_cell/kernel"
    results = []
    for model, trained in zip(models, (True, False)):
        monkeypatch.setattr(layers_module, "TENSORFLOW_TRAINS_UNROLLED", trained)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
        kernel = next(v for v in model.trainable_variables if v.path.endswith(kernel_path))
        before = keras.ops.convert_to_numpy(kernel).copy()
        spy = mock.patch.object(layers_module, "tensorflow_trained_lstm", wraps=layers_module.tensorflow_trained_lstm)
        with spy as trained_lstm:
            losses = [float(model.train_on_batch(x, y)) for _ in range(3)]
        assert trained_lstm.called == trained
        kernel_value = keras.ops.convert_to_numpy(kernel)
        results.append((losses, kernel_value - before))
    (losses, update), (expected_losses, expected_update) = results
    assert losses[-1] < losses[0]
    exact = policy == "float32"
    np.testing.assert_allclose(losses, expected_losses, rtol=TOLERANCE if exact else 2.0**-6)
    assert np.abs(expected_update).max() > 0
    update_tolerance = TOLERANCE if exact else 16 * 2.0**-8  # 16 roundings of bfloat16
    # An update is a difference of two float32 kernels: it is exact to their
    # spacing at best.
    floor = 2 * np.spacing(np.abs(kernel_value).max())
    assert np.abs(update - expected_update).max() <= update_tolerance * np.abs(expected_update).max() + floor


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's unrolled form")
@pytest.mark.parametrize("union", ["cat", "vertical"])
def test_tensorflow_unrolled_columns_run_without_transposes(union, rng):
    """In traced inference the unrolled form runs down the map's columns as
    they lie: no Transpose in or out of the layer's graph (the per-sequence
    form transposes the map and the vertical outputs), and the same outputs
    as Keras' route."""
    import tensorflow as tf

    layer = ks.BiLSTM2D(4, union=union, route="fused")
    x = rng.normal(size=(2, 3, 5, 6)).astype("float32")
    layer.build(x.shape)
    for variable in layer.trainable_variables:
        variable.assign(rng.normal(scale=0.4, size=variable.shape).astype("float32"))
    graph = tf.function(lambda a: layer(a, training=False)).get_concrete_function(tf.TensorSpec(x.shape)).graph
    assert "Transpose" not in [op.type for op in graph.get_operations()]
    outputs = tf.function(lambda a: layer(a, training=False))(x).numpy()
    layer.route = "keras"
    assert np.abs(outputs - layer(x).numpy()).max() <= TOLERANCE


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's cuDNN RNN is the one without bfloat16")
def test_bfloat16_on_jax_keeps_off_the_cudnn_kernel(rng):
    from unittest import mock

    import jax

    x = rng.normal(size=(2, 4, 5, 8)).astype("float32")
    layer = ks.BiLSTM2D(4, dtype="mixed_bfloat16", route="keras")  # "auto" on a GPU
    expected = np.asarray(jax.jit(layer)(x), dtype="float32")
    # As if on a GPU: Keras would now hand bfloat16 to jax.experimental.rnn.
    with mock.patch("keras.src.backend.jax.rnn._is_gpu_available", return_value=True):
        plain = keras.layers.LSTM(4, return_sequences=True, dtype="mixed_bfloat16")
        with pytest.raises(Exception):
            jax.jit(plain)(x[:, 0])  # the control: Keras' LSTM goes to cuDNN
        got = jax.jit(layer)(x)
    assert got.dtype == "bfloat16"
    np.testing.assert_array_equal(np.asarray(got, dtype="float32"), expected)
    assert all(rnn.use_cudnn == "auto" for rnn in layer.recurrent_layers())  # restored


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's fused route")
def test_jax_fused_route_scans_axes_with_enough_sequences(rng, monkeypatch):
    """The fused route runs `jax_fused_lstm` (both directions in one scan) for
    an axis with at least layers.JAX_FUSED_MIN_SEQUENCES sequences (batch times
    the other side) and Keras' scans for the others; the keras route never
    runs it. The same outputs every way."""
    from unittest import mock

    import jax

    from keras_sequencer import layers as layers_module

    x = rng.normal(size=(2, 3, 5, 6)).astype("float32")  # columns: 10 sequences, rows: 6
    layer = ks.BiLSTM2D(4, route="fused")
    layer.build(x.shape)
    outputs = {}
    with mock.patch.object(layers_module, "jax_fused_lstm", wraps=layers_module.jax_fused_lstm) as scan:
        for least, axes in ((0, [1, 2]), (10, [1]), (11, []), (layers_module.JAX_FUSED_MIN_SEQUENCES, [])):
            monkeypatch.setattr(layers_module, "JAX_FUSED_MIN_SEQUENCES", least)
            scan.reset_mock()
            outputs[least] = np.asarray(jax.jit(lambda a: layer(a))(x))  # traced afresh
            assert [call.args[2] for call in scan.call_args_list] == axes, least
        monkeypatch.setattr(layers_module, "JAX_FUSED_MIN_SEQUENCES", 0)
        layer.route = "keras"
        scan.reset_mock()
        expected = np.asarray(jax.jit(lambda a: layer(a))(x))
        assert scan.call_count == 0
    for least, got in outputs.items():
        assert np.abs(got - expected).max() <= TOLERANCE, least


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's fused route under mixed precision")
def test_mixed_precision_fused_route_on_jax_keeps_the_state_in_float32(rng, fused_form):
    """Under mixed_bfloat16 the fused route's products take bfloat16 and give
    float32, the state stays in float32, the output is bfloat16: within the
    compute dtype's rounding of the float32 layer's outputs and gradients."""
    import jax

    x = rng.normal(size=(2, 5, 7, 10)).astype("float32")
    exact = _block(rng, rnn_route="fused")
    mixed = ks.Sequencer2DBlock(6, mlp_ratio=2.0, rnn_route="fused", dtype="mixed_bfloat16")
    mixed.build(x.shape)
    for source, target in zip(exact.weights, mixed.weights):
        target.assign(source)
    loss_weights = rng.normal(size=x.shape).astype("float32")

    def outputs_and_grads(block):
        def loss(inputs, trainable):
            # Through __call__, which casts the inputs, as a model's graph calls it.
            with keras.StatelessScope(state_mapping=list(zip(block.trainable_variables, trainable))):
                outputs = block(inputs, training=False)
            return (outputs.astype("float32") * loss_weights).sum(), outputs

        (_, outputs), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
            x, [v.value for v in block.trainable_variables]
        )
        return outputs, [np.asarray(g, "float32") for g in [grads[0], *grads[1]]]

    expected, expected_grads = outputs_and_grads(exact)
    outputs, grads = outputs_and_grads(mixed)
    assert outputs.dtype == "bfloat16"
    got, expected = np.asarray(outputs, "float32"), np.asarray(expected)
    assert np.abs(got - expected).max() <= np.abs(expected).max() * 2.0**-6
    for name, g, e in zip(["inputs"] + [v.path for v in mixed.trainable_variables], grads, expected_grads):
        assert np.abs(g - e).max() <= 16 * 2.0**-8 * np.abs(e).max(), name


# The fused route's whole-block form on torch: a Sequencer2DBlock runs its
# sublayers' arithmetic with torch ops in one call, and steps aside for anything
# that needs Keras' per-layer path.
torch_only = pytest.mark.skipif(BACKEND != "torch", reason="the whole-block form is torch's")


def _block(rng, hidden=6, **kwargs):
    block = ks.Sequencer2DBlock(hidden, mlp_ratio=2.0, **kwargs)
    block.build((2, 5, 7, 10))
    for variable in block.trainable_variables:
        variable.assign(rng.normal(scale=0.4, size=variable.shape).astype("float32"))
    return block


@pytest.fixture
def block_form(monkeypatch):
    """Counts whole-block calls; `force_per_layer()` makes every block step aside."""
    from keras_sequencer import layers as layers_module

    calls = []
    original = layers_module._torch_block

    def counted(block, x, training=None):
        calls.append(block.name)
        return original(block, x, training)

    monkeypatch.setattr(layers_module, "_torch_block", counted)

    def force_per_layer():
        monkeypatch.setattr(layers_module, "fused_call_blockers", lambda *a, **k: ["forced"])

    return calls, force_per_layer


def test_whole_block_form_is_torch_only():
    block = ks.Sequencer2DBlock(4)
    block.build((1, 3, 3, 8))
    blockers = ks.layers.fused_call_blockers(block)
    if BACKEND == "torch":
        assert blockers == ([] if block.rnn_tokens.selected_route == "fused" else ["route"])
    else:
        assert blockers == ["backend"]


@torch_only
@pytest.mark.parametrize("kwargs", [
    dict(), dict(rnn_type="gru"), dict(rnn_type="rnn", union="horizontal"),
    dict(bidirectional=False, union="add"), dict(union="vertical", drop_path_rate=0.2, drop_rate=0.1),
    dict(hidden=5, union="add", with_fc=False),
])
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_whole_block_form_matches_per_layer_path_with_gradients(kwargs, grid, rng, block_form):
    calls, force_per_layer = block_form
    block = _block(rng, rnn_route="fused", **kwargs)
    assert ks.layers.fused_call_blockers(block) == []
    x = rng.normal(size=(2, *grid, 10)).astype("float32")
    # Small loss weights keep the summed gradients near 1, where 1e-5 is float32's reach.
    weights = rng.normal(scale=0.05, size=x.shape).astype("float32")
    fast = _outputs_and_gradients(block, x, weights)  # training unset: inference, drops are off
    assert calls == [block.name]
    block.rnn_tokens.route = "keras"
    keras_route = _outputs_and_gradients(block, x, weights)
    block.rnn_tokens.route = "fused"
    force_per_layer()
    per_layer = _outputs_and_gradients(block, x, weights)
    assert calls == [block.name]  # the other two ran layer by layer
    names = ["outputs", "d inputs"] + [v.path for v in block.trainable_variables]
    for reference in (per_layer, keras_route):
        for name, got, expected in zip(names, fast, reference):
            assert _flows(name, grid) == (np.abs(expected).max() > 1e-3), name
            assert np.abs(got - expected).max() <= TOLERANCE, (name, np.abs(got - expected).max())


@torch_only
def test_whole_block_form_without_autograd_follows_assignments(rng, block_form):
    import torch

    calls, _ = block_form
    block = _block(rng, rnn_route="fused")
    x = torch.from_numpy(rng.normal(size=(2, 5, 7, 10)).astype("float32"))
    reference_block = _block(rng, rnn_route="keras")
    for step in range(3):  # cached weight copies must follow every change
        reference_block.set_weights(block.get_weights())
        with torch.inference_mode():
            got = block(x).numpy()
        with torch.no_grad():
            expected = reference_block(x).numpy()
            again = block(x).numpy()
        np.testing.assert_allclose(got, expected, atol=TOLERANCE)
        np.testing.assert_allclose(again, expected, atol=TOLERANCE)
        kernel = block.rnn_tokens.rnn_v.forward_layer.cell.kernel
        kernel.assign(kernel.numpy() + 0.1 * (step + 1))
    assert len(calls) == 6


def _compiled_and_eager_predictions(rng, assignments):
    inputs = keras.Input((6, 6, 8))
    outputs = ks.Sequencer2DBlock(4, rnn_route="fused")(ks.Sequencer2DBlock(4, rnn_route="fused")(inputs))
    model = keras.Model(inputs, outputs)
    x = rng.normal(size=(2, 6, 6, 8)).astype("float32")
    for _ in range(assignments):
        for variable in model.trainable_variables:
            variable.assign(rng.normal(scale=0.3, size=variable.shape).astype("float32"))
        model.compile(jit_compile=False)
        expected = model.predict(x, verbose=0)
        model.compile(jit_compile=True)
        got = model.predict(x, verbose=0)
    return got, expected


@torch_only
def test_fused_route_under_torch_compile_steps_aside_from_the_whole_block_form(rng):
    """`jit_compile=True` on torch (torch.compile): the whole-block form's
    weight copies are Python state a compiled graph cannot follow (its logits
    were off by about 1.0), so compiled calls run the per-layer fused path,
    equal to the eager call."""
    np.testing.assert_allclose(*_compiled_and_eager_predictions(rng, 1), atol=TOLERANCE)


@torch_only
@pytest.mark.xfail(
    tuple(int(part) for part in keras.version().split(".")[:2]) < (3, 11),
    strict=True,
    reason="Keras 3.10 + torch.compile: the compiled fused route keeps the weights of its first trace",
)
def test_fused_route_under_torch_compile_follows_assignments(rng):
    np.testing.assert_allclose(*_compiled_and_eager_predictions(rng, 2), atol=TOLERANCE)


@torch_only
def test_whole_block_form_fuses_gelu_and_residuals_into_onednn_linears(rng, monkeypatch):
    """Without autograd on a CPU, fc1's GELU and both residual sums run as
    post-ops of ATen's private oneDNN linear; a torch without it must fail here
    first. With autograd, products this small take addmm."""
    import torch

    assert ks.layers.onednn_linear_available()  # the pinned CPU torch has it
    fused = []
    original = ks.layers._onednn_linear_applies

    def counted(x, residual):
        applies = original(x, residual)
        fused.append(applies)
        return applies

    monkeypatch.setattr(ks.layers, "_onednn_linear_applies", counted)
    block = _block(rng, rnn_route="fused")
    x = torch.from_numpy(rng.normal(size=(2, 5, 7, 10)).astype("float32"))
    with torch.no_grad():
        got = block(x).numpy()
    assert fused == [True] * 3  # fc + residual, fc1 + GELU, fc2 + residual
    fused.clear()
    with torch.no_grad(), monkeypatch.context() as patch:
        patch.setattr(ks.layers, "_onednn_linear_applies", lambda x, residual: False)
        expected = block(x).numpy()
    np.testing.assert_allclose(got, expected, atol=TOLERANCE)
    trained = []
    monkeypatch.setattr(ks.layers, "_onednn_linear_function", _counted(ks.layers._onednn_linear_function, trained))
    block(x)  # autograd on, below ONEDNN_TRAINED_MIN_PRODUCT
    assert trained == []
    fused.clear()

    kernel, bias = torch.randn(10, 12), torch.randn(12)
    strided = torch.randn(2, 10, 5, 7).permute(0, 2, 3, 1)  # not contiguous
    residual = torch.randn(2, 5, 7, 12)
    with torch.no_grad():
        strided_residual = residual.transpose(1, 2).contiguous().transpose(1, 2)
        for kwargs in (dict(), dict(gelu=True), dict(residual=residual), dict(residual=strided_residual)):
            plain = torch.nn.functional.linear(strided, kernel.T, bias)
            expected = torch.nn.functional.gelu(plain) if kwargs.get("gelu") else plain + kwargs.get("residual", 0)
            np.testing.assert_allclose(ks.layers._linear(strided, kernel, bias, **kwargs), expected, atol=TOLERANCE)
    assert fused == [True, True, True, False]  # a strided residual takes addmm


def _counted(function, calls):
    def counted(*args, **kwargs):
        calls.append(True)
        return function(*args, **kwargs)

    return counted


def _block_gradients(block, x, create_graph=False):
    """The block's output, and the gradients of a weighted sum of it with
    respect to x (where x requires it) and every trainable variable."""
    import torch

    out = block(x, training=True)
    loss = (out * torch.linspace(-1.0, 1.0, out.shape[-1])).sum()
    sources = ([x] if x.requires_grad else []) + [v.value for v in block.trainable_variables]
    return out, torch.autograd.grad(loss, sources, create_graph=create_graph)


@torch_only
@pytest.mark.parametrize("drop_path_rate", [0.0, 0.5], ids=["residual-post-ops", "drop-path"])
@pytest.mark.parametrize("input_grad", [True, False], ids=["input-gradient", "first-layer"])
def test_whole_block_form_trains_through_onednn_linears(rng, monkeypatch, input_grad, drop_path_rate):
    """Under autograd on a CPU the block's three products run as oneDNN's
    linear with a backward of its own (the residuals as its post-op where no
    path is dropped): outputs and every gradient equal ATen's addmm path, with
    and without a gradient for the block's input; a gradient of a gradient
    takes ATen's products and equals it too."""
    import torch

    block = _block(rng, rnn_route="fused", drop_path_rate=drop_path_rate)
    x = torch.from_numpy(rng.normal(size=(16, 5, 7, 10)).astype("float32")).requires_grad_(input_grad)
    seed_state = None if drop_path_rate == 0 else keras.ops.convert_to_numpy(block.drop_path.seed_generator.state.value)
    trained = []
    monkeypatch.setattr(ks.layers, "_onednn_linear_function", _counted(ks.layers._onednn_linear_function, trained))
    results = {}
    for threshold in (0, 2**62):  # every product through oneDNN, then none
        monkeypatch.setattr(ks.layers, "ONEDNN_TRAINED_MIN_PRODUCT", threshold)
        if seed_state is not None:
            block.drop_path.seed_generator.state.assign(seed_state)
        results[threshold] = _block_gradients(block, x)
    assert len(trained) == 3  # fc, fc1 (the GELU after it), fc2
    (out, grads), (expected_out, expected_grads) = results.values()
    np.testing.assert_allclose(out.detach().numpy(), expected_out.detach().numpy(), atol=TOLERANCE)
    assert len(grads) == len(block.trainable_variables) + input_grad
    for got, expected in zip(grads, expected_grads):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=TOLERANCE * max(1.0, expected.abs().max()))

    if input_grad:
        second = {}
        for threshold in (0, 2**62):
            monkeypatch.setattr(ks.layers, "ONEDNN_TRAINED_MIN_PRODUCT", threshold)
            if seed_state is not None:
                block.drop_path.seed_generator.state.assign(seed_state)
            _, (grad_x, *_) = _block_gradients(block, x, create_graph=True)
            second[threshold] = torch.autograd.grad(grad_x.square().sum(), x)[0].numpy()
        got, expected = second.values()
        np.testing.assert_allclose(got, expected, atol=TOLERANCE * max(1.0, np.abs(expected).max()))


@torch_only
def test_training_steps_through_onednn_linears_equal_addmm_steps(monkeypatch):
    """`train_on_batch` with the recipe's optimizer and drop path, every
    block product through oneDNN's Function (the kernels' gradients arrive as
    transposed views where the input is the wider side): the same losses and
    weights as the addmm path after two steps."""
    from keras_sequencer.training import create_optimizer

    def trained(threshold):
        monkeypatch.setattr(ks.layers, "ONEDNN_TRAINED_MIN_PRODUCT", threshold)
        keras.utils.set_random_seed(3)
        model = ks.Sequencer2D(
            layers=[1, 1], patch_sizes=[4, 2], embed_dims=[8, 16], hidden_sizes=[4, 8], mlp_ratios=[3, 3],
            input_shape=(16, 16, 3), classes=5, classifier_activation=None, drop_path_rate=0.1,
        )
        model.compile(optimizer=create_optimizer(model, 1e-2, global_clipnorm=1.0),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x = rng_data.normal(size=(6, 16, 16, 3)).astype("float32")
        y = np.arange(6) % 5
        losses = [float(model.train_on_batch(x, y)) for _ in range(2)]
        return losses, [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]

    calls = []
    monkeypatch.setattr(ks.layers, "_onednn_linear_function", _counted(ks.layers._onednn_linear_function, calls))
    rng_data = np.random.default_rng(1)
    losses, weights = trained(0)
    assert len(calls) == 2 * 2 * 3  # two steps, two blocks, three products
    rng_data = np.random.default_rng(1)
    expected_losses, expected_weights = trained(2**62)
    assert len(calls) == 12
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    for got, expected in zip(weights, expected_weights):
        np.testing.assert_allclose(got, expected, atol=1e-5)


@torch_only
def test_whole_block_form_steps_aside_for_training_time_dropout(rng, block_form):
    calls, _ = block_form
    block = _block(rng, rnn_route="fused", drop_path_rate=0.5, drop_rate=0.25)
    x = rng.normal(size=(16, 5, 7, 10)).astype("float32")
    assert "training with dropout" in ks.layers.fused_call_blockers(block, training=True)
    trained = keras.ops.convert_to_numpy(block(x, training=True))
    assert calls == []
    inference = keras.ops.convert_to_numpy(block(x, training=False))
    assert calls == [block.name]
    assert np.abs(trained - inference).max() > 1e-3  # the drops really acted
    quiet = _block(rng, rnn_route="fused")  # no drops: training takes the whole-block form too
    quiet(x, training=True)
    assert calls == [block.name, quiet.name]


@torch_only
@pytest.mark.parametrize("through", ["__call__", "call"])
def test_whole_block_form_drops_paths_as_the_per_layer_path_does(through, rng, block_form):
    """Drop path in training runs in the whole-block form, drawing from the
    block's DropPath in the per-layer path's order: from the same seed state,
    the same samples dropped, equal outputs and gradients."""
    import torch

    calls, force_per_layer = block_form
    block = _block(rng, rnn_route="fused", drop_path_rate=0.5)
    x = rng.normal(size=(16, 5, 7, 10)).astype("float32")
    loss_weights = torch.from_numpy(rng.normal(size=x.shape).astype("float32"))
    seed_state = keras.ops.convert_to_numpy(block.drop_path.seed_generator.state.value)

    def run():
        block.drop_path.seed_generator.state.assign(seed_state)
        inputs = torch.from_numpy(x).requires_grad_(True)
        outputs = block(inputs, training=True) if through == "__call__" else block.call(inputs, training=True)
        grads = torch.autograd.grad((outputs * loss_weights).sum(), [inputs] + [v.value for v in block.trainable_variables])
        return [outputs.detach().numpy()] + [g.numpy() for g in grads]

    whole = run()
    assert calls == [block.name]
    force_per_layer()
    per_layer = run()
    assert calls == [block.name]
    dropped = [np.abs(whole[0][i] - x[i]).max() for i in range(len(x))]
    assert min(dropped) < max(dropped)  # some samples' branches dropped, not others'
    for got, want in zip(whole, per_layer):
        np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, np.abs(want).max()))
    with torch.no_grad():  # the draws moved the seed generator on: the next call drops others
        assert not np.array_equal(block(torch.from_numpy(x), training=True).numpy(), per_layer[0])


@torch_only
@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_whole_block_form_steps_aside_for_mixed_precision_under_autograd(policy, rng, block_form):
    calls, _ = block_form
    block = ks.Sequencer2DBlock(4, rnn_route="fused", dtype=policy)
    x = rng.normal(size=(1, 3, 3, 8)).astype("float32")
    y = block(x)
    assert calls == [] and keras.backend.standardize_dtype(y.dtype) == policy.split("_")[1]
    assert "dtype policy or quantization" in ks.layers.fused_call_blockers(block)


@torch_only
@pytest.mark.parametrize("kwargs", [dict(), dict(rnn_type="gru"), dict(bidirectional=False, union="add")])
def test_bfloat16_whole_block_form_for_inference(kwargs, rng, block_form):
    """Under mixed_bfloat16 without autograd the block runs whole on bfloat16
    copies of its weights, rebuilt after an assignment: against the same block
    in float32 it is as close as the per-layer path, give or take one bfloat16
    rounding (oneDNN rounds a linear's output once, after its GELU or residual
    sum; the per-layer path rounds before and after). mixed_float16 and
    autograd still run layer by layer."""
    import torch

    calls, force_per_layer = block_form
    block = _block(rng, rnn_route="fused", dtype="mixed_bfloat16", **kwargs)
    exact_block = ks.Sequencer2DBlock(6, mlp_ratio=2.0, rnn_route="fused", **kwargs)
    exact_block.build((2, 5, 7, 10))
    x = torch.from_numpy(rng.normal(size=(2, 5, 7, 10)).astype("float32"))

    def both():
        exact_block.set_weights(block.get_weights())
        with torch.no_grad():
            exact = exact_block(x).numpy()
            calls.clear()
            fast = block(x)
            assert calls == [block.name]
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(ks.layers, "fused_call_blockers", lambda *a, **k: ["forced"])
                per_layer = block(x)
            assert calls == [block.name]
        calls.clear()
        assert fast.dtype == per_layer.dtype == torch.bfloat16
        fast, per_layer = fast.float().numpy(), per_layer.float().numpy()
        rounding = np.abs(exact).max() * 2.0**-8
        per_layer_error = np.abs(per_layer - exact).max()
        assert 0 < per_layer_error <= 4 * rounding  # bfloat16 really acted, and only as bfloat16 does
        assert np.abs(fast - exact).max() <= per_layer_error + rounding
        return fast

    before = both()
    kernel = block.fc2.kernel
    kernel.assign(keras.ops.convert_to_numpy(kernel) * 2.0)
    after = both()
    assert np.abs(after - before).max() > 0.1  # the copies followed the assignment

    assert "dtype policy or quantization" in ks.layers.fused_call_blockers(block, inputs=x)  # autograd on
    half = _block(rng, rnn_route="fused", dtype="mixed_float16")
    with torch.no_grad():
        assert "dtype policy or quantization" in ks.layers.fused_call_blockers(half, inputs=x)


@torch_only
def test_bfloat16_layer_norm_off_the_cpu_is_the_cpu_kernels_result(rng):
    """The bfloat16 block form's LayerNorm: off the CPU (CUDA wants the weights
    in the map's dtype) it normalizes a float32 copy and rounds; on the CPU
    ATen's mixed-dtype kernel computes in float32 itself. Bit for bit the same."""
    import torch
    import torch.nn.functional as F

    from keras_sequencer import keras_compat

    norm = keras.layers.LayerNormalization(epsilon=1e-6, dtype="mixed_bfloat16")
    norm.build((None, 48))
    norm.gamma.assign(rng.normal(1.0, 0.3, 48).astype("float32"))
    norm.beta.assign(rng.normal(0.0, 0.3, 48).astype("float32"))
    x = torch.from_numpy(rng.normal(2.0, 3.0, (4, 5, 6, 48)).astype("float32")).to(torch.bfloat16)
    cpu = ks.layers._bfloat16_layer_norm(x, norm, keras_compat.variable_reader(x))
    upcast = F.layer_norm(x.float(), (48,), norm.gamma.value, norm.beta.value, 1e-6).to(torch.bfloat16)
    assert cpu.dtype == torch.bfloat16 and torch.equal(cpu, upcast)


@torch_only
def test_variable_reader_follows_stateless_scopes_and_symbolic_calls():
    """The whole-block form reads its variables' own tensors, decided once per
    call; Keras' `value` where Keras substitutes another tensor. Fails loudly
    if Keras moves the internals it reads (`_value`, the scope's attribute)."""
    import torch

    from keras_sequencer import keras_compat

    variable = keras.Variable(np.ones(3, "float32"))
    x = torch.zeros(1, 3)
    assert keras_compat.variable_reader(x)(variable) is variable.value
    replacement = keras.ops.convert_to_tensor(np.full(3, 2.0, "float32"))
    with keras.StatelessScope(state_mapping=[(variable, replacement)]):
        np.testing.assert_array_equal(keras_compat.variable_reader(x)(variable), replacement)
    assert keras_compat.variable_reader(torch.zeros(1, 3, device="meta")) is keras_compat.keras_value


@torch_only
def test_whole_block_form_runs_a_stateless_call_on_the_given_weights(rng, block_form):
    """stateless_call (JAX-style training on torch) hands the block other
    weights: the whole-block form computes with them, as an assignment would."""
    import torch

    calls, _ = block_form
    block = _block(rng, rnn_route="fused")
    x = torch.from_numpy(rng.normal(size=(2, 5, 7, 10)).astype("float32"))
    other = [v.value * 1.5 for v in block.trainable_variables]
    non_trainable = [v.value for v in block.non_trainable_variables]
    with torch.no_grad():
        stateless, _ = block.stateless_call(other, non_trainable, x)
        assert calls == [block.name]
        for variable, value in zip(block.trainable_variables, other):
            variable.assign(value)
        assigned = block(x)
    np.testing.assert_allclose(stateless.numpy(), assigned.numpy(), atol=1e-6)


def test_stored_value_is_the_variable_not_an_autocast_copy():
    from keras_sequencer import keras_compat

    layer = keras.layers.Dense(2, dtype="mixed_bfloat16")
    layer.build((None, 3))
    seen = {}

    class Probe(keras.layers.Layer):
        def call(self, x):
            seen["value"] = layer.kernel.value
            seen["stored"] = keras_compat.stored_value(layer.kernel)
            return x

    Probe(dtype="mixed_bfloat16")(np.ones((1, 3), "float32"))
    assert keras.backend.standardize_dtype(seen["value"].dtype) == "bfloat16"  # Keras' autocast copy
    assert keras.backend.standardize_dtype(seen["stored"].dtype) == "float32"
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(seen["stored"]), keras.ops.convert_to_numpy(layer.kernel))


@torch_only
def test_whole_block_form_steps_aside_for_autocast_and_distribution(rng, block_form, monkeypatch):
    import torch

    calls, _ = block_form
    block = _block(rng, rnn_route="fused")
    x = torch.from_numpy(rng.normal(size=(1, 5, 7, 10)).astype("float32"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ks.layers.fused_call_blockers(block, inputs=x) == ["autocast"]
        block(x)
    assert calls == []
    monkeypatch.setattr(keras.distribution, "distribution", lambda: object())
    assert ks.layers.fused_call_blockers(block, inputs=x) == ["distribution"]
    block(x)
    assert calls == []


@torch_only
def test_whole_block_form_steps_aside_for_lora(rng, block_form):
    calls, _ = block_form
    block = _block(rng, rnn_route="fused")
    x = rng.normal(size=(1, 5, 7, 10)).astype("float32")
    before = keras.ops.convert_to_numpy(block(x))
    block.fc1.enable_lora(2)
    block.fc1.lora_kernel_b.assign(np.full(block.fc1.lora_kernel_b.shape, 0.5, "float32"))
    assert ks.layers.fused_call_blockers(block) == ["LoRA"]
    after = keras.ops.convert_to_numpy(block(x))
    assert calls == [block.name]  # only the first call
    assert np.abs(after - before).max() > 1e-3  # the LoRA update is applied


@torch_only
def test_whole_block_form_steps_aside_for_int8_quantized_sublayers(rng, block_form):
    calls, _ = block_form
    block = _block(rng, rnn_route="fused")
    x = rng.normal(size=(2, 5, 7, 10)).astype("float32")
    before = keras.ops.convert_to_numpy(block(x))
    assert calls == [block.name]
    for dense in (block.fc1, block.fc2, block.rnn_tokens.fc):
        dense.quantize("int8")
    assert ks.layers.fused_call_blockers(block) == ["dtype policy or quantization"]
    after = keras.ops.convert_to_numpy(block(x))
    assert calls == [block.name]
    assert 0 < np.abs(after - before).max() < 0.05 * np.abs(before).max()  # int8 stays close
