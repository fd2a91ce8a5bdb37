"""Whole-model A/B on torch: the working tree's layers against a commit's.

    python benchmarks/ab_torch.py --swap _linear [--base HEAD] [--batch 16]
        [--size 224] [--rounds 9] [--train]

One sequencer2d_s with timm's seeded weights (throughput.reference_model,
through the converter) runs eagerly; before each call the functions named in
--swap (names in keras_sequencer/layers.py, "Class.method" for a method,
"training.NAME" for training.py) are set to the --base commit's (A) or the
working tree's (B), alternating A B, B A, ... Prints the largest difference
of the two sides' logits (inference: the tests compare training's gradients)
and "paired": the median over rounds of B's time / A's time.
With --train each call is a training step (`train_on_batch` with the recipe's
optimizer, throughput.keras_training_step). Run by hand, from the repository
root; record the CPU line it prints.
"""

import argparse
import os

os.environ["KERAS_BACKEND"] = "torch"

import numpy as np  # noqa: E402
import timm  # noqa: E402,F401  before TensorFlow: see README
import torch  # noqa: E402

import keras_sequencer as ks  # noqa: E402
import throughput  # noqa: E402
from committed import MODULES, committed_module, lookup, module_of, replace  # noqa: E402
from machine import cpu_info, paired_rounds, paired_summary  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swap", nargs="+", required=True)
    parser.add_argument("--base", default="HEAD")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--train", action="store_true", help="time training steps, not inference")
    args = parser.parse_args()
    print("CPU:", cpu_info(), "torch threads", torch.get_num_threads())

    reference = throughput.reference_model("sequencer2d_s")
    model = ks.create_model("sequencer2d_s", weights=None, input_shape=(args.size, args.size, 3),
                            include_preprocessing=False, classifier_activation=None)
    ks.load_torch_state_dict(model, reference.state_dict())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, args.size, args.size, 3)).astype("float32")
    if args.train:
        call = throughput.keras_training_step(model, x, rng.integers(0, 1000, args.batch))
    else:
        def call():
            return model.predict_on_batch(x)

    swaps = [module_of(name) for name in args.swap]
    old = {module: committed_module(args.base, module) for module, _ in swaps}
    sides = [
        {(module, name): lookup(old[module], name) for module, name in swaps},
        {(module, name): lookup(MODULES[module], name) for module, name in swaps},
    ]

    def swap_in(side):
        for (module, name), value in sides[side].items():
            replace(MODULES[module], name, value)

    def run(side):
        swap_in(side)
        return np.asarray(call(), "float32")

    logits = []
    for side in (0, 1):
        swap_in(side)
        logits.append(np.asarray(model.predict_on_batch(x), "float32"))
    print(f"max abs logit difference {np.abs(logits[0] - logits[1]).max():.3g} (inference; tests compare gradients)")
    run(0), run(1), run(0), run(1)
    times = paired_rounds([lambda: run(0), lambda: run(1)], args.rounds)
    mode = "training step" if args.train else "inference"
    print(f"{mode}, batch {args.batch}, {args.size} px: {paired_summary(times, args.base, 'working tree')}")


if __name__ == "__main__":
    main()
