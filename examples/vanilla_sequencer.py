"""The vanilla Sequencer: build a variant, load the authors' checkpoint if you
have one, classify an image, and compare it with Sequencer2D. Runs offline.

    python examples/vanilla_sequencer.py [--variant v_sequencer_s|v_sequencer_s_h|v_sequencer_s_pe]
        [--checkpoint PATH] [--image PATH] [--image-size 224] [--compare-2d]

No ImageNet weights are published for the vanilla Sequencer: without
--checkpoint the weights are random and the classes are meaningless.
"""

import argparse
import time

import numpy as np

import keras_sequencer as ks

parser = argparse.ArgumentParser()
parser.add_argument("--variant", default="v_sequencer_s",
                    choices=[n for n in ks.list_models() if n.startswith("v_")])
parser.add_argument("--checkpoint", help="the authors' .pth/.safetensors or a Keras .weights.h5")
parser.add_argument("--image", help="an image to classify (default: a synthetic one)")
parser.add_argument("--image-size", type=int, default=224)
parser.add_argument("--compare-2d", action="store_true", help="also run sequencer2d_s on the same image")
args = parser.parse_args()

size = args.image_size
if args.image:
    image = ks.load_image(args.image, image_size=size)  # timm's eval transform
else:
    across, down = np.meshgrid(np.linspace(0, 255, size), np.linspace(0, 255, size))
    image = np.stack([across, down, 255 - across], axis=-1)  # colour ramps
batch = image[None].astype("float32")


def run(name, weights):
    model = ks.create_model(name, weights=weights, input_shape=(size, size, 3))
    model.predict(batch, verbose=0)  # the first call compiles or traces
    start = time.perf_counter()
    predictions = model.predict(batch, verbose=0)
    seconds = time.perf_counter() - start
    print(f"{name}: {model.count_params() / 1e6:.2f}M parameters, {seconds:.2f} s per image at {size}px")
    for synset, label, probability in ks.decode_predictions(predictions, top=3)[0]:
        print(f"  {label:<30s} {probability:.4f}  ({synset})")
    return model


print(f"weights: {args.checkpoint or 'random (no ImageNet weights are published)'}")
model = run(args.variant, args.checkpoint)
stem = model.get_layer("stem")
grid = size // stem.strides[0]
print(f"  the BiLSTM reads {grid * grid} tokens in one sequence ({grid}x{grid} grid, row-major)")
if args.compare_2d:
    # Sequencer2D runs a vertical and a horizontal BiLSTM: sequences as long as one side.
    run("sequencer2d_s", None)
