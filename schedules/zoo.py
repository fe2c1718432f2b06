"""Model families and the model zoo's configurations, without torch.

Schedules, the cost model and the CLIs need to know a model's units and sizes; only the exporter
needs the network itself (`exporter.models` builds it from these configs). A family declares its
reference constructor arguments, its cacheable units in execution order, where its tokens come from
(for the cost model), the solver its noise schedule is sampled with, and its guidance form. Every
config carries its family under `"family"`; configs written before U-ViT existed mean DiT.
PixArt-α and PixArt-Σ (text-to-image, T5 prompts through cross-attention) are one family, "pixart".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import BlockcacheError

UNIT_KINDS = ("attn", "mlp")  # DiT's and U-ViT's units per block (a Family's default `unit_kinds`)
PIXART_UNIT_KINDS = ("attn1", "attn2", "ff")  # self-attention, cross-attention to the prompt, MLP (diffusers' names)
# Bounds on config values, far beyond any published model, so a typo cannot ask for terabytes:
# each value, the tokens a block sees (DiT-XL/2 at 512 px: 1024) and the parameters (DiT-XL/2: 0.68 G).
MAX_SIZE = 1 << 16
MAX_WIDTH = 1 << 18
MAX_TOKENS = 1 << 16
MAX_PARAMETERS = 50 * 10 ** 9


@dataclass(frozen=True)
class Family:
    name: str
    defaults: dict  # constructor arguments of the family's reference model (official names)
    samplers: tuple[str, ...]  # solvers for the family's noise schedule (the first is the default)
    guidance: str  # guidance form: "first3" (DiT), "uvit" (cond + s·(cond − uncond), all channels)
    guidance_scale: float  # the published demo / sampling setting in that form
    extra_tokens: int  # tokens beside the patches (U-ViT: label and time)
    # whether the blocks form one chain, so that a span of them can be replaced by its residual (U-ViT's
    # long skips connect in-blocks to out-blocks: a skipped in-block would leave its skip missing)
    spans: bool = True
    unit_kinds: tuple[str, ...] = UNIT_KINDS  # each block's units, in execution order
    # what a call is conditioned on: class labels, or a prompt's embeddings (text-to-image models)
    conditioning: str = "labels"

    def guidance_settings(self, scale: float | None = None, channels: str | None = None) -> tuple[float, str]:
        """(scale, form): the given ones, or the family's published defaults where None."""
        return (self.guidance_scale if scale is None else scale), (channels or self.guidance)

    def unit_names(self, config: dict) -> tuple[str, ...]:
        """Cacheable units in execution order: each block's `unit_kinds` (DiT, U-ViT: attention, then
        MLP; PixArt: self-attention, cross-attention, MLP)."""
        if self.name == "dit":
            blocks = [f"blocks.{i}" for i in range(config["depth"])]
        elif self.name == "pixart":  # diffusers' PixArtTransformer2DModel names
            blocks = [f"transformer_blocks.{i}" for i in range(config["depth"])]
        else:  # U-ViT: depth/2 in blocks, one mid block, depth/2 out blocks (with long skips)
            half = config["depth"] // 2
            blocks = [f"in_blocks.{i}" for i in range(half)] + ["mid_block"] + [f"out_blocks.{i}" for i in range(half)]
        return tuple(f"{b}.{kind}" for b in blocks for kind in self.unit_kinds)


# The official DiT constructor's defaults (DiT-XL/2 at 256 px). Its noise schedule (linear betas
# 1e-4…0.02) is PixArt's, so PixArt's DPM-Solver++ 2M samples it too; DDIM stays the default.
DIT = Family("dit", dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                         mlp_ratio=4.0, num_classes=1000, learn_sigma=True),
             samplers=("ddim", "dpm-solver++-2m"), guidance="first3", guidance_scale=4.0, extra_tokens=0)
# U-ViT-H/2 for ImageNet 256 latents (baofff/U-ViT configs/imagenet256_uvit_huge.py): 1001 classes
# (1000 is the null class), no qkv bias, no time MLP, no final conv.
UVIT = Family("uvit", dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                           mlp_ratio=4.0, num_classes=1001, qkv_bias=False, mlp_time_embed=False, conv=False),
              samplers=("dpm-solver-2",), guidance="uvit", guidance_scale=0.4, extra_tokens=2, spans=False)
# PixArt-XL/2 (diffusers' PixArtTransformer2DModel as the conversion scripts build it, here with DiT's
# names for the shared options: input_size = sample_size, the latent size; hidden_size = heads × 72;
# learn_sigma = out_channels 8): a 4096-wide T5 prompt of `max_text_tokens` tokens (α 120, Σ 300, the
# pipelines' max_sequence_length) is projected to the width and attended to by every block. The
# defaults are α at 1024 px (diffusers' constructor defaults: sample_size 128, which turns on the
# resolution / aspect-ratio micro-conditions and interpolation_scale 128 // 64 = 2). The pipelines
# sample with DPM-Solver++ (2M) by default and guide every channel with scale 4.5.
PIXART = Family("pixart", dict(input_size=128, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                               num_heads=16, mlp_ratio=4.0, learn_sigma=True, caption_channels=4096,
                               max_text_tokens=120, use_additional_conditions=True, interpolation_scale=2),
                # PixArt's noise schedule is DiT's (linear betas 1e-4…0.02 over 1000 steps), so DDIM is exact.
                samplers=("dpm-solver++-2m", "ddim"), guidance="all", guidance_scale=4.5, extra_tokens=0,
                unit_kinds=PIXART_UNIT_KINDS, conditioning="prompt")
FAMILIES = {f.name: f for f in (DIT, UVIT, PIXART)}

# The zoo: each model an explicit entry over its family's defaults. DiT's sizes are the paper's
# Table 1 (XL, L, B, S: depth, width, heads) at patch 2, 4 and 8, for 256 px (32×32 latents).
CONFIGS = {
    "dit-xl2": dict(family="dit", depth=28, hidden_size=1152, num_heads=16, patch_size=2),
    "dit-xl4": dict(family="dit", depth=28, hidden_size=1152, num_heads=16, patch_size=4),
    "dit-xl8": dict(family="dit", depth=28, hidden_size=1152, num_heads=16, patch_size=8),
    "dit-l2": dict(family="dit", depth=24, hidden_size=1024, num_heads=16, patch_size=2),
    "dit-l4": dict(family="dit", depth=24, hidden_size=1024, num_heads=16, patch_size=4),
    "dit-l8": dict(family="dit", depth=24, hidden_size=1024, num_heads=16, patch_size=8),
    "dit-b2": dict(family="dit", depth=12, hidden_size=768, num_heads=12, patch_size=2),
    "dit-b4": dict(family="dit", depth=12, hidden_size=768, num_heads=12, patch_size=4),
    "dit-b8": dict(family="dit", depth=12, hidden_size=768, num_heads=12, patch_size=8),
    "dit-s2": dict(family="dit", depth=12, hidden_size=384, num_heads=6, patch_size=2),
    "dit-s4": dict(family="dit", depth=12, hidden_size=384, num_heads=6, patch_size=4),
    "dit-s8": dict(family="dit", depth=12, hidden_size=384, num_heads=6, patch_size=8),
    # The embedded default model, trained here on scikit-learn's digits (exporter/train_digits.py).
    "dit-digits": dict(family="dit", input_size=8, patch_size=2, in_channels=1, hidden_size=128, depth=12,
                       num_heads=4, num_classes=10, learn_sigma=False),
    # U-ViT's published ImageNet latent configs: 256 px (32×32 latents, patch 2) and 512 px (64×64, patch 4).
    "uvit-h2": dict(family="uvit", depth=28, hidden_size=1152),
    "uvit-h4": dict(family="uvit", depth=28, hidden_size=1152, input_size=64, patch_size=4),
    "uvit-l2": dict(family="uvit", depth=20, hidden_size=1024),
    "uvit-l4": dict(family="uvit", depth=20, hidden_size=1024, input_size=64, patch_size=4),
    # PixArt-α (PixArt-alpha/PixArt-XL-2-{256x256,512x512,1024-MS}) and PixArt-Σ
    # (PixArt-alpha/PixArt-Sigma-XL-2-{512,1024}-MS): latents of image size / 8. Interpolation scales:
    # α's leave diffusers' default max(sample_size // 64, 1) (the original inference script's
    # lewei_scale {256: 1, 512: 1, 1024: 2}); Σ's conversion passes {256: 0.5, 512: 1, 1024: 2, 2048: 4}.
    # Only α-1024 (PixArtMS) was trained with the micro-conditions; Σ's conversion turns them off.
    "pixart-alpha-256": dict(family="pixart", input_size=32, use_additional_conditions=False, interpolation_scale=1),
    "pixart-alpha-512": dict(family="pixart", input_size=64, use_additional_conditions=False, interpolation_scale=1),
    "pixart-alpha-1024": dict(family="pixart", input_size=128, use_additional_conditions=True, interpolation_scale=2),
    "pixart-sigma-512": dict(family="pixart", input_size=64, use_additional_conditions=False, interpolation_scale=1,
                             max_text_tokens=300),
    "pixart-sigma-1024": dict(family="pixart", input_size=128, use_additional_conditions=False, interpolation_scale=2,
                              max_text_tokens=300),
}
# Every option any family takes, in a fixed order: the CLIs offer them all as --flags.
OVERRIDES = tuple(dict.fromkeys(k for f in FAMILIES.values() for k in f.defaults))
BOOLEAN_OPTIONS = ("learn_sigma", "qkv_bias", "mlp_time_embed", "conv", "use_additional_conditions")


def family_of(config: dict) -> Family:
    name = config.get("family", "dit")
    if name not in FAMILIES:
        raise BlockcacheError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def model_config(name: str, **overrides) -> dict:
    """Constructor arguments (plus `family`) for zoo model `name`, with official-named overrides
    (None = keep); an option the model's family does not have is an error."""
    if name not in CONFIGS:
        raise BlockcacheError(f"unknown model {name!r} (known: {', '.join(CONFIGS)})")
    family = FAMILIES[CONFIGS[name]["family"]]
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - set(family.defaults)
    if unknown:
        raise BlockcacheError(f"{name} ({family.name}) has no option {sorted(unknown)[0]!r} "
                              f"(its options: {', '.join(family.defaults)})")
    config = {"family": family.name, **family.defaults, **CONFIGS[name], **given}
    check_config(config)
    return config


def check_config(c: dict) -> None:
    family = family_of(c)
    sizes = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads")
    # PixArt has a prompt instead of class labels: its T5 width (the token count: check_pixart_config)
    sizes += ("caption_channels",) if family.name == "pixart" else ("num_classes",)
    for key in sizes:
        if isinstance(c[key], bool) or not isinstance(c[key], int) or not 1 <= c[key] <= MAX_SIZE:
            raise BlockcacheError(f"{key} must be a positive integer up to {MAX_SIZE}, got {c[key]!r}")
    for key in BOOLEAN_OPTIONS:
        if key in family.defaults and not isinstance(c[key], bool):
            raise BlockcacheError(f"{key} must be true or false, got {c[key]!r}")
    if c["input_size"] % c["patch_size"]:
        raise BlockcacheError(f"input_size {c['input_size']} is not a multiple of patch_size {c['patch_size']}")
    if c["hidden_size"] % c["num_heads"]:
        raise BlockcacheError(f"hidden_size {c['hidden_size']} is not divisible by num_heads {c['num_heads']}")
    if family.name == "pixart":
        check_pixart_config(c)
    if family.name in ("dit", "pixart") and c["hidden_size"] % 4:
        raise BlockcacheError(f"hidden_size must be a multiple of 4 for the 2-D sin-cos embedding, got {c['hidden_size']}")
    if family.name == "uvit" and (c["depth"] % 2 or c["num_classes"] < 2):
        raise BlockcacheError("a U-ViT needs an even depth (in and out blocks pair up through the long skips) "
                              f"and num_classes >= 2 (the last is the null class), got {c['depth']} and {c['num_classes']}")
    tokens = (c["input_size"] // c["patch_size"]) ** 2 + family.extra_tokens
    if tokens > MAX_TOKENS:
        raise BlockcacheError(f"input_size {c['input_size']} with patch_size {c['patch_size']} makes {tokens} tokens, "
                              f"more than {MAX_TOKENS}")
    ratio = c["mlp_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
        raise BlockcacheError(f"mlp_ratio must be a positive finite number, got {ratio}")
    if not 1 <= int(c["hidden_size"] * ratio) <= MAX_WIDTH:
        raise BlockcacheError(f"mlp_ratio {ratio} makes an MLP of width {int(c['hidden_size'] * ratio)} for hidden size "
                              f"{c['hidden_size']} (it must be 1…{MAX_WIDTH})")
    d = c["hidden_size"]
    if family.name == "pixart":  # cross-attention in every block, the caption projection; no label table
        parameters = c["depth"] * (8 * d * d + 2 * d * int(d * ratio)) + 6 * d * d + c["caption_channels"] * d + d * d
    else:
        parameters = c["depth"] * (4 * d * d + 2 * d * int(d * ratio) + 6 * d * d) + c["num_classes"] * d
    if parameters > MAX_PARAMETERS:
        raise BlockcacheError(f"depth {c['depth']} at hidden size {d} makes about {parameters / 1e9:.0f} G parameters, "
                              f"more than {MAX_PARAMETERS / 1e9:.0f} G")


def check_pixart_config(c: dict) -> None:
    """PixArt's own keys: the prompt's token count, the sin-cos table's interpolation scale, and a width
    that the micro-conditions can split (resolution and aspect ratio each embed to hidden_size / 3)."""
    tokens = c["max_text_tokens"]
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= MAX_TOKENS:
        raise BlockcacheError(f"max_text_tokens must be a positive integer up to {MAX_TOKENS}, got {tokens!r}")
    scale = c["interpolation_scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or not 0 < scale <= MAX_SIZE:
        raise BlockcacheError(f"interpolation_scale must be a positive number up to {MAX_SIZE}, got {scale!r}")
    if c["use_additional_conditions"] and c["hidden_size"] % 3:
        raise BlockcacheError("the micro-conditions (use_additional_conditions) embed resolution and aspect ratio "
                              f"to hidden_size / 3 each: hidden_size must be a multiple of 3, got {c['hidden_size']}")


def unit_names(config: dict) -> tuple[str, ...]:
    """Cacheable units of `config`'s model in execution order."""
    return family_of(config).unit_names(config)


def takes_prompt(config: dict) -> bool:
    """Whether a model is conditioned on prompt embeddings (text-to-image) rather than class labels."""
    return family_of(config).conditioning == "prompt"


def num_labels(config: dict) -> int:
    """Class labels a user may pass: DiT's table has an extra null row; U-ViT counts its null class.
    A text-to-image model (PixArt) takes none: 0, which every label check refuses."""
    family = family_of(config)
    if family.conditioning == "prompt":
        return 0
    return config["num_classes"] - (1 if family.name == "uvit" else 0)


def check_sampler(config: dict, sampler: str, model_name: str = "the model") -> None:
    """Refuse, in one line, a schedule whose solver the model's noise schedule is not sampled with."""
    family = family_of(config)
    if sampler not in family.samplers:
        raise BlockcacheError(f"a {sampler} schedule cannot run on {model_name} (a {family.name} model samples "
                              f"with {', '.join(family.samplers)})")
