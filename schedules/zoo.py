"""Model families and the model zoo's configurations, without torch.

Schedules, the cost model and the CLIs need to know a model's units and sizes; only the exporter
needs the network itself (`exporter.models` builds it from these configs). A family declares its
reference constructor arguments, its cacheable units in execution order, where its tokens come from
(for the cost model), the solver its noise schedule is sampled with, and its guidance form. Every
config carries its family under `"family"`; configs written before U-ViT existed mean DiT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import BlockcacheError

UNIT_KINDS = ("attn", "mlp")
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

    def guidance_settings(self, scale: float | None = None, channels: str | None = None) -> tuple[float, str]:
        """(scale, form): the given ones, or the family's published defaults where None."""
        return (self.guidance_scale if scale is None else scale), (channels or self.guidance)

    def unit_names(self, config: dict) -> tuple[str, ...]:
        """Cacheable units in execution order: each block's attention, then its MLP."""
        if self.name == "dit":
            blocks = [f"blocks.{i}" for i in range(config["depth"])]
        else:  # U-ViT: depth/2 in blocks, one mid block, depth/2 out blocks (with long skips)
            half = config["depth"] // 2
            blocks = [f"in_blocks.{i}" for i in range(half)] + ["mid_block"] + [f"out_blocks.{i}" for i in range(half)]
        return tuple(f"{b}.{kind}" for b in blocks for kind in UNIT_KINDS)


# The official DiT constructor's defaults (DiT-XL/2 at 256 px).
DIT = Family("dit", dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                         mlp_ratio=4.0, num_classes=1000, learn_sigma=True),
             samplers=("ddim",), guidance="first3", guidance_scale=4.0, extra_tokens=0)
# U-ViT-H/2 for ImageNet 256 latents (baofff/U-ViT configs/imagenet256_uvit_huge.py): 1001 classes
# (1000 is the null class), no qkv bias, no time MLP, no final conv.
UVIT = Family("uvit", dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                           mlp_ratio=4.0, num_classes=1001, qkv_bias=False, mlp_time_embed=False, conv=False),
              samplers=("dpm-solver-2",), guidance="uvit", guidance_scale=0.4, extra_tokens=2, spans=False)
FAMILIES = {f.name: f for f in (DIT, UVIT)}

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
}
# Every option any family takes, in a fixed order: the CLIs offer them all as --flags.
OVERRIDES = tuple(dict.fromkeys(k for f in FAMILIES.values() for k in f.defaults))
BOOLEAN_OPTIONS = ("learn_sigma", "qkv_bias", "mlp_time_embed", "conv")


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
    for key in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
        if isinstance(c[key], bool) or not isinstance(c[key], int) or not 1 <= c[key] <= MAX_SIZE:
            raise BlockcacheError(f"{key} must be a positive integer up to {MAX_SIZE}, got {c[key]!r}")
    for key in BOOLEAN_OPTIONS:
        if key in family.defaults and not isinstance(c[key], bool):
            raise BlockcacheError(f"{key} must be true or false, got {c[key]!r}")
    if c["input_size"] % c["patch_size"]:
        raise BlockcacheError(f"input_size {c['input_size']} is not a multiple of patch_size {c['patch_size']}")
    if c["hidden_size"] % c["num_heads"]:
        raise BlockcacheError(f"hidden_size {c['hidden_size']} is not divisible by num_heads {c['num_heads']}")
    if family.name == "dit" and c["hidden_size"] % 4:
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
    parameters = c["depth"] * (4 * d * d + 2 * d * int(d * ratio) + 6 * d * d) + c["num_classes"] * d
    if parameters > MAX_PARAMETERS:
        raise BlockcacheError(f"depth {c['depth']} at hidden size {d} makes about {parameters / 1e9:.0f} G parameters, "
                              f"more than {MAX_PARAMETERS / 1e9:.0f} G")


def unit_names(config: dict) -> tuple[str, ...]:
    """Cacheable units of `config`'s model in execution order."""
    return family_of(config).unit_names(config)


def num_labels(config: dict) -> int:
    """Class labels a user may pass: DiT's table has an extra null row; U-ViT counts its null class."""
    return config["num_classes"] - (1 if family_of(config).name == "uvit" else 0)


def check_sampler(config: dict, sampler: str, model_name: str = "the model") -> None:
    """Refuse, in one line, a schedule whose solver the model's noise schedule is not sampled with."""
    family = family_of(config)
    if sampler not in family.samplers:
        raise BlockcacheError(f"a {sampler} schedule cannot run on {model_name} (a {family.name} model samples "
                              f"with {', '.join(family.samplers)})")
