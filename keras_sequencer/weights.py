"""Where weights come from: the Hugging Face Hub (pinned, hashed, cached) and local files.

`weights="imagenet"` downloads timm's safetensors file once, checks it, converts
it with the shared mapping (`convert.py`) and caches a Keras `.weights.h5` under
`$KERAS_HOME/models/`. Every write goes to a temporary file that is renamed into
place, so a killed process never leaves a file that is later taken for good.
"""

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request

from keras_sequencer.convert import CheckpointMismatchError, load_torch_state_dict, weight_table

DEFAULT_ENDPOINT = "https://huggingface.co"
DOWNLOAD_DEADLINE_S = 10.0  # connection attempts give up after this long in total
MAX_ATTEMPTS = 4
READ_TIMEOUT_S = 30.0

# variant -> (Hugging Face repo, pinned commit, file, sha256 or None)
PRETRAINED = {
    "sequencer2d_s": (
        "timm/sequencer2d_s.in1k",
        "dfd8e6955f97c4fe7b18ed439dcac56f33f6acac",
        "model.safetensors",
        "ef70ff18ff4f615c53009fde2ffe2f00e47376858d6da329fca2017baaffa946",
    ),
    "sequencer2d_m": (
        "timm/sequencer2d_m.in1k",
        "391329ebe646393e88be9499eaa7b79af1c92f11",
        "model.safetensors",
        None,  # not published; the file's structure is checked instead
    ),
    "sequencer2d_l": (
        "timm/sequencer2d_l.in1k",
        "f0f041c30b6ae2c2d991b45e107f3a4a22839b15",
        "model.safetensors",
        "4104172887d330aec2e0ab09705e09962fa2a77a475a7792e36e0d6065f231a2",
    ),
}

TORCH_SUFFIXES = (".pth", ".pt", ".bin")


class WeightsError(ValueError):
    """Weights could not be found, downloaded, verified or read. Raised `from None`:
    the message names the cause, and the chain below it (urllib, h5py, pickle
    frames) is 50 lines a user does not need."""


def cache_dir():
    base = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(base, "models")


def weights_url(variant):
    repo, commit, filename, _ = PRETRAINED[variant]
    endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")
    return f"{endpoint}/{repo}/resolve/{commit}/{filename}"


def cached_weights_path(variant):
    _, commit, _, _ = PRETRAINED[variant]
    return os.path.join(cache_dir(), f"{variant}.in1k.{commit[:12]}.weights.h5")


def _offline():
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _atomic_target(path):
    """A temporary file beside `path` (same filesystem, so the rename is atomic)."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".part"
    )
    os.close(fd)
    return tmp


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def download(url, destination, sha256=None, progress=True):
    """Downloads `url` to `destination` atomically, with a bounded retry budget.

    Raises WeightsError on HTTP errors, unreachable hosts (within about
    DOWNLOAD_DEADLINE_S), truncated bodies and sha256 mismatches; nothing is
    left under `destination` then.
    """
    tmp = _atomic_target(destination)
    try:
        response = _open_with_retries(url)
        digest = hashlib.sha256()
        with response:
            total = response.headers.get("Content-Length")
            total = int(total) if total else None
            received = 0
            bar = _progress_bar(total, os.path.basename(destination), progress)
            try:
                with open(tmp, "wb") as out:
                    while True:
                        try:
                            chunk = response.read(1 << 20)
                        except (OSError, urllib.error.URLError) as error:
                            raise WeightsError(
                                f"The download from {url} was interrupted after "
                                f"{received} bytes ({error}). Try again."
                            ) from None
                        if not chunk:
                            break
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
            finally:
                bar.close()
        if total is not None and received != total:
            raise WeightsError(
                f"The download from {url} is truncated: received {received} of "
                f"{total} bytes. Try again."
            )
        actual = digest.hexdigest()
        if sha256 is not None and actual != sha256:
            raise WeightsError(
                f"sha256 mismatch for {url}: expected {sha256}, got {actual}. "
                "The file was removed; check HF_ENDPOINT or try again."
            )
        os.replace(tmp, destination)
    finally:
        _remove(tmp)
    return destination


def _open_with_retries(url):
    deadline = time.monotonic() + DOWNLOAD_DEADLINE_S
    delay, attempt = 0.5, 0
    while True:
        attempt += 1
        remaining = deadline - time.monotonic()
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "keras-sequencer"})
            return urllib.request.urlopen(request, timeout=max(1.0, min(READ_TIMEOUT_S, remaining)))
        except urllib.error.HTTPError as error:
            if error.code < 500 or attempt >= MAX_ATTEMPTS or time.monotonic() + delay > deadline:
                raise WeightsError(
                    f"Downloading {url} failed: HTTP {error.code} {error.reason}. "
                    + _how_to_work_offline()
                ) from None
        except (urllib.error.URLError, OSError) as error:
            if attempt >= MAX_ATTEMPTS or time.monotonic() + delay > deadline:
                reason = getattr(error, "reason", error)
                raise WeightsError(
                    f"Could not reach {url} after {attempt} attempt(s): {reason}. "
                    + _how_to_work_offline()
                ) from None
        time.sleep(delay)
        delay *= 2


def _how_to_work_offline():
    return (
        "Pass a local file instead (weights='/path/to/model.safetensors', a .pth "
        "or a .weights.h5), or set HF_ENDPOINT to a reachable mirror."
    )


def _progress_bar(total, description, enabled):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description, disable=not enabled
    )


# ---------------------------------------------------------------- reading files


def read_checkpoint(path):
    """A PyTorch-style state dict (name -> array) from .safetensors or .pth/.pt/.bin."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"No such weights file: {path!r}")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.endswith(TORCH_SUFFIXES):
        return _read_torch_pickle(path)
    raise WeightsError(
        f"Unsupported weights file {path!r}. Expected a Keras .weights.h5, a "
        ".safetensors file or a PyTorch .pth/.pt/.bin checkpoint."
    )


def _read_safetensors(path):
    try:
        from safetensors.numpy import load_file
    except ImportError as error:
        raise WeightsError(
            "Reading .safetensors files needs the `safetensors` package: pip install safetensors"
        ) from None
    try:
        return load_file(path)
    except Exception as error:  # SafetensorError and friends
        raise WeightsError(
            f"{path!r} is not a readable safetensors file: it is truncated or corrupt ({error})."
        ) from None


def _read_torch_pickle(path):
    try:
        import torch
    except ImportError as error:
        raise WeightsError(
            f"Reading the PyTorch checkpoint {path!r} needs torch (pip install torch). "
            "Without torch, convert it once where torch is installed: python -m "
            "weights_conversion CHECKPOINT --variant sequencer2d_s --output out.weights.h5, "
            "or use the .safetensors file."
        ) from None
    try:
        # weights_only: never execute code from the pickle.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsError(
            f"{path!r} is not a readable PyTorch checkpoint: it is truncated, corrupt "
            f"or holds objects other than tensors ({type(error).__name__})."
        ) from None


def _load_keras_weights_file(model, path):
    before = model.get_weights()
    try:
        model.load_weights(path)
    except Exception as error:  # h5py/Keras internals are not a user-facing message
        model.set_weights(before)  # Keras may have assigned some layers already
        raise CheckpointMismatchError(_weights_file_mismatch(model, path, error)) from None


def _block_signatures(path):
    """Each Sequencer2D block a Keras .weights.h5 holds, in order, as (width, LSTM
    hidden size, gates, axes, bidirectional, fc input width or 0), or None when
    the file cannot be read that way."""
    import re

    import h5py

    blocks = {}
    try:
        with h5py.File(path, "r") as f:
            def visit(name, obj):
                m = re.match(r"layers/sequencer2d_block(?:_(\d+))?/(.*)$", name)
                if m and hasattr(obj, "shape"):
                    blocks.setdefault(int(m.group(1) or 0), {})[m.group(2)] = tuple(obj.shape)
            f.visititems(visit)
    except (OSError, ValueError):
        return None
    signatures = []
    for index in sorted(blocks):
        shapes = blocks[index]
        recurrent = [k for k in shapes if re.match(r"rnn_tokens/rnn_[vh]/(forward_layer/)?cell/vars/1$", k)]
        if "norm1/vars/0" not in shapes or not recurrent:
            return None
        hidden, gates = shapes[recurrent[0]][0], shapes[recurrent[0]][1] // shapes[recurrent[0]][0]
        bidirectional = any("backward_layer" in k for k in shapes)
        fc = shapes.get("rnn_tokens/fc/vars/0", (0,))[0]
        signatures.append((shapes["norm1/vars/0"][0], hidden, gates, len(recurrent), bidirectional, fc))
    return signatures or None


def _config_signatures(arch):
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[arch["rnn_type"]]
    axes = 2 if arch["union"] in ("cat", "add") else 1
    signatures = []
    for stage, depth in enumerate(arch["layers"]):
        hidden = arch["hidden_sizes"][stage]
        out = hidden * (2 if arch["bidirectional"] else 1)
        fc = (out * 2 if arch["union"] == "cat" else out) if arch["with_fc"] else 0
        signatures += [(arch["embed_dims"][stage], hidden, gates, axes, arch["bidirectional"], fc)] * depth
    return signatures


def _weights_file_mismatch(model, path, error):
    """One short message: what the file holds, and which variant it looks like."""
    from keras_sequencer.models import MODEL_CONFIGS

    found = _block_signatures(path)
    message = f"The weights file {path!r} does not fit model {model.name!r}; nothing was loaded."
    if found is None:
        return message + f" It is corrupt or not a Sequencer2D .weights.h5 ({type(error).__name__})."
    widths = sorted({signature[0] for signature in found})
    message += f" It holds {len(found)} Sequencer2D blocks of widths {', '.join(map(str, widths))}"
    matches = [name for name, config in MODEL_CONFIGS.items() if _config_signatures(config["arch"]) == found]
    if len(matches) == 1:
        return message + f"; it looks like {matches[0]!r}."
    if matches:
        return message + f"; it looks like {' or '.join(repr(m) for m in matches)}."
    return message + "."


def is_keras_weights_file(path):
    return os.fspath(path).endswith(".h5")


def weights_loader(weights, variant=None):
    """Fetches or reads `weights` now ("imagenet", a .weights.h5, .safetensors or
    PyTorch file) and returns a function that fills a model with them, so that
    network errors and bad files surface before a slow model build.

    Filling leaves the model as it was on any error (checkpoint loads validate
    every tensor before assigning any; a failed .weights.h5 load is rolled back).
    """
    if weights == "imagenet":
        source = imagenet_source_model(variant)
        return _assigning_every_variable(lambda model: transfer_weights(source, model))
    path = os.fspath(weights)
    if is_keras_weights_file(path):
        if not os.path.isfile(path):
            raise WeightsError(f"No such weights file: {path!r}")
        return lambda model: _load_keras_weights_file(model, path)
    state_dict = read_checkpoint(path)
    return _assigning_every_variable(
        lambda model: load_torch_state_dict(model, state_dict, source=f"checkpoint {path!r}")
    )


def _assigning_every_variable(fill):
    """Marks a fill that assigns every weight of the model or raises (the weight
    table's loaders): the model may then be built with `initializers_skipped`."""
    fill.assigns_every_variable = True
    return fill


@contextlib.contextmanager
def initializers_skipped():
    """Layers built in this thread start their weights at zero instead of drawing
    them from their initializers, for a model whose every weight is assigned
    next (see `_assigning_every_variable`). Drawing 27M random numbers was ~1 s
    of a torch or TensorFlow cold start, and on JAX each weight shape's
    initializer is an XLA program to compile (4.6 s). Only the values change:
    the layers keep their initializers (and configs); seed-generator states and
    other variables not made from a Keras initializer start as usual."""
    import keras

    Initializer, Layer = keras.initializers.Initializer, keras.layers.Layer
    import numpy as np

    original = Layer.add_weight
    thread = threading.get_ident()

    def zeros(shape, dtype=None):
        try:
            return np.zeros(shape, dtype=dtype or "float32")
        except TypeError:  # a dtype numpy does not know
            import keras

            return keras.ops.zeros(shape, dtype=dtype)

    def add_weight(self, *args, **kwargs):
        if threading.get_ident() == thread:
            if len(args) >= 2:
                initializer, args = args[1], (args[0],) + args[2:]
            else:
                initializer = kwargs.pop("initializer", None)
            if isinstance(initializer, (Initializer, str)):
                initializer = zeros
            kwargs["initializer"] = initializer
        return original(self, *args, **kwargs)

    Layer.add_weight = add_weight
    try:
        yield
    finally:
        Layer.add_weight = original


def _canonical_model(variant):
    """The model layout the cache file holds: full head, preprocessing inside."""
    from keras_sequencer.models import create_model

    return create_model(variant, input_shape=(None, None, 3), classifier_activation=None)


def imagenet_source_model(variant):
    """The ImageNet model of `variant` in the cache's layout, from the cache or
    downloaded, verified, converted and cached on first use."""
    if variant not in PRETRAINED:
        raise WeightsError(
            f"No ImageNet weights for {variant!r}; available: {', '.join(PRETRAINED)}."
        )
    cached = cached_weights_path(variant)
    if os.path.isfile(cached):
        canonical = _canonical_model(variant)
        try:
            canonical.load_weights(cached)
        except Exception as error:
            _remove(cached)  # never keep a cache entry that does not load
            raise WeightsError(
                f"The cached weights {cached!r} could not be read ({type(error).__name__}); "
                "they were removed. Call again to download them anew."
            ) from None
        return canonical
    return fetch_imagenet_weights(variant)


def fetch_imagenet_weights(variant, progress=True):
    """Downloads, verifies, converts and caches the ImageNet weights; returns the
    converted model in the cache's layout (see `_canonical_model`)."""
    _, _, _, sha256 = PRETRAINED[variant]
    cached = cached_weights_path(variant)
    if _offline():
        raise WeightsError(
            f"HF_HUB_OFFLINE is set and the {variant} ImageNet weights are not "
            f"cached at {cached!r}. " + _how_to_work_offline()
        )
    url = weights_url(variant)
    _remove_stale_partial_files(os.path.dirname(cached))
    download_path = _atomic_target(cached + ".safetensors")
    try:
        download(url, download_path, sha256=sha256, progress=progress)
        canonical = _canonical_model(variant)
        try:
            state_dict = _read_safetensors(download_path)
            load_torch_state_dict(canonical, state_dict, source=f"file downloaded from {url}")
        except (WeightsError, CheckpointMismatchError) as error:
            raise WeightsError(f"The file downloaded from {url} is not a valid {variant} checkpoint: {error}") from None
        save_atomically(canonical.save_weights, cached)
    finally:
        _remove(download_path)
    return canonical


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
        _remove(tmp)
        _remove(old)


def _remove_stale_partial_files(directory, max_age_s=24 * 3600):
    """Temporary files of killed downloads; recent ones may belong to a live process."""
    if not os.path.isdir(directory):
        return
    now = time.time()
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.startswith(".") and name.endswith(".part"):
            try:
                if now - os.path.getmtime(path) > max_age_s:
                    os.remove(path)
            except OSError:
                pass


def transfer_weights(source, target):
    """Copies every variable of `target` from `source` (same architecture) through the
    weight table; the head is skipped when `target` has none."""
    source_rows = {keys: variable for variable, keys, _ in weight_table(source)}
    pairs, problems = [], []
    for variable, keys, _ in weight_table(target):
        origin = source_rows.get(keys)
        if origin is None or tuple(origin.shape) != tuple(variable.shape):
            problems.append(f"{keys[0]}: {None if origin is None else tuple(origin.shape)} vs {tuple(variable.shape)}")
        else:
            pairs.append((variable, origin))
    if problems:
        raise CheckpointMismatchError(
            f"The ImageNet weights do not fit {target.name!r}; nothing was loaded. "
            + "; ".join(problems[:6])
        )
    for variable, origin in pairs:
        variable.assign(origin.value)
