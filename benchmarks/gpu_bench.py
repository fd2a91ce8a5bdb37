"""GPU throughput and parity for benchmarks/gpu.sh (torch and JAX backends vs timm).

    python benchmarks/gpu_bench.py parity         # with KERAS_BACKEND set
    python benchmarks/gpu_bench.py throughput --out gpu.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANT = "sequencer2d_s"
SIZE = 224


def parity():
    import torch  # noqa: F401  (before keras, as everywhere here)
    import timm
    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import keras

    import keras_sequencer as ks
    from reference import make_reference, normalize, reference_logits

    reference = make_reference(VARIANT)  # on the CPU; Keras runs on the GPU
    model = ks.create_model(VARIANT, input_shape=(SIZE, SIZE, 3), classifier_activation=None)
    ks.load_torch_state_dict(model, {k: v.cpu() for k, v in reference.state_dict().items()})
    images = np.random.default_rng(0).uniform(0, 255, (8, SIZE, SIZE, 3)).astype("float32")
    want = reference_logits(reference, normalize(images))
    got = np.asarray(model.predict(images, verbose=0))
    print(json.dumps({"backend": keras.backend.backend(), "timm": timm.__version__,
                      "max_abs_logit_diff": float(np.abs(got - want).max())}))


def worker(engine, batch, dtype, seconds):
    import numpy as np

    images = np.random.default_rng(0).uniform(0, 255, (batch, SIZE, SIZE, 3)).astype("float32")
    if engine == "timm":
        import timm
        import torch

        model = timm.create_model(VARIANT).cuda().eval()
        x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).cuda()

        def step():
            with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=dtype == "bf16"):
                model(x)
            torch.cuda.synchronize()

    else:
        os.environ["KERAS_BACKEND"] = engine
        import keras

        if dtype == "bf16":
            keras.mixed_precision.set_global_policy("mixed_bfloat16")
        import keras_sequencer as ks

        model = ks.create_model(VARIANT, input_shape=(SIZE, SIZE, 3))
        if engine == "jax":
            import jax

            step = lambda: jax.block_until_ready(model.predict_on_batch(images))  # noqa: E731
        else:
            import torch

            x = torch.from_numpy(images).cuda()

            def step():
                with torch.inference_mode():
                    model(x, training=False)
                torch.cuda.synchronize()

    for _ in range(3):
        step()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
    print(json.dumps({"img_s": batch / statistics.median(times)}))


def throughput(out):
    results = []
    for batch in (64, 256):
        for dtype in ("fp32", "bf16"):
            row = {}
            for engine in ("timm", "torch", "jax"):
                proc = subprocess.run([sys.executable, __file__, "worker", engine, str(batch), dtype],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    row[engine] = {"error": proc.stderr.strip().splitlines()[-1:]}
                    continue
                row[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
            for engine, value in row.items():
                ratio = None
                if "img_s" in value and "img_s" in row.get("timm", {}):
                    ratio = value["img_s"] / row["timm"]["img_s"]
                results.append(dict(batch=batch, dtype=dtype, engine=engine, ratio_to_timm=ratio, **value))
                print(json.dumps(results[-1]), flush=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["parity", "throughput", "worker"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--out", default="gpu.json")
    parsed = parser.parse_args()
    if parsed.mode == "parity":
        parity()
    elif parsed.mode == "throughput":
        throughput(parsed.out)
    else:
        engine, batch, dtype = parsed.args
        worker(engine, int(batch), dtype, seconds=5.0)
