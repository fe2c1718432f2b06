"""The model zoo's configurations and unit layout, without torch.

Schedules, the cost model and the CLIs need to know a model's units and sizes; only the exporter
needs the network itself (`exporter.models` builds it from these configs).
"""

from __future__ import annotations

from .errors import BlockcacheError

# The official DiT constructor's defaults (DiT-XL/2 at 256 px).
DEFAULTS = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                mlp_ratio=4.0, num_classes=1000, learn_sigma=True)
SIZES = {"xl": (28, 1152, 16), "l": (24, 1024, 16), "b": (12, 768, 12), "s": (12, 384, 6)}
CONFIGS = {f"dit-{size}{p}": dict(depth=d, hidden_size=h, num_heads=n, patch_size=p)
           for size, (d, h, n) in SIZES.items() for p in (2, 4, 8)}
# The embedded default model, trained here on scikit-learn's digits (exporter/train_digits.py).
CONFIGS["dit-digits"] = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=128, depth=12, num_heads=4,
                             num_classes=10, learn_sigma=False)
OVERRIDES = tuple(DEFAULTS)
UNIT_KINDS = ("attn", "mlp")


def model_config(name: str, **overrides) -> dict:
    """Constructor arguments for zoo model `name`, with official-named overrides (None = keep)."""
    if name not in CONFIGS:
        raise BlockcacheError(f"unknown model {name!r} (known: {', '.join(CONFIGS)})")
    unknown = set(overrides) - set(OVERRIDES)
    if unknown:
        raise BlockcacheError(f"unknown model option {sorted(unknown)[0]!r} (known: {', '.join(OVERRIDES)})")
    config = {**DEFAULTS, **CONFIGS[name], **{k: v for k, v in overrides.items() if v is not None}}
    check_config(config)
    return config


def check_config(c: dict) -> None:
    for key in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
        if isinstance(c[key], bool) or not isinstance(c[key], int) or c[key] < 1:
            raise BlockcacheError(f"{key} must be a positive integer, got {c[key]!r}")
    if not isinstance(c["learn_sigma"], bool):
        raise BlockcacheError(f"learn_sigma must be true or false, got {c['learn_sigma']!r}")
    if c["input_size"] % c["patch_size"]:
        raise BlockcacheError(f"input_size {c['input_size']} is not a multiple of patch_size {c['patch_size']}")
    if c["hidden_size"] % c["num_heads"]:
        raise BlockcacheError(f"hidden_size {c['hidden_size']} is not divisible by num_heads {c['num_heads']}")
    if c["hidden_size"] % 4:
        raise BlockcacheError(f"hidden_size must be a multiple of 4 for the 2-D sin-cos embedding, got {c['hidden_size']}")
    if isinstance(c["mlp_ratio"], bool) or not isinstance(c["mlp_ratio"], (int, float)) or not c["mlp_ratio"] > 0:
        raise BlockcacheError(f"mlp_ratio must be positive, got {c['mlp_ratio']}")


def unit_names(config: dict) -> tuple[str, ...]:
    """Cacheable units in execution order: each block's attention, then its MLP."""
    return tuple(f"blocks.{i}.{kind}" for i in range(config["depth"]) for kind in UNIT_KINDS)
