"""How long `weights=` takes to fill sequencer2d_s, by source (issue 15's
"convert at load if that is fast enough, measured"): a timm safetensors file
read, converted through the weight table and assigned, against Keras' own
`.weights.h5` loader on the same model. Medians of --rounds, alternating.

    KERAS_BACKEND=torch python benchmarks/weights_load.py
"""

import argparse
import os
import tempfile
import time

import numpy as np
import safetensors.numpy
import timm  # before TensorFlow: see README

import keras  # noqa: E402

import keras_sequencer as ks  # noqa: E402
from keras_sequencer.weights import weights_loader  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = os.path.join(folder, "s.safetensors")
        state = timm.create_model("sequencer2d_s").state_dict()
        safetensors.numpy.save_file({k: np.ascontiguousarray(v.numpy()) for k, v in state.items()}, checkpoint)
        model = ks.create_model("sequencer2d_s", input_shape=(224, 224, 3), weights=checkpoint)
        keras_file = os.path.join(folder, "s.weights.h5")
        model.save_weights(keras_file)
        times = {"safetensors, converted at load": [], "Keras .weights.h5": []}
        for _ in range(args.rounds):
            for (label, path) in zip(times, (checkpoint, keras_file)):
                start = time.perf_counter()
                weights_loader(path)(model)
                times[label].append(time.perf_counter() - start)
    print(f"keras {keras.__version__}, backend {keras.backend.backend()}")
    for label, values in times.items():
        print(f"{label}: median {np.median(values):.2f} s over {args.rounds}")


if __name__ == "__main__":
    main()
