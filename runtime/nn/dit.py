"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") in plain PyTorch.

The network follows facebookresearch/DiT `models.py` layer for layer and key for key, without timm.
One addition: every cacheable unit (a block's attention or MLP branch, *before* its adaLN gate and
residual add) is evaluated through the unit policy (runtime/nn/units.py), so that a cache can reuse
it and the exporter can expose it as a named graph tensor. Without a policy the forward pass is
exactly the official one.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from schedules.errors import BlockcacheError
from schedules.zoo import unit_names

from .layers import Attention, LayerNorm, Mlp, PatchEmbed, TimestepEmbedder, get_2d_sincos_pos_embed, modulate, unpatchify
from .units import COMPUTE, run_block


class LabelEmbedder(nn.Module):
    """Class labels to vectors; row `num_classes` is the null class used for classifier-free guidance.

    Label dropout for training is done by the caller (replace labels by `num_classes`)."""

    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes

    def forward(self, labels):
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads)
        self.norm2 = LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c, policy=COMPUTE, prefix="block"):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        attn = policy(f"{prefix}.attn", lambda: self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        x = x + gate_msa.unsqueeze(1) * attn
        mlp = policy(f"{prefix}.mlp", lambda: self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x + gate_mlp.unsqueeze(1) * mlp


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone. `forward(x, t, y)` as the official model."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, num_classes=1000, learn_sigma=True, family="dit"):
        super().__init__()
        if family != "dit":  # zoo configs name their family; a U-ViT config is not a DiT's
            raise BlockcacheError(f"a {family} config cannot build a DiT")
        self.config = dict(family="dit", input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           num_classes=num_classes, learn_sigma=learn_sigma)
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.null_class = num_classes  # the label table's extra row

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        # Fixed sin-cos embedding, stored in the state dict as the official model does.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        pos = get_2d_sincos_pos_embed(hidden_size, self.x_embedder.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))

    @property
    def unit_names(self) -> tuple[str, ...]:
        return unit_names(self.config)

    def forward(self, x, t, y, policy=COMPUTE):
        """x: (N, C, H, W) latents; t: (N,) original timesteps; y: (N,) labels (num_classes = null).
        `policy(name, compute)` is asked for every cacheable unit in order (runtime/nn/units.py)."""
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for i, block in enumerate(self.blocks):
            x = run_block(policy, f"blocks.{i}", x, lambda h, block=block, i=i: block(h, c, policy, prefix=f"blocks.{i}"))
        x = self.final_layer(x, c)
        return unpatchify(x, self.out_channels, self.patch_size, self.x_embedder.grid_size)
