"""Inference throughput of keras_sequencer on each Keras backend against timm, in one run.

    python benchmarks/throughput.py [--variants sequencer2d_s] [--batches 1 16] [--rounds 5]
    python benchmarks/throughput.py --engines timm jax jax:keras   # a Keras engine with a route

Each engine (timm, and Keras on tensorflow / jax / torch) runs in its own worker
process with its model loaded once. The coordinator then asks the workers in
turn (A B C D A B C D ...) for one timed round each, so machine drift hits every
engine alike, and reports medians and ratios to timm. Results go to
benchmarks/results/throughput.json and a markdown table on stdout.
Run by hand, not by CI.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from machine import cpu_info

ENGINES = ("timm", "tensorflow", "jax", "torch")
HERE = os.path.dirname(os.path.abspath(__file__))


def reference_model(variant):
    """timm's model with seeded random weights and a non-zero head: every engine
    runs these same weights (other weights' statistics can slow one engine)."""
    import timm  # before TensorFlow: the other order crashes the process
    import torch

    torch.manual_seed(0)
    model = timm.create_model(variant, pretrained=False).eval()
    with torch.no_grad():  # timm zero-initialises the head
        model.head.fc.weight.normal_(0.0, 0.02)
    return model


def timm_training_step(model, x, labels, bf16):
    """timm's training step as the benchmarks time it: AdamW (lr 1e-4, weight
    decay 0.05), cross-entropy, gradient clipping at 1.0, the forward under
    autocast for bf16; `x` (NCHW) and `labels` on the model's device."""
    import torch

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def keras_training_step(model, x, labels):
    """Keras' side of timm_training_step: `train_on_batch` with the recipe's
    optimizer (`training.create_optimizer`, clipping 1.0), cross-entropy on the
    model's logits. Returns the loss as a number (synchronized)."""
    import keras

    from keras_sequencer.training import create_optimizer

    model.compile(optimizer=create_optimizer(model, 1e-4, weight_decay=0.05, global_clipnorm=1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return lambda: model.train_on_batch(x, labels)


def inference_step(engine, variant, images, input_shape):
    """A function running one inference of `images` on `engine` (timm, a Keras
    backend, or "backend:route" for a BiLSTM2D route other than "auto") with
    `variant` taking `input_shape` (HWC), timm's weights in both."""
    engine, _, route = engine.partition(":")
    reference = reference_model(variant)
    if engine == "timm":
        import torch

        x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())

        def step():
            with torch.inference_mode():
                reference(x)

        return step
    os.environ["KERAS_BACKEND"] = engine
    import keras

    import keras_sequencer as ks

    model = ks.create_model(variant, weights=None, input_shape=input_shape, include_preprocessing=False,
                            rnn_route=route or "auto")
    ks.load_torch_state_dict(model, reference.state_dict())
    if engine == "jax":
        # Compiled inference; eager JAX recompiles every recurrent loop.
        return lambda: model.predict_on_batch(images)
    if engine == "tensorflow":
        import tensorflow as tf

        fn = tf.function(lambda x: model(x, training=False))
        return lambda: fn(images).numpy()
    import torch

    def step():
        with torch.inference_mode():
            keras.ops.convert_to_numpy(model(images, training=False))

    return step


def worker(engine, variant, batch, size, min_seconds):
    """Loads one model, then answers 'run' lines with img/s of one timed round."""
    import numpy as np

    # Normalised-scale inputs, as the models see them after preprocessing.
    images = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype("float32")
    step = inference_step(engine, variant, images, (size, size, 3))

    def images_per_second(step):
        count, start = 0, time.perf_counter()
        while True:
            step()
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                return {"img_s": count * batch / elapsed}

    serve_rounds(step, images_per_second)


def serve_rounds(step, measure):
    """A worker's side of start_worker and alternate_rounds: two warm-up calls
    of `step` (compilation), "ready", then measure(step) as a JSON line for
    each "run" line."""
    step()
    step()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(json.dumps(measure(step)), flush=True)


def start_worker(command, name):
    """A worker process that has loaded and warmed its model ("ready")."""
    proc = subprocess.Popen(
        [sys.executable, *command], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"{name} worker failed to start")
    return proc


def alternate_rounds(workers, rounds, key=None):
    """One timed round per worker in turn (A B C D, A B C D, ...); `key` of each
    answer, or the whole answers (dicts) without one."""
    samples = {engine: [] for engine in workers}
    for _ in range(rounds):
        for engine, proc in workers.items():
            proc.stdin.write("run\n")
            proc.stdin.flush()
            answer = json.loads(proc.stdout.readline())
            samples[engine].append(answer if key is None else answer[key])
    for proc in workers.values():
        proc.stdin.close()
        proc.wait()
    return samples


def coordinate(args):
    results = []
    for variant in args.variants:
        for batch in args.batches:
            # Started one at a time so their warm-ups do not overlap.
            workers = {
                engine: start_worker(
                    [__file__, "--worker", engine, "--variants", variant, "--batches", str(batch),
                     "--size", str(args.size), "--min-seconds", str(args.min_seconds)],
                    engine,
                )
                for engine in args.engines
            }
            samples = alternate_rounds(workers, args.rounds, "img_s")
            medians = {engine: statistics.median(s) for engine, s in samples.items()}
            for engine, median in medians.items():
                results.append(dict(
                    variant=variant, batch=batch, size=args.size, engine=engine,
                    img_s=median, samples=samples[engine],
                    ratio_to_timm=median / medians["timm"] if "timm" in medians else None,
                ))
    return results


def versions():
    import importlib.metadata as md

    out = {"python": platform.python_version(), "machine": platform.machine(),
           "processor": platform.processor(), "cpus": os.cpu_count(), "cpu": cpu_info()}
    for name in ("keras", "tensorflow-cpu", "tensorflow", "jax", "torch", "timm"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def markdown(results):
    lines = ["| variant | batch | engine | img/s (median) | ratio to timm |", "|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r['ratio_to_timm']:.2f}x" if r["ratio_to_timm"] is not None else "-"
        lines.append(f"| {r['variant']} | {r['batch']} | {r['engine']} | {r['img_s']:.2f} | {ratio} |")
    return "\n".join(lines)


def engine_name(text):
    engine, _, route = text.partition(":")
    if engine not in ENGINES or (route and (engine == "timm" or route not in ("auto", "keras", "fused"))):
        raise argparse.ArgumentTypeError(f"not an engine: {text!r}")
    return text


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", default=["sequencer2d_s"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), type=engine_name,
                        help=f"{', '.join(ENGINES)}; a Keras backend as backend:route picks a route")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--worker")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.variants[0], args.batches[0], args.size, args.min_seconds)
    results = coordinate(args)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "throughput.json"), "w") as f:
        json.dump({"versions": versions(), "results": results}, f, indent=2)
    print(markdown(results))
    print()
    print(json.dumps(versions()))


if __name__ == "__main__":
    main()
