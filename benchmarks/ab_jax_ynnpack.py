"""JAX's compiled steps with and without YNNPACK (models.base.jax_compiler_options).

    python benchmarks/ab_jax_ynnpack.py [--batch 16] [--rounds 10] [--train] [--policy mixed_bfloat16]

Two sequencer2d_s models with the same weights in one process, one whose
steps compile with XLA's default (YNNPACK fusions on the CPU), one without
(`JAX_WITHOUT_YNNPACK`), called alternately: `predict_on_batch` at 224 px, or
`train_on_batch` (AdamW, cross-entropy) with --train (the package's `fit`
keeps the default; here the train step is compiled both ways). Prints the medians and the
paired median ratio (without / default; below 1: without is faster). Run by
hand, not by CI.
"""

import argparse
import os

os.environ["KERAS_BACKEND"] = "jax"

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sequencer as ks  # noqa: E402
from keras_sequencer import keras_compat  # noqa: E402
from keras_sequencer.models import base  # noqa: E402
from machine import paired_rounds, paired_summary  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--policy", default="float32", choices=("float32", "mixed_bfloat16"))
    args = parser.parse_args()
    if any(name in os.environ.get("XLA_FLAGS", "") for name in base.WITHOUT_YNNPACK):
        parser.error("XLA_FLAGS sets the YNNPACK option for both models")
    keras.config.set_dtype_policy(args.policy)
    x = np.random.default_rng(0).standard_normal((args.batch, args.size, args.size, 3)).astype("float32")
    y = np.zeros((args.batch,), "int64")
    models = []
    for without in (False, True):
        base.JAX_WITHOUT_YNNPACK = without
        model = ks.create_model("sequencer2d_s", weights=None, input_shape=x.shape[1:], include_preprocessing=False)
        if models:
            model.set_weights(models[0].get_weights())
        if args.train:
            model.compile(optimizer="adamw", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            with keras_compat.jax_steps_compiled_with(base.WITHOUT_YNNPACK if without else {}):
                model.train_on_batch(x, y)  # compiled now, with this setting
        else:
            model.predict_on_batch(x)
        models.append(model)
    base.JAX_WITHOUT_YNNPACK = None
    if args.train:
        run = lambda model: model.train_on_batch(x, y)  # noqa: E731
    else:
        run = lambda model: np.asarray(model.predict_on_batch(x), "float32")  # noqa: E731
        print(f"max |logit difference| {np.abs(run(models[0]) - run(models[1])).max():.2g}")
    for model in models:
        run(model)
    times = paired_rounds([lambda: run(models[0]), lambda: run(models[1])], args.rounds)
    step = "train_on_batch" if args.train else "predict_on_batch"
    print(f"{step}, {args.policy}, batch {args.batch}: {paired_summary(times, 'default', 'without YNNPACK')}")


if __name__ == "__main__":
    main()
