"""The PyTorch reference (timm's Sequencer2d) for parity tests.

AUTHORS_VARIANTS copies the variant definitions of the authors'
models/two_dim_sequencer.py as timm Sequencer2d arguments; GRU2d and RNN2d are the
authors' GRU2D/RNN2D on timm's RNN2dBase. Kept independent of keras_sequencer's
registry on purpose: the test compares the two.
"""

import numpy as np
import torch
from timm.models.sequencer import LSTM2d, RNN2dBase, Sequencer2d
from torch import nn

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype="float32")
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype="float32")


def _rnn2d(torch_rnn, **rnn_kwargs):
    """The authors' GRU2D / RNN2D: timm's RNN2dBase around another torch RNN."""

    class RNN2dVariant(RNN2dBase):
        def __init__(self, input_size, hidden_size, num_layers=1, bias=True,
                     bidirectional=True, union="cat", with_fc=True, **factory):
            super().__init__(input_size, hidden_size, num_layers, bias, bidirectional,
                             union, with_fc, **factory)
            for axis in ("v", "h"):
                if getattr(self, "with_vertical" if axis == "v" else "with_horizontal"):
                    setattr(self, f"rnn_{axis}", torch_rnn(
                        input_size, hidden_size, num_layers, batch_first=True, bias=bias,
                        bidirectional=bidirectional, **rnn_kwargs, **factory))

    return RNN2dVariant


GRU2d = _rnn2d(nn.GRU)
RNN2d = _rnn2d(nn.RNN, nonlinearity="tanh")


_S = dict(layers=[4, 3, 8, 3], patch_sizes=[7, 2, 1, 1], embed_dims=[192, 384, 384, 384],
          hidden_sizes=[48, 96, 96, 96], mlp_ratios=[3.0, 3.0, 3.0, 3.0])
_M = dict(_S, layers=[4, 3, 14, 3])
_L = dict(_S, layers=[8, 8, 16, 4])
_H2X = [96, 192, 192, 192]
AUTHORS_VARIANTS = {
    "sequencer2d_s": _S,
    "sequencer2d_m": _M,
    "sequencer2d_l": _L,
    "sequencer2d_s_392": _S,
    "sequencer2d_m_392": _M,
    "sequencer2d_l_392": _L,
    "sequencer2d_s_unidirectional": dict(_S, bidirectional=False),
    "sequencer2d_s_add": dict(_S, union="add"),
    "sequencer2d_s_h2x": dict(_S, hidden_sizes=_H2X),
    "sequencer2d_s_without_fc": dict(_S, with_fc=False),
    "sequencer2d_vertical": dict(_S, hidden_sizes=_H2X, union="vertical", with_fc=False),
    "sequencer2d_s_horizontal": dict(_S, hidden_sizes=_H2X, union="horizontal", with_fc=False),
    "gru_sequencer2d_s": dict(_S, rnn_layer=GRU2d),
    "rnn_sequencer2d_s": dict(_S, rnn_layer=RNN2d),
    "sequencer2d_l_d4_3x": dict(_L, embed_dims=[256, 512, 512, 512], hidden_sizes=[64, 128, 128, 128]),
}


def make_reference(name="sequencer2d_s", num_classes=1000, seed=0, **overrides):
    """A timm model with random weights everywhere: non-zero head, random biases
    and norm affines, so a mis-mapped tensor cannot hide behind an init value."""
    torch.manual_seed(seed)
    kwargs = dict(rnn_layer=LSTM2d, num_classes=num_classes)
    kwargs.update(AUTHORS_VARIANTS[name])
    kwargs.update(overrides)
    model = Sequencer2d(**kwargs).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif "norm" in key:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif key.startswith("head"):
                param.normal_(0.0, 0.05)
    return model


def reference_logits(model, x_nhwc_normalized):
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(x_nhwc_normalized.transpose(0, 3, 1, 2)))
        return model(x).numpy()


def reference_features(model, x_nhwc_normalized):
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(x_nhwc_normalized.transpose(0, 3, 1, 2)))
        return model.forward_features(x).numpy()


def normalize(images_0_255):
    return ((images_0_255 / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype("float32")


def to_authors_layout(state_dict, layers):
    """timm keys -> the authors' release layout (the inverse of timm's filter)."""
    import re

    out = {}
    for key, value in state_dict.items():
        m = re.match(r"stages\.(\d+)\.downsample\.down\.(.*)", key)
        if m:
            stage = int(m.group(1))
            key = f"blocks.{stage - 1}.{layers[stage - 1]}.down.{m.group(2)}"
        else:
            key = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"blocks.\1.\2.", key)
            key = key.replace("head.fc.", "head.")
        out[key] = value
    return out
