"""Reading images the way a person sees them: files, folders and globs, class
folders, stratified splits and timm's eval transform. One reader serves
`predict`, `evaluate`, `load_image` and the fine-tuning pipeline."""

import contextlib
import glob
import math
import os
import re
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps

# Every suffix the reader accepts (PIL reads them all).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_CROP_PCT = 0.875
INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


class DataError(ValueError):
    """A problem with the data, reported as one line."""


class ImageReadError(DataError):
    """An image file that cannot be read: `cannot read image <path>: <reason>`."""


def _reason(error):
    """One short line for PIL's many error types."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        pixels = re.search(r"\((\d+) pixels\)", message)
        size = f"{pixels.group(1)} pixels" if pixels else "image"
        limit = Image.MAX_IMAGE_PIXELS
        return f"{size} is over PIL's limit of {limit} (raise PIL.Image.MAX_IMAGE_PIXELS to allow it)"
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image file, or a format PIL cannot read"
    if "truncated" in message.lower():  # PIL words it two ways, one of them "Truncated File Read"
        return "the file is truncated"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[0].lower() + error.strerror[1:]  # without the repeated file name
    return message


@contextlib.contextmanager
def _reading(name):
    """Any failure of PIL on this file as one ImageReadError line."""
    try:
        yield
    except ImageReadError:
        raise
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageReadError(f"cannot read image {name}: {_reason(error)}") from None


_OPEN_LOCK = threading.Lock()


def _open(name):
    """Image.open (header only) with PIL's over-the-pixel-limit warning as an error.
    The warning filter is process-wide: the lock keeps reader threads (PyDataset
    workers) from undoing each other's filter."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(name)


def _to_8bit(image):
    """High bit depth greyscale as mode L, scaled rather than clipped."""
    x = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and x.min() >= 0 and x.max() <= 65535):
        # 65535 -> 255, and 8-bit values stored as 16-bit (v * 257) come back exactly. Mode I
        # within 0..65535 is 16-bit data in a 32-bit container (TIFF, older Pillow's PNGs).
        x = x / 257.0
    elif image.mode == "F" and x.min() >= 0 and x.max() <= 1:
        x = x * 255.0  # floats in [0, 1]: the usual convention
    else:  # negative, over 16 bits, or floats beyond [0, 1]: stretch min..max to 0..255
        low, high = x.min(), x.max()
        x = (x - low) * (255.0 / (high - low) if high > low else 0.0)
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), "L")


def _to_rgb(image):
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:
        # Transparent pixels over white: what a viewer shows on a white page.
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image.convert("RGB")  # P, CMYK, YCbCr, L, 1, ...; a copy even when already RGB


def _upright(image):
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # broken EXIF: show the pixels as stored, as viewers do
        return image.copy()


def read_image(path_or_image):
    """An image as a person sees it, as a PIL image in mode RGB.

    Takes a path or an open PIL image (the first frame of animations). Applies
    the EXIF orientation; scales 16-bit and 32-bit greyscale to 8 bits instead of
    clipping them (I;16: /257; I: /257 when its values fit 16 bits, else min..max
    stretched; F: x255 when in [0, 1], else min..max stretched); composites
    transparency over white. Files PIL cannot open or decode, and images over
    PIL's pixel limit (`PIL.Image.MAX_IMAGE_PIXELS`), raise ImageReadError.
    """
    if isinstance(path_or_image, Image.Image):
        name = getattr(path_or_image, "filename", "") or "<PIL image>"
        with _reading(name):
            return _to_rgb(_upright(path_or_image))
    name = os.fspath(path_or_image)
    with _reading(name), _open(name) as image:
        image.load()
        return _to_rgb(_upright(image))  # new images: closing the file leaves them intact


def load_image(path_or_image, image_size=224, crop_pct=DEFAULT_CROP_PCT, interpolation="bicubic"):
    """timm's eval transform up to normalisation: resize the short side to
    floor(image_size / crop_pct), then a centre crop. `image_size` is an int or
    (height, width). Returns float32 RGB values in [0, 255], shape (h, w, 3)."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, not {interpolation!r}")
    size_h, size_w = (int(image_size),) * 2 if np.ndim(image_size) == 0 else map(int, image_size)
    image = read_image(path_or_image)
    scale_h, scale_w = math.floor(size_h / crop_pct), math.floor(size_w / crop_pct)
    width, height = image.size
    if scale_h == scale_w:
        # torchvision's Resize(int): short side -> scale, long side truncated.
        if width <= height:
            new_w, new_h = scale_w, int(scale_w * height / width)
        else:
            new_w, new_h = int(scale_h * width / height), scale_h
    else:
        # timm's ResizeKeepRatio: the side closest to its target fits it, sizes rounded.
        ratio = min(height / scale_h, width / scale_w)
        new_w, new_h = round(width / ratio), round(height / ratio)
    image = image.resize((new_w, new_h), INTERPOLATIONS[interpolation])
    top = int(round((new_h - size_h) / 2.0))
    left = int(round((new_w - size_w) / 2.0))
    image = image.crop((left, top, left + size_w, top + size_h))
    return np.asarray(image, dtype="float32")


def _files_under(folder):
    """Files under folder, recursively, sorted by folder then name; hidden files
    and folders skipped."""
    walked = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        walked.append((root, sorted(f for f in files if not f.startswith("."))))
    return [os.path.join(root, f) for root, files in sorted(walked) for f in files]


def _is_image_name(path):
    return path.lower().endswith(IMAGE_SUFFIXES)


def find_images(inputs):
    """Image paths from files, folders (recursive, by IMAGE_SUFFIXES) and glob
    patterns, in the given order, duplicates removed. A file named explicitly is
    kept whatever its suffix; an input that names no image raises DataError."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found = []
    for item in map(os.fspath, inputs):
        if os.path.isfile(item):
            found.append(item)
        elif os.path.isdir(item):
            images = [p for p in _files_under(item) if _is_image_name(p)]
            if not images:
                raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {item}")
            found += images
        elif glob.has_magic(item):
            images = []
            for match in sorted(glob.glob(item, recursive=True)):
                if os.path.isdir(match):
                    images += [p for p in _files_under(match) if _is_image_name(p)]
                elif _is_image_name(match):
                    images.append(match)
            if not images:
                raise DataError(f"no images match {item}")
            found += images
        else:
            raise DataError(f"no such file or folder: {item}")
    unique = {}
    for path in found:
        unique.setdefault(os.path.abspath(path), path)
    return list(unique.values())


def _opens(path):
    """Header open and verify, without decoding: False for what read_image would
    refuse up front (unknown format, broken header, over the pixel limit)."""
    try:
        with _reading(path), _open(path) as image:
            image.verify()
    except ImageReadError:
        return False
    return True


def class_folders(data_dir):
    """The class sub-folders of `data_dir` (one per class), sorted, hidden ones skipped."""
    if not os.path.isdir(data_dir):
        raise DataError(f"no such directory: {data_dir}")
    folders = sorted(
        d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d)) and not d.startswith(".")
    )
    if not folders:
        raise DataError(f"{data_dir} has no class sub-folders (one folder of images per class expected)")
    return folders


def scan_image_folder(data_dir):
    """(paths, labels, class_names, unreadable): every image PIL can open, labelled
    by its sorted sub-folder; files that are not readable images are counted.
    Images are checked by header (open + verify), not decoded."""
    class_names = class_folders(data_dir)
    paths, labels, unreadable = [], [], []
    for label, name in enumerate(class_names):
        for path in _files_under(os.path.join(data_dir, name)):
            if _is_image_name(path) and _opens(path):
                paths.append(path)
                labels.append(label)
            else:
                unreadable.append(path)
    counts = class_counts(labels, class_names)
    if not paths:
        raise DataError(f"{data_dir} holds no readable images ({', '.join(IMAGE_SUFFIXES)})")
    populated = [n for n, c in counts.items() if c > 0]
    if len(populated) < 2:
        raise DataError(
            f"{data_dir} has images of {len(populated)} class ({', '.join(populated)}); "
            "a classifier needs at least two class folders with images"
        )
    empty = [n for n, c in counts.items() if c == 0]
    if empty:
        raise DataError(f"class folders without readable images: {', '.join(empty)}")
    return paths, np.asarray(labels, dtype=np.int64), class_names, unreadable


def class_counts(labels, class_names):
    """{class name: number of samples}, in class order (zeros included)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    return {name: int(count) for name, count in zip(class_names, counts)}


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
