"""bf16 on the CPU against timm (issue 13, target 2), for the current Keras backend.

sequencer2d_s at 224, batch 16 (--batch), the same random weights in both
engines (timm's state dict loaded through our converter, non-zero head).
Engines, alternating call by call in one process, medians of --rounds:
timm fp32, timm under torch.autocast("cpu", torch.bfloat16), Keras fp32 and
Keras under the `mixed_bfloat16` policy. Reports images/s, the ratio of Keras
bf16 to timm's best (fp32 or bf16), and Keras bf16's agreement with Keras fp32
on --agreement-images inputs (max abs logit difference, top-1 agreement).
Records the CPU and its bf16/AMX flags; writes benchmarks/results/bf16_cpu_<backend>.json.

With --train each call is one training step instead (what `finetune
--mixed-precision` trains with on a CPU), each engine in a worker process of
its own: timm `loss.backward(); optimizer.step()` with AdamW and gradient
clipping, its forward under autocast for bf16; Keras `train_on_batch` with the
recipe's optimizer (`training.create_optimizer`), cross-entropy on the logits.
Reports steps' images/s, Keras bf16 against timm's best and against Keras fp32,
and each worker's kernel seconds and page faults per step (a step that maps
fresh memory pays for it in the kernel, more so right after other processes
freed theirs: BENCHMARKS.md, seventeenth round); writes bf16_cpu_train_<backend>.json.

    KERAS_BACKEND=tensorflow python benchmarks/bf16_cpu.py
    KERAS_BACKEND=tensorflow python benchmarks/bf16_cpu.py --train --batch 8 --rounds 3
"""

import argparse
import json
import os
import resource
import statistics
import time

import numpy as np
import timm  # before TensorFlow: see README
import torch

import keras  # noqa: E402

import keras_sequencer as ks  # noqa: E402
import throughput  # noqa: E402
from machine import alternate, cpu_info  # noqa: E402


def keras_model(state_dict, policy, size):
    keras.config.set_dtype_policy(policy)
    try:
        model = ks.create_model("sequencer2d_s", input_shape=(size, size, 3), classifier_activation=None,
                                include_preprocessing=False)
        ks.load_torch_state_dict(model, state_dict)
    finally:
        keras.config.set_dtype_policy("float32")
    return model


TRAIN_ENGINES = ("timm fp32", "timm bf16", "keras fp32", "keras bf16")


def reference_state():
    """timm's sequencer2d_s with seed-0 weights and a non-zero head, as every benchmark runs it."""
    return throughput.reference_model("sequencer2d_s").state_dict()


def train_step(engine, state, batch, size):
    """One training step of `engine` (one of TRAIN_ENGINES) as a function."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, size, size, 3)).astype("float32")
    labels = rng.integers(0, 1000, batch)
    if engine.startswith("keras"):
        model = keras_model(state, "mixed_bfloat16" if engine.endswith("bf16") else "float32", size)
        return throughput.keras_training_step(model, x, labels)
    net = timm.create_model("sequencer2d_s")
    net.load_state_dict(state)
    x, labels = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels)
    return throughput.timm_training_step(net, x, labels, bf16=engine.endswith("bf16"))


def train_worker(args):
    """Answers 'run' lines with the seconds of one training step, the seconds
    its process spent in the kernel and the page faults it took."""
    def one_step(step):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step()
        seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        return {"step_s": seconds, "kernel_s": after.ru_stime - before.ru_stime,
                "page_faults": after.ru_minflt - before.ru_minflt}

    throughput.serve_rounds(train_step(args.train_worker, reference_state(), args.batch, args.size), one_step)


def train(args):
    """--train: the four engines in worker processes of their own (one process
    holding four training models slowed JAX's steps by a third), one step each
    in turn per round."""
    workers = {}
    for engine in TRAIN_ENGINES:  # started one at a time so their warm-ups do not overlap
        command = [__file__, "--train-worker", engine, "--batch", str(args.batch), "--size", str(args.size)]
        workers[engine] = throughput.start_worker(command, engine)
    answers = throughput.alternate_rounds(workers, args.rounds)

    def median(key):
        return {name: statistics.median(a[key] for a in steps) for name, steps in answers.items()}

    speed = {name: args.batch / s for name, s in median("step_s").items()}
    return {
        "images_per_s": {k: round(v, 3) for k, v in speed.items()},
        "kernel_s_per_step": {k: round(v, 2) for k, v in median("kernel_s").items()},
        "page_faults_per_step": {k: int(v) for k, v in median("page_faults").items()},
        "keras_bf16_vs_timm_best": round(speed["keras bf16"] / max(speed["timm fp32"], speed["timm bf16"]), 3),
        "keras_bf16_vs_keras_fp32": round(speed["keras bf16"] / speed["keras fp32"], 3),
        "keras_fp32_vs_timm_fp32": round(speed["keras fp32"] / speed["timm fp32"], 3),
        "timm_bf16_vs_timm_fp32": round(speed["timm bf16"] / speed["timm fp32"], 3),
    }


def keras_call(model):
    if keras.backend.backend() == "jax":
        return lambda x: np.asarray(model.predict(x, verbose=0, batch_size=len(x)), "float32")
    if keras.backend.backend() == "torch":
        def call(x):
            with torch.no_grad():
                return keras.ops.convert_to_numpy(keras.ops.cast(model(x, training=False), "float32"))
        return call
    # TensorFlow: the compiled graph (predict_on_batch), as BENCHMARKS.md times it.
    return lambda x: np.asarray(model.predict_on_batch(x), "float32")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--agreement-images", type=int, default=64)
    parser.add_argument("--train", action="store_true", help="time training steps, not inference")
    parser.add_argument("--train-worker", choices=TRAIN_ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_worker:
        return train_worker(args)
    common = {
        "backend": keras.backend.backend(),
        "cpu": cpu_info(),
        "versions": {"keras": keras.__version__, "torch": torch.__version__, "timm": timm.__version__},
        "batch": args.batch, "size": args.size, "rounds": args.rounds, "torch_threads": torch.get_num_threads(),
    }
    if args.train:
        write({**common, "train_step": True, **train(args)}, f"bf16_cpu_train_{common['backend']}.json")
        return
    state = reference_state()
    net = timm.create_model("sequencer2d_s").eval()
    net.load_state_dict(state)
    fp32, bf16 = keras_model(state, "float32", args.size), keras_model(state, "mixed_bfloat16", args.size)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.size, args.size, 3)).astype("float32")
    x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

    def timm_fp32():
        with torch.inference_mode():
            return net(x_torch)

    def timm_bf16():
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
            return net(x_torch)

    engines = {"timm fp32": timm_fp32, "timm bf16": timm_bf16,
               "keras fp32": lambda: keras_call(fp32)(x), "keras bf16": lambda: keras_call(bf16)(x)}
    speed = {name: args.batch / seconds for name, seconds in alternate(engines, args.rounds, warmup=1).items()}
    timm_best = max(speed["timm fp32"], speed["timm bf16"])

    exact, low = [], []
    for start in range(0, args.agreement_images, args.batch):
        batch = rng.standard_normal((args.batch, args.size, args.size, 3)).astype("float32")
        exact.append(keras_call(fp32)(batch))
        low.append(keras_call(bf16)(batch))
    exact, low = np.concatenate(exact), np.concatenate(low)
    result = {
        **common,
        "images_per_s": {k: round(v, 3) for k, v in speed.items()},
        "keras_bf16_vs_timm_best": round(speed["keras bf16"] / timm_best, 3),
        "keras_fp32_vs_timm_fp32": round(speed["keras fp32"] / speed["timm fp32"], 3),
        "agreement": {"images": len(exact), "max_abs_logit_diff": float(np.abs(low - exact).max()),
                      "logit_std": float(exact.std()),
                      "top1_agreement": float((low.argmax(-1) == exact.argmax(-1)).mean())},
    }
    write(result, f"bf16_cpu_{result['backend']}.json")


def write(result, name):
    print(json.dumps(result, indent=2))
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
