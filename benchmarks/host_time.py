"""Host time per call against timm at a tiny input (issue 13): Python and dispatch.

    python benchmarks/host_time.py [--backends torch jax tensorflow] [--calls 60]
                                   [--size 28] [--variant sequencer2d_s]

At 28x28 the arithmetic of sequencer2d_s is almost nothing; what is left is the
per-call cost of the framework. One worker process per Keras backend holds
timm and the Keras model with the same weights (timm's state dict through
`load_torch_state_dict`) and times them alternately, call by call:

- inference, batch 1: timm `model(x)` under `torch.inference_mode()` against
  Keras `model.predict_on_batch(x)` and the backend's direct call (torch:
  `model(x, training=False)` under `inference_mode`; TensorFlow: the call in a
  `tf.function`; JAX: `predict_on_batch` only, eager JAX retraces);
- one training step, batch 2: timm AdamW + cross-entropy (`zero_grad`,
  `backward`, `step`) against Keras `train_on_batch` with the package's
  optimizer (`training.create_optimizer`, PyTorch-style AdamW) and sparse
  cross-entropy on logits.

Prints medians, ratios timm / Keras (above 1: Keras is faster), the CPU model
and its bf16/AMX flags, and writes benchmarks/results/host_time.json. Run by
hand, not by CI.
"""

import argparse
import json
import os
import subprocess
import sys

from machine import alternate, cpu_info

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ("torch", "jax", "tensorflow")


def worker(backend, variant, size, calls, threads, optimizer_name):
    if threads:
        # One intra-op pool per process everywhere. On a shared 2-core machine,
        # two-thread kernels wait on each other's descheduled halves and the
        # spread between runs swamps the ratios.
        os.environ["OMP_NUM_THREADS"] = str(threads)
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}"
            + f" intra_op_parallelism_threads={threads}"
        )
    import numpy as np
    import timm  # before TensorFlow: the other order crashes the process
    import torch

    if threads:
        torch.set_num_threads(threads)
    os.environ["KERAS_BACKEND"] = backend
    import keras

    if threads and backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)

    import keras_sequencer as ks
    from keras_sequencer.training import create_optimizer
    from keras_sequencer.weights.convert import load_torch_state_dict

    rng = np.random.default_rng(0)
    reference = timm.create_model(variant, pretrained=False)
    with torch.no_grad():  # timm zero-initialises the head: logits would all be equal
        reference.head.fc.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))

    def keras_model():
        model = ks.create_model(
            variant, weights=None, input_shape=(size, size, 3), include_preprocessing=False,
            classifier_activation=None,
        )
        load_torch_state_dict(model, reference.state_dict())
        return model

    results = {"backend": backend, "threads": threads, "optimizer": optimizer_name}

    # Inference, batch 1.
    model = keras_model()
    reference.eval()
    x = rng.normal(size=(1, size, size, 3)).astype("float32")
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

    def timm_infer():
        with torch.inference_mode():
            return reference(xt)

    functions = {"timm": timm_infer, "predict_on_batch": lambda: model.predict_on_batch(x)}
    if backend == "torch":

        def call():
            with torch.inference_mode():
                return model(x, training=False)

        functions["call"] = call
    elif backend == "tensorflow":
        import tensorflow as tf

        fn = tf.function(lambda inputs: model(inputs, training=False))
        functions["call"] = lambda: fn(x)
    diff = np.abs(np.asarray(model.predict_on_batch(x)) - timm_infer().numpy()).max()
    results["inference_max_abs_diff"] = float(diff)
    medians = alternate(functions, calls)
    results["inference_s"] = medians
    results["inference_ratio"] = {k: medians["timm"] / v for k, v in medians.items() if k != "timm"}
    block = model.get_layer("stages_0_blocks_0")
    results["route"] = block.rnn_tokens.selected_route
    blockers = getattr(ks.layers, "fused_call_blockers", None)  # absent before issue 13
    results["whole_block_form"] = bool(blockers) and not blockers(block)

    # One training step, batch 2.
    model = keras_model()
    reference.train()
    images = rng.normal(size=(2, size, size, 3)).astype("float32")
    labels = rng.integers(0, 1000, 2)
    lr, wd = 1e-4, 0.05
    optimizer = torch.optim.AdamW(reference.parameters(), lr=lr, weight_decay=wd)
    xt, yt = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels)

    def timm_step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(reference(xt), yt).backward()
        optimizer.step()

    if optimizer_name == "package":
        keras_optimizer = create_optimizer(model, learning_rate=lr, weight_decay=wd, total_steps=10**6)
    else:
        keras_optimizer = keras.optimizers.AdamW(lr, weight_decay=wd)
    model.compile(
        optimizer=keras_optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    medians = alternate({"timm": timm_step, "train_on_batch": lambda: model.train_on_batch(images, labels)}, calls)
    results["train_s"] = medians
    results["train_ratio"] = {"train_on_batch": medians["timm"] / medians["train_on_batch"]}
    print("RESULT " + json.dumps(results), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--variant", default="sequencer2d_s")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads of every engine (0: each library's default)")
    parser.add_argument("--optimizer", choices=("package", "keras"), default="package",
                        help="Keras side of the training step: training.create_optimizer "
                        "(PyTorchAdamW) or keras.optimizers.AdamW")
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--output", default=os.path.join(HERE, "results", "host_time.json"))
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.variant, args.size, args.calls, args.threads, args.optimizer)

    cpu = cpu_info()
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores, flags: {' '.join(cpu['flags'])}; "
          f"threads {args.threads or 'default'}, optimizer {args.optimizer}")
    rows = []
    for backend in args.backends:
        command = [sys.executable, __file__, "--worker", backend, "--variant", args.variant,
                   "--size", str(args.size), "--calls", str(args.calls), "--threads", str(args.threads),
                   "--optimizer", args.optimizer]
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"{backend}: failed (exit {done.returncode})\n{done.stderr[-3000:]}")
            continue
        row = json.loads(lines[-1][len("RESULT "):])
        rows.append(row)
        inference = ", ".join(
            f"{k} {row['inference_s'][k] * 1e3:.1f} ms ({v:.2f}x)" for k, v in row["inference_ratio"].items()
        )
        print(
            f"{backend}: inference b1 timm {row['inference_s']['timm'] * 1e3:.1f} ms, {inference}; "
            f"max |diff| {row['inference_max_abs_diff']:.1e}; route {row['route']}, "
            f"whole-block form {row['whole_block_form']}\n"
            f"{' ' * len(backend)}  train b2 timm {row['train_s']['timm'] * 1e3:.1f} ms, train_on_batch "
            f"{row['train_s']['train_on_batch'] * 1e3:.1f} ms ({row['train_ratio']['train_on_batch']:.2f}x)",
            flush=True,
        )
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"cpu": cpu, "threads": args.threads, "optimizer": args.optimizer, "variant": args.variant, "size": args.size, "calls": args.calls, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
