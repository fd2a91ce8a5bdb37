"""The `keras-sequencer` command: predict, evaluate, finetune, export and demo."""

import argparse
import json
import os
import sys

VARIANTS = {"s": "sequencer2d_s", "m": "sequencer2d_m", "l": "sequencer2d_l"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class CommandError(Exception):
    """A user error: printed as one line, exit status 2."""


def _variant(value):
    # Checked against the registry in main(): importing it here would import
    # keras before `export` has chosen the backend.
    return VARIANTS.get(value, value)


def _check_variant(args):
    from keras_sequencer.models import MODEL_CONFIGS

    variant = getattr(args, "variant", None)
    if variant is not None and variant not in MODEL_CONFIGS:
        raise CommandError(f"unknown variant {variant!r} (s, m, l or a registry name)")


def build_parser():
    parser = argparse.ArgumentParser(prog="keras-sequencer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_options(p):
        p.add_argument("--variant", type=_variant, default="sequencer2d_s", help="s, m, l or a registry name")
        p.add_argument("--weights", default="imagenet", help="imagenet, none, a weights file, or a .keras model")
        p.add_argument("--image-size", type=int, default=None, help="defaults to the variant's size")

    def image_options(p):
        model_options(p)
        p.add_argument("--crop-pct", type=float, default=0.875)

    predict = sub.add_parser("predict", help="top-k ImageNet classes of images")
    predict.add_argument("images", nargs="+")
    image_options(predict)
    predict.add_argument("--top", type=int, default=5)
    predict.add_argument("--json", action="store_true", help="print JSON instead of text")

    evaluate = sub.add_parser("evaluate", help="top-1/top-5 accuracy over a class-per-folder directory")
    evaluate.add_argument("data_dir")
    image_options(evaluate)
    evaluate.add_argument("--batch-size", type=int, default=32)

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

    finetune = sub.add_parser("finetune", help="fine-tune on a folder with one sub-folder of images per class")
    finetune.add_argument("data_dir")
    finetune.add_argument("--variant", type=_variant, default="sequencer2d_s", help="s, m, l or a registry name")
    finetune.add_argument("--weights", default="imagenet", help="imagenet, none, a weights file or a .keras model")
    finetune.add_argument("--output", default="sequencer_finetune", help="folder for the model, log and plots")
    finetune.add_argument("--epochs", type=int, default=10)
    finetune.add_argument("--batch-size", type=int, default=32)
    finetune.add_argument("--image-size", type=int, default=224)
    finetune.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW, warmup + cosine)")
    finetune.add_argument("--weight-decay", type=float, default=0.05)
    finetune.add_argument("--validation-split", type=float, default=0.2)
    finetune.add_argument("--freeze-backbone", action="store_true", help="train the new head only")
    finetune.add_argument("--mixed-precision", action="store_true", help="float16 on GPU, bfloat16 on CPU")
    finetune.add_argument("--no-augment", action="store_true", help="no flips, zoom or shifts")
    finetune.add_argument("--resume", action="store_true", help="continue the run in --output")
    finetune.add_argument(
        "--distribute", action="store_true",
        help="data parallel: JAX DataParallel or TF MirroredStrategy (MultiWorker with TF_CONFIG)",
    )
    finetune.add_argument("--seed", type=int, default=0)

    demo = sub.add_parser("demo", help="train a compact Sequencer2D on scikit-learn's digits (offline)")
    demo.add_argument("--output", default="sequencer_demo", help="folder for the model, log and plots")
    demo.add_argument("--epochs", type=int, default=15)
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    return parser


def load_model(args):
    import keras

    import keras_sequencer as ks

    if str(args.weights).endswith(".keras"):
        if not os.path.isfile(args.weights):
            raise CommandError(f"no such model file: {args.weights}")
        return keras.models.load_model(args.weights)
    if args.weights not in ("imagenet", "none") and not os.path.isfile(args.weights):
        raise CommandError(f"no such weights file: {args.weights}")
    return ks.create_model(
        args.variant,
        weights=None if args.weights == "none" else args.weights,
        input_shape=(args.image_size, args.image_size, 3),
    )


def _default_image_size(args):
    from keras_sequencer.models import MODEL_CONFIGS

    if getattr(args, "image_size", 0) is None:
        args.image_size = MODEL_CONFIGS[args.variant]["default_size"]


def _load_batch(paths, args):
    import numpy as np

    from keras_sequencer.imagenet import load_image

    images, kept = [], []
    for path in paths:
        try:
            images.append(load_image(path, args.image_size, args.crop_pct))
            kept.append(path)
        except ValueError as error:
            print(f"warning: skipped {error}", file=sys.stderr)
    return (np.stack(images) if images else None), kept


def run_predict(args):
    from keras_sequencer.imagenet import decode_predictions

    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:
        raise CommandError(f"no such image: {', '.join(missing)}")
    model = load_model(args)
    images, kept = _load_batch(args.images, args)
    if images is None:
        raise CommandError("none of the images could be read")
    probs = model.predict(images, verbose=0)
    if probs.shape[-1] == 1000:
        decoded = decode_predictions(probs, top=args.top)
    else:
        order = probs.argsort(axis=-1)[:, ::-1][:, : args.top]
        decoded = [[(str(i), f"class {i}", float(p[i])) for i in row] for row, p in zip(order, probs)]
    results = [
        {"image": path, "predictions": [{"synset": s, "label": n, "probability": p} for s, n, p in top]}
        for path, top in zip(kept, decoded)
    ]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            print(result["image"])
            for rank, item in enumerate(result["predictions"], 1):
                print(f"  {rank}. {item['label']:<30s} {item['probability']:.4f}  ({item['synset']})")
    return 0


def list_labelled_images(data_dir):
    """(path, class index) pairs. ImageNet synset folders get their standard
    index; any other folder layout gets the sorted-folder index."""
    from keras_sequencer.imagenet import imagenet_synsets

    if not os.path.isdir(data_dir):
        raise CommandError(f"no such directory: {data_dir}")
    classes = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d)))
    if not classes:
        raise CommandError(f"{data_dir} has no class sub-folders (one folder per class expected)")
    synset_index = {s: i for i, s in enumerate(imagenet_synsets())}
    use_synsets = all(c in synset_index for c in classes)
    samples = []
    for position, name in enumerate(classes):
        label = synset_index[name] if use_synsets else position
        folder = os.path.join(data_dir, name)
        for file in sorted(os.listdir(folder)):
            if file.lower().endswith(IMAGE_SUFFIXES):
                samples.append((os.path.join(folder, file), label))
    if not samples:
        raise CommandError(f"{data_dir} holds no images")
    return samples


def run_evaluate(args):
    import numpy as np

    from tqdm.auto import tqdm

    samples = list_labelled_images(args.data_dir)
    model = load_model(args)
    top1 = top5 = seen = skipped = 0
    bar = tqdm(total=len(samples), unit="img")
    for start in range(0, len(samples), args.batch_size):
        chunk = samples[start : start + args.batch_size]
        images, kept = _load_batch([p for p, _ in chunk], args)
        skipped += len(chunk) - len(kept)
        if images is not None:
            kept_set = set(kept)
            labels = np.array([label for path, label in chunk if path in kept_set])
            probs = model.predict(images, verbose=0)
            ranked = np.argsort(probs, axis=-1)[:, ::-1]
            top1 += int((ranked[:, 0] == labels).sum())
            top5 += int((ranked[:, :5] == labels[:, None]).any(axis=1).sum())
            seen += len(labels)
        bar.update(len(chunk))
    bar.close()
    if not seen:
        raise CommandError("none of the images could be read")
    print(f"images: {seen}" + (f" (skipped {skipped} unreadable)" if skipped else ""))
    print(f"top-1: {100.0 * top1 / seen:.3f}")
    print(f"top-5: {100.0 * top5 / seen:.3f}")
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
    from keras_sequencer.exporters import ExportError, export

    model = load_model(args)
    try:
        path = export(
            model,
            args.output,
            format=args.format,
            image_size=args.image_size,
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
    from keras_sequencer.finetune import FinetuneError, finetune

    if not 0.0 < args.validation_split < 1.0:
        raise CommandError("--validation-split must be between 0 and 1")
    try:
        result = finetune(
            args.data_dir,
            args.output,
            variant=args.variant,
            weights=None if args.weights == "none" else args.weights,
            epochs=args.epochs,
            batch_size=args.batch_size,
            image_size=args.image_size,
            learning_rate=args.lr,
            weight_decay=args.weight_decay,
            validation_fraction=args.validation_split,
            augment=not args.no_augment,
            freeze_backbone=args.freeze_backbone,
            mixed_precision=args.mixed_precision,
            resume=args.resume,
            distribute=args.distribute,
            seed=args.seed,
        )
    except FinetuneError as error:
        raise CommandError(str(error)) from None
    print(
        f"{result['train_images']} training and {result['validation_images']} validation images, "
        f"{len(result['classes'])} classes" + (f", {result['skipped']} skipped" if result["skipped"] else "")
    )
    print(f"saved the best model, training log and plots in {args.output}/")
    print(f"accuracy: {result['accuracy']:.3f}")
    return 0


def run_demo(args):
    from keras_sequencer.demo import run_demo as demo

    accuracy = demo(args.output, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, verbose=2)
    print(f"saved the model, training log and plots in {args.output}/")
    print(f"accuracy: {accuracy:.3f}")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    commands = {"predict": run_predict, "evaluate": run_evaluate, "export": run_export,
                "finetune": run_finetune, "demo": run_demo}
    try:
        if args.command == "export":
            import keras

            from keras_sequencer.exporters import export_backend

            # A .keras file saved on JAX or torch loads on TensorFlow unchanged.
            backend = export_backend(args.format, keras.backend.backend())
            if keras.backend.backend() != backend:
                _rerun_with_backend(backend, argv)
        _check_variant(args)
        _default_image_size(args)
        return commands[args.command](args)
    except CommandError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # bad weights files, mismatched checkpoints
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
