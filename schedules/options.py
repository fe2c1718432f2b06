"""Command-line options shared by every blockcache CLI that takes `--model`."""

from __future__ import annotations

import argparse
import re
import sys

from .errors import BlockcacheError
from .zoo import BOOLEAN_OPTIONS, CONFIGS, OVERRIDES, model_config


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one `error:` line and exit 2 (no usage dump)."""

    def error(self, message):
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def add_model_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=required, metavar="NAME", help=f"zoo name ({', '.join(CONFIGS)})")
    for key in OVERRIDES:
        flag = "--" + key.replace("_", "-")
        if key in BOOLEAN_OPTIONS:
            group.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None,
                               help=f"override the config's {key}")
        else:
            group.add_argument(flag, dest=key, type=float if key == "mlp_ratio" else int, default=None,
                               metavar="N", help=f"override the config's {key}")


def model_overrides(args) -> dict:
    return {k: getattr(args, k) for k in OVERRIDES if getattr(args, k, None) is not None}


def config_from_args(args) -> dict:
    return model_config(args.model, **model_overrides(args))


def add_weights_args(parser: argparse.ArgumentParser, seed_flag: str = "--init-seed") -> None:
    group = parser.add_argument_group("weights")
    group.add_argument("--checkpoint", metavar="PATH", help="official .pt, diffusers state dict or .safetensors")
    group.add_argument("--random-init", action="store_true", help="use seeded random weights (never implied)")
    group.add_argument(seed_flag, dest="init_seed", type=int, default=0, metavar="S", help="seed for --random-init")


def parse_numbers(text: str, flag: str, kind=int) -> list:
    """Comma-separated numbers of `kind` (int or float) for option `flag`, written plainly (no empty
    entries, no `1_0`); one-line errors."""
    parts = [v.strip() for v in text.split(",")]
    if not text.strip():
        raise BlockcacheError(f"{flag} is empty")
    pattern = r"[+-]?[0-9]{1,18}" if kind is int else r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?"
    if not all(re.fullmatch(pattern, v) for v in parts):
        what = "integers" if kind is int else "numbers"
        raise BlockcacheError(f"{flag} must be comma-separated {what}, got {text!r}")
    return [kind(v) for v in parts]


def parse_labels(text: str, flag: str = "--labels") -> list[int]:
    return parse_numbers(text, flag, int)
