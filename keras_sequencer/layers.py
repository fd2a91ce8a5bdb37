"""Sequencer2D building blocks as Keras 3 layers (channels-last everywhere)."""

import contextlib
import functools
import math
import os
import warnings
import weakref

import keras
from keras import layers, ops

from keras_sequencer import keras_compat

RNN_TYPES = ("lstm", "gru", "rnn")
UNIONS = ("cat", "add", "vertical", "horizontal")
ROUTES = ("auto", "keras", "fused")
LAYER_NORM_EPSILON = 1e-6

# The fused torch route hands cuDNN per-direction weights; cuDNN copies them into
# one buffer on every call (small next to the activations) and warns each time.
# Set once here, not per call: filterwarnings resets the warning caches.
warnings.filterwarnings("ignore", message="RNN module weights are not part of single")


def _serializable(cls):
    return keras.saving.register_keras_serializable(package="keras_sequencer")(cls)


@_serializable
class BiasFusedDense(layers.Dense):
    """keras.layers.Dense that, on torch, adds its bias inside the GEMM
    (F.linear, which is timm's nn.Linear). Keras' own call is a matmul and then a
    separate add over the whole activation: 11% of sequencer2d_s's batch-16
    forward pass on a 2-core CPU. Same variables and config as Dense."""

    def quantize(self, mode=None, type_check=True, **kwargs):
        # Keras refuses Dense subclasses by default (a subclass may change the
        # arithmetic); this one computes exactly Dense's, so it quantizes as one.
        return super().quantize(mode, type_check=False, **kwargs)

    def call(self, inputs, training=None):
        if keras.backend.backend() != "torch" or self.bias is None:
            return super().call(inputs, training=training)
        import torch.nn.functional as F

        kernel = ops.convert_to_tensor(self.kernel)  # the property: LoRA included
        x = F.linear(inputs, kernel.T, ops.convert_to_tensor(self.bias))
        return self.activation(x)


@_serializable
class PatchConv2D(layers.Conv2D):
    """keras.layers.Conv2D whose windows tile its input (the patch embeddings:
    strides equal to the kernel size, "valid" padding). On torch it runs as one
    matrix product over the patches with the kernel as Keras keeps it: Keras'
    torch convolution copies the kernel into channels-last order on every
    call. Same variables and config as Conv2D."""

    def call(self, inputs):
        if not self._patch_product_applies(inputs):
            return super().call(inputs)
        import torch

        kernel = ops.convert_to_tensor(self.kernel)  # the property: LoRA included
        (ph, pw), (height, width) = self.kernel_size, inputs.shape[1:3]
        batch, rows, cols, channels = inputs.shape[0], height // ph, width // pw, inputs.shape[-1]
        x = inputs[:, : rows * ph, : cols * pw]  # "valid": a remainder is dropped
        if (ph, pw) != (1, 1):
            x = x.reshape(batch, rows, ph, cols, pw, channels).transpose(2, 3)
        x = x.reshape(-1, ph * pw * channels)
        kernel = kernel.reshape(-1, self.filters)
        y = x @ kernel if self.bias is None else torch.addmm(ops.convert_to_tensor(self.bias), x, kernel)
        return self.activation(y.view(batch, rows, cols, self.filters))

    def _patch_product_applies(self, inputs):
        if keras.backend.backend() != "torch" or self.data_format != "channels_last" or self.groups != 1:
            return False
        if tuple(self.strides) != tuple(self.kernel_size) or self.padding != "valid":
            return False
        if tuple(self.dilation_rate) != (1, 1) or self.dtype_policy.quantization_mode is not None:
            return False
        return not getattr(inputs, "is_meta", True) and inputs.ndim == 4


@_serializable
class PyTorchRNNBias(keras.initializers.RandomUniform):
    """PyTorch's two RNN biases summed (b_ih + b_hh, each drawn from
    U(minval, maxval)): the distribution of the one bias Keras keeps."""

    def __call__(self, shape, dtype=None):
        pair = keras.random.uniform((2, *shape), self.minval, self.maxval, dtype=dtype, seed=self.seed)
        return ops.sum(pair, axis=0)


def make_recurrent_layer(rnn_type, hidden_size, name, dtype=None):
    """One direction of a 2D RNN, with every argument the fused cuDNN kernel needs.

    Initialised as timm's Sequencer (and torch.nn.LSTM) are: every weight from
    U(-1/sqrt(hidden), 1/sqrt(hidden)), no unit forget bias. That is the
    reference's training start, and it skips Keras' orthogonal init, whose QR
    per layer cost 1.3 s of a cold start."""
    limit = 1.0 / math.sqrt(hidden_size)
    uniform = keras.initializers.RandomUniform(-limit, limit)
    common = dict(
        kernel_initializer=uniform,
        recurrent_initializer=uniform,
        # GRU(reset_after=True) keeps both biases, as rows of one (2, 3h) variable.
        bias_initializer=uniform if rnn_type == "gru" else PyTorchRNNBias(-limit, limit),
        return_sequences=True,
        use_bias=True,
        unroll=False,
        dropout=0.0,
        recurrent_dropout=0.0,
        name=name,
        dtype=dtype,
    )
    if rnn_type == "lstm":
        return layers.LSTM(
            hidden_size,
            activation="tanh",
            recurrent_activation="sigmoid",
            unit_forget_bias=False,
            **common,
        )
    if rnn_type == "gru":
        # reset_after=True is PyTorch's GRU formulation (and cuDNN's).
        return layers.GRU(
            hidden_size,
            activation="tanh",
            recurrent_activation="sigmoid",
            reset_after=True,
            **common,
        )
    if rnn_type == "rnn":
        return layers.SimpleRNN(hidden_size, activation="tanh", **common)
    raise ValueError(f"Unrecognized rnn_type: {rnn_type!r}. Expected one of {RNN_TYPES}.")


@contextlib.contextmanager
def cudnn_disabled(recurrent_layers):
    """Runs these LSTM/GRU layers with Keras' generic loop instead of cuDNN."""
    saved = [(layer, layer.use_cudnn) for layer in recurrent_layers if hasattr(layer, "use_cudnn")]
    for layer, _ in saved:
        layer.use_cudnn = False
    try:
        yield
    finally:
        for layer, value in saved:
            layer.use_cudnn = value


def select_route(route, rnn_type="lstm"):
    """Which loop a BiLSTM2D runs.

    "keras": Keras' own Bidirectional(LSTM/GRU/SimpleRNN) loops (cuDNN on a GPU).
    "fused": the backend's fused sequence kernel, one call per direction or axis:
    PyTorch's RNN kernels on torch (every rnn_type, as timm runs them),
    TensorFlow's BlockLSTM or an XLA-compiled unrolled loop on TensorFlow, and
    one scan over both directions of an axis on JAX (`jax_fused_lstm`); the
    last two for LSTM only.
    "auto": "fused" on torch (on a GPU its kernel is cuDNN, as Keras' own
    loop runs there, and a block then makes one Keras layer call instead of
    seven), and for LSTMs on TensorFlow and JAX where there is no GPU; else
    "keras", so TensorFlow and JAX GPUs keep Keras' cuDNN. On CPU fused is the
    faster route (BENCHMARKS.md, "Where the time goes, and what was tried",
    "Issue 13, eighth round" for JAX, and "fifteenth round" for torch GPUs).
    """
    if route not in ROUTES:
        raise ValueError(f"Unrecognized route: {route!r}. Expected one of {ROUTES}.")
    backend = keras.backend.backend()
    fused_available = backend == "torch" or (backend in ("tensorflow", "jax") and rnn_type == "lstm")
    if route == "fused" and not fused_available:
        raise ValueError(
            "route='fused' needs a fused recurrent kernel: the torch backend (any "
            f"rnn_type), or TensorFlow or JAX (LSTM). This is {backend!r} with rnn_type="
            f"{rnn_type!r}. Use 'auto' or 'keras'."
        )
    if route != "auto":
        return route
    if not fused_available or (backend != "torch" and has_gpu()):
        return "keras"
    return "fused"


def has_gpu():
    """Whether the current Keras backend sees a GPU."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU"))
    if backend == "jax":
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    import torch

    return torch.cuda.is_available()


def _cpu_flags():
    """The CPU's feature flags from Linux's /proc/cpuinfo (x86's "flags", Arm's
    "Features"); None where there is none to read."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = set()
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[-1].split())
    except OSError:
        return None
    return flags or None


@functools.cache
def cpu_has_amx():
    """Whether oneDNN may use this CPU's AMX bfloat16 tiles: the flag in Linux's
    /proc/cpuinfo, unless ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA) caps oneDNN
    below AMX."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    if cap not in ("ALL", "DEFAULT") and "AMX" not in cap:
        return False
    return "amx_bf16" in (_cpu_flags() or ())


@functools.cache
def cpu_has_bfloat16():
    """Whether this CPU computes bfloat16 products in hardware (x86's
    AVX512-BF16 or AMX, Arm's BF16): True or False from Linux's /proc/cpuinfo,
    None where it cannot tell."""
    flags = _cpu_flags()
    return None if flags is None else bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def directions_of(rnn):
    """An axis' recurrent layers: [forward, backward] of a Bidirectional, or [rnn]."""
    if isinstance(rnn, layers.Bidirectional):
        return [rnn.forward_layer, rnn.backward_layer]
    return [rnn]


def _icfo(w):
    # Keras' LSTM gates are (i, f, c, o); BlockLSTM's are (i, c, f, o). One split
    # and one concat: slicing traced many more ops into a TF cold start.
    import tensorflow as tf

    i, f, c, o = tf.split(w, 4, axis=-1)
    return tf.concat([i, c, f, o], axis=-1)


# Sequences up to this many steps run on TensorFlow's fused route as one
# XLA-compiled, unrolled recurrence after a single input projection; longer ones
# run BlockLSTM, as XLA's compile time grows with the steps (BENCHMARKS.md,
# "Issue 13, fourth round").
TENSORFLOW_UNROLL_MAX_STEPS = 32

# None: tensorflow_plain_bfloat16_products decides by the CPU; tests set it.
TENSORFLOW_PLAIN_BFLOAT16_PRODUCTS = None


def tensorflow_plain_bfloat16_products(dtype):
    """Whether TensorFlow's fused route multiplies bfloat16 activations as plain
    MatMuls (oneDNN's matmul, on AMX where the CPU has it), adding the biases
    and GELU in XLA. With the bias after it, TensorFlow hands a MatMul to
    oneDNN's inner product, whose bfloat16 form with plain weights is oneDNN's
    gemm fallback, without AMX. On AMX CPUs only: capped below AMX, the plain
    form was the slower (BENCHMARKS.md, "Issue 13, ninth round")."""
    if keras.backend.standardize_dtype(dtype) != "bfloat16":
        return False
    if TENSORFLOW_PLAIN_BFLOAT16_PRODUCTS is not None:
        return TENSORFLOW_PLAIN_BFLOAT16_PRODUCTS
    return cpu_has_amx()


def tensorflow_fused_lstm(rnn, sequences, training=None):
    """A Keras LSTM (or its Bidirectional wrapper) over (N, T, C) sequences on
    TensorFlow, in the dtype of `sequences`. The recurrent state stays in
    float32 (TensorFlow has no bfloat16 LSTM kernel on CPU).

    The unrolled form is for traced inference (`predict`, `tf.function`,
    serving), where its compilation is paid once per shape. BlockLSTM runs
    everything else: training, where its gradient kernel outruns the unrolled
    form's, and eager calls, which would pay the compilation for one call;
    except that traced training of short sequences runs
    tensorflow_trained_lstm (`tensorflow_trains_unrolled`)."""
    if tensorflow_unrolls(sequences.shape[1], training):
        return ops.squeeze(tensorflow_unrolled_lstm(rnn, ops.expand_dims(sequences, 2)), 2)
    if tensorflow_trains_unrolled(sequences.shape[1], sequences.dtype, training):
        return tensorflow_trained_lstm(rnn, sequences)
    if keras.backend.standardize_dtype(sequences.dtype) == "float32":
        return _tensorflow_block_lstm(rnn, sequences)
    # Mixed precision: BlockLSTM in float32 outruns Keras' loop in bfloat16
    # (BENCHMARKS.md, "Issue 13, third round").
    return ops.cast(_tensorflow_block_lstm(rnn, ops.cast(sequences, "float32")), sequences.dtype)


def tensorflow_unrolls(steps, training=None):
    """Whether TensorFlow's fused route runs sequences of `steps` steps as
    tensorflow_unrolled_lstm."""
    return _traced_inference(training) and steps is not None and steps <= TENSORFLOW_UNROLL_MAX_STEPS


def _traced_inference(training):
    """Where TensorFlow's fused route compiles with XLA: traced (predict,
    tf.function, serving), so the compilation is paid once per shape, and not
    training."""
    import tensorflow as tf

    return not training and not tf.executing_eagerly()


def tensorflow_unrolled_lstm(rnn, x):
    """A Keras LSTM (or its Bidirectional wrapper) along axis 1 of a (B, T, M, C)
    tensor (B*M sequences of T steps) -> (B, T, M, D*H): a map's columns without
    transposing it. The input projection of every step and direction is one
    matrix product in the compute dtype (oneDNN), then the recurrence one XLA
    call (its products in the compute dtype, its state in float32)."""
    import tensorflow as tf

    directions = directions_of(rnn)
    dtype = x.dtype
    kernel, recurrent, bias = _joined_lstm_variables(directions, dtype)
    shape = tf.shape(x)
    projected = tf.matmul(tf.reshape(x, (-1, x.shape[-1])), kernel)
    if tensorflow_plain_bfloat16_products(dtype):
        bias = tf.cast(bias, "float32")  # added to the gates in XLA
    else:
        projected, bias = tf.nn.bias_add(projected, tf.reshape(bias, (-1,))), None
    projected = tf.reshape(projected, (shape[0], x.shape[1], shape[2], len(directions), 4 * recurrent.shape[1]))
    backward = [d.go_backwards for d in directions]
    return _xla_recurrence()(projected, recurrent, backward, bias)


def _joined_lstm_variables(directions, dtype):
    """The directions' LSTM variables in `dtype`: kernels (C, D*4H) side by
    side, recurrent kernels (D, H, 4H) and biases (D, 4H) stacked. The
    variables themselves, read here (inside a mixed-precision call Keras'
    value is a bfloat16 copy)."""
    import tensorflow as tf

    kernel, recurrent, bias = (
        [ops.cast(keras_compat.stored_value(getattr(d.cell, name)), dtype) for d in directions]
        for name in ("kernel", "recurrent_kernel", "bias")
    )
    return tf.concat(kernel, -1), tf.stack(recurrent), tf.stack(bias)


@functools.cache
def _xla_recurrence():
    import tensorflow as tf

    def recurrence(projected, recurrent, backward, bias=None):
        # projected: (B, T, M, D, 4H) gate inputs of D directions; recurrent:
        # (D, H, 4H). Both in the compute dtype; the state and the gates stay in
        # float32. bias: (D, 4H) float32 where the gate inputs have none yet.
        if projected.dtype != tf.float32:
            return _per_direction_recurrence(projected, recurrent, backward, bias)
        steps, units = projected.shape[1], recurrent.shape[1]
        h = c = tf.zeros((len(backward), tf.shape(projected)[0] * tf.shape(projected)[2], units), "float32")
        outputs = []
        for step in range(steps):
            at = [steps - 1 - step if back else step for back in backward]
            gates = tf.stack([_gate_inputs(projected, t, d) for d, t in enumerate(at)]) + tf.matmul(h, recurrent)
            i, f, candidate, o = tf.split(gates, 4, axis=-1)  # Keras' gate order
            c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(candidate)
            h = tf.sigmoid(o) * tf.tanh(c)
            outputs.append(h)
        return _in_time_order(outputs, projected, backward)

    return tf.function(recurrence, jit_compile=True)


def _gate_inputs(projected, step, direction):
    """(B*M, 4H) gate inputs of one step and direction of (B, T, M, D, 4H)."""
    import tensorflow as tf

    return tf.reshape(projected[:, step, :, direction], (-1, projected.shape[-1]))


def _per_direction_recurrence(projected, recurrent, backward, bias):
    """The mixed-precision recurrence: each direction's gate arithmetic reads its
    slice of the bfloat16 gate inputs itself (XLA otherwise gathers the
    directions' slices into a float32 copy every step), and the state leaves
    each step in the compute dtype only, as the next product and the output
    take it (BENCHMARKS.md, "Issue 13, seventh round")."""
    import tensorflow as tf

    dtype, steps = projected.dtype, projected.shape[1]
    h, cells, outputs = None, [None] * len(backward), []
    for step in range(steps):
        recurrent_part = None if h is None else _float32_product(h, recurrent)
        states = []
        for d, back in enumerate(backward):
            gates = tf.cast(_gate_inputs(projected, steps - 1 - step if back else step, d), "float32")
            if bias is not None:
                gates += bias[d]
            if recurrent_part is not None:
                gates += recurrent_part[d]
            i, f, candidate, o = tf.split(gates, 4, axis=-1)  # Keras' gate order
            c = tf.sigmoid(i) * tf.tanh(candidate)
            cells[d] = c if cells[d] is None else tf.sigmoid(f) * cells[d] + c
            states.append(tf.sigmoid(o) * tf.tanh(cells[d]))
        h = tf.cast(tf.stack(states), dtype)
        outputs.append(h)
    return _in_time_order(outputs, projected, backward)


def _in_time_order(outputs, projected, backward):
    """Each step's (D, B*M, H) states, in each direction's processing order ->
    (B, T, M, D*H) in the order of the sequence, in the dtype of the gate
    inputs."""
    import tensorflow as tf

    shape = tf.shape(projected)
    # The state's size as a constant: with an unknown batch (evaluate, fit's
    # validation) a -1 would leave the output's last axis unknown.
    units = outputs[0].shape[-1]
    outputs = tf.stack([tf.reshape(h, (len(backward), shape[0], shape[2], units)) for h in outputs], axis=2)
    outputs = [tf.reverse(outputs[d], [1]) if back else outputs[d] for d, back in enumerate(backward)]
    return tf.cast(tf.concat(outputs, -1), projected.dtype)


def _float32_product(a, b):
    """a @ b as float32 from operands in the compute dtype: the dot writes its
    float32 accumulators, not a bfloat16 rounding that a separate pass then
    converts back (BENCHMARKS.md, "Issue 13, sixth round")."""
    import tensorflow as tf

    if a.dtype == tf.float32:
        return tf.matmul(a, b)

    @tf.custom_gradient
    def product(a, b):
        def gradient(upstream):  # BatchMatMulV3's own gradient assumes one dtype
            upstream = tf.cast(upstream, a.dtype)
            return tf.matmul(upstream, b, transpose_b=True), tf.matmul(a, upstream, transpose_a=True)

        return tf.raw_ops.BatchMatMulV3(x=a, y=b, Tout=tf.float32), gradient

    return product(a, b)


# Training steps sequences of up to this many steps (every stage of
# sequencer2d at 224) through tensorflow_trained_lstm; longer ones through
# BlockLSTM, as its XLA programs unroll the steps.
TENSORFLOW_TRAINED_MAX_STEPS = 32

# None: tensorflow_trains_unrolled decides by the dtype and the CPU. False:
# training runs BlockLSTM and Keras' LayerNorm (tests set it).
TENSORFLOW_TRAINS_UNROLLED = None


def _traced_training(training):
    """Where TensorFlow's fused route may train in forms of its own, XLA
    programs compiled once per shape: traced training (fit, a tf.function; an
    eager call would pay the compilations for one step)."""
    import tensorflow as tf

    return bool(training) and not tf.executing_eagerly() and TENSORFLOW_TRAINS_UNROLLED is not False


def tensorflow_trains_unrolled(steps, dtype, training=None):
    """Whether TensorFlow's fused route trains sequences of `steps` steps as
    tensorflow_trained_lstm: traced training in float32, or in bfloat16 on a
    CPU with bfloat16 instructions (where BlockLSTM would train in float32)."""
    if not _traced_training(training) or steps is None or steps > TENSORFLOW_TRAINED_MAX_STEPS:
        return False
    if TENSORFLOW_TRAINS_UNROLLED:
        return True
    dtype = keras.backend.standardize_dtype(dtype)
    return dtype == "float32" or (dtype == "bfloat16" and bool(cpu_has_bfloat16()))


def tensorflow_trained_lstm(rnn, sequences):
    """A Keras LSTM (or its Bidirectional wrapper) over (N, T, C) sequences on
    TensorFlow with a gradient of its own: the input projection and, in the
    backward pass, the input and kernel gradients are whole-sequence products
    in the compute dtype (oneDNN's, on AMX for bfloat16); each pass's
    recurrence is one XLA call for all directions, its state and gate
    gradients in float32."""
    directions = directions_of(rnn)
    backward = tuple(d.go_backwards for d in directions)
    # Read outside the custom gradient, so that the tape sees the reads.
    return _trained_lstm(sequences, *_joined_lstm_variables(directions, "float32"), backward)


def _trained_lstm(x, kernel, recurrent, bias, backward):
    """tensorflow_trained_lstm on the directions' variables, joined."""
    import tensorflow as tf

    dtype, steps, channels = x.dtype, x.shape[1], x.shape[2]
    directions, units = len(backward), recurrent.shape[1]

    @tf.custom_gradient
    def lstm(x, kernel, recurrent, bias):
        # kernel (C, D*4H), recurrent (D, H, 4H), bias (D, 4H): float32.
        inputs = tf.reshape(x, (-1, channels))
        kernel_in_dtype = tf.cast(kernel, dtype)
        projected = tf.reshape(tf.matmul(inputs, kernel_in_dtype), (-1, steps, directions, 4 * units))
        outputs, *saved = _xla_trained_forward()(projected, recurrent, bias, backward)

        def gradient(upstream):
            gate_grads, recurrent_grad, bias_grad = _xla_trained_backward()(upstream, *saved, recurrent, backward)
            inputs_grad = tf.reshape(tf.matmul(gate_grads, kernel_in_dtype, transpose_b=True), tf.shape(x))
            kernel_grad = tf.cast(tf.matmul(inputs, gate_grads, transpose_a=True), kernel.dtype)
            return inputs_grad, kernel_grad, recurrent_grad, bias_grad

        return outputs, gradient

    return lstm(x, kernel, recurrent, bias)


def _in_processing_order(sequences, backward):
    """(T, D, ...) in time order -> each direction's processing order (the
    backward directions' steps reversed), and back again."""
    import tensorflow as tf

    if not any(backward):
        return sequences
    directions = [tf.reverse(sequences[:, d], [0]) if back else sequences[:, d] for d, back in enumerate(backward)]
    return tf.stack(directions, 1)


@functools.cache
def _xla_trained_forward():
    import tensorflow as tf

    def trained_forward_recurrence(projected, recurrent, bias, backward):
        # projected: (N, T, D, 4H) gate inputs in the compute dtype. Returns the
        # outputs (N, T, D*H) in time order and the compute dtype, and what the
        # backward pass reads, float32 in each direction's processing order:
        # each gate's derivative times the factor its gradient takes from the
        # step (T, D, N, 4H), o * tanh'(c) and the forget gate (T, D, N, H).
        batch, steps, directions, units = tf.shape(projected)[0], projected.shape[1], len(backward), recurrent.shape[1]
        gate_inputs = tf.transpose(tf.cast(projected, "float32"), (1, 2, 0, 3))
        gate_inputs = _in_processing_order(gate_inputs, backward) + bias[:, None]
        # One sigmoid for the four gates: tanh(x) = 2 sigmoid(2x) - 1.
        scale = tf.repeat(tf.constant([1.0, 1.0, 2.0, 1.0]), units)
        shift = tf.repeat(tf.constant([0.0, 0.0, -1.0, 0.0]), units)
        h = c = tf.zeros((directions, batch, units), "float32")
        states, derivatives, cell_factors, forget = [], [], [], []
        for step in range(steps):
            sigmoid = tf.sigmoid((gate_inputs[step] + tf.matmul(h, recurrent)) * scale)
            i, f, candidate, o = tf.split(sigmoid * scale + shift, 4, axis=-1)  # Keras' order
            previous_c = c
            c = f * c + i * candidate
            tanh_c = tf.tanh(c)
            h = o * tanh_c
            states.append(h)
            # d gate / d input (sigmoid' = s(1 - s); candidate: 4 s(1 - s) of 2x),
            # times what the gate's gradient takes besides dc or dh.
            factors = tf.concat([candidate, previous_c, i, tanh_c], -1)
            derivatives.append(sigmoid * (1 - sigmoid) * (scale * scale) * factors)
            cell_factors.append(o * (1 - tanh_c * tanh_c))
            forget.append(f)
        states = tf.stack(states)
        outputs = tf.transpose(_in_processing_order(states, backward), (2, 0, 1, 3))
        outputs = tf.cast(tf.reshape(outputs, (batch, steps, directions * units)), projected.dtype)
        return outputs, states, tf.stack(derivatives), tf.stack(cell_factors), tf.stack(forget)

    return tf.function(trained_forward_recurrence, jit_compile=True)


@functools.cache
def _xla_trained_backward():
    import tensorflow as tf

    def trained_backward_recurrence(upstream, states, derivatives, cell_factors, forget, recurrent, backward):
        # upstream: (N, T, D*H) in the compute dtype. Returns the gate
        # gradients (N*T, D*4H) in time order and the compute dtype (the
        # projection's layout), and the recurrent kernels' and biases' float32
        # gradients.
        batch, steps, directions, units = tf.shape(upstream)[0], upstream.shape[1], len(backward), recurrent.shape[1]
        dtype = upstream.dtype
        upstream = tf.reshape(tf.cast(upstream, "float32"), (batch, steps, directions, units))
        upstream = _in_processing_order(tf.transpose(upstream, (1, 2, 0, 3)), backward)
        state_grad = cell_grad = tf.zeros_like(states[0])
        gate_grads = [None] * steps
        for step in reversed(range(steps)):
            dh = upstream[step] + state_grad
            dc = cell_grad + dh * cell_factors[step]
            # dc for the input, forget and candidate gates, dh for the output
            # gate. (Broadcast over a gate axis instead, XLA recomputed the
            # chain of dc through the steps: 10x slower.)
            gate_grads[step] = derivatives[step] * tf.concat([dc, dc, dc, dh], -1)
            cell_grad = dc * forget[step]
            if step > 0:
                state_grad = tf.matmul(gate_grads[step], recurrent, transpose_b=True)
        # The recurrent kernels' gradient as one product per direction over
        # all steps and sequences: (D, T*N, H)^T (D, T*N, 4H).
        by_direction = tf.reshape(tf.stack(gate_grads, 1), (directions, -1, 4 * units))
        previous_states = tf.concat([tf.zeros_like(states[:1]), states[:-1]], 0)
        previous_states = tf.reshape(tf.transpose(previous_states, (1, 0, 2, 3)), (directions, -1, units))
        recurrent_grad = tf.matmul(previous_states, by_direction, transpose_a=True)
        bias_grad = tf.reduce_sum(by_direction, 1)
        grads = tf.stack(gate_grads)  # (T, D, N, 4H)
        in_time_order = tf.transpose(_in_processing_order(grads, backward), (2, 0, 1, 3))  # (N, T, D, 4H)
        gate_grads = tf.reshape(in_time_order, (-1, directions * recurrent.shape[2]))
        return tf.cast(gate_grads, dtype), recurrent_grad, bias_grad

    return tf.function(trained_backward_recurrence, jit_compile=True)


# An axis of a map with fewer sequences than this (batch times the other side)
# runs Keras' scans, one per direction, on JAX's fused route too: below it
# they were the faster (BENCHMARKS.md, "Issue 13, eighth round").
JAX_FUSED_MIN_SEQUENCES = 256


def jax_fuses(shape, time_axis):
    """Whether JAX's fused route runs `time_axis` of a map of this (B, H, W, C)
    shape as jax_fused_lstm (an unknown batch: yes)."""
    batch, other = shape[0], shape[3 - time_axis]
    return batch is None or other is None or batch * other >= JAX_FUSED_MIN_SEQUENCES


def jax_fused_lstm(rnn, x, time_axis):
    """A Keras LSTM (or its Bidirectional wrapper) along `time_axis` (1: the
    columns, 2: the rows) of a (B, H, W, C) map on JAX -> (B, H, W, D*H).

    One `lax.scan` runs every direction of the axis, each direction with its
    own products (a batched product of both was slower); Keras' loop runs one
    scan per direction. One step per iteration: unrolling more steps ran
    inference up to 2% faster and training slower, and compiled longer
    (BENCHMARKS.md, "Issue 13, eighth round"). Products in the compute dtype
    with float32 results; the state stays in float32."""
    import jax
    import jax.numpy as jnp

    directions = directions_of(rnn)
    dtype = x.dtype
    weights = [
        (ops.cast(d.cell.kernel.value, dtype), ops.cast(d.cell.recurrent_kernel.value, dtype),
         ops.cast(d.cell.bias.value, "float32"))
        for d in directions
    ]
    steps = x.shape[time_axis]
    sequences = jnp.moveaxis(x, time_axis, 0)  # (T, B, M, C)
    lead = sequences.shape[1:3]
    sequences = sequences.reshape(steps, -1, x.shape[-1])

    def step(state, t):
        new_state = []
        for d, (kernel, recurrent, bias), (h, c) in zip(directions, weights, state):
            inputs = sequences[steps - 1 - t] if d.go_backwards else sequences[t]
            gates = jnp.matmul(inputs, kernel, preferred_element_type="float32") + bias
            gates += jnp.matmul(h.astype(dtype), recurrent, preferred_element_type="float32")
            i, f, candidate, o = jnp.split(gates, 4, axis=-1)  # Keras' gate order
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(candidate)
            new_state.append((jax.nn.sigmoid(o) * jnp.tanh(c), c))
        return tuple(new_state), tuple(h.astype(dtype) for h, _ in new_state)

    zeros = jnp.zeros((sequences.shape[1], directions[0].units), "float32")
    _, states = jax.lax.scan(step, ((zeros, zeros),) * len(directions), jnp.arange(steps))
    states = [h[::-1] if d.go_backwards else h for d, h in zip(directions, states)]
    outputs = jnp.concatenate(states, -1).reshape(steps, *lead, -1)  # (T, B, M, D*H)
    return jnp.moveaxis(outputs, 0, time_axis)


def tensorflow_xla_norm_applies(block, training=None):
    """Whether a block's LayerNorms run in XLA on TensorFlow's fused route:
    as tensorflow_layer_norm in traced inference, as for the unrolled
    recurrence, and as tensorflow_trained_layer_norm in traced training."""
    if keras.backend.backend() != "tensorflow" or block.rnn_tokens.selected_route != "fused":
        return False
    return _traced_inference(training) or _traced_training(training)


def tensorflow_layer_norm(norm, x):
    """A LayerNormalization over the last axis as one XLA call (statistics in
    float32, output in the dtype of `x`, as Keras computes it): TensorFlow runs
    Keras' form as about ten separate passes over the tensor (BENCHMARKS.md)."""
    values = (keras_compat.stored_value(norm.gamma), keras_compat.stored_value(norm.beta))
    return _xla_layer_norm(float(norm.epsilon))(x, *values)


@functools.cache
def _xla_layer_norm(epsilon):
    import tensorflow as tf

    def layer_norm(x, gamma, beta):
        return tf.cast(_float32_layer_norm(x, gamma, beta, epsilon), x.dtype)

    return tf.function(layer_norm, jit_compile=True)


def tensorflow_trained_layer_norm(norm, x):
    """tensorflow_layer_norm for traced training, with a gradient of its own:
    one XLA call forward and one backward (Keras' form trains as about twenty
    separate passes over the tensor, BENCHMARKS.md). The statistics and the
    gradients in float32; the input's gradient in the dtype of `x`."""
    import tensorflow as tf

    gamma, beta = (tf.convert_to_tensor(keras_compat.stored_value(w)) for w in (norm.gamma, norm.beta))
    epsilon = float(norm.epsilon)

    @tf.custom_gradient
    def layer_norm(x, gamma, beta):
        y, mean, inverse = _xla_trained_norm_forward(epsilon)(x, gamma, beta)

        def gradient(upstream):
            return _xla_trained_norm_backward()(upstream, x, mean, inverse, gamma)

        return y, gradient

    return layer_norm(x, gamma, beta)


@functools.cache
def _xla_trained_norm_forward(epsilon):
    import tensorflow as tf

    def trained_layer_norm_forward(x, gamma, beta):
        # Returns the output and, for the backward pass, each row's mean and
        # 1 / standard deviation.
        y = tf.cast(x, "float32")
        mean, inverse = _float32_moments(y, epsilon)
        return tf.cast((y - mean) * (inverse * gamma) + beta, x.dtype), mean, inverse

    return tf.function(trained_layer_norm_forward, jit_compile=True)


@functools.cache
def _xla_trained_norm_backward():
    import tensorflow as tf

    def trained_layer_norm_backward(upstream, x, mean, inverse, gamma):
        upstream = tf.cast(upstream, "float32")
        normalized = (tf.cast(x, "float32") - mean) * inverse
        normalized_grad = upstream * gamma
        x_grad = inverse * (
            normalized_grad
            - _channel_mean(normalized_grad)
            - normalized * _channel_mean(normalized_grad * normalized)
        )
        gamma_grad, beta_grad = tf.split(_row_sums(tf.concat([upstream * normalized, upstream], -1)), 2)
        return tf.cast(x_grad, x.dtype), gamma_grad, beta_grad

    return tf.function(trained_layer_norm_backward, jit_compile=True)


def _channel_mean(y):
    """The mean over the last axis, kept as an axis of 1, as a product with a
    (C, 1) vector of 1/C: XLA's CPU reductions over the last axis ran slower
    (BENCHMARKS.md, ninth round)."""
    import tensorflow as tf

    channels = y.shape[-1]
    average = tf.fill((channels, 1), 1.0 / channels)
    mean = tf.matmul(tf.reshape(y, (-1, channels)), average)
    return tf.reshape(mean, tf.concat([tf.shape(y)[:-1], [1]], 0))


def _float32_moments(y, epsilon):
    """Each row's mean and 1 / sqrt(variance + epsilon) over the last axis."""
    import tensorflow as tf

    mean = _channel_mean(y)
    return mean, tf.math.rsqrt(_channel_mean(tf.square(y - mean)) + epsilon)


def _float32_layer_norm(x, gamma, beta, epsilon):
    """LayerNorm over the last axis in float32, as TensorFlow ops for XLA."""
    import tensorflow as tf

    y = tf.cast(x, "float32")
    mean, inverse = _float32_moments(y, epsilon)
    return (y - mean) * (inverse * gamma) + beta


def _tensorflow_block_lstm(rnn, sequences):
    """TensorFlow's BlockLSTM, one op per direction. Not BlockLSTMV2: it shares
    Keras' gate order, but its registered gradient is wrong in TF 2.21 (measured:
    outputs match, input gradients do not)."""
    import tensorflow as tf

    directions = directions_of(rnn)
    dtype = sequences.dtype
    time_major = tf.transpose(sequences, (1, 0, 2))
    outputs = []
    for direction in directions:
        cell, units = direction.cell, direction.cell.units
        reverse = direction.go_backwards
        inputs = tf.reverse(time_major, [0]) if reverse else time_major
        zeros = tf.zeros((tf.shape(inputs)[1], units), dtype)
        no_peephole = tf.zeros((units,), dtype)
        # The variables themselves: inside a mixed-precision call Keras' value
        # is a bfloat16 copy.
        kernel, recurrent, bias = (
            ops.cast(keras_compat.stored_value(v), dtype) for v in (cell.kernel, cell.recurrent_kernel, cell.bias)
        )
        kernel = tf.concat([kernel, recurrent], 0)
        h = tf.raw_ops.BlockLSTM(
            seq_len_max=tf.cast(tf.shape(inputs)[0], tf.int64),
            x=inputs,
            cs_prev=zeros,
            h_prev=zeros,
            w=_icfo(kernel),
            wci=no_peephole,
            wcf=no_peephole,
            wco=no_peephole,
            b=_icfo(bias),
            forget_bias=0.0,  # Keras keeps it in the bias
            cell_clip=-1.0,  # no clipping
            use_peephole=False,
        ).h
        outputs.append(tf.reverse(h, [0]) if reverse else h)
    return tf.transpose(tf.concat(outputs, -1), (1, 0, 2))


def _swap_first_two_gates(w, units):
    # Keras' GRU gates are (z, r, h), PyTorch's (r, z, n): a swap either way.
    import torch

    return torch.cat([w[units : 2 * units], w[:units], w[2 * units :]], dim=0)


def _torch_rnn_params(cell, rnn_type, dtype):
    """One direction's Keras variables in PyTorch's (w_ih, w_hh, b_ih, b_hh) form.
    The variables themselves stay the only copy, so gradients reach them."""
    import torch

    kernel = ops.cast(cell.kernel, dtype).T
    recurrent = ops.cast(cell.recurrent_kernel, dtype).T
    if kernel.is_cuda:
        # cuDNN views the weights flat (a transposed view fails there). The CPU
        # kernel takes the views: copying them was 9% of a batch-1 forward.
        kernel, recurrent = kernel.contiguous(), recurrent.contiguous()
    bias = ops.cast(cell.bias, dtype)
    if rnn_type == "gru":
        units = cell.units
        return [
            _swap_first_two_gates(kernel, units),
            _swap_first_two_gates(recurrent, units),
            _swap_first_two_gates(bias[0], units),
            _swap_first_two_gates(bias[1], units),
        ]
    return [kernel, recurrent, bias, torch.zeros_like(bias)]


def torch_fused_rnn(rnn, rnn_type, sequences):
    """Runs a Keras LSTM/GRU/SimpleRNN (or its Bidirectional wrapper) over
    (N, T, C) sequences with one call to ATen's fused RNN kernel."""
    import torch

    directions = directions_of(rnn)
    params = []
    for direction in directions:
        params += _torch_rnn_params(direction.cell, rnn_type, sequences.dtype)
    units = directions[0].cell.units
    h0 = torch.zeros(
        len(directions), sequences.shape[0], units, dtype=sequences.dtype, device=sequences.device
    )
    args = (params, True, 1, 0.0, torch.is_grad_enabled(), len(directions) == 2, True)
    if rnn_type == "lstm":
        return torch._VF.lstm(sequences, (h0, h0), *args)[0]
    if rnn_type == "gru":
        return torch._VF.gru(sequences, h0, *args)[0]
    return torch._VF.rnn_tanh(sequences, h0, *args)[0]


class _WeightCache:
    """One axis' recurrent weights in PyTorch's layout as contiguous copies, for
    calls without autograd (oneDNN's LSTM takes transposed views, but copies
    them strided on every call). Rebuilt whenever a variable's tensor or its
    in-place version counter changes (assign, optimizer steps, a stateless
    scope's values); the sources are held, so identity checks are sound."""

    def __init__(self):
        self.sources = ()
        self.versions = ()
        self.params = None

    def clear(self):
        self.sources, self.versions, self.params = (), (), None

    def get(self, sources, build):
        """`build()`'s copies of the tensors `sources`, made again whenever
        one of them is another tensor or was changed in place."""
        import torch

        if not _same_tensors(sources, self.sources, self.versions):
            self.clear()
            with torch.inference_mode(False), torch.no_grad():
                self.params = build()
            self.sources, self.versions = sources, tuple(t._version for t in sources)
        return self.params


def _direction_params(cell, rnn_type, contiguous=False, read=keras_compat.keras_value):
    """One direction's float32 variables as PyTorch's (w_ih, w_hh, b_ih, b_hh),
    without Keras ops (the dtype policy is plain float32 here)."""
    import torch

    kernel, recurrent, bias = read(cell.kernel).T, read(cell.recurrent_kernel).T, read(cell.bias)
    if rnn_type == "gru":
        units = cell.units
        swap = [_swap_first_two_gates(w, units) for w in (kernel, recurrent, bias[0], bias[1])]
        return [w.contiguous() for w in swap] if contiguous else swap
    # Contiguous for cuDNN, which views the weights flat, and for oneDNN, which
    # otherwise reorders the transposed views in the forward and the backward.
    kernel, recurrent = kernel.contiguous(), recurrent.contiguous()
    if contiguous:
        bias = bias.clone()
    return [kernel, recurrent, bias, torch.zeros_like(bias)]


def _torch_rnn_weights(rnn, rnn_type, cache, read):
    import torch

    cells = [direction.cell for direction in directions_of(rnn)]
    if torch.is_grad_enabled():
        return [w for cell in cells for w in _direction_params(cell, rnn_type, read=read)]
    sources = tuple(read(v) for cell in cells for v in (cell.kernel, cell.recurrent_kernel, cell.bias))
    if sources[0].is_meta:
        return [w for cell in cells for w in _direction_params(cell, rnn_type, read=read)]
    return cache.get(
        sources, lambda: [w for cell in cells for w in _direction_params(cell, rnn_type, contiguous=True, read=read)]
    )


def _same_tensors(sources, held, versions):
    """Whether `sources` are the very tensors `held`, unchanged in place since
    their `versions` were read: copies made from them then are still good."""
    return len(sources) == len(held) and all(
        a is b and a._version == version for a, b, version in zip(sources, held, versions)
    )


# Sequences this short run unrolled in torch ops on CPU: oneDNN's LSTM has a
# fixed cost per call that two steps do not repay (BENCHMARKS.md, "Issue 13,
# third round": the short-sequence table).
UNROLL_MAX_STEPS = 2


def _unrolled_torch_lstm(rnn, sequences, read):
    """A Keras LSTM (or its Bidirectional wrapper) over short (N, T, C)
    sequences, unrolled in torch ops on the variables in Keras' own layout
    (x @ kernel: no transposed weights to reorder, forward or backward)."""
    import torch

    batch, steps, channels = sequences.shape
    flat = sequences.reshape(batch * steps, channels)
    outputs = []
    for direction in directions_of(rnn):
        cell = direction.cell
        units = cell.units
        gates = torch.addmm(read(cell.bias), flat, read(cell.kernel)).view(batch, steps, 4 * units)
        recurrent = read(cell.recurrent_kernel)
        h = c = None  # zero state: the first step skips the recurrent product
        if torch.is_grad_enabled():
            # ...except under autograd, where every variable gets a gradient
            # (zero for the recurrent kernel of one step) as Keras' loop gives.
            h = c = sequences.new_zeros((batch, units))
        hs = [None] * steps
        for t in (range(steps - 1, -1, -1) if direction.go_backwards else range(steps)):
            h, c = _lstm_cell(gates[:, t] if h is None else torch.addmm(gates[:, t], h, recurrent), c, units)
            hs[t] = h
        outputs.append(torch.stack(hs, 1))
    return torch.cat(outputs, -1) if len(outputs) == 2 else outputs[0]


def _lstm_cell(gates, c, units):
    """One LSTM step from its gate inputs (Keras' order i, f, c, o along the
    last axis); c None is the zero state."""
    import torch

    i_f = torch.sigmoid(gates[..., : 2 * units])
    candidate = torch.tanh(gates[..., 2 * units : 3 * units]) * i_f[..., :units]
    c = candidate if c is None else torch.addcmul(candidate, i_f[..., units:], c)
    return torch.sigmoid(gates[..., 3 * units :]) * torch.tanh(c), c


def _square_unrolls(layer, x):
    """Whether a BiLSTM2D runs as _unrolled_torch_bilstm2d: inference on a CPU,
    bidirectional LSTMs over both axes of a square map short enough to unroll,
    outputs concatenated."""
    import torch

    _, height, width, _ = x.shape
    return (
        layer.rnn_type == "lstm" and layer.bidirectional and layer.union == "cat"
        and height == width <= UNROLL_MAX_STEPS and not x.is_cuda and not torch.is_grad_enabled()
    )


def _unrolled_torch_bilstm2d(layer, x, read):
    """Both axes and both directions of a BiLSTM2D over a square map of T <=
    UNROLL_MAX_STEPS rows, as four LSTMs stepped together: one product for
    every input projection, one batched product per later step, and each
    step's gate arithmetic once for all four (per-direction ops cost more in
    dispatch than in arithmetic at this size). -> (B, T, T, 4H), as the
    vertical then the horizontal Bidirectional output."""
    import torch

    batch, steps, _, channels = x.shape
    kernel, bias, recurrent = _square_weights(layer, read)
    units = recurrent.shape[1]
    # (B, T*T positions * 4 LSTMs, 4H): the LSTMs are the vertical forward and
    # backward, then the horizontal forward and backward.
    gates = torch.addmm(bias, x.reshape(-1, channels), kernel).view(batch, -1, 4 * units)
    reads, writes = _square_indices(steps, x.device)
    # (T steps, 4 LSTMs, B * T sequences, 4H): each LSTM's inputs step by step.
    gates = gates.index_select(1, reads).view(batch, steps, 4, steps, 4 * units)
    gates = gates.permute(1, 2, 0, 3, 4).reshape(steps, 4, -1, 4 * units)
    h = c = None
    hs = []
    for step in range(steps):
        h, c = _lstm_cell(gates[step] if h is None else torch.baddbmm(gates[step], h, recurrent), c, units)
        hs.append(h)
    # Back to the map: (B, T rows, T columns, 4 LSTMs * H).
    outputs = torch.stack(hs).view(steps, 4, batch, steps, units).permute(2, 0, 1, 3, 4)
    outputs = outputs.reshape(batch, -1, units).index_select(1, writes)
    return outputs.view(batch, steps, steps, 4 * units)


def _square_weights(layer, read):
    """The four LSTMs' kernels side by side (C, 16H), their biases (16H) and
    recurrent kernels stacked (4, H, 4H), copied once per change of a variable."""
    import torch

    cells = [d.cell for rnn in (layer.rnn_v, layer.rnn_h) for d in directions_of(rnn)]
    sources = tuple(read(v) for cell in cells for v in (cell.kernel, cell.recurrent_kernel, cell.bias))
    kernels, recurrents, biases = sources[0::3], sources[1::3], sources[2::3]
    return layer._cache_square.get(
        sources, lambda: (torch.cat(kernels, 1), torch.cat(biases), torch.stack(recurrents))
    )


@functools.cache
def _square_indices_cpu(steps):
    """Flat indices for _unrolled_torch_bilstm2d: `reads` takes the gate inputs
    (position, LSTM) in (step, LSTM, sequence) order, `writes` takes the states
    (step, LSTM, sequence) back in (row, column, LSTM) order."""
    import torch

    # Vertical sequences are columns (row = step), horizontal ones rows
    # (column = step); a backward LSTM steps from the far end.
    step, lstm, sequence = torch.meshgrid(torch.arange(steps), torch.arange(4), torch.arange(steps), indexing="ij")
    along = torch.where(lstm % 2 == 0, step, steps - 1 - step)
    row, column = torch.where(lstm < 2, along, sequence), torch.where(lstm < 2, sequence, along)
    reads = ((row * steps + column) * 4 + lstm).flatten()
    writes = torch.empty_like(reads)
    writes[reads] = torch.arange(reads.numel())
    return reads, writes


def _square_indices(steps, device):
    reads, writes = _square_indices_cpu(steps)
    return (reads, writes) if device.type == "cpu" else (reads.to(device), writes.to(device))


def _torch_rnn(rnn, rnn_type, sequences, weights):
    """torch_fused_rnn with the weights already in PyTorch's form."""
    import torch

    directions = 2 if isinstance(rnn, layers.Bidirectional) else 1
    units = rnn.forward_layer.cell.units if directions == 2 else rnn.cell.units
    h0 = sequences.new_zeros((directions, sequences.shape[0], units))
    args = (weights, True, 1, 0.0, torch.is_grad_enabled(), directions == 2, True)
    if rnn_type == "lstm":
        return torch._VF.lstm(sequences, (h0, h0), *args)[0]
    if rnn_type == "gru":
        return torch._VF.gru(sequences, h0, *args)[0]
    return torch._VF.rnn_tanh(sequences, h0, *args)[0]


# layer -> its fused sublayers, kept outside the layer: a tuple holding the
# layer itself among its attributes sends Keras' saver round in circles.
_FUSED_SUBLAYERS = weakref.WeakKeyDictionary()


def _fused_sublayers(layer):
    """The layer and every sublayer whose arithmetic the fused form runs (kept
    once built: the sublayers are made in __init__ and build)."""
    sublayers = _FUSED_SUBLAYERS.get(layer)
    if sublayers is None:
        block = layer if isinstance(layer, Sequencer2DBlock) else None
        tokens = block.rnn_tokens if block is not None else layer
        sublayers = [layer, tokens, *tokens.recurrent_layers()]
        if tokens.with_fc:
            sublayers.append(tokens.fc)  # None until built: blocks the fused form
        if block is not None:
            sublayers += [block.norm1, block.norm2, block.fc1, block.fc2]
        if layer.built:
            _FUSED_SUBLAYERS[layer] = sublayers = tuple(sublayers)
    return sublayers


def fused_call_blockers(layer, training=None, inputs=None):
    """Why a BiLSTM2D or Sequencer2DBlock cannot run its sublayers' arithmetic
    in one call with torch ops (the "fused" route's whole-layer form); an empty
    list when it can. Whatever needs Keras' per-layer path makes it step aside:
    another backend or route, a dtype policy other than plain float32
    (quantization, mixed precision; a block under mixed_bfloat16 without
    autograd has a bfloat16 form), LoRA, torch autocast, a keras.distribution,
    torch.compile (`jit_compile=True`: the weight copies kept between calls
    are Python state a compiled graph cannot follow, and Inductor fuses the
    per-layer path itself), and dropout active in training (drop path has a
    whole-block form: the same draws from the block's DropPath)."""
    if keras.backend.backend() != "torch":
        return ["backend"]
    blockers = []
    block = layer if isinstance(layer, Sequencer2DBlock) else None
    tokens = block.rnn_tokens if block is not None else layer
    if tokens.selected_route != "fused":
        blockers.append("route")
    if block is not None and training and block.drop_rate > 0:
        blockers.append("training with dropout")
    sublayers = _fused_sublayers(layer)
    import torch

    policies = {None if sub is None else sub.dtype_policy.name for sub in sublayers}
    # mixed_bfloat16 has a whole-block form for inference (bfloat16 copies of
    # the weights kept between calls); under autograd it runs layer by layer.
    bfloat16_inference = (
        policies == {"mixed_bfloat16"} and block is not None and not torch.is_grad_enabled()
        and not (training and block.drop_path_rate > 0)
    )
    if policies != {"float32"} and not bfloat16_inference:
        blockers.append("dtype policy or quantization")
    if any(sub.lora_enabled for sub in sublayers if isinstance(sub, layers.Dense)):
        blockers.append("LoRA")
    if keras.distribution.distribution() is not None:
        blockers.append("distribution")
    device = getattr(inputs, "device", None)
    if torch.is_autocast_enabled(device.type if device is not None and device.type != "meta" else "cpu"):
        blockers.append("autocast")
    if torch.compiler.is_compiling():
        blockers.append("torch.compile")
    return blockers


def _eager_float_torch(x):
    import torch

    return (
        isinstance(x, torch.Tensor)
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.ndim == 4
        and not x.is_meta
        and getattr(x, "_keras_mask", None) is None
    )


def _torch_axis(layer, rnn, sequences, cache, read):
    """One axis of a BiLSTM2D over (N, T, C) sequences with torch ops."""
    if layer.rnn_type == "lstm" and sequences.shape[1] <= UNROLL_MAX_STEPS and not sequences.is_cuda:
        return _unrolled_torch_lstm(rnn, sequences, read)
    return _torch_rnn(rnn, layer.rnn_type, sequences, _torch_rnn_weights(rnn, layer.rnn_type, cache, read))


def _torch_bilstm2d(layer, x, read, bfloat16=None, residual=None):
    """BiLSTM2D.call with torch ops only, on the layer's own variables (read
    with `read`, a keras_compat.variable_reader), or on their bfloat16 copies
    (a _Bfloat16Weights) for a mixed_bfloat16 block; plus `residual` if given
    (the block's skip connection, fused into fc)."""
    if bfloat16 is None and _square_unrolls(layer, x):
        x = _unrolled_torch_bilstm2d(layer, x, read)
    else:
        x = _torch_axes(layer, x, read, bfloat16)
    if layer.fc is not None:
        fc = (read(layer.fc.kernel), read(layer.fc.bias)) if bfloat16 is None else bfloat16.fc
        return _linear(x, *fc, residual=residual)
    return x if residual is None else residual + x


def _torch_axes(layer, x, read, bfloat16=None):
    """The vertical and horizontal RNNs of a BiLSTM2D with torch ops, joined by
    its union."""
    import torch

    batch, height, width, channels = x.shape
    outputs = []
    if layer.with_vertical:
        v = x.transpose(1, 2).reshape(-1, height, channels)
        if bfloat16 is None:
            v = _torch_axis(layer, layer.rnn_v, v, layer._cache_v, read)
        else:  # ATen's kernel at every length, as the layer-by-layer path runs it
            v = _torch_rnn(layer.rnn_v, layer.rnn_type, v, bfloat16.rnn_v)
        outputs.append(v.reshape(batch, width, height, layer.output_size).transpose(1, 2))
    if layer.with_horizontal:
        h = x.reshape(-1, width, channels)
        if bfloat16 is None:
            h = _torch_axis(layer, layer.rnn_h, h, layer._cache_h, read)
        else:
            h = _torch_rnn(layer.rnn_h, layer.rnn_type, h, bfloat16.rnn_h)
        outputs.append(h.reshape(batch, height, width, layer.output_size))
    if len(outputs) == 2:
        return torch.cat(outputs, dim=-1) if layer.union == "cat" else outputs[0] + outputs[1]
    return outputs[0]


def _dense(x, dense, read, gelu=False, residual=None):
    """A Dense layer's arithmetic on its kernel as Keras keeps it, (in, out): no
    transposed weight, so the backward writes the kernel's gradient as is."""
    return _linear(x, read(dense.kernel), read(dense.bias), gelu=gelu, residual=residual)


# Products under autograd of fewer multiply-adds than this take addmm: below
# it the autograd Function's own cost outweighed oneDNN's faster product
# (BENCHMARKS.md, "Issue 13, sixteenth round").
ONEDNN_TRAINED_MIN_PRODUCT = 2**23


def _linear(x, kernel, bias, gelu=False, residual=None):
    """x @ kernel + bias, then the exact GELU if `gelu`, or plus `residual`.
    On a CPU, oneDNN's linear: without autograd one call with the GELU or the
    sum as its post-op; under autograd, for products of at least
    ONEDNN_TRAINED_MIN_PRODUCT multiply-adds, _onednn_linear_function (ATen's
    addmm runs MKL's products, at half oneDNN's speed on an AMD Zen 5 CPU).
    Otherwise addmm and separate passes."""
    import torch
    import torch.nn.functional as F

    if _onednn_linear_applies(x, residual):
        if not torch.is_grad_enabled():
            return _onednn_linear(x, kernel, bias, gelu, residual)
        if x.numel() * kernel.shape[1] >= ONEDNN_TRAINED_MIN_PRODUCT:
            y = _onednn_linear_function().apply(x, kernel, bias, None if gelu else residual)
            return F.gelu(y) if gelu else y
    flat = torch.addmm(bias, x.reshape(-1, kernel.shape[0]), kernel)
    y = flat.view(*x.shape[:-1], kernel.shape[1])
    if gelu:
        y = F.gelu(y)
    return y if residual is None else residual + y


@functools.cache
def onednn_linear_available():
    """Whether this torch has ATen's oneDNN linear with fused post-ops (the
    private op TorchInductor emits for CPU linears: tests/test_routes.py fails
    loudly if a torch release drops or changes it)."""
    import torch

    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_linear_applies(x, residual):
    """oneDNN's linear: a CPU, float32 or bfloat16, and a residual of the
    output's own contiguous layout."""
    import torch

    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if residual is not None and not (residual.is_contiguous() and residual.dtype == x.dtype):
        return False
    return onednn_linear_available()


def _onednn_linear(x, kernel, bias, gelu=False, residual=None):
    """x @ kernel + bias, then the GELU or plus `residual`, as one call to
    oneDNN's linear (no backward of its own)."""
    import torch

    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, kernel.T, bias, "add")
    return torch.ops.mkldnn._linear_pointwise(x, kernel.T, bias, "gelu" if gelu else "none", [], "none")


def _onednn_product(a, b_transposed):
    """a @ b_transposed.T with oneDNN (2-D; views are taken as they are)."""
    import torch

    return torch.ops.mkldnn._linear_pointwise(a, b_transposed, None, "none", [], "none")


@functools.cache
def _onednn_linear_function():
    import torch

    class OneDNNLinear(torch.autograd.Function):
        """x @ kernel + bias (+ residual) with oneDNN's linear, forward and
        backward (the op itself has no backward). A backward that is itself
        differentiated (create_graph) runs ATen's products instead."""

        @staticmethod
        def forward(x, kernel, bias, residual):
            return _onednn_linear(x, kernel, bias, residual=residual)

        @staticmethod
        def setup_context(ctx, inputs, output):
            x, kernel, _, _ = inputs
            ctx.save_for_backward(x, kernel)

        @staticmethod
        def backward(ctx, upstream):
            x, kernel = ctx.saved_tensors
            needs = ctx.needs_input_grad
            flat_x = x.reshape(-1, x.shape[-1])
            flat = upstream.reshape(-1, upstream.shape[-1])
            grad_x = grad_kernel = None
            if torch.is_grad_enabled():
                if needs[0]:
                    grad_x = flat @ kernel.T
                if needs[1]:
                    grad_kernel = flat_x.T @ flat
            else:
                flat = flat.contiguous()
                if needs[0]:
                    grad_x = _onednn_product(flat, kernel)
                # x.T @ upstream: oneDNN ran it 1.5-3x faster with the
                # narrower of the two as its input than the other way round.
                if needs[1] and flat_x.shape[1] <= flat.shape[1]:
                    grad_kernel = _onednn_product(flat_x.T, flat.T)
                elif needs[1]:
                    grad_kernel = _onednn_product(flat.T, flat_x.T).T
            return (
                None if grad_x is None else grad_x.view(x.shape),
                grad_kernel,
                flat.sum(0) if needs[2] else None,
                upstream if needs[3] else None,
            )

    return OneDNNLinear


class _Bfloat16Weights:
    """A mixed_bfloat16 block's weights as bfloat16 copies, for inference:
    Keras' per-layer path casts every variable on every call. Rebuilt whenever
    a variable's tensor or its in-place version counter changes."""

    def __init__(self, block):
        import torch

        _, tokens, *_, _, _, fc1, fc2 = _fused_sublayers(block)
        self.sources = _bfloat16_sources(block)
        self.versions = tuple(t._version for t in self.sources)
        with torch.inference_mode(False), torch.no_grad():

            def params(rnn):
                if rnn is None:
                    return None
                directions = [
                    _direction_params(d.cell, tokens.rnn_type, contiguous=True, read=keras_compat.stored_value)
                    for d in directions_of(rnn)
                ]
                return [w.to(torch.bfloat16) for ws in directions for w in ws]

            def pair(d):
                if d is None:
                    return None
                return tuple(keras_compat.stored_value(v).to(torch.bfloat16) for v in (d.kernel, d.bias))

            self.rnn_v, self.rnn_h = params(tokens.rnn_v), params(tokens.rnn_h)
            self.fc, self.fc1, self.fc2 = pair(tokens.fc), pair(fc1), pair(fc2)

    def current(self, block):
        return _same_tensors(_bfloat16_sources(block), self.sources, self.versions)


def _bfloat16_sources(block):
    """The float32 tensors behind a block's bfloat16 copies."""
    _, tokens, *_, _, _, fc1, fc2 = _fused_sublayers(block)
    sources = []
    for rnn in (tokens.rnn_v, tokens.rnn_h):
        for direction in directions_of(rnn) if rnn is not None else ():
            cell = direction.cell
            sources += [cell.kernel, cell.recurrent_kernel, cell.bias]
    for dense in (tokens.fc, fc1, fc2):
        if dense is not None:
            sources += [dense.kernel, dense.bias]
    return tuple(keras_compat.stored_value(v) for v in sources)


_BFLOAT16_WEIGHTS = weakref.WeakKeyDictionary()


def _bfloat16_weights(block):
    weights = _BFLOAT16_WEIGHTS.get(block)
    if weights is None or not weights.current(block):
        _BFLOAT16_WEIGHTS[block] = weights = _Bfloat16Weights(block)
    return weights


def _torch_block(block, x, training=None):
    """Sequencer2DBlock.call with torch ops only: one Keras layer call instead
    of seven. Inference, or training without dropout; drop path as the
    block's DropPath draws it, in the same order (mixer, then MLP)."""
    import torch.nn.functional as F

    shape = (x.shape[-1],)
    # The sublayers, from the tuple kept at the first call (fewer
    # torch.nn.Module attribute look-ups).
    _, tokens, *_, n1, n2, fc1, fc2 = _fused_sublayers(block)
    if n1.dtype_policy.name == "mixed_bfloat16":
        return _torch_block_bfloat16(block, x)
    read = keras_compat.variable_reader(x)
    y = F.layer_norm(x, shape, read(n1.gamma), read(n1.beta), n1.epsilon)
    if training and block.drop_path_rate > 0:
        x = x + block.drop_path.dropped(_torch_bilstm2d(tokens, y, read))
        y = F.layer_norm(x, shape, read(n2.gamma), read(n2.beta), n2.epsilon)
        return x + block.drop_path.dropped(_dense(_dense(y, fc1, read, gelu=True), fc2, read))
    x = _torch_bilstm2d(tokens, y, read, residual=x)
    y = F.layer_norm(x, shape, read(n2.gamma), read(n2.beta), n2.epsilon)
    return _dense(_dense(y, fc1, read, gelu=True), fc2, read, residual=x)


def _torch_block_bfloat16(block, x):
    """_torch_block under mixed_bfloat16, for inference: the per-layer path's
    arithmetic (LayerNorm in float32, the rest in bfloat16) on weights cast once."""
    import torch

    weights = _bfloat16_weights(block)
    _, tokens, *_, n1, n2, _, _ = _fused_sublayers(block)
    x = x.to(torch.bfloat16)
    read = keras_compat.variable_reader(x)
    x = _torch_bilstm2d(tokens, _bfloat16_layer_norm(x, n1, read), read, bfloat16=weights, residual=x)
    return _linear(_linear(_bfloat16_layer_norm(x, n2, read), *weights.fc1, gelu=True), *weights.fc2, residual=x)


def _bfloat16_layer_norm(x, norm, read):
    """A float32 LayerNorm of a bfloat16 map, rounded to bfloat16. ATen's CPU
    kernel takes the bfloat16 map with float32 weights and computes in float32
    itself (no float32 copy of the map); its CUDA kernel wants the weights in
    the map's dtype, so there the map goes to float32 first: the same result."""
    import torch.nn.functional as F

    shape, gamma, beta = (x.shape[-1],), read(norm.gamma), read(norm.beta)
    if x.device.type == "cpu":
        return F.layer_norm(x, shape, gamma, beta, norm.epsilon)
    return F.layer_norm(x.float(), shape, gamma, beta, norm.epsilon).to(x.dtype)


def tensorflow_fused_mlp_applies(block):
    """Whether a block's MLP runs as tensorflow_fused_mlp: TensorFlow, the
    fused route (exports trace the Keras route, whose GELU pattern TFLite
    fuses), float32 or mixed_bfloat16 Dense layers without LoRA."""
    if keras.backend.backend() != "tensorflow" or block.rnn_tokens.selected_route != "fused":
        return False
    dense = (block.fc1, block.fc2)
    return all(d.dtype_policy.name in ("float32", "mixed_bfloat16") and not d.lora_enabled for d in dense)


def tensorflow_fused_mlp(fc1, fc2, x, residual=None):
    """fc2(gelu_exact(fc1(x))) as MatMul, BiasAdd and the erf form of GELU
    that TensorFlow's graph remapper fuses into one oneDNN MatMul with a GELU
    post-op. Keras' Dense multiplies a 4D input as a batched product and adds
    the bias after it, which the remapper cannot fuse (BENCHMARKS.md). Where
    tensorflow_plain_bfloat16_products says so, plain MatMuls with the biases
    and GELU in XLA. Plus `residual` (of the output's shape) if given, in one
    XLA call with fc2's bias."""
    import tensorflow as tf

    dtype = x.dtype
    shape = tf.shape(x)
    if tensorflow_plain_bfloat16_products(dtype):
        bias_gelu, bias_add = _bias_gelu, _bias_add
    else:
        bias_gelu, bias_add = lambda y, bias: _erf_gelu(tf.nn.bias_add(y, bias)), tf.nn.bias_add
    y = tf.reshape(x, (-1, x.shape[-1]))
    y = bias_gelu(tf.matmul(y, ops.cast(fc1.kernel, dtype)), ops.cast(fc1.bias, dtype))
    y, bias = tf.matmul(y, ops.cast(fc2.kernel, dtype)), ops.cast(fc2.bias, dtype)
    y = bias_add(y, bias) if residual is None else _xla_bias_residual()(y, bias, tf.reshape(residual, tf.shape(y)))
    return tf.reshape(y, tf.concat([shape[:-1], [fc2.units]], 0))


def tensorflow_fused_block_applies(block, training=None):
    """Whether a block runs as tensorflow_fused_block: traced inference on
    TensorFlow's fused route with plain bfloat16 products (AMX CPUs), its
    mixer's fc and MLP float32 or mixed_bfloat16 Dense layers without LoRA."""
    fc = block.rnn_tokens.fc
    return (
        tensorflow_xla_norm_applies(block, training)  # first: on other backends, no TensorFlow import
        and _traced_inference(training)
        and tensorflow_fused_mlp_applies(block)
        and fc is not None
        and fc.dtype_policy.name == block.fc1.dtype_policy.name
        and not fc.lora_enabled
        and tensorflow_plain_bfloat16_products(block.compute_dtype)
    )


def tensorflow_fused_block(block, x):
    """Sequencer2DBlock.call in traced inference with plain bfloat16 products:
    each bias joins its residual (and the second LayerNorm) in one XLA call, as
    oneDNN's post-ops do for torch, where the per-layer form makes separate
    passes over the map for the mixer's fc bias, both residual sums and fc2's
    bias. The same roundings to the compute dtype as the per-layer form."""
    import tensorflow as tf

    tokens, fc, norm2 = block.rnn_tokens, block.rnn_tokens.fc, block.norm2
    dtype, shape, channels = x.dtype, tf.shape(x), x.shape[-1]
    y = tokens.joined(tokens._axes(tensorflow_layer_norm(block.norm1, x), False))
    y = tf.matmul(tf.reshape(y, (-1, y.shape[-1])), ops.cast(fc.kernel, dtype))
    norm_weights = (keras_compat.stored_value(norm2.gamma), keras_compat.stored_value(norm2.beta))
    x, y = _xla_bias_residual_norm(float(norm2.epsilon))(
        y, ops.cast(fc.bias, dtype), tf.reshape(x, (-1, channels)), *norm_weights
    )
    return tf.reshape(tensorflow_fused_mlp(block.fc1, block.fc2, y, residual=x), shape)


def _bias_residual(y, bias, residual):
    """residual + (y + bias), each sum rounded to the compute dtype as Keras'
    Dense and residual add round them."""
    import tensorflow as tf

    y = tf.cast(tf.cast(y, "float32") + tf.cast(bias, "float32"), y.dtype)
    return tf.cast(tf.cast(residual, "float32") + tf.cast(y, "float32"), residual.dtype)


@functools.cache
def _xla_bias_residual_norm(epsilon):
    """(x, LayerNorm(x)) for x = residual + (y + bias), as one XLA call."""
    import tensorflow as tf

    def bias_residual_norm(y, bias, residual, gamma, beta):
        x = _bias_residual(y, bias, residual)
        return x, tf.cast(_float32_layer_norm(x, gamma, beta, epsilon), x.dtype)

    return tf.function(bias_residual_norm, jit_compile=True)


@functools.cache
def _xla_bias_residual():
    import tensorflow as tf

    return tf.function(_bias_residual, jit_compile=True)


def _erf_gelu(y):
    """The exact GELU in the form TensorFlow's remapper matches."""
    import tensorflow as tf

    return ((tf.math.erf(y * 0.7071067811865476) + 1.0) * 0.5) * y


@functools.cache
def _xla_bias_gelu():
    """_erf_gelu(y + bias) as one XLA call, in float32 as oneDNN's GELU
    post-op computes it, out in the dtype of `y`."""
    import tensorflow as tf

    def bias_gelu(y, bias):
        return tf.cast(_erf_gelu(tf.cast(y, "float32") + tf.cast(bias, "float32")), y.dtype)

    return tf.function(bias_gelu, jit_compile=True)


@functools.cache
def _xla_bias_add():
    """y + bias as an XLA call: as TensorFlow ops, the remapper would fuse it
    with the MatMul before it into oneDNN's inner product."""
    import tensorflow as tf

    return tf.function(lambda y, bias: y + bias, jit_compile=True)


def _bias_gelu(y, bias):
    """_xla_bias_gelu with a gradient of its own, one XLA call too."""
    import tensorflow as tf

    @tf.custom_gradient
    def bias_gelu(y, bias):
        return _xla_bias_gelu()(y, bias), lambda upstream: _xla_bias_gelu_gradient()(upstream, y, bias)

    return bias_gelu(y, bias)


@functools.cache
def _xla_bias_gelu_gradient():
    import tensorflow as tf

    def bias_gelu_gradient(upstream, y, bias):
        z = tf.cast(y, "float32") + tf.cast(bias, "float32")
        # d/dz z * Phi(z) = Phi(z) + z * phi(z), the normal's CDF and density.
        slope = (tf.math.erf(z * 0.7071067811865476) + 1.0) * 0.5 + z * tf.exp(-0.5 * z * z) * 0.3989422804014327
        z_grad = tf.cast(upstream, "float32") * slope
        return tf.cast(z_grad, y.dtype), tf.cast(_row_sums(z_grad), bias.dtype)

    return tf.function(bias_gelu_gradient, jit_compile=True)


def _bias_add(y, bias):
    """_xla_bias_add with a gradient of its own: the bias's as one XLA call."""
    import tensorflow as tf

    @tf.custom_gradient
    def bias_add(y, bias):
        return _xla_bias_add()(y, bias), lambda upstream: (upstream, _xla_bias_gradient()(upstream, bias.dtype))

    return bias_add(y, bias)


@functools.cache
def _xla_bias_gradient():
    import tensorflow as tf

    def bias_gradient(upstream, dtype):
        return tf.cast(_row_sums(tf.cast(upstream, "float32")), dtype)

    return tf.function(bias_gradient, jit_compile=True)


def _row_sums(y):
    """The sums of a float32 tensor over every axis but the last, as a product
    with a row of ones: XLA's CPU reductions over leading axes ran several
    times slower (BENCHMARKS.md, "Issue 13, fourteenth round")."""
    import tensorflow as tf

    rows = tf.reshape(y, (-1, y.shape[-1]))
    return tf.matmul(tf.ones((1, tf.shape(rows)[0])), rows)[0]


def gelu_exact(x):
    """timm's nn.GELU (the exact erf form). TensorFlow's own gelu is written with
    Erfc, which tf2onnx cannot convert, so on TensorFlow it is spelled with Erf
    (TFLite fuses this pattern into its builtin GELU)."""
    if keras.backend.backend() == "tensorflow":
        return 0.5 * x * (1.0 + ops.erf(x * 0.7071067811865476))
    return ops.gelu(x, approximate=False)


def _identity(x, training=None):
    return x


def _sublayer_dtype(layer, dtype):
    """The dtype a composite layer hands its sublayers: a DTypePolicyMap as
    given (each sublayer finds its own policy by path: a quantized model's
    saved config), else the layer's own policy."""
    if isinstance(dtype, keras.dtype_policies.DTypePolicyMap):
        return dtype
    return layer.dtype_policy


def _dtype_entry(layer, sublayers):
    """The layer's "dtype" config entry where a sublayer's policy differs from
    its own (Model.quantize quantizes the Dense sublayers): a DTypePolicyMap, so
    a saved model rebuilds them quantized and its weights load. Else nothing
    (Keras' own entry stands)."""
    own = layer.dtype_policy
    changed = {sub.path: sub.dtype_policy for sub in sublayers if sub is not None and sub.dtype_policy.name != own.name}
    if not changed:
        return {}
    policy_map = keras.dtype_policies.DTypePolicyMap(default_policy=own, policy_map=changed)
    return {"dtype": keras.dtype_policies.serialize(policy_map)}


@_serializable
class DropPath(layers.Layer):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"DropPath rate must be in [0, 1). Received: rate={rate}")
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed) if rate > 0 else None

    def call(self, x, training=None):
        if not training or self.rate == 0.0:
            return x
        return self.dropped(x)

    def dropped(self, x):
        """The training-time arithmetic: each sample's x kept and scaled by
        1 / (1 - rate), or zeroed; one draw from the layer's seed generator."""
        keep_prob = 1.0 - self.rate
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        random = keras.random.uniform(shape, seed=self.seed_generator, dtype=x.dtype)
        mask = ops.floor(keep_prob + random)
        return x / keep_prob * mask

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


@_serializable
class BiLSTM2D(layers.Layer):
    """Vertical and horizontal (bi)directional RNNs over a (B, H, W, C) map.

    The vertical RNN runs down every column (B*W sequences of length H) and the
    horizontal one along every row (B*H sequences of length W); each has one
    weight set shared by all columns or rows. Their outputs are concatenated
    (or added) and fused back to C channels by a pointwise Dense.

    Args:
        hidden_size: units of each recurrent direction.
        rnn_type: "lstm" (the paper), "gru" or "rnn" (tanh SimpleRNN).
        bidirectional: run each axis in both directions.
        union: "cat", "add", "vertical" (columns only) or "horizontal" (rows only).
        with_fc: fuse with a pointwise Dense. Without it, the RNN output width
            must already equal the input width.
        route: "auto", "keras" or "fused" (see `select_route`); every route uses
            the same variables. `selected_route` says which one runs.
    """

    def __init__(
        self,
        hidden_size,
        rnn_type="lstm",
        bidirectional=True,
        union="cat",
        with_fc=True,
        route="auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._sublayer_dtype = _sublayer_dtype(self, kwargs.get("dtype"))
        if rnn_type not in RNN_TYPES:
            raise ValueError(
                f"Unrecognized rnn_type: {rnn_type!r}. Expected one of {RNN_TYPES}."
            )
        self.rnn_type = rnn_type
        self.route = route
        if union not in UNIONS:
            raise ValueError("Unrecognized union: " + str(union))
        self.hidden_size = int(hidden_size)
        self.bidirectional = bool(bidirectional)
        self.union = union
        self.with_fc = bool(with_fc)
        self.output_size = 2 * self.hidden_size if self.bidirectional else self.hidden_size
        self.with_vertical = union != "horizontal"
        self.with_horizontal = union != "vertical"
        self.rnn_v = self._make_rnn("rnn_v") if self.with_vertical else None
        self.rnn_h = self._make_rnn("rnn_h") if self.with_horizontal else None
        self.fc = None
        self._cache_v, self._cache_h, self._cache_square = _WeightCache(), _WeightCache(), _WeightCache()

    @property
    def route(self):
        return self._route

    @route.setter
    def route(self, route):
        # Validated on assignment, so a per-layer override fails at once.
        self.selected_route = select_route(route, self.rnn_type)
        self._route = route
        # BlockLSTM has no XLA kernel.
        self.supports_jit = not (self.selected_route == "fused" and keras.backend.backend() == "tensorflow")

    def _run(self, rnn, sequences, training):
        # JAX's fused route runs Keras' scans where jax_fuses says no.
        if self.selected_route == "fused" and keras.backend.backend() != "jax":
            if keras.backend.backend() == "torch":
                return torch_fused_rnn(rnn, self.rnn_type, sequences)
            return tensorflow_fused_lstm(rnn, sequences, training)
        if keras.backend.backend() == "jax" and keras.backend.standardize_dtype(sequences.dtype) != "float32":
            # JAX's cuDNN RNN (jax.experimental.rnn) fails to lower bfloat16
            # ("Unknown output type bfloat16", measured on an H200).
            with cudnn_disabled(directions_of(rnn)):
                return rnn(sequences)
        return rnn(sequences)

    def _tensorflow_unrolls(self, steps, training):
        # The columns of the map as they lie: no transposes in or out.
        if self.selected_route != "fused" or keras.backend.backend() != "tensorflow":
            return False
        return tensorflow_unrolls(steps, training)

    def _make_rnn(self, name):
        rnn = make_recurrent_layer(
            self.rnn_type, self.hidden_size, name=f"{name}_forward", dtype=self._sublayer_dtype
        )
        if not self.bidirectional:
            return rnn
        with keras_compat.outside_object_sharing_scope(), keras_compat.tensorflow_left_unimported():
            return layers.Bidirectional(rnn, merge_mode="concat", name=name)

    @property
    def union_size(self):
        return 2 * self.output_size if self.union == "cat" else self.output_size

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError("BiLSTM2D needs a known channel dimension.")
        if not self.with_fc and self.union_size != channels:
            # Same check and wording as the reference implementation.
            raise ValueError(
                f"The output channel {self.union_size} is different from the "
                f"input channel {channels}."
            )
        for rnn in (self.rnn_v, self.rnn_h):
            if rnn is not None:
                rnn.build((None, None, channels))
        if self.with_fc:
            self.fc = BiasFusedDense(channels, name="fc", dtype=self._sublayer_dtype)
            self.fc.build(tuple(input_shape[:-1]) + (self.union_size,))

    def call(self, x, training=None):
        if self.selected_route == "fused" and keras.backend.backend() == "torch":
            if not fused_call_blockers(self, inputs=x):
                return _torch_bilstm2d(self, x, keras_compat.variable_reader(x))
        x = self.joined(self._axes(x, training))
        if self.fc is not None:
            x = self.fc(x)
        return x

    def joined(self, outputs):
        """The axes' outputs joined by the layer's union."""
        if len(outputs) == 1:
            return outputs[0]
        return ops.concatenate(outputs, axis=-1) if self.union == "cat" else outputs[0] + outputs[1]

    def _axes(self, x, training):
        """The vertical then the horizontal RNN's outputs, each (B, H, W, D*H)."""
        shape = ops.shape(x)
        batch, height, width, channels = shape[0], shape[1], shape[2], x.shape[-1]
        outputs = []
        if self.with_vertical and self._jax_fuses(x, 1):
            outputs.append(jax_fused_lstm(self.rnn_v, x, 1))
        elif self.with_vertical and self._tensorflow_unrolls(x.shape[1], training):
            outputs.append(tensorflow_unrolled_lstm(self.rnn_v, x))
        elif self.with_vertical:
            v = ops.transpose(x, (0, 2, 1, 3))
            v = ops.reshape(v, (-1, height, channels))
            v = self._run(self.rnn_v, v, training)
            v = ops.reshape(v, (batch, width, height, self.output_size))
            outputs.append(ops.transpose(v, (0, 2, 1, 3)))
        if self.with_horizontal and self._jax_fuses(x, 2):
            outputs.append(jax_fused_lstm(self.rnn_h, x, 2))
        elif self.with_horizontal:
            h = ops.reshape(x, (-1, width, channels))
            h = self._run(self.rnn_h, h, training)
            outputs.append(ops.reshape(h, (batch, height, width, self.output_size)))
        return outputs

    def _jax_fuses(self, x, time_axis):
        if self.selected_route != "fused" or keras.backend.backend() != "jax":
            return False
        return jax_fuses(x.shape, time_axis)

    def compute_output_shape(self, input_shape):
        if self.with_fc:
            return input_shape
        return tuple(input_shape[:-1]) + (self.union_size,)

    def recurrent_layers(self):
        """The LSTM/GRU/SimpleRNN layers, forward before backward, vertical first."""
        return [d for rnn in (self.rnn_v, self.rnn_h) if rnn is not None for d in directions_of(rnn)]

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_size": self.hidden_size,
            "rnn_type": self.rnn_type,
            "bidirectional": self.bidirectional,
            "union": self.union,
            "with_fc": self.with_fc,
            "route": self.route,
            **_dtype_entry(self, [self.fc]),
        }


@_serializable
class Sequencer2DBlock(layers.Layer):
    """Pre-norm residual block: x + DropPath(BiLSTM2D(LN(x))), x + DropPath(Mlp(LN(x)))."""

    def __init__(
        self,
        hidden_size,
        mlp_ratio=3.0,
        rnn_type="lstm",
        bidirectional=True,
        union="cat",
        with_fc=True,
        drop_rate=0.0,
        drop_path_rate=0.0,
        rnn_route="auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_size = int(hidden_size)
        self.mlp_ratio = float(mlp_ratio)
        self.rnn_type = rnn_type
        self.bidirectional = bool(bidirectional)
        self.union = union
        self.with_fc = bool(with_fc)
        self.drop_rate = float(drop_rate)
        self.drop_path_rate = float(drop_path_rate)
        policy = self._sublayer_dtype = _sublayer_dtype(self, kwargs.get("dtype"))
        self.norm1 = layers.LayerNormalization(
            epsilon=LAYER_NORM_EPSILON, name="norm1", dtype=policy
        )
        self.rnn_tokens = BiLSTM2D(
            hidden_size,
            rnn_type=rnn_type,
            bidirectional=bidirectional,
            union=union,
            with_fc=with_fc,
            route=rnn_route,
            name="rnn_tokens",
            dtype=policy,
        )
        self.norm2 = layers.LayerNormalization(
            epsilon=LAYER_NORM_EPSILON, name="norm2", dtype=policy
        )
        self.drop_path = DropPath(drop_path_rate, name="drop_path", dtype=policy)
        self.mlp_dropout = layers.Dropout(drop_rate, name="mlp_dropout", dtype=policy)
        self.fc1 = None
        self.fc2 = None

    def build(self, input_shape):
        dim = input_shape[-1]
        policy = self._sublayer_dtype
        self.norm1.build(input_shape)
        self.rnn_tokens.build(input_shape)
        self.norm2.build(input_shape)
        # Built here too: an unbuilt sublayer makes JAX's predict() run eagerly once.
        self.drop_path.build(input_shape)
        self.mlp_dropout.build(input_shape)
        # timm's init: Xavier-uniform kernels (Keras' default), MLP biases N(0, 1e-6).
        mlp_bias = keras.initializers.RandomNormal(stddev=1e-6)
        self.fc1 = BiasFusedDense(
            int(self.mlp_ratio * dim), bias_initializer=mlp_bias, name="fc1", dtype=policy
        )
        self.fc1.build(input_shape)
        self.fc2 = BiasFusedDense(dim, bias_initializer=mlp_bias, name="fc2", dtype=policy)
        self.fc2.build(tuple(input_shape[:-1]) + (int(self.mlp_ratio * dim),))

    def __call__(self, *args, **kwargs):
        # The fused route's whole-block form on torch skips Keras' per-call
        # machinery too, where none of it applies: an eager call on a built
        # block with one float32 or bfloat16 torch tensor (not a symbolic or meta one) and
        # at most `training`, known whenever dropout or drop path could act.
        if (
            len(args) == 1
            and keras.backend.backend() == "torch"
            and self.built
            and self.rnn_tokens.selected_route == "fused"
            and kwargs.keys() <= {"training"}
            and _eager_float_torch(args[0])
        ):
            training = kwargs.get("training")
            undecided = training is None and (self.drop_path_rate > 0 or self.drop_rate > 0)
            if not undecided and not fused_call_blockers(self, training, inputs=args[0]):
                keras_compat.mark_called(self)
                return _torch_block(self, args[0], training)
        return super().__call__(*args, **kwargs)

    def call(self, x, training=None):
        if self.rnn_tokens.selected_route == "fused" and keras.backend.backend() == "torch":
            if not fused_call_blockers(self, training, inputs=x):
                return _torch_block(self, x, training)
        if tensorflow_fused_block_applies(self, training):
            return tensorflow_fused_block(self, x)
        # Identity layers are not called: each Keras layer call has a per-call
        # cost on torch (BENCHMARKS.md, host time).
        drop_path = self.drop_path if training and self.drop_path_rate > 0 else _identity
        dropout = self.mlp_dropout if training and self.drop_rate > 0 else _identity
        norm1, norm2 = self.norm1, self.norm2
        if tensorflow_xla_norm_applies(self, training):
            layer_norm = tensorflow_trained_layer_norm if training else tensorflow_layer_norm
            norm1, norm2 = functools.partial(layer_norm, self.norm1), functools.partial(layer_norm, self.norm2)
        x = x + drop_path(self.rnn_tokens(norm1(x)), training=training)
        if dropout is _identity and tensorflow_fused_mlp_applies(self):
            y = tensorflow_fused_mlp(self.fc1, self.fc2, norm2(x))
        else:
            y = self.fc1(norm2(x))
            y = gelu_exact(y)
            y = dropout(y, training=training)
            y = dropout(self.fc2(y), training=training)
        return x + drop_path(y, training=training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_size": self.hidden_size,
            "mlp_ratio": self.mlp_ratio,
            "rnn_type": self.rnn_type,
            "bidirectional": self.bidirectional,
            "union": self.union,
            "with_fc": self.with_fc,
            "drop_rate": self.drop_rate,
            "drop_path_rate": self.drop_path_rate,
            "rnn_route": self.rnn_tokens.route,
            **_dtype_entry(self, [self.fc1, self.fc2, self.rnn_tokens.fc]),
        }
