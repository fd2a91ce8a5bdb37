"""Export a Sequencer2D to TFLite/LiteRT (builtin ops only) and run it.

    KERAS_BACKEND=tensorflow python examples/export_tflite.py model.tflite \
        [--weights imagenet|none|PATH] [--variant s|m|l] [--image-size 224] [--quantize none|float16|dynamic-int8]

PATH may be a .keras file saved on any backend. Needs `pip install "keras-sequencer[export]"`.
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # TFLite comes from TensorFlow's converter

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sequencer as ks  # noqa: E402
from keras_sequencer.tasks.export import serving_model, tflite_interpreter  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("output")
parser.add_argument("--weights", default="imagenet", help='"imagenet", "none", a weights file or a .keras model')
parser.add_argument("--variant", default="s", choices=["s", "m", "l"])
parser.add_argument("--image-size", type=int, default=224)
parser.add_argument("--quantize", default="none", choices=["none", "float16", "dynamic-int8"])
args = parser.parse_args()

size = args.image_size
if args.weights.endswith(".keras"):
    model = keras.models.load_model(args.weights)
else:
    weights = None if args.weights == "none" else args.weights
    model = ks.create_model(f"sequencer2d_{args.variant}", weights=weights, input_shape=(size, size, 3))

# uint8 RGB in, probabilities out: what a phone app feeds from its camera.
ks.export(model, args.output, format="tflite", image_size=size, uint8_input=True,
          quantize=args.quantize, overwrite=True)
print(f"wrote {args.output} ({os.path.getsize(args.output) / 1e6:.1f} MB)")

# Run it in the standalone LiteRT interpreter (no TensorFlow ops, no Flex delegate).
interpreter = tflite_interpreter(args.output)
interpreter.allocate_tensors()
(inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
image = np.random.default_rng(0).integers(0, 256, inp["shape"], dtype="uint8")
interpreter.set_tensor(inp["index"], image)
interpreter.invoke()
probabilities = interpreter.get_tensor(out["index"])
expected = serving_model(model, (size, size), uint8_input=True).predict(image, verbose=0)
print(f"max abs difference vs Keras: {np.abs(probabilities - expected).max():.2e}")
