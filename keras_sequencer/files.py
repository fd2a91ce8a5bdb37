"""Writing files whole: a reader never sees one half-written."""

import os
import shutil
import time


def is_model_file(path):
    """Whether `path` names a whole saved Keras model (`.keras`), as opposed to
    weights (`.weights.h5`, checkpoints)."""
    return os.fspath(path).endswith(".keras")


def remove(path):
    """Removes a file or a folder; a missing one is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def save_atomically(save, path):
    """Calls `save(tmp)` on a temporary name beside `path`, then renames it into
    place: `path` is never seen half-written. The temporary name keeps `path`'s
    ending, which Keras' savers check. `path` may be a file or a directory
    (SavedModel); an existing directory is swapped out, then removed."""
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{time.monotonic_ns()}-{name}")
    old = tmp + ".old"
    try:
        save(tmp)
        if os.path.isdir(path) and not os.path.islink(path):
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        remove(tmp)
        remove(old)
