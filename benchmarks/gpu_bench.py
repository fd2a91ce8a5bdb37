"""GPU parity and throughput for benchmarks/gpu.sh: Keras' torch and JAX backends
against timm, on one lent GPU (the device image has torch, JAX and timm; no
TensorFlow).

    KERAS_BACKEND=torch python benchmarks/gpu_bench.py parity
    python benchmarks/gpu_bench.py throughput --out gpu.json              # inference
    python benchmarks/gpu_bench.py throughput --train --out gpu_train.json  # training steps

Every engine runs timm's weights (seeded, non-zero head; loaded into Keras
through the converter), each engine in a process of its own. Inference: timm
under `inference_mode` (autocast for bf16), Keras on torch called eagerly under
`inference_mode`, Keras on JAX `predict_on_batch`. A training step: timm
`loss.backward(); clip_grad_norm_(1.0); AdamW.step()` (forward under autocast
for bf16), Keras `train_on_batch` with the recipe's optimizer
(`training.create_optimizer`, clipping 1.0) and `mixed_bfloat16` for bf16;
images and labels already on the device in every engine.

Also runs on a CPU-only machine (small sizes) as a smoke test of the script.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

VARIANT = "sequencer2d_s"
SIZE = 224
HERE = os.path.dirname(os.path.abspath(__file__))
# engine name -> (KERAS_BACKEND, BiLSTM2D route); "timm" is the reference.
ENGINES = {
    "timm": (None, None),
    # "auto" = fused: one cuDNN call per axis, one Keras layer call per block
    "keras-torch": ("torch", "auto"),
    "keras-torch-keras": ("torch", "keras"),  # Keras' layers and loop: cuDNN per direction
    "keras-jax": ("jax", "auto"),  # "keras" on a GPU: cuDNN in fp32, Keras' scans in bf16
    "keras-jax-fused": ("jax", "fused"),  # one lax.scan per axis, both directions
    # A prototype, not in the package: under mixed_bfloat16 each axis' LSTMs
    # run through cuDNN in float32 (`cudnn_float32_recurrences`).
    "keras-jax-cudnn32": ("jax", "keras"),
}


def cudnn_float32_recurrences(lstm=None, every_dtype=False):
    """Issue 13's JAX lever, as a prototype: JAX's cuDNN RNN cannot take
    bfloat16, so under mixed_bfloat16 BiLSTM2D runs Keras' scans. Here each
    axis' LSTMs (both directions) instead run as one cuDNN call in float32
    (`jax.experimental.rnn.lstm`), their outputs rounded to bfloat16, inside an
    otherwise bfloat16 model. `lstm` replaces jax.experimental.rnn.lstm (a CPU
    stand-in for the smoke test); `every_dtype`: float32 maps too (the layout
    check). Returns the original BiLSTM2D._run."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import rnn as jax_rnn

    import keras

    from keras_sequencer import layers

    lstm = lstm or jax_rnn.lstm
    original = layers.BiLSTM2D._run

    def run(self, rnn, sequences, training):
        float32 = keras.backend.standardize_dtype(sequences.dtype) == "float32"
        if self.rnn_type != "lstm" or (float32 and not every_dtype):
            return original(self, rnn, sequences, training)
        directions = layers.directions_of(rnn)
        units, channels = directions[0].cell.units, sequences.shape[-1]

        def weight(variable):
            return jnp.asarray(variable.value, "float32")

        cells = [d.cell for d in directions]
        # cuDNN's flat layout: every direction's (W_ih, W_hh), then every
        # direction's (b_ih, b_hh); gates i, f, g, o as Keras' i, f, c, o.
        flat = [w for c in cells for w in (weight(c.kernel).T.ravel(), weight(c.recurrent_kernel).T.ravel())]
        flat += [b for c in cells for b in (weight(c.bias), jnp.zeros(4 * units, "float32"))]
        x = jnp.asarray(sequences, "float32")
        zeros = jnp.zeros((len(cells), x.shape[0], units), "float32")
        lengths = jnp.full((x.shape[0],), x.shape[1], "int32")
        y, _, _ = lstm(x, zeros, zeros, jnp.concatenate(flat), lengths, input_size=channels,
                       hidden_size=units, num_layers=1, dropout=0.0, bidirectional=len(cells) == 2)
        return y.astype(sequences.dtype)

    layers.BiLSTM2D._run = run
    return original


def _reference_lstm(x, h0, c0, weights, lengths, input_size, hidden_size, num_layers, dropout, bidirectional):
    """jax.experimental.rnn.lstm's pure-JAX reference: the CPU stand-in."""
    from jax.experimental import rnn as jax_rnn

    unpacked = jax_rnn.unpack_lstm_weights(weights, input_size, hidden_size, num_layers, bidirectional)
    return jax_rnn.lstm_ref(x, h0, c0, *unpacked, lengths, input_size, hidden_size, num_layers, dropout,
                            bidirectional)


def _images(batch, size, seed=0):
    import numpy as np

    return np.random.default_rng(seed).uniform(0, 255, (batch, size, size, 3)).astype("float32")


def _top1_agreement(a, b):
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def parity(size, batch):
    """Keras on the GPU vs timm on the CPU (fp32), every route of this backend;
    then bf16 against fp32, for Keras and for timm's autocast."""
    import numpy as np
    import timm
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    import keras

    import keras_sequencer as ks
    from reference import make_reference, normalize, reference_logits

    backend = keras.backend.backend()
    reference = make_reference(VARIANT)
    state = {k: v.cpu() for k, v in reference.state_dict().items()}
    images = _images(batch, size)
    want = reference_logits(reference, normalize(images))

    def logits(route, policy="float32"):
        keras.mixed_precision.set_global_policy(policy)
        try:
            model = ks.create_model(
                VARIANT, input_shape=(size, size, 3), classifier_activation=None, rnn_route=route
            )
            ks.load_torch_state_dict(model, state)
            return np.asarray(model.predict(images, verbose=0, batch_size=batch), dtype="float32")
        finally:
            keras.mixed_precision.set_global_policy("float32")

    def full_fp32(enabled):
        """TF32 off (or back on): cuDNN RNNs and convolutions use TF32 by default
        on Ampere and newer, in torch and in JAX."""
        if backend == "torch":
            torch.backends.cudnn.allow_tf32 = not enabled
        else:
            import jax

            jax.config.update("jax_default_matmul_precision", "highest" if enabled else None)

    for route in ("keras", "fused"):
        got = logits(route)
        print(json.dumps({"backend": backend, "route": route, "dtype": "fp32 (TF32 allowed, default)",
                          "vs": "timm fp32 on CPU", "max_abs_logit_diff": float(np.abs(got - want).max()),
                          "logit_std": float(want.std())}), flush=True)
        full_fp32(True)
        exact = logits(route)
        full_fp32(False)
        print(json.dumps({"backend": backend, "route": route, "dtype": "fp32 (TF32 off)",
                          "vs": "timm fp32 on CPU", "max_abs_logit_diff": float(np.abs(exact - want).max())}),
              flush=True)
        try:
            bf16 = logits(route, "mixed_bfloat16")
            print(json.dumps({"backend": backend, "route": route, "dtype": "bf16", "vs": "keras fp32 (TF32 off)",
                              "max_abs_logit_diff": float(np.abs(bf16 - exact).max()),
                              "top1_agreement": _top1_agreement(bf16, exact)}), flush=True)
        except Exception as error:  # noqa: BLE001  (recorded, the run goes on)
            print(json.dumps({"backend": backend, "route": route, "dtype": "bf16",
                              "error": f"{type(error).__name__}: {str(error)[:300]}"}), flush=True)
    if backend == "jax":
        cudnn_float32_parity(logits, exact)
    if backend == "torch":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = reference.to(device)
        x = torch.from_numpy(normalize(images).transpose(0, 3, 1, 2).copy()).to(device)
        with torch.inference_mode(), torch.autocast(device, torch.bfloat16):
            amp = model(x).float().cpu().numpy()
        print(json.dumps({"engine": "timm", "dtype": "bf16 autocast", "vs": "timm fp32",
                          "max_abs_logit_diff": float(np.abs(amp - want).max()),
                          "top1_agreement": _top1_agreement(amp, want)}), flush=True)
        route_gradients(device)


def cudnn_float32_parity(logits, exact):
    """The prototype's layout (one BiLSTM2D in float32 against Keras' route),
    then its bf16 model against Keras fp32."""
    import jax
    import numpy as np

    from keras_sequencer import layers

    lstm = None if jax.default_backend() == "gpu" else _reference_lstm
    layer = layers.BiLSTM2D(16, route="keras")
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 12)).astype("float32")
    want = np.asarray(layer(x))
    original = cudnn_float32_recurrences(lstm, every_dtype=True)
    try:
        got = np.asarray(layer(x))
    finally:
        layers.BiLSTM2D._run = original
    print(json.dumps({"backend": "jax", "prototype": "cudnn float32 recurrences", "check": "BiLSTM2D fp32 vs Keras' route",
                      "max_abs_diff": float(np.abs(got - want).max()), "scale": float(np.abs(want).max())}), flush=True)
    cudnn_float32_recurrences(lstm)
    try:
        bf16 = logits("keras", "mixed_bfloat16")
    finally:
        layers.BiLSTM2D._run = original
    print(json.dumps({"backend": "jax", "prototype": "cudnn float32 recurrences", "dtype": "bf16",
                      "vs": "keras fp32 (TF32 off)", "max_abs_logit_diff": float(np.abs(bf16 - exact).max()),
                      "top1_agreement": _top1_agreement(bf16, exact)}), flush=True)


def route_gradients(device):
    """BiLSTM2D's fused and Keras routes on this device: outputs and gradients."""
    import numpy as np
    import torch

    import keras_sequencer as ks

    rng = np.random.default_rng(0)
    layer = ks.BiLSTM2D(96)
    x = rng.normal(size=(4, 14, 14, 384)).astype("float32")
    layer.build(x.shape)
    for variable in layer.trainable_variables:
        variable.assign(rng.normal(scale=0.1, size=variable.shape).astype("float32"))
    weights = torch.from_numpy(rng.normal(size=x.shape).astype("float32")).to(device)
    results = {}
    for route in ("fused", "keras"):
        layer.route = route
        inputs = torch.from_numpy(x).to(device).requires_grad_(True)
        out = layer(inputs)
        grads = torch.autograd.grad((out * weights).sum(), [inputs] + [v.value for v in layer.trainable_variables])
        results[route] = [out.detach()] + list(grads)
    # Relative to each tensor's largest entry: weight gradients sum over 784 positions.
    diffs = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(results["fused"], results["keras"])]
    print(json.dumps({"device": device, "bilstm2d_fused_vs_keras_rel_diff_output": diffs[0],
                      "max_rel_diff_gradients": max(diffs[1:])}), flush=True)


def _timm_step(reference, images, dtype, train):
    """One timm inference or training step on the images, on the GPU if any."""
    import numpy as np
    import torch

    from throughput import timm_training_step

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = reference.to(device).eval()
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
    if train:
        labels = torch.from_numpy(np.arange(len(images)) % 1000).to(device)
        run = timm_training_step(model, x, labels, bf16=dtype == "bf16")
    else:
        def run():
            with torch.inference_mode(), torch.autocast(device, torch.bfloat16, enabled=dtype == "bf16"):
                model(x)

    def step():
        run()
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def _keras_step(reference, images, dtype, train, route, size):
    """One Keras inference or training step, timm's weights in the model."""
    import numpy as np

    import keras

    import keras_sequencer as ks
    from throughput import keras_training_step

    keras.mixed_precision.set_global_policy("mixed_bfloat16" if dtype == "bf16" else "float32")
    try:
        model = ks.create_model(VARIANT, input_shape=(size, size, 3), rnn_route=route, classifier_activation=None,
                                include_preprocessing=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    ks.load_torch_state_dict(model, reference.state_dict())
    labels = np.arange(len(images)) % 1000
    if keras.backend.backend() == "jax":
        import jax

        x, labels = jax.device_put(images), jax.device_put(labels)
        done = jax.block_until_ready
    else:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        x, labels = torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)

        def done(result):
            if device == "cuda":
                torch.cuda.synchronize()
            return result

    if train:
        return keras_training_step(model, x, labels)
    if keras.backend.backend() == "jax":
        return lambda: done(model.predict_on_batch(x))
    import torch

    def step():
        with torch.inference_mode():
            done(model(x, training=False))

    return step


def worker(engine, size, batches, seconds, train):
    """Times every (batch, dtype) for one engine in this process; one JSON line each."""
    backend, route = ENGINES[engine]
    if backend is not None:
        os.environ["KERAS_BACKEND"] = backend
    from throughput import reference_model  # timm before Keras

    if engine == "keras-jax-cudnn32":
        import jax

        cudnn_float32_recurrences(None if jax.default_backend() == "gpu" else _reference_lstm)

    for batch in batches:
        for dtype in ("fp32", "bf16"):
            row = {"engine": engine, "batch": batch, "dtype": dtype, "step": "train" if train else "inference"}
            try:
                reference = reference_model(VARIANT)
                images = _images(batch, size)
                if backend is None:
                    step = _timm_step(reference, images, dtype, train)
                else:
                    step = _keras_step(reference, images, dtype, train, route, size)
                begin = time.perf_counter()
                step()
                row["first_call_s"] = time.perf_counter() - begin
                step()
                times = []
                start = time.perf_counter()
                while time.perf_counter() - start < seconds or len(times) < 3:
                    begin = time.perf_counter()
                    step()
                    times.append(time.perf_counter() - begin)
                row.update(img_s=batch / statistics.median(times), runs=len(times))
            except Exception as error:  # noqa: BLE001  (recorded, the run goes on)
                row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            print(json.dumps(row), flush=True)
            step = None
            _release_memory(backend)


def _release_memory(backend):
    """Frees the last cell's model before the next (batch 256 training holds a lot)."""
    import gc

    gc.collect()
    if backend != "jax":
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    else:
        import keras

        keras.backend.clear_session()


def throughput(out, size, batches, seconds, engines, train, engine_limit):
    results = []

    def save():  # after every row: a timeout keeps what ran
        timm = {(r["batch"], r["dtype"]): r.get("img_s") for r in results if r.get("engine") == "timm"}
        for row in results:
            base = timm.get((row.get("batch"), row.get("dtype")))
            row["ratio_to_timm"] = row["img_s"] / base if base and "img_s" in row else None
        with open(out, "w") as f:
            json.dump(results, f, indent=2)

    for engine in engines:
        command = [sys.executable, __file__, "worker", "--engine", engine, "--size", str(size),
                   "--seconds", str(seconds), "--batches", *map(str, batches), *(["--train"] if train else [])]
        # stderr to a file: a full pipe would stall the worker.
        with tempfile.TemporaryFile("w+") as stderr:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
            # One slow engine (JAX compiles each training step for a while) leaves time for the next.
            timer = threading.Timer(engine_limit, proc.kill)
            timer.start()
            for line in proc.stdout:
                if line.startswith("{"):
                    results.append(json.loads(line))
                    save()
                    print(json.dumps(results[-1]), flush=True)
            timer.cancel()
            if proc.wait() != 0:
                stderr.seek(0)
                tail = stderr.read().strip().splitlines()[-3:]
                if proc.returncode == -9:  # the timer's kill
                    tail = [f"stopped after --engine-limit {engine_limit} s"]
                results.append({"engine": engine, "error": tail})
                save()
                print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["parity", "throughput", "worker"])
    parser.add_argument("--out", default=os.path.join(HERE, "results", "gpu.json"))
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--engine", choices=list(ENGINES))
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    parser.add_argument("--train", action="store_true", help="time training steps, not inference")
    parser.add_argument("--engine-limit", type=float, default=150.0, help="seconds for each engine's worker")
    args = parser.parse_args()
    if args.mode == "parity":
        parity(args.size, batch=8)
    elif args.mode == "throughput":
        throughput(args.out, args.size, args.batches, args.seconds, args.engines, args.train, args.engine_limit)
    else:
        worker(args.engine, args.size, args.batches, args.seconds, args.train)
