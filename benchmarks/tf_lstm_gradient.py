"""Prototype for TensorFlow's LSTM training step (issue 13, twelfth round): one
LSTM direction pair's forward and backward as BlockLSTM + BlockLSTMGrad (what the
fused route trains with, in float32 under mixed precision) against a custom
gradient whose products run as whole-sequence matrix products in the compute
dtype (bf16 on AMX) around two XLA recurrences (the forward keeps the gate
activations and cells; the backward steps the gate gradients). Not shipped:
BENCHMARKS.md has the numbers and what a route would need.

    python benchmarks/tf_lstm_gradient.py N T C H DTYPE [ROUNDS]
    python benchmarks/tf_lstm_gradient.py 256 16 384 96 bfloat16 9   # stages 2-4 of sequencer2d_s, batch 16
    python benchmarks/tf_lstm_gradient.py model POLICY BATCH ROUNDS [MAX_STEPS]
    python benchmarks/tf_lstm_gradient.py model mixed_bfloat16 16 5 16

One layer: prints each output's and gradient's largest difference between the
two, then the medians and the paired ratio (custom / BlockLSTM; below 1 is
faster). `model`: sequencer2d_s's training step with the LSTMs of sequences
of up to MAX_STEPS steps in the custom form; the first two steps' losses of
each, then the paired ratio.
"""

import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

def icfo(w):  # Keras i,f,c,o -> BlockLSTM i,c,f,o
    i, f, c, o = tf.split(w, 4, axis=-1); return tf.concat([i, c, f, o], -1)

def block_lstm(x, kernel, recurrent, bias, dtype):
    # x (N,T,C) in dtype; BlockLSTM in float32 as the package does under mixed precision
    xt = tf.transpose(tf.cast(x, tf.float32), (1, 0, 2))
    zeros = tf.zeros((tf.shape(xt)[1], recurrent.shape[0])); nop = tf.zeros((recurrent.shape[0],))
    h = tf.raw_ops.BlockLSTM(seq_len_max=tf.cast(tf.shape(xt)[0], tf.int64), x=xt, cs_prev=zeros, h_prev=zeros,
        w=icfo(tf.concat([kernel, recurrent], 0)), wci=nop, wcf=nop, wco=nop, b=icfo(bias), forget_bias=0.0,
        cell_clip=-1.0, use_peephole=False).h
    return tf.cast(tf.transpose(h, (1, 0, 2)), dtype)

@tf.function(jit_compile=True)
def fwd_rec(projected, recurrent):
    # projected (T,N,4H) f32 incl. bias; recurrent (H,4H) f32
    T = projected.shape[0]; H = recurrent.shape[0]
    h = tf.zeros((tf.shape(projected)[1], H)); c = tf.zeros_like(h)
    hs, cs, acts = [], [], []
    for t in range(T):
        g = projected[t] + tf.matmul(h, recurrent)
        i, f, gg, o = tf.split(g, 4, -1)
        i, f, gg, o = tf.sigmoid(i), tf.sigmoid(f), tf.tanh(gg), tf.sigmoid(o)
        c = f * c + i * gg
        h = o * tf.tanh(c)
        hs.append(h); cs.append(c); acts.append(tf.concat([i, f, gg, o], -1))
    return tf.stack(hs), tf.stack(cs), tf.stack(acts)

@tf.function(jit_compile=True)
def bwd_rec(dh_out, cs, acts, recurrent):
    T = dh_out.shape[0]; H = recurrent.shape[0]
    dh_next = tf.zeros_like(dh_out[0]); dc_next = tf.zeros_like(dh_out[0])
    dgs = [None] * T
    for t in reversed(range(T)):
        i, f, gg, o = tf.split(acts[t], 4, -1)
        c = cs[t]; c_prev = cs[t - 1] if t > 0 else tf.zeros_like(c)
        tc = tf.tanh(c)
        dh = dh_out[t] + dh_next
        do = dh * tc
        dc = dc_next + dh * o * (1 - tc * tc)
        di = dc * gg; dgg = dc * i; df = dc * c_prev
        dc_next = dc * f
        dg = tf.concat([di * i * (1 - i), df * f * (1 - f), dgg * (1 - gg * gg), do * o * (1 - o)], -1)
        dgs[t] = dg
        if t > 0:
            dh_next = tf.matmul(dg, recurrent, transpose_b=True)
    return tf.stack(dgs)

def custom_lstm(x, kernel, recurrent, bias, dtype):
    @tf.custom_gradient
    def run(x, kernel, recurrent, bias):
        N, T, C = x.shape
        xk = tf.cast(kernel, dtype)
        proj = tf.matmul(tf.reshape(x, (-1, C)), xk)
        proj = tf.transpose(tf.reshape(tf.cast(proj, tf.float32), (N, T, -1)), (1, 0, 2)) + bias
        hs, cs, acts = fwd_rec(proj, recurrent)
        out = tf.cast(tf.transpose(hs, (1, 0, 2)), dtype)
        def grad(dout):
            dh = tf.transpose(tf.cast(dout, tf.float32), (1, 0, 2))
            dg = bwd_rec(dh, cs, acts, recurrent)  # (T,N,4H)
            dg_flat = tf.reshape(tf.transpose(dg, (1, 0, 2)), (N * T, -1))
            dg_dt = tf.cast(dg_flat, dtype)
            dx = tf.reshape(tf.matmul(dg_dt, xk, transpose_b=True), (N, T, C))
            dkernel = tf.cast(tf.matmul(tf.reshape(x, (-1, C)), dg_dt, transpose_a=True), tf.float32)
            h_prev = tf.concat([tf.zeros_like(hs[:1]), hs[:-1]], 0)  # (T,N,H)
            drec = tf.matmul(tf.reshape(h_prev, (-1, h_prev.shape[-1])), tf.reshape(dg, (T * N, -1)),
                             transpose_a=True)
            dbias = tf.reduce_sum(dg_flat, 0)
            return dx, dkernel, drec, dbias
        return out, grad
    return run(x, kernel, recurrent, bias)

def layer_ab(argv):
    """One LSTM direction pair: outputs, gradients and times of the two forms."""
    N, T, C, H = [int(v) for v in argv[:4]]
    dtype = tf.as_dtype(argv[4])
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(N, T, C)), dtype)
    kernel = tf.Variable(rng.normal(size=(C, 4 * H)).astype("float32") * 0.1)
    recurrent = tf.Variable(rng.normal(size=(H, 4 * H)).astype("float32") * 0.1)
    bias = tf.Variable(rng.normal(size=(4 * H,)).astype("float32") * 0.1)
    up = tf.constant(rng.normal(size=(N, T, H)), dtype)

    def make(fn):
        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                outs = [fn(x, kernel, recurrent, bias, dtype), fn(tf.reverse(x, [1]), kernel, recurrent, bias, dtype)]
                loss = sum(tf.reduce_sum(tf.cast(o, tf.float32) * tf.cast(up, tf.float32)) for o in outs)
            return [outs[0]] + tape.gradient(loss, [x, kernel, recurrent, bias])
        return step

    a, b = make(block_lstm), make(custom_lstm)
    ra, rb = a(x), b(x)
    for n, u, v in zip(["out", "dx", "dk", "dr", "db"], ra, rb):
        u, v = np.asarray(tf.cast(u, tf.float32)), np.asarray(tf.cast(v, tf.float32))
        print(n, "max abs diff", np.abs(u - v).max(), "scale", np.abs(u).max())
    ta, tb = [], []
    for _ in range(int(argv[5]) if len(argv) > 5 else 7):
        t = time.perf_counter(); a(x)[1].numpy(); ta.append(time.perf_counter() - t)
        t = time.perf_counter(); b(x)[1].numpy(); tb.append(time.perf_counter() - t)
    print("block ms", 1000 * statistics.median(ta), "custom ms", 1000 * statistics.median(tb),
          "paired", statistics.median([q / p for p, q in zip(ta, tb)]))


def model_ab(argv):
    """sequencer2d_s's train_on_batch at 224 with the LSTMs of sequences of up to
    MAX_STEPS steps through custom_lstm, against the package's BlockLSTM;
    the same initial weights, alternating steps."""
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import keras

    import keras_sequencer as ks
    from keras_sequencer import keras_compat, layers
    from keras_sequencer.training import create_optimizer

    policy, batch, rounds = argv[0], int(argv[1]), int(argv[2])
    max_steps = int(argv[3]) if len(argv) > 3 else 16
    package_lstm, use_custom = layers.tensorflow_fused_lstm, {"on": False}

    def bidirectional(rnn, sequences):
        outputs = []
        for direction in layers.directions_of(rnn):
            cell = direction.cell
            weights = [keras_compat.stored_value(v) for v in (cell.kernel, cell.recurrent_kernel, cell.bias)]
            x = tf.reverse(sequences, [1]) if direction.go_backwards else sequences
            h = custom_lstm(x, *weights, sequences.dtype)
            outputs.append(tf.reverse(h, [1]) if direction.go_backwards else h)
        return tf.concat(outputs, -1)

    def fused_lstm(rnn, sequences, training=None):  # read when a model traces
        if use_custom["on"] and training and sequences.shape[1] is not None and sequences.shape[1] <= max_steps:
            return bidirectional(rnn, sequences)
        return package_lstm(rnn, sequences, training)

    layers.tensorflow_fused_lstm = fused_lstm
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 224, 224, 3)).astype("float32")
    y = rng.integers(0, 1000, batch)
    models = {}
    for name in ("BlockLSTM", "custom"):
        keras.config.set_dtype_policy(policy)
        keras.utils.set_random_seed(0)
        model = ks.create_model("sequencer2d_s", input_shape=(224, 224, 3), classifier_activation=None,
                                include_preprocessing=False)
        keras.config.set_dtype_policy("float32")
        model.compile(optimizer=create_optimizer(model, 1e-4, global_clipnorm=1.0),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        use_custom["on"] = name == "custom"
        losses = [float(model.train_on_batch(x, y)) for _ in range(2)]
        print(name, "losses of the first two steps", losses, flush=True)
        models[name] = model
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times[name].append(time.perf_counter() - start)
    ratios = [b / a for a, b in zip(times["BlockLSTM"], times["custom"])]
    print({name: round(statistics.median(t), 3) for name, t in times.items()},
          "paired", round(statistics.median(ratios), 3), f"({sum(r < 1 for r in ratios)}/{rounds})")


if __name__ == "__main__":
    if sys.argv[1] == "model":
        model_ab(sys.argv[2:])
    else:
        layer_ab(sys.argv[1:])
