"""The `keras-sequencer` command: predict, evaluate and demo."""

import argparse
import json
import os
import sys

VARIANTS = {"s": "sequencer2d_s", "m": "sequencer2d_m", "l": "sequencer2d_l"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class CommandError(Exception):
    """A user error: printed as one line, exit status 2."""


def _variant(value):
    name = VARIANTS.get(value, value)
    from keras_sequencer.models import MODEL_CONFIGS

    if name not in MODEL_CONFIGS:
        raise argparse.ArgumentTypeError(f"unknown variant {value!r} (s, m, l or a registry name)")
    return name


def build_parser():
    parser = argparse.ArgumentParser(prog="keras-sequencer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_options(p):
        p.add_argument("--variant", type=_variant, default="sequencer2d_s", help="s, m, l or a registry name")
        p.add_argument("--weights", default="imagenet", help="imagenet, a weights file, or a .keras model")
        p.add_argument("--image-size", type=int, default=224)
        p.add_argument("--crop-pct", type=float, default=0.875)

    predict = sub.add_parser("predict", help="top-k ImageNet classes of images")
    predict.add_argument("images", nargs="+")
    model_options(predict)
    predict.add_argument("--top", type=int, default=5)
    predict.add_argument("--json", action="store_true", help="print JSON instead of text")

    evaluate = sub.add_parser("evaluate", help="top-1/top-5 accuracy over a class-per-folder directory")
    evaluate.add_argument("data_dir")
    model_options(evaluate)
    evaluate.add_argument("--batch-size", type=int, default=32)

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
    if args.weights not in ("imagenet",) and not os.path.isfile(args.weights):
        raise CommandError(f"no such weights file: {args.weights}")
    return ks.create_model(
        args.variant,
        weights=args.weights,
        input_shape=(args.image_size, args.image_size, 3),
    )


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


def run_demo(args):
    from keras_sequencer.demo import run_demo as demo

    accuracy = demo(args.output, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, verbose=2)
    print(f"saved the model, training log and plots in {args.output}/")
    print(f"accuracy: {accuracy:.3f}")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    commands = {"predict": run_predict, "evaluate": run_evaluate, "demo": run_demo}
    try:
        return commands[args.command](args)
    except CommandError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # bad weights files, mismatched checkpoints
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
