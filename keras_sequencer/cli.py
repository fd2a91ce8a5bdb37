"""The `keras-sequencer` command: predict, evaluate, finetune, export, erf and demo.

Argument parsing and printing only: heavy libraries are imported when a command
runs, so `--help` answers at once."""

import argparse
import json
import os
import re
import sys
import threading

from keras_sequencer import registry
from keras_sequencer.files import is_model_file

VARIANTS = {"s": "sequencer2d_s", "m": "sequencer2d_m", "l": "sequencer2d_l"}


class CommandError(Exception):
    """A user error: printed as one line, exit status 2."""


def _variant(value):
    return VARIANTS.get(value, value)


def _check_variant(args):
    variant = getattr(args, "variant", None)
    if variant is not None and variant not in registry.MODEL_CONFIGS:
        raise CommandError(f"unknown variant {variant!r} (s, m, l or a registry name)")


def build_parser():
    parser = argparse.ArgumentParser(prog="keras-sequencer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def model_options(p):
        p.add_argument("--variant", type=_variant, default="sequencer2d_s", help="s, m, l or a registry name")
        p.add_argument("--weights", default="imagenet",
                       help="imagenet, none, a weights file, or a .keras model (which brings its own size and classes)")
        p.add_argument("--image-size", type=int, default=None,
                       help="overrides the size the model was made for (a .keras model's own, or the variant's)")

    def image_options(p):
        model_options(p)
        p.add_argument("--crop-pct", type=float, default=None, help="eval crop fraction (default: the model's, 0.875)")
        p.add_argument("--batch-size", type=int, default=32)

    predict = sub.add_parser("predict", help="top-k classes of images, folders (recursively) or globs")
    predict.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    image_options(predict)
    predict.add_argument("--top", type=int, default=5)
    predict.add_argument("--json", action="store_true", help="print JSON instead of text")

    evaluate = sub.add_parser("evaluate", help="top-1/top-5 accuracy over a class-per-folder directory")
    evaluate.add_argument("data_dir")
    image_options(evaluate)
    evaluate.add_argument("--image-sizes", type=int, nargs="+", default=None,
                          help="evaluate at each size (the paper's resolution figure); writes a table and a plot")
    evaluate.add_argument("--output", default="resolution", help="folder for the --image-sizes table and plot")
    evaluate.add_argument("--timm", nargs="+", default=(), metavar="NAME",
                          help="with --image-sizes: also evaluate these timm models (pretrained, as timm "
                               "loads them; needs torch and timm) on the same data, for comparison")

    export = sub.add_parser("export", help="SavedModel, TFLite/LiteRT or ONNX for serving")
    model_options(export)
    export.add_argument("--format", choices=("saved_model", "tflite", "onnx"), default="saved_model")
    export.add_argument("--output", required=True, help="SavedModel folder, or a .tflite / .onnx file")
    export.add_argument("--batch-size", type=int, default=None, help="fixed batch (tflite: 1)")
    export.add_argument(
        "--quantize", choices=("none", "float16", "dynamic-int8"), default="none", help="tflite only"
    )
    export.add_argument("--uint8-input", action="store_true", help="uint8 RGB in, probabilities out")
    export.add_argument("--overwrite", action="store_true")

    finetune = sub.add_parser(
        "finetune", help="fine-tune on a folder with one sub-folder of images per class",
        description="Fine-tune on a folder with one sub-folder of images per class. Options left out take "
        "their defaults; with --resume they take the values the run in --output recorded, and only "
        "--epochs may change.",
    )
    finetune.add_argument("data_dir", nargs="?", help="class folders (recorded; optional with --resume)")
    finetune.add_argument("--output", default="sequencer_finetune", help="folder for the run (default: %(default)s)")
    finetune.add_argument("--resume", action="store_true", help="continue the run recorded in --output")
    finetune.add_argument("--variant", type=_variant, help="s, m, l or a registry name (default: s)")
    finetune.add_argument("--weights", help="imagenet (default), none, a weights file or a .keras model")
    finetune.add_argument("--epochs", type=int, help="total epochs (default: 10); may grow on --resume")
    finetune.add_argument("--batch-size", type=int, help="default: 32")
    finetune.add_argument("--image-size", type=int, help="default: the variant's (224), or a .keras model's")
    finetune.add_argument("--crop-pct", type=float, help="eval transform crop fraction (default: 0.875)")
    finetune.add_argument("--lr", type=float, help="peak learning rate, AdamW with warmup + cosine (default: 1e-4)")
    finetune.add_argument("--weight-decay", type=float, help="default: 0.05")
    finetune.add_argument("--warmup-epochs", type=int, help="default: 1")
    finetune.add_argument("--label-smoothing", type=float, help="default: 0.1")
    finetune.add_argument("--drop-path-rate", type=float, help="default: 0.1")
    finetune.add_argument("--validation-split", type=float, help="stratified fraction held out (default: 0.2)")
    finetune.add_argument("--freeze-backbone", action="store_const", const=True, help="train the new head only")
    finetune.add_argument("--mixed-precision", action="store_const", const=True,
                          help="float16 on GPU, bfloat16 on CPU")
    finetune.add_argument("--no-augment", dest="augment", action="store_const", const=False,
                          help="no flips, zoom or shifts")
    finetune.add_argument("--seed", type=int, help="default: 0")
    finetune.add_argument(
        "--distribute", action="store_true",
        help="data parallel: JAX DataParallel or TF MirroredStrategy (MultiWorker with TF_CONFIG)",
    )

    erf = sub.add_parser("erf", help="effective receptive fields of feature maps, as .npy maps and heatmaps")
    erf.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    image_options(erf)
    erf.add_argument("--layers", default=None,
                     help="comma-separated layers, e.g. stem,stages_3_blocks_2 (default: each stage's last block)")
    erf.add_argument("--output", default="erf", help="folder for <layer>.npy and <layer>.png (default: %(default)s)")

    demo = sub.add_parser("demo", help="train a compact Sequencer2D on scikit-learn's digits (offline)")
    demo.add_argument("--output", default="sequencer_demo", help="folder for the model, log and plots")
    demo.add_argument("--epochs", type=int, default=15)
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    return parser


class LoadedModel:
    """A model and what it knows: class names, input size and eval transform."""

    def __init__(self, model, source, class_names, image_size, crop_pct):
        self.model, self.source = model, source
        self.class_names, self.image_size, self.crop_pct = class_names, image_size, crop_pct


def _run_folder_classes(path):
    """Class names from the run folder a model file sits in (classes.json)."""
    classes = os.path.join(os.path.dirname(os.path.abspath(path)), "classes.json")
    try:
        with open(classes) as f:
            names = json.load(f)
    except (OSError, ValueError):
        return None
    return names if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def load_model(args):
    """The model of --weights/--variant, with --image-size and --crop-pct
    overriding what the model says about itself."""
    import keras_sequencer as ks
    from keras_sequencer.models import minimum_input_size, minimum_model_input_size, model_metadata
    from keras_sequencer.models.base import ModelFileError, load_model_file

    override = getattr(args, "image_size", None)
    if is_model_file(args.weights):
        try:
            model = load_model_file(args.weights)
        except ModelFileError as error:
            raise CommandError(str(error)) from None
        source = args.weights
    else:
        if args.weights not in ("imagenet", "none") and not os.path.isfile(args.weights):
            raise CommandError(f"no such weights file: {args.weights}")
        size = override or registry.MODEL_CONFIGS[args.variant]["default_size"]
        minimum = minimum_input_size(registry.MODEL_CONFIGS[args.variant]["arch"]["patch_sizes"])
        if size < minimum:
            raise CommandError(f"--image-size {size} is too small for {args.variant}: it needs at least {minimum}")
        model = ks.create_model(
            args.variant,
            weights=None if args.weights == "none" else args.weights,
            input_shape=(None, None, 3) if getattr(args, "dynamic_size", False) else (size, size, 3),
        )
        source = args.variant
    info = model_metadata(model)
    image_size = info["image_size"]
    if override is not None:
        if not info["dynamic_size"] and tuple(image_size) != (override, override):
            raise CommandError(
                f"--image-size {override} does not fit {source}, which takes {image_size[0]}x{image_size[1]} "
                "images (leave --image-size out to use the model's size)"
            )
        minimum = minimum_model_input_size(model)
        if override < minimum:
            raise CommandError(f"--image-size {override} is too small for {source}: it needs at least {minimum}")
        image_size = (override, override)
    class_names = info["class_names"]
    if class_names is None and is_model_file(source):
        class_names = _run_folder_classes(source)
    outputs = model.output_shape[-1]
    if class_names is not None and len(class_names) != outputs:
        class_names = None
    crop_pct = getattr(args, "crop_pct", None) or info["crop_pct"]
    return LoadedModel(model, source, class_names, image_size, crop_pct)


def _read_images(paths, loaded):
    """(batch, kept paths); unreadable files are reported on stderr and skipped."""
    import numpy as np

    from keras_sequencer.data import DataError, load_image

    images, kept = [], []
    for path in paths:
        try:
            images.append(load_image(path, loaded.image_size, loaded.crop_pct))
            kept.append(path)
        except DataError as error:
            print(f"warning: {error}; skipped", file=sys.stderr)
    return (np.stack(images) if images else None), kept


def _predict(loaded, images):
    from keras_sequencer.tasks.evaluate import model_outputs

    return model_outputs(loaded.model, images)


def _labels(loaded, probs, top):
    """[(index, label, synset or None, probability), ...] per row, best first."""
    import numpy as np

    from keras_sequencer.imagenet import imagenet_class_names, imagenet_synsets

    if loaded.class_names is not None:
        names, synsets = loaded.class_names, None
    elif probs.shape[-1] == 1000:
        names = [n.split(",")[0] for n in imagenet_class_names()]
        synsets = imagenet_synsets()
    else:
        names, synsets = [f"class {i}" for i in range(probs.shape[-1])], None
    order = np.argsort(probs, axis=-1)[:, ::-1][:, :top]
    return [
        [(int(i), names[i], synsets[i] if synsets else None, float(p[i])) for i in row]
        for row, p in zip(order, probs)
    ]


def run_predict(args):
    from keras_sequencer.data import DataError, find_images

    models = [p for p in args.images if is_model_file(p)]
    if models:
        raise CommandError(f"{models[0]} is a model, not an image: pass it as --weights {models[0]}")
    try:
        paths = find_images(args.images)
    except DataError as error:
        raise CommandError(str(error)) from None
    loaded = load_model(args)
    results = []
    for start in range(0, len(paths), args.batch_size):
        images, kept = _read_images(paths[start : start + args.batch_size], loaded)
        if images is None:
            continue
        for path, top in zip(kept, _labels(loaded, _predict(loaded, images), args.top)):
            predictions = [{"index": i, "label": name, "probability": p} for i, name, _, p in top]
            for item, (_, _, synset, _) in zip(predictions, top):
                if synset:
                    item["synset"] = synset
            results.append({"image": path, "predictions": predictions})
            if not args.json:
                print(path)
                for rank, item in enumerate(predictions, 1):
                    tag = f"  ({item['synset']})" if "synset" in item else ""
                    print(f"  {rank}. {item['label']:<30s} {item['probability']:.4f}{tag}")
    if not results:
        raise CommandError("none of the images could be read")
    if len(results) < len(paths):
        print(f"skipped {len(paths) - len(results)} of {len(paths)} images (unreadable)", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def run_evaluate(args):
    from keras_sequencer.data import class_folders
    from keras_sequencer.tasks.evaluate import evaluate, resolution_sweep

    class_folders(args.data_dir)  # a bad folder is reported before the model loads
    if args.timm:
        if not args.image_sizes:
            raise CommandError("--timm compares resolution sweeps: give --image-sizes too")
        try:  # before keras: TensorFlow imported first makes torchvision crash the process
            import timm  # noqa: F401
        except ImportError:
            raise CommandError("--timm needs torch and timm: pip install torch timm") from None
    if args.image_sizes:
        args.image_size = None
        args.dynamic_size = True
    loaded = load_model(args)
    options = dict(crop_pct=loaded.crop_pct, batch_size=args.batch_size, class_names=loaded.class_names,
                   source=loaded.source)
    if args.image_sizes:
        rows = resolution_sweep(loaded.model, args.data_dir, args.image_sizes, output_dir=args.output,
                                compare_timm=args.timm, **options)
        print(f"images: {rows[0]['images']}" + (f" (skipped {rows[0]['skipped']} unreadable)" if rows[0]["skipped"] else ""))
        for row in rows:
            label = f"{row['model']:<24s} " if args.timm else ""
            print(f"{label}{row['image_size']:>5d} px  top-1: {row['top1']:.3f}  top-5: {row['top5']:.3f}  "
                  f"relative top-1: {row['relative_top1']:.4f}")
        print(f"wrote {args.output}/resolution.csv, resolution.md and resolution.png")
        return 0
    result = evaluate(loaded.model, args.data_dir, image_size=loaded.image_size, **options)
    print(f"images: {result['images']}" + (f" (skipped {result['skipped']} unreadable)" if result["skipped"] else ""))
    print(f"top-1: {result['top1']:.3f}")
    print(f"top-5: {result['top5']:.3f}")
    return 0


def run_erf(args):
    from keras_sequencer.data import find_images
    from keras_sequencer.tasks.erf import effective_receptive_field, save_erf_heatmaps

    paths = find_images(args.images)
    loaded = load_model(args)
    images, kept = _read_images(paths, loaded)
    if images is None:
        raise CommandError("none of the images could be read")
    layers = [name.strip() for name in args.layers.split(",") if name.strip()] if args.layers else None
    try:
        erf = effective_receptive_field(loaded.model, images, layers=layers, batch_size=args.batch_size)
    except ValueError as error:
        raise CommandError(str(error)) from None
    for path in save_erf_heatmaps(erf, args.output):
        print(f"wrote {path}")
    print(f"effective receptive fields of {len(kept)} images: {', '.join(erf)}")
    return 0


def _rerun_with_backend(backend, argv):
    """The backend is fixed once keras is imported: run the command again in a
    fresh interpreter with KERAS_BACKEND set."""
    env = dict(os.environ, KERAS_BACKEND=backend)
    args = [sys.executable, "-m", "keras_sequencer.cli", *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, args, env)


def run_export(args):
    from keras_sequencer.tasks.export import ExportError, export

    loaded = load_model(args)
    image_size = args.image_size
    if image_size is None and args.format == "tflite":
        image_size = loaded.image_size  # TFLite needs a static size: the model's own
    try:
        path = export(
            loaded.model,
            args.output,
            format=args.format,
            image_size=image_size,
            batch_size=args.batch_size,
            uint8_input=args.uint8_input,
            quantize=args.quantize,
            overwrite=args.overwrite,
        )
    except (ExportError, FileExistsError) as error:
        raise CommandError(str(error)) from None
    size = _disk_size(path)
    print(f"wrote {path} ({args.format}, {size / 1e6:.1f} MB)")
    return 0


def _disk_size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def run_finetune(args):
    from keras_sequencer.tasks.finetune import finetune

    result = finetune(
        args.data_dir,
        args.output,
        variant=args.variant,
        weights=args.weights,
        epochs=args.epochs,
        batch_size=args.batch_size,
        image_size=args.image_size,
        crop_pct=args.crop_pct,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing,
        drop_path_rate=args.drop_path_rate,
        validation_fraction=args.validation_split,
        augment=args.augment,
        freeze_backbone=args.freeze_backbone,
        mixed_precision=args.mixed_precision,
        resume=args.resume,
        distribute=args.distribute,
        seed=args.seed,
    )
    print(f"saved the run in {args.output}/: best.keras (epoch {result['best_epoch'] + 1}), history.csv, plots")
    print(f"accuracy: {result['accuracy']:.3f}")
    return 0


def run_demo(args):
    from keras_sequencer.tasks.demo import run_demo as demo

    accuracy = demo(args.output, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, verbose=2)
    print(f"saved the model, training log and plots in {args.output}/")
    print(f"accuracy: {accuracy:.3f}")
    return 0


# TensorFlow's C++ start-up lines (absl, oneDNN, CUDA stubs) ignore
# TF_CPP_MIN_LOG_LEVEL since TF 2.19; the command drops them from its stderr.
_NOISE = re.compile(
    rb"^(?:[IWE]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] "
    rb"|WARNING: All log messages before absl::InitializeLog\(\)"
    rb"|To enable the following instructions: .* rebuild TensorFlow)"
)


class _QuietStderr:
    """Forwards file descriptor 2 through a pipe, dropping TensorFlow's C++ log
    lines; everything else (errors, progress bars) passes at once."""

    def __init__(self):
        self.saved = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.thread = threading.Thread(target=self._pump, args=(read,), daemon=True)
        self.thread.start()

    def _pump(self, read):
        pending = b""
        while True:
            chunk = os.read(read, 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            out = b"".join(line + b"\n" for line in lines if not _NOISE.match(line))
            if pending and not pending[:1] in (b"I", b"W", b"T"):
                out, pending = out + pending, b""  # a partial line (a progress bar)
            if out:
                os.write(self.saved, out)
        if pending and not _NOISE.match(pending):
            os.write(self.saved, pending)
        os.close(read)

    def close(self):
        sys.stderr.flush()
        os.dup2(self.saved, 2)  # closes the pipe's write end: the pump drains and stops
        self.thread.join(timeout=5)
        os.close(self.saved)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    quiet = _QuietStderr() if os.environ.get("KERAS_SEQUENCER_TF_LOGS") != "1" else None
    try:
        return _run(args, argv, quiet)
    finally:
        if quiet is not None:
            quiet.close()


def _run(args, argv, quiet):
    from keras_sequencer.data import DataError

    commands = {"predict": run_predict, "evaluate": run_evaluate, "export": run_export,
                "finetune": run_finetune, "erf": run_erf, "demo": run_demo}
    try:
        if args.command == "export":
            import keras

            from keras_sequencer.tasks.export import export_backend

            # A .keras file saved on JAX or torch loads on TensorFlow unchanged.
            backend = export_backend(args.format, keras.backend.backend())
            if keras.backend.backend() != backend:
                if quiet is not None:
                    quiet.close()
                _rerun_with_backend(backend, argv)
        _check_variant(args)
        return commands[args.command](args)
    except (CommandError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # bad weights files, mismatched checkpoints
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
