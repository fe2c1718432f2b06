"""A network from a zoo config (schedules/zoo.py): the family's class, weights as constructed."""

from __future__ import annotations

import torch.nn as nn

from schedules.errors import BlockcacheError
from schedules.zoo import family_of

from .dit import DiT
from .pixart import PixArt
from .uvit import UViT

NETWORKS = {"dit": DiT, "uvit": UViT, "pixart": PixArt}  # family name → network class


def build_model(config: dict) -> nn.Module:
    """The network of `config`'s family with the constructor's weights (build on the meta device to
    allocate none)."""
    family = family_of(config)
    try:
        return NETWORKS[family.name](**config)
    except TypeError as e:
        raise BlockcacheError(f"not a {family.name} config: {e}") from None
