"""Fine-tune Sequencer2D-S (ImageNet weights) on your own folder of images.

    python examples/finetune_folder.py DATA_DIR [--output run] [--epochs 10] [--image-size 224]

DATA_DIR holds one sub-folder of images per class. The same as
`keras-sequencer finetune DATA_DIR`, written out with the package's pieces.
"""

import argparse

from keras_sequencer.tasks.finetune import finetune

parser = argparse.ArgumentParser()
parser.add_argument("data_dir")
parser.add_argument("--output", default="sequencer_finetune")
parser.add_argument("--weights", default="imagenet", help='"imagenet", a weights file, or a .keras model')
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--image-size", type=int, default=224)
parser.add_argument("--freeze-backbone", action="store_true")
args = parser.parse_args()

result = finetune(
    args.data_dir,
    args.output,
    variant="sequencer2d_s",
    weights=args.weights,
    epochs=args.epochs,
    batch_size=args.batch_size,
    image_size=args.image_size,
    learning_rate=1e-4,  # AdamW, 1 warmup epoch then cosine; decay skips norms and biases
    freeze_backbone=args.freeze_backbone,
)
print(f"classes: {', '.join(result['classes'])}")
print(f"best model: {result['best_model']}")
print(f"accuracy: {result['accuracy']:.3f}")
