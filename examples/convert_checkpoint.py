"""Convert a PyTorch Sequencer2D checkpoint (timm or the authors' release) to Keras.

    python examples/convert_checkpoint.py sequencer2d_s.pth sequencer2d_s.weights.h5

The same as `python -m weights_conversion CHECKPOINT --variant sequencer2d_s --output OUT`.
"""

import sys

import keras_sequencer as ks
from keras_sequencer.weights import read_checkpoint

checkpoint, output = sys.argv[1], sys.argv[2]
variant = sys.argv[3] if len(sys.argv) > 3 else "sequencer2d_s"

state_dict = read_checkpoint(checkpoint)  # .pth/.pt/.bin (needs torch) or .safetensors
model = ks.create_model(variant)
ks.load_torch_state_dict(model, state_dict)  # all or nothing, with a clear error
model.save_weights(output)
print(f"wrote {output}; load it with ks.create_model({variant!r}, weights={output!r})")
