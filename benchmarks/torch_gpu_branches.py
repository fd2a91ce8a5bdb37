"""Keras-on-torch's forward with the branches it takes on a GPU, timed on the CPU
against timm: how many ATen ops a forward dispatches and its host time, at a
size where the arithmetic is almost nothing (28 px, batch 1). On a GPU each op
is a kernel launch, and a forward at batch 64 is bound by this host time
(BENCHMARKS.md, "GPU: one NVIDIA H200"), so this is the CPU's evidence for the
route torch runs there.

The fused route runs here as on CUDA: no oneDNN post-op linears and no
unrolled short LSTMs (both CPU-only forms). Each engine runs timm's weights;
one thread; the calls alternate.

    python benchmarks/torch_gpu_branches.py [--size 28] [--batch 1] [--calls 60]
"""

import argparse
import json
import os
import statistics
import time

os.environ["KERAS_BACKEND"] = "torch"

from machine import cpu_info  # noqa: E402
from throughput import reference_model  # noqa: E402  (timm before Keras)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--calls", type=int, default=60)
    args = parser.parse_args()

    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    import keras_sequencer as ks
    from keras_sequencer import layers

    torch.set_num_threads(1)
    reference = reference_model("sequencer2d_s")
    images = np.random.default_rng(0).uniform(0, 1, (args.batch, args.size, args.size, 3)).astype("float32")
    channels_last, channels_first = torch.from_numpy(images), torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    models = {}
    for route in ("fused", "keras"):
        models[route] = ks.create_model("sequencer2d_s", input_shape=images.shape[1:], include_preprocessing=False,
                                        rnn_route=route, classifier_activation=None)
        ks.load_torch_state_dict(models[route], reference.state_dict())
    # CUDA's branches: the CPU-only forms off.
    layers._onednn_linear_applies = lambda x, residual: False
    layers.UNROLL_MAX_STEPS = 0
    calls = {
        "timm": lambda: reference(channels_first),
        "keras fused (GPU branches)": lambda: models["fused"](channels_last, training=False),
        "keras route keras": lambda: models["keras"](channels_last, training=False),
    }
    result = {"cpu": cpu_info(), "size": args.size, "batch": args.batch, "calls": args.calls, "engines": {}}
    with torch.inference_mode():
        want = calls["timm"]().numpy()
        for name, call in calls.items():
            got = call().numpy()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                call()
            ops = sum(event.count for event in prof.key_averages() if event.key.startswith("aten::"))
            result["engines"][name] = {"aten_ops": ops, "max_abs_logit_diff_vs_timm": float(np.abs(got - want).max())}
        times = {name: [] for name in calls}
        for _ in range(args.calls):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    timm = statistics.median(times["timm"])
    for name, samples in times.items():
        seconds = statistics.median(samples)
        result["engines"][name].update(ms=round(1e3 * seconds, 2), timm_over_this=round(timm / seconds, 3))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
