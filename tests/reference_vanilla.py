"""A PyTorch reference of the authors' vanilla Sequencer (models/vanilla_sequencer.py,
models/layers.py), written from REFERENCE.md: timm has no port. Module and
parameter names are the authors', so `state_dict()` is their checkpoint layout.

One extension, marked below: where the token grid differs from the position
embedding's, the embedding is resampled with timm's `resample_abs_pos_embed`
(the authors' model only runs at its fixed grid).
"""

import numpy as np
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

# The authors' variant definitions (REFERENCE.md, "Vanilla Sequencer"), kept
# independent of keras_sequencer's registry on purpose: the tests compare the two.
_S = dict(layers=[4, 3, 8, 3], patch_sizes=[14, 1, 1, 1], embed_dims=[384] * 4,
          hidden_sizes=[192] * 4, mlp_ratios=[3.0] * 4)
VARIANTS = {
    "v_sequencer_s": _S,
    "v_sequencer_s_h": dict(_S, patch_sizes=[7, 2, 1, 1], embed_dims=[192, 384, 384, 384],
                            hidden_sizes=[96, 192, 192, 192]),
    "v_sequencer_s_pe": dict(_S, ape=True),
}


class LSTM(nn.Module):
    """One bidirectional LSTM over the row-major token sequence (B, H*W, C)."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.rnn = nn.LSTM(input_size, hidden_size, num_layers=1, batch_first=True,
                           bias=True, bidirectional=True)

    def forward(self, x):
        B, H, W, C = x.shape
        x, _ = self.rnn(x.reshape(B, H * W, C))
        return x.reshape(B, H, W, -1)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VanillaSequencerBlock(nn.Module):
    def __init__(self, dim, hidden_size, mlp_ratio):
        super().__init__()
        if 2 * hidden_size != dim:
            raise ValueError(f"2 * hidden_size ({2 * hidden_size}) must equal dim ({dim})")
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.rnn_tokens = LSTM(dim, hidden_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_channels = Mlp(dim, int(mlp_ratio * dim))

    def forward(self, x):  # eval: no drop path
        x = x + self.rnn_tokens(self.norm1(x))
        return x + self.mlp_channels(self.norm2(x))


class PatchEmbed(nn.Module):
    """Conv k = stride = patch, no norm; NCHW in, NHWC out."""

    def __init__(self, in_chans, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).permute(0, 2, 3, 1)


class Downsample2D(nn.Module):
    def __init__(self, in_dim, out_dim, patch):
        super().__init__()
        self.down = nn.Conv2d(in_dim, out_dim, kernel_size=patch, stride=patch)

    def forward(self, x):  # NHWC in and out
        return self.down(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class VanillaSequencer(nn.Module):
    def __init__(self, layers, patch_sizes, embed_dims, hidden_sizes, mlp_ratios, ape=False,
                 num_classes=1000, img_size=224, in_chans=3):
        super().__init__()
        self.stem = PatchEmbed(in_chans, embed_dims[0], patch_sizes[0])
        self.ape = ape
        if ape:
            grid = img_size // patch_sizes[0]
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dims[0]))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        stages = []
        for s, depth in enumerate(layers):
            blocks = [VanillaSequencerBlock(embed_dims[s], hidden_sizes[s], mlp_ratios[s])
                      for _ in range(depth)]
            if s < len(layers) - 1:
                blocks.append(Downsample2D(embed_dims[s], embed_dims[s + 1], patch_sizes[s + 1]))
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(embed_dims[-1], eps=1e-6)
        self.head = nn.Linear(embed_dims[-1], num_classes)

    def position_embedding(self, grid_h, grid_w):
        pos = self.absolute_pos_embed
        old = pos.shape[1:3]
        if (grid_h, grid_w) == tuple(old):
            return pos
        # Extension (not in the authors' code): timm's ViT resampling.
        flat = resample_abs_pos_embed(pos.reshape(1, old[0] * old[1], -1), new_size=[grid_h, grid_w],
                                      old_size=list(old), num_prefix_tokens=0)
        return flat.reshape(1, grid_h, grid_w, -1)

    def forward_features(self, x):
        x = self.stem(x)
        if self.ape:
            x = x + self.position_embedding(x.shape[1], x.shape[2])
        return self.norm(self.blocks(x))

    def forward(self, x):
        return self.head(self.forward_features(x).mean(dim=(1, 2)))


def make_vanilla_reference(name="v_sequencer_s", num_classes=1000, seed=0, **overrides):
    """The reference with random weights everywhere: non-zero head, random
    biases and norm affines, so a mis-mapped tensor cannot hide behind an init value."""
    torch.manual_seed(seed)
    kwargs = dict(VARIANTS[name], num_classes=num_classes)
    kwargs.update(overrides)
    model = VanillaSequencer(**kwargs).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif "norm" in key:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif key.startswith("head"):
                param.normal_(0.0, 0.05)
            elif key == "absolute_pos_embed":
                param.normal_(0.0, 0.5)  # large enough to move the logits
    return model


def vanilla_logits(model, x_nhwc_normalized):
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(x_nhwc_normalized.transpose(0, 3, 1, 2)))
        return model(x).numpy()
