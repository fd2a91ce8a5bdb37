"""Reading weights files: safetensors and PyTorch checkpoints (state dicts for
the converter), and Keras `.weights.h5` files (Keras' own layout); their errors."""

import os
import re

from keras_sequencer import registry
from keras_sequencer.weights.convert import CheckpointMismatchError

TORCH_SUFFIXES = (".pth", ".pt", ".bin")


class WeightsError(ValueError):
    """Weights could not be found, downloaded, verified or read. Raised `from None`:
    the message names the cause, and the chain below it (network, h5py, pickle
    frames) is 50 lines a user does not need."""


def is_keras_weights_file(path):
    return os.fspath(path).endswith(".h5")


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
    except ImportError:
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
    except ImportError:
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


def load_keras_weights(model, path):
    """Loads a Keras `.weights.h5` into `model` with Keras' loader, which keeps
    the head rule of checkpoints: a model without a top takes a file with one
    (the head is not read); a model with a top needs the file's head, with the
    same classes. On any mismatch one short line says why, naming the variant
    the file looks like; the file's blocks and head are compared with the
    model's before anything is assigned."""
    import warnings

    found, mine = _block_signatures(path), _signatures_of(model)
    head = next((layer for layer in model.layers if layer.name == registry.HEAD), None)
    if found is not None and mine and (
        found[: len(mine)] != mine
        or (head is not None and (len(found) != len(mine) or (_head_shape(path) or (None,))[-1] != head.units))
    ):
        raise CheckpointMismatchError(_weights_file_mismatch(model, path, None))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras' note that the file holds more (the head)
            model.load_weights(path)
    except Exception as error:  # h5py/Keras internals are not a user-facing message
        raise CheckpointMismatchError(_weights_file_mismatch(model, path, error)) from None


def _block_signatures(path):
    """Each Sequencer2D block a Keras .weights.h5 holds, in order, as (width, LSTM
    hidden size, gates, axes, bidirectional, fc input width or 0), or None when
    the file cannot be read that way."""
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


def _head_shape(path):
    """The (input, classes) kernel shape of a .weights.h5's head, or None."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            shapes = []
            f.visititems(lambda name, obj: shapes.append(obj.shape) if re.match(r"layers/dense(_\d+)?/vars/0$", name) else None)
    except (OSError, ValueError):
        return None
    return tuple(shapes[-1]) if shapes else None


def _weights_file_mismatch(model, path, error):
    """One short message: what the file holds, and which variant it looks like."""
    found = _block_signatures(path)
    message = f"The weights file {path!r} does not fit model {model.name!r}; nothing was loaded."
    if found is None:
        return message + f" It is corrupt or not a Sequencer2D .weights.h5 ({type(error).__name__})."
    matches = [
        name
        for name, config in registry.MODEL_CONFIGS.items()
        if config["family"] == "sequencer2d" and _config_signatures(config["arch"]) == found
    ]
    head = next((layer for layer in model.layers if layer.name == registry.HEAD), None)
    if head is not None and _signatures_of(model) == found:
        classes = _head_shape(path)
        if classes is None:
            return message + (
                " The file has no classification head (it was saved from an include_top=False "
                "model): build with include_top=False, or load it into such a model."
            )
        return message + (
            f" Its head has {classes[-1]} classes and the model's {head.units}: build with "
            f"classes={classes[-1]}, or with include_top=False for any other number."
        )
    widths = sorted({signature[0] for signature in found})
    message += f" It holds {len(found)} Sequencer2D blocks of widths {', '.join(map(str, widths))}"
    if len(matches) == 1:
        return message + f"; it looks like {matches[0]!r}."
    if matches:
        return message + f"; it looks like {' or '.join(repr(m) for m in matches)}."
    return message + "."


def _signatures_of(model):
    """The block signatures of a built model, as `_block_signatures` reads a file's."""
    signatures = []
    for layer in model.layers:
        bilstm = getattr(layer, "rnn_tokens", None)
        if bilstm is None or not hasattr(bilstm, "rnn_type"):
            continue
        gates = {"lstm": 4, "gru": 3, "rnn": 1}[bilstm.rnn_type]
        axes = 2 if bilstm.union in ("cat", "add") else 1
        fc = bilstm.fc.kernel.shape[0] if bilstm.fc is not None else 0
        signatures.append((layer.norm1.gamma.shape[0], bilstm.hidden_size, gates, axes, bilstm.bidirectional, fc))
    return signatures
