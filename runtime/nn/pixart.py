"""PixArt-α and PixArt-Σ (Chen et al., "PixArt-α: Fast Training of Diffusion Transformer for
Photorealistic Text-to-Image Synthesis"; "PixArt-Σ: Weak-to-Strong Training …") in plain PyTorch.

The network follows diffusers' `PixArtTransformer2DModel` (BasicTransformerBlock with norm_type
"ada_norm_single") layer for layer and key for key, so its state dicts load with `strict=True`. It is
DiT with three changes: one adaLN projection for the whole network ("adaLN-single"), which every block
offsets by its own learned `scale_shift_table`; a cross-attention to the T5 prompt between the
self-attention and the MLP, ungated and without a norm before it; and, at 1024 px for α, the image's
resolution and aspect ratio embedded next to the timestep ("micro-conditions").

Unit convention (as in runtime/nn/dit.py): every cacheable unit's raw branch output is evaluated
through the unit policy (runtime/nn/units.py): `transformer_blocks.{i}.attn1` and `.ff` before their
gate and residual add, `.attn2` (which has no gate) before its residual add, in that order per block.
Blocks run through `run_block`, so span reuse works. Without a policy the forward pass is exactly
diffusers'.

The prompt's work does not depend on the step: `encode_prompt` does it once (caption projection, every
block's cross-attention keys and values, the mask's additive bias) and `forward(..., prompt=…)` reuses
it, so that a sampling loop, or a prologue graph, computes it once per call.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from schedules.errors import BlockcacheError
from schedules.zoo import unit_names

from .layers import LayerNorm, PatchEmbed, get_1d_sincos_pos_embed_from_grid, timestep_embedding, unpatchify
from .precision import model_dtype
from .units import COMPUTE, run_block

# diffusers turns the 0/1 prompt mask into an additive bias, −10000 at the padding (not −inf, so that
# scores stay finite in fp16 too); after softmax's max subtraction exp(−10000) is 0 in fp32.
MASK_BIAS = -10000.0
VAE_SCALE_FACTOR = 8  # the SD autoencoder's: pixels per latent


class Prompt(NamedTuple):
    """`encode_prompt`'s output: the projected prompt tokens (N, L, D), every block's cross-attention
    keys and values (N, heads, L, D/heads), and the mask's additive bias (N, 1, 1, L) or None."""
    tokens: torch.Tensor
    keys: tuple
    values: tuple
    bias: torch.Tensor | None


def sincos_pos_embed(embed_dim, grid_size, interpolation_scale):
    """PixArt's fixed 2-D sin-cos table (T, D): DiT's layout (first half of the channels from the
    column coordinate, second from the row), at positions i / interpolation_scale. PixArt's base size is
    the grid itself, so its other factor (grid_size / base_size) is 1; the scale stretches a larger
    model's grid onto the positions it was first trained on (1024 px: 2)."""
    pos = np.arange(grid_size, dtype=np.float32) / np.float32(interpolation_scale)
    cols, rows = np.meshgrid(pos, pos)  # cols varies along a row, as DiT's grid[0]
    emb_cols = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, cols)
    emb_rows = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, rows)
    return np.concatenate([emb_cols, emb_rows], axis=1)


class TimestepEmbedding(nn.Module):
    """Linear → SiLU → Linear on 256 sinusoidal frequencies (diffusers' keys `linear_1`, `linear_2`)."""

    def __init__(self, out_features, frequency_embedding_size=256):
        super().__init__()
        self.linear_1 = nn.Linear(frequency_embedding_size, out_features)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(out_features, out_features)
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, values):
        freq = timestep_embedding(values, self.frequency_embedding_size)  # [cos, sin], as diffusers' flip_sin_to_cos
        return self.linear_2(self.act(self.linear_1(freq.to(self.linear_1.weight.dtype))))


class CombinedTimestepSizeEmbeddings(nn.Module):
    """The timestep's embedding, plus (micro-conditions) the image's (height, width) and aspect ratio,
    each number embedded as a timestep to D/3 channels: [height, width, aspect ratio] fill the D."""

    def __init__(self, hidden_size, use_additional_conditions):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(hidden_size)
        self.use_additional_conditions = use_additional_conditions
        if use_additional_conditions:
            self.resolution_embedder = TimestepEmbedding(hidden_size // 3)
            self.aspect_ratio_embedder = TimestepEmbedding(hidden_size // 3)

    def forward(self, t, resolution=None, aspect_ratio=None):
        emb = self.timestep_embedder(t)
        if not self.use_additional_conditions:
            return emb
        n = t.shape[0]
        size = self.resolution_embedder(resolution.flatten()).reshape(n, -1)  # (N, 2·D/3)
        ratio = self.aspect_ratio_embedder(aspect_ratio.flatten()).reshape(n, -1)  # (N, D/3)
        return emb + torch.cat([size, ratio], dim=1)


class AdaLayerNormSingle(nn.Module):
    """adaLN-single: one projection of the conditioning to 6·D (shift, scale, gate of attention and
    MLP) shared by all blocks; returns it and the conditioning itself (the final layer's input)."""

    def __init__(self, hidden_size, use_additional_conditions):
        super().__init__()
        self.emb = CombinedTimestepSizeEmbeddings(hidden_size, use_additional_conditions)
        self.silu = nn.SiLU()
        self.linear = nn.Linear(hidden_size, 6 * hidden_size)

    def forward(self, t, resolution=None, aspect_ratio=None):
        c = self.emb(t, resolution, aspect_ratio)
        return self.linear(self.silu(c)), c


class CaptionProjection(nn.Module):
    """T5 tokens (caption_channels wide) to the model width: Linear → GELU (tanh) → Linear."""

    def __init__(self, in_features, hidden_size):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, caption):
        return self.linear_2(self.act_1(self.linear_1(caption)))


class Attention(nn.Module):
    """Multi-head attention with separate q, k, v projections (diffusers' keys: `to_q`, `to_k`, `to_v`,
    `to_out.0`). Self-attention by default; cross-attention takes keys and values made by `kv`."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # diffusers' [Linear, Dropout]: only the Linear has weights

    def split_heads(self, x):
        n, length, d = x.shape
        return x.view(n, length, self.num_heads, d // self.num_heads).transpose(1, 2)

    def kv(self, context):
        """Keys and values of `context` (N, L, D), split into heads: (N, heads, L, D/heads) each."""
        return self.split_heads(self.to_k(context)), self.split_heads(self.to_v(context))

    def forward(self, x, k=None, v=None, bias=None):
        n, length, d = x.shape
        if k is None:
            k, v = self.kv(x)
        # An additive float bias (N, 1, 1, L) broadcasts over heads and queries; ONNX exports it as an Add.
        out = F.scaled_dot_product_attention(self.split_heads(self.to_q(x)), k, v, attn_mask=bias)
        return self.to_out[0](out.transpose(1, 2).reshape(n, length, d))


class GELUProjection(nn.Module):
    """diffusers' GELU activation module: a Linear (`proj`) then the tanh-approximate GELU."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        # Index 1 is diffusers' Dropout (no weights); keeping it keeps the keys `net.0.proj`, `net.2`.
        self.net = nn.Sequential(GELUProjection(dim, hidden), nn.Identity(), nn.Linear(hidden, dim))

    def forward(self, x):
        return self.net(x)


class PixArtBlock(nn.Module):
    """Self-attention and MLP modulated by adaLN-single (the shared 6·D plus this block's table), with a
    cross-attention to the prompt between them."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn1 = Attention(hidden_size, num_heads)
        # diffusers' norm2 sits before the MLP: PixArt's cross-attention reads the hidden state unnormalised.
        self.norm2 = LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn2 = Attention(hidden_size, num_heads)
        self.ff = FeedForward(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size ** 0.5)

    def forward(self, x, ada, k, v, bias, policy=COMPUTE, prefix="block"):
        """`ada`: adaLN-single's (N, 6·D); `k`, `v`: this block's cross-attention keys and values."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + ada.reshape(x.shape[0], 6, -1)).chunk(6, dim=1)  # (N, 1, D) each
        # Bind the current x as a default argument: each branch must see x after the previous add.
        attn = policy(f"{prefix}.attn1", lambda h=x: self.attn1(self.norm1(h) * (1 + scale_msa) + shift_msa))
        x = gate_msa * attn + x
        cross = policy(f"{prefix}.attn2", lambda h=x: self.attn2(h, k, v, bias))
        x = cross + x
        mlp = policy(f"{prefix}.ff", lambda h=x: self.ff(self.norm2(h) * (1 + scale_mlp) + shift_mlp))
        return gate_mlp * mlp + x


class PixArt(nn.Module):
    """Text-to-image PixArt-α / Σ. `forward(x, t, prompt_embeds, prompt_mask)` as diffusers'
    `PixArtTransformer2DModel(x, prompt_embeds, t, encoder_attention_mask=prompt_mask)`.

    Constructor names are DiT's where the zoo shares an option (input_size = diffusers' sample_size,
    the latent size; hidden_size = heads × head dim; depth = num_layers; learn_sigma = out_channels of
    2 × in_channels) and diffusers' otherwise. `max_text_tokens` (the prompt length the pipelines pad
    to: α 120, Σ 300) does not change the weights; it sizes the cost model and exported graphs."""

    def __init__(self, input_size=128, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, learn_sigma=True, caption_channels=4096, max_text_tokens=120,
                 use_additional_conditions=True, interpolation_scale=2, family="pixart", **others):
        super().__init__()
        if family != "pixart":  # zoo configs name their family; a DiT config is not a PixArt's
            raise BlockcacheError(f"a {family} config cannot build a PixArt")
        if others:  # e.g. a DiT's num_classes: PixArt is conditioned on a prompt, not a label
            raise BlockcacheError(f"PixArt has no option {sorted(others)[0]!r}")
        if hidden_size % 4 or hidden_size % num_heads or (use_additional_conditions and hidden_size % 3):
            raise BlockcacheError(f"PixArt's hidden_size {hidden_size} must be a multiple of 4 (the sin-cos table), of "
                                  "num_heads and, with micro-conditions, of 3")
        self.config = dict(family="pixart", input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           learn_sigma=learn_sigma, caption_channels=caption_channels, max_text_tokens=max_text_tokens,
                           use_additional_conditions=use_additional_conditions,
                           interpolation_scale=interpolation_scale)
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.use_additional_conditions = use_additional_conditions

        self.pos_embed = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.grid_size = self.pos_embed.grid_size
        # diffusers keeps the table as a non-persistent buffer: it is not in the state dict.
        self.register_buffer("pos_table", self.fixed_buffers()["pos_table"], persistent=False)
        self.transformer_blocks = nn.ModuleList([PixArtBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm_out = LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size ** 0.5)
        self.proj_out = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        self.adaln_single = AdaLayerNormSingle(hidden_size, use_additional_conditions)
        self.caption_projection = CaptionProjection(caption_channels, hidden_size)

    @property
    def unit_names(self) -> tuple[str, ...]:
        return unit_names(self.config)

    def fixed_buffers(self) -> dict:
        """The buffers derived from the config (not in the state dict): the fp32 sin-cos position table."""
        c = self.config
        table = sincos_pos_embed(c["hidden_size"], c["input_size"] // c["patch_size"], c["interpolation_scale"])
        return {"pos_table": torch.tensor(table, dtype=torch.float32).unsqueeze(0)}

    def micro_conditions(self, n: int) -> dict | None:
        """The micro-conditions of `n` square images of this model's size, as PixArt-α's pipeline passes
        them (resolution = (height, width) in pixels, the latent size × the VAE's factor 8; aspect ratio
        height / width), or None for a model without them."""
        if not self.use_additional_conditions:
            return None
        side = float(self.config["input_size"] * VAE_SCALE_FACTOR)
        dtype = model_dtype(self)
        return {"resolution": torch.full((n, 2), side, dtype=dtype), "aspect_ratio": torch.ones(n, 1, dtype=dtype)}

    def encode_prompt(self, prompt_embeds, prompt_mask=None) -> Prompt:
        """The step-independent prompt work. prompt_embeds: (N, L, caption_channels) T5 states;
        prompt_mask: (N, L), 1 = token, 0 = padding (None: no padding), as diffusers'
        `encoder_attention_mask`."""
        tokens = self.caption_projection(prompt_embeds)
        kv = [block.attn2.kv(tokens) for block in self.transformer_blocks]
        bias = None
        if prompt_mask is not None:
            if prompt_mask.ndim != 2:
                raise BlockcacheError(f"prompt_mask must be (batch, tokens) of 1 and 0, got shape {tuple(prompt_mask.shape)}")
            bias = ((1 - prompt_mask.to(tokens.dtype)) * MASK_BIAS)[:, None, None, :]
        return Prompt(tokens, tuple(k for k, _ in kv), tuple(v for _, v in kv), bias)

    def forward(self, x, t, prompt_embeds=None, prompt_mask=None, added_cond=None, policy=COMPUTE, prompt=None):
        """x: (N, C, H, W) latents; t: (N,) timesteps 0…999 (fractional allowed); prompt_embeds, prompt_mask:
        as `encode_prompt`, or `prompt`: its output (then neither is given). added_cond: the micro-
        conditions {"resolution": (N, 2) height, width in pixels, "aspect_ratio": (N, 1) height / width}, required
        when the model has them and ignored otherwise (as diffusers). `policy(name, compute)` is asked
        for every cacheable unit in order (runtime/nn/units.py)."""
        if prompt is None:
            if prompt_embeds is None:
                raise BlockcacheError("PixArt needs the prompt: prompt_embeds (and prompt_mask) or encode_prompt's output")
            prompt = self.encode_prompt(prompt_embeds, prompt_mask)
        elif prompt_embeds is not None or prompt_mask is not None:
            raise BlockcacheError("give PixArt either prompt_embeds / prompt_mask or an encoded prompt, not both")
        if self.use_additional_conditions:
            if added_cond is None:
                raise BlockcacheError("this PixArt takes micro-conditions: added_cond={'resolution', 'aspect_ratio'}")
            ada, c = self.adaln_single(t, added_cond["resolution"], added_cond["aspect_ratio"])
        else:
            ada, c = self.adaln_single(t)
        x = self.pos_embed(x)
        x = (x + self.pos_table).to(x.dtype)  # the fp32 table added in the model's dtype, as diffusers
        for i, block in enumerate(self.transformer_blocks):
            x = run_block(policy, f"transformer_blocks.{i}", x,
                          lambda h, block=block, i=i: block(h, ada, prompt.keys[i], prompt.values[i], prompt.bias,
                                                            policy, prefix=f"transformer_blocks.{i}"))
        shift, scale = (self.scale_shift_table[None] + c[:, None]).chunk(2, dim=1)
        x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)
        return unpatchify(x, self.out_channels, self.patch_size, self.grid_size)
