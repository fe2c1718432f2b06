"""U-ViT (Bao et al., "All are Worth Words") in plain PyTorch.

The network follows baofff/U-ViT `libs/uvit.py` layer for layer and key for key, so official
checkpoints (e.g. `imagenet256_uvit_huge.pth`) load with `strict=True`. Time and label are input
tokens ([label, time, patches]); the blocks form a U: the outputs of the first depth/2 blocks are
fed, last in first out, to the last depth/2 blocks through long skips (`skip_linear` on the
concatenation), with one middle block between them.

Unit convention (as in runtime/nn/dit.py): every cacheable unit, a block's raw attention or MLP
branch output before its residual add (U-ViT has no gates), is evaluated through the unit policy
(runtime/nn/units.py). Units are named `in_blocks.{i}.attn|mlp`, `mid_block.attn|mlp`,
`out_blocks.{i}.attn|mlp` and run in that order. Without a policy the forward pass is exactly the
official one.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from schedules.errors import BlockcacheError
from schedules.zoo import unit_names

from .layers import Attention, LayerNorm, Mlp, PatchEmbed, timestep_embedding, unpatchify
from .units import COMPUTE

# Label and time tokens precede the patch tokens (the official `extras` for class-conditional models).
EXTRAS = 2


class Block(nn.Module):
    """Pre-norm transformer block; an out block first fuses its long skip with `skip_linear`."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, skip=False):
        super().__init__()
        self.norm1 = LayerNorm(dim, elementwise_affine=True, eps=1e-5)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = LayerNorm(dim, elementwise_affine=True, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate="none")  # U-ViT uses exact GELU
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x, skip=None, policy=COMPUTE, prefix="block"):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        # Bind the current x as a default argument: the MLP branch must see x after the attention add.
        attn = policy(f"{prefix}.attn", lambda h=x: self.attn(self.norm1(h)))
        x = x + attn
        mlp = policy(f"{prefix}.mlp", lambda h=x: self.mlp(self.norm2(h)))
        return x + mlp


class UViT(nn.Module):
    """Class-conditional U-ViT. `forward(x, t, y)` as the official model; label `null_class` is the
    unconditional label. Constructor names are DiT's so the zoo's overrides apply to both families."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, num_classes=1001, qkv_bias=False, mlp_time_embed=False, conv=False, family="uvit"):
        super().__init__()
        if family != "uvit":  # zoo configs name their family
            raise BlockcacheError(f"a {family} config cannot build a U-ViT")
        if depth % 2:
            raise BlockcacheError(f"U-ViT depth must be even (in blocks + mid block + out blocks), got {depth}")
        self.config = dict(family="uvit", input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           num_classes=num_classes, qkv_bias=qkv_bias, mlp_time_embed=mlp_time_embed, conv=conv)
        self.in_channels = in_channels
        self.out_channels = in_channels
        # The config's num_classes counts the null class (the official 1001 for ImageNet).
        self.num_classes = num_classes - 1
        self.null_class = num_classes - 1
        self.learned_pos_embed = True
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.hidden_size = hidden_size

        self.patch_embed = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.grid_size = self.patch_embed.grid_size
        self.time_embed = (nn.Sequential(nn.Linear(hidden_size, 4 * hidden_size), nn.SiLU(),
                                         nn.Linear(4 * hidden_size, hidden_size))
                           if mlp_time_embed else nn.Identity())
        self.label_emb = nn.Embedding(num_classes, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, EXTRAS + self.patch_embed.num_patches, hidden_size))

        half = depth // 2
        self.in_blocks = nn.ModuleList([Block(hidden_size, num_heads, mlp_ratio, qkv_bias) for _ in range(half)])
        self.mid_block = Block(hidden_size, num_heads, mlp_ratio, qkv_bias)
        self.out_blocks = nn.ModuleList([Block(hidden_size, num_heads, mlp_ratio, qkv_bias, skip=True)
                                         for _ in range(half)])
        self.norm = LayerNorm(hidden_size, elementwise_affine=True, eps=1e-5)
        self.decoder_pred = nn.Linear(hidden_size, patch_size ** 2 * in_channels)
        self.final_layer = nn.Conv2d(in_channels, in_channels, 3, padding=1) if conv else nn.Identity()

    @property
    def unit_names(self) -> tuple[str, ...]:
        return unit_names(self.config)

    def forward(self, x, t, y, policy=COMPUTE):
        """x: (N, C, H, W) latents; t: (N,) timesteps (fractional allowed); y: (N,) labels
        (`null_class` = unconditional). `policy(name, compute)` is asked for every cacheable unit in
        order (runtime/nn/units.py)."""
        x = self.patch_embed(x)
        t_freq = timestep_embedding(t, self.hidden_size).to(self.pos_embed.dtype)
        time_token = self.time_embed(t_freq).unsqueeze(1)
        label_token = self.label_emb(y).unsqueeze(1)
        x = torch.cat([label_token, time_token, x], dim=1) + self.pos_embed

        skips = []
        for i, block in enumerate(self.in_blocks):
            x = block(x, policy=policy, prefix=f"in_blocks.{i}")
            skips.append(x)
        x = self.mid_block(x, policy=policy, prefix="mid_block")
        for i, block in enumerate(self.out_blocks):
            x = block(x, skips.pop(), policy=policy, prefix=f"out_blocks.{i}")

        x = self.decoder_pred(self.norm(x))
        x = unpatchify(x[:, EXTRAS:, :], self.out_channels, self.patch_size, self.grid_size)
        return self.final_layer(x)
