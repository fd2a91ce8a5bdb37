"""Whole-model A/B on TensorFlow: the working tree's layers against a commit's.

    python benchmarks/ab_tensorflow.py --swap tensorflow_fused_lstm BiLSTM2D.call \
        [--base HEAD] [--policy mixed_bfloat16] [--batch 16] [--size 224] [--rounds 21]
        [--train [--optimizer package]]

Model A is traced with the functions named in --swap (names in
keras_sequencer/layers.py, "Class.method" for a method; "training.NAME" for
keras_sequencer/training.py) taken from the --base commit's files, model B
with the working tree's; name every function whose contract changed between
the two. Both hold the same random
weights and are called alternately, so the machine's drift hits both alike.
Prints the largest logit difference and "paired": the median over rounds of
B's time / A's time. With --train each call is a training step instead
(`train_on_batch`, cross-entropy on random labels; Keras' AdamW, or with
`--optimizer package` the recipe's, `training.create_optimizer`). The decisions of BENCHMARKS.md's "Issue 13" sixth and
seventh rounds were made this way. Run by hand, from the repository root.
"""

import argparse
import os

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_sequencer as ks  # noqa: E402
from keras_sequencer import training  # noqa: E402
from committed import MODULES, committed_module, lookup, module_of, replace  # noqa: E402
from machine import paired_rounds, paired_summary  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swap", nargs="+", required=True)
    parser.add_argument("--base", default="HEAD")
    parser.add_argument("--policy", default="mixed_bfloat16")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--train", action="store_true", help="time training steps, not inference")
    parser.add_argument("--optimizer", choices=("keras", "package"), default="keras",
                        help="with --train: keras.optimizers.AdamW or training.create_optimizer")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    keras.config.set_dtype_policy(args.policy)
    models = [
        ks.create_model("sequencer2d_s", input_shape=(args.size, args.size, 3), classifier_activation=None,
                        include_preprocessing=False)
        for _ in range(2)
    ]
    keras.config.set_dtype_policy("float32")
    for variable in models[0].weights:  # non-zero head and biases
        variable.assign((rng.normal(size=variable.shape) * 0.05).astype("float32"))
    models[1].set_weights(models[0].get_weights())
    x = rng.normal(size=(args.batch, args.size, args.size, 3)).astype("float32")

    swaps = [module_of(name) for name in args.swap]
    old = {module: committed_module(args.base, module) for module, _ in swaps}
    current = {(module, name): lookup(MODULES[module], name) for module, name in swaps}
    for module, name in swaps:
        replace(MODULES[module], name, lookup(old[module], name))
    if args.train:
        labels = keras.utils.to_categorical(rng.integers(0, 1000, args.batch), 1000)
        for model in models:
            optimizer = (training.create_optimizer(model, 1e-4, total_steps=10**6) if args.optimizer == "package"
                         else keras.optimizers.AdamW(1e-4))
            model.compile(optimizer=optimizer,
                          loss=keras.losses.CategoricalCrossentropy(from_logits=True))

        def step(model):
            return lambda inputs: np.asarray(model.train_on_batch(inputs, labels))
        calls = [step(model) for model in models]
    else:
        calls = [tf.function(lambda inputs: models[0](inputs, training=False)),
                 tf.function(lambda inputs: models[1](inputs, training=False))]
    outputs = [np.asarray(calls[0](x), "float32")]  # traced with the committed functions
    for (module, name), value in current.items():
        replace(MODULES[module], name, value)
    outputs.append(np.asarray(calls[1](x), "float32"))
    print(f"max abs {'loss' if args.train else 'logit'} difference {np.abs(outputs[0] - outputs[1]).max():.3g}"
          f" (std {outputs[0].std():.3g})")

    for call in calls:
        np.asarray(call(x))
    times = paired_rounds([lambda: np.asarray(calls[0](x)), lambda: np.asarray(calls[1](x))], args.rounds)
    mode = "training step" if args.train else "inference"
    print(f"{args.policy}, {mode}, batch {args.batch}: {paired_summary(times, args.base, 'working tree')}")


if __name__ == "__main__":
    main()
