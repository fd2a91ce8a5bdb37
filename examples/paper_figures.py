"""The README's pictures of the paper's two analyses, made offline on the digits demo.

    python examples/paper_figures.py --output-dir docs/images

Neither ImageNet weights nor ImageNet data are needed (or used): the model is the
digits demo's compact Sequencer2D (`keras_sequencer.tasks.demo`: 2 + 2 BiLSTM2D
blocks, 16x16 inputs), trained here on scikit-learn's handwritten digits in a
minute or two (or read from --model, a `model.keras` the demo wrote).

- erf.png: effective receptive fields (`tasks.erf.effective_receptive_field`) of
  every block, for the same architecture randomly initialised and trained,
  summed over the demo's held-out test digits; each map min-max scaled, as in
  the paper's figure (and `plots.plot_erf`).
- resolution.png: `tasks.evaluate.resolution_sweep` of the trained model over
  input sizes from half to double its training size, on the held-out test
  digits written as a class-folder tree of PNGs: top-1 relative to the top-1
  at the training size (the paper's axes), labelled "digits demo".

Intermediate files (the demo's run, the PNG tree, resolution.csv/.md, the raw
ERF maps) go to --work-dir (default: a temporary folder, removed at the end).
"""

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--output-dir", default="docs/images", help="where erf.png and resolution.png are written")
parser.add_argument("--work-dir", default=None, help="folder for intermediate files (default: temporary)")
parser.add_argument("--model", default=None,
                    help="a trained digits-demo model.keras to use instead of training one")
parser.add_argument("--epochs", type=int, default=15, help="demo training epochs (the demo's default: 15)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--sizes", type=int, nargs="+", default=[8, 10, 12, 14, 16, 20, 24, 28, 32],
                    help="input sizes of the resolution sweep (the model was trained at 16)")
parser.add_argument("--erf-size", type=int, default=None,
                    help="input size the ERFs are probed at (default: the training size, 16)")
parser.add_argument("--erf-images", type=int, default=None,
                    help="how many held-out test digits the ERFs sum over (default: all 359)")
parser.add_argument("--layers", default=None,
                    help="comma-separated layers to probe (default: every block, stages_0_blocks_0 ... "
                         "stages_1_blocks_1)")
args = parser.parse_args()

import keras  # noqa: E402

from keras_sequencer.models import Sequencer2D  # noqa: E402
from keras_sequencer.tasks.demo import DEMO_CONFIG, DEMO_IMAGE_SIZE, load_digits_splits, run_demo  # noqa: E402
from keras_sequencer.tasks.erf import effective_receptive_field  # noqa: E402
from keras_sequencer.tasks.evaluate import resolution_sweep  # noqa: E402

start = time.perf_counter()
os.makedirs(args.output_dir, exist_ok=True)
work_dir = args.work_dir or tempfile.mkdtemp(prefix="paper_figures_")
os.makedirs(work_dir, exist_ok=True)
CLASSES = [str(i) for i in range(10)]
# The legend of resolution.png (a Keras model name cannot hold spaces on TensorFlow).
LABEL = "Sequencer2D digits demo (not ImageNet)"


def demo_twin(name, weights=None):
    """The demo's architecture taking any input size (the sweep needs that; the
    demo's own model is fixed at 16x16), with the demo model's weights if given.
    It says it was trained at 16 px with the demo's transform: the whole image,
    no crop (crop_pct 1)."""
    model = Sequencer2D(**DEMO_CONFIG, input_shape=(None, None, 3), classes=10, drop_path_rate=0.05,
                        default_size=DEMO_IMAGE_SIZE, name=name)
    if weights is not None:
        model.set_weights(weights)
    model.metadata.update({"class_names": CLASSES, "crop_pct": 1.0, "image_size": [DEMO_IMAGE_SIZE] * 2})
    return model


# 1. The trained model: the digits demo, as `keras-sequencer demo` runs it.
if args.model:
    model_path, demo_accuracy = args.model, None
else:
    print(f"training the digits demo for {args.epochs} epochs ...", flush=True)
    demo_accuracy = run_demo(os.path.join(work_dir, "demo"), epochs=args.epochs, seed=args.seed, verbose=0)
    model_path = os.path.join(work_dir, "demo", "model.keras")
    print(f"demo test accuracy: {demo_accuracy:.4f}", flush=True)
demo_model = keras.models.load_model(model_path, compile=False)
trained = demo_twin("sequencer2d_digits", demo_model.get_weights())
keras.utils.set_random_seed(args.seed)
untrained = demo_twin("sequencer2d_digits_random")

x_test, y_test = load_digits_splits(seed=args.seed)["test"]
check = np.asarray(trained.predict(x_test, verbose=0)).argmax(-1)
reference = np.asarray(demo_model.predict(x_test, verbose=0)).argmax(-1)
assert (check == reference).all(), "the any-size twin predicts differently from the demo model"
accuracy = float((check == y_test).mean())

# 2. Effective receptive fields: random vs trained, every block, held-out digits.
erf_size = args.erf_size or DEMO_IMAGE_SIZE
erf_images = load_digits_splits(seed=args.seed, image_size=erf_size)["test"][0][: args.erf_images]
layers = args.layers.split(",") if args.layers else [
    layer.name for layer in trained.layers if layer.name.startswith("stages_") and "_blocks_" in layer.name
]
rows = [("random initialisation", untrained), (f"trained (test top-1 {100 * accuracy:.1f}%)", trained)]
maps = {}
for row_label, model in rows:
    maps[row_label] = effective_receptive_field(model, erf_images, layers=layers, batch_size=64)
    np.savez(os.path.join(work_dir, f"erf_{model.name}.npz"), **maps[row_label])

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, axes = plt.subplots(len(rows), len(layers), figsize=(2.3 * len(layers) + 1.2, 2.3 * len(rows) + 1.1),
                         squeeze=False)
for r, (row_label, _) in enumerate(rows):
    for c, name in enumerate(layers):
        values = maps[row_label][name]
        low, high = values.min(), values.max()  # min-max scaled, as plots.plot_erf
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
        ax = axes[r, c]
        image = ax.imshow(scaled, cmap="RdYlGn", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if r == 0:
            ax.set_title(name, fontsize=10)
        if c == 0:
            ax.set_ylabel(row_label, fontsize=10)
fig.suptitle(
    f"Effective receptive fields: the digits-demo Sequencer2D ({erf_size}x{erf_size} input), "
    f"random vs trained\nscikit-learn digits, summed over {len(erf_images)} held-out test images "
    "(not ImageNet weights or data)",
    fontsize=10,
)
fig.tight_layout(rect=(0, 0, 0.93, 1))
fig.colorbar(image, cax=fig.add_axes([0.94, 0.12, 0.015, 0.7]))
erf_png = os.path.join(args.output_dir, "erf.png")
fig.savefig(erf_png, dpi=100)
plt.close(fig)
print("wrote", erf_png, flush=True)

# 3. Resolution adaptability: the held-out digits as class folders of PNGs.
from PIL import Image  # noqa: E402

data_dir = os.path.join(work_dir, "digits_test")
for index, (image, label) in enumerate(zip(x_test, y_test)):
    folder = os.path.join(data_dir, CLASSES[label])
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(np.clip(np.round(image), 0, 255).astype("uint8")).save(os.path.join(folder, f"{index:04d}.png"))
sizes = sorted(set(args.sizes) | {DEMO_IMAGE_SIZE})
sweep_dir = os.path.join(work_dir, "resolution")
results = resolution_sweep(trained, data_dir, sizes, output_dir=sweep_dir, reference_size=DEMO_IMAGE_SIZE,
                           label=LABEL, progress=False)
for row in results:
    print(f"{row['image_size']:>4} px: top-1 {row['top1']:6.2f}%  relative {row['relative_top1']:.3f}")
resolution_png = os.path.join(args.output_dir, "resolution.png")
shutil.copyfile(os.path.join(sweep_dir, "resolution.png"), resolution_png)
print("wrote", resolution_png)

if args.work_dir is None:
    shutil.rmtree(work_dir, ignore_errors=True)
print(f"done in {time.perf_counter() - start:.0f} s")
