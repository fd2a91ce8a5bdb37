"""TensorFlow's two LSTM training forms side by side (issue 13, twelfth and
thirteenth rounds): one bidirectional LSTM's forward and backward over (N, T, C)
sequences, as the fused route trains it, through BlockLSTM + BlockLSTMGrad
(float32 under mixed precision) and through `layers.tensorflow_trained_lstm`
(products in the compute dtype around one XLA recurrence per pass), each
traced once, called alternately.

    python benchmarks/tf_lstm_gradient.py N T C H POLICY [ROUNDS]
    python benchmarks/tf_lstm_gradient.py 256 16 384 96 mixed_bfloat16 9   # stages 2-4 of sequencer2d_s, batch 16
    python benchmarks/tf_lstm_gradient.py 512 32 192 48 mixed_bfloat16 9   # its stage 1

Prints each output's and gradient's largest difference relative to its scale,
then both forms' medians and the paired ratio (trained / BlockLSTM; below 1
is faster). The whole model's training step:

    python benchmarks/ab_tensorflow.py --swap tensorflow_fused_lstm --base <a commit before the form> \\
        --train --optimizer package --policy mixed_bfloat16 --batch 16 --rounds 9

Its first step (graph building and XLA compilation), in a fresh process per form:

    python benchmarks/tf_lstm_gradient.py first-step block float32
    python benchmarks/tf_lstm_gradient.py first-step trained float32
"""

import os
import sys
import time

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_sequencer import layers  # noqa: E402
from machine import cpu_info, paired_rounds, paired_summary  # noqa: E402


def main(argv):
    n, steps, channels, units = (int(v) for v in argv[:4])
    policy, rounds = argv[4], int(argv[5]) if len(argv) > 5 else 7
    print(cpu_info())
    rng = np.random.default_rng(0)
    rnn = layers.make_recurrent_layer("lstm", units, name="lstm", dtype=policy)
    rnn = keras.layers.Bidirectional(rnn, dtype=policy)
    rnn.build((None, None, channels))
    for variable in rnn.trainable_variables:
        variable.assign(rng.normal(scale=0.1, size=variable.shape).astype("float32"))
    dtype = keras.mixed_precision.Policy(policy).compute_dtype
    x = tf.constant(rng.normal(size=(n, steps, channels)), dtype)
    upstream = tf.constant(rng.normal(size=(n, steps, 2 * units)), "float32")

    def traced(trained):
        layers.TENSORFLOW_TRAINS_UNROLLED = trained
        # The package's length cap would put longer sequences on BlockLSTM in both.
        layers.TENSORFLOW_TRAINED_MAX_STEPS = max(cap, steps)

        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                outputs = layers.tensorflow_fused_lstm(rnn, x, training=True)
                loss = tf.reduce_sum(tf.cast(outputs, "float32") * upstream)
            return [outputs] + tape.gradient(loss, [x] + [v.value for v in rnn.trainable_variables])

        step.get_concrete_function(x)  # traced under this form
        return step

    cap = layers.TENSORFLOW_TRAINED_MAX_STEPS
    block, trained = traced(False), traced(True)
    layers.TENSORFLOW_TRAINED_MAX_STEPS = cap
    names = ["outputs", "d inputs"] + [v.path for v in rnn.trainable_variables]
    for name, a, b in zip(names, block(x), trained(x)):
        a, b = (np.asarray(tf.cast(t, "float32")) for t in (a, b))
        print(f"{name}: largest difference {np.abs(a - b).max() / np.abs(a).max():.2e} of its scale")
    times = paired_rounds([lambda: block(x)[1].numpy(), lambda: trained(x)[1].numpy()], rounds)
    print(f"{policy} N={n} T={steps} C={channels} H={units}:", paired_summary(times, "BlockLSTM", "trained"))


def first_step(form, policy):
    """sequencer2d_s's first and second `train_on_batch` at 224, batch 16."""
    import keras_sequencer as ks
    from keras_sequencer.training import create_optimizer

    layers.TENSORFLOW_TRAINS_UNROLLED = form == "trained"
    keras.config.set_dtype_policy(policy)
    model = ks.create_model("sequencer2d_s", input_shape=(224, 224, 3), include_preprocessing=False,
                            classifier_activation=None)
    keras.config.set_dtype_policy("float32")
    model.compile(optimizer=create_optimizer(model, 1e-4, global_clipnorm=1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x, y = rng.random((16, 224, 224, 3), "float32"), rng.integers(0, 1000, 16)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    print(cpu_info())
    print(f"{form} {policy}: first step {times[0]:.1f} s, second {times[1]:.2f} s")


if __name__ == "__main__":
    if sys.argv[1] == "first-step":
        first_step(*sys.argv[2:4])
    else:
        main(sys.argv[1:])
