"""DiT (Peebles & Xie) in plain PyTorch, the model zoo (DiT here, U-ViT in exporter/uvit.py), and
checkpoint loading.

The network follows facebookresearch/DiT `models.py` layer for layer and key for key, without timm.
One addition: every cacheable unit (a block's attention or MLP branch, *before* its adaLN gate and
residual add) is evaluated through `unit(name, fn)`, so that the eager reference can reuse a cached
value and the exporter can expose the unit's output as a named graph tensor. Without a `unit`
callback the forward pass is exactly the official one.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from schedules.errors import BlockcacheError
from schedules.zoo import family_of, model_config, unit_names


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _compute(name, fn):
    return fn()


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the model's dtype: fp16 normalisation overflows in large
    transformers. In fp32 models the casts are no-ops (and vanish from the traced graph)."""

    def forward(self, x):
        if x.dtype == torch.float32:
            return super().forward(x)
        weight, bias = (None, None) if self.weight is None else (self.weight.float(), self.bias.float())
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


#################################################################################
#                      Embedding layers for timesteps and labels                #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Sinusoidal frequencies of the original timestep (0…999), then an MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels to vectors; row `num_classes` is the null class used for classifier-free guidance.

    Label dropout for training is done by the caller (replace labels by `num_classes`)."""

    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes

    def forward(self, labels):
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches → tokens (timm's PatchEmbed with its default flatten)."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, approximate="tanh"):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads)
        self.norm2 = LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c, unit=None, prefix="block"):
        unit = unit or _compute
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        attn = unit(f"{prefix}.attn", lambda: self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        x = x + gate_msa.unsqueeze(1) * attn
        mlp = unit(f"{prefix}.mlp", lambda: self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
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

    def unpatchify(self, x):
        """(N, T, p²·C) → (N, C, H, W). The grid size comes from the config, not from a traced shape."""
        c, p, h = self.out_channels, self.patch_size, self.x_embedder.grid_size
        x = x.reshape(x.shape[0], h, h, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x, t, y, unit=None):
        """x: (N, C, H, W) latents; t: (N,) original timesteps; y: (N,) labels (num_classes = null).

        `unit(name, fn)`, if given, is called for every cacheable unit in order and returns its value.
        """
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for i, block in enumerate(self.blocks):
            x = block(x, c, unit, prefix=f"blocks.{i}")
        x = self.final_layer(x, c)
        return self.unpatchify(x)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # column coordinate
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # row coordinate
    return np.concatenate([emb_h, emb_w], axis=1)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                                   Model zoo                                   #
#################################################################################

EMBEDDED_WEIGHTS = {"dit-digits": "dit-digits.safetensors"}


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights *everywhere* (the official init zeroes adaLN and the final layer, which makes a
    fresh DiT output zeros and every comparison vacuous). Matrices are Xavier-uniform, biases
    N(0, 0.02²), label vectors N(0, 1); the adaLN and final layers are drawn at a quarter of the Xavier
    bound, so that gates stay moderate as in trained adaLN-Zero models and a 28-block random model is
    not chaotic (its sampling trajectory then says something about numerical agreement). A fixed
    sin-cos `pos_embed` (DiT's) is kept; a learned one (a model with `learned_pos_embed = True`, U-ViT)
    is drawn from N(0, 0.02²) as its official initialisation does."""
    g = torch.Generator().manual_seed(seed)
    learned_pos_embed = getattr(model, "learned_pos_embed", False)
    for name, p in model.named_parameters():
        if name == "pos_embed" and not learned_pos_embed:
            continue
        with torch.no_grad():
            if name == "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif "embedding_table" in name or "label_emb" in name:  # unit-scale label vectors: labels matter as much as t
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                fan_in, fan_out = p.shape[1] * math.prod(p.shape[2:]), p.shape[0] * math.prod(p.shape[2:])
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                if "adaLN_modulation" in name or name.startswith("final_layer"):
                    bound /= 4
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
            elif "norm" in name and name.endswith(".weight"):  # affine LayerNorm scales (U-ViT) stay near 1
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def build_model(config: dict) -> nn.Module:
    """The network of `config`'s family (DiT, or U-ViT from exporter.uvit), weights as constructed."""
    try:
        if family_of(config).name == "uvit":
            from .uvit import UViT

            return UViT(**config)
        return DiT(**config)
    except TypeError as e:
        raise BlockcacheError(f"not a {family_of(config).name} config: {e}") from None


def load_model(name: str, checkpoint=None, *, random_init: bool = False, seed: int = 0, **overrides) -> nn.Module:
    """A zoo model in eval mode. Weights come from `checkpoint`, from the package (embedded models),
    or, only when asked with `random_init=True`, from a seeded random draw."""
    config = model_config(name, **overrides)
    model = build_model(config)
    if checkpoint is not None and random_init:
        raise BlockcacheError("give either a checkpoint or random_init, not both")
    if checkpoint is None and not random_init:
        if name in EMBEDDED_WEIGHTS and not overrides:
            checkpoint = embedded_weights_path(name)
        else:
            raise BlockcacheError(f"{name} needs weights: pass a checkpoint (or --random-init to use random weights)")
    if random_init:
        randomize_(model, seed)
    else:
        from .checkpoints import load_state_dict

        load_state_dict(model, checkpoint)
    model.name = name
    return model.eval()


def embedded_weights_path(name: str) -> str:
    import os

    path = os.path.join(os.path.dirname(__file__), "weights", EMBEDDED_WEIGHTS[name])
    if not os.path.exists(path):
        raise BlockcacheError(f"embedded weights for {name} are missing from the package ({path})")
    return path
