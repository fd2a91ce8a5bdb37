"""The whole benchmark suite: keras_sequencer on each Keras backend against timm.

    python benchmarks/suite.py [--variants sequencer2d_s sequencer2d_m sequencer2d_l]
        [--rounds 3] [--min-seconds 2] [--memory-sizes 224 448 896] [--skip throughput ...]

Measures, alternating engines round by round so machine drift cancels:
- inference throughput (img/s) at batch 1 and 16 (benchmarks/throughput.py);
- cold start: a fresh process from interpreter start to its first prediction;
- peak memory added by one forward pass at batch 1, above the loaded and warmed
  model (Linux VmHWM, reset through /proc/self/clear_refs before the pass);
- training step time at batch 16 (AdamW, cross-entropy).
Writes benchmarks/results/NAME.json, NAME.md, NAME_throughput.png and
NAME_memory.png (NAME from --name, default "suite"). Run by hand, not by CI.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import throughput  # noqa: E402

ENGINES = throughput.ENGINES
RESULTS = os.path.join(HERE, "results")


def _keras_model(engine, variant, input_shape, **kwargs):
    os.environ["KERAS_BACKEND"] = engine
    import keras_sequencer as ks

    return ks.create_model(variant, input_shape=input_shape, **kwargs)


def cold_start_script(engine, variant, size):
    """Python source for a fresh process: import, build, predict one image."""
    if engine == "timm":
        return (
            "import torch, timm\n"
            f"m = timm.create_model({variant!r}).eval()\n"
            "with torch.inference_mode():\n"
            f"    m(torch.rand(1, 3, {size}, {size}))\n"
        )
    return (
        "import os, numpy as np\n"
        f"os.environ['KERAS_BACKEND'] = {engine!r}\n"
        "import keras_sequencer as ks\n"
        f"m = ks.create_model({variant!r}, input_shape=({size}, {size}, 3))\n"
        f"m.predict(np.random.rand(1, {size}, {size}, 3).astype('float32') * 255, verbose=0)\n"
    )


JAX_CACHED = "jax, compilation cache"  # JAX with its persistent cache filled by an earlier run


def cold_start(args, variant):
    import tempfile

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    runs = {engine: (engine, env) for engine in args.engines}
    if "jax" in args.engines:
        # What a restarted server sees: JAX's own persistent compilation cache
        # (environment variables only), filled by one unmeasured run first.
        cache = tempfile.mkdtemp(prefix="jax_cache_")
        runs[JAX_CACHED] = ("jax", {**env, "JAX_COMPILATION_CACHE_DIR": cache,
                                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                                    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
        subprocess.run([sys.executable, "-c", cold_start_script("jax", variant, args.size)],
                       check=True, env=runs[JAX_CACHED][1], capture_output=True)
    samples = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (engine, engine_env) in runs.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", cold_start_script(engine, variant, args.size)],
                           check=True, env=engine_env, capture_output=True)
            samples[name].append(time.perf_counter() - start)
    return _summarise("cold_start_s", variant, samples, lower_is_better=True)


def _rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(engine, variant, size):
    """Prints the peak bytes one forward pass adds above the warmed model."""
    import gc

    import numpy as np

    images = np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)).astype("float32")
    forward = throughput.inference_step(engine, variant, images, (None, None, 3))
    forward()  # compile / trace at this size
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _rss("VmRSS")
    forward()
    print(json.dumps({"added_bytes": _rss("VmHWM") - base}), flush=True)


def memory(args, variant):
    results = []
    # A fixed mmap threshold: large buffers are then mapped and unmapped as they
    # live and die, so VmHWM is their true peak. With glibc's moving threshold
    # the same torch run measured anywhere from 108 to 270 MiB.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "MALLOC_MMAP_THRESHOLD_": "131072"}
    for size in args.memory_sizes:
        samples = {engine: [] for engine in args.engines}
        for _ in range(max(1, args.memory_rounds)):
            for engine in args.engines:
                out = subprocess.run(
                    [sys.executable, __file__, "--memory-worker", engine, "--variants", variant,
                     "--size", str(size)],
                    check=True, env=env, capture_output=True, text=True,
                ).stdout
                samples[engine].append(json.loads(out.strip().splitlines()[-1])["added_bytes"] / 2**20)
        results += _summarise("peak_added_mib", variant, samples, lower_is_better=True, size=size)
    return results


def train_worker(engine, variant, batch, size, min_seconds):
    """Answers 'run' lines with seconds per training step (median of a round)."""
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
    labels = rng.integers(0, 1000, batch)
    if engine == "timm":
        import timm
        import torch

        model = timm.create_model(variant).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x, y = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels)

        def step():
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

    else:
        import keras

        model = _keras_model(engine, variant, (size, size, 3), weights=None)
        model.compile(optimizer=keras.optimizers.AdamW(1e-4), loss="sparse_categorical_crossentropy")

        def step():
            model.train_on_batch(images, labels)

    def seconds_per_step(step):
        times, start = [], time.perf_counter()
        while not times or time.perf_counter() - start < min_seconds:
            begin = time.perf_counter()
            step()
            times.append(time.perf_counter() - begin)
        return {"step_s": statistics.median(times)}

    throughput.serve_rounds(step, seconds_per_step)


def train_step(args, variant):
    # timm and one Keras engine at a time: four training processes at once (each
    # keeping ~1,400 recurrent steps of activations) were killed for memory here.
    rows = []
    for engine in [e for e in args.engines if e != "timm"]:
        workers = {
            name: throughput.start_worker(
                [__file__, "--train-worker", name, "--variants", variant, "--size", str(args.size),
                 "--min-seconds", str(args.min_seconds)],
                name,
            )
            for name in ("timm", engine)
        }
        samples = throughput.alternate_rounds(workers, args.rounds, "step_s")
        for row in _summarise("train_step_s", variant, samples, lower_is_better=True, batch=16):
            row["paired_with"] = engine  # each ratio is to the timm of the same pair
            rows.append(row)
    return rows


def _summarise(metric, variant, samples, lower_is_better, **extra):
    medians = {engine: statistics.median(values) for engine, values in samples.items()}
    rows = []
    for engine, median in medians.items():
        ratio = None
        if "timm" in medians and median > 0 and medians["timm"] > 0:
            # Ratios read "x timm's speed": above 1 is better for every metric.
            ratio = medians["timm"] / median if lower_is_better else median / medians["timm"]
        rows.append(dict(metric=metric, variant=variant, engine=engine, value=median,
                         samples=samples[engine], better_than_timm=ratio, **extra))
    return rows


def markdown(results):
    lines = ["| metric | variant | setting | engine | median | vs timm (>1 is better) |", "|---|---|---|---|---|---|"]
    for r in results:
        setting = ", ".join(f"{k.replace('_', ' ')} {r[k]}" for k in ("batch", "size", "paired_with") if k in r)
        ratio = f"{r['better_than_timm']:.2f}x" if r.get("better_than_timm") else "-"
        lines.append(f"| {r['metric']} | {r['variant']} | {setting} | {r['engine']} | {r['value']:.3g} | {ratio} |")
    return "\n".join(lines)


def plots(results, directory, name):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plots", file=sys.stderr)
        return
    speed = [r for r in results if r["metric"] == "img_s"]
    if speed:
        keys = sorted({(r["variant"], r["batch"]) for r in speed})
        engines = [e for e in ENGINES if any(r["engine"] == e for r in speed)]
        fig, ax = plt.subplots(figsize=(2 + 1.6 * len(keys), 4))
        width = 0.8 / len(engines)
        for i, engine in enumerate(engines):
            values = [next((r["value"] for r in speed if (r["variant"], r["batch"]) == k and r["engine"] == engine), 0)
                      for k in keys]
            ax.bar([j + i * width for j in range(len(keys))], values, width, label=engine)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], [f"{v}\nbatch {b}" for v, b in keys])
        ax.set_ylabel("images / s")
        ax.set_title("Inference throughput, CPU fp32 (timm = PyTorch reference)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(directory, f"{name}_throughput.png"), dpi=100)
        plt.close(fig)
    mem = [r for r in results if r["metric"] == "peak_added_mib"]
    if mem:
        fig, ax = plt.subplots(figsize=(5, 4))
        for engine in [e for e in ENGINES if any(r["engine"] == e for r in mem)]:
            rows = sorted((r["size"], r["value"]) for r in mem if r["engine"] == engine)
            ax.plot([s for s, _ in rows], [v for _, v in rows], marker="o", label=engine)
        ax.set_xlabel("input resolution (px)")
        ax.set_ylabel("peak memory added by one forward (MiB)")
        ax.set_title("Memory vs resolution, batch 1")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(directory, f"{name}_memory.png"), dpi=100)
        plt.close(fig)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", default=["sequencer2d_s", "sequencer2d_m", "sequencer2d_l"])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--memory-sizes", nargs="+", type=int, default=[224, 448, 896])
    parser.add_argument("--memory-rounds", type=int, default=1)
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "cold_start", "memory", "train"])
    parser.add_argument("--name", default="suite", help="results file names: NAME.json, NAME.md")
    parser.add_argument("--memory-worker")
    parser.add_argument("--train-worker")
    args = parser.parse_args()
    if args.memory_worker:
        return memory_worker(args.memory_worker, args.variants[0], args.size)
    if args.train_worker:
        return train_worker(args.train_worker, args.variants[0], 16, args.size, args.min_seconds)

    results = []
    os.makedirs(RESULTS, exist_ok=True)

    def save():  # after every section, so a crash keeps what was measured
        with open(os.path.join(RESULTS, f"{args.name}.json"), "w") as f:
            json.dump({"versions": throughput.versions(), "results": results}, f, indent=2)
        with open(os.path.join(RESULTS, f"{args.name}.md"), "w") as f:
            f.write(markdown(results) + "\n\n" + json.dumps(throughput.versions()) + "\n")

    if "throughput" not in args.skip:
        for row in throughput.coordinate(args):
            results.append(dict(metric="img_s", variant=row["variant"], engine=row["engine"], value=row["img_s"],
                                samples=row["samples"], better_than_timm=row["ratio_to_timm"], batch=row["batch"]))
        save()
    first = args.variants[0]  # the slower measurements run on the first variant only
    if "cold_start" not in args.skip:
        results += cold_start(args, first)
        save()
    if "memory" not in args.skip:
        results += memory(args, first)
        save()
    if "train" not in args.skip:
        results += train_step(args, first)
        save()
    plots(results, RESULTS, args.name)
    print(markdown(results))
    print()
    print(json.dumps(throughput.versions()))


if __name__ == "__main__":
    main()
