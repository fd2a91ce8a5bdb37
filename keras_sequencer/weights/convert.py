"""PyTorch (timm / authors') Sequencer checkpoints -> Keras variables.

The whole mapping is `weight_table`: one row per Keras variable, naming the
checkpoint keys it comes from and the transform applied. Both the model loader
and the `weights_conversion` command use it. Sequencer2D checkpoints come in
timm's or the authors' key layout, vanilla Sequencer ones in the authors'; both
are read in timm's layout (`normalize_state_dict`).
"""

import re
from collections.abc import Mapping

import numpy as np

from keras_sequencer import registry

_BLOCK_NAME = re.compile(registry.BLOCK_NAME_PATTERN)
_DOWNSAMPLE_NAME = re.compile(registry.DOWNSAMPLE_NAME_PATTERN)


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model; nothing was loaded."""


# Transforms: PyTorch layout -> Keras layout.
def _same(w):
    return w


def _conv(w):  # (O, I, kh, kw) -> (kh, kw, I, O)
    return np.transpose(w, (2, 3, 1, 0))


def _linear(w):  # (O, I) -> (I, O)
    return np.transpose(w)


def _sum(a, b):  # PyTorch keeps bias_ih and bias_hh; Keras one bias
    return a + b


def _gru_gates(w):  # PyTorch gate order (r, z, n) -> Keras (z, r, h)
    r, z, n = np.split(w, 3, axis=0)
    return np.concatenate([z, r, n], axis=0)


def _gru_kernel(w):
    return np.transpose(_gru_gates(w))


def _gru_bias(b_ih, b_hh):  # Keras reset_after=True: (2, 3H) = [input, recurrent]
    return np.stack([_gru_gates(b_ih), _gru_gates(b_hh)])


def to_numpy(value):
    """numpy array from a numpy array, torch tensor (any dtype) or array-like."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if value.dtype.is_floating_point and value.element_size() < 4:
            value = value.float()  # numpy has no bfloat16
        return value.numpy()
    return np.asarray(value)


def authors_key_to_timm(key):
    """Authors' key names (`blocks.{s}.{b}`, `head.weight`) -> timm's."""
    key = re.sub(
        r"^blocks\.(\d+)\.\d+\.down\.",
        lambda m: f"stages.{int(m.group(1)) + 1}.downsample.down.",
        key,
    )
    key = re.sub(r"^blocks\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", key)
    key = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", key)
    return key


def normalize_state_dict(state_dict):
    """Unwraps `{"model": ...}` / `{"state_dict": ...}`, strips `module.`,
    maps the authors' layout to timm's and converts values to numpy."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            "Expected a mapping of parameter names to arrays, got "
            f"{type(state_dict).__name__}."
        )
    for wrapper in ("model", "state_dict", "model_state_dict"):
        inner = state_dict.get(wrapper)
        if isinstance(inner, Mapping):
            state_dict = inner
            break
    normalized = {}
    for key, value in state_dict.items():
        key = str(key)
        if key.startswith("module."):
            key = key[len("module.") :]
        normalized[authors_key_to_timm(key)] = value
    bad = [k for k, v in normalized.items() if not _is_array(v)]
    if bad:
        raise CheckpointMismatchError(
            "The checkpoint holds entries that are not tensors: " + ", ".join(bad[:10])
        )
    return {k: to_numpy(v) for k, v in normalized.items()}


def _is_array(value):
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _recurrent_rows(layer, prefix, suffix, rnn_type):
    cell = layer.cell
    ih, hh = f"{prefix}.weight_ih_l0{suffix}", f"{prefix}.weight_hh_l0{suffix}"
    b_ih, b_hh = f"{prefix}.bias_ih_l0{suffix}", f"{prefix}.bias_hh_l0{suffix}"
    if rnn_type == "gru":
        return [
            (cell.kernel, (ih,), _gru_kernel),
            (cell.recurrent_kernel, (hh,), _gru_kernel),
            (cell.bias, (b_ih, b_hh), _gru_bias),
        ]
    # LSTM shares PyTorch's gate order (i, f, g, o); SimpleRNN has no gates.
    return [
        (cell.kernel, (ih,), _linear),
        (cell.recurrent_kernel, (hh,), _linear),
        (cell.bias, (b_ih, b_hh), _sum),
    ]


def _dense_rows(layer, prefix):
    return [(layer.kernel, (f"{prefix}.weight",), _linear), (layer.bias, (f"{prefix}.bias",), _same)]


def _norm_rows(layer, prefix):
    return [(layer.gamma, (f"{prefix}.weight",), _same), (layer.beta, (f"{prefix}.bias",), _same)]


def _conv_rows(layer, prefix):
    return [(layer.kernel, (f"{prefix}.weight",), _conv), (layer.bias, (f"{prefix}.bias",), _same)]


def _block_rows(block, prefix):
    if hasattr(block.rnn_tokens, "forward_layer"):  # one Bidirectional: the vanilla block
        return _vanilla_block_rows(block, prefix)
    rows = _norm_rows(block.norm1, f"{prefix}.norm1")
    bilstm = block.rnn_tokens
    for axis in ("v", "h"):
        rnn = getattr(bilstm, f"rnn_{axis}")
        if rnn is None:
            continue
        rnn_prefix = f"{prefix}.rnn_tokens.rnn_{axis}"
        if bilstm.bidirectional:
            rows += _recurrent_rows(rnn.forward_layer, rnn_prefix, "", bilstm.rnn_type)
            rows += _recurrent_rows(rnn.backward_layer, rnn_prefix, "_reverse", bilstm.rnn_type)
        else:
            rows += _recurrent_rows(rnn, rnn_prefix, "", bilstm.rnn_type)
    if bilstm.fc is not None:
        rows += _dense_rows(bilstm.fc, f"{prefix}.rnn_tokens.fc")
    rows += _norm_rows(block.norm2, f"{prefix}.norm2")
    rows += _dense_rows(block.fc1, f"{prefix}.mlp_channels.fc1")
    rows += _dense_rows(block.fc2, f"{prefix}.mlp_channels.fc2")
    return rows


def _vanilla_block_rows(block, prefix):
    """The vanilla Sequencer's block: one BiLSTM (`rnn_tokens.rnn`) over the
    token sequence, no fc."""
    rnn = block.rnn_tokens
    rnn_prefix = f"{prefix}.rnn_tokens.rnn"
    return (
        _norm_rows(block.norm1, f"{prefix}.norm1")
        + _recurrent_rows(rnn.forward_layer, rnn_prefix, "", "lstm")
        + _recurrent_rows(rnn.backward_layer, rnn_prefix, "_reverse", "lstm")
        + _norm_rows(block.norm2, f"{prefix}.norm2")
        + _dense_rows(block.fc1, f"{prefix}.mlp_channels.fc1")
        + _dense_rows(block.fc2, f"{prefix}.mlp_channels.fc2")
    )


def weight_table(model):
    """[(keras_variable, checkpoint_keys, transform)] for every model weight."""
    rows = []
    for layer in model.layers:
        name = layer.name
        if name == registry.STEM:
            rows += _conv_rows(layer, "stem.proj")
        elif name == registry.POSITION_EMBEDDING:
            rows.append((layer.embedding, ("absolute_pos_embed",), _same))
        elif _DOWNSAMPLE_NAME.match(name):
            stage = _DOWNSAMPLE_NAME.match(name).group(1)
            rows += _conv_rows(layer, f"stages.{stage}.downsample.down")
        elif _BLOCK_NAME.match(name):
            stage, block = _BLOCK_NAME.match(name).groups()
            rows += _block_rows(layer, f"stages.{stage}.blocks.{block}")
        elif name == registry.NORM:
            rows += _norm_rows(layer, "norm")
        elif name == registry.HEAD:
            rows += _dense_rows(layer, "head.fc")
    return rows


def _summarize(label, items, limit=12):
    items = sorted(items)
    shown = ", ".join(items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"  {label} ({len(items)}): {shown}{more}"


# Which kind of Sequencer a set of (timm-layout) keys belongs to, by its recurrent keys.
_FAMILY_KEYS = {
    "sequencer2d": re.compile(r"\.rnn_tokens\.rnn_[vh]\."),
    "vanilla": re.compile(r"\.rnn_tokens\.rnn\."),
}
_FAMILY_NAMES = {
    "sequencer2d": "Sequencer2D (BiLSTM2D blocks)",
    "vanilla": "vanilla Sequencer (one BiLSTM over the token sequence)",
}


def checkpoint_family(keys):
    """"sequencer2d", "vanilla" or None (neither, or both) for a set of timm-layout keys."""
    found = {family for family, pattern in _FAMILY_KEYS.items() if any(pattern.search(k) for k in keys)}
    return found.pop() if len(found) == 1 else None


def load_torch_state_dict(model, state_dict, source="state dict"):
    """Fills every variable of a Sequencer Keras model (Sequencer2D or vanilla)
    from a PyTorch state dict.

    Accepts timm's or the authors' key layout, optionally wrapped in
    `{"model": ...}` / `{"state_dict": ...}` and with `module.` prefixes; values
    may be numpy arrays or torch tensors. The head is skipped when the model has
    none. Either every variable is assigned or a `CheckpointMismatchError` lists
    the missing keys, unexpected keys and shape mismatches and nothing changes.
    """
    weights = normalize_state_dict(state_dict)
    rows = weight_table(model)
    if not rows:
        raise ValueError(f"{model.name!r} has no Sequencer layers to load into.")
    expected = {key for _, keys, _ in rows for key in keys}
    theirs, ours = checkpoint_family(weights), checkpoint_family(expected)
    if theirs and ours and theirs != ours:
        # A whole-model mismatch: listing every key would bury the reason.
        raise CheckpointMismatchError(
            f"The {source} holds a {_FAMILY_NAMES[theirs]} and model {model.name!r} is a "
            f"{_FAMILY_NAMES[ours]}; nothing was loaded."
        )
    has_head = any(layer.name == "head" for layer in model.layers)
    ignored = set() if has_head else {k for k in weights if k.startswith("head.")}
    feature_info = (getattr(model, "metadata", None) or {}).get("feature_info")
    if feature_info:
        # A features_only model ends at its last returned stage: no norm, no head.
        last = max(info["index"] for info in feature_info)
        ignored |= {
            k for k in weights
            if k.startswith(("norm.", "head."))
            or (re.match(r"stages\.(\d+)\.", k) and int(re.match(r"stages\.(\d+)\.", k).group(1)) > last)
        }

    missing = expected - set(weights)
    unexpected = set(weights) - expected - ignored
    mismatched, values = [], []
    for variable, keys, transform in rows:
        if any(key in missing for key in keys):
            continue
        sources = [weights[key] for key in keys]
        target = tuple(variable.shape)
        try:
            value = transform(*sources)
        except ValueError:
            value = None
        if value is None or tuple(value.shape) != target:
            mismatched.append(
                f"{keys[0]} {tuple(sources[0].shape)} does not fit "
                f"{variable.path} {target}"
            )
            continue
        values.append((variable, value))

    if missing or unexpected or mismatched:
        lines = [f"The {source} does not fit model {model.name!r}; nothing was loaded."]
        guess = guess_variant(weights)
        if guess:
            lines.append(f"  The checkpoint looks like {guess!r}.")
        if missing:
            lines.append(_summarize("missing keys", missing))
        if unexpected:
            lines.append(_summarize("unexpected keys", unexpected))
        if mismatched:
            lines.append(_summarize("shape mismatches", mismatched, limit=6))
        raise CheckpointMismatchError("\n".join(lines))

    for variable, value in values:
        variable.assign(value.astype(variable.dtype))
    return model


def infer_architecture(weights):
    """Reads the architecture lists from a normalized (timm-layout) state dict:
    the registry's `arch` keys of the checkpoint's family, or None."""
    if checkpoint_family(weights) == "vanilla":
        return _infer_vanilla_architecture(weights)
    blocks = _blocks_per_stage(weights)
    if blocks is None:
        return None
    stages = range(len(blocks))
    try:
        embed_dims = tuple(weights[f"stages.{s}.blocks.0.norm1.weight"].shape[0] for s in stages)
        rnn_prefix = None
        for axis in ("v", "h"):
            if "stages.0.blocks.0.rnn_tokens.rnn_%s.weight_hh_l0" % axis in weights:
                rnn_prefix = f"rnn_tokens.rnn_{axis}"
                break
        hidden_sizes = tuple(
            weights[f"stages.{s}.blocks.0.{rnn_prefix}.weight_hh_l0"].shape[1] for s in stages
        )
        gates = weights[f"stages.0.blocks.0.{rnn_prefix}.weight_hh_l0"].shape[0] // hidden_sizes[0]
        mlp_ratios = tuple(
            weights[f"stages.{s}.blocks.0.mlp_channels.fc1.weight"].shape[0] / embed_dims[s]
            for s in stages
        )
        patch_sizes = (weights["stem.proj.weight"].shape[-1],) + tuple(
            weights[f"stages.{s}.downsample.down.weight"].shape[-1] for s in stages if s > 0
        )
    except (KeyError, TypeError, IndexError, ZeroDivisionError):
        return None
    has = lambda name: f"stages.0.blocks.0.rnn_tokens.{name}" in weights  # noqa: E731
    bidirectional = has("rnn_v.weight_hh_l0_reverse") or has("rnn_h.weight_hh_l0_reverse")
    with_fc = has("fc.weight")
    if has("rnn_v.weight_hh_l0") and has("rnn_h.weight_hh_l0"):
        out = 2 * hidden_sizes[0] if bidirectional else hidden_sizes[0]
        if with_fc:
            union = "cat" if weights["stages.0.blocks.0.rnn_tokens.fc.weight"].shape[1] == 2 * out else "add"
        else:
            union = "cat" if 2 * out == embed_dims[0] else "add"
    else:
        union = "vertical" if has("rnn_v.weight_hh_l0") else "horizontal"
    return dict(
        layers=tuple(blocks[s] for s in stages),
        patch_sizes=tuple(int(p) for p in patch_sizes),
        embed_dims=tuple(int(d) for d in embed_dims),
        hidden_sizes=tuple(int(h) for h in hidden_sizes),
        mlp_ratios=tuple(float(r) for r in mlp_ratios),
        rnn_type={4: "lstm", 3: "gru", 1: "rnn"}.get(int(gates), "unknown"),
        bidirectional=bidirectional,
        union=union,
        with_fc=with_fc,
    )


def _infer_vanilla_architecture(weights):
    blocks = _blocks_per_stage(weights)
    if blocks is None:
        return None
    stages = range(len(blocks))
    try:
        embed_dims = tuple(int(weights[f"stages.{s}.blocks.0.norm1.weight"].shape[0]) for s in stages)
        hidden_sizes = tuple(
            int(weights[f"stages.{s}.blocks.0.rnn_tokens.rnn.weight_hh_l0"].shape[1]) for s in stages
        )
        mlp_ratios = tuple(
            weights[f"stages.{s}.blocks.0.mlp_channels.fc1.weight"].shape[0] / embed_dims[s] for s in stages
        )
        patch_sizes = (weights["stem.proj.weight"].shape[-1],) + tuple(
            weights[f"stages.{s}.downsample.down.weight"].shape[-1] for s in stages if s > 0
        )
    except (KeyError, TypeError, IndexError, ZeroDivisionError):
        return None
    return dict(
        layers=tuple(blocks[s] for s in stages),
        patch_sizes=tuple(int(p) for p in patch_sizes),
        embed_dims=embed_dims,
        hidden_sizes=hidden_sizes,
        mlp_ratios=tuple(float(r) for r in mlp_ratios),
        ape="absolute_pos_embed" in weights,
    )


def _blocks_per_stage(weights):
    """{stage: number of blocks}, or None where the stages are not 0..n-1."""
    blocks = {}
    for key in weights:
        m = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.", key)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        return None
    return blocks


def guess_variant(weights):
    """The registered variant whose architecture a normalized state dict fits, or None."""
    arch = infer_architecture(weights)
    if arch is None:
        return None
    for name, config in registry.MODEL_CONFIGS.items():
        reference = {k: tuple(v) if isinstance(v, list) else v for k, v in config["arch"].items()}
        reference["mlp_ratios"] = tuple(float(r) for r in reference["mlp_ratios"])
        if reference == arch:
            return name
    return None


__all__ = [
    "CheckpointMismatchError",
    "checkpoint_family",
    "guess_variant",
    "infer_architecture",
    "load_torch_state_dict",
    "normalize_state_dict",
    "weight_table",
]
