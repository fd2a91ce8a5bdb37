"""Every Sequencer variant, its architecture and its pretrained source, as data.

One fact, one place: the builders (`models/`), the converter and the weights
hub (`weights/`), the tasks and the CLI read this table. It imports nothing of
the package, so anything may import it.
"""

# The architecture lists of the reference (blocks, patch size, width, LSTM
# hidden size and MLP ratio per stage) and its switches.
_S = dict(
    layers=(4, 3, 8, 3),
    patch_sizes=(7, 2, 1, 1),
    embed_dims=(192, 384, 384, 384),
    hidden_sizes=(48, 96, 96, 96),
    mlp_ratios=(3.0, 3.0, 3.0, 3.0),
    rnn_type="lstm",
    bidirectional=True,
    union="cat",
    with_fc=True,
)
_M = dict(_S, layers=(4, 3, 14, 3))
_L = dict(_S, layers=(8, 8, 16, 4))
_H2X = (96, 192, 192, 192)

# The vanilla Sequencer (the authors' models/vanilla_sequencer.py): one BiLSTM
# over the row-major token sequence; no fc, so 2 * hidden = width.
_V = dict(
    layers=(4, 3, 8, 3),
    patch_sizes=(14, 1, 1, 1),
    embed_dims=(384, 384, 384, 384),
    hidden_sizes=(192, 192, 192, 192),
    mlp_ratios=(3.0, 3.0, 3.0, 3.0),
    ape=False,
)

# family: which builder makes it ("sequencer2d" or "vanilla").
# weights_variant: the PRETRAINED entry that `weights="imagenet"` loads (the
# 392 px variants reuse the 224 px weights, as the authors' code does).
MODEL_CONFIGS = {
    "sequencer2d_s": dict(arch=_S, weights_variant="sequencer2d_s"),
    "sequencer2d_m": dict(arch=_M, weights_variant="sequencer2d_m"),
    "sequencer2d_l": dict(arch=_L, weights_variant="sequencer2d_l"),
    "sequencer2d_s_392": dict(arch=_S, default_size=392, weights_variant="sequencer2d_s"),
    "sequencer2d_m_392": dict(arch=_M, default_size=392, weights_variant="sequencer2d_m"),
    "sequencer2d_l_392": dict(arch=_L, default_size=392, weights_variant="sequencer2d_l"),
    "sequencer2d_s_unidirectional": dict(arch=dict(_S, bidirectional=False)),
    "sequencer2d_s_add": dict(arch=dict(_S, union="add")),
    "sequencer2d_s_h2x": dict(arch=dict(_S, hidden_sizes=_H2X)),
    "sequencer2d_s_without_fc": dict(arch=dict(_S, with_fc=False)),
    "sequencer2d_vertical": dict(
        arch=dict(_S, hidden_sizes=_H2X, union="vertical", with_fc=False)
    ),
    "sequencer2d_s_horizontal": dict(
        arch=dict(_S, hidden_sizes=_H2X, union="horizontal", with_fc=False)
    ),
    "gru_sequencer2d_s": dict(arch=dict(_S, rnn_type="gru")),
    "rnn_sequencer2d_s": dict(arch=dict(_S, rnn_type="rnn")),
    "sequencer2d_l_d4_3x": dict(
        arch=dict(_L, embed_dims=(256, 512, 512, 512), hidden_sizes=(64, 128, 128, 128))
    ),
    "v_sequencer_s": dict(family="vanilla", arch=_V),
    "v_sequencer_s_h": dict(
        family="vanilla",
        arch=dict(
            _V,
            patch_sizes=(7, 2, 1, 1),
            embed_dims=(192, 384, 384, 384),
            hidden_sizes=(96, 192, 192, 192),
        ),
    ),
    # The position embedding is made for a 16 x 16 token grid (224 / 14).
    "v_sequencer_s_pe": dict(family="vanilla", arch=dict(_V, ape=True)),
}
for _config in MODEL_CONFIGS.values():
    _config.setdefault("family", "sequencer2d")
    _config.setdefault("default_size", 224)
    _config.setdefault("weights_variant", None)


# Pretrained ImageNet-1k weights: timm's safetensors files on the Hugging Face
# Hub at a pinned revision, with the sha256 of the file where published (M's
# is not; its structure is checked instead).
PRETRAINED = {
    "sequencer2d_s": dict(
        repo_id="timm/sequencer2d_s.in1k",
        revision="dfd8e6955f97c4fe7b18ed439dcac56f33f6acac",
        filename="model.safetensors",
        sha256="ef70ff18ff4f615c53009fde2ffe2f00e47376858d6da329fca2017baaffa946",
    ),
    "sequencer2d_m": dict(
        repo_id="timm/sequencer2d_m.in1k",
        revision="391329ebe646393e88be9499eaa7b79af1c92f11",
        filename="model.safetensors",
        sha256=None,
    ),
    "sequencer2d_l": dict(
        repo_id="timm/sequencer2d_l.in1k",
        revision="f0f041c30b6ae2c2d991b45e107f3a4a22839b15",
        filename="model.safetensors",
        sha256="4104172887d330aec2e0ab09705e09962fa2a77a475a7792e36e0d6065f231a2",
    ),
}

# Layer names the builders give and the converter, exporters and fine-tuning
# find layers by. The builders are the only place that creates them.
INPUT = "input_layer"
PREPROCESSING = "preprocessing"
STEM = "stem"
NORM = "norm"
POOL = "avg_pool"
HEAD_DROPOUT = "head_dropout"
HEAD = "head"
PREDICTIONS = "predictions"
POSITION_EMBEDDING = "absolute_pos_embed"


def block_name(stage, block):
    return f"stages_{stage}_blocks_{block}"


def downsample_name(stage):
    return f"stages_{stage}_downsample"


BLOCK_NAME_PATTERN = r"^stages_(\d+)_blocks_(\d+)$"
DOWNSAMPLE_NAME_PATTERN = r"^stages_(\d+)_downsample$"


def list_models():
    """Names of every registered variant."""
    return sorted(MODEL_CONFIGS)


def model_config(name):
    """The registry entry of `name`; an unknown name is one clear line."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"Unknown model {name!r}. Available models: {', '.join(list_models())}")
    return MODEL_CONFIGS[name]
