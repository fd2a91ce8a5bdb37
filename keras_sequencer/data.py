"""Reading images the way a person sees them: files, folders and globs, class
folders, stratified splits and timm's eval transform. One reader serves
`predict`, `evaluate`, `load_image` and the fine-tuning pipeline."""

import os

import numpy as np

# Every suffix the reader accepts (PIL reads them all).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(ValueError):
    """A problem with the data, reported as one line."""


def scan_image_folder(data_dir):
    """(paths, labels, class_names, unreadable): every image PIL can open, labelled
    by its sorted sub-folder; files that are not readable images are counted."""
    from PIL import Image

    if not os.path.isdir(data_dir):
        raise DataError(f"no such directory: {data_dir}")
    class_names = sorted(
        d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d)) and not d.startswith(".")
    )
    if not class_names:
        raise DataError(f"{data_dir} has no class sub-folders (one folder of images per class expected)")
    paths, labels, unreadable = [], [], []
    for label, name in enumerate(class_names):
        folder = os.path.join(data_dir, name)
        for root, _, files in sorted(os.walk(folder)):
            for file in sorted(files):
                if file.startswith("."):
                    continue
                path = os.path.join(root, file)
                if not file.lower().endswith(IMAGE_SUFFIXES):
                    unreadable.append(path)
                    continue
                try:
                    with Image.open(path) as image:
                        image.verify()
                except Exception:  # PIL raises many types for bad files
                    unreadable.append(path)
                    continue
                paths.append(path)
                labels.append(label)
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    if not paths:
        raise DataError(f"{data_dir} holds no readable images ({', '.join(IMAGE_SUFFIXES)})")
    populated = [n for n, c in zip(class_names, counts) if c > 0]
    if len(populated) < 2:
        raise DataError(
            f"{data_dir} has images of {len(populated)} class ({', '.join(populated)}); "
            "a classifier needs at least two class folders with images"
        )
    empty = [n for n, c in zip(class_names, counts) if c == 0]
    if empty:
        raise DataError(f"class folders without readable images: {', '.join(empty)}")
    return paths, np.asarray(labels, dtype=np.int64), class_names, unreadable


def stratified_split(labels, validation_fraction, seed):
    """Boolean mask of the validation samples: the same fraction of each class,
    at least one per class."""
    rng = np.random.default_rng(seed)
    validation = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) < 2:
            raise DataError("every class needs at least two images (one for training, one for validation)")
        count = min(max(1, int(round(validation_fraction * len(members)))), len(members) - 1)
        validation[members[:count]] = True
    return validation
