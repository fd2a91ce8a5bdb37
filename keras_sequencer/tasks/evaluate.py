"""Accuracy over a folder with one sub-folder per class, at one input size or
several (the paper's resolution-adaptability figure)."""

import csv
import os

import numpy as np

from keras_sequencer.data import DataError, class_folders, find_images, load_image
from keras_sequencer.imagenet import imagenet_synsets, preprocess_input
from keras_sequencer.models import fast_predict, minimum_model_input_size, model_metadata


def labelled_images(data_dir, class_names=None, num_classes=1000, source="the model"):
    """(path, class index) pairs. The folders are matched to `class_names` (the
    model's) when given; ImageNet synset folders get their standard index;
    otherwise the sorted folders are the classes."""
    folders = class_folders(data_dir)
    if class_names is not None:
        index = {name: i for i, name in enumerate(class_names)}
        unknown = [f for f in folders if f not in index]
        if unknown:
            more = "..." if len(class_names) > 10 else ""
            raise DataError(
                f"folders of {data_dir} that {source} has no class for: {', '.join(unknown[:5])}"
                f" (its classes: {', '.join(class_names[:10])}{more})"
            )
    elif num_classes == 1000 and set(folders) <= set(imagenet_synsets()):
        index = {s: i for i, s in enumerate(imagenet_synsets())}
    else:
        if len(folders) > num_classes:
            raise DataError(f"{data_dir} has {len(folders)} class folders; {source} knows {num_classes} classes")
        index = {name: i for i, name in enumerate(folders)}
    samples = []
    for name in folders:
        try:
            paths = find_images([os.path.join(data_dir, name)])
        except DataError:
            continue  # an empty class folder
        samples.extend((path, index[name]) for path in paths)
    if not samples:
        raise DataError(f"{data_dir} holds no images")
    return samples


def model_outputs(model, images):
    """The model's outputs for RGB [0, 255] `images`, normalised first where the
    model was built without its preprocessing layer."""
    if not model_metadata(model)["include_preprocessing"]:
        images = preprocess_input(images, normalize=True)
    return fast_predict(model, images)


class TimmClassifier:
    """A timm model evaluated like ours, for the resolution figure's comparison:
    the same eval transform (short side to size / crop_pct, centre crop, at
    the timm model's own crop_pct), its own mean and std. `model` is a timm
    model name (pretrained weights from the Hugging Face cache, as timm loads
    them) or a timm `torch.nn.Module`."""

    def __init__(self, model):
        import torch

        if isinstance(model, str):
            import timm

            name = model
            try:
                try:  # ViT-style models take any size only when asked
                    model = timm.create_model(name, pretrained=True, dynamic_img_size=True)
                except TypeError:
                    model = timm.create_model(name, pretrained=True)
            except Exception as error:  # unknown name, no network and not cached, ...
                first = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise DataError(f"timm could not load {name!r}: {first[:200]}") from None
        self.label = f"timm {getattr(model, 'default_cfg', {}).get('architecture') or type(model).__name__}"
        self.net = model.eval()
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean = np.asarray(cfg.get("mean", (0.485, 0.456, 0.406)), "float32")
        self.std = np.asarray(cfg.get("std", (0.229, 0.224, 0.225)), "float32")
        self.crop_pct = float(cfg.get("crop_pct", 0.875))
        self.interpolation = cfg.get("interpolation", "bicubic")
        self.num_classes = int(getattr(model, "num_classes", 1000))
        self._torch = torch

    def __call__(self, images):
        x = (images / 255.0 - self.mean) / self.std
        with self._torch.no_grad():
            tensor = self._torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2), "float32"))
            return self.net(tensor).numpy()


def evaluate(model, data_dir, image_size=None, crop_pct=None, batch_size=32, class_names=None, progress=True,
             source="the model"):
    """Top-1 and top-5 accuracy (percent) of `model` over `data_dir`, with timm's
    eval transform at `image_size` (default: the model's). `model` is a Keras
    model or a `TimmClassifier`. Returns a dict with `top1`, `top5`, `images`
    and `skipped` (unreadable files)."""
    from tqdm.auto import tqdm

    if isinstance(model, TimmClassifier):
        predict, num_classes, interpolation = model, model.num_classes, model.interpolation
        image_size = 224 if image_size is None else image_size
        crop_pct = model.crop_pct if crop_pct is None else crop_pct
    else:
        info = model_metadata(model)
        predict, num_classes = (lambda images: model_outputs(model, images)), model.output_shape[-1]
        interpolation = info["interpolation"]
        image_size = info["image_size"] if image_size is None else image_size
        crop_pct = info["crop_pct"] if crop_pct is None else crop_pct
        class_names = info["class_names"] if class_names is None else class_names
    samples = labelled_images(data_dir, class_names, num_classes, source)
    top1 = top5 = seen = skipped = 0
    bar = tqdm(total=len(samples), unit="img", disable=not progress)
    for start in range(0, len(samples), batch_size):
        images, labels = [], []
        for path, label in samples[start : start + batch_size]:
            try:
                images.append(load_image(path, image_size, crop_pct, interpolation))
                labels.append(label)
            except DataError:
                skipped += 1
        if images:
            ranked = np.argsort(predict(np.stack(images)), axis=-1)[:, ::-1]
            labels = np.asarray(labels)
            top1 += int((ranked[:, 0] == labels).sum())
            top5 += int((ranked[:, :5] == labels[:, None]).any(axis=1).sum())
            seen += len(labels)
        bar.update(min(batch_size, len(samples) - start))
    bar.close()
    if not seen:
        raise DataError("none of the images could be read")
    return {"top1": 100.0 * top1 / seen, "top5": 100.0 * top5 / seen, "images": seen, "skipped": skipped}


def resolution_sweep(model, data_dir, image_sizes, output_dir=None, reference_size=None, compare_timm=(),
                     label=None, **options):
    """`evaluate` at each of `image_sizes` (the same eval transform scaled to each
    size), as in the paper's resolution-adaptability figure. Returns rows
    `{"model", "image_size", "top1", "top5", "images", "relative_top1"}`, where
    relative_top1 is top-1 over the top-1 at `reference_size` (default: the
    size the model was trained at, else the first size). `compare_timm` adds
    the same rows for timm models (names, or timm modules) on the same data,
    as the paper compares Sequencer with other architectures. `label` names
    the model's rows and curve (default: the model's name). With
    `output_dir`, writes `resolution.csv`, `resolution.md` and `resolution.png`."""
    info = model_metadata(model)
    if not info["dynamic_size"]:
        size = info["image_size"]
        raise DataError(
            f"the model takes only {size[0]}x{size[1]} images; build it with input_shape=(None, None, 3) "
            "to evaluate other sizes"
        )
    minimum = minimum_model_input_size(model)
    small = [s for s in image_sizes if s < minimum]
    if small:
        raise DataError(f"image sizes below the model's minimum of {minimum}: {', '.join(map(str, small))}")
    if reference_size is None:
        trained = info["image_size"][0]
        reference_size = trained if trained in image_sizes else image_sizes[0]
    if reference_size not in image_sizes:
        raise DataError(f"the reference size {reference_size} is not among the sizes evaluated")
    others = [TimmClassifier(other) if not isinstance(other, TimmClassifier) else other for other in compare_timm]
    rows = _sweep(model, label or model.name, data_dir, image_sizes, reference_size, options)
    for other in others:
        timm_options = dict(options, crop_pct=None, class_names=None, source=other.label)
        rows += _sweep(other, other.label, data_dir, image_sizes, reference_size, timm_options)
    if output_dir is not None:
        write_sweep(rows, output_dir, reference_size)
    return rows


def _sweep(model, label, data_dir, image_sizes, reference_size, options):
    rows = [{"model": label, "image_size": size, **evaluate(model, data_dir, image_size=size, **options)}
            for size in image_sizes]
    reference = next(r["top1"] for r in rows if r["image_size"] == reference_size)
    for row in rows:
        row["relative_top1"] = row["top1"] / reference if reference else float("nan")
    return rows


def write_sweep(rows, output_dir, reference_size):
    from keras_sequencer.plots import plot_resolution

    os.makedirs(output_dir, exist_ok=True)
    keys = ["model", "image_size", "top1", "top5", "relative_top1", "images", "skipped"]
    with open(os.path.join(output_dir, "resolution.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(output_dir, "resolution.md"), "w") as f:
        f.write(f"| model | image size | top-1 | top-5 | top-1 relative to {reference_size} |\n|---|---|---|---|---|\n")
        for row in rows:
            f.write(f"| {row['model']} | {row['image_size']} | {row['top1']:.3f} | {row['top5']:.3f} "
                    f"| {row['relative_top1']:.4f} |\n")
    plot_resolution(rows, reference_size, os.path.join(output_dir, "resolution.png"))
