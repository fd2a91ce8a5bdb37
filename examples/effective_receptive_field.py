"""Effective receptive fields of Sequencer2D-S (the paper's ERF figure).

    python examples/effective_receptive_field.py [--weights imagenet|PATH] [--output erf]

Computes, for scikit-learn's sample photographs, the ERF of the last block of
every stage (or --layers), and writes per layer the raw map (.npy) and a
min-max scaled heatmap (.png) into --output. The authors averaged over 32
ImageNet validation batches; two photographs give a noisier map.
"""

import argparse

import numpy as np

import keras_sequencer as ks
from keras_sequencer.tasks.erf import effective_receptive_field, save_erf_heatmaps

parser = argparse.ArgumentParser()
parser.add_argument("--weights", default="imagenet", help='"imagenet" or a weights file')
parser.add_argument("--output", default="erf", help="folder for the .npy maps and .png heatmaps")
parser.add_argument("--image-size", type=int, default=224)
parser.add_argument("--layers", default=None,
                    help="comma-separated layer names (default: the last block of every stage)")
parser.add_argument("--batch-size", type=int, default=2)
args = parser.parse_args()

try:
    from PIL import Image
    from sklearn.datasets import load_sample_images
except ImportError as error:
    raise SystemExit(f"this example needs scikit-learn and Pillow: {error}")

# timm's eval transform (bicubic resize, centre crop) on RGB [0, 255]; the model normalises inside.
images = np.stack([
    ks.load_image(Image.fromarray(photo), image_size=args.image_size)
    for photo in load_sample_images().images
])
model = ks.Sequencer2DS(weights=args.weights, input_shape=(args.image_size, args.image_size, 3))
layers = args.layers.split(",") if args.layers else None
erf = effective_receptive_field(model, images, layers=layers, batch_size=args.batch_size)
for path in save_erf_heatmaps(erf, args.output):
    print("wrote", path)
