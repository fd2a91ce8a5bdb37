"""One BiLSTM2D at Sequencer2D-S's stage shapes, on the current Keras backend:
milliseconds per call for each way of running its LSTMs.

    KERAS_BACKEND=torch python benchmarks/bilstm2d_layer.py

- keras:   Keras' Bidirectional(LSTM) loops (route "keras");
- fused:   the backend's fused kernel (route "fused"): PyTorch's RNN kernel, one
  call per axis, on torch; on TensorFlow, traced as predict traces it, the
  XLA-compiled unrolled recurrence; on JAX one scan per axis for both
  directions (`layers.jax_fused_lstm`);
- batched: a prototype kept for the record, not shipped: the four directions'
  input projections as one matmul, then one scan advancing all four recurrences
  together (a batched matmul per step). Measured slower than "keras" on every
  backend at batch 16, and on TF/JAX at batch 1 too.
"""

import os
import statistics
import sys
import time

import torch  # noqa: F401  (before TensorFlow: see tests/conftest.py)
import keras
import numpy as np
from keras import ops

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from keras_sequencer.layers import BiLSTM2D  # noqa: E402

# (batch, side, channels, hidden): stage 1 and stages 2-4 of sequencer2d_s at 224.
SHAPES = [(16, 32, 192, 48), (16, 16, 384, 96), (1, 32, 192, 48), (1, 16, 384, 96)]


def batched_directions(x, kernels, recurrent_kernels, biases, hidden):
    """Square maps only. Directions in Keras' order: v fwd, v bwd, h fwd, h bwd."""
    b, h, w, c = ops.shape(x)[0], ops.shape(x)[1], ops.shape(x)[2], x.shape[-1]
    gates = ops.matmul(ops.reshape(x, (-1, c)), ops.concatenate(kernels, -1)) + ops.concatenate(biases, -1)
    gates = ops.reshape(gates, (b, h, w, 4, 4 * hidden))
    vertical = ops.reshape(ops.transpose(gates[:, :, :, 0:2], (1, 3, 0, 2, 4)), (h, 2, -1, 4 * hidden))
    horizontal = ops.reshape(ops.transpose(gates[:, :, :, 2:4], (2, 3, 0, 1, 4)), (w, 2, -1, 4 * hidden))

    def backward_reversed(p):
        return ops.stack([p[:, 0], ops.flip(p[:, 1], axis=0)], axis=1)

    sequence = ops.concatenate([backward_reversed(vertical), backward_reversed(horizontal)], axis=1)
    recurrent = ops.stack(recurrent_kernels, axis=0)
    zeros = ops.zeros((4, ops.shape(sequence)[2], hidden), dtype=x.dtype)

    def step(state, p):
        hs, cs = state[0], state[1]
        i, f, g, o = ops.split(p + ops.matmul(hs, recurrent), 4, axis=-1)
        cs = ops.sigmoid(f) * cs + ops.sigmoid(i) * ops.tanh(g)
        hs = ops.sigmoid(o) * ops.tanh(cs)
        return ops.stack([hs, cs]), hs

    if keras.backend.backend() == "tensorflow":  # keras.ops.scan mis-nests this carry on TF
        import tensorflow as tf

        out = tf.scan(lambda s, p: step(s, p)[0], sequence, initializer=ops.stack([zeros, zeros]))[:, 0]
    else:
        out = ops.scan(step, ops.stack([zeros, zeros]), sequence)[1]
    v = ops.transpose(ops.reshape(backward_reversed(out[:, 0:2]), (h, 2, b, w, hidden)), (2, 0, 3, 1, 4))
    hz = ops.transpose(ops.reshape(backward_reversed(out[:, 2:4]), (w, 2, b, h, hidden)), (2, 3, 0, 1, 4))
    return ops.concatenate([ops.reshape(v, (b, h, w, 2 * hidden)), ops.reshape(hz, (b, h, w, 2 * hidden))], -1)


def runners(layer, x, hidden):
    """name -> a function running the layer once and returning numpy."""
    backend = keras.backend.backend()
    directions = layer.recurrent_layers()
    cells = [d.cell for d in directions]

    def batched(inputs):
        values = [[v.value for v in group] for group in (
            [c.kernel for c in cells], [c.recurrent_kernel for c in cells], [c.bias for c in cells])]
        return layer.fc(batched_directions(inputs, *values, hidden))

    def keras_route(inputs):
        return layer(inputs)

    if backend == "tensorflow":
        import tensorflow as tf

        def traced(route):
            layer.route = route  # read while tracing
            fn = tf.function(keras_route)
            fn.get_concrete_function(tf.TensorSpec(x.shape, "float32"))
            return fn

        fns = {"keras": traced("keras"), "fused": traced("fused"),
               "batched": tf.function(batched, autograph=False)}
        return {name: (lambda f=f: f(x).numpy()) for name, f in fns.items()}
    if backend == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def jitted(route):
            layer.route = route  # read while tracing
            fn = jax.jit(lambda t, inputs: layer.stateless_call(t, non_trainable, inputs)[0])
            fn(trainable, x)  # traced now, with this route
            return fn

        keras_jit, fused_jit = jitted("keras"), jitted("fused")

        def batched_stateless(t, inputs):
            with keras.StatelessScope(state_mapping=list(zip(layer.trainable_variables, t))):
                return batched(inputs)

        batched_jit = jax.jit(batched_stateless)
        return {"keras": lambda: np.asarray(keras_jit(trainable, x)),
                "fused": lambda: np.asarray(fused_jit(trainable, x)),
                "batched": lambda: np.asarray(batched_jit(trainable, x))}
    x_torch = torch.from_numpy(x)

    def route(name):
        def run():
            layer.route = name
            with torch.inference_mode():
                return layer(x_torch).numpy()

        return run

    def batched_torch():
        with torch.inference_mode():
            return batched(x_torch).numpy()

    return {"keras": route("keras"), "fused": route("fused"), "batched": batched_torch}


def median_ms(fn, repeats=5):
    fn()
    fn()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return 1000 * statistics.median(times)


def main():
    print(f"backend {keras.backend.backend()}: ms per BiLSTM2D call (max abs diff to 'keras')")
    for batch, side, channels, hidden in SHAPES:
        layer = BiLSTM2D(hidden)
        x = np.random.default_rng(0).normal(size=(batch, side, side, channels)).astype("float32")
        layer.build(x.shape)
        runs = runners(layer, x, hidden)
        reference = runs["keras"]()
        cells = []
        for name, run in runs.items():
            diff = np.abs(run() - reference).max()
            cells.append(f"{name} {median_ms(run):.1f} ({diff:.0e})")
        print(f"batch {batch}, {side}x{side}x{channels}, hidden {hidden}: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
