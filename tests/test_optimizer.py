"""The recipe's optimizer steps as timm's AdamW does (PyTorch's epsilon, the
doubled step of the LSTM/RNN biases PyTorch splits in two, clip_grad_norm_).

A two-stage Sequencer2D (S's patch sizes, narrower and one block per stage)
keeps ten training steps per backend within seconds; the full sequencer2d_s at
56 px measured the same (1.3e-5 after one step on torch; 5.8e-3 with Keras'
stock AdamW).
"""

import keras
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

import timm.optim  # noqa: E402

import keras_sequencer as ks  # noqa: E402
from keras_sequencer.training import (  # noqa: E402
    PyTorchAdamW,
    create_optimizer,
    learning_rate_schedule,
    split_rnn_biases,
)
from reference import make_reference, normalize  # noqa: E402

SIZE, BATCH, CLASSES = 56, 4, 10
SMALL = dict(layers=[1, 1], patch_sizes=[7, 2], embed_dims=[32, 48], hidden_sizes=[8, 12], mlp_ratios=[2.0, 2.0])
REFERENCE_NAME = {"lstm": "sequencer2d_s", "rnn": "rnn_sequencer2d_s", "gru": "gru_sequencer2d_s"}
WEIGHT_DECAY = 0.05


def _pair(rnn_type, seed=0):
    reference = make_reference(REFERENCE_NAME[rnn_type], num_classes=CLASSES, seed=seed, **SMALL)
    model = ks.Sequencer2D(
        **{k: tuple(v) for k, v in SMALL.items()},
        rnn_type=rnn_type,
        include_preprocessing=False,
        input_shape=(SIZE, SIZE, 3),
        classes=CLASSES,
        classifier_activation=None,
    )
    ks.load_torch_state_dict(model, reference.state_dict())
    return reference, model


def _batches(steps, seed=0):
    rng = np.random.default_rng(seed)
    images = lambda: normalize(rng.uniform(0, 255, (BATCH, SIZE, SIZE, 3)).astype("float32"))  # noqa: E731
    batches = [(images(), rng.integers(0, CLASSES, BATCH)) for _ in range(steps)]
    return batches, images()


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _timm_logits(reference, batches, evaluation, learning_rates, clipnorm=None, record_after=(1,)):
    """Trains timm's model with timm's AdamW; logits on `evaluation` after each
    step in `record_after` (1-based), and the gradient norms seen."""
    optimizer = timm.optim.create_optimizer_v2(
        reference, "adamw", lr=learning_rates[0], weight_decay=WEIGHT_DECAY
    )
    logits, norms = {}, []
    for step, ((x, y), lr) in enumerate(zip(batches, learning_rates), 1):
        for group in optimizer.param_groups:
            group["lr"] = lr
        reference.train()
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(reference(_nchw(x)), torch.from_numpy(y))
        loss.backward()
        if clipnorm:
            norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), clipnorm)))
        optimizer.step()
        if step in record_after:
            reference.eval()
            with torch.no_grad():
                logits[step] = reference(_nchw(evaluation)).numpy()
    return logits, norms


def _compile(model, optimizer):
    # TensorFlow traces (and XLA-compiles Keras' RNN loops) for longer than
    # these few small steps take eagerly.
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=keras.backend.backend() == "tensorflow",
    )


def _tiny_model(seed):
    """One BiLSTM2D and a head: enough to save, load and wrap cheaply."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Dense(8, name="embed")(inputs)
    x = ks.layers.BiLSTM2D(4, name="mixer")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, name="head")(x), name="tiny")


def _keras_logits(model, optimizer, batches, evaluation, record_after=(1,)):
    _compile(model, optimizer)
    logits = {}
    for step, (x, y) in enumerate(batches, 1):
        model.train_on_batch(x, y)
        if step in record_after:
            logits[step] = keras.ops.convert_to_numpy(model(evaluation, training=False))
    return logits


def _schedule_values(schedule, steps):
    return [float(keras.ops.convert_to_numpy(schedule(step))) for step in range(steps)]


def test_ten_steps_match_timm_adamw_with_the_schedule():
    reference, model = _pair("lstm")
    steps = 10
    batches, evaluation = _batches(steps)
    # Warmup + cosine as the recipe runs it; timm is fed the same value per step.
    settings = dict(learning_rate=2e-3, total_steps=steps, warmup_steps=2, warmup_from=2e-4)
    optimizer = create_optimizer(model, weight_decay=WEIGHT_DECAY, **settings)
    rates = _schedule_values(
        learning_rate_schedule(2e-3, steps, warmup_steps=2, warmup_from=2e-4), steps
    )
    expected, _ = _timm_logits(reference, batches, evaluation, rates, record_after=(1, steps))
    got = _keras_logits(model, optimizer, batches, evaluation, record_after=(1, steps))
    assert np.abs(expected[steps] - expected[1]).max() > 1e-2  # training moved the logits
    assert np.abs(got[1] - expected[1]).max() <= 1e-4
    assert np.abs(got[steps] - expected[steps]).max() <= 2e-4


@pytest.mark.parametrize("rnn_type", ["rnn", "gru"])
def test_other_rnn_types_match(rnn_type):
    # SimpleRNN: split biases like the LSTM's. GRU: Keras keeps both biases,
    # so no doubled step (split_rnn_biases finds none).
    reference, model = _pair(rnn_type, seed=1)
    steps, lr = 3, 2e-3
    batches, evaluation = _batches(steps, seed=1)
    optimizer = create_optimizer(model, lr, weight_decay=WEIGHT_DECAY, total_steps=10**9)
    assert bool(split_rnn_biases(model)) == (rnn_type == "rnn")
    expected, _ = _timm_logits(reference, batches, evaluation, [lr] * steps, record_after=(steps,))
    got = _keras_logits(model, optimizer, batches, evaluation, record_after=(steps,))
    assert np.abs(got[steps] - expected[steps]).max() <= 1e-4


def test_global_clipnorm_matches_clip_grad_norm():
    reference, model = _pair("lstm", seed=2)
    steps, lr, clipnorm = 3, 2e-3, 0.5
    batches, evaluation = _batches(steps, seed=2)
    optimizer = create_optimizer(
        model, lr, weight_decay=WEIGHT_DECAY, total_steps=10**9, global_clipnorm=clipnorm
    )
    expected, norms = _timm_logits(
        reference, batches, evaluation, [lr] * steps, clipnorm=clipnorm, record_after=(steps,)
    )
    assert min(norms) > clipnorm  # clipping really acted
    got = _keras_logits(model, optimizer, batches, evaluation, record_after=(steps,))
    assert np.abs(got[steps] - expected[steps]).max() <= 1e-4


@pytest.mark.parametrize("clipnorm", [None, 0.5])
def test_steps_of_a_split_bias_against_torch(clipnorm):
    # Adam all but cancels a uniform gradient scale, so through a model the
    # clipping norm barely shows. A large epsilon makes the step linear in the
    # clipped gradient; then torch's bias_ih + bias_hh against one Keras bias.
    rng = np.random.default_rng(5)
    w0, b_ih0, b_hh0 = rng.normal(size=(3, 4)), rng.normal(size=4), rng.normal(size=4)
    grads = [(rng.normal(size=(3, 4)), rng.normal(size=4)) for _ in range(3)]
    settings = dict(lr=0.1, eps=1.0, weight_decay=0.05)

    params = [torch.tensor(v, dtype=torch.float32, requires_grad=True) for v in (w0, b_ih0, b_hh0)]
    reference = torch.optim.AdamW(
        [{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], **settings
    )
    w = keras.Variable(w0.astype("float32"), name="kernel")
    b = keras.Variable((b_ih0 + b_hh0).astype("float32"), name="bias")
    optimizer = PyTorchAdamW(
        learning_rate=settings["lr"], epsilon=settings["eps"], weight_decay=settings["weight_decay"],
        global_clipnorm=clipnorm,
    )
    optimizer.exclude_from_weight_decay(var_list=[b])
    optimizer.split_biases([b])
    for g_w, g_b in grads:
        for param, g in zip(params, (g_w, g_b, g_b)):
            param.grad = torch.tensor(g, dtype=torch.float32)
        if clipnorm:
            norm = torch.nn.utils.clip_grad_norm_(params, clipnorm)
            assert norm > clipnorm
        reference.step()
        optimizer.apply([keras.ops.convert_to_tensor(g, "float32") for g in (g_w, g_b)], [w, b])
    expected_w = params[0].detach().numpy()
    expected_b = (params[1] + params[2]).detach().numpy()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(w), expected_w, rtol=0, atol=2e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(b), expected_b, rtol=0, atol=2e-6)


def test_split_biases_and_weight_decay_groups():
    _, model = _pair("lstm")
    biases = split_rnn_biases(model)
    # Two BiLSTM2D blocks, each vertical + horizontal, forward + backward.
    assert len(biases) == 8 and all(len(b.shape) == 1 for b in biases)
    assert len({b.path for b in biases}) == 8
    optimizer = create_optimizer(model, total_steps=10)
    optimizer.build(model.trainable_variables)
    for variable in model.trainable_variables:
        assert optimizer._use_weight_decay(variable) == (len(variable.shape) > 1)
    assert sorted(optimizer.get_config()["split_bias_paths"]) == sorted(b.path for b in biases)


def test_saved_and_loaded_model_steps_on_identically(tmp_path):
    model = _tiny_model(3)
    rng = np.random.default_rng(3)
    batches = [(rng.normal(size=(BATCH, 6, 6, 3)).astype("float32"), rng.integers(0, CLASSES, BATCH))
               for _ in range(3)]
    evaluation = rng.normal(size=(BATCH, 6, 6, 3)).astype("float32")
    _compile(model, create_optimizer(model, 2e-2, weight_decay=WEIGHT_DECAY, total_steps=10, warmup_steps=1))
    assert len(split_rnn_biases(model)) == 4
    for x, y in batches[:2]:
        model.train_on_batch(x, y)
    path = tmp_path / "trained.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer, PyTorchAdamW)
    assert int(keras.ops.convert_to_numpy(loaded.optimizer.iterations)) == 2
    loaded_config = loaded.optimizer.get_config()
    assert len(loaded_config["split_bias_paths"]) == 4
    assert loaded_config["split_bias_paths"] == model.optimizer.get_config()["split_bias_paths"]
    assert loaded_config["no_weight_decay_paths"] == model.optimizer.get_config()["no_weight_decay_paths"]
    x, y = batches[2]
    model.train_on_batch(x, y)
    loaded.train_on_batch(x, y)
    a = keras.ops.convert_to_numpy(model(evaluation, training=False))
    b = keras.ops.convert_to_numpy(loaded(evaluation, training=False))
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    for before, after in zip(model.trainable_variables, loaded.trainable_variables):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(after), keras.ops.convert_to_numpy(before), rtol=0, atol=1e-7
        )


def test_loss_scale_optimizer_wraps_it():
    model = _tiny_model(4)
    optimizer = keras.optimizers.LossScaleOptimizer(create_optimizer(model, 1e-3, total_steps=10))
    _compile(model, optimizer)
    before = [keras.ops.convert_to_numpy(b).copy() for b in split_rnn_biases(model)]
    rng = np.random.default_rng(4)
    loss = model.train_on_batch(rng.normal(size=(BATCH, 6, 6, 3)).astype("float32"), rng.integers(0, CLASSES, BATCH))
    assert np.isfinite(loss)
    after = [keras.ops.convert_to_numpy(b) for b in split_rnn_biases(model)]
    assert all(np.abs(a - b).max() > 0 for a, b in zip(after, before))


def _step_variable_by_variable(optimizer):
    """Keras' separate decay and per-variable loop over the step in Keras ops:
    the reference for the fused steps of torch and TensorFlow."""
    optimizer._backend_update_step = super(PyTorchAdamW, optimizer)._backend_update_step
    optimizer._apply_weight_decay = super(PyTorchAdamW, optimizer)._apply_weight_decay
    optimizer.update_step = optimizer._step_in_keras_ops


FUSED_STEPS = pytest.mark.skipif(
    keras.backend.backend() == "jax", reason="JAX compiles the per-variable step into one program itself"
)


@FUSED_STEPS
def test_fused_step_equals_the_per_variable_step():
    """On torch PyTorchAdamW steps all variables (decay included) with fused
    torch._fused_adamw_ calls, on TensorFlow each variable with one ApplyAdam
    kernel; Keras' separate decay and per-variable loop are the reference."""
    (_, fused), (_, looped) = _pair("lstm"), _pair("lstm")
    optimizers = [create_optimizer(m, 1e-2, weight_decay=WEIGHT_DECAY, total_steps=10, warmup_steps=2)
                  for m in (fused, looped)]
    _step_variable_by_variable(optimizers[1])
    rng = np.random.default_rng(3)
    for _ in range(3):
        grads = [rng.standard_normal(tuple(v.shape)).astype("float32") for v in fused.trainable_variables]
        for optimizer, model in zip(optimizers, (fused, looped)):
            optimizer.apply_gradients(zip([keras.ops.convert_to_tensor(g) for g in grads], model.trainable_variables))
    assert optimizers[0]._marks.split_keys  # the doubled step of the LSTM biases is exercised
    assert any(not optimizers[0]._use_weight_decay(v) for v in fused.trainable_variables)  # and exclusions
    for a, b in zip(fused.trainable_variables, looped.trainable_variables):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), atol=1e-6,
                                   err_msg=a.path)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's graph")
@pytest.mark.parametrize("amsgrad", [False, True])
def test_tensorflow_steps_with_its_adam_kernel_where_it_can(amsgrad):
    """A traced step holds one ResourceApplyAdam per variable; AMSGrad, which
    the kernel lacks, keeps the step in Keras ops."""
    import tensorflow as tf

    model = _tiny_model(5)
    optimizer = PyTorchAdamW(1e-3, amsgrad=amsgrad)
    variables = model.trainable_variables
    optimizer.build(variables)
    grads = [tf.ones(v.shape) for v in variables]
    graph = tf.function(lambda: optimizer.apply(grads, variables)).get_concrete_function().graph
    kernels = [op for op in graph.get_operations() if op.type == "ResourceApplyAdam"]
    assert len(kernels) == (0 if amsgrad else len(variables))


@FUSED_STEPS
def test_fused_step_under_gradient_accumulation_and_ema():
    """Keras' gradient accumulation (where `iterations` is a tensor on torch)
    and EMA around the fused step: the same variables as Keras' own decay and
    loop."""

    def train(fused):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        optimizer = PyTorchAdamW(1e-2, weight_decay=0.1, gradient_accumulation_steps=2, use_ema=True)
        if not fused:
            _step_variable_by_variable(optimizer)
        model.compile(optimizer, "mse")
        rng = np.random.default_rng(0)
        for _ in range(5):
            model.train_on_batch(rng.normal(size=(8, 4)), rng.normal(size=(8, 3)))
        return [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]

    for a, b in zip(train(True), train(False)):
        np.testing.assert_allclose(a, b, atol=1e-6)
