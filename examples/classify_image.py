"""Classify images with a pretrained Sequencer2D.

    python examples/classify_image.py photo.jpg [--weights imagenet|PATH] [--variant s|m|l]
"""

import argparse

import numpy as np

import keras_sequencer as ks

parser = argparse.ArgumentParser()
parser.add_argument("images", nargs="+")
parser.add_argument("--weights", default="imagenet", help='"imagenet" or a weights file')
parser.add_argument("--variant", default="s", choices=["s", "m", "l"])
parser.add_argument("--image-size", type=int, default=224)
args = parser.parse_args()

builder = {"s": ks.Sequencer2DS, "m": ks.Sequencer2DM, "l": ks.Sequencer2DL}[args.variant]
model = builder(weights=args.weights, input_shape=(args.image_size, args.image_size, 3))

# timm's eval transform (bicubic resize, centre crop); the model normalises inside.
images = [ks.load_image(path, image_size=args.image_size) for path in args.images]
predictions = model.predict(ks.preprocess_input(np.stack(images)), verbose=0)
for path, top5 in zip(args.images, ks.decode_predictions(predictions, top=5)):
    print(path)
    for synset, label, probability in top5:
        print(f"  {label:<30s} {probability:.4f}  ({synset})")
