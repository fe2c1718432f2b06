"""Models with their weights: zoo configs (schedules/zoo.py) built by runtime/nn and filled from a
checkpoint, from the package (the embedded `dit-digits`), or from a seeded random draw.

    model = load_model("dit-xl2", "DiT-XL-2-256x256.pt")     # eval mode
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn

from runtime.nn.build import build_model
from schedules.errors import BlockcacheError, ParameterError, one_line
from schedules.zoo import model_config

EMBEDDED_WEIGHTS = {"dit-digits": "dit-digits.safetensors"}
# Parameters drawn at a quarter of the Xavier bound (with every `adaLN_modulation` and
# `scale_shift_table`): DiT's final layer; PixArt's adaLN-single projection and output projection.
MODULATION_PREFIXES = ("final_layer", "adaln_single.linear.", "proj_out.")


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights *everywhere* (the official init zeroes adaLN and the final layer, which makes a
    fresh DiT output zeros and every comparison vacuous). Matrices are Xavier-uniform, biases
    N(0, 0.02²), label vectors N(0, 1); the adaLN and final layers are drawn at a quarter of the Xavier
    bound, so that gates stay moderate as in trained adaLN-Zero models and a 28-block random model is
    not chaotic (its sampling trajectory then says something about numerical agreement). PixArt's
    counterparts get the same quarter bound: adaLN-single's projection, the `scale_shift_table`s (each
    block's and the final layer's, added to it) and `proj_out`; its caption projection keeps the full
    bound, so that the prompt matters. Without that, a 2-block random PixArt's eps has std 1.7 at
    t = 999 and DPM-Solver++ 2M (10 steps) ends at mean |latent| 244 (408 with 12 blocks); with it
    eps has std 0.4 and the latents end at 138 (169), as a random DiT's do (138): a latent whose eps does
    not track its noise ends near x_T/√ᾱ_999, mean |x| ≈ 125, a floor that is the sampler's. A fixed sin-cos
    `pos_embed` (DiT's) is kept; a learned one (a model with `learned_pos_embed = True`, U-ViT) is drawn
    from N(0, 0.02²) as its official initialisation does."""
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
                if "adaLN_modulation" in name or name.startswith(MODULATION_PREFIXES) \
                        or name.endswith("scale_shift_table"):
                    bound /= 4
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
            elif "norm" in name and name.endswith(".weight"):  # affine LayerNorm scales (U-ViT) stay near 1
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def load_model(name: str, checkpoint=None, *, random_init: bool = False, seed: int = 0, **overrides) -> nn.Module:
    """A zoo model in eval mode. Weights come from `checkpoint`, from the package (embedded models),
    or, only when asked with `random_init=True`, from a seeded random draw."""
    config = model_config(name, **overrides)
    if checkpoint is not None and random_init:
        raise BlockcacheError("give either a checkpoint or random_init, not both")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ParameterError("seed", f"{{name}} must be an integer in 0…2^63−1, got {seed!r}")
    try:
        model = build_model(config)
    except (RuntimeError, MemoryError) as e:  # a config too large for this machine's memory
        raise BlockcacheError(f"cannot build {name} here: {one_line(e)[:200]}") from None
    if checkpoint is None and not random_init:
        if name in EMBEDDED_WEIGHTS and not overrides:
            checkpoint = embedded_weights_path(name)
        else:
            raise ParameterError("random_init", f"{name} needs weights: pass a checkpoint (or {{name}} to use "
                                 "random weights)")
    if random_init:
        randomize_(model, seed)
    else:
        from .checkpoints import load_state_dict

        load_state_dict(model, checkpoint, name)
    model.name = name
    return model.eval()


def check_weights(model: nn.Module) -> None:
    """Refuse, in one line, a model with a non-finite weight: it would sample NaN."""
    for name, value in model.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise BlockcacheError(f"model weight {name} holds NaN or infinite values")


def embedded_weights_path(name: str) -> str:
    path = os.path.join(os.path.dirname(__file__), "weights", EMBEDDED_WEIGHTS[name])
    if not os.path.exists(path):
        raise BlockcacheError(f"embedded weights for {name} are missing from the package ({path})")
    return path
